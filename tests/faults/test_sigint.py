"""Ctrl-C (SIGINT) stops `fastindex index` promptly in every phase (walk, COCO ingest, probe,
model load and embedding) with exit code 130, and the next run resumes to the clean result.

This process watches the store through `Dataset.load(..., resume=False)` and sends the signal
once the run is inside the phase. The time from the signal to the exit is recorded for the
report (the issue asks for 0.5 s); the assertion is a hang guard.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastindex
import kit
import pytest

ATTEMPTS = 8  # runs that may go past the phase before this process sees it (the walk is short)
HANG_GUARD = 2.0  # seconds from SIGINT to exit that count as a hang (the goal is 0.5 s)

Cond = Callable[[dict[str, Any], int], bool]
# phase: (clean run, CLI flags beyond the folder, the moment to interrupt: p, rows expected)
PHASES: dict[str, tuple[str, list[str], Cond]] = {
    # phase 1 commits its rows at the end of the walk (or in chunks): fewer than all are in
    "walk": ("images", ["--no-embed"], lambda p, n: p["total"] < n),
    "coco": ("coco", ["--no-embed"], lambda p, n: p["total"] < n),
    # a first batch is committed: phase 1 has returned and phase 2 is under way
    "probe": ("images", ["--no-embed"], lambda p, n: p["total"] == n and 0 < p["pending"] < n),
    # phase 3 waiting for torch and the model to load: rows indexed, none embedded yet
    "embed-load": ("embed", kit.TINY_ARGS,
                   lambda p, n: p["total"] == n and p["indexed"] > 0 and p["ready"] == 0),
    "embed": ("embed", kit.TINY_ARGS,
              lambda p, n: p["total"] == n and p["ready"] > 0 and p["indexed"] > 0),
}  # fmt: skip


def _args(kind: str, trees: kit.Trees, db: Path, flags: list[str]) -> list[object]:
    root = trees.small.root if kind == "embed" else trees.big.root
    coco = ["--coco", trees.coco] if kind == "coco" else []
    return ["index", root, *coco, "--db", db, "--name", kit.NAME, *flags]


def _reader(db: Path) -> fastindex.Dataset | None:
    """The run's dataset, once its store and dataset are committed."""
    if not db.exists() or db.stat().st_size == 0:
        return None  # let the run lay the store out
    try:
        return fastindex.Dataset.load(kit.NAME, db=db, resume=False)
    except (fastindex.DatasetNotFoundError, fastindex.StoreError):
        return None


def interrupt_when(
    proc: subprocess.Popen[str], db: Path, cond: Cond, n: int
) -> tuple[dict[str, Any], float] | None:
    """Send SIGINT once `cond(progress)` holds; `(progress then, seconds to exit)`, or None
    when the run ended before the moment came."""
    reader = None
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if reader is None:
            reader = _reader(db)
            if reader is None:
                time.sleep(0.001)
                continue
        p = reader.get_loading_progress()
        if cond(p, n):
            sent = time.monotonic()
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise AssertionError("`fastindex index` ignored SIGINT for 60 s") from None
            return p, time.monotonic() - sent
        time.sleep(0.0005)
    return None


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("phase", list(PHASES))
def test_sigint_exits_promptly_and_the_next_run_resumes(
    phase: str, trees: kit.Trees, clean_runs: kit.CleanRuns, tmp_path: Path
) -> None:
    kind, flags, cond = PHASES[phase]
    clean, _ = clean_runs.get(kind)
    n = sum(clean.count_star[kit.NAME].values())
    for attempt in range(ATTEMPTS):
        db = tmp_path / f"store{attempt}.db"
        proc = kit.cli(*_args(kind, trees, db, flags))
        try:
            hit = interrupt_when(proc, db, cond, n)
        finally:
            if proc.poll() is None:
                proc.kill()
            _, err = proc.communicate()
        if hit is not None:
            break
    else:
        pytest.fail(f"the run never was in phase {phase!r} when looked at, in {ATTEMPTS} tries")
    at, took = hit
    kit.record(
        f"SIGINT in {phase} (try {attempt + 1}): exit {proc.returncode} after {took:.3f} s "
        f"(at total {at['total']}, pending {at['pending']}, ready {at['ready']})"
    )
    assert proc.returncode == 130, f"exit {proc.returncode} after SIGINT:\n{err[-3000:]}"
    assert took < HANG_GUARD, f"{took:.2f} s from SIGINT to exit"
    assert "Traceback" not in err, err[-3000:]

    rc, _, err = kit.finish_cli(kit.cli(*_args(kind, trees, db, flags)), timeout=180)
    assert rc == 0, f"the run after SIGINT exited {rc}:\n{err[-3000:]}"
    kit.assert_same_store(kit.dump_store(db), clean)

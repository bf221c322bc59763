"""kill -9 at random moments in each phase, then reopen, finish, and compare the whole store
with a clean run: every sample row, annotation and vector, exactly once.

Each phase's length is measured once, from the clean runs' timeline; every trial then kills a
fresh run a delay after it enters the phase (its mark), drawn over that length with a seeded
RNG. The runs are forked from a zygote (torch is imported once), so a trial costs the
work it does, not an interpreter start.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from pathlib import Path

import kit
import pytest

SEED = 7
TRIALS = 20

# phase -> (which run, the marks that open and close its window, where a kill inside it lands)
PHASES = {
    "walk": ("images", "start", "scanned", {"before start", "after start", "after created"}),
    "coco": ("coco", "created", "scanned", {"after created"}),
    "probe": ("images", "scanned", "done", {"after scanned"}),
    "embed": ("embed", "scanned", "done", {"after scanned"}),
}
_landed: dict[str, list[str]] = {}
_shortest: dict[str, float] = {}


def _wait_for_mark(child: kit.Child, mark: str) -> float:
    """When (monotonic) this process saw `mark` from the child."""
    deadline = time.monotonic() + 60
    while mark not in child.marks():
        if child.zygote.exit_code(child.pid) is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {mark!r} from the run:\n{child.output()[-3000:]}")
        time.sleep(0.0005)
    return time.monotonic()


def _where(marks: dict[str, float], code: int) -> str:
    if code == 0:
        return "after the run"
    for m in ("done", "scanned", "created", "start"):
        if m in marks:
            return f"after {m}"
    return "before start"


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("trial", range(TRIALS))
@pytest.mark.parametrize("phase", list(PHASES))
def test_kill_9_then_finish_matches_a_clean_run(
    phase: str,
    trial: int,
    zygote: kit.Zygote,
    trees: kit.Trees,
    clean_runs: kit.CleanRuns,
    tmp_path: Path,
) -> None:
    kind, opens, closes, inside_marks = PHASES[phase]
    clean, _ = clean_runs.get(kind)
    # The kill comes a random time after the run enters the phase (seen from its mark), drawn
    # over the phase's length in the clean runs: a slow start does not push it past the phase.
    # On a busy machine runs differ in speed: once a run went through the phase faster than
    # that, the shortest pass seen so far is the length.
    length = min(clean_runs.phase_length(kind, opens, closes), _shortest.get(phase, 1e9))
    delay = random.Random(f"{SEED}-{phase}-{trial}").uniform(0.0, length)

    db = tmp_path / "store.db"
    args = kit.script_args(kind, db, trees)
    child = zygote.run(kit.SCRIPTS[kind], args)
    entered = child.t0 if opens == "start" else _wait_for_mark(child, opens)
    time.sleep(max(0.0, delay - (time.monotonic() - entered)))
    child.kill(signal.SIGKILL)
    code = child.wait(60)
    assert code in (0, -signal.SIGKILL), child.output()[-3000:]
    seen = child.marks()
    if closes in seen:
        passed = seen[closes] - (seen[opens] if opens != "start" else 0.0)
        _shortest[phase] = min(_shortest.get(phase, 1e9), max(passed, 0.001))
    where = _where(seen, code)
    _landed.setdefault(phase, []).append(where)
    if len(_landed[phase]) == TRIALS:
        inside = sum(w in inside_marks for w in _landed[phase])
        outside = Counter(w for w in _landed[phase] if w not in inside_marks)
        kit.record(
            f"kill -9 in {phase}: {length:.3f} s long, {inside}/{TRIALS} kills inside it"
            + (f" (others: {dict(outside)})" if outside else "")
        )

    # Reopen and finish. Once the killed run's add had returned, `Dataset.load` alone must
    # finish the rest (phases 2 and 3 resume); before that, the user runs the same add again.
    if "scanned" in child.marks():
        again = zygote.run(kit.RESUME, [db])
    else:
        again = zygote.run(kit.SCRIPTS[kind], args)
    rc = again.wait(180)
    assert rc == 0, f"the run after a kill {where} failed ({rc}):\n{again.output()[-3000:]}"
    dump = kit.dump_store(db)
    (progress,) = again.json_lines()
    kit.assert_progress_matches(progress, dump)
    kit.assert_same_store(dump, clean)

"""`fastindex index` run again after a crash (kill -9) at each phase boundary finishes every
row before it exits 0, and its summary counts them (issue 7, item 11: the rerun used to wait
only for the rows its own call added and report `indexed 0, failed 0`).

The crashed run is the Python API in a child that kills itself (SIGKILL) exactly where the
boundary is: right after phase 1 returns, in the middle of phase 2, right after phase 2, and in
the middle of phase 3. The rerun is the real CLI in a new process.
"""

from __future__ import annotations

import signal
from pathlib import Path

import kit
import pytest

# The child's add has returned (the `scanned` mark); then it waits for the boundary and dies.
_CRASH = """
db, root = sys.argv[1], sys.argv[2]
ds = fastindex.Dataset.create("{name}", db=db)
job = ds.add_images_from_path(root, embed={embed})
mark("scanned")
total = job.summary["added"]
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    p = ds.get_loading_progress()
    if {boundary}:
        mark("boundary")
        print("JSON " + json.dumps(p), flush=True)
        die()
    time.sleep(0.0005)
sys.exit(4)  # the boundary went by unseen
"""
TINY = "testing.tiny_model(batch_size=8)"
BOUNDARIES = {
    # name: (clean run, embed argument, condition on the progress p, CLI flags)
    "after-phase-1": ("images", "False", "True", ["--no-embed"]),
    "mid-phase-2": ("images", "False", "0 < p['indexed'] + p['failed'] < total", ["--no-embed"]),
    "after-phase-2": ("embed", TINY, "p['pending'] == 0", kit.TINY_ARGS),
    "mid-phase-3": ("embed", TINY, "0 < p['ready'] and p['indexed'] > 0", kit.TINY_ARGS),
}


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("boundary", list(BOUNDARIES))
def test_rerun_after_a_crash_finishes_every_row_and_says_so(
    boundary: str, zygote: kit.Zygote, trees: kit.Trees, clean_runs: kit.CleanRuns, tmp_path: Path
) -> None:
    kind, embed, cond, flags = BOUNDARIES[boundary]
    clean, _ = clean_runs.get(kind)
    root = trees.big.root if kind == "images" else trees.small.root
    script = _CRASH.format(name=kit.NAME, embed=embed, boundary=cond)
    for attempt in range(5):
        db = tmp_path / f"store{attempt}.db"
        crashed = zygote.run(script, [db, root])
        code = crashed.wait(120)
        if code == -signal.SIGKILL and "boundary" in crashed.marks():
            break
        assert code == 4, f"the crashing run failed ({code}):\n{crashed.output()[-3000:]}"
    else:
        pytest.fail(f"the run went past {boundary} unseen in 5 tries")
    (at_crash,) = crashed.json_lines()
    kit.record(
        f"rerun after kill -9 {boundary}: left pending {at_crash['pending']}, "
        f"indexed {at_crash['indexed']}, ready {at_crash['ready']} of {at_crash['total']}"
    )

    rc, out, err = kit.finish_cli(
        kit.cli("index", root, "--db", db, "--name", kit.NAME, *flags), timeout=180
    )
    assert rc == 0, f"the rerun exited {rc}:\n{err[-3000:]}"
    # every row done, as in a clean run (not just the rows this call added)
    kit.assert_same_store(kit.dump_store(db), clean)
    want = clean.count_star[kit.NAME]
    indexed, ready, failed = kit.summary_counts(err + out)
    assert (indexed, ready, failed) == (
        want["indexed"] + want["embedding"] + want["ready"],
        want["ready"],
        want["failed"],
    ), f"the rerun's summary does not count every row of the dataset:\n{err[-2000:]}"

"""kill -9 at random moments in each phase, then reopen, finish, and compare the whole store
with a clean run: every sample row, annotation and vector, exactly once.

Each phase's window (where its run spends its time) is measured once, from the clean runs'
timeline; every trial then kills a fresh run after a delay drawn from that window with a
seeded RNG. The runs are forked from a zygote (torch is imported once), so a trial costs the
work it does, not an interpreter start.
"""

from __future__ import annotations

import random
import signal
import time
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
    marks = clean_runs.timeline(kind)
    start = marks.get(opens, 0.0) if opens != "start" else 0.0
    window = (start, marks[closes])
    delay = random.Random(f"{SEED}-{phase}-{trial}").uniform(*window)

    db = tmp_path / "store.db"
    args = kit.script_args(kind, db, trees)
    child = zygote.run(kit.SCRIPTS[kind], args)
    time.sleep(max(0.0, delay - (time.monotonic() - child.t0)))
    child.kill(signal.SIGKILL)
    code = child.wait(60)
    assert code in (0, -signal.SIGKILL), child.output()[-3000:]
    where = _where(child.marks(), code)
    _landed.setdefault(phase, []).append(where)
    if len(_landed[phase]) == TRIALS:
        inside = sum(w in inside_marks for w in _landed[phase])
        kit.record(
            f"kill -9 in {phase}: window {window[0]:.3f}-{window[1]:.3f} s, "
            f"{inside}/{TRIALS} kills inside it"
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

"""Two processes on one store at once finish with every row done exactly once: the same folder
into the same dataset (the CLI, and the API with phase 3), two datasets side by side, and a
COCO ingest beside another dataset's probe. Each dataset is compared row by row with a clean
run, and the stored counters with COUNT(*)."""

from __future__ import annotations

import time
from pathlib import Path

import kit
import pytest

ROUNDS = 5  # fresh stores per case: the races are in the first open and the first create


def _both_exit_0(*children: kit.Child) -> None:
    try:
        for c in children:
            rc = c.wait(180)
            assert rc == 0, f"a run exited {rc}:\n{c.output()[-3000:]}"
    finally:
        for c in children:
            c.kill()


def _wait_mark(child: kit.Child, mark: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while mark not in child.marks():
        assert time.monotonic() < deadline, f"no {mark!r} from the child:\n{child.output()[-2000:]}"
        assert child.zygote.exit_code(child.pid) is None, child.output()[-3000:]
        time.sleep(0.001)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_same_folder_into_the_same_dataset_from_two_clis(
    trees: kit.Trees, clean_runs: kit.CleanRuns, tmp_path: Path
) -> None:
    clean, _ = clean_runs.get("images")
    for r in range(ROUNDS):
        db = tmp_path / f"store{r}.db"
        args = ["index", trees.big.root, "--db", db, "--name", kit.NAME, "--no-embed", "--quiet"]
        t0 = time.monotonic()
        procs = [kit.cli(*args), kit.cli(*args)]
        try:
            results = [kit.finish_cli(p, timeout=180) for p in procs]
            kit.record(f"two CLIs, same folder, round {r}: {time.monotonic() - t0:.1f} s")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        for rc, _, err in results:
            assert rc == 0, f"round {r}: a CLI exited {rc}:\n{err[-3000:]}"
        kit.assert_same_store(kit.dump_store(db), clean)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_same_folder_into_the_same_dataset_with_embeddings(
    zygote: kit.Zygote, trees: kit.Trees, clean_runs: kit.CleanRuns, tmp_path: Path
) -> None:
    clean, _ = clean_runs.get("embed")
    for r in range(ROUNDS):
        db = tmp_path / f"store{r}.db"
        args = kit.script_args("embed", db, trees)
        a = zygote.run(kit.SCRIPTS["embed"], args)
        b = zygote.run(kit.SCRIPTS["embed"], args)
        _both_exit_0(a, b)
        dump = kit.dump_store(db)
        kit.assert_same_store(dump, clean)
        for c in (a, b):
            (progress,) = c.json_lines()
            assert progress["ready"] == clean.count_star[kit.NAME]["ready"], progress


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_datasets_at_once(
    zygote: kit.Zygote, trees: kit.Trees, clean_runs: kit.CleanRuns, tmp_path: Path
) -> None:
    images, _ = clean_runs.get("images")
    embedded, _ = clean_runs.get("embed")
    for r in range(ROUNDS):
        db = tmp_path / f"store{r}.db"
        a = zygote.run(kit.SCRIPTS["images"], kit.script_args("images", db, trees))
        b = zygote.run(kit.SCRIPTS["embed"], kit.script_args("embed", db, trees),
                       FAULTS_DATASET="second")  # fmt: skip
        _both_exit_0(a, b)
        dump = kit.dump_store(db)
        assert sorted(dump.datasets) == [kit.NAME, "second"], dump.datasets
        kit.assert_same_store(dump.of(kit.NAME), images)
        kit.assert_same_store(dump.of("second"), embedded.renamed("second"))
        kit.assert_progress_matches(a.json_lines()[0], dump, kit.NAME)
        kit.assert_progress_matches(b.json_lines()[0], dump, "second")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_coco_ingest_beside_another_datasets_probe(
    zygote: kit.Zygote, trees: kit.Trees, clean_runs: kit.CleanRuns, tmp_path: Path
) -> None:
    images, _ = clean_runs.get("images")
    coco, _ = clean_runs.get("coco")
    for r in range(ROUNDS):
        db = tmp_path / f"store{r}.db"
        probe = zygote.run(kit.SCRIPTS["images"], kit.script_args("images", db, trees))
        _wait_mark(probe, "scanned")  # phase 2 of the first dataset is running
        ingest = zygote.run(kit.SCRIPTS["coco"], kit.script_args("coco", db, trees),
                            FAULTS_DATASET="coco")  # fmt: skip
        _both_exit_0(probe, ingest)
        dump = kit.dump_store(db)
        kit.assert_same_store(dump.of(kit.NAME), images)
        kit.assert_same_store(dump.of("coco"), coco.renamed("coco"))
        kit.assert_progress_matches(probe.json_lines()[0], dump, kit.NAME)
        kit.assert_progress_matches(ingest.json_lines()[0], dump, "coco")

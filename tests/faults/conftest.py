"""Fixtures of the fault-injection suite (helpers in `kit.py`): the trees, the COCO file, the
zygote that forks the short runs, and clean runs to compare every faulted run with."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import kit
import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if kit.MEASURED:
        terminalreporter.section("fault-injection measurements")
        for line in kit.MEASURED:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kit.Zygote]:
    z = kit.Zygote.start(
        tmp_path_factory.mktemp("zygote"), ("fastindex", "fastindex.embed", "torch", "open_clip")
    )
    try:
        yield z
    finally:
        z.close()


@dataclass
class Trees:
    big: kit.Tree  # enough files for three probe batches
    coco: Path  # a COCO file over half of `big`, a polygon on every box
    small: kit.Tree  # for phase 3 with the tiny model


@pytest.fixture(scope="session")
def trees(tmp_path_factory: pytest.TempPathFactory, zygote: kit.Zygote) -> Trees:
    base = tmp_path_factory.mktemp("trees")
    big = kit.make_tree(base / "big", kit.BIG_FILES, seed=1)
    coco = base / "instances.json"
    kit.make_coco(coco, big, seed=2)
    small = kit.make_tree(base / "small", kit.SMALL_FILES, seed=3, distinct=96, per_dir=60)
    return Trees(big, coco, small)


class CleanRuns:
    """Runs without faults, made once per session and kept as dumps: the reference."""

    def __init__(self, zygote: kit.Zygote, trees: Trees, base: Path) -> None:
        self.zygote, self.trees, self.base = zygote, trees, base
        self._done: dict[str, tuple[kit.Dump, dict[str, float]]] = {}

    def get(self, kind: str) -> tuple[kit.Dump, dict[str, float]]:
        """`(dump, marks)` of a clean run of `kind` ("images", "coco" or "embed")."""
        if kind not in self._done:
            db = self.base / f"clean-{kind}.db"
            child = self.zygote.run(kit.SCRIPTS[kind], kit.script_args(kind, db, self.trees))
            assert child.wait(180) == 0, child.output()[-3000:]
            dump = kit.dump_store(db)
            (progress,) = child.json_lines()
            kit.assert_progress_matches(progress, dump)
            assert not dump.counts_ok and not dump.duplicates and not dump.phase_errors
            self._done[kind] = (dump, child.marks())
        return self._done[kind]


@pytest.fixture(scope="session")
def clean_runs(
    zygote: kit.Zygote, trees: Trees, tmp_path_factory: pytest.TempPathFactory
) -> CleanRuns:
    return CleanRuns(zygote, trees, tmp_path_factory.mktemp("clean"))

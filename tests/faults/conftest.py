"""Fixtures of the fault-injection suite (helpers in `kit.py`): the trees, the COCO file, the
zygote that forks the short runs, and clean runs to compare every faulted run with."""

from __future__ import annotations

from collections.abc import Iterator

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


@pytest.fixture(scope="session")
def trees(tmp_path_factory: pytest.TempPathFactory, zygote: kit.Zygote) -> kit.Trees:
    # (after `zygote`: it imports torch while the files are written)
    base = tmp_path_factory.mktemp("trees")
    big = kit.make_tree(base / "big", kit.BIG_FILES, seed=1)
    coco = base / "instances.json"
    kit.make_coco(coco, big, seed=2)
    small = kit.make_tree(base / "small", kit.SMALL_FILES, seed=3, distinct=96, per_dir=60)
    return kit.Trees(big, coco, small)


@pytest.fixture(scope="session")
def clean_runs(
    zygote: kit.Zygote, trees: kit.Trees, tmp_path_factory: pytest.TempPathFactory
) -> kit.CleanRuns:
    return kit.CleanRuns(zygote, trees, tmp_path_factory.mktemp("clean"))

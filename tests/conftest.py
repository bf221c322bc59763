"""Shared fixtures. Helpers that hypothesis tests call directly live in `testkit.py`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import fastindex
import pytest
from hypothesis import HealthCheck, settings

# Image encoding makes example times uneven; the suite bounds tests with pytest-timeout instead.
settings.register_profile(
    "fastindex",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("fastindex")


def pytest_configure(config: pytest.Config) -> None:
    # When a hypothesis test fails, its pytest plugin imports libcst to suggest a patch, and
    # libcst touches a deprecated name; under `filterwarnings = error` that would turn the
    # report of the failure into an INTERNALERROR that hides it.
    config.addinivalue_line(
        "filterwarnings", "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """Path of a fresh store (the file does not exist yet)."""
    return tmp_path / "fastindex.db"


@pytest.fixture
def new_dataset(db: Path) -> Callable[..., fastindex.Dataset]:
    """Create a dataset in the test's store: `new_dataset("name")`."""

    def make(name: str = "test") -> fastindex.Dataset:
        return fastindex.Dataset.create(name, db=db)

    return make


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test marked `gpu` where torch sees no CUDA device (CI has none)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    try:
        import torch

        has_cuda = bool(torch.cuda.is_available())
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)

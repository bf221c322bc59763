"""Shared fixtures. Helpers that hypothesis tests call directly live in `testkit.py`."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import fastindex
import pytest
from hypothesis import HealthCheck, settings
from server_support import CHROMIUM, TIMEOUT_MS

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

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


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium through playwright, one per test module (skipped without one)."""
    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page; the test fails if the page's JavaScript raised anything."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert errors == [], errors

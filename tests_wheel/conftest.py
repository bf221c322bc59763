"""The wheel smoke suite: the built wheel, installed into fresh virtual environments, used the
way a user would (the `fastindex` command, `python -c`, HTTP), never imported into this
process. `make wheel-smoke` builds the wheel, makes the two environments and runs this suite:

- `full`: `pip install 'fastindex-*.whl[embed,server]'` into a venv that sees the base
  interpreter's packages (torch is installed once, not twice);
- `bare`: `pip install fastindex-*.whl` into a venv that does not, so torch, open_clip, fastapi
  and uvicorn are truly absent.

Their paths come in `FASTINDEX_WHEEL_FULL` and `FASTINDEX_WHEEL_BARE`. Every subprocess runs
without `PYTHONPATH` and outside the source tree, so it can only find the installed wheel.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from wheelkit import Running, Venv

KINDS = ("full", "bare")


def _venv(kind: str) -> Venv:
    var = f"FASTINDEX_WHEEL_{kind.upper()}"
    path = os.environ.get(var)
    if not path:
        pytest.fail(f"{var} is not set: run `make wheel-smoke`, which builds the wheel and venvs")
    root = Path(path).absolute()
    if not (root / "bin" / "python").exists():
        pytest.fail(f"{var}={path} is not a virtual environment")
    return Venv(kind, root)


@pytest.fixture(params=KINDS)
def venv(request: pytest.FixtureRequest) -> Venv:
    """Each environment in turn."""
    return _venv(str(request.param))


@pytest.fixture
def full() -> Venv:
    return _venv("full")


@pytest.fixture
def bare() -> Venv:
    return _venv("bare")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder of 12 small images in two formats, one in a subfolder, and one broken file."""
    from PIL import Image

    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(12):
        im = Image.new("RGB", (40 + i, 30 + 2 * i), (20 * i, 100, 255 - 10 * i))
        where = root / "sub" if i % 4 == 0 else root
        im.save(where / f"img_{i:02d}.{'png' if i % 3 else 'jpg'}")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture
def processes() -> Iterator[list[Running]]:
    """Processes a test started; any still running at its end are stopped."""
    started: list[Running] = []
    yield started
    for p in started:
        p.stop()

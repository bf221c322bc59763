"""What the wheel installs: the package from the wheel (not the source tree), its entry point,
its static files, its type information, and only the dependencies its extras ask for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from wheelkit import Venv

PACKAGE_FILES = (
    "py.typed",
    "_core.pyi",
    "static/index.html",
    "static/app.js",
    "static/style.css",
)


def test_imports_the_installed_wheel(venv: Venv, tmp_path: Path) -> None:
    r = venv.python_code(
        "import fastindex, json, sys; "
        "print(json.dumps([fastindex.__file__, fastindex._core.__file__, fastindex.__version__]))",
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    package, core, version = json.loads(r.stdout)
    site = venv.root / "lib"
    assert Path(package).is_relative_to(site), package
    assert Path(core).is_relative_to(site) and Path(core).name.endswith(".abi3.so"), core
    assert version


def test_entry_point(venv: Venv, tmp_path: Path) -> None:
    r = venv.run(["fastindex", "--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "index" in r.stdout and "serve" in r.stdout


def test_package_files(venv: Venv, tmp_path: Path) -> None:
    r = venv.python_code(
        "import fastindex, os; print(os.path.dirname(fastindex.__file__))", tmp_path
    )
    root = Path(r.stdout.strip())
    for name in PACKAGE_FILES:
        assert (root / name).is_file(), f"{name} is not in the installed package"


def test_extras_installed_or_absent(venv: Venv, tmp_path: Path) -> None:
    """`full` has the extras; `bare` truly lacks them (no base site-packages leak in)."""
    r = venv.python_code(
        "import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) "
        "is not None for m in ('torch', 'open_clip', 'fastapi', 'uvicorn')}))",
        tmp_path,
    )
    found = json.loads(r.stdout)
    assert found == dict.fromkeys(found, venv.extras), found


SNIPPET = """\
import fastindex
from fastindex import _core

ds = fastindex.Dataset.load_or_create("x", db="x.db")
w, h = fastindex.image_size("a.png")
reveal_type(w)
reveal_type(ds.get_loading_progress())
reveal_type(_core.SCHEMA_VERSION)
reveal_type(_core.probe_bytes)
wrong: str = fastindex.image_size("a.png")
"""


def test_types_for_mypy(venv: Venv, tmp_path: Path) -> None:
    """mypy, run against the venv, sees the package's annotations (py.typed) and the stubs of
    the compiled core (_core.pyi): real types, not Any, and a real error where one is."""
    (tmp_path / "use.py").write_text(SNIPPET)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--python-executable",
            venv.python,
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            "use.py",
        ],
        cwd=tmp_path,
        env=venv.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = r.stdout.replace("builtins.", "")  # mypy < 2 spells builtin types out
    assert r.returncode == 1, out + r.stderr
    assert 'use.py:6: note: Revealed type is "int"' in out, out
    assert 'use.py:7: note: Revealed type is "dict[str, Any]"' in out, out
    assert 'use.py:8: note: Revealed type is "int"' in out, out
    assert 'use.py:9: note: Revealed type is "def (data: bytes) -> dict[str, Any]"' in out, out
    assert 'expression has type "tuple[int, int]", variable has type "str"' in out, out
    # One error only (the deliberate one): nothing about missing stubs or imports.
    assert "Found 1 error in 1 file" in out, out

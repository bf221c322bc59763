"""The Python API of the installed wheel: with the extras, phase 3 and search run (a tiny model
with random weights, no download); without them, each feature that needs one raises an error
whose one line names it, and everything else works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from wheelkit import Venv

# Run in the venv: `str(error)` and its class names, as JSON, or the call's result.
TRY = """\
import json, fastindex
def attempt(f):
    try:
        out = f()
    except Exception as e:
        return {"error": str(e), "classes": [c.__name__ for c in type(e).__mro__]}
    return {"ok": repr(out)}
"""

EMBED = (
    TRY
    + """\
from fastindex.testing import tiny_model
ds = fastindex.Dataset.load_or_create("photos", db="s.db")
ds.add_images_from_path(PHOTOS, embed=tiny_model()).wait()
p = ds.get_loading_progress()
hits = ds.search("a red square", k=5)
print(json.dumps({"progress": p, "hits": len(hits)}))
"""
)


def _embedded_store(full: Venv, images: Path, cwd: Path) -> dict[str, object]:
    r = full.python_code(EMBED.replace("PHOTOS", repr(str(images))), cwd)
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


def test_embed_and_search(full: Venv, images: Path, tmp_path: Path) -> None:
    out = _embedded_store(full, images, tmp_path)
    p = out["progress"]
    assert isinstance(p, dict)
    assert (p["ready"], p["failed"], p["status"]) == (12, 1, "complete"), p
    assert out["hits"] == 5


def _attempt(venv: Venv, call: str, cwd: Path, *, hint: str = "") -> dict[str, object]:
    """`call` in the venv; what it returned or raised. Anything it logged on stderr is a
    line with `hint` (no traceback)."""
    r = venv.python_code(TRY + f"print(json.dumps(attempt(lambda: {call})))", cwd)
    assert r.returncode == 0, r.stderr
    assert all(hint and hint in line for line in r.stderr.splitlines()), r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


def _names_extra(out: dict[str, object], extra: str) -> None:
    error = out.get("error")
    assert isinstance(error, str), out
    assert f"pip install 'fastindex[{extra}]'" in error, error
    assert "\n" not in error, error
    assert "FastIndexError" in out["classes"], out  # type: ignore[operator]


def test_default_add_without_torch_indexes(bare: Venv, images: Path, tmp_path: Path) -> None:
    out = _attempt(
        bare,
        f"(lambda ds: (ds.add_images_from_path({str(images)!r}).wait(), "
        "ds.get_loading_progress()))(fastindex.Dataset.create('photos', db='s.db'))",
        tmp_path,
    )
    assert "'indexed': 12" in str(out.get("ok")), out


@pytest.mark.parametrize(
    "call",
    [
        "fastindex.Dataset.create('a', db='s.db').add_images_from_path(PHOTOS, embed=True)",
        "fastindex.Dataset.create('b', db='s.db').embed()",
        "fastindex.EmbeddingModel()",
    ],
)
def test_embed_without_the_extra(bare: Venv, images: Path, tmp_path: Path, call: str) -> None:
    _names_extra(_attempt(bare, call.replace("PHOTOS", repr(str(images))), tmp_path), "embed")


def test_search_without_the_extra(full: Venv, bare: Venv, images: Path, tmp_path: Path) -> None:
    """A store embedded where torch is, searched where it is not."""
    _embedded_store(full, images, tmp_path)
    for call in ("search('a red square')", "similar(1)", "embeddings()"):
        # Loading it logs that its phase 3 cannot resume here, naming the extra too.
        out = _attempt(
            bare,
            f"fastindex.Dataset.load('photos', db='s.db').{call}",
            tmp_path,
            hint="pip install 'fastindex[embed]'",
        )
        _names_extra(out, "embed")


def test_server_without_the_extra(bare: Venv, tmp_path: Path) -> None:
    out = _attempt(bare, "__import__('fastindex.server')", tmp_path)
    _names_extra(out, "server")
    assert "ImportError" in out["classes"]  # type: ignore[operator]

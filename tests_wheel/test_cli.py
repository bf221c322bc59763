"""The `fastindex` command of the installed wheel: index generated images, serve the page with
its static files and the API; without the server extra, one line naming it and exit code 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

from wheelkit import Running, Venv, get, one_line_error

SERVER_EXTRA = "pip install 'fastindex[server]'"
EMBED_EXTRA = "pip install 'fastindex[embed]'"
Procs = list[Running]


def test_index(venv: Venv, images: Path, tmp_path: Path) -> None:
    """Phases 1-2 with the default options; without torch the default skips embeddings
    (no `--no-embed` needed). With the extras the default model would need its weights from
    the network, so that run says `--no-embed`."""
    flags = ["--no-embed"] if venv.extras else []
    r = venv.run(["fastindex", "index", str(images), "--db", "s.db", "--quiet", *flags], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "13 added" in r.stderr and "indexed 12" in r.stderr, r.stderr
    assert "failed broken.jpg" in r.stderr, r.stderr
    counts = venv.python_code(
        "import fastindex, json; ds = fastindex.Dataset.load('photos', db='s.db'); "
        "print(json.dumps(ds.get_loading_progress()))",
        tmp_path,
    )
    p = json.loads(counts.stdout)
    assert (p["total"], p["indexed"], p["failed"], p["pending"]) == (13, 12, 1, 0), p
    assert p["status"] == "complete"


def _static_refs(html: str, js: dict[str, str]) -> set[str]:
    """The /static/ files the page loads: those the HTML names and the modules the scripts
    import."""
    refs = set(re.findall(r'(?:src|href)="(/static/[^"]+)"', html))
    for source in js.values():
        refs |= {"/static/" + m for m in re.findall(r'from\s+"\./([^"]+)"', source)}
    return refs


def _check_page(venv: Venv, url: str, tmp_path: Path) -> None:
    """The page, every static file it loads (byte for byte the installed ones), the API."""
    status, ctype, body = get(url + "/")
    assert status == 200 and ctype.startswith("text/html"), (status, ctype)
    html = body.decode()
    package = venv.python_code(
        "import fastindex, os; print(os.path.dirname(fastindex.__file__))", tmp_path
    )
    static = Path(package.stdout.strip()) / "static"
    fetched: dict[str, str] = {}
    todo = _static_refs(html, {})
    while todo - fetched.keys():
        for ref in sorted(todo - fetched.keys()):
            status, ctype, data = get(url + ref)
            assert status == 200, ref
            kind = "text/css" if ref.endswith(".css") else "javascript"
            assert kind in ctype, (ref, ctype)
            assert data == (static / ref.removeprefix("/static/")).read_bytes(), ref
            fetched[ref] = data.decode()
        todo = _static_refs(html, {k: v for k, v in fetched.items() if k.endswith(".js")})
    assert {"/static/app.js", "/static/style.css", "/static/api.js"} <= fetched.keys()

    status, _, body = get(url + "/api/datasets")
    datasets = json.loads(body)["items"]
    assert [d["name"] for d in datasets] == ["photos"], datasets
    dataset_id = datasets[0]["id"]
    status, ctype, body = get(f"{url}/api/progress/{dataset_id}")
    assert status == 200 and ctype.startswith("application/json")
    assert json.loads(body)["total"] == 13
    status, _, body = get(f"{url}/api/datasets/{dataset_id}/samples?status=indexed&limit=1")
    sample = json.loads(body)["items"][0]
    status, ctype, _ = get(f"{url}/api/samples/{sample['id']}/thumbnail")
    assert status == 200 and ctype == "image/jpeg"


def test_serve(venv: Venv, images: Path, tmp_path: Path, processes: Procs) -> None:
    r = venv.run(
        ["fastindex", "index", str(images), "--db", "s.db", "--quiet", "--no-embed"], tmp_path
    )
    assert r.returncode == 0, r.stderr
    if not venv.extras:
        r = venv.run(["fastindex", "serve", "--db", "s.db", "--port", "0"], tmp_path)
        assert r.returncode == 2
        assert SERVER_EXTRA in one_line_error(r)
        return
    proc = venv.start(["fastindex", "serve", "--db", "s.db", "--port", "0"], tmp_path)
    processes.append(proc)
    m = proc.expect(r"http://127\.0\.0\.1:\d+", stream="stdout")
    _check_page(venv, m.group(0), tmp_path)
    assert proc.stop() in (0, 130)


def test_index_serve(venv: Venv, images: Path, tmp_path: Path, processes: Procs) -> None:
    args = ["fastindex", "index", str(images), "--db", "s.db", "--serve", "--port", "0"]
    if not venv.extras:
        r = venv.run(args, tmp_path)
        assert r.returncode == 2
        assert SERVER_EXTRA in one_line_error(r)
        assert not (tmp_path / "s.db").exists(), "nothing is written before the check"
        return
    proc = venv.start([*args, "--no-embed"], tmp_path)
    processes.append(proc)
    m = proc.expect(r"http://127\.0\.0\.1:\d+", stream="stderr")
    proc.expect(r"still serving", stream="stderr")  # every phase finished
    _check_page(venv, m.group(0), tmp_path)
    assert proc.stop() == 0


def test_embed_options_without_the_extra(bare: Venv, images: Path, tmp_path: Path) -> None:
    """Asking the CLI for a model without torch: one line naming the embed extra, exit 2,
    and no dataset made."""
    r = bare.run(
        ["fastindex", "index", str(images), "--db", "s.db", "--model", "ViT-B-32"], tmp_path
    )
    assert r.returncode == 2
    assert EMBED_EXTRA in one_line_error(r)
    listed = bare.python_code(
        "import fastindex; print(len(fastindex.list_datasets(db='s.db')))", tmp_path
    )
    assert listed.stdout.strip() in ("", "0"), listed

"""`fastindex list/info/samples/search/export/rm` in real subprocesses, `--json` parsed, exit
codes checked (0 ok, 1 not found or failed, 2 bad argument)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import fastindex
import pytest
from server_support import make_coco, make_images
from testkit import finish


def run_cli(*args: str, cwd: Path, pre: str = "") -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fastindex.cli", *args]
    if pre:  # code to run in the child before the CLI (registering the tiny model)
        cmd = [
            sys.executable,
            "-c",
            f"{pre}\nimport sys\nfrom fastindex.cli import main\nsys.exit(main(sys.argv[1:]))",
            *args,
        ]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def js(r: subprocess.CompletedProcess[str]) -> Any:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # exactly one document: json.loads refuses trailing data


def err(r: subprocess.CompletedProcess[str], code: int) -> dict[str, Any]:
    assert r.returncode == code, (r.stdout, r.stderr)
    assert r.stdout == ""
    e: dict[str, Any] = json.loads(r.stderr)
    assert e["message"] and "Traceback" not in r.stderr
    return e


@pytest.fixture
def store(tmp_path: Path) -> Path:
    db = tmp_path / "c.db"
    rows = make_images(tmp_path / "imgs", 20, broken=2)
    ann = make_coco(tmp_path / "coco.json", rows)
    ds = fastindex.Dataset.create("pets", db=db)
    finish(
        ds,
        ds.add_samples_from_coco(annotations_json=ann, images_path=tmp_path / "imgs", embed=False),
    )
    ds.add_images_from_path(tmp_path / "imgs", embed=False).wait(60)
    ds.wait(60)
    fastindex.Dataset.create("empty", db=db)
    return db


def test_list_and_info(store: Path, tmp_path: Path) -> None:
    out = js(run_cli("list", "--db", str(store), "--json", cwd=tmp_path))
    by_name = {d["name"]: d for d in out["datasets"]}
    assert set(by_name) == {"pets", "empty"}
    assert by_name["pets"]["total"] == 22 and by_name["pets"]["failed"] == 2
    info = js(run_cli("info", "pets", "--db", str(store), "--json", cwd=tmp_path))
    assert info["progress"]["total"] == 22 and info["progress"]["status"] == "complete"
    assert set(info["formats"]) == {"JPEG", "PNG"} and set(info["categories"]) == {"cat", "dog"}
    assert info["roots"] == [str(tmp_path / "imgs")]
    human = run_cli("info", "pets", "--db", str(store), cwd=tmp_path)
    assert human.returncode == 0 and "pets" in human.stdout and "JPEG" in human.stdout


def test_list_of_a_missing_store_is_empty(tmp_path: Path) -> None:
    assert (
        js(run_cli("list", "--db", str(tmp_path / "none.db"), "--json", cwd=tmp_path))["datasets"]
        == []
    )


def test_samples_filters_and_paging(store: Path, tmp_path: Path) -> None:
    ds = fastindex.Dataset.load("pets", db=store, resume=False)
    failed = js(
        run_cli("samples", "pets", "--status", "failed", "--db", str(store), "--json", cwd=tmp_path)
    )
    assert [s["id"] for s in failed["items"]] == [s.id for s in ds.samples(status="failed")]
    assert all(s["error"] for s in failed["items"]) and len(failed["items"]) == 2
    args = ["--format", "JPEG", "--category", "dog", "--min-width", "60", "--path-glob", "part*"]
    want = [
        s.id for s in ds.samples(format="JPEG", category="dog", min_width=60, path_glob="part*")
    ]
    assert want
    got: list[int] = []
    after = "0"
    while True:
        page = js(
            run_cli(
                "samples",
                "pets",
                *args,
                "--limit",
                "2",
                "--after-id",
                after,
                "--db",
                str(store),
                "--json",
                cwd=tmp_path,
            )
        )
        got += [s["id"] for s in page["items"]]
        if page["next_after_id"] is None:
            break
        after = str(page["next_after_id"])
    assert got == want
    no = js(
        run_cli(
            "samples", "pets", "--has-annotations", "no", "--db", str(store), "--json", cwd=tmp_path
        )
    )
    assert [s["id"] for s in no["items"]] == [s.id for s in ds.samples(has_annotations=False)]


def test_exit_codes(store: Path, tmp_path: Path) -> None:
    e = err(run_cli("info", "nope", "--db", str(store), "--json", cwd=tmp_path), 1)
    assert e["error"] == "DatasetNotFoundError"
    err(run_cli("samples", "nope", "--db", str(store), "--json", cwd=tmp_path), 1)
    err(run_cli("rm", "nope", "--db", str(store), "--json", cwd=tmp_path), 1)
    err(run_cli("samples", "pets", "--limit", "-1", "--db", str(store), "--json", cwd=tmp_path), 2)
    err(
        run_cli(
            "export",
            "pets",
            str(tmp_path / "x"),
            "--format",
            "npy",
            "--db",
            str(store),
            "--json",
            cwd=tmp_path,
        ),
        2,
    )
    # argparse's own errors: 2, on stderr
    r = run_cli("samples", "pets", "--status", "gone", "--db", str(store), cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "" and "invalid choice" in r.stderr
    r = run_cli("samples", "pets", "--min-width", "wide", "--db", str(store), cwd=tmp_path)
    assert r.returncode == 2
    # search with no embeddings: failed, 1
    e = err(run_cli("search", "pets", "a dog", "--db", str(store), "--json", cwd=tmp_path), 1)
    assert "no embeddings" in e["message"]
    r = run_cli("info", "nope", "--db", str(store), cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("fastindex: ")


def test_export_commands_read_back(store: Path, tmp_path: Path) -> None:
    ds = fastindex.Dataset.load("pets", db=store, resume=False)
    out = js(
        run_cli(
            "export",
            "pets",
            str(tmp_path / "a.json"),
            "--format",
            "coco",
            "--db",
            str(store),
            "--json",
            cwd=tmp_path,
        )
    )
    assert out["format"] == "coco"
    doc = json.loads((tmp_path / "a.json").read_text())
    assert len(doc["images"]) == 22 and len(doc["annotations"]) == len(ds.annotations())
    js(
        run_cli(
            "export",
            "pets",
            str(tmp_path / "f.csv"),
            "--format",
            "csv",
            "--status",
            "failed",
            "--db",
            str(store),
            "--json",
            cwd=tmp_path,
        )
    )
    with open(tmp_path / "f.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"failed"}
    pq = pytest.importorskip("pyarrow.parquet")
    js(
        run_cli(
            "export",
            "pets",
            str(tmp_path / "a.parquet"),
            "--format",
            "parquet",
            "--db",
            str(store),
            "--json",
            cwd=tmp_path,
        )
    )
    assert pq.read_table(tmp_path / "a.parquet").num_rows == 22


def test_rm_deletes_the_dataset_only(store: Path, tmp_path: Path) -> None:
    out = js(run_cli("rm", "empty", "--db", str(store), "--json", cwd=tmp_path))
    assert out["deleted"] == "empty"
    names = {
        d["name"]
        for d in js(run_cli("list", "--db", str(store), "--json", cwd=tmp_path))["datasets"]
    }
    assert names == {"pets"}
    assert (tmp_path / "imgs").is_dir()


def test_search_and_embeddings_export(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    np = pytest.importorskip("numpy")
    from fastindex.testing import tiny_model

    db = tmp_path / "e.db"
    make_images(tmp_path / "imgs", 8)
    ds = fastindex.Dataset.create("emb", db=db)
    finish(ds, ds.add_images_from_path(tmp_path / "imgs", embed=tiny_model()))
    pre = "from fastindex.testing import register_tiny_model; register_tiny_model()"
    out = js(
        run_cli(
            "search",
            "emb",
            "a red square",
            "-k",
            "3",
            "--db",
            str(db),
            "--json",
            cwd=tmp_path,
            pre=pre,
        )
    )
    assert len(out["items"]) == 3
    assert [s["id"] for s in out["items"]] == [s.id for s, _ in ds.search("a red square", k=3)]
    js(
        run_cli(
            "export",
            "emb",
            str(tmp_path / "v.npy"),
            "--embeddings",
            "--format",
            "npy",
            "--db",
            str(db),
            "--json",
            cwd=tmp_path,
        )
    )
    ids, vectors = ds.embeddings()
    assert (np.load(tmp_path / "v.ids.npy") == ids).all()
    assert (np.load(tmp_path / "v.npy") == vectors).all()

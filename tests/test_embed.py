"""Phase 3 with the real open_clip and torch on the CPU: a tiny registered architecture with
seeded random weights (`fastindex.testing`), so each test takes a second or two."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import asdict
from pathlib import Path

import fastindex
import numpy as np
import pytest
import torch
from embed_helpers import gpu_test, make_folder, vectors_by_path, wait_until
from fastindex import _core, embed, testing
from fastindex.cli import main as cli_main
from fastindex.embed import EmbeddingModel, embed_pending
from fastindex.errors import (
    CancelledError,
    EmbeddingError,
    InvalidArgumentError,
    NoEmbeddingsError,
    PathNotFoundError,
)
from fastindex.search import index_for
from PIL import Image, ImageOps


@pytest.fixture(scope="module")
def tiny() -> EmbeddingModel:
    return testing.tiny_model(batch_size=8).load()


def _embedded(db: Path, folder: Path, name: str = "t", **kw: object) -> fastindex.Dataset:
    ds = fastindex.Dataset.create(name, db=db)
    job = ds.add_images_from_path(folder, embed=testing.tiny_model(batch_size=8, **kw))
    assert job.wait(60), job.progress()
    return ds


# -- the model object ------------------------------------------------------------------------
def test_arguments_are_checked_before_any_weights_load(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        EmbeddingModel(batch_size=0)
    with pytest.raises(InvalidArgumentError, match=r"unknown open_clip model 'vit-b-32'.*ViT-B-32"):
        EmbeddingModel("vit-b-32")
    with pytest.raises(InvalidArgumentError, match="device"):
        EmbeddingModel(device="gpu-please")
    with pytest.raises(InvalidArgumentError, match="precision"):
        EmbeddingModel(precision="fp8")
    with pytest.raises(PathNotFoundError):
        EmbeddingModel(checkpoint=tmp_path / "missing.pt")
    (tmp_path / "w.pt").write_bytes(b"x")
    with pytest.raises(InvalidArgumentError, match="not both"):
        EmbeddingModel(pretrained="openai", checkpoint=tmp_path / "w.pt")
    with pytest.raises(InvalidArgumentError, match="no pretrained weights"):
        EmbeddingModel(testing.register_tiny_model())

    m = EmbeddingModel()
    assert (m.key_name, m.key_pretrained, m.dim, m.loaded) == (
        "ViT-B-32",
        "laion2b_s34b_b79k",
        512,
        False,
    )
    assert EmbeddingModel("ViT-L-14").dim == 768
    assert EmbeddingModel("ViT-L-14").pretrained == "openai"  # its first listed tag
    ck = EmbeddingModel("ViT-B-32", checkpoint=tmp_path / "w.pt")
    assert ck.key_pretrained == f"file:{tmp_path / 'w.pt'}"
    assert testing.tiny_model().key_pretrained == "random:0"
    assert EmbeddingModel(testing.TINY_MODEL, "random").pretrained is None


def test_spec_round_trips_and_carries_custom_architectures(tmp_path: Path) -> None:
    (tmp_path / "w.pt").write_bytes(b"x")
    for m in (
        EmbeddingModel(),
        EmbeddingModel("ViT-B-16", "openai", device="cpu", batch_size=3, workers=2),
        EmbeddingModel("ViT-B-32", checkpoint=tmp_path / "w.pt", precision="fp32"),
        testing.tiny_model(),
    ):
        spec = json.loads(json.dumps(m.spec()))
        again = EmbeddingModel.from_spec(spec)
        assert again.spec() == m.spec()
        assert (again.key_name, again.key_pretrained, again.dim) == (
            m.key_name,
            m.key_pretrained,
            m.dim,
        )
    assert "model_cfg" in testing.tiny_model().spec()
    assert "model_cfg" not in EmbeddingModel().spec()
    # A spec keeps working when its checkpoint is gone: load() says so, not from_spec.
    spec = EmbeddingModel("ViT-B-32", checkpoint=tmp_path / "w.pt").spec()
    os.remove(tmp_path / "w.pt")
    with pytest.raises(EmbeddingError, match="does not exist"):
        EmbeddingModel.from_spec(spec).load()


def test_text_embeddings_are_normalised_and_deterministic(tiny: EmbeddingModel) -> None:
    t = tiny.encode_text(["a dog on a beach", "a cat", "a dog on a beach"])
    assert t.dtype == np.float32 and t.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(t[0], t[2])
    assert not np.allclose(t[0], t[1])
    # Another instance (another "process") makes the same random weights: the same batch gives
    # the same bits. (A batch of another size may round differently in the last bit: torch
    # picks its matmul kernels by shape.)
    other = testing.tiny_model()
    np.testing.assert_array_equal(
        other.encode_text(["a dog on a beach", "a cat", "a dog on a beach"]), t
    )
    np.testing.assert_allclose(other.encode_text(["a cat"])[0], t[1], rtol=0, atol=1e-6)


# -- preprocessing ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "mode"),
    [
        (224, "shortest"),
        (64, "shortest"),
        (224, "longest"),
        (224, "squash"),
        ((224, 160), "shortest"),
    ],
)
def test_decoding_matches_open_clips_transform(size: object, mode: str) -> None:
    """Geometry, colour and orientation as open_clip's own transform gives them (on the
    EXIF-transposed image), to resampling noise."""
    from open_clip.transform import PreprocessCfg, image_transform_v2  # type: ignore[import-untyped]

    cfg = PreprocessCfg(size=size, resize_mode=mode)  # type: ignore[arg-type]
    reference = image_transform_v2(cfg, is_train=False)
    pre = embed._Preprocess.from_cfg(asdict(cfg))
    cases = [
        ((640, 480), "JPEG", None, "RGB"),
        ((480, 640), "JPEG", 6, "RGB"),  # rotated: a missed rotation differs by far more
        ((1920, 1080), "JPEG", None, "RGB"),
        ((1023, 511), "JPEG", 5, "RGB"),
        ((300, 200), "PNG", None, "RGBA"),
        ((100, 60), "JPEG", None, "L"),
        ((64, 48), "JPEG", 3, "RGB"),
    ]
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    for wh, fmt, orientation, m in cases:
        data = testing.image_bytes(wh, seed=sum(wh), fmt=fmt, mode=m, orientation=orientation)
        out = np.zeros((*pre.size, 3), np.uint8)
        embed._decode_into(bytearray(data), embed._orientation_of(data), pre, out)
        mine = (torch.from_numpy(out).permute(2, 0, 1).float() / 255 - mean) / std
        ref = reference(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
        assert mine.shape == ref.shape
        # Normalised units: 0.06 is about 4 grey levels, the cost of DCT-domain scaling.
        assert float((mine - ref).abs().mean()) < 0.06, (wh, fmt, orientation, m)


def test_batched_torch_decoder_agrees_with_the_cpu_decoder() -> None:
    """The GPU decoder's code (torchvision decode, orientation, resize batched per size),
    run on the CPU: same pixels as libjpeg-turbo's path to a few grey levels."""
    from open_clip.transform import PreprocessCfg

    pre = embed._Preprocess.from_cfg(asdict(PreprocessCfg(size=64)))
    dec = embed._TorchJpegDecoder(torch.device("cpu"), pre)
    specs = [
        ((640, 480), None),
        ((480, 640), 6),
        ((640, 480), None),
        ((1023, 511), 5),
        ((64, 48), 3),
    ]
    items = []
    for wh, o in specs:
        d = testing.image_bytes(wh, seed=sum(wh), orientation=o)
        items.append((bytearray(d), embed._orientation_of(d)))
    items.append((bytearray(b"\xff\xd8\xff" + bytes(100)), 1))
    out, errs = dec.decode(items)
    for (d, o), t, err in zip(items[:-1], out[:-1], errs[:-1], strict=True):
        assert t is not None and err is None
        ref = np.zeros((64, 64, 3), np.uint8)
        embed._decode_into(d, o, pre, ref)
        assert np.abs(t.numpy().astype(int) - ref.astype(int)).mean() < 5
    assert out[-1] is None and errs[-1] is not None


# -- the pipeline ----------------------------------------------------------------------------
def test_statuses_go_indexed_embedding_ready_and_a_stop_resumes(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 40)
    store = _core.Store(str(tmp_path / "s.db"))
    did = store.create_dataset("d")
    store.scan(did, str(tmp_path / "imgs"))
    store.probe_pending(did)
    assert store.progress(did)["indexed"] == 40
    model = testing.tiny_model(batch_size=4)
    stop = _core.StopFlag()
    seen: list[dict[str, object]] = []

    def on_batch() -> None:
        # Later batches are claimed (`embedding`) while this one is committed.
        wait_until(lambda: store.progress(did)["embedding"] > 0, 5)
        seen.append(store.progress(did))
        stop.set()

    with pytest.raises(CancelledError):
        embed_pending(store, did, model, stop=stop, producer_alive=lambda: False, on_batch=on_batch)
    p = store.progress(did)
    assert seen[0]["embedding"] > 0 and seen[0]["ready"] == 4  # type: ignore[operator]
    # Batches already through the model may still be written; the rest stay claimed.
    assert p["ready"] >= 4 and p["ready"] + p["embedding"] + p["indexed"] == 40
    done_before = p["ready"]
    store.release_claims(did)  # what jobs.py does after a cancel or a crash
    n = embed_pending(
        store,
        did,
        model,
        stop=_core.StopFlag(),
        producer_alive=lambda: False,
        on_batch=lambda: None,
    )
    p = store.progress(did)
    assert (p["ready"], p["embedding"], p["indexed"], n) == (40, 0, 0, 40 - done_before)


def test_embedding_starts_while_phase_2_runs(tmp_path: Path) -> None:
    make_folder(tmp_path / "a", 10)
    store = _core.Store(str(tmp_path / "s.db"))
    did = store.create_dataset("d")
    store.scan(did, str(tmp_path / "a"))
    alive = threading.Event()
    alive.set()
    stats: dict[str, int] = {}
    result: list[int] = []
    t = threading.Thread(
        target=lambda: result.append(
            embed_pending(
                _core.Store(store.path),
                did,
                testing.tiny_model(batch_size=4),
                stop=_core.StopFlag(),
                producer_alive=alive.is_set,
                on_batch=lambda: None,
                stats=stats,
            )
        )
    )
    t.start()
    try:
        # Nothing is indexed yet: the embedder waits for phase 2 instead of returning.
        time.sleep(0.3)
        assert t.is_alive() and store.progress(did)["pending"] == 10
        store.probe_pending(did)  # phase 2 indexes the first folder...
        assert wait_until(lambda: store.progress(did)["ready"] == 10)
        make_folder(tmp_path / "b", 6, seed=100)  # ...and a second one, while it "runs"
        store.scan(did, str(tmp_path / "b"))
        store.probe_pending(did)
        assert wait_until(lambda: store.progress(did)["ready"] == 16)
        assert t.is_alive()
    finally:
        alive.clear()  # phase 2 ends: the embedder drains and returns
        t.join(30)
    assert not t.is_alive() and result == [16] and stats["embedded"] == 16


def test_dataset_embeddings_are_normalised_deterministic_and_duplicates_agree(
    tmp_path: Path,
) -> None:
    files = make_folder(tmp_path / "imgs", 12)
    dup = tmp_path / "imgs" / "copy" / "same_as_1.jpg"
    testing.write_image(dup, files[1].read_bytes())
    ds = _embedded(tmp_path / "a.db", tmp_path / "imgs")
    p = ds.get_loading_progress()
    assert (p["ready"], p["failed"], p["status"]) == (13, 0, "complete")
    ids, v = ds.embeddings()
    assert ids.dtype == np.int64 and v.dtype == np.float32 and v.shape == (13, 64)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    vec = vectors_by_path(ds)
    rel1 = str(files[1].relative_to(tmp_path / "imgs"))
    np.testing.assert_array_equal(vec[rel1], vec["copy/same_as_1.jpg"])
    # The same model and files in another store: the same vectors, bit for bit.
    again = vectors_by_path(_embedded(tmp_path / "b.db", tmp_path / "imgs"))
    for k in vec:
        np.testing.assert_array_equal(vec[k], again[k])
    # And what the public encoder gives for the file, to float16 storage precision.
    direct = testing.tiny_model().encode_images([files[1]])[0]
    np.testing.assert_allclose(direct, vec[rel1], atol=2e-3)


def test_similar_ranks_the_image_and_its_copy_first_and_text_goes_through_the_text_tower(
    tmp_path: Path, tiny: EmbeddingModel
) -> None:
    files = make_folder(tmp_path / "imgs", 10)
    testing.write_image(tmp_path / "imgs" / "zz_copy.jpg", files[3].read_bytes())
    ds = _embedded(tmp_path / "a.db", tmp_path / "imgs")
    by_path = {s.path: s for s in ds.samples()}
    a = by_path[str(files[3].relative_to(tmp_path / "imgs"))]
    hits = ds.similar(a.id, k=3)
    assert [s.id for s, _ in hits[:2]] == [a.id, by_path["zz_copy.jpg"].id]
    assert hits[0][1] == pytest.approx(1, abs=2e-3) and hits[1][1] == pytest.approx(hits[0][1])
    assert hits[1][1] >= hits[2][1]
    # Text -> image: the scores are the text tower's vector against every image's.
    ids, v = ds.embeddings()
    q = tiny.encode_text(["a red square"])[0]
    scores = dict(zip(ids.tolist(), (v @ q).tolist(), strict=True))
    found = ds.search("a red square", k=4)
    assert len(found) == 4
    for s, score in found:  # float16 storage: scores to 2e-3, so near ties may swap
        assert score == pytest.approx(scores[s.id], abs=2e-3)
    assert [x for _, x in found] == sorted((x for _, x in found), reverse=True)
    assert min(x for _, x in found) >= sorted(scores.values())[-4] - 2e-3
    assert index_for(ds).backend in ("faiss", "numpy")


@pytest.mark.parametrize("backend", ["numpy", "faiss"])
def test_search_backends_agree(
    tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastindex import search

    if backend == "faiss":
        pytest.importorskip("faiss")
    monkeypatch.setattr(search, "BACKEND", backend)
    search.clear_cache()
    make_folder(tmp_path / "imgs", 9)
    ds = _embedded(tmp_path / "a.db", tmp_path / "imgs")
    index = index_for(ds)
    assert index.backend == backend
    ids, v = index.snapshot()
    q = v[4]
    hits = index.search_vector(q, k=100)  # k above n: all of them
    assert len(hits) == 9 and hits[0][0] == ids[4]
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    np.testing.assert_allclose(
        sorted((s for _, s in hits), reverse=True), np.sort(v @ q)[::-1], atol=2e-3
    )
    search.clear_cache()


def test_search_says_when_there_are_no_embeddings(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 3)
    ds = fastindex.Dataset.create("plain", db=tmp_path / "a.db")
    assert ds.add_images_from_path(tmp_path / "imgs", embed=False).wait(30)
    with pytest.raises(NoEmbeddingsError, match="no embedding model"):
        ds.search("a dog")
    with pytest.raises(NoEmbeddingsError, match="no embeddings"):
        ds.similar(1, model=testing.tiny_model())
    with pytest.raises(InvalidArgumentError, match="k must be"):
        _embedded(tmp_path / "b.db", tmp_path / "imgs").search("a dog", k=0)


def test_a_file_that_does_not_decode_fails_with_its_reason_and_the_batch_goes_on(
    tmp_path: Path,
) -> None:
    make_folder(tmp_path / "imgs", 6)
    good = testing.image_bytes((200, 150), seed=9)
    # Valid headers (phase 2 indexes them), garbage where the pixels should be.
    (tmp_path / "imgs" / "garbage.jpg").write_bytes(good[: len(good) // 3] + os.urandom(4000))
    png = testing.image_bytes((50, 40), fmt="PNG")
    (tmp_path / "imgs" / "garbage.png").write_bytes(png[:33] + os.urandom(300))
    ds = _embedded(tmp_path / "a.db", tmp_path / "imgs")
    p = ds.get_loading_progress()
    assert (p["ready"], p["failed"], p["error"]) == (6, 2, None)
    failed = {s.file_name: s.error for s in ds.samples(status="failed")}
    assert set(failed) == {"garbage.jpg", "garbage.png"}
    for reason in failed.values():
        assert reason is not None and reason.startswith("cannot decode image: ")
        assert "\n" not in reason


@pytest.mark.parametrize("case", ["unknown tag", "corrupt checkpoint", "offline"])
def test_weights_that_cannot_load_stop_phase_3_with_a_clear_error(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_folder(tmp_path / "imgs", 5)
    if case == "unknown tag":
        model, expect = EmbeddingModel("ViT-B-32", "no-such-tag"), "no pretrained tag 'no-such-tag'"
    elif case == "corrupt checkpoint":
        bad = tmp_path / "weights.pt"
        bad.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
        model, expect = EmbeddingModel(testing.register_tiny_model(), checkpoint=bad), str(bad)
    else:
        from huggingface_hub import try_to_load_from_cache

        repo = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
        if isinstance(try_to_load_from_cache(repo, "open_clip_model.safetensors"), str):
            pytest.skip("the default weights are in this machine's cache")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        model, expect = EmbeddingModel(), "HF_HUB_OFFLINE"
    ds = fastindex.Dataset.create("d", db=tmp_path / "a.db")
    t0 = time.monotonic()
    job = ds.add_images_from_path(tmp_path / "imgs", embed=model)
    # wait() returns, promptly, False: phase 3 stopped with rows left
    assert job.wait(60) is False
    assert time.monotonic() - t0 < 30
    p = job.progress()
    assert p["status"] == "complete"  # no phase that can still run is owed anything
    assert expect in p["errors"]["embed"] and expect in (job.error or "")
    assert "model" in p["errors"]["embed"]
    assert (p["indexed"], p["embedding"], p["ready"]) == (5, 0, 0)  # nothing else is lost


def test_a_checkpoint_file_loads(tmp_path: Path, tiny: EmbeddingModel) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny._model.state_dict(), path)
    m = EmbeddingModel(testing.TINY_MODEL, checkpoint=path, device="cpu")
    np.testing.assert_array_equal(m.encode_text(["x"]), tiny.encode_text(["x"]))


_CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    import fastindex
    from fastindex import _core, testing
    from fastindex.embed import embed_pending
    db, folder = sys.argv[1], sys.argv[2]
    ds = fastindex.Dataset.create("crash", db=db)
    assert ds.add_images_from_path(folder, embed=False).wait(60)
    model = testing.tiny_model(batch_size=4)
    ds.set_embedding_model(model)
    batches = []
    def on_batch():
        batches.append(1)
        if len(batches) == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash in the middle of phase 3
    embed_pending(_core.Store(db), ds.id, model, stop=_core.StopFlag(),
                  producer_alive=lambda: False, on_batch=on_batch)
    """
)


def test_a_crash_in_the_middle_resumes_to_the_same_vectors(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 30)
    db = tmp_path / "crash.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", _CRASHER, str(db), str(tmp_path / "imgs")],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    before = _core.Store(str(db)).progress(1)
    assert 8 <= before["ready"] < 30 and before["embedding"] > 0
    # A new process: the stored spec carries the architecture, so no registration is needed.
    ds = fastindex.Dataset.load("crash", db=db)
    assert ds.wait(60), ds.get_loading_progress()
    p = ds.get_loading_progress()
    assert (p["ready"], p["embedding"], p["indexed"]) == (30, 0, 0)
    clean = vectors_by_path(_embedded(tmp_path / "clean.db", tmp_path / "imgs"))
    resumed = vectors_by_path(ds)
    assert set(clean) == set(resumed)
    for k in clean:
        np.testing.assert_array_equal(clean[k], resumed[k])


def test_command_line_model_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_folder(tmp_path / "imgs", 6)
    name = testing.register_tiny_model()
    db = tmp_path / "cli.db"
    args = ["index", str(tmp_path / "imgs"), "--db", str(db), "--quiet", "--name", "a"]
    rc = cli_main([*args, "--model", name, "--pretrained", "random", "--device", "cpu",
                   "--batch-size", "4"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    ds = fastindex.Dataset.load("a", db=db)
    assert ds.get_loading_progress()["ready"] == 6
    model = ds.embedding_model()
    assert model is not None and (model.name, model.pretrained, model.batch_size) == (name, None, 4)
    assert cli_main(["index", str(tmp_path / "imgs"), "--db", str(db), "--quiet", "--name", "b",
                     "--no-embed"]) == 0  # fmt: skip
    assert fastindex.Dataset.load("b", db=db).embedding_model() is None
    assert cli_main([*args[:-1], "c", "--model", "no-such-model"]) == 2
    assert "unknown open_clip model" in capsys.readouterr().err


# -- on a GPU --------------------------------------------------------------------------------
@gpu_test
def test_gpu_end_to_end_matches_the_cpu(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", 40)
    cpu = vectors_by_path(_embedded(tmp_path / "cpu.db", tmp_path / "imgs"))
    stats: dict[str, int] = {}
    store = _core.Store(str(tmp_path / "gpu.db"))
    did = store.create_dataset("g")
    store.scan(did, str(tmp_path / "imgs"))
    store.probe_pending(did)
    model = testing.tiny_model(batch_size=16, device="cuda")
    n = embed_pending(
        store, did, model, stop=_core.StopFlag(), producer_alive=lambda: False,
        on_batch=lambda: None, stats=stats,
    )  # fmt: skip
    assert n == 40 and stats["decoded_gpu"] > 0
    ds = fastindex.Dataset.load("g", db=tmp_path / "gpu.db", resume=False)
    gpu_vecs = vectors_by_path(ds, model)
    for k, v in cpu.items():
        assert float(v @ gpu_vecs[k]) > 0.99, k


@gpu_test
def test_gpu_decoder_agrees_with_the_cpu_decoder() -> None:
    from open_clip.transform import PreprocessCfg

    pre = embed._Preprocess.from_cfg(asdict(PreprocessCfg(size=224)))
    dec = embed._TorchJpegDecoder(torch.device("cuda"), pre)
    items = []
    for wh, o in [((640, 480), None), ((480, 640), 6), ((1920, 1080), 8), ((64, 48), 3)]:
        d = testing.image_bytes(wh, seed=sum(wh), orientation=o)
        items.append((bytearray(d), embed._orientation_of(d)))
    out, _ = dec.decode(items)
    for (d, o), t in zip(items, out, strict=True):
        assert t is not None
        ref = np.zeros((224, 224, 3), np.uint8)
        embed._decode_into(d, o, pre, ref)
        assert np.abs(t.cpu().numpy().astype(int) - ref.astype(int)).mean() < 5


def test_the_gpu_decoder_thread_shares_the_work_run_on_the_cpu(tmp_path: Path) -> None:
    """The GPU path's scheduling (a torchvision decoder thread and the CPU threads taking
    from one queue, results merged per batch), run with the decoder on the CPU."""
    make_folder(tmp_path / "imgs", 24)
    (tmp_path / "imgs" / "garbage.jpg").write_bytes(
        testing.image_bytes((200, 150))[:400] + bytes(900)
    )
    cpu = vectors_by_path(_embedded(tmp_path / "cpu.db", tmp_path / "imgs"))
    store = _core.Store(str(tmp_path / "g.db"))
    did = store.create_dataset("g")
    store.scan(did, str(tmp_path / "imgs"))
    store.probe_pending(did)
    stats: dict[str, int] = {}
    n = embed_pending(
        store, did, testing.tiny_model(batch_size=8), stop=_core.StopFlag(),
        producer_alive=lambda: False, on_batch=lambda: None, gpu_decode=True, stats=stats,
    )  # fmt: skip
    assert n == 24 and stats["decoded_gpu"] > 0 and stats["failed"] == 1
    ds = fastindex.Dataset.load("g", db=tmp_path / "g.db", resume=False)
    both = vectors_by_path(ds, testing.tiny_model())
    assert set(both) == set(cpu)
    for k, v in cpu.items():
        assert float(v @ both[k]) > 0.98, k

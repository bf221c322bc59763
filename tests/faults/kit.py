"""Helpers for the fault-injection suite: realistic trees made quickly, a COCO file with a
polygon on every box, child processes (a pre-forking "zygote" for the many short runs, the
real CLI for the rest), and a whole store dumped as comparable data.

The store is always read with Python's sqlite3 in a child process of its own (`dump_store`):
two SQLite libraries in one process undo each other's locks (see the README).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastindex.testing import TINY_MODEL, image_bytes

NAME = "faults"  # the dataset name every run in this suite uses

# -- trees ------------------------------------------------------------------------------------
_FORMATS = (("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif"), ("BMP", "bmp"), ("WEBP", "webp"),
            ("TIFF", "tif"))  # fmt: skip


def _blobs(n: int, seed: int) -> list[tuple[str, bytes, tuple[int, int]]]:
    """`n` distinct small images: every format, several sizes, JPEGs with EXIF orientations."""
    out = []
    for i in range(n):
        fmt, ext = _FORMATS[i % len(_FORMATS)]
        size = (17 + (i * 7) % 61, 11 + (i * 5) % 43)
        kw: dict[str, Any] = {}
        if fmt == "JPEG":
            kw["orientation"] = (None, 6, 3, 8, 1)[(i // len(_FORMATS)) % 5]
        mode = "RGBA" if fmt == "PNG" and i % 4 == 1 else "RGB"
        out.append((ext, image_bytes(size, seed=seed + i, fmt=fmt, mode=mode, **kw), size))
    return out


def _corrupt(i: int, blobs: list[tuple[str, bytes, tuple[int, int]]]) -> tuple[str, bytes]:
    """Files with an image's name that are not readable images (each gets a `failed` row)."""
    kinds = [
        ("jpg", blobs[0][1][:40]),  # truncated inside the header
        ("png", b"this is not a png at all\n" * 3),
        ("gif", b""),
        ("webp", b"RIFF\x00\x00\x00\x00WEBPVP8 "),
    ]
    return kinds[i % len(kinds)]


@dataclass
class Tree:
    root: Path
    files: list[str]  # relative paths, in creation order
    sizes: dict[str, tuple[int, int]]  # real (width, height) of the readable ones
    corrupt: list[str]


def make_tree(root: Path, n: int, *, seed: int = 0, distinct: int = 48, per_dir: int = 250) -> Tree:
    """`n` small images under `root` in folders of `per_dir`, made from `distinct` encodings of
    six formats (so thousands of files take a second), plus one corrupt file in ~500."""
    blobs = _blobs(distinct, seed)
    rng = random.Random(seed)
    files: list[str] = []
    sizes: dict[str, tuple[int, int]] = {}
    corrupt: list[str] = []
    for i in range(n):
        folder = f"d{i // per_dir:03d}"
        if i % per_dir == 0:
            (root / folder).mkdir(parents=True, exist_ok=True)
        if i % 487 == 13:
            ext, data = _corrupt(i, blobs)
            rel = f"{folder}/bad{i:06d}.{ext}"
            corrupt.append(rel)
        else:
            ext, data, size = blobs[rng.randrange(len(blobs))]
            rel = f"{folder}/f{i:06d}.{ext}"
            sizes[rel] = size
        (root / rel).write_bytes(data)
        files.append(rel)
    # a few files the walk must skip: hidden, and not an image by extension
    (root / "d000" / ".hidden.jpg").write_bytes(blobs[0][1])
    (root / "d000" / "notes.txt").write_text("not an image\n")
    return Tree(root, files, sizes, corrupt)


def make_coco(path: Path, tree: Tree, *, every: int = 2, missing: int = 10, seed: int = 0) -> int:
    """A COCO detection file for every `every`-th file of `tree` (corrupt ones included), with
    1-3 boxes per image, each with a polygon, and `missing` images that are not on disk.
    A few images declare a size that is not the real one. Returns the number of boxes."""
    rng = random.Random(seed)
    cats = [
        {"id": 1, "name": "person", "supercategory": "human"},
        {"id": 2, "name": "dog", "supercategory": "animal"},
        {"id": 3, "name": "cat", "supercategory": "animal"},
        {"id": 7, "name": "car", "supercategory": "vehicle"},
        {"id": 9, "name": "tree", "supercategory": None},
    ]
    listed = tree.files[::every] + [f"gone/missing{i:03d}.jpg" for i in range(missing)]
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for k, rel in enumerate(listed):
        w, h = tree.sizes.get(rel, (32, 24))
        if k % 97 == 5:
            w, h = w + 1, h  # a declared size that is wrong: size_mismatch
        image_id = 100_000 + k * 3
        images.append({"id": image_id, "file_name": rel, "width": w, "height": h})
        for _ in range(1 + rng.randrange(3)):
            x, y = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
            bw, bh = rng.uniform(1, w / 2), rng.uniform(1, h / 2)
            poly = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": rng.choice(cats)["id"],
                    "bbox": [round(v, 2) for v in (x, y, bw, bh)],
                    "area": round(bw * bh, 3),
                    "iscrowd": 0,
                    "segmentation": [[round(v, 2) for v in poly]],
                }
            )
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return len(anns)


# -- child processes --------------------------------------------------------------------------
def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: this process's, with its `sys.path` as PYTHONPATH (so a
    child imports the fastindex under test and the test helpers)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.update(extra)
    return env


_PRELUDE = """
import json, os, signal, sys, time
import fastindex
from fastindex import testing
def mark(what):
    print(f"@{what} {time.monotonic():.6f}", flush=True)
def die():
    sys.stdout.flush(); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""

# The zygote imports the heavy modules once (torch takes 5-8 s here) and forks a child per run.
# It never opens a store, starts a pool or runs torch, so its children start clean (fastindex
# rebuilds its pools per process; see test_fork.py). Protocol on stdin/stdout, one JSON object a
# line: {"script", "argv", "out", "env"} -> {"pid"}; later {"exit": pid, "code": returncode}.
_ZYGOTE = r"""
import atexit, json, os, select, signal, sys, traceback
for mod in sys.argv[1:]:
    try:
        __import__(mod)
    except ImportError:  # no torch here: the runs that embed fail and say so
        pass
try:
    from fastindex import testing
    testing.register_tiny_model()
except ImportError:
    pass
alive = set()
def reap():
    while alive:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        alive.discard(pid)
        print(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}), flush=True)
print(json.dumps({"ready": os.getpid()}), flush=True)
stdin = sys.stdin.buffer
buf = b""
while True:
    reap()
    r, _, _ = select.select([stdin], [], [], 0.01)
    if not r:
        continue
    chunk = os.read(stdin.fileno(), 1 << 16)
    if not chunk:
        break
    buf += chunk
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1); os.dup2(fd, 2)
                null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0)
                os.environ.update(req["env"])
                sys.argv = ["child", *req["argv"]]
                try:
                    exec(compile(req["script"], "<child>", "exec"), {"__name__": "__main__"})
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                    if not isinstance(e.code, int) and e.code is not None:
                        print(e.code, file=sys.stderr)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                atexit._run_exitfuncs()
            finally:
                sys.stdout.flush(); sys.stderr.flush()
                os._exit(code)
        alive.add(pid)
        print(json.dumps({"pid": pid}), flush=True)
for pid in list(alive):
    os.kill(pid, signal.SIGKILL)
while alive:
    pid, _ = os.waitpid(-1, 0)
    alive.discard(pid)
"""


@dataclass
class Child:
    """One run forked by the zygote: its pid, the file its stdout and stderr go to, and the
    monotonic time at which this process learnt its pid (`t0`, the origin of its timeline)."""

    zygote: Zygote
    pid: int
    out: Path
    t0: float
    code: int | None = None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.code is None and self.zygote.exit_code(self.pid) is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        """The exit code (negative: the signal); kills the child and fails on a hang."""
        code = self.zygote.wait_exit(self.pid, timeout)
        if code is None:
            self.kill()
            self.zygote.wait_exit(self.pid, 30)
            raise AssertionError(
                f"child {self.pid} still running after {timeout} s:\n{self.output()[-3000:]}"
            )
        self.code = code
        return code

    def output(self) -> str:
        try:
            return self.out.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def marks(self) -> dict[str, float]:
        """`mark("x")` calls of the child, as seconds since `t0`."""
        out: dict[str, float] = {}
        for m in re.finditer(r"^@(\S+) ([0-9.]+)$", self.output(), re.M):
            out.setdefault(m.group(1), float(m.group(2)) - self.t0)
        return out

    def json_lines(self) -> list[Any]:
        return [
            json.loads(line[5:]) for line in self.output().splitlines() if line.startswith("JSON ")
        ]


@dataclass
class Zygote:
    """A process that has imported fastindex, torch and open_clip, and forks children that run
    a script (`_PRELUDE` + the script) with `sys.argv[1:] = argv`."""

    proc: subprocess.Popen[bytes]
    outdir: Path
    _pids: queue.Queue[int] = field(default_factory=queue.Queue)
    _exits: dict[int, int] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _live: set[int] = field(default_factory=set)
    _n: int = 0

    _ready: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    @classmethod
    def start(cls, outdir: Path, modules: Sequence[str] = ("fastindex",)) -> Zygote:
        """Start the zygote; it imports `modules` while the caller goes on (`run` waits)."""
        proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE, *modules],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # One I/O thread: phase 2 of a few thousand files then lasts long enough to be hit
            # (the machines that run this have two cores anyway).
            env=child_env(FASTINDEX_IO_THREADS="1"),
        )
        z = cls(proc, outdir)
        z._reader = threading.Thread(target=z._read, daemon=True, name="zygote-reader")
        z._reader.start()
        return z

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            if "ready" in msg:
                self._ready.set()
            elif "pid" in msg:
                self._pids.put(msg["pid"])
            elif "exit" in msg:
                with self._cond:
                    self._exits[msg["exit"]] = msg["code"]
                    self._live.discard(msg["exit"])
                    self._cond.notify_all()

    def run(self, script: str, argv: Iterable[object] = (), **env: str) -> Child:
        self._n += 1
        out = self.outdir / f"child{self._n:04d}.out"
        req = {
            "script": _PRELUDE + textwrap.dedent(script),
            "argv": [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in argv],
            "out": str(out),
            "env": env,
        }
        assert self._ready.wait(120), "the zygote did not start"
        assert self.proc.stdin is not None and self.proc.poll() is None, "the zygote is gone"
        self.proc.stdin.write(json.dumps(req).encode() + b"\n")
        self.proc.stdin.flush()
        pid = self._pids.get(timeout=60)
        with self._cond:
            self._live.add(pid)
        return Child(self, pid, out, time.monotonic())

    def exit_code(self, pid: int) -> int | None:
        with self._cond:
            return self._exits.get(pid)

    def wait_exit(self, pid: int, timeout: float) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exits, timeout)
            return self._exits.get(pid)

    def close(self) -> None:
        with self._cond:
            live = list(self._live)
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# The CLI as `fastindex index` runs it. With `--model fastindex-tiny` the tiny test model is
# registered first (as a user's registered architecture would be); only then, since
# registering imports torch and open_clip (seconds) where the CLI itself would not.
CLI = (
    "import sys\n"
    f"if {TINY_MODEL!r} in sys.argv:\n"
    "    from fastindex import testing\n"
    "    testing.register_tiny_model()\n"
    "from fastindex.cli import main\n"
    "sys.exit(main())\n"
)
TINY_ARGS = ["--model", TINY_MODEL, "--pretrained", "random", "--device", "cpu",
             "--batch-size", "8"]  # fmt: skip


def cli(*args: object, **env: str) -> subprocess.Popen[str]:
    """Start `fastindex ARGS` (the real CLI, in a new process); stdout and stderr piped."""
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            CLI,
            *[os.fspath(a) if isinstance(a, Path) else str(a) for a in args],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Wide enough that rich never wraps a path or the summary line; one I/O thread, as in
        # the zygote's runs, so that phase 2 has a middle to interrupt.
        env=child_env(COLUMNS="1000", FASTINDEX_IO_THREADS="1", **env),
    )


def finish_cli(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    """Wait for a CLI run; a hang is killed and fails the test with what it printed."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"`fastindex` still running after {timeout} s:\n{err[-3000:]}"
        ) from None
    return proc.returncode, out, err


SUMMARY = re.compile(r"indexed ([\d,]+), ready ([\d,]+), failed ([\d,]+)")


def summary_counts(text: str) -> tuple[int, int, int]:
    """`(indexed, ready, failed)` from the CLI's summary line."""
    m = SUMMARY.search(text)
    assert m is not None, f"no summary line in:\n{text[-2000:]}"
    indexed, ready, failed = (int(g.replace(",", "")) for g in m.groups())
    return indexed, ready, failed


# -- the store as data ------------------------------------------------------------------------
_DUMP = r"""
import json, os, sqlite3, sys
con = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, timeout=60)
def text(v):
    return os.fsdecode(v) if isinstance(v, bytes) else v
def rows(q):
    return [[text(c) for c in r] for r in con.execute(q)]
tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
out = {"datasets": rows("SELECT id, name FROM datasets ORDER BY id")}
out["samples"] = rows(
    "SELECT d.name, r.path, s.path, s.status, s.width, s.height, s.format, s.orientation,"
    " s.error, s.size_bytes, s.mtime_ns, s.coco_width, s.coco_height, s.size_mismatch"
    " FROM samples s JOIN datasets d ON d.id = s.dataset_id LEFT JOIN roots r ON r.id = s.root_id"
)
out["annotations"] = rows(
    "SELECT d.name, s.path, c.name, c.supercategory, c.coco_id, a.coco_id, a.x, a.y, a.w, a.h,"
    " a.area, a.iscrowd, a.segmentation FROM annotations a"
    " LEFT JOIN samples s ON s.id = a.sample_id LEFT JOIN datasets d ON d.id = s.dataset_id"
    " LEFT JOIN categories c ON c.id = a.category_id"
)
out["categories"] = rows(
    "SELECT d.name, c.name, c.supercategory, c.coco_id FROM categories c"
    " LEFT JOIN datasets d ON d.id = c.dataset_id"
)
out["embeddings"] = [
    [text(d), text(p), m, pre, v.hex() if v is not None else None]
    for d, p, m, pre, v in con.execute(
        "SELECT d.name, s.path, m.name, m.pretrained, e.vector FROM embeddings e"
        " LEFT JOIN samples s ON s.id = e.sample_id LEFT JOIN datasets d ON d.id = s.dataset_id"
        " LEFT JOIN models m ON m.id = e.model_id")
]
out["count_star"] = rows(
    "SELECT d.name, s.status, COUNT(*) FROM samples s JOIN datasets d ON d.id = s.dataset_id"
    " GROUP BY 1, 2"
)
out["count_star_by_job"] = rows(
    "SELECT dataset_id, job_id, status, COUNT(*) FROM samples GROUP BY 1, 2, 3"
)
out["counts"] = (
    rows("SELECT dataset_id, job_id, status, n FROM counts") if "counts" in tables else None)
out["phase_errors"] = (
    rows("SELECT d.name, e.phase, e.message FROM phase_errors e"
         " LEFT JOIN datasets d ON d.id = e.dataset_id") if "phase_errors" in tables else [])
con.close()
print(json.dumps(out))
"""

STATUSES = ("pending", "indexed", "embedding", "ready", "failed")


@dataclass
class Dump:
    """A whole store as comparable data, keyed by dataset name and path (ids differ between
    runs). `samples` maps (dataset, root, path) to (status, width, height, format, orientation,
    error, size, mtime, coco_width, coco_height, size_mismatch)."""

    datasets: list[str]
    samples: dict[tuple[str, str, str], tuple[Any, ...]]
    annotations: list[tuple[Any, ...]]
    categories: list[tuple[Any, ...]]
    embeddings: dict[tuple[str, str, str, str], str]
    count_star: dict[str, dict[str, int]]
    counts_ok: list[str]  # problems found checking the stored counters against COUNT(*)
    phase_errors: list[tuple[Any, ...]]
    duplicates: list[str]

    def of(self, dataset: str) -> Dump:
        """This dump restricted to one dataset."""
        return Dump(
            [d for d in self.datasets if d == dataset],
            {k: v for k, v in self.samples.items() if k[0] == dataset},
            [a for a in self.annotations if a[0] == dataset],
            [c for c in self.categories if c[0] == dataset],
            {k: v for k, v in self.embeddings.items() if k[0] == dataset},
            {k: v for k, v in self.count_star.items() if k == dataset},
            self.counts_ok,
            [e for e in self.phase_errors if e[0] == dataset],
            self.duplicates,
        )

    def renamed(self, name: str) -> Dump:
        """This dump (of one dataset) as if its dataset were called `name`."""
        return Dump(
            [name for _ in self.datasets],
            {(name, *k[1:]): v for k, v in self.samples.items()},
            sorted(((name, *a[1:]) for a in self.annotations), key=_sort_key),
            sorted(((name, *c[1:]) for c in self.categories), key=_sort_key),
            {(name, *k[1:]): v for k, v in self.embeddings.items()},
            dict(zip([name], self.count_star.values(), strict=False)),
            self.counts_ok,
            [(name, *e[1:]) for e in self.phase_errors],
            self.duplicates,
        )


def _sort_key(row: Sequence[Any]) -> tuple[str, ...]:
    return tuple(json.dumps(v) for v in row)


def dump_store(db: Path | str) -> Dump:
    """Read every row of the store with Python's sqlite3, in a child process."""
    done = subprocess.run(
        [sys.executable, "-I", "-c", _DUMP, os.fspath(db)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"reading {db} failed: {done.stderr[-2000:]}"
    raw = json.loads(done.stdout)
    dups: list[str] = []
    samples: dict[tuple[str, str, str], tuple[Any, ...]] = {}
    for name, root, path, *rest in raw["samples"]:
        key = (name, root, path)
        if key in samples:
            dups.append(f"sample {key} twice")
        samples[key] = tuple(rest)
    embeddings: dict[tuple[str, str, str, str], str] = {}
    for name, path, model, pre, vec in raw["embeddings"]:
        vkey = (name, path, model, pre)
        if vkey in embeddings:
            dups.append(f"embedding {vkey} twice")
        embeddings[vkey] = vec
    names = [n for _, n in raw["datasets"]]
    if len(set(names)) != len(names):
        dups.append(f"dataset names {names}")
    count_star: dict[str, dict[str, int]] = {}
    for name, status, n in raw["count_star"]:
        count_star.setdefault(name, dict.fromkeys(STATUSES, 0))[status] = n
    problems: list[str] = []
    if raw["counts"] is not None:
        stored = {(d, j, s): n for d, j, s, n in raw["counts"] if n}
        real = {(d, j, s): n for d, j, s, n in raw["count_star_by_job"]}
        if stored != real:
            diff = {k: (stored.get(k, 0), real.get(k, 0)) for k in stored.keys() | real.keys()
                    if stored.get(k, 0) != real.get(k, 0)}  # fmt: skip
            problems.append(f"stored counters != COUNT(*) for (dataset, job, status): {diff}")
    return Dump(
        names,
        samples,
        sorted((tuple(a) for a in raw["annotations"]), key=_sort_key),
        sorted((tuple(c) for c in raw["categories"]), key=_sort_key),
        embeddings,
        count_star,
        problems,
        [tuple(e) for e in raw["phase_errors"]],
        dups,
    )


def diff_samples(got: Dump, want: Dump, limit: int = 5) -> str:
    """A short account of how two dumps' samples differ."""
    missing = sorted(want.samples.keys() - got.samples.keys())
    extra = sorted(got.samples.keys() - want.samples.keys())
    changed = [
        (k, got.samples[k], want.samples[k])
        for k in sorted(got.samples.keys() & want.samples.keys())
        if got.samples[k] != want.samples[k]
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} rows missing, e.g. {missing[:limit]}")
    if extra:
        parts.append(f"{len(extra)} rows extra, e.g. {extra[:limit]}")
    if changed:
        parts.append(f"{len(changed)} rows differ (got, clean), e.g. {changed[:limit]}")
    return "; ".join(parts)


def assert_same_store(got: Dump, want: Dump) -> None:
    """`got` holds exactly what a clean run holds: every sample row, every annotation and
    category, every vector; no duplicates; counters equal COUNT(*); no stale phase error."""
    assert not got.duplicates, got.duplicates
    assert not got.counts_ok, got.counts_ok
    assert got.datasets == want.datasets, (got.datasets, want.datasets)
    assert got.samples == want.samples, diff_samples(got, want)
    assert got.count_star == want.count_star, (got.count_star, want.count_star)
    assert len(got.annotations) == len(want.annotations), (
        f"{len(got.annotations)} annotations, clean run {len(want.annotations)}"
    )
    assert got.annotations == want.annotations, "annotations differ from the clean run"
    assert got.categories == want.categories, (got.categories, want.categories)
    assert got.embeddings.keys() == want.embeddings.keys(), (
        f"vectors missing: {sorted(want.embeddings.keys() - got.embeddings.keys())[:5]}, "
        f"extra: {sorted(got.embeddings.keys() - want.embeddings.keys())[:5]}"
    )
    bad = [k for k in want.embeddings if got.embeddings[k] != want.embeddings[k]]
    assert not bad, f"{len(bad)} vectors differ from the clean run, e.g. {bad[:3]}"
    assert got.phase_errors == [], f"stale phase errors: {got.phase_errors}"


def assert_progress_matches(progress: dict[str, Any], dump: Dump, dataset: str = NAME) -> None:
    """A progress reading (taken by fastindex after the run) equals COUNT(*) and is complete."""
    counts = {s: progress[s] for s in STATUSES}
    assert counts == dump.count_star.get(dataset, dict.fromkeys(STATUSES, 0)), (
        f"progress {counts} != COUNT(*) {dump.count_star.get(dataset)}"
    )
    assert progress["total"] == sum(counts.values()), progress
    assert progress["status"] == "complete", progress
    assert not progress.get("error"), f"stale error in progress: {progress.get('error')}"


# -- measurements -----------------------------------------------------------------------------
MEASURED: list[str] = []


def record(line: str) -> None:
    """A number for the lead's report (printed in the terminal summary)."""
    MEASURED.append(line)


# -- the runs ---------------------------------------------------------------------------------
BIG_FILES = 18_000  # three probe batches of 8192 rows: phase 2 has a middle
SMALL_FILES = 240  # thirty batches of 8 for the tiny model: phase 3 has a middle

# Each script indexes into dataset NAME of the store argv[1], waits for the whole dataset and
# prints its progress as a `JSON ...` line; `mark()` lines give the timeline. Run twice on one
# store, the second run finishes what the first left (the add finds its rows already there).
_ADD_AND_WAIT = """
db = sys.argv[1]
mark("start")
ds = fastindex.Dataset.load_or_create(os.environ.get("FAULTS_DATASET", "{name}"), db=db)
mark("created")
job = {add}
mark("scanned")
ok = ds.wait(timeout=150)
mark("done")
print("JSON " + json.dumps(ds.get_loading_progress()), flush=True)
sys.exit(0 if ok else 3)
"""
SCRIPTS = {
    "images": _ADD_AND_WAIT.format(
        name=NAME, add="ds.add_images_from_path(sys.argv[2], embed=False)"
    ),
    "coco": _ADD_AND_WAIT.format(
        name=NAME,
        add="ds.add_samples_from_coco(annotations_json=sys.argv[3], images_path=sys.argv[2],"
        " embed=False)",
    ),
    "embed": _ADD_AND_WAIT.format(
        name=NAME,
        add="ds.add_images_from_path(sys.argv[2], embed=testing.tiny_model(batch_size=8))",
    ),
}
# Reopen and finish: what a user does after a crash in phase 2 or 3.
RESUME = f"""
ds = fastindex.Dataset.load(os.environ.get("FAULTS_DATASET", "{NAME}"), db=sys.argv[1])
ok = ds.wait(timeout=150)
print("JSON " + json.dumps(ds.get_loading_progress()), flush=True)
sys.exit(0 if ok else 3)
"""


def script_args(kind: str, db: Path, trees: Trees) -> list[object]:
    if kind == "images":
        return [db, trees.big.root]
    if kind == "coco":
        return [db, trees.big.root, trees.coco]
    return [db, trees.small.root]


@dataclass
class Trees:
    big: Tree  # enough files for three probe batches
    coco: Path  # a COCO file over half of `big`, a polygon on every box
    small: Tree  # for phase 3 with the tiny model


class CleanRuns:
    """Runs without faults, made once per session and kept as dumps: the reference."""

    def __init__(self, zygote: Zygote, trees: Trees, base: Path) -> None:
        self.zygote, self.trees, self.base = zygote, trees, base
        self._done: dict[str, tuple[Dump, dict[str, float]]] = {}
        self._timelines: dict[str, list[dict[str, float]]] = {}

    def get(self, kind: str) -> tuple[Dump, dict[str, float]]:
        """`(dump, marks)` of a clean run of `kind` ("images", "coco" or "embed")."""
        if kind not in self._done:
            db = self.base / f"clean-{kind}.db"
            child = self.zygote.run(SCRIPTS[kind], script_args(kind, db, self.trees))
            assert child.wait(180) == 0, child.output()[-3000:]
            dump = dump_store(db)
            (progress,) = child.json_lines()
            assert_progress_matches(progress, dump)
            assert not dump.counts_ok and not dump.duplicates and not dump.phase_errors
            self._done[kind] = (dump, child.marks())
        return self._done[kind]

    def phase_length(self, kind: str, opens: str, closes: str, runs: int = 3) -> float:
        """How long runs of `kind` spend from mark `opens` to mark `closes`: the shortest of
        the clean run and `runs - 1` more like it (so a random moment in it is inside the
        phase on a run that goes faster, too)."""
        if kind not in self._timelines:
            seen = [self.get(kind)[1]]
            for i in range(runs - 1):
                db = self.base / f"timeline-{kind}-{i}.db"
                child = self.zygote.run(SCRIPTS[kind], script_args(kind, db, self.trees))
                assert child.wait(180) == 0, child.output()[-3000:]
                seen.append(child.marks())
            self._timelines[kind] = seen
        return min(
            t[closes] - (t[opens] if opens != "start" else 0.0) for t in self._timelines[kind]
        )

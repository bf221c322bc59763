"""Helpers of the wheel smoke suite (see conftest.py): an installed environment, and running
its `fastindex` command and its Python in subprocesses."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Venv:
    """One environment the wheel is installed in."""

    kind: str  # "full" (the embed and server extras) or "bare" (no extras)
    root: Path

    @property
    def extras(self) -> bool:
        return self.kind == "full"

    @property
    def python(self) -> str:
        return str(self.root / "bin" / "python")

    @property
    def exe(self) -> str:
        """The `fastindex` entry point the wheel installed."""
        return str(self.root / "bin" / "fastindex")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env["PYTHONUNBUFFERED"] = "1"
        env["HF_HUB_OFFLINE"] = "1"  # no model download is ever attempted here
        return env

    def run(
        self, args: Sequence[str], cwd: Path, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """`args` (the first is `fastindex` or `python`, for this venv's) to completion."""
        return subprocess.run(
            [self._program(args[0]), *args[1:]],
            cwd=cwd,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,  # a hang guard, not a timing assertion
            stdin=subprocess.DEVNULL,
        )

    def python_code(self, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return self.run(["python", "-c", code], cwd)

    def start(self, args: Sequence[str], cwd: Path) -> Running:
        popen = subprocess.Popen(
            [self._program(args[0]), *args[1:]],
            cwd=cwd,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return Running(popen)

    def _program(self, name: str) -> str:
        return {"fastindex": self.exe, "python": self.python}[name]


def get(url: str, timeout: float = 30) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers.get("content-type", ""), r.read()


class Running:
    """A started process whose stdout and stderr are read line by line by two threads (a
    select on the pipe would miss lines already in the reader's buffer)."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self.lines: dict[str, queue.Queue[str | None]] = {}
        self.seen = {"stdout": "", "stderr": ""}
        self._pumps: list[threading.Thread] = []
        for name in ("stdout", "stderr"):
            q: queue.Queue[str | None] = queue.Queue()
            self.lines[name] = q
            t = threading.Thread(target=self._pump, args=(name, q), daemon=True)
            t.start()
            self._pumps.append(t)

    def _pump(self, name: str, q: queue.Queue[str | None]) -> None:
        pipe = getattr(self.popen, name)
        for line in pipe:
            q.put(line)
        q.put(None)  # the process closed it

    def expect(self, pattern: str, *, stream: str, timeout: float = 60) -> re.Match[str]:
        """The first line from now on of `stream` that matches `pattern`. Fails (with what
        was read) if the stream ends first or on the hang guard."""
        deadline = time.monotonic() + timeout
        q = self.lines[stream]
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = q.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                q.put(None)
                break
            self.seen[stream] += line
            m = re.search(pattern, line)
            if m:
                return m
        self.stop()
        pytest.fail(f"no line matching {pattern!r} on {stream}; read: {self.seen}")

    def stop(self, timeout: float = 15) -> int:
        """Ctrl-C, then wait (kill past the hang guard); the exit code."""
        proc = self.popen
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for t in self._pumps:
            t.join(5)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        return proc.returncode


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command printed on stderr (fails if it printed more, or a
    traceback)."""
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err

"""Helpers of the wheel smoke suite (see conftest.py): an installed environment, and running
its `fastindex` command and its Python in subprocesses."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
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

    def start(self, args: Sequence[str], cwd: Path) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [self._program(args[0]), *args[1:]],
            cwd=cwd,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def _program(self, name: str) -> str:
        return {"fastindex": self.exe, "python": self.python}[name]


def get(url: str, timeout: float = 30) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers.get("content-type", ""), r.read()


def read_until(
    proc: subprocess.Popen[str], pattern: str, *, stream: str, timeout: float = 60
) -> tuple[re.Match[str], str]:
    """Read `proc`'s stdout or stderr line by line until one matches `pattern`: the match
    and everything read. Fails (with what was read) if the process ends first or on the hang
    guard."""
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    assert pipe is not None
    seen = ""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(pipe, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=0.5):
                continue
            line = pipe.readline()
            if not line:
                break
            seen += line
            m = re.search(pattern, line)
            if m:
                return m, seen
    stop(proc)
    rest = proc.communicate()
    pytest.fail(f"no line matching {pattern!r} on {stream}; read:\n{seen}\nthen:\n{rest}")


def stop(proc: subprocess.Popen[str], timeout: float = 15) -> int:
    """Ctrl-C, then wait (kill past the hang guard); the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command printed on stderr (fails if it printed more, or a
    traceback)."""
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    return err

"""`fastindex index` bars show the store's rate and time left: the CLI in a subprocess, its
bars rendered as on a terminal (FORCE_COLOR), read back from stderr."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from server_support import make_images

N = 200
# The CLI with the tiny test model registered in its process (open_clip knows it by name).
CLI = (
    "import sys; from fastindex import testing; testing.register_tiny_model(); "
    "from fastindex.cli import main; sys.exit(main())"
)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
EMBED = re.compile(r"3 embed\s.*?\s(\d+)/(\d+)\s+\d+%\s+(?:(\S+)/s\s+)?[\d:]+\s*(left \S+)?")


def test_embed_bar_shows_a_nonzero_rate_mid_run(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    make_images(tmp_path / "imgs", N)
    env = {**os.environ, "FORCE_COLOR": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    r = subprocess.run(
        [
            *(sys.executable, "-c", CLI, "index", str(tmp_path / "imgs"), "--db", "s.db"),
            *("--model", "fastindex-tiny", "--pretrained", "random", "--device", "cpu"),
            *("--batch-size", "1"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert f"ready {N}" in r.stderr
    frames = [
        m.groups()
        for line in re.split(r"[\r\n]", ANSI.sub("", r.stderr))
        if (m := EMBED.search(line))
    ]
    mid_run = [
        (int(done), rate, left)
        for done, total, rate, left in frames
        if 0 < int(done) < int(total) == N
    ]
    assert mid_run, frames
    # From the first commit on, every frame shows a rate above zero and a time left.
    for done, rate, left in mid_run:
        assert rate is not None and float(rate.replace(",", "")) > 0, (done, rate)
        assert left is not None and left != "left -", (done, left)

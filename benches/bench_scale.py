"""Ten million images on one machine: phase 1, re-index, watch, paging and search at scale.

    python benches/bench_scale.py [--only phase1,watch,paging,search] [section options]

Each section lives in benches/scale/<name>.py, generates its own data (under
$FASTINDEX_BENCH_DATA or bench-data/), measures in fresh subprocesses where peak memory matters
(VmHWM read from the measured process's own /proc status), and returns rows of
(measure, value, goal, note). This driver runs the sections asked for and prints one table.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SECTIONS = ("phase1", "watch", "paging", "search")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    modules = {name: importlib.import_module(f"scale.{name}") for name in SECTIONS}
    for mod in modules.values():
        mod.add_args(parser)
    args = parser.parse_args()
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections: {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    rows: list[tuple[str, str, str, str]] = []
    for name in wanted:
        t0 = time.perf_counter()
        section = modules[name].run(args)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
        rows.extend(section)
    print(f"\nfastindex at scale on {platform.node()} ({platform.machine()})\n")
    header = ("measure", "value", "goal", "note")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A/B two builds of mergesmith on one recipe: interleaved whole-process runs.

    ab.py RECIPE --a SRC_A --b SRC_B [--recipe-b RECIPE_B] [--repeats 5] [--workdir DIR]
          [-- EXTRA RUN ARGS]

``SRC_A`` and ``SRC_B`` are ``src`` folders of two checkouts (e.g. a ``git worktree`` of
the previous commit and this one); each run is ``python -m mergesmith run RECIPE OUT
--quiet`` with ``PYTHONPATH=SRC`` under ``/usr/bin/time -v``, A and B alternating so that
drifts of the machine hit both alike. The output folder is deleted (and ``sync``ed)
between runs; the inputs should be in the page cache (run once before). Prints the median
wall time and the largest peak RSS of each, their ratio B/A, and whether the two outputs
are byte-identical. ``--recipe-b`` gives B another recipe (e.g. the same merge of FP8
inputs, with ``--a`` and ``--b`` the same build).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed_run(src: str, recipe: Path, out: Path, extra: list[str]) -> tuple[float, int]:
    env = dict(os.environ, PYTHONPATH=src, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "mergesmith", "run", str(recipe),
           str(out), "--quiet", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}): {done.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
    return wall, rss_kb * 1024


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--a", required=True, help="src folder of build A (the reference)")
    ap.add_argument("--b", required=True, help="src folder of build B")
    ap.add_argument("--recipe-b", type=Path, help="B's recipe (default: RECIPE)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mergesmith-ab"))
    ap.add_argument("extra", nargs="*", help="more arguments for 'mergesmith run'")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[tuple[float, int]]] = {"A": [], "B": []}
    digests = {}
    for i in range(args.repeats):
        for name, src, recipe in (("A", args.a, args.recipe),
                                  ("B", args.b, args.recipe_b or args.recipe)):
            out = args.workdir / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            wall, rss = timed_run(src, recipe, out, args.extra)
            results[name].append((wall, rss))
            if i == 0:
                digests[name] = digest(out)
            print(f"run {i + 1} {name}: {wall:6.2f} s, peak RSS {rss / 2**20:7.0f} MiB",
                  flush=True)
            shutil.rmtree(out, ignore_errors=True)
    summary = {}
    for name, runs in results.items():
        walls = [w for w, _ in runs]
        summary[name] = (statistics.median(walls), max(r for _, r in runs))
        listing = ", ".join(f"{w:.2f}" for w in walls)
        print(f"{name}: median wall {summary[name][0]:.2f} s (runs {listing}), "
              f"peak RSS {summary[name][1] / 2**20:.0f} MiB")
    (wa, ra), (wb, rb) = summary["A"], summary["B"]
    print(f"B/A: wall {wb / wa:.3f}, peak RSS {rb / ra:.3f}; outputs "
          f"{'identical' if digests['A'] == digests['B'] else 'DIFFER'}")


if __name__ == "__main__":
    main()

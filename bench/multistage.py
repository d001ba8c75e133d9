#!/usr/bin/env python3
"""Multi-stage recipes: peak memory and wall time of a fused 3-stage merge against the
1-stage merge it starts with, and against the same 3 stages run one after another
(each stage written, then read by the next). Whole-process runs under ``/usr/bin/time -v``.

    python bench/multistage.py WORKDIR [--models DIR] [--repeats 3] [--threads N]

Inputs: ``DIR/base``, ``DIR/ft1``, ``DIR/ft2`` (bf16, Llama-shaped), by default made with
``bench/make_models.py WORKDIR/models --size-gb 0.5 --finetunes 2``. The recipes
(``dtype: bfloat16``):

* **1 stage**: TIES of ft1 and ft2 on the base (weights 0.5, density 0.5);
* **3 stages**: that TIES (``tied``) → SLERP of ``tied`` and ft2 with ``t: [0, 0.5, 1]``
  (``blended``) → task arithmetic on the base of ``blended`` (weight 0.8 for ``mlp``, 1.0
  elsewhere) and ft1 (0.3): one file, the intermediate stages fused;
* **3 separate runs**: the same three documents as three ``mergesmith run`` commands, the
  intermediates written to WORKDIR (their wall times summed, the largest peak RSS).

The page cache is warmed first; outputs are deleted and ``sync``ed between runs. Prints
the median wall seconds and the largest peak RSS of each variant, interleaved.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

TIES = """\
name: tied
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.5}}
dtype: bfloat16
"""
SLERP = """\
name: blended
merge_method: slerp
base_model: {tied}
models:
  - model: {tied}
  - model: {ft2}
parameters:
  t: [0, 0.5, 1]
dtype: bfloat16
"""
TASK = """\
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {blended}
    parameters:
      weight:
        - filter: mlp
          value: 0.8
        - value: 1.0
  - model: {ft1}
    parameters: {{weight: 0.3}}
dtype: bfloat16
"""


def timed(cmd: list[str]) -> tuple[float, int]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
    return wall, rss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--models", type=Path, default=None,
                    help="folder with base, ft1, ft2 [default: made in WORKDIR/models]")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    models = args.models or work / "models"
    if not (models / "ft2").exists():
        subprocess.run([sys.executable, str(HERE / "make_models.py"), str(models),
                        "--size-gb", "0.5", "--finetunes", "2"], check=True)
    paths = {k: str((models / k).resolve()) for k in ("base", "ft1", "ft2")}
    for k in paths.values():  # warm the page cache
        for p in Path(k).glob("*.safetensors"):
            with open(p, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    stage1 = TIES.format(**paths)
    stage2 = SLERP.format(tied=work / "tied", **paths)
    stage3 = TASK.format(blended=work / "blended", **paths)
    (work / "one.yml").write_text(stage1)
    (work / "three.yml").write_text("\n---\n".join([
        stage1, SLERP.format(tied="tied", **paths), TASK.format(blended="blended", **paths)]))
    for k, text in (("s1", stage1), ("s2", stage2), ("s3", stage3)):
        (work / f"{k}.yml").write_text(text)
    extra = ["--quiet"] + (["--threads", str(args.threads)] if args.threads else [])
    ms = [sys.executable, "-m", "mergesmith", "run"]
    variants = {
        "1 stage": [[*ms, str(work / "one.yml"), str(work / "out"), *extra]],
        "3 stages fused": [[*ms, str(work / "three.yml"), str(work / "out"), *extra]],
        "3 separate runs": [[*ms, str(work / "s1.yml"), str(work / "tied"), *extra],
                            [*ms, str(work / "s2.yml"), str(work / "blended"), *extra],
                            [*ms, str(work / "s3.yml"), str(work / "out"), *extra]],
    }
    results: dict[str, list[tuple[float, int]]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for name, cmds in variants.items():
            wall, rss = 0.0, 0
            for folder in ("out", "tied", "blended"):
                shutil.rmtree(work / folder, ignore_errors=True)
            os.sync()
            for cmd in cmds:
                w, r = timed(cmd)
                wall, rss = wall + w, max(rss, r)
            results[name].append((wall, rss))
            print(f"  {name}: {wall:.1f} s, {rss / 2**20:.0f} MiB", flush=True)
    for folder in ("out", "tied", "blended"):
        shutil.rmtree(work / folder, ignore_errors=True)
    print(f"{'variant':>16} {'median wall':>12} {'peak RSS':>10}")
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        rss = max(r for _, r in runs)
        print(f"{name:>16} {wall:>11.1f}s {rss / 2**20:>7.0f} MiB")


if __name__ == "__main__":
    main()

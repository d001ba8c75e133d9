#!/usr/bin/env python3
"""Benchmark LoRA end to end on the 2 GB synthetic model: extract an adapter from a
fine-tune, then merge with ``base+adapter`` as an input of task arithmetic.

Reports wall time, CPU time and peak RSS of each step (whole processes under GNU time):

1. ``mergesmith extract-lora --model ft1 --base base --rank R --embeddings skip``
2. ``task_arithmetic`` of ``base+adapter`` (weight 1) and ``ft2`` (weight 0.5)
3. the same recipe with ``ft1`` instead of the adapter, for reference

    .venv/bin/python bench/lora.py --workdir /tmp/msbench [--size-gb 2] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from modern import timed  # noqa: E402
from run import remove  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mergesmith-bench"))
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--mergesmith", default=os.environ.get("MERGESMITH") or str(
        Path(__file__).resolve().parents[1] / ".venv" / "bin" / "mergesmith"))
    args = ap.parse_args()
    ms = shlex.split(args.mergesmith)
    models = args.workdir / "models" / f"{args.size_gb:g}gb"
    subprocess.run([sys.executable, str(HERE / "make_models.py"), str(models), "--size-gb",
                    str(args.size_gb), "--finetunes", "2"], check=True, stdout=subprocess.DEVNULL)
    runs = args.workdir / "runs" / "lora"
    runs.mkdir(parents=True, exist_ok=True)
    adapter = args.workdir / "out" / "lora-adapter"
    remove(adapter)
    rows = []
    stats = timed([*ms, "extract-lora", "--model", str(models / "ft1"), "--base",
                   str(models / "base"), "--out", str(adapter), "--rank", str(args.rank),
                   "--embeddings", "skip", "--quiet"], runs / "extract")
    rows.append({"step": f"extract-lora --rank {args.rank}", **stats})
    for name, first in (("task_arithmetic with base+adapter", f"{models / 'base'}+{adapter}"),
                        ("task_arithmetic with the full fine-tune", str(models / "ft1"))):
        recipe = {"merge_method": "task_arithmetic", "base_model": str(models / "base"),
                  "dtype": "bfloat16",
                  "models": [{"model": first, "parameters": {"weight": 1.0}},
                             {"model": str(models / "ft2"), "parameters": {"weight": 0.5}}]}
        path = runs / f"{len(rows)}.yml"
        path.write_text(yaml.safe_dump(recipe))
        out = args.workdir / "out" / "lora-merge"
        remove(out)
        stats = timed([*ms, "run", str(path), str(out), "--quiet"], runs / f"merge{len(rows)}")
        remove(out)
        rows.append({"step": name, **stats})
    (args.workdir / "lora.json").write_text(json.dumps(rows, indent=1))
    print("| step | wall s | CPU s | peak RSS MiB |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | {r.get('wall_s', 0):.1f} | {r.get('cpu_s', 0):.1f} | "
              f"{r.get('max_rss_mb', 0):.0f} |" + ("" if r["ok"] else " FAILED"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

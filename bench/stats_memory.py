#!/usr/bin/env python3
"""Peak memory of ``mergesmith stats`` (the layer-by-layer statistics pass) against the
budget the design promises: ~2 × (one layer + the calibration hidden states + one layer's
Gram matrices).

    PYTHONPATH=src python bench/stats_memory.py [MODEL] [--tokens 2048] [--kinds gram]

MODEL: a model folder with a tokenizer, e.g. the 0.5 GB bf16 Llama-shaped base that
``bench/moe.py`` makes (``WORKDIR/models/base``, with a byte-level tokenizer). The calibration text is generated (deterministic words). Three whole
processes run under ``/usr/bin/time -v``: the imports alone (the interpreter, torch,
transformers: the floor any statistics process pays), then ``mergesmith stats`` twice
(the second run finds the artefact in a fresh cache: its RSS is the floor plus reading
the manifest). The budget terms, from config.json, as the pass holds them:

* one layer: the largest of a decoder layer, the input embedding and the LM head, in
  float32 (the pass computes in float32 whatever the checkpoint's dtype);
* hidden states: calibration tokens × hidden size × 4 bytes;
* one layer's Grams: float64 accumulators, one per distinct input (q/k/v share one,
  gate/up share one): hidden², attention width², intermediate² (and the head's hidden²).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 1 << 20


def timed(cmd: list[str], env: dict) -> tuple[int, float, str]:
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stdout}\n{done.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1]) * 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)",
                     done.stderr)[1]
    parts = [float(p) for p in wall.split(":")]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    return rss, seconds, done.stdout


def budget(config: dict, tokens: int) -> dict[str, int]:
    h = config["hidden_size"]
    inter = config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads)
    hd = config.get("head_dim") or h // heads
    vocab = config["vocab_size"]
    layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter + 2 * h
    one_layer = 4 * max(layer, vocab * h)
    hidden = 4 * tokens * h
    grams = 8 * (h * h + (heads * hd) ** 2 + h * h + inter * inter)
    return {"one layer (fp32, largest of decoder layer / embedding / head)": one_layer,
            "hidden states (fp32)": hidden, "one layer's Grams (fp64)": grams}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--kinds", default="gram")
    args = ap.parse_args()
    config = json.loads((Path(args.model) / "config.json").read_text())
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    with tempfile.TemporaryDirectory() as tmp:
        rng = random.Random(0)
        words = ["the", "cat", "model", "merges", "layer", "by", "weights", "and", "data",
                 "of", "a", "token", "in", "statistics", "memory", "gram", "fisher"]
        text = Path(tmp) / "calib.txt"
        text.write_text(" ".join(rng.choice(words) for _ in range(args.tokens * 3)))
        env["MERGESMITH_STATS_CACHE"] = str(Path(tmp) / "cache")
        floor, _, _ = timed([sys.executable, "-c", "import torch, transformers, safetensors; "
                             "import mergesmith.statistics.collect; "
                             "transformers.AutoConfig"], env)
        cmd = [sys.executable, "-m", "mergesmith", "stats", args.model, "--text", str(text),
               "--max-tokens", str(args.tokens), "--max-length", str(args.max_length),
               "--batch-size", str(args.batch_size), "--kinds", args.kinds, "-q"]
        peak, wall, out = timed(cmd, env)
        cached, cached_wall, out2 = timed(cmd, env)
    terms = budget(config, args.tokens)
    total = sum(terms.values())
    size = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    print(f"model {args.model}: {size / MIB:.0f} MiB on disk, "
          f"{config['num_hidden_layers']} layers; {args.tokens} calibration tokens "
          f"(length {args.max_length}, batch {args.batch_size}), kinds {args.kinds}")
    for name, value in terms.items():
        print(f"  {name:<62} {value / MIB:8.1f} MiB")
    print(f"  {'sum':<62} {total / MIB:8.1f} MiB;  budget 2 × sum = {2 * total / MIB:.1f} MiB")
    print(f"process floor (python + torch + transformers imported): {floor / MIB:.0f} MiB")
    print(f"mergesmith stats: peak RSS {peak / MIB:.0f} MiB in {wall:.1f} s; above the floor "
          f"{(peak - floor) / MIB:.0f} MiB = {(peak - floor) / total:.2f} × sum "
          f"({'within' if peak - floor <= 2 * total else 'OVER'} the budget); whole process "
          f"{peak / total:.2f} × sum")
    print(f"cached rerun: peak RSS {cached / MIB:.0f} MiB in {cached_wall:.1f} s")
    print(out.strip().splitlines()[0])


if __name__ == "__main__":
    main()

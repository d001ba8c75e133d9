#!/usr/bin/env python3
"""MoE building benchmark: ``mergesmith moe`` against ``mergekit-moe`` (mergekit 0.1.5), a
Mixtral from N Llama-shaped experts, interleaved whole-process runs.

    python bench/moe.py WORKDIR --mergekit-moe /path/to/venv/bin/mergekit-moe
                        [--size-gb 0.5] [--experts 2 4 8] [--repeats 3] [--gate-mode random]

Inputs come from ``bench/make_models.py`` (a base and N fine-tunes of ``--size-gb`` each,
bf16), each given the made-up byte-level tokenizer of ``bench/make_gguf.py`` (the gate modes
that read prompts need one; mergekit-moe copies the base's). For each expert count the
config is mergekit-moe's YAML (``base_model``, ``gate_mode``, ``dtype: bfloat16``,
``experts`` with one positive prompt each); both tools run it under ``/usr/bin/time -v``,
alternating, with the output deleted and ``sync``ed between runs and the inputs in the page
cache. Prints median wall seconds and the largest peak RSS of each tool per expert count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_inputs(workdir: Path, size_gb: float, n: int) -> tuple[Path, list[Path]]:
    models = workdir / "models"
    if not (models / f"ft{n}").exists():
        subprocess.run([sys.executable, str(HERE / "make_models.py"), str(models),
                        "--size-gb", str(size_gb), "--finetunes", str(n)], check=True)
    sys.path.insert(0, str(HERE))
    from make_gguf import byte_level_tokenizer

    folders = [models / "base", *(models / f"ft{i + 1}" for i in range(n))]
    for folder in folders:
        if not (folder / "tokenizer.json").exists():
            vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
            (folder / "tokenizer.json").write_text(json.dumps(byte_level_tokenizer(vocab)))
            (folder / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}))
    return folders[0], folders[1:]


def config(base: Path, experts: list[Path], gate_mode: str) -> str:
    lines = [f"base_model: {base}", f"gate_mode: {gate_mode}", "dtype: bfloat16",
             "experts_per_token: 2", "experts:"]
    for i, e in enumerate(experts):
        lines += [f"  - source_model: {e}", "    positive_prompts:", f"      - 'topic {i}'"]
    return "\n".join(lines) + "\n"


def timed(cmd: list[str]) -> tuple[float, int]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1])
    return wall, rss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--mergekit-moe", required=True)
    ap.add_argument("--size-gb", type=float, default=0.5)
    ap.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gate-mode", default="random")
    args = ap.parse_args()

    base, all_experts = make_inputs(args.workdir, args.size_gb, max(args.experts))
    for f in [base, *all_experts]:  # warm the page cache
        for p in f.glob("*.safetensors"):
            with open(p, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    print(f"{'experts':>7} {'tool':>12} {'median wall':>12} {'peak RSS':>10}")
    for n in args.experts:
        cfg = args.workdir / f"moe{n}.yml"
        cfg.write_text(config(base, all_experts[:n], args.gate_mode))
        out = args.workdir / f"out{n}"
        tools = {
            "mergesmith": [sys.executable, "-m", "mergesmith", "moe", str(cfg), str(out),
                           "--quiet", "--seed", "0"],
            "mergekit-moe": [args.mergekit_moe, str(cfg), str(out), "--random-seed", "0"],
        }
        results: dict[str, list[tuple[float, int]]] = {t: [] for t in tools}
        for _ in range(args.repeats):
            for tool, cmd in tools.items():
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                results[tool].append(timed(cmd))
        shutil.rmtree(out, ignore_errors=True)
        for tool, runs in results.items():
            wall = statistics.median(w for w, _ in runs)
            rss = max(r for _, r in runs)
            print(f"{n:>7} {tool:>12} {wall:>11.2f}s {rss / 2**20:>7.0f} MiB", flush=True)


if __name__ == "__main__":
    main()

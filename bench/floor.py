#!/usr/bin/env python3
"""Machine "floor" measurements for the merge benchmark.

Each subcommand is meant to run as its own process under ``/usr/bin/time -v``
so its wall time, CPU time and peak RSS compare directly with a merge tool's.

    floor.py read FILE...              read every byte once, 16 MiB at a time
    floor.py write PATH NBYTES         write NBYTES to PATH, close, delete
    floor.py merge RECIPE OUT [--seed N] [--threads N]
                                       naive torch merge of a benchmark recipe

``merge`` is the plainest possible implementation of the recipe's arithmetic:
per tensor, ``safe_open(...).get_tensor``, upcast to fp32, compute, cast to
bf16, and ``save_file`` once per output shard (the output mirrors the first
input's shard layout). It understands only the recipes ``run.py`` writes
(task_arithmetic, linear, ties, dare_ties, slerp).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

CHUNK = 16 * 1024 * 1024


def read_files(paths: list[str]) -> int:
    """Read all bytes of ``paths``; returns the byte count."""
    total = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def write_file(path: str, nbytes: int) -> None:
    """Write ``nbytes`` of incompressible data, close (no fsync), delete."""
    block = os.urandom(CHUNK)
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(block[: min(left, CHUNK)])
    os.unlink(path)


# --------------------------------------------------------------------------- merge

def weight_files(folder: Path) -> tuple[list[str], dict[str, str]]:
    """(shard file names in order, tensor name -> shard file name)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values())), weight_map
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return ["model.safetensors"], {k: "model.safetensors" for k in f.keys()}


def trim_magnitude(delta, density: float):
    """TIES trim: keep the ``density`` fraction of entries with largest |delta|."""
    import torch

    k = max(1, int(density * delta.numel()))
    if k >= delta.numel():
        return delta
    # Exactly k entries: bf16 deltas take few distinct values, so a threshold
    # test would keep far more than k of them.
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[torch.topk(delta.abs().flatten(), k, sorted=False).indices] = True
    return delta * keep.view_as(delta)


def drop_random(delta, density: float, gen):
    """DARE: keep each entry with probability ``density``, rescale to preserve the L1 norm."""
    import torch

    kept = delta * (torch.rand(delta.shape, generator=gen) < density)
    norm = kept.abs().sum()
    return kept * (delta.abs().sum() / norm) if norm > 0 else kept


def ties_combine(base, deltas, weights, normalize: bool):
    """Sign consensus (sum method) then a (normalised) weighted sum of agreeing deltas."""
    import torch

    weighted = torch.stack([w * d for w, d in zip(weights, deltas)])
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    mask = weighted.sign() == majority
    mixed = (weighted * mask).sum(0)
    if normalize:
        w = torch.tensor(weights).view(-1, *([1] * base.ndim))
        divisor = (w * mask).sum(0)
        mixed /= torch.where(divisor == 0, 1.0, divisor)
    return base + mixed


def slerp(t: float, a, b, dot_threshold: float = 0.9995):
    """Spherical interpolation of two whole tensors (linear when nearly parallel)."""
    import torch

    na, nb = a.norm(), b.norm()
    dot = ((a / na.clamp_min(1e-8)) * (b / nb.clamp_min(1e-8))).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return (1 - t) * a + t * b
    theta = torch.acos(dot)
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


def merge_tensor(recipe: dict, tensors: list, gen):
    """Merge one tensor; ``tensors`` are fp32, the base first when there is one."""
    method = recipe["method"]
    weights = recipe["weights"]
    if method == "linear":
        return sum(w * x for w, x in zip(weights, tensors)) / sum(weights)
    if method == "slerp":
        return slerp(recipe["t"], tensors[0], tensors[1])
    base, others = tensors[0], tensors[1:]
    deltas = [x - base for x in others]
    if method == "task_arithmetic":
        return base + sum(w * d for w, d in zip(weights, deltas))
    if method == "ties":
        deltas = [trim_magnitude(d, p) for d, p in zip(deltas, recipe["densities"])]
        return ties_combine(base, deltas, weights, normalize=True)
    if method == "dare_ties":
        deltas = [drop_random(d, p, gen) for d, p in zip(deltas, recipe["densities"])]
        return ties_combine(base, deltas, weights, normalize=False)
    raise ValueError(f"floor merge does not implement {method!r}")


def load_recipe(path: str) -> dict:
    """Reduce a benchmark recipe YAML to {method, inputs, weights, densities, t}."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text())
    method = cfg["merge_method"]
    base = cfg.get("base_model")
    entries = [m for m in cfg["models"] if m["model"] != base]
    params = [m.get("parameters") or {} for m in entries]
    inputs = ([base] if base else []) + [m["model"] for m in entries]
    return {
        "method": method,
        "inputs": [Path(p) for p in inputs],
        "weights": [float(p.get("weight", 1.0)) for p in params],
        "densities": [float(p.get("density", 1.0)) for p in params],
        "t": float((cfg.get("parameters") or {}).get("t", 0.5)),
    }


def merge(recipe_path: str, out: str, seed: int = 0, threads: int | None = None) -> None:
    """Run the naive merge of ``recipe_path`` into the folder ``out``."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if threads:
        torch.set_num_threads(threads)
    recipe = load_recipe(recipe_path)
    gen = torch.Generator().manual_seed(seed)
    layout = recipe["inputs"][0]
    shard_files, _ = weight_files(layout)
    maps = [weight_files(folder)[1] for folder in recipe["inputs"]]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for shard in shard_files:
        # Input files are opened per output shard: safetensors maps them, and
        # mapped pages that were read count towards RSS until the file closes.
        with contextlib.ExitStack() as stack:
            handles: dict[Path, object] = {}

            def get(i: int, name: str):
                path = recipe["inputs"][i] / maps[i][name]
                if path not in handles:
                    handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
                return handles[path].get_tensor(name).float()

            with safe_open(str(layout / shard), framework="pt") as f:
                names = list(f.keys())
            result = {}
            for name in names:
                tensors = [get(i, name) for i in range(len(recipe["inputs"]))]
                result[name] = merge_tensor(recipe, tensors, gen).to(torch.bfloat16)
                del tensors
        save_file(result, str(out_dir / shard), metadata={"format": "pt"})
        del result
    for extra in ("config.json", "generation_config.json", "model.safetensors.index.json"):
        if (layout / extra).exists():
            shutil.copy(layout / extra, out_dir / extra)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("read", help="read files once")
    p.add_argument("files", nargs="+")
    p = sub.add_parser("write", help="write NBYTES once")
    p.add_argument("path")
    p.add_argument("nbytes", type=int)
    p = sub.add_parser("merge", help="naive torch merge")
    p.add_argument("recipe")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    if args.cmd == "read":
        read_files(args.files)
    elif args.cmd == "write":
        write_file(args.path, args.nbytes)
    else:
        merge(args.recipe, args.out, args.seed, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())

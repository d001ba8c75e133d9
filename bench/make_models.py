#!/usr/bin/env python3
"""Generate synthetic Llama-shaped checkpoints for benchmarking merges.

Writes ``OUTDIR/base`` plus ``OUTDIR/ft1`` .. ``OUTDIR/ftN``: Hugging Face
folders with bfloat16 safetensors shards, ``config.json`` (LlamaForCausalLM)
and ``generation_config.json``. The fine-tunes are ``base + delta`` with small
Gaussian deltas. Everything is derived from ``--seed``, so the bytes are
identical on every machine and run.

Memory stays bounded: the base is produced one shard at a time, and each
fine-tune shard is built from the (memory-mapped) base shard on disk.

A marker file records the generation parameters; a folder whose marker matches
is left alone, anything else is regenerated.

Usage:
    make_models.py OUTDIR --size-gb 2 --finetunes 2 [--seed 0] [--shard-gb 1.0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

GENERATOR_VERSION = 1
MARKER = ".mergesmith-bench.json"
VOCAB_SIZE = 32000
BYTES_PER_PARAM = 2  # bfloat16
GB = 1e9  # sizes are decimal gigabytes, as the Hugging Face Hub shows them
INIT_STD = 0.02  # std of the base model's matrices
NORM_STD = 0.05  # norm weights are 1 + N(0, NORM_STD)
HIDDEN_CANDIDATES = (128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 5120, 6144, 8192)


@dataclass(frozen=True)
class Shape:
    """Llama architecture hyper-parameters."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int = VOCAB_SIZE

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """All tensors in checkpoint order, named as transformers names them."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q_dim = self.num_attention_heads * self.head_dim
        kv_dim = self.num_key_value_heads * self.head_dim
        out = [("model.embed_tokens.weight", (v, h))]
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            out += [
                (p + "self_attn.q_proj.weight", (q_dim, h)),
                (p + "self_attn.k_proj.weight", (kv_dim, h)),
                (p + "self_attn.v_proj.weight", (kv_dim, h)),
                (p + "self_attn.o_proj.weight", (h, q_dim)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
        return out

    def num_params(self) -> int:
        return sum(numel(s) for _, s in self.tensor_shapes())


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def shape_for_hidden(h: int, layers: int) -> Shape:
    """Llama-style proportions: MLP 2.75x, 64-dim heads (128 from 4096 up), GQA 8:1."""
    head_dim = 64 if h <= 3072 else 128
    heads = max(1, h // head_dim)
    return Shape(
        hidden_size=h,
        intermediate_size=int(round(h * 2.75 / 64)) * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 8),
        head_dim=head_dim,
    )


def choose_shape(size_gb: float) -> Shape:
    """Pick the widest model that still gets at least hidden/128 layers.

    The layer count is then set so the checkpoint is as close as possible to
    ``size_gb``. 2 GB gives TinyLlama's width (2048 / 5632, 32 heads, 4 KV
    heads) with 20 layers; 0.5 GB gives hidden 1024; 8 GB gives hidden 3072.
    """
    target = size_gb * GB / BYTES_PER_PARAM
    best = None
    for h in HIDDEN_CANDIDATES:
        fixed = shape_for_hidden(h, 0).num_params()
        per_layer = shape_for_hidden(h, 1).num_params() - fixed
        layers = max(1, round((target - fixed) / per_layer))
        if best is None or layers >= h / 128:
            best = shape_for_hidden(h, layers)
    return best


def config_json(shape: Shape) -> dict:
    """A transformers-5 style LlamaForCausalLM config."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": INIT_STD,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": shape.num_attention_heads,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_key_value_heads": shape.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": shape.vocab_size,
    }


def generation_config_json() -> dict:
    return {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}


def plan_shards(shape: Shape, shard_bytes: float) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split tensors, in order, into shards of at most ``shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for name, s in shape.tensor_shapes():
        nbytes = numel(s) * BYTES_PER_PARAM
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, s))
        size += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def tensor_seed(*parts: object) -> int:
    """A stable 63-bit seed from arbitrary parts (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def gaussian(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    x = gaussian(shape, tensor_seed(seed, "base", name))
    if len(shape) == 1:  # RMSNorm weight
        return x.mul_(NORM_STD).add_(1.0).to(torch.bfloat16)
    return x.mul_(INIT_STD).to(torch.bfloat16)


def finetune_tensor(name: str, base: torch.Tensor, index: int, seed: int, delta_rel: float) -> torch.Tensor:
    """base + N(0, (delta_rel * base_std)^2), computed in fp32, stored as bf16."""
    scale = delta_rel * (NORM_STD if base.ndim == 1 else INIT_STD)
    delta = gaussian(tuple(base.shape), tensor_seed(seed, f"ft{index}", name))
    return delta.mul_(scale).add_(base.float()).to(torch.bfloat16)


def write_folder_files(folder: Path, shape: Shape, shards: list, total_bytes: int) -> None:
    """config.json, generation_config.json and (if sharded) the index."""
    (folder / "config.json").write_text(json.dumps(config_json(shape), indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(generation_config_json(), indent=2) + "\n")
    names = shard_names(len(shards))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total_bytes},
            "weight_map": {t: f for f, shard in zip(names, shards) for t, _ in shard},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def generate_base(folder: Path, shape: Shape, shards: list, seed: int) -> None:
    names = shard_names(len(shards))
    for fname, shard in zip(names, shards):
        tensors = {name: base_tensor(name, s, seed) for name, s in shard}
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors


def generate_finetune(folder: Path, base: Path, shards: list, index: int, seed: int, delta_rel: float) -> None:
    names = shard_names(len(shards))
    for fname in names:
        tensors = {}
        with safe_open(str(base / fname), framework="pt") as f:
            for name in f.keys():
                tensors[name] = finetune_tensor(name, f.get_tensor(name), index, seed, delta_rel)
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors


def make_models(outdir: Path, size_gb: float, finetunes: int, seed: int = 0,
                shard_gb: float = 1.0, delta_rel: float = 1e-2, log=print) -> dict:
    """Create (or reuse) base + fine-tunes under ``outdir``; returns a summary dict."""
    shape = choose_shape(size_gb)
    shards = plan_shards(shape, shard_gb * GB)
    total_bytes = shape.num_params() * BYTES_PER_PARAM
    common = {
        "generator_version": GENERATOR_VERSION,
        "size_gb": size_gb,
        "seed": seed,
        "shard_gb": shard_gb,
        "shape": asdict(shape),
        "total_bytes": total_bytes,
    }
    outdir.mkdir(parents=True, exist_ok=True)
    jobs = [("base", {**common, "role": "base"})]
    jobs += [(f"ft{i}", {**common, "role": f"ft{i}", "delta_rel": delta_rel}) for i in range(1, finetunes + 1)]

    base_regenerated = False
    for name, marker in jobs:
        folder = outdir / name
        if not base_regenerated and read_marker(folder) == marker:
            log(f"[make_models] {folder}: up to date")
            continue
        t0 = time.perf_counter()
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        if name == "base":
            generate_base(folder, shape, shards, seed)
            base_regenerated = True  # every fine-tune depends on it
        else:
            generate_finetune(folder, outdir / "base", shards, int(name[2:]), seed, delta_rel)
        write_folder_files(folder, shape, shards, total_bytes)
        (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # written last
        log(f"[make_models] {folder}: generated {total_bytes / GB:.2f} GB "
            f"in {len(shards)} shard(s), {time.perf_counter() - t0:.1f}s")
    return {**common, "params": shape.num_params(), "shards": len(shards),
            "models": [str(outdir / n) for n, _ in jobs]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--size-gb", type=float, required=True, help="approximate checkpoint size (decimal GB)")
    ap.add_argument("--finetunes", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=1.0, help="maximum shard size (decimal GB)")
    ap.add_argument("--delta-rel", type=float, default=1e-2,
                    help="fine-tune delta std relative to the base init std (default 1e-2; "
                         "much smaller deltas mostly round away in bfloat16)")
    ap.add_argument("--print-shape", action="store_true", help="only print the chosen shape")
    args = ap.parse_args(argv)
    if args.print_shape:
        shape = choose_shape(args.size_gb)
        print(json.dumps({**asdict(shape), "params": shape.num_params(),
                          "bytes": shape.num_params() * BYTES_PER_PARAM}, indent=2))
        return 0
    summary = make_models(args.outdir, args.size_gb, args.finetunes, args.seed, args.shard_gb, args.delta_rel)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

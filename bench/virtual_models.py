#!/usr/bin/env python3
"""Write "virtual" checkpoints of real large shapes: headers only, data as sparse holes.

    python bench/virtual_models.py OUT --shape llama-3.1-405b [--variants 2]
    python bench/virtual_models.py OUT --shape deepseek-v3 [--variants 2]

Writes ``OUT/<shape>/base`` and ``OUT/<shape>/ft1`` .. ``ftN``: for each shard a safetensors
file whose header lists the real tensor names, dtypes, shapes and offsets, and whose data
section is a hole (the file is created with its header, then ``os.truncate``d to its full
size, so it takes one block of disk: check with ``du -sh``), plus
``model.safetensors.index.json`` and ``config.json`` with the published config values.
Every variant has the same headers (a recipe can reference base + N "fine-tunes"); the
variants' shards are named ``ft1-00001-of-00191.safetensors`` etc., the base's as on the
Hub (``model-00001-of-00191.safetensors``). ``mergesmith check`` plans merges of these
(it reads headers only); ``mergesmith run`` would read zeros.

Shapes (configs as published on the Hugging Face Hub, transcribed below):

* ``llama-3.1-405b``: meta-llama/Llama-3.1-405B(-Instruct) config.json — bfloat16,
  126 layers, hidden 16384, intermediate 53248, 128 heads, 8 KV heads (head_dim 128),
  vocab 128256, untied head; 191 shards as on the Hub.
* ``deepseek-v3``: deepseek-ai/DeepSeek-V3 config.json — 671B, block-scaled FP8
  (``float8_e4m3fn`` weights with ``weight_scale_inv`` float32 ``[ceil(r/128),
  ceil(c/128)]``; embeddings, head, norms and routers stay bfloat16,
  ``e_score_correction_bias`` float32), MLA attention (q_lora_rank 1536, kv_lora_rank 512,
  qk_nope 128 + qk_rope 64, v_head_dim 128, 128 heads), 61 layers of which the first 3 are
  dense (intermediate 18432), then 256 routed experts (moe_intermediate 2048) + 1 shared
  per layer, tensors per expert as the Hub checkpoint stores them
  (``model.layers.N.mlp.experts.E.gate_proj.weight``); 163 shards as on the Hub. The
  multi-token-prediction layer (``model.layers.61.*``, ``num_nextn_predict_layers: 1``)
  is left out: transformers does not load it, and a merge of the main model does not need
  it (config.json keeps the published value).
* ``tiny-test``: a DeepSeek-V3-shaped model small enough for the tests (2 layers, 1 dense,
  4 experts, FP8 blocks of 128).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from collections.abc import Iterator
from math import ceil, prod
from pathlib import Path

BYTES = {"BF16": 2, "F32": 4, "F8_E4M3": 1}

LLAMA_405B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 16384,
    "initializer_range": 0.02,
    "intermediate_size": 53248,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 128,
    "num_hidden_layers": 126,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.42.3",
    "use_cache": True,
    "vocab_size": 128256,
}

DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                            "quant_method": "fp8", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

TINY_TEST = {**DEEPSEEK_V3, "hidden_size": 256, "intermediate_size": 384,
             "moe_intermediate_size": 128, "num_hidden_layers": 2, "first_k_dense_replace": 1,
             "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
             "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 192,
             "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
             "v_head_dim": 32, "vocab_size": 300, "num_nextn_predict_layers": 0}

SHAPES = {  # name: (config, number of shards as on the Hub)
    "llama-3.1-405b": (LLAMA_405B, 191),
    "deepseek-v3": (DEEPSEEK_V3, 163),
    "tiny-test": (TINY_TEST, 2),
}

Tensor = tuple[str, str, tuple[int, ...]]  # name, safetensors dtype, shape


def llama_tensors(c: dict) -> Iterator[Tensor]:
    h, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    yield "model.embed_tokens.weight", "BF16", (v, h)
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", "BF16", (h,)
        yield p + "mlp.down_proj.weight", "BF16", (h, inter)
        yield p + "mlp.gate_proj.weight", "BF16", (inter, h)
        yield p + "mlp.up_proj.weight", "BF16", (inter, h)
        yield p + "post_attention_layernorm.weight", "BF16", (h,)
        yield p + "self_attn.k_proj.weight", "BF16", (kv, h)
        yield p + "self_attn.o_proj.weight", "BF16", (h, q)
        yield p + "self_attn.q_proj.weight", "BF16", (q, h)
        yield p + "self_attn.v_proj.weight", "BF16", (kv, h)
    yield "model.norm.weight", "BF16", (h,)
    yield "lm_head.weight", "BF16", (v, h)


def _fp8(name: str, rows: int, cols: int, block: list[int]) -> Iterator[Tensor]:
    yield name, "F8_E4M3", (rows, cols)
    yield f"{name}_scale_inv", "F32", (ceil(rows / block[0]), ceil(cols / block[1]))


def deepseek_tensors(c: dict) -> Iterator[Tensor]:
    h, v, heads = c["hidden_size"], c["vocab_size"], c["num_attention_heads"]
    block = c["quantization_config"]["weight_block_size"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    yield "model.embed_tokens.weight", "BF16", (v, h)
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", "BF16", (h,)
        yield p + "post_attention_layernorm.weight", "BF16", (h,)
        a = p + "self_attn."
        yield from _fp8(a + "q_a_proj.weight", c["q_lora_rank"], h, block)
        yield a + "q_a_layernorm.weight", "BF16", (c["q_lora_rank"],)
        yield from _fp8(a + "q_b_proj.weight", heads * qk, c["q_lora_rank"], block)
        yield from _fp8(a + "kv_a_proj_with_mqa.weight",
                        c["kv_lora_rank"] + c["qk_rope_head_dim"], h, block)
        yield a + "kv_a_layernorm.weight", "BF16", (c["kv_lora_rank"],)
        yield from _fp8(a + "kv_b_proj.weight",
                        heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"],
                        block)
        yield from _fp8(a + "o_proj.weight", h, heads * c["v_head_dim"], block)
        if n < c["first_k_dense_replace"]:
            yield from _mlp(p + "mlp.", h, c["intermediate_size"], block)
            continue
        e = c["n_routed_experts"]
        yield p + "mlp.gate.weight", "BF16", (e, h)
        yield p + "mlp.gate.e_score_correction_bias", "F32", (e,)
        for i in range(e):
            yield from _mlp(f"{p}mlp.experts.{i}.", h, c["moe_intermediate_size"], block)
        yield from _mlp(p + "mlp.shared_experts.", h,
                        c["moe_intermediate_size"] * c["n_shared_experts"], block)
    yield "model.norm.weight", "BF16", (h,)
    yield "lm_head.weight", "BF16", (v, h)


def _mlp(p: str, h: int, inter: int, block: list[int]) -> Iterator[Tensor]:
    yield from _fp8(p + "gate_proj.weight", inter, h, block)
    yield from _fp8(p + "up_proj.weight", inter, h, block)
    yield from _fp8(p + "down_proj.weight", h, inter, block)


def tensors(shape: str) -> list[Tensor]:
    config = SHAPES[shape][0]
    return list(deepseek_tensors(config) if "quantization_config" in config
                else llama_tensors(config))


def nbytes(t: Tensor) -> int:
    return prod(t[2]) * BYTES[t[1]]


def split(ts: list[Tensor], shards: int) -> list[list[Tensor]]:
    """``shards`` groups of consecutive tensors, of about equal bytes (a weight and its
    scale stay together)."""
    total = sum(nbytes(t) for t in ts)
    groups: list[list[Tensor]] = [[]]
    done = 0
    for t in ts:
        target = total * len(groups) / shards
        if groups[-1] and done >= target and len(groups) < shards \
                and not t[0].endswith("_scale_inv"):
            groups.append([])
        groups[-1].append(t)
        done += nbytes(t)
    return groups


def write_sparse(path: Path, group: list[Tensor]) -> int:
    """One safetensors file: the header, then a hole up to the full size."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, dtype, shape in group:
        n = prod(shape) * BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
    size = 8 + len(body) + pos
    os.truncate(path, size)
    return size


def write_model(folder: Path, shape: str, prefix: str = "model") -> int:
    """One virtual model folder; returns its apparent size in bytes."""
    config, shards = SHAPES[shape]
    folder.mkdir(parents=True, exist_ok=True)
    groups = split(tensors(shape), shards)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        name = f"{prefix}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        total += write_sparse(folder / name, group)
        weight_map.update({t[0]: name for t in group})
    data_bytes = sum(nbytes(t) for g in groups for t in g)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": data_bytes}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--variants", type=int, default=2,
                    help="fine-tune folders ft1..ftN next to base (same headers)")
    args = ap.parse_args(argv)
    root = args.out / args.shape
    for folder, prefix in [("base", "model")] + [(f"ft{i}", f"ft{i}")
                                                 for i in range(1, args.variants + 1)]:
        size = write_model(root / folder, args.shape, prefix)
        used = sum(p.stat().st_blocks * 512 for p in (root / folder).iterdir())
        print(f"{root / folder}: {size / 1e9:.1f} GB apparent, {used / 1e6:.1f} MB on disk",
              file=sys.stderr)


if __name__ == "__main__":
    main()

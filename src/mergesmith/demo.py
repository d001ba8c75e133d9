"""``mergesmith demo``: a complete merge on tiny models built locally, then checked.

It writes a small Llama-shaped base model and two "fine-tunes" (the base plus distinct
random deltas), the canonical task-arithmetic recipe pointing at them, merges, and checks
every merged tensor against the formula computed independently here.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file

from .errors import MergeError

MARKER = ".mergesmith-demo"
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "vocab_size": 2048,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
RECIPE = """\
# The canonical task-arithmetic recipe, pointing at the demo models:
# per tensor: base + 1.0·(ft_math − base) + 0.3·(ft_code − base)
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft_math}
    parameters: {{weight: 1.0}}
  - model: {ft_code}
    parameters: {{weight: 0.3}}
"""
WEIGHTS = {"ft_math": 1.0, "ft_code": 0.3}


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a ``LlamaForCausalLM`` with this config."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}"
        shapes.update({
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (h, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, h),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.mlp.gate_proj.weight": (i, h),
            f"{p}.mlp.up_proj.weight": (i, h),
            f"{p}.mlp.down_proj.weight": (h, i),
        })
    shapes["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def _write_model(folder: str, tensors: dict[str, torch.Tensor]) -> None:
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f, indent=2)


def build_models(directory: str) -> dict[str, str]:
    """Write base, ft_math and ft_code (bfloat16) into ``directory``; return their paths."""
    gen = torch.Generator().manual_seed(0)
    base = {}
    for name, shape in llama_shapes(CONFIG).items():
        if len(shape) == 1:  # norms: around 1, as trained models have
            base[name] = 1.0 + 0.05 * torch.randn(shape, generator=gen)
        else:
            base[name] = 0.02 * torch.randn(shape, generator=gen)
    paths = {"base": os.path.join(directory, "base")}
    _write_model(paths["base"], base)
    for seed, ft in enumerate(WEIGHTS, start=1):
        g = torch.Generator().manual_seed(seed)
        tuned = {k: v + 0.002 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        paths[ft] = os.path.join(directory, ft)
        _write_model(paths[ft], tuned)
    return paths


def verify_formula(paths: dict[str, str], merged: str) -> tuple[int, int, int, float]:
    """Compare every merged value with base + Σ wᵢ(xᵢ − base) computed here in float64.

    Returns (tensors, values, values equal to the exactly rounded bfloat16 result, largest
    difference in bfloat16 ulps of the exact value).
    """
    load = {k: load_file(os.path.join(p, "model.safetensors")) for k, p in paths.items()}
    out = load_file(os.path.join(merged, "model.safetensors"))
    values = exact = 0
    worst = 0.0
    for name, got in out.items():
        b = load["base"][name].double()
        want = b + sum(w * (load[ft][name].double() - b) for ft, w in WEIGHTS.items())
        _, exponent = torch.frexp(want)
        ulp = torch.ldexp(torch.ones_like(want), exponent - 8)  # bfloat16: 8 significant bits
        diff = (got.double() - want).abs()
        worst = max(worst, float((diff / ulp).max()))
        exact += int((got == want.to(torch.bfloat16)).sum())
        values += got.numel()
    return len(out), values, exact, worst


def run_demo(directory: str, overwrite: bool = False, echo: Callable[[str], None] = print) -> None:
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        ours = os.path.exists(os.path.join(directory, MARKER))
        if not ours and os.listdir(directory) and not overwrite:
            raise MergeError(f"{directory} exists and was not made by 'mergesmith demo'; give "
                             "another folder or pass --overwrite")
        shutil.rmtree(directory)
    os.makedirs(directory)
    open(os.path.join(directory, MARKER), "w").close()

    from . import api

    echo(f"1. Building a tiny Llama-shaped base model and two fine-tunes in {directory}")
    paths = build_models(directory)
    recipe = os.path.join(directory, "recipe.yml")
    with open(recipe, "w") as f:
        f.write(RECIPE.format(**paths))
    echo(f"2. Wrote the recipe {recipe}:\n")
    echo("   " + open(recipe).read().replace("\n", "\n   "))
    merged = os.path.join(directory, "merged")
    echo(f"3. Merging: mergesmith run {recipe} {merged}")
    plan = api.run(recipe, merged).plan
    echo(f"   wrote {len(plan.tensors)} tensors to {merged}: "
         f"{', '.join(sorted(os.listdir(merged)))}")
    count, values, exact, worst = verify_formula(paths, merged)
    echo(f"4. Checked all {count} tensors against base + 1.0·(ft_math − base) + 0.3·(ft_code − "
         "base), computed independently in float64:")
    echo(f"   {exact:,} of {values:,} values are the exactly rounded bfloat16 result; the "
         f"largest difference is {worst:.2f} ulp (float32 math, one rounding)")
    if worst > 1.0:
        raise RuntimeError("demo merge does not match the formula; please report this bug")
    _try_transformers(merged, echo)
    echo(f"\nVerify it yourself: python -c \"from transformers import AutoModelForCausalLM; "
         f"print(AutoModelForCausalLM.from_pretrained('{merged}'))\"")
    echo("Next: read the recipe above, validate your own with 'mergesmith check "
         "my-recipe.yml', then merge with 'mergesmith run my-recipe.yml OUT'.")


def _try_transformers(merged: str, echo: Callable[[str], None]) -> None:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        echo("5. (Install transformers, e.g. pip install 'mergesmith[hf]', to also load the "
             "merged model and run it.)")
        return
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 17, 42, 7, 99]])).logits
    finite = bool(torch.isfinite(logits).all())
    echo(f"5. Loaded with transformers.AutoModelForCausalLM and ran 5 tokens: logits "
         f"{tuple(logits.shape)}, all finite: {finite}")
    if not finite:
        raise RuntimeError("merged demo model produced non-finite logits; please report this bug")

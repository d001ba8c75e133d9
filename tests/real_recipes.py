"""Published mergekit recipes on tiny stand-in models.

``tests/data/real_recipes/configs/*.yml`` are recipes copied verbatim from public model
cards and repositories (``sources.tsv`` says where each comes from). To run one, every model
it names is replaced by a tiny Llama-shaped stand-in with as many layers as the recipe's
slices need, all sharing the conformance set's tokenizer; the first model named (the base
model when there is one) is the stand-in "base", the others fine-tunes of it. The recipe
text is otherwise left as published (value forms, anchors, comments, ignored keys).

Used by ``test_real_recipes.py`` and by ``data/real_recipes/make_expected.py``, which runs
mergekit 0.1.5 on the same stand-ins to produce the reference outputs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "real_recipes"
CONFIGS = DATA / "configs"
EXPECTED = DATA / "expected"
TOKENIZER = HERE.parents[1] / "shared" / "conformance" / "models" / "base"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json")

SHAPE = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2,
             num_key_value_heads=1, head_dim=8, vocab_size=512)


def standin_config(layers: int) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "num_hidden_layers": layers, "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "max_position_embeddings": 256, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32", **SHAPE}


def _shapes(layers: int) -> dict[str, tuple[int, ...]]:
    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    out = {"model.embed_tokens.weight": (v, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    out.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return out


def write_standin(folder: Path, layers: int, variant: int) -> Path:
    """Stand-in ``variant`` (0: the base; k: the base plus a seeded delta) with ``layers``
    layers: the same bytes on every machine."""
    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, shape in _shapes(layers).items():
        g = torch.Generator().manual_seed(hash_seed(name))
        base = (1.0 + 0.05 * torch.randn(shape, generator=g)) if len(shape) == 1 \
            else 0.05 * torch.randn(shape, generator=g)
        if variant:
            g.manual_seed(hash_seed(f"{variant}:{name}"))
            base = base + 0.01 * torch.randn(shape, generator=g)
        tensors[name] = base.contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(standin_config(layers), indent=1))
    for name in TOKENIZER_FILES:
        if (TOKENIZER / name).exists():
            shutil.copy(TOKENIZER / name, folder / name)
    return folder


def hash_seed(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=6).digest(), "little")


# ------------------------------------------------------------------ recipes


def write_standin_lora(folder: Path, layers: int, variant: int) -> Path:
    """A PEFT LoRA adapter (rank 2 on q_proj and v_proj) for the stand-ins."""
    if (folder / "adapter_model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    h, kv = SHAPE["hidden_size"], SHAPE["num_key_value_heads"] * SHAPE["head_dim"]
    tensors = {}
    for n in range(layers):
        for proj, out in (("q_proj", h), ("v_proj", kv)):
            key = f"base_model.model.model.layers.{n}.self_attn.{proj}"
            g = torch.Generator().manual_seed(hash_seed(f"lora{variant}:{key}"))
            tensors[f"{key}.lora_A.weight"] = 0.1 * torch.randn(2, h, generator=g)
            tensors[f"{key}.lora_B.weight"] = 0.1 * torch.randn(out, 2, generator=g)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
        "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "base_model_name_or_path": "stand-in"}, indent=1))
    return folder


def _refs(node: Any, key: str | None, out: list[str]) -> None:
    """Model references of a parsed recipe, in document order."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("model", "base_model") and isinstance(v, str):
                out.append(v)
            elif (k == "tokenizer_source" or (k == "source" and key == "tokenizer")) \
                    and isinstance(v, str) and v not in ("union", "base"):
                out.append(v)
            elif k == "model" and isinstance(v, dict):
                path = v.get("path") if isinstance(v.get("path"), str) else None
                if path:
                    out.append(path)
            _refs(v, k, out)
    elif isinstance(node, list):
        for v in node:
            _refs(v, key, out)


def model_paths(text: str) -> tuple[list[str], list[str]]:
    """Distinct model paths a recipe names (without ``@revision``), the base model first,
    and the LoRA adapters it applies (``model+lora``)."""
    data = yaml.safe_load(text)
    refs: list[str] = []
    if isinstance(data, dict) and isinstance(data.get("base_model"), str):
        refs.append(data["base_model"])
    _refs(data, None, refs)
    paths: list[str] = []
    loras: list[str] = []
    for ref in refs:
        model, _, lora = ref.removeprefix("model:").partition("+")
        path = model.split("@")[0].strip()
        if path and path not in paths:
            paths.append(path)
        lora = lora.split("@")[0].strip()
        if lora and lora not in loras:
            loras.append(lora)
    return paths, loras


def layers_needed(text: str) -> int:
    ends = [int(m) for m in re.findall(r"layer_range:\s*\[\s*\d+\s*,\s*(\d+)\s*\]", text)]
    return max([4, *ends])


def on_standins(text: str, root: Path) -> str:
    """The recipe with every model path replaced by a stand-in folder under ``root``."""
    layers = layers_needed(text)
    paths, loras = model_paths(text)
    folders = {path: write_standin(root / f"L{layers}" / f"m{variant}", layers, variant)
               for variant, path in enumerate(paths)}
    folders.update({lora: write_standin_lora(root / f"L{layers}" / f"lora{variant}", layers,
                                             variant) for variant, lora in enumerate(loras)})
    for path in sorted(folders, key=len, reverse=True):
        pattern = re.compile(r"(?<![\w./-])" + re.escape(path) + r"(?![\w.-])")
        text = pattern.sub(lambda _, f=str(folders[path]): f, text)
    return text


def in_float32(text: str) -> str:
    """The recipe with its top-level ``dtype``/``out_dtype`` set to float32.

    The sample is compared in float32 on both sides: with a bfloat16 ``dtype`` mergekit
    also does its arithmetic in bfloat16 (mergesmith: float32, one rounding — a deliberate
    difference), and its differences of an ulp or two, and the different picks among
    magnitudes that bfloat16 makes equal (TIES, SCE), would hide what the comparison is
    for: the same tensors merged with the same parameters. Precision is covered by the
    conformance set."""
    return re.sub(r"^((?:out_)?dtype):[^\n]*$", r"\1: float32", text, flags=re.MULTILINE)


def corpus() -> list[Path]:
    return sorted(CONFIGS.glob("*.yml")) if CONFIGS.exists() else []


def mergekit_accepts() -> set[str]:
    """Files mergekit 0.1.5 accepts: its schema validates them and it merges them on the
    stand-ins (``schema.tsv``, written by ``data/real_recipes/classify.py``)."""
    table = DATA / "schema.tsv"
    if not table.exists():
        return set()
    rows = [line.split("\t") for line in table.read_text().splitlines()[1:] if line.strip()]
    return {r[0] for r in rows if len(r) > 2 and r[1] == "true" and r[2] == "true"}

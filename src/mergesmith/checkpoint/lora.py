"""LoRA adapters (PEFT format) applied to their base model while it is read.

For ``model+adapter`` references every targeted weight ``W`` is read as
``W + s·ΔW`` in float32, with ``ΔW = B·A`` (transposed for ``fan_in_fan_out`` layers and
embedding LoRAs) and ``s = α/r`` (``α/√r`` with rsLoRA; ``r`` and ``α`` per module from
``rank_pattern``/``alpha_pattern``). ``modules_to_save`` tensors replace the base's. Only
the rows being read are computed, so nothing model-sized is ever held; the adapter's own
tensors (small) are kept in memory.

Adapter kinds that are not plain LoRA (DoRA, LoRA biases, other PEFT types) are refused:
applying them as plain LoRA would silently give a different model.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .._torch import torch
from ..errors import MergeError
from .index import TensorInfo, load_bin

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."


@dataclass
class LoraModule:
    """The low-rank update of one base tensor."""

    target: str
    a: torch.Tensor  # (r, in); for embeddings (r, num_embeddings)
    b: torch.Tensor  # (out, r); for embeddings (embedding_dim, r)
    scale: float
    transpose: bool  # ΔW = (B·A)ᵀ: fan_in_fan_out layers and embeddings
    embedding: bool = False  # PEFT's lora_embedding_A/B

    @property
    def shape(self) -> tuple[int, int]:
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if self.transpose else (out, inp)

    def delta(self, rows: tuple[int, int] | None) -> torch.Tensor:
        """``s·ΔW`` for rows ``[start, end)`` (all rows when None), float32."""
        a, b = self.a.float(), self.b.float()
        start, end = rows if rows is not None else (0, self.shape[0])
        if self.transpose:
            d = (b @ a[:, start:end]).T
        else:
            d = b[start:end] @ a
        return d.mul_(self.scale)


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter: its low-rank modules and full replacement tensors."""

    folder: str
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    saved_base_layers: set[str] = field(default_factory=set)  # PEFT's copies of base weights

    def touches(self, name: str) -> bool:
        return name in self.modules or name in self.replacements

    def apply(self, name: str, x: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
        """The adapted rows of base tensor ``name`` (``x`` holds the base's rows)."""
        full = self.replacements.get(name)
        if full is not None:
            x = (full if rows is None else full[rows[0]:rows[1]]).clone()
        module = self.modules.get(name)
        if module is None:
            return x
        return x.to(torch.float32).add_(module.delta(rows))

    def check_against(self, tensors: dict[str, TensorInfo], who: str) -> None:
        """Every adapted tensor exists in the base with a matching shape."""
        for name, module in self.modules.items():
            info = tensors.get(name)
            if info is None:
                raise MergeError(f"{who}: the adapter changes '{name}', which the base model "
                                 "does not have; is it an adapter for another model?")
            if tuple(info.shape) != module.shape:
                raise MergeError(f"{who}: the adapter's update of '{name}' has shape "
                                 f"{list(module.shape)} but the base tensor is "
                                 f"{list(info.shape)}; is it an adapter for another model?")
            if not info.dtype.is_floating_point:
                raise MergeError(f"{who}: the adapter changes '{name}', which is not a "
                                 "floating-point tensor")
        for name, tensor in self.replacements.items():
            info = tensors.get(name)
            if info is None or tuple(info.shape) != tuple(tensor.shape):
                got = "missing" if info is None else f"shape {list(info.shape)}"
                raise MergeError(f"{who}: the adapter replaces '{name}' (modules_to_save) "
                                 f"with shape {list(tensor.shape)}, but in the base model it "
                                 f"is {got}")


def load_adapter(folder: str, who: str) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter folder."""
    config_path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise MergeError(f"{who}: {folder} is not a PEFT adapter (no {ADAPTER_CONFIG})")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise MergeError(f"{who}: cannot read {config_path}: {e}") from None
    if not isinstance(config, dict):
        raise MergeError(f"{who}: {config_path} is not a JSON object")
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise MergeError(f"{who}: adapter type {kind} is not supported (only LoRA adapters "
                         "can be applied)")
    if config.get("use_dora"):
        raise MergeError(f"{who}: DoRA adapters (use_dora) are not supported: their weight "
                         "normalisation is not a low-rank update. Merge it with PEFT's "
                         "merge_and_unload and use the result")
    if config.get("lora_bias"):
        raise MergeError(f"{who}: adapters with LoRA biases (lora_bias) are not supported")
    weights = _load_weights(folder, who)
    adapter = LoraAdapter(folder, config)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    embedding: set[str] = set()
    for key, value in weights.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        for suffix, part, emb in ((".lora_A.weight", "a", False), (".lora_B.weight", "b", False),
                                  (".lora_embedding_A", "a", True),
                                  (".lora_embedding_B", "b", True)):
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                pairs.setdefault(module, {})[part] = value
                if emb:
                    embedding.add(module)
                break
        else:
            if ".lora_" in name:
                raise MergeError(f"{who}: adapter tensor '{key}' is of a LoRA variant "
                                 "mergesmith does not apply (DoRA magnitudes, biases, ...)")
            # modules_to_save, or a saved embedding layer (``base_layer``): a full tensor
            target = name.replace(".base_layer.", ".")
            adapter.replacements[target] = value
            if ".base_layer." in name:
                adapter.saved_base_layers.add(target)
    r_default = config.get("r", 8)
    alpha_default = config.get("lora_alpha", r_default)
    for module, parts in pairs.items():
        if set(parts) != {"a", "b"}:
            raise MergeError(f"{who}: adapter module '{module}' has only lora_"
                             f"{'A' if 'a' in parts else 'B'}; the file is incomplete")
        a, b = parts["a"], parts["b"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise MergeError(f"{who}: adapter module '{module}' has lora_A {list(a.shape)} and "
                             f"lora_B {list(b.shape)}, which do not multiply")
        rank = _pattern_value(config.get("rank_pattern"), module, r_default)
        alpha = _pattern_value(config.get("alpha_pattern"), module, alpha_default)
        if int(rank) != a.shape[0]:
            rank = a.shape[0]  # the tensors are the truth; PEFT sizes them from the pattern
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        transpose = module in embedding or bool(config.get("fan_in_fan_out"))
        adapter.modules[module + ".weight"] = LoraModule(module + ".weight", a, b, float(scale),
                                                         transpose, module in embedding)
    if not adapter.modules and not adapter.replacements:
        raise MergeError(f"{who}: the adapter in {folder} has no LoRA tensors")
    return adapter


def _pattern_value(patterns: Any, module: str, default: float) -> float:
    """PEFT's per-module override: a key equal to the module name, or a pattern matching
    its end (``(.*\\.)?pattern``)."""
    if not isinstance(patterns, dict):
        return default
    if module in patterns:
        return patterns[module]
    for pattern, value in patterns.items():
        try:
            if re.fullmatch(rf"(.*\.)?({pattern})", module):
                return value
        except re.error:
            continue
    return default


def _load_weights(folder: str, who: str) -> dict[str, torch.Tensor]:
    for name in ADAPTER_WEIGHTS:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            if name.endswith(".bin"):
                return load_bin(path)
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                return load_file(path)
            except (SafetensorError, OSError, ValueError) as e:
                raise MergeError(f"{who}: cannot read {path}: {e}") from None
    raise MergeError(f"{who}: no adapter weights in {folder} (expected "
                     f"{' or '.join(ADAPTER_WEIGHTS)})")

"""The output ``config.json``: the donor's, with architecture, dtype, tied embeddings, layer
counts (and per-layer lists) and vocabulary size patched to what the plan writes."""

from __future__ import annotations

import copy
from typing import Any

from .._torch import torch
from .. import arch
from ..errors import MergeError
from ..tokenizer import remap_special_ids
from ..units import dtype_name
from .draft import Draft
from .types import LayerSource


def check_architectures(d: Draft) -> None:
    archs = {}
    for ref, src in zip(d.refs, d.sources):
        a = ([ref.override_architecture] if ref.override_architecture
             else (src.config or {}).get("architectures"))
        if a:
            archs.setdefault(tuple(a), ref)
    if len(archs) > 1 and not d.options.allow_crimes:
        listing = "; ".join(f"{ref}: {', '.join(a)}" for a, ref in archs.items())
        raise MergeError(f"the input models have different architectures ({listing}). "
                         "Merging them is usually a mistake; pass --allow-crimes to try "
                         "anyway (the base model's architecture is used)")


def output_config(d: Draft, donor: int) -> dict[str, Any]:
    config = copy.deepcopy(d.sources[donor].config)
    if config is None:
        raise MergeError(f"model '{d.refs[donor]}' (the donor of the output config) has "
                         "no config.json; the merged model could not be loaded without one")
    if config.pop("quantization_config", None) is not None and d.quantization_config is None:
        d.notes.append("config.json: quantization_config removed (the inputs are dequantized; "
                       "the output is not quantized)")
    ref = d.refs[donor]
    if ref.override_architecture:
        config["architectures"] = [ref.override_architecture]
    out_dtype = d.recipe.out_dtype or d.recipe.dtype
    if d.quantization_config is not None:
        config["quantization_config"] = d.quantization_config
        out_dtype = torch.bfloat16  # what the quantized model runs in
    if out_dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
        for k in keys:
            config[k] = dtype_name(out_dtype)
    if d.untie:
        for path, value in list(arch.walk_config(config)):
            if path[-1] == "tie_word_embeddings" and value:
                arch.set_path(config, path, False)
        config.setdefault("tie_word_embeddings", False)
    modules = d.modules_of(donor)
    for name, layer_map in d.layer_maps.items():
        _patch_layers(d, config, modules[name], layer_map)
    if d.vocab is not None:
        _patch_vocab(d, config, donor)
    return config


def _patch_vocab(d: Draft, config: dict[str, Any], donor: int) -> None:
    """vocab_size (also nested) = rows written; special token ids follow the tokens."""
    assert d.vocab is not None
    old = config.get("vocab_size", d.rows.get(donor))
    for path, value in list(arch.walk_config(config)):
        if path[-1] == "vocab_size" and value in (old, d.rows.get(donor)):
            arch.set_path(config, path, d.vocab.size)
    if old != d.vocab.size:
        d.notes.append(f"config.json: vocab_size {old} → {d.vocab.size}")
    if d.vocab.truncate or donor not in d.vocabs:
        return
    old_tokens = d.vocabs[donor].token_of()
    new_ids = {t: i for i, t in enumerate(d.vocab.tokens)}
    remap_special_ids(config, old_tokens, new_ids, d.notes, "config.json")
    generation = d.sources[donor].generation_config
    if generation is not None:
        generation = copy.deepcopy(generation)
        remap_special_ids(generation, old_tokens, new_ids, d.notes, "generation_config.json")
        d.generation_config = generation


def _patch_layers(d: Draft, config: dict[str, Any], module: arch.Module,
                  layer_map: list[LayerSource]) -> None:
    old, new = module.layers, len(layer_map)
    keys = arch.layer_count_keys(config, old, module.name)
    if not keys:
        d.warnings.append(f"no layer-count key with value {old} found in config.json "
                          f"for module '{module.name}'; the output config keeps it")
        return
    sources = [layer.inputs[0][1] for layer in layer_map]
    relisted = []
    for path in keys:
        arch.set_path(config, path, new)
        for lst in arch.per_layer_lists(config, old, path[:-1]):
            values = arch.get_path(config, lst)
            arch.set_path(config, lst, [values[i] for i in sources])
            relisted.append(".".join(lst))
    if new != old or relisted:
        d.notes.append(f"config.json: {', '.join('.'.join(p) for p in keys)} "
                       f"{old} → {new}" + (f"; per-layer lists re-sliced: "
                                          f"{', '.join(relisted)}" if relisted else ""))

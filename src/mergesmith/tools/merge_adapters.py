"""Merging LoRA adapters into a LoRA adapter (``output: adapter``).

All inputs are ``base+adapter`` references on one base model. For each adapted weight:

* ``linear`` and ``task_arithmetic`` are linear in the task vectors, so the result is exact
  and still low-rank: the factors are concatenated, ``B = [c₁·B₁, c₂·B₂, …]``,
  ``A = [A₁; A₂; …]``, with ``cᵢ`` the method's coefficient of input ``i`` (its weight,
  normalised or scaled by ``lambda``) times the input's LoRA scale (kept in ``lora_alpha``
  when all inputs share it, so one adapter at weight 1 comes back unchanged);
* other task-vector methods (TIES, DARE, Breadcrumbs, DELLA) run on the dense task vectors
  ``ΔWᵢ = sᵢ·Bᵢ·Aᵢ`` (base 0) and the result is factored back by SVD to ``output_rank``
  (default: the largest input rank), its relative error reported.

Full tensors of the adapters (``modules_to_save``) are merged as full tensors and saved
as ``modules_to_save``. The plan (parameters per tensor, filters, gradients) is the one a
full-model merge of the same recipe would use.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..checkpoint import TensorReader
from ..checkpoint.lora import LoraAdapter, LoraModule
from ..errors import MergeError
from ..plan import Plan
from .extract_lora import factor

EXACT = {"linear", "task_arithmetic"}
_PREFIX = "base_model.model."


@dataclass
class AdapterMergeResult:
    folder: str
    modules: int = 0
    full_tensors: int = 0
    errors: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        text = (f"wrote adapter {self.folder}: {self.modules} low-rank modules, "
                f"{self.full_tensors} full tensors")
        if self.errors:
            worst = max(self.errors, key=self.errors.get)
            text += (f"; largest relative error of the rank reduction "
                     f"{self.errors[worst]:.3g} ({worst})")
        return text


def _adapters(plan: Plan) -> tuple[list[LoraAdapter | None], int]:
    """Each input's adapter (None for the base itself), and the base's input index."""
    recipe = plan.recipe
    if recipe.models is None:
        raise MergeError(f"{recipe.source}: 'output: adapter' needs 'models' (not slices or "
                         "modules)")
    if recipe.merge_method not in EXACT and not plan.method.scheduling.raw_inputs:
        raise MergeError(f"{recipe.at('merge_method')}: 'output: adapter' works with linear, "
                         "task_arithmetic and the task-vector methods (ties, dare_ties, ...), "
                         f"not {recipe.merge_method}")
    base_paths = {m.ref.model for m in plan.models}
    if len(base_paths) != 1:
        raise MergeError(f"{recipe.source}: 'output: adapter' needs every input to be an "
                         "adapter on the same base model (write base+adapter for each); found "
                         f"{', '.join(sorted(map(str, base_paths)))}")
    adapters = [m.lora for m in plan.models]
    if all(a is None for a in adapters):
        raise MergeError(f"{recipe.source}: 'output: adapter' needs LoRA inputs "
                         "(base+adapter references)")
    flags = {bool(a.config.get("fan_in_fan_out")) for a in adapters if a is not None}
    if len(flags) > 1:
        raise MergeError(f"{recipe.source}: the adapters disagree on fan_in_fan_out")
    return adapters, flags == {True}


def merge_adapters(plan: Plan, out_dir: str) -> AdapterMergeResult:
    """Write the merged adapter of ``plan`` (an ``output: adapter`` recipe) into
    ``out_dir`` (an empty folder)."""
    adapters, fan_in_fan_out = _adapters(plan)
    recipe = plan.recipe
    rank_out = recipe.output_rank
    result = AdapterMergeResult(out_dir)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    saved: list[str] = []
    index = plan.models[0].ensure_local()
    with TensorReader() as reader:
        for t in plan.tensors:
            names = [i.name for i in t.inputs]
            touched = [a is not None and a.touches(n)
                       for a, n in zip((adapters[i.model] for i in t.inputs), names)]
            if not any(touched):
                continue
            module = t.name[: -len(".weight")] if t.name.endswith(".weight") else t.name
            los: list[LoraModule | None] = [
                (adapters[i.model].modules.get(i.name) if adapters[i.model] else None)
                for i in t.inputs]
            full = any(_replaces(adapters[i.model], i.name, reader, index) for i in t.inputs)
            if full:  # modules_to_save: merge the full tensors like a model merge
                xs = []
                for i in t.inputs:
                    x = reader.read(index.tensors[i.name])
                    a = adapters[i.model]
                    xs.append(a.apply(i.name, x, None) if a is not None else x)
                merged = _apply(plan, t, xs).to(index.tensors[t.name].dtype)
                tensors[_PREFIX + t.name] = merged.contiguous()
                saved.append(module)
                result.full_tensors += 1
                continue
            if recipe.merge_method in EXACT:
                b, a, r, alpha = _concatenate(t, los, recipe.merge_method)
            else:
                b, a, r, alpha = _reduce(t, los, plan, rank_out, result)
            if next(m for m in los if m is not None).embedding:
                tensors[f"{_PREFIX}{module}.lora_embedding_A"] = a
                tensors[f"{_PREFIX}{module}.lora_embedding_B"] = b
            else:
                tensors[f"{_PREFIX}{module}.lora_A.weight"] = a
                tensors[f"{_PREFIX}{module}.lora_B.weight"] = b
            ranks[module], alphas[module] = r, alpha
            result.modules += 1
    if not ranks and not saved:
        raise MergeError(f"{recipe.source}: the adapters change no tensor of the base model")
    _write(out_dir, plan, tensors, ranks, alphas, saved, bool(fan_in_fan_out))
    return result


def _replaces(adapter: LoraAdapter | None, name: str, reader: TensorReader, index) -> bool:
    """Whether the adapter really replaces base tensor ``name``: modules_to_save do; PEFT's
    saved copy of an embedding layer does only when it differs from the base's."""
    if adapter is None or name not in adapter.replacements:
        return False
    if name not in adapter.saved_base_layers:
        return True
    return not torch.equal(adapter.replacements[name], reader.read(index.tensors[name]))


def _apply(plan: Plan, t, xs: list[torch.Tensor]) -> torch.Tensor:
    """The planned method on whole tensors in the compute dtype, as the engine calls it."""
    compute = plan.options.compute_dtype
    xs = [x.to(torch.promote_types(compute, x.dtype)).clone() for x in xs]
    bound = plan.bound(t)
    return bound(xs, t.params, t.model_params, tensor_name=t.name, compute_dtype=compute,
                 generator=bound.generator(plan.seed, t.name, xs[0].device))


def _concatenate(t, los: list[LoraModule | None], method: str):
    """Exact: ΔW = Σ cᵢ·sᵢ·Bᵢ·Aᵢ as one adapter of rank Σ rᵢ."""
    weights = [p.get("weight", 0.0) for p in t.model_params]
    total = sum(w for k, w in enumerate(weights) if method == "linear" or k != t.base_index)
    normalize = t.params.get("normalize", method == "linear")
    if method == "linear" and not normalize and abs(total - 1) > 1e-6:
        raise MergeError(f"tensor '{t.name}': linear without normalize on adapters needs "
                         f"weights summing to 1 (got {total:g}); otherwise the base weight "
                         "itself is scaled, which an adapter cannot express")
    lam = t.params.get("lambda", 1.0)
    parts = [(w / total if normalize and total else w) * (lam if method != "linear" else 1.0)
             for w in weights]
    used = [(c, m) for c, m, k in zip(parts, los, range(len(los)))
            if m is not None and (method == "linear" or k != t.base_index)]
    scales = {m.scale for _, m in used}
    r = sum(m.a.shape[0] for _, m in used)
    shared = scales.pop() if len(scales) == 1 else None
    bs = [m.b.float() * (c if shared is not None else c * m.scale) for c, m in used]
    a = torch.cat([m.a.float() for _, m in used], 0)
    b = torch.cat(bs, 1)
    alpha = shared * r if shared is not None else float(r)
    return b.contiguous(), a.contiguous(), r, alpha


def _reduce(t, los: list[LoraModule | None], plan: Plan, rank_out: int | None,
            result: AdapterMergeResult):
    """Any task-vector method on the dense ΔWᵢ (base 0), then an SVD back to low rank."""
    ref = next(m for m in los if m is not None)
    deltas = [m.delta(None) if m is not None else torch.zeros(ref.shape) for m in los]
    if t.base_index is None:
        raise MergeError(f"tensor '{t.name}': {t.method} needs a base_model")
    deltas[t.base_index] = torch.zeros(ref.shape)
    merged = _apply(plan, t, deltas)  # in the weight's own orientation (DELLA: rows)
    if ref.transpose:
        merged = merged.T
    rank = rank_out or max(m.a.shape[0] for m in los if m is not None)
    b, a, error = factor(merged, rank, None)
    result.errors[t.name] = error
    return b, a, a.shape[0], float(a.shape[0])


def _write(out_dir: str, plan: Plan, tensors, ranks, alphas, saved, fan_in_fan_out) -> None:
    from collections import Counter

    from safetensors.torch import save_file

    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    alpha = Counter(alphas[m] for m in ranks if ranks[m] == r).most_common(1)[0][0] \
        if ranks else 1.0
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(plan.models[0].ref.model),
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: k for m, k in sorted(ranks.items()) if k != r},
        "alpha_pattern": {m: alphas[m] for m in sorted(ranks) if alphas[m] != alpha},
        "modules_to_save": sorted(saved) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "mergesmith_config.yml"), "w", encoding="utf-8") as f:
        f.write(plan.recipe.text)


__all__ = ["AdapterMergeResult", "merge_adapters"]

"""The task-vector family: base + λ · combine(w_i · sparsify(x_i − base)).

Task arithmetic is the plain member (no sparsification, no sign consensus); the other
members add a sparsifier and/or TIES sign consensus on the same skeleton.
"""

from __future__ import annotations

import torch

from .registry import BasePolicy, MergeInputs, Param, Scope, merge_method


def generalized_task_arithmetic(m: MergeInputs) -> torch.Tensor:
    """base + λ·Σ wᵢ(xᵢ − base), divided by Σ wᵢ when ``normalize`` (mergekit's guard: a
    divisor below 1e-8 in magnitude is replaced by 1)."""
    base = m.base
    others = m.others()
    mixed = torch.zeros_like(base)
    if not others:
        return mixed.add_(base)
    delta = torch.empty_like(base)
    weight_sum = 0.0
    for x, p in others:
        w = p["weight"]
        weight_sum += w
        torch.sub(x, base, out=delta)
        mixed.add_(delta.mul_(w))
    if m.params["normalize"]:
        mixed.div_(weight_sum if abs(weight_sum) >= 1e-8 else 1.0)
    lam = m.params["lambda"]
    if lam != 1.0:
        mixed.mul_(lam)
    return mixed.add_(base)


def _gta_params(normalize: bool) -> list[Param]:
    return [
        Param("weight", float, scope=Scope.NON_BASE, doc="weight of the model's task vector"),
        Param("normalize", bool, normalize, doc="divide the sum by the sum of the weights"),
        Param("lambda", float, 1.0, doc="scale of the combined task vector"),
        Param("int8_mask", bool, False, doc="accepted for mergekit compatibility (no effect)"),
    ]


@merge_method(
    "task_arithmetic",
    base=BasePolicy.REQUIRED,
    params=_gta_params(normalize=False),
    elementwise=True,
    reference="https://arxiv.org/abs/2212.04089",
)
def task_arithmetic(m: MergeInputs) -> torch.Tensor:
    """Task arithmetic: base + λ·Σ wᵢ(xᵢ − base).

    Adds the weighted task vectors of the fine-tuned models to the base model.
    """
    return generalized_task_arithmetic(m)

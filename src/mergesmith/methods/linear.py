"""Linear averaging (model soups)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._torch import torch
from ..errors import MergeError
from .registry import BasePolicy, MergeInputs, Param, Scope, merge_method


def _check(name: str, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]],
           base_index: int | None) -> None:
    weights = [p["weight"] for p in model_params]
    if params["normalize"] and sum(weights) == 0:
        raise MergeError(f"linear: the weights of tensor '{name}' sum to zero ({weights}), so "
                         "they cannot be normalized; change the weights or set "
                         "'normalize: false'")


@merge_method(
    "linear",
    base=BasePolicy.IGNORED,
    params=[
        Param("weight", float, scope=Scope.INPUT, doc="weight of the model in the sum"),
        Param("normalize", bool, True, doc="divide by the sum of the weights"),
    ],
    elementwise=True,
    seconds_per_gb=0.9,
    reference="https://arxiv.org/abs/2203.05482",
    check=_check,
)
def linear(m: MergeInputs) -> torch.Tensor:
    """Weighted average of the inputs: Σ wᵢ·xᵢ (/ Σ wᵢ when normalize).

    A configured base model is an ordinary input and needs a weight too.
    """
    weights = [p["weight"] for p in m.model_params]
    acc = torch.mul(m.tensors[0], weights[0])
    tmp = torch.empty_like(acc)
    for x, w in zip(m.tensors[1:], weights[1:]):
        acc.add_(torch.mul(x, w, out=tmp))
    if m.params["normalize"]:
        acc.div_(sum(weights))
    return acc

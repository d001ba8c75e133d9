"""Passthrough: one input copied (optionally scaled); the building block of frankenmerges."""

from __future__ import annotations

from .._torch import torch
from .registry import BasePolicy, MergeInputs, Param, Scope, merge_method


@merge_method(
    "passthrough",
    base=BasePolicy.FORBIDDEN,
    params=[Param("scale", float, None, scope=Scope.INPUT, doc="multiply the tensor by this")],
    min_inputs=1,
    max_inputs=1,
    elementwise=True,
)
def passthrough(m: MergeInputs) -> torch.Tensor:
    """Copy the single input tensor, multiplied by ``scale`` when given.

    Used with slices to stack or reorder layers.
    """
    x = m.tensors[0]
    scale = m.model_params[0].get("scale")
    return x if scale is None else x * scale

"""NearSwap: take the other model's value wherever it is close to the base."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .._torch import torch
from ..errors import MergeError
from .registry import BasePolicy, MergeInputs, Param, merge_method


def _check(name: str, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]],
           base_index: int | None) -> None:
    if math.isnan(params["t"]):
        raise MergeError(f"nearswap: 't' is NaN for tensor '{name}'; give the distance below "
                         "which the other model's values are taken (e.g. 0.001)")


@merge_method(
    "nearswap",
    base=BasePolicy.REQUIRED,
    min_inputs=2,
    max_inputs=2,
    params=[Param("t", float, doc="distance from the base below which the other model's "
                                  "value is taken in full")],
    elementwise=True,
    temp_buffers=1.0,
    reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    differences="Float32 arithmetic (mergekit: the input dtype).",
    check=_check,
)
def nearswap(m: MergeInputs) -> torch.Tensor:
    """NearSwap: per element, w = clamp(t / |x − base|, 0, 1); out = w·x + (1−w)·base.

    Elements where the other model is within `t` of the base are taken from it; farther
    ones move toward it by exactly `t`, so large changes are damped. Exactly the base and
    one other model. (|x − base| is clamped at 1e-6 first; t ≤ 0 gives the base.)
    """
    base = m.base
    [(other, _)] = m.others()
    weight = torch.sub(base, other).abs_().clamp_(min=1e-6)
    weight.reciprocal_().mul_(m.params["t"]).clamp_(0.0, 1.0)  # t/|d| as torch computes it
    return base.lerp_(other, weight)  # exact at w = 0 (base) and w = 1 (other)

"""Model Stock: move from the base toward the fine-tunes' mean, as far as their agreement says."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence

import torch

from .registry import BasePolicy, MergeInputs, Param, merge_method


def _as_rows(x: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """(rows, length) view: one row for the whole tensor, or (``filter_wise``) one per
    vector along the last dimension (a 1-D tensor is one row either way)."""
    if filter_wise and x.dim() >= 2:
        return x.reshape(-1, x.shape[-1])
    return x.reshape(1, -1)


def _mean_pairwise_cosine(offsets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over pairs i < j of the per-row cosine of offsets i and j (float64, one per row).

    Norm products are clamped at 1e-6 and each cosine to [−1, 1], as mergekit does.
    """
    norms = [torch.linalg.vector_norm(o, dim=-1).double() for o in offsets]
    scratch = torch.empty_like(offsets[0])
    total = torch.zeros_like(norms[0])
    pairs = list(itertools.combinations(range(len(offsets)), 2))
    for i, j in pairs:
        dot = torch.mul(offsets[i], offsets[j], out=scratch).sum(dim=-1).double()
        total += (dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
    return total / len(pairs)


def _interpolation_ratio(cos: torch.Tensor, n: int) -> torch.Tensor:
    """Model Stock's t = N·cos / (1 + (N−1)·cos); 0 where the denominator is below 1e-6
    (opposing offsets give no finite estimate: keep the base). Not clamped."""
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))


def _clamp_with_warning(t: torch.Tensor, cos: torch.Tensor, tensor_name: str) -> torch.Tensor:
    """Clamp t to [0, 1], warning (naming the tensor) when that changes anything."""
    outside = (t < 0) | (t > 1)
    n_out = int(torch.count_nonzero(outside))
    if n_out:
        if t.numel() == 1:
            where = f"t = {float(t):.4g} (mean cosine of the task vectors {float(cos):.4g})"
        else:
            where = (f"t is outside [0, 1] in {n_out} of {t.numel()} rows (t from "
                     f"{float(t.min()):.4g} to {float(t.max()):.4g})")
        warnings.warn(f"model_stock: tensor '{tensor_name}': {where}; clamped t to [0, 1], "
                      "so where the fine-tunes disagree the base is kept (mergekit 0.1.5 does "
                      "not clamp)", stacklevel=2)
    return t.clamp(0.0, 1.0)


@merge_method(
    "model_stock",
    base=BasePolicy.REQUIRED,
    min_inputs=3,
    params=[Param("filter_wise", bool, False,
                  doc="compute the ratio per row (last dimension) instead of per tensor")],
    temp_buffers=1.0,
    reference="https://arxiv.org/abs/2403.19522",
    differences="""
        Float32 arithmetic (mergekit: the input dtype). t is clamped to [0, 1], with a
        warning naming the tensor; mergekit 0.1.5 applies it unclamped, so fine-tunes whose
        task vectors point in opposite directions (negative mean cosine) push the result
        away from both of them instead of leaving the base.
    """,
)
def model_stock(m: MergeInputs) -> torch.Tensor:
    """Model Stock: base + t·mean(xᵢ − base), t from the mean cosine between task vectors.

    With N fine-tunes whose task vectors have mean pairwise cosine c, t = N·c / (1 + (N−1)·c),
    clamped to [0, 1]: agreeing fine-tunes (c → 1) give their mean, unrelated ones (c → 0)
    stay near the base. `filter_wise` computes t per row. Needs the base and at least two
    fine-tunes. (This equals mergekit's t·mean(xᵢ) + (1−t)·base.)
    """
    base = m.base
    filter_wise = m.params["filter_wise"]
    offsets = [_as_rows(x.sub_(base), filter_wise) for x, _ in m.others()]
    n = len(offsets)
    cos = _mean_pairwise_cosine(offsets)
    t = _clamp_with_warning(_interpolation_ratio(cos, n), cos, m.tensor_name)
    merged = offsets[0]
    for o in offsets[1:]:
        merged.add_(o)
    merged.mul_((t / n).to(merged.dtype).unsqueeze(-1))
    return merged.view_as(base).add_(base)

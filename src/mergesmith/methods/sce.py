"""SCE (Select, Calculate, Erase): task vectors fused by variance, energy and sign consensus."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .._torch import torch
from ..errors import MergeError
from .registry import BasePolicy, MergeInputs, Param, merge_method

_VARIANCE_CHUNK = 1 << 20
"""Elements per float64 chunk of the variance (bounds the float64 temporaries)."""


def _population_variance(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-element variance over the models (divisor N), in the deltas' dtype.

    Accumulated in float64 and rounded once, like ``torch.var`` on the CPU, so that the
    ranking of positions (and hence the top-k selection) is the one mergekit gets. Values are
    taken relative to the first model's, so equal deltas give exactly 0 (not selectable).
    """
    flats = [d.reshape(-1) for d in deltas]
    out = torch.empty_like(flats[0])
    n = len(flats)
    for start in range(0, out.numel(), _VARIANCE_CHUNK):
        part = [f[start:start + _VARIANCE_CHUNK].to(torch.float64) for f in flats]
        shifted = [p - part[0] for p in part]
        mean = sum(shifted) / n
        out[start:start + _VARIANCE_CHUNK] = sum((s - mean).square_() for s in shifted) / n
    return out.view_as(deltas[0])


def _top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` (1 ≤ k ≤ numel) largest values.

    Ties at the cut go to the lowest flat indices, so the choice is deterministic on every
    device (mergekit's ``torch.topk`` leaves it unspecified).
    """
    flat = values.reshape(-1)
    cut = flat.kthvalue(flat.numel() - k + 1).values  # the k-th largest value
    mask = flat > cut
    missing = k - int(torch.count_nonzero(mask))
    if missing:
        ties = torch.nonzero(flat == cut).squeeze(1)[:missing]
        mask[ties] = True
    return mask.view_as(values)


def _select_high_variance(deltas: Sequence[torch.Tensor], fraction: float) -> torch.Tensor | None:
    """SCE "select": mask of the ``fraction`` of non-zero-variance positions with the highest
    variance across models, or None when that is no position at all."""
    var = _population_variance(deltas)
    nonzero = torch.count_nonzero(var)
    # float32 product as in mergekit: int(330 * 0.7) is 231 there, 230 in Python floats
    k = int(nonzero.to(torch.float32) * fraction)
    return _top_k_mask(var, k) if k > 0 else None


def _energy_weights(deltas: Sequence[torch.Tensor], scratch: torch.Tensor) -> list[float]:
    """SCE "calculate": ηᵢ = mean(δᵢ²) normalised to sum 1 (uniform when the sum < 1e-6)."""
    energies = [float(torch.mul(d, d, out=scratch).mean()) for d in deltas]
    total = sum(energies)
    if abs(total) < 1e-6:
        return [1.0 / len(deltas)] * len(deltas)
    return [e / total for e in energies]


def _majority_is_positive(deltas: Sequence[torch.Tensor], scratch: torch.Tensor) -> torch.Tensor:
    """TIES "sum" election: the majority sign is + where Σδᵢ ≥ 0 (ties go to +)."""
    total = scratch.copy_(deltas[0])
    for d in deltas[1:]:
        total.add_(d)
    return total >= 0


def _check(name: str, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]],
           base_index: int | None) -> None:
    if math.isnan(params["select_topk"]):
        raise MergeError(f"sce: 'select_topk' is NaN for tensor '{name}'; give the fraction "
                         "of positions to keep (0 to 1)")


@merge_method(
    "sce",
    base=BasePolicy.REQUIRED,
    params=[
        Param("select_topk", float, 1.0,
              doc="fraction of the positions with non-zero variance across models to keep"),
        Param("int8_mask", bool, False, doc="accepted for mergekit compatibility (no effect)"),
    ],
    temp_buffers=3.5,
    reference="https://arxiv.org/abs/2408.07990",
    differences="""
        Float32 arithmetic (mergekit: the input dtype). Ties in variance at the top-k cut
        keep the lowest positions (mergekit's `torch.topk` leaves the choice unspecified).
    """,
    check=_check,
)
def sce(m: MergeInputs) -> torch.Tensor:
    """SCE: keep high-variance positions, weight task vectors by energy, erase sign conflicts.

    From FuseChat: the task vectors δᵢ = xᵢ − base are restricted to the `select_topk`
    fraction of positions where the models disagree most (highest variance), each model gets
    a matrix-level weight ηᵢ ∝ mean(δᵢ²), and entries whose sign disagrees with the sign of
    Σδᵢ are dropped: out = base + Σ ηᵢ·maskᵢ·δᵢ / max(Σ ηᵢ·maskᵢ, 1e-6). No per-model weights.
    `select_topk ≤ 0` (or nothing selected) returns the base.
    """
    base = m.base
    deltas = [x.sub_(base) for x, _ in m.others()]
    fraction = m.params["select_topk"]
    if not deltas or fraction <= 0:
        return base
    if fraction < 1:
        keep = _select_high_variance(deltas, fraction)
        if keep is None:
            return base
        for d in deltas:
            d.mul_(keep)
    numerator = torch.empty_like(base)
    eta = _energy_weights(deltas, scratch=numerator)
    positive = _majority_is_positive(deltas, scratch=numerator)
    numerator.zero_()
    denominator = torch.zeros_like(base)
    for d, w in zip(deltas, eta):
        agrees = torch.where(positive, d > 0, d < 0)  # zeros never agree
        numerator.add_(d.mul_(agrees), alpha=w)
        denominator.add_(agrees, alpha=w)
    return numerator.div_(denominator.clamp_(min=1e-6)).add_(base)

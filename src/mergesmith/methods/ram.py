"""RAM (Reinforced Agent Merging): average each entry over the models that actually changed it."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._torch import torch
from ..errors import MergeError
from .registry import BasePolicy, MergeInputs, Param, merge_method


def _active_deltas(m: MergeInputs, epsilon: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Task vectors δᵢ with their inactive entries (|δᵢ| ≤ ε) zeroed, and the number of
    active models per entry (as a float tensor in the compute dtype)."""
    base = m.base
    count = torch.zeros_like(base)
    scratch = torch.empty_like(base)
    deltas = []
    for x, _ in m.others():
        d = x.sub_(base)
        active = torch.gt(torch.abs(d, out=scratch), epsilon, out=scratch)  # 1.0 or 0.0
        deltas.append(d.mul_(active))  # a float mask: no bool → float copies on the CPU
        count.add_(active)
    return deltas, count


def _merge_active(m: MergeInputs, boost: Callable[[int, int], float] | None = None
                  ) -> torch.Tensor:
    """base + Σᵢ δᵢ·Aᵢ / max(c, 1), where c counts the active models of each entry.

    ``boost(n_shared, n_unique)`` (RAM+): a factor λᵢ per model for the entries only that
    model changed (c = 1), from its counts of active shared and unique entries.
    """
    base = m.base
    epsilon = m.params["epsilon"]
    deltas, count = _active_deltas(m, epsilon)
    if not deltas:
        return base
    unique = count == 1 if boost is not None else None
    share = count.clamp_(min=1).reciprocal_()  # 1/c: each active model's share of an entry
    factor = share if boost is None else torch.empty_like(share)
    merged = None
    for d in deltas:
        if boost is not None:
            active = torch.abs(d, out=factor) > epsilon  # zeroed entries stay inactive
            n_active = int(torch.count_nonzero(active))
            n_unique = int(torch.count_nonzero(active.logical_and_(unique)))
            del active
            factor.copy_(share).masked_fill_(unique, boost(n_active - n_unique, n_unique))
        merged = d.mul_(factor) if merged is None else merged.addcmul_(d, factor)
    return merged.add_(base)


def _unique_boost(n_shared: int, n_unique: int, r: float, alpha: float, epsilon: float) -> float:
    """RAM+ λ = 1 + r·clip(ρ, 0, α) with ρ = n_shared / max(n_unique, ε).

    With no unique entries λ multiplies nothing; returning 1 avoids mergekit's 0/0 for ε ≤ 0.
    """
    if n_unique == 0:
        return 1.0
    rho = n_shared / max(n_unique, epsilon)
    return 1.0 + r * min(max(rho, 0.0), alpha)  # min after max: α < 0 gives α, as torch.clamp


def _check(name: str, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]],
           base_index: int | None) -> None:
    for key in ("epsilon", "r", "alpha"):
        if key in params and math.isnan(params[key]):
            raise MergeError(f"parameter '{key}' is NaN for tensor '{name}'; give a number")


_EPSILON = Param("epsilon", float, 1e-5,
                 doc="a model changes an entry when it differs from the base by more than this")


@merge_method(
    "ram",
    base=BasePolicy.REQUIRED,
    params=[_EPSILON],
    elementwise=True,
    temp_buffers=2.0,
    reference="https://arxiv.org/abs/2601.13572",
    differences="Float32 arithmetic (mergekit: the input dtype).",
    check=_check,
)
def ram(m: MergeInputs) -> torch.Tensor:
    """RAM: base + the mean of the task-vector entries that are active (|xᵢ − base| > epsilon).

    An entry changed by one model takes that model's change in full; one changed by several
    takes the mean of their changes, so changes are not diluted by models that left the entry
    alone. Entries no model changed keep the base value. No per-model weights.
    """
    return _merge_active(m)


@merge_method(
    "ramplus_tl",
    base=BasePolicy.REQUIRED,
    params=[
        Param("r", float, 0.1, doc="strength of the boost of a model's unique entries"),
        Param("alpha", float, 0.2, doc="upper clip of the shared/unique ratio ρ"),
        _EPSILON,
    ],
    temp_buffers=2.5,
    reference="https://arxiv.org/abs/2601.13572",
    differences="""
        Float32 arithmetic (mergekit: the input dtype). With `epsilon: 0`, a model equal to
        the base in a tensor has no entry to boost; mergekit computes its ρ as 0/0 there and
        writes the whole tensor as NaN.
    """,
    check=_check,
)
def ramplus_tl(m: MergeInputs) -> torch.Tensor:
    """RAM+ (tensor-local): RAM, with each model's unique entries scaled by 1 + r·clip(ρ, 0, α).

    ρ is, per model and tensor, the number of its active entries that other models change
    too, divided by the number only it changes: a model whose changes mostly overlap with
    others gets its few unique changes amplified (at most by 1 + r·α).
    """
    p = m.params
    return _merge_active(m, lambda shared, unique: _unique_boost(shared, unique, p["r"],
                                                                 p["alpha"], p["epsilon"]))

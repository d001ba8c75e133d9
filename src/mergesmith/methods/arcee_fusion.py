"""Arcee Fusion: keep only the other model's most important changes to the base."""

from __future__ import annotations

from .._torch import torch
from .registry import BasePolicy, MergeInputs, merge_method


def _row_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) ‖ softmax(q)) of each vector along the last dimension (kept as a size-1
    dimension), with mergekit's +1e-8 smoothing of both distributions."""
    p = torch.softmax(p_logits, dim=-1).add_(1e-8)
    q = torch.softmax(q_logits, dim=-1).add_(1e-8)
    return torch.div(p, q, out=q).log_().mul_(p).sum(dim=-1, keepdim=True)


def _outlier_threshold(values: torch.Tensor) -> torch.Tensor:
    """median + 1.5·(q3 − q1), each quantile q exactly ``sorted[floor(q·(n−1))]``.

    mergekit estimates the quantiles from 10⁶ random samples on larger tensors; exact
    selection (kthvalue) costs no more memory and needs no random numbers.
    """
    flat = values.reshape(-1)
    last = flat.numel() - 1
    q1, median, q3 = (flat.kthvalue(i + 1).values for i in (last // 4, last // 2, 3 * last // 4))
    return median + 1.5 * (q3 - q1)


@merge_method(
    "arcee_fusion",
    base=BasePolicy.REQUIRED,
    min_inputs=2,
    max_inputs=2,
    temp_buffers=4.0,
    reference="https://arcee.ai",
    differences="""
        Float32 arithmetic (mergekit: the input dtype). The quantiles of the threshold are
        exact: mergekit estimates them from 10⁶ random samples on tensors of more than 10⁶
        elements, so its result there depends on the random seed. The result is rounded to
        the output dtype like every other method (mergekit returns float32 whatever the
        input dtype, and writes it as such unless `out_dtype` is set).
    """,
)
def arcee_fusion(m: MergeInputs) -> torch.Tensor:
    """Arcee Fusion: base + (x − base) where the change's importance is an outlier.

    Importance of each element = |x − base| · KL(softmax(x) ‖ softmax(base)) of its row
    (last dimension); changes whose importance is at least median + 1.5·IQR of the tensor's
    importances are kept, all others revert to the base. Exactly the base and one other model.
    """
    base = m.base
    [(other, _)] = m.others()
    kl = _row_kl(other, base)
    diff = other.sub_(base)
    importance = diff.abs().mul_(kl)
    keep = importance >= _outlier_threshold(importance)
    del importance
    return diff.mul_(keep).add_(base)

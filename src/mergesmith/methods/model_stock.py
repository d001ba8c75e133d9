"""Model Stock: move from the base toward the fine-tunes' mean, as far as their agreement says."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence

from .._torch import torch
from .registry import BasePolicy, MergeInputs, Param, TensorStatistic, merge_method
from .spherical import gram_block_rows, gram_piece_rows, row_gram, whole_gram


def _as_rows(x: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """(rows, length) view of a contiguous tensor: one row for the whole tensor, or
    (``filter_wise``) one per vector along the last dimension (a 1-D tensor is one row
    either way)."""
    if filter_wise and x.dim() >= 2:
        return x.view(-1, x.shape[-1])
    return x.view(1, -1)


def _mean_pairwise_cosine(gram: torch.Tensor) -> torch.Tensor:
    """Mean over pairs i < j of the cosine of offsets i and j, from their Gram matrices
    ``[rows, k, k]`` (float64, one per row).

    Norm products are clamped at 1e-6 and each cosine to [−1, 1], as mergekit does.
    """
    k = gram.shape[-1]
    norms = gram.diagonal(dim1=1, dim2=2).sqrt()
    total = torch.zeros(gram.shape[0], dtype=torch.float64, device=gram.device)
    pairs = list(itertools.combinations(range(k), 2))
    for i, j in pairs:
        total += (gram[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
    return total / len(pairs)


def _interpolation_ratio(cos: torch.Tensor, n: int) -> torch.Tensor:
    """Model Stock's t = N·cos / (1 + (N−1)·cos); 0 where the denominator is below 1e-6
    (opposing offsets give no finite estimate: keep the base). Not clamped."""
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))


def _clamp_with_warning(t: torch.Tensor, cos: torch.Tensor, tensor_name: str,
                        rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Clamp t to [0, 1], warning (naming the tensor, and the rows of a chunk) when that
    changes anything."""
    outside = (t < 0) | (t > 1)
    n_out = int(torch.count_nonzero(outside))
    if n_out:
        if t.numel() == 1:
            where = f"t = {float(t):.4g} (mean cosine of the task vectors {float(cos):.4g})"
        else:
            of = f"{t.numel()} rows" if rows is None else f"rows {rows[0]}–{rows[1] - 1}"
            where = (f"t is outside [0, 1] in {n_out} of {of} (t from "
                     f"{float(t.min()):.4g} to {float(t.max()):.4g})")
        warnings.warn(f"model_stock: tensor '{tensor_name}': {where}; clamped t to [0, 1], "
                      "so where the fine-tunes disagree the base is kept (mergekit 0.1.5 does "
                      "not clamp)", stacklevel=2)
    return t.clamp(0.0, 1.0)


def _ratio(gram: torch.Tensor, m: MergeInputs) -> torch.Tensor:
    """t per row of the offsets' Gram matrices (clamped, with a warning)."""
    cos = _mean_pairwise_cosine(gram)
    n = gram.shape[-1]
    return _clamp_with_warning(_interpolation_ratio(cos, n), cos, m.tensor_name, m.rows)


def _offsets(m: MergeInputs) -> list[torch.Tensor]:
    """xᵢ − base, in place."""
    base = m.base
    return [x.sub_(base) for x, _ in m.others()]


def _gram(offsets: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """The offsets' Gram matrices ``[rows, k, k]``: one per row (``filter_wise``), else
    one of the whole tensors."""
    if filter_wise:
        return row_gram([_as_rows(o, True) for o in offsets])
    return whole_gram(offsets)


def _accumulate(state: torch.Tensor | None, block: MergeInputs) -> torch.Tensor | None:
    if block.params["filter_wise"]:
        return None  # per row: every chunk has what it needs (nothing is read here)
    return whole_gram(_offsets(block), state)


def _finish(state: torch.Tensor | None, m: MergeInputs) -> torch.Tensor | None:
    return None if state is None else _ratio(state, m)


MODEL_STOCK_STATISTIC = TensorStatistic(gram_block_rows, _accumulate, _finish,
                                        row_multiple=gram_piece_rows)
"""The whole tensor's t from its offsets' Gram matrix, streamed: then row chunks merge."""


@merge_method(
    "model_stock",
    base=BasePolicy.REQUIRED,
    min_inputs=3,
    params=[Param("filter_wise", bool, False,
                  doc="compute the ratio per row (last dimension) instead of per tensor")],
    statistic=MODEL_STOCK_STATISTIC,
    temp_buffers=1.0,
    seconds_per_gb=1.6,
    reference="https://arxiv.org/abs/2403.19522",
    differences="""
        Float32 arithmetic (mergekit: the input dtype); norms and dot products are summed
        in float64 over fixed pieces of whole rows (at most 2^18 elements; exact products,
        each piece's sums one batched product, the same for any thread count).
        t is clamped to [0, 1], with a
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
    base, filter_wise = m.base, m.params["filter_wise"]
    offsets = _offsets(m)
    n = len(offsets)
    t = m.statistic  # row chunks of a whole-tensor t: from the engine's streamed first pass
    if t is None:
        t = _ratio(_gram(offsets, filter_wise), m)
    merged = offsets[0]
    for o in offsets[1:]:
        merged.add_(o)
    _as_rows(merged, filter_wise).mul_((t / n).to(merged.dtype).unsqueeze(-1))
    return merged.add_(base)

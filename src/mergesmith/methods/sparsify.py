"""Sparsifiers of task vectors (TIES, DARE, Breadcrumbs, DELLA), in place and memory-light.

All of them work on a task vector ``δ`` in place and touch it in flat chunks, so besides
the tensor itself they need only chunk-sized temporaries — even for a 150k × 8k embedding.

Magnitude selections are exact and deterministic: elements are ordered by ``|δ|``
ascending, ties by position (a stable sort), and exactly the documented positions of that
order are kept. The order is never materialised: the boundary values are found by a
sampled bracket plus ``kthvalue`` on the few elements inside it.
"""

from __future__ import annotations

import math

import torch

CHUNK = 1 << 20
"""Elements per chunk. Part of the definition of the random streams (DARE, DELLA)."""


def chunks(v: torch.Tensor, size: int = CHUNK):
    """Consecutive slices of a flat tensor."""
    for start in range(0, v.numel(), size):
        yield v[start:start + size]


def _count(v: torch.Tensor, op, value: float) -> int:
    return sum(int(op(c.abs(), value).sum()) for c in chunks(v))


def kth_smallest_abs(v: torch.Tensor, r: int) -> float:
    """The value at 0-based position ``r`` of ``|v|`` sorted ascending (flat ``v``)."""
    n = v.numel()
    if n <= 4 * CHUNK:
        return float(v.abs().kthvalue(r + 1).values)
    # Bracket the answer with a systematic sample, then select among the bracket only.
    stride = math.ceil(n / 65536)
    sample = v[::stride].abs().sort().values
    ns = sample.numel()
    centre = r / n * ns
    margin = int(0.02 * ns) + 64
    lo_i, hi_i = int(centre) - margin, int(centre) + margin
    lo = float(sample[lo_i]) if lo_i > 0 else -1.0
    hi = float(sample[hi_i]) if hi_i < ns - 1 else math.inf
    below = _count(v, torch.lt, lo)
    inside = torch.cat([c.abs()[(c.abs() >= lo) & (c.abs() <= hi)] for c in chunks(v)])
    if below <= r < below + inside.numel():
        return float(inside.kthvalue(r - below + 1).values)
    return float(v.abs().kthvalue(r + 1).values)  # the sample misled us: exact and slower


def keep_rank_range_(v: torch.Tensor, lo: int, hi: int) -> None:
    """Zero every element of flat ``v`` outside positions ``[lo, hi)`` of the stable
    ascending order of ``|v|``."""
    n = v.numel()
    lo, hi = max(0, lo), min(n, hi)
    if lo >= hi:
        v.zero_()
        return
    if lo == 0 and hi == n:
        return
    t_lo = kth_smallest_abs(v, lo) if lo > 0 else -1.0
    t_hi = kth_smallest_abs(v, hi - 1) if hi < n else math.inf
    # Among elements equal to t_lo, skip the first (lo − #below) in position order; among
    # those equal to t_hi, keep the first (hi − #below).
    skip_lo = lo - _count(v, torch.lt, t_lo) if lo > 0 else 0
    keep_hi = hi - _count(v, torch.lt, t_hi) if hi < n else n
    seen_lo = seen_hi = 0
    for c in chunks(v):
        a = c.abs()
        keep = (a > t_lo) & (a < t_hi)
        if t_lo == t_hi:
            eq = a == t_lo
            rank = torch.cumsum(eq, 0) - 1 + seen_lo
            keep |= eq & (rank >= skip_lo) & (rank < keep_hi)
            seen_lo += int(eq.sum())
        else:
            if lo > 0:
                eq = a == t_lo
                keep |= eq & (torch.cumsum(eq, 0) - 1 + seen_lo >= skip_lo)
                seen_lo += int(eq.sum())
            if hi < n:
                eq = a == t_hi
                keep |= eq & (torch.cumsum(eq, 0) - 1 + seen_hi < keep_hi)
                seen_hi += int(eq.sum())
        c.mul_(keep)


def l1(v: torch.Tensor) -> float:
    """Σ|v| accumulated in float64 over chunks (independent of threads)."""
    return sum(float(c.abs().sum(dtype=torch.float64)) for c in chunks(v))


def rescale_l1_(v: torch.Tensor, before: float) -> None:
    """Scale the pruned ``v`` back to the L1 norm it had before pruning (mergekit's rule:
    skipped when either norm is below 1e-7)."""
    after = l1(v)
    if before >= 1e-7 and after >= 1e-7:
        v.mul_(before / after)


def magnitude_(delta: torch.Tensor, density: float) -> None:
    """TIES: keep the ``max(1, int(density·numel))`` largest ``|δ|`` of the whole tensor."""
    if density >= 1:
        return
    v = delta.view(-1)
    if density <= 0 or v.numel() == 0:
        v.zero_()
        return
    k = max(1, int(density * v.numel()))
    keep_rank_range_(v, v.numel() - k, v.numel())


def magnitude_outliers_(delta: torch.Tensor, density: float, gamma: float) -> None:
    """Breadcrumbs: drop the ``int(γ·numel)`` largest ``|δ|`` (outliers) and the smallest,
    keeping exactly ``int(density·numel)`` elements."""
    if density >= 1:
        return
    v = delta.view(-1)
    n = v.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    keep_rank_range_(v, n_bot, n_bot + target)


def bernoulli_(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> None:
    """DARE: keep each element with probability ``density``."""
    if density >= 1:
        return
    for c in chunks(delta.view(-1)):
        mask = torch.empty_like(c).bernoulli_(max(density, 0.0), generator=generator)
        c.mul_(mask)


def della_magprune_(delta: torch.Tensor, density: float, epsilon: float,
                    generator: torch.Generator | None) -> None:
    """DELLA: per row, keep each element with probability ``density − ε + 2ε·rank``, where
    ``rank`` is its ``|δ|`` rank in the row scaled to [0, 1] (a one-element row: 0.5)."""
    if density >= 1:
        return
    if density <= 0:
        delta.zero_()
        return
    rows = delta.reshape(1, -1) if delta.dim() <= 1 else delta.reshape(delta.shape[0], -1)
    width = rows.shape[1]
    if width == 0:
        return
    per_chunk = max(1, CHUNK // width)
    for start in range(0, rows.shape[0], per_chunk):
        block = rows[start:start + per_chunk]
        order = block.abs().argsort(dim=1, stable=True)
        rank = torch.empty_like(block)
        steps = torch.arange(width, dtype=block.dtype, device=block.device)
        rank.scatter_(1, order, steps.expand_as(block))
        rank = rank / (width - 1) if width > 1 else rank.fill_(0.5)
        probs = rank.mul_(2 * epsilon).add_(density - epsilon)
        block.mul_(torch.bernoulli(probs, generator=generator))

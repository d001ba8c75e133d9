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
from dataclasses import dataclass

import torch

CHUNK = 1 << 18
"""Elements per chunk. Part of the definition of the random streams (DARE, DELLA)."""


def chunks(v: torch.Tensor, size: int = CHUNK):
    """Consecutive slices of a flat tensor."""
    for start in range(0, v.numel(), size):
        yield v[start:start + size]


@dataclass(frozen=True)
class _Boundary:
    """One end of a kept rank range: the value there, how many elements are below it, and
    how many of the elements equal to it (in position order) are kept."""

    value: float
    n_equal: int
    kept_from: int  # equal elements with rank in [kept_from, kept_to) are kept
    kept_to: int

    def mask(self, a: torch.Tensor, seen: int, lower: bool) -> tuple[torch.Tensor, int]:
        """Keep-mask of this side for chunk ``|v| = a``; ``seen`` equal elements came before."""
        t = self.value
        if self.kept_from <= 0 and self.kept_to >= self.n_equal:
            return (a >= t if lower else a <= t), seen
        if self.kept_from >= self.kept_to:
            return (a > t if lower else a < t), seen
        eq = a == t
        count = int(eq.sum())
        strict = a > t if lower else a < t
        if count:
            rank = torch.cumsum(eq, 0).sub_(1 - seen)
            strict |= eq & (rank >= self.kept_from) & (rank < self.kept_to)
        return strict, seen + count


def kth_smallest_abs(v: torch.Tensor, r: int) -> tuple[float, int, int]:
    """The value at 0-based position ``r`` of ``|v|`` sorted ascending (flat ``v``), with the
    number of elements below it and the number equal to it."""
    n = v.numel()
    if n <= 4 * CHUNK:
        a = v.abs()
        value = a.kthvalue(r + 1).values
        return float(value), int((a < value).sum()), int((a == value).sum())
    # Bracket the answer with a systematic sample, then select among the bracket only.
    stride = math.ceil(n / 65536)
    sample = v[::stride].abs().sort().values
    ns = sample.numel()
    centre = r / n * ns
    margin = int(0.02 * ns) + 64
    lo_i, hi_i = int(centre) - margin, int(centre) + margin
    lo = float(sample[lo_i]) if lo_i > 0 else -1.0
    hi = float(sample[hi_i]) if hi_i < ns - 1 else math.inf
    below, parts = 0, []
    for c in chunks(v):
        a = c.abs()
        below += int((a < lo).sum())
        parts.append(a[(a >= lo) & (a <= hi)])
    inside = torch.cat(parts)
    if not below <= r < below + inside.numel():  # the sample misled us: exact and slower
        a = v.abs()
        value = a.kthvalue(r + 1).values
        return float(value), int((a < value).sum()), int((a == value).sum())
    value = inside.kthvalue(r - below + 1).values
    return float(value), below + int((inside < value).sum()), int((inside == value).sum())


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
    lower = upper = None
    if lo > 0:  # of the elements equal to the value at lo, skip those ranked before lo
        value, below, equal = kth_smallest_abs(v, lo)
        lower = _Boundary(value, equal, lo - below, equal)
    if hi < n:  # of those equal to the value at hi − 1, keep those ranked before hi
        value, below, equal = kth_smallest_abs(v, hi - 1)
        upper = _Boundary(value, equal, 0, hi - below)
    seen_lo = seen_hi = 0
    for c in chunks(v):
        a = c.abs()
        keep = None
        if lower is not None:
            keep, seen_lo = lower.mask(a, seen_lo, lower=True)
        if upper is not None:
            m, seen_hi = upper.mask(a, seen_hi, lower=False)
            keep = m if keep is None else keep.logical_and_(m)
        c.mul_(keep)


def l1(v: torch.Tensor) -> float:
    """Σ|v|: per-chunk sums accumulated in float64 (independent of threads)."""
    return sum(float(c.abs().sum()) for c in chunks(v))


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
        keep = torch.rand(c.shape, generator=generator, dtype=c.dtype, device=c.device)
        c.mul_(keep.lt_(density))  # 1.0 where kept, 0.0 where dropped


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

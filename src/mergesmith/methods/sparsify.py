"""Sparsifiers of task vectors (TIES, DARE, Breadcrumbs, DELLA), in place and memory-light.

All of them work on a task vector ``δ`` in place and touch it in flat chunks, so besides
the tensor itself they need only chunk-sized temporaries — even for a 150k × 8k embedding.

Each sparsifier is also available as a *plan*: computed once from the whole task vector, it
remembers only what its decisions depend on (boundary values and counts, the random
generator's state) and replays exactly the same mask chunk by chunk later. Merges use this
to keep only compact per-model summaries instead of every model's float32 task vector.

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


class Mask:
    """A sparsifier's decisions for one task vector, replayable: ``applier()`` returns a
    fresh function that masks consecutive flat chunks (of ``chunk_elements``) in place."""

    def applier(self, generator: torch.Generator | None = None):
        raise NotImplementedError


class _KeepAll(Mask):
    def applier(self, generator=None):
        return lambda c: None


class _DropAll(Mask):
    def applier(self, generator=None):
        return lambda c: c.zero_()


class _RankRange(Mask):
    """Keep positions ``[lo, hi)`` of the stable ascending order of ``|v|``, known by the
    boundary values; equal elements are counted as the chunks pass."""

    def __init__(self, lower: _Boundary | None, upper: _Boundary | None) -> None:
        self.lower, self.upper = lower, upper

    def applier(self, generator=None):
        seen = [0, 0]

        def apply(c: torch.Tensor) -> None:
            a = c.abs()
            keep = None
            if self.lower is not None:
                keep, seen[0] = self.lower.mask(a, seen[0], lower=True)
            if self.upper is not None:
                m, seen[1] = self.upper.mask(a, seen[1], lower=False)
                keep = m if keep is None else keep.logical_and_(m)
            c.mul_(keep)

        return apply


def rank_range_mask(v: torch.Tensor, lo: int, hi: int) -> Mask:
    """The mask keeping positions ``[lo, hi)`` of the stable ascending order of ``|v|``
    (flat ``v`` is only read)."""
    n = v.numel()
    lo, hi = max(0, lo), min(n, hi)
    if lo >= hi:
        return _DropAll()
    if lo == 0 and hi == n:
        return _KeepAll()
    lower = upper = None
    if lo > 0:  # of the elements equal to the value at lo, skip those ranked before lo
        value, below, equal = kth_smallest_abs(v, lo)
        lower = _Boundary(value, equal, lo - below, equal)
    if hi < n:  # of those equal to the value at hi − 1, keep those ranked before hi
        value, below, equal = kth_smallest_abs(v, hi - 1)
        upper = _Boundary(value, equal, 0, hi - below)
    return _RankRange(lower, upper)


class _Random(Mask):
    """A random mask remembers the generator state it starts from. ``applier(g)`` draws
    from the live generator ``g`` (advancing it); ``applier()`` replays from the state."""

    def __init__(self, generator: torch.Generator | None) -> None:
        self.device = generator.device if generator is not None else None
        self.state = generator.get_state() if generator is not None else None

    def _generator(self, live: torch.Generator | None) -> torch.Generator | None:
        if live is not None or self.state is None:
            return live
        g = torch.Generator(device=self.device)
        g.set_state(self.state)
        return g


class _Bernoulli(_Random):
    def __init__(self, density: float, generator: torch.Generator | None) -> None:
        super().__init__(generator)
        self.density = density

    def applier(self, generator=None):
        g = self._generator(generator)

        def apply(c: torch.Tensor) -> None:
            keep = torch.rand(c.shape, generator=g, dtype=c.dtype, device=c.device)
            c.mul_(keep.lt_(self.density))  # 1.0 where kept, 0.0 where dropped

        return apply


class _Della(_Random):
    def __init__(self, density: float, epsilon: float, width: int,
                 generator: torch.Generator | None) -> None:
        super().__init__(generator)
        self.density, self.epsilon, self.width = density, epsilon, width

    def applier(self, generator=None):
        g = self._generator(generator)
        width = self.width

        def apply(c: torch.Tensor) -> None:
            block = c.view(-1, width)
            order = block.abs().argsort(dim=1, stable=True)
            rank = torch.empty_like(block)
            steps = torch.arange(width, dtype=block.dtype, device=block.device)
            rank.scatter_(1, order, steps.expand_as(block))
            rank = rank / (width - 1) if width > 1 else rank.fill_(0.5)
            probs = rank.mul_(2 * self.epsilon).add_(self.density - self.epsilon)
            block.mul_(torch.bernoulli(probs, generator=g))

        return apply


def chunk_elements(mask: Mask | None = None) -> int:
    """Size of the flat chunks a mask is applied to: ``CHUNK``, or whole rows for DELLA."""
    if isinstance(mask, _Della):
        return max(1, CHUNK // mask.width) * mask.width
    return CHUNK


def apply_mask_(delta: torch.Tensor, mask: Mask,
                generator: torch.Generator | None = None) -> None:
    """Apply ``mask`` to the whole ``delta`` in place (random masks draw from ``generator``
    when given, advancing it as the mask's draws do)."""
    apply = mask.applier(generator)
    for c in chunks(delta.reshape(-1), chunk_elements(mask)):
        apply(c)


def l1(v: torch.Tensor) -> float:
    """Σ|v|: per-chunk sums accumulated in float64 (independent of threads)."""
    return sum(float(c.abs().sum()) for c in chunks(v))


def magnitude_mask(delta: torch.Tensor, density: float,
                   generator: torch.Generator | None = None) -> Mask:
    """TIES: keep the ``max(1, int(density·numel))`` largest ``|δ|`` of the whole tensor."""
    v = delta.reshape(-1)
    if density >= 1:
        return _KeepAll()
    if density <= 0 or v.numel() == 0:
        return _DropAll()
    k = max(1, int(density * v.numel()))
    return rank_range_mask(v, v.numel() - k, v.numel())


def magnitude_outliers_mask(delta: torch.Tensor, density: float, gamma: float,
                            generator: torch.Generator | None = None) -> Mask:
    """Breadcrumbs: drop the ``int(γ·numel)`` largest ``|δ|`` (outliers) and the smallest,
    keeping exactly ``int(density·numel)`` elements."""
    if density >= 1:
        return _KeepAll()
    v = delta.reshape(-1)
    n = v.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    return rank_range_mask(v, n_bot, n_bot + target)


def bernoulli_mask(delta: torch.Tensor, density: float,
                   generator: torch.Generator | None) -> Mask:
    """DARE: keep each element with probability ``density``."""
    return _KeepAll() if density >= 1 else _Bernoulli(density, generator)


def della_mask(delta: torch.Tensor, density: float, epsilon: float,
               generator: torch.Generator | None) -> Mask:
    """DELLA: per row, keep each element with probability ``density − ε + 2ε·rank``, where
    ``rank`` is its ``|δ|`` rank in the row scaled to [0, 1] (a one-element row: 0.5)."""
    width = delta.numel() if delta.dim() <= 1 else (delta[0].numel() if delta.shape[0] else 0)
    if density >= 1 or width == 0:
        return _KeepAll()
    if density <= 0:
        return _DropAll()
    return _Della(density, epsilon, width, generator)

"""Sparsifiers of task vectors (TIES, DARE, Breadcrumbs, DELLA), streamed and memory-light.

A sparsifier's decisions for one task vector ``δ`` are made by a :class:`Decider` that is
fed ``δ`` as consecutive flat pieces, in position order, in one or more passes (the engine
streams a large tensor's rows in blocks; a whole tensor is one piece). It ends with a
:class:`Mask` that remembers only what its decisions depend on — boundary values and
per-row tie counts for magnitude selections, packed keep bits for random drops — and
applies exactly the same decisions to any run of positions later, so row chunks of a
tensor are merged exactly as the whole tensor is.

Magnitude selections are exact and deterministic: elements are ordered by ``|δ|``
ascending, ties by position (a stable sort), and exactly the documented positions of that
order are kept. The order is never materialised: a first pass takes a systematic sample to
bracket each boundary, a second counts the elements below the bracket and keeps the few
inside it, where ``kthvalue`` finds the boundary value.

Random drops draw from the per-tensor generator, model after model, in consecutive flat
chunks of ``CHUNK`` elements (DELLA: of whole rows): that chunking is part of the
definition of the random streams.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable

from .._torch import torch
from ..errors import MergeError

CHUNK = 1 << 18
"""Elements per chunk. Part of the definition of the random streams (DARE, DELLA)."""


def chunks(v: torch.Tensor, size: int | None = None):
    """Consecutive slices of a flat tensor (of ``CHUNK`` elements unless told)."""
    size = size or CHUNK
    for start in range(0, v.numel(), size):
        yield v[start:start + size]


@functools.cache
def _bit_weights(device: torch.device) -> torch.Tensor:
    """1, 2, 4, … 128: the value of each bit of a packed byte."""
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


_LITTLE_ENDIAN = sys.byteorder == "little"
# Eight flags (bytes of 0 or 1) read as one little-endian int64 ``Σ bᵢ·2^(8i)``: times
# Σⱼ 2^(7j+7) puts bᵢ at bit 56 + i (each product term is a distinct power of two, so no
# carries; the wrap-around of the product is harmless), and the top byte is the packed byte.
_GATHER = 0x0102040810204080
# One packed byte replicated to eight (times 0x0101…), bit i kept in byte i (_PICK, as the
# signed int64 torch needs), then + 0x7F per byte sets each byte's top bit exactly when its
# bit was set (no carry between bytes); shifted down and masked, each byte is 0 or 1.
_ONE_PER_BYTE = 0x0101010101010101
_PICK = 0x8040201008040201 - (1 << 64)
_ROUND = 0x7F7F7F7F7F7F7F7F


def _pack(keep: torch.Tensor) -> torch.Tensor:
    """Eight booleans per byte, the first in the lowest bit (zero-padded to a multiple
    of eight). With 64-bit integer tricks (a dozen times faster than a per-byte sum)."""
    k = keep.reshape(-1).to(torch.bool).view(torch.uint8)
    if k.numel() % 8 or k.storage_offset() % 8:
        k = torch.cat([k, k.new_zeros(-k.numel() % 8)])
    if not _LITTLE_ENDIAN:
        return k.view(-1, 8).mul(_bit_weights(k.device)).sum(1, dtype=torch.uint8)
    words = k.view(torch.int64)
    return (words * _GATHER).bitwise_right_shift_(56).bitwise_and_(0xFF).to(torch.uint8)


def _unpack(packed: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Flags ``[start, end)`` of what :func:`_pack` packed, as bytes of 0 or 1 (uint8:
    multiplying a float tensor by it is as fast as by floats; bool is not)."""
    first, last = start // 8, (end + 7) // 8
    if not _LITTLE_ENDIAN:
        bits = packed[first:last].unsqueeze(1).bitwise_and(_bit_weights(packed.device)).ne_(0)
        return bits.view(torch.uint8).view(-1)[start - 8 * first:end - 8 * first]
    words = (packed[first:last].to(torch.int64).mul_(_ONE_PER_BYTE).bitwise_and_(_PICK)
             .add_(_ROUND).bitwise_right_shift_(7).bitwise_and_(_ONE_PER_BYTE))
    return words.view(torch.uint8)[start - 8 * first:end - 8 * first]


class _L1:
    """Σ|v| of a flat tensor fed piece by piece: sums of consecutive ``CHUNK``-element
    chunks accumulated in float64, in order — the same number as on the whole tensor."""

    def __init__(self) -> None:
        self.total, self._tail = 0.0, None

    def feed(self, piece: torch.Tensor) -> None:
        if self._tail is not None:
            piece = torch.cat([self._tail, piece])
        full = piece.numel() - piece.numel() % CHUNK
        for c in chunks(piece[:full]):
            self.total += float(c.abs().sum())
        self._tail = piece[full:].clone() if full < piece.numel() else None

    def value(self) -> float:
        if self._tail is not None:
            self.total += float(self._tail.abs().sum())
            self._tail = None
        return self.total


def l1(v: torch.Tensor) -> float:
    """Σ|v|: per-chunk sums accumulated in float64 (independent of threads)."""
    acc = _L1()
    acc.feed(v.reshape(-1))
    return acc.value()


# ------------------------------------------------------------------ masks


class Mask:
    """A sparsifier's decisions for one task vector: ``applier(start)`` returns a function
    that masks, in place, consecutive flat pieces beginning at position ``start`` (a row
    start of the tensor the decisions were made for)."""

    def applier(self, start: int = 0) -> Callable[[torch.Tensor], None]:
        raise NotImplementedError


class _KeepAll(Mask):
    def applier(self, start=0):
        return lambda c: None


class _DropAll(Mask):
    def applier(self, start=0):
        return lambda c: c.zero_()


class _Boundary:
    """One end of a kept rank range: the value there, how many elements equal it, which of
    those (ranks ``[kept_from, kept_to)`` in position order) are kept, and how many equal
    elements come before each row (to start masking at any row)."""

    def __init__(self, value: float, n_equal: int, kept_from: int, kept_to: int,
                 equal_before_row: torch.Tensor | None, width: int) -> None:
        self.value, self.n_equal = value, n_equal
        self.kept_from, self.kept_to = kept_from, kept_to
        self.equal_before_row, self.width = equal_before_row, width

    def seen_at(self, start: int) -> int:
        if start == 0 or self.equal_before_row is None:
            return 0
        assert start % self.width == 0, "masks start at a row"
        return int(self.equal_before_row[start // self.width])

    def mask(self, a: torch.Tensor, seen: int, lower: bool) -> tuple[torch.Tensor, int]:
        """Keep-mask of this side for piece ``|v| = a``; ``seen`` equal elements came before."""
        t = self.value
        if self.kept_from <= 0 and self.kept_to >= self.n_equal:
            return (a >= t if lower else a <= t), seen
        if self.kept_from >= self.kept_to:
            return (a > t if lower else a < t), seen
        eq = a == t
        count = int(torch.count_nonzero(eq))
        if count == 0 or seen + count <= self.kept_from or seen >= self.kept_to:
            return (a > t if lower else a < t), seen + count  # none of these kept
        if seen >= self.kept_from and seen + count <= self.kept_to:
            return (a >= t if lower else a <= t), seen + count  # all of these kept
        strict = a > t if lower else a < t  # the cut falls inside this piece
        rank = torch.cumsum(eq, 0).sub_(1 - seen)
        strict |= eq & (rank >= self.kept_from) & (rank < self.kept_to)
        return strict, seen + count


class _RankRange(Mask):
    """Keep positions ``[lo, hi)`` of the stable ascending order of ``|v|``, known by the
    boundary values; equal elements are counted as the pieces pass."""

    def __init__(self, lower: _Boundary | None, upper: _Boundary | None) -> None:
        self.lower, self.upper = lower, upper

    def applier(self, start=0):
        seen = [self.lower.seen_at(start) if self.lower else 0,
                self.upper.seen_at(start) if self.upper else 0]

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


class _Bits(Mask):
    """Decisions drawn at random, kept as packed bits per chunk of ``grid`` elements."""

    def __init__(self, grid: int, n: int) -> None:
        self.grid, self.decided = grid, 0
        self.parts = torch.empty(-(-n // grid), (grid + 7) // 8, dtype=torch.uint8)

    def add(self, keep: torch.Tensor) -> None:
        """The next chunk's decisions (preallocated: see :class:`_Filling`)."""
        packed = _pack(keep)
        self.parts[self.decided, :packed.numel()] = packed
        self.decided += 1

    def applier(self, start=0):
        pos = [start]

        def apply(c: torch.Tensor) -> None:
            done, n = 0, c.numel()
            while done < n:
                g, off = divmod(pos[0], self.grid)
                take = min(n - done, self.grid - off)
                keep = _unpack(self.parts[g], off, off + take).to(c.device)
                c[done:done + take].mul_(keep)  # × 1 kept, × 0 dropped
                done += take
                pos[0] += take

        return apply


def apply_mask_(delta: torch.Tensor, mask: Mask, start: int = 0) -> None:
    """Apply ``mask`` in place to ``delta``, the run of positions from ``start`` on."""
    apply = mask.applier(start)
    for c in chunks(delta.reshape(-1)):
        apply(c)


# ------------------------------------------------------------------ deciders


class Decider:
    """Makes one task vector's :class:`Mask` (and, with ``rescale``, its L1 norms before
    and after masking) from its flat pieces, fed in position order pass after pass until
    ``done``. ``feed(delta, offset)`` must not change ``delta``."""

    done = False
    draws = False  # draws from the shared generator: deciders of one tensor run in turn
    mask: Mask
    l1_before = l1_after = 0.0

    def feed(self, delta: torch.Tensor, offset: int) -> None:
        raise NotImplementedError

    def end_pass(self) -> None:
        raise NotImplementedError

    def wants_sample(self) -> int:
        """A sampling pass: the stride of the systematic sample it wants (else 0)."""
        return 0

    def feed_sample(self, values: torch.Tensor) -> None:
        raise NotImplementedError


class Fixed(Decider):
    """Decisions known without looking (keep all, drop all)."""

    def __init__(self, mask: Mask) -> None:
        self.mask, self.done = mask, True


class _Filling:
    """Values appended pass by pass into one preallocated buffer (doubled when full).
    Many small long-lived pieces between the passes' large short-lived buffers would
    fragment the heap: measured +400 MB of resident memory on a 32000 × 2048 tensor."""

    def __init__(self, capacity: int, dtype: torch.dtype) -> None:
        self.data = torch.empty(max(1, capacity), dtype=dtype)
        self.size = 0

    def append(self, values: torch.Tensor) -> None:
        end = self.size + values.numel()
        if end > self.data.numel():
            grown = torch.empty(max(end, 2 * self.data.numel()), dtype=self.data.dtype)
            grown[:self.size] = self.data[:self.size]
            self.data = grown
        self.data[self.size:end] = values
        self.size = end

    def values(self) -> torch.Tensor:
        return self.data[:self.size]


class _Select:
    """The value at 0-based rank ``r`` of ``|v|`` ascending, from one pass over the pieces:
    elements below a bracket ``[lo, hi]`` are counted, those inside kept; elements equal to
    an end of the bracket are counted per row (they may be many: ties)."""

    def __init__(self, r: int, rows: int, width: int, lo: float, hi: float,
                 expected: int) -> None:
        self.r, self.rows, self.width, self.lo, self.hi = r, rows, width, lo, hi
        self.below = 0
        self.equal_lo = torch.zeros(rows, dtype=torch.int64)
        self.equal_hi = torch.zeros(rows, dtype=torch.int64)
        self.values = _Filling(expected, torch.float32)
        self.value_rows = _Filling(expected, torch.int32)

    def _count_rows(self, counts: torch.Tensor, where: torch.Tensor, offset: int) -> None:
        """Add the rows' counts of ``where`` (pieces are whole rows)."""
        first = offset // self.width
        per_row = where.view(torch.uint8).view(-1, self.width).sum(1, dtype=torch.int32)
        counts[first:first + per_row.numel()] += per_row.to(counts.device)

    def feed(self, a: torch.Tensor, offset: int) -> None:
        """The magnitudes of whole rows, from position ``offset`` on."""
        assert offset % self.width == 0 and a.numel() % self.width == 0, "whole rows"
        lo, hi = self.lo, self.hi
        self.below += int(torch.count_nonzero(a < lo))
        self._count_rows(self.equal_lo, a == lo, offset)
        if hi != lo:
            self._count_rows(self.equal_hi, a == hi, offset)
            inside = (a > lo).logical_and_(a < hi)
            index = inside.nonzero().view(-1)
            if index.numel():
                self.values.append(a[index])
                self.value_rows.append(index.add_(offset).div_(self.width, rounding_mode="floor"))

    def result(self) -> tuple[float, int, int, torch.Tensor] | None:
        """(value, elements below it, elements equal to it, equal elements before each row
        — ``rows + 1`` running counts), or None when the rank is outside the bracket."""
        r, below = self.r, self.below
        n_lo = int(self.equal_lo.sum())
        values = self.values.values()
        n_in = values.numel()
        n_hi = int(self.equal_hi.sum()) if self.hi != self.lo else 0
        if r < below or r >= below + n_lo + n_in + n_hi:
            return None
        if r < below + n_lo:
            value, equal, per_row = self.lo, n_lo, self.equal_lo
        elif r < below + n_lo + n_in:
            value = float(values.kthvalue(r - below - n_lo + 1).values)
            below += n_lo + int((values < value).sum())
            hits = values == value
            equal = int(hits.sum())
            rows = self.value_rows.values()[hits].to(torch.int64)
            per_row = torch.bincount(rows, minlength=self.rows)
        else:
            value, equal, per_row = self.hi, n_hi, self.equal_hi
            below += n_lo + n_in
        before = torch.zeros(self.rows + 1, dtype=torch.int64)
        torch.cumsum(per_row, 0, out=before[1:])
        return value, below, equal, before


_SAMPLE = 65536
_MARGINS = (0.01, 0.25)
"""Half-widths of the brackets tried, as fractions of the sample (then everything). A
quantile of 65,536 samples is off by at most 0.2 % of the ranks (one standard deviation),
so 1 % almost never misses, and the elements kept inside it — 2 % of the tensor, per cut
and per input, all held until the pass ends — stay small: 4 % cost ~180 MB on a 2 GB
model's embedding with five fine-tunes."""


class _MagnitudeDecider(Decider):
    """Keep positions ``[lo, hi)`` of the stable ascending order of ``|δ|``."""

    def __init__(self, n: int, width: int, lo: int, hi: int, rescale: bool) -> None:
        self.n, self.width, self.rows = n, width, max(1, -(-n // width))
        self.ranks = {"lower": lo if lo > 0 else None, "upper": hi - 1 if hi < n else None}
        self.lo, self.hi, self.rescale = lo, hi, rescale
        self.stride = math.ceil(n / _SAMPLE) if n > CHUNK else 0
        self.sample = _Filling(-(-n // self.stride) if self.stride else 0, torch.float32)
        self.attempt = 0
        self.stage = "sample" if self.stride else "select"
        self._before, self._after = _L1(), _L1()
        self.selects: dict[str, _Select] = {}
        if self.stage == "select":
            self._bracket()

    def wants_sample(self) -> int:
        return self.stride if self.stage == "sample" else 0

    def feed_sample(self, values: torch.Tensor) -> None:
        self.sample.append(values.abs())

    def _bracket(self) -> None:
        sample = self.sample.values().sort().values if self.stride else None
        for side, r in self.ranks.items():
            if r is None:
                continue
            if sample is None or self.attempt >= len(_MARGINS):
                lo, hi, expected = -1.0, math.inf, self.n
            else:
                ns = sample.numel()
                centre = r / self.n * ns
                margin = int(_MARGINS[self.attempt] * ns) + 64
                lo_i, hi_i = int(centre) - margin, int(centre) + margin
                lo = float(sample[lo_i]) if lo_i > 0 else -1.0
                hi = float(sample[hi_i]) if hi_i < ns - 1 else math.inf
                inside = int(torch.count_nonzero((sample > lo) & (sample < hi)))
                expected = min(self.n, inside * self.stride * 5 // 4 + 4096)
            self.selects[side] = _Select(r, self.rows, self.width, lo, hi, expected)

    def feed(self, delta: torch.Tensor, offset: int) -> None:
        if self.stage == "select":
            if self.rescale and self.attempt == 0:
                self._before.feed(delta)
            a = delta.abs()
            for s in self.selects.values():
                s.feed(a, offset)
        elif self.stage == "after":
            masked = delta.clone()
            self._apply(masked)
            self._after.feed(masked)

    def end_pass(self) -> None:
        if self.stage == "sample":
            self.stage = "select"
            self._bracket()
            return
        if self.stage == "select":
            found = {side: s.result() for side, s in self.selects.items()}
            if any(f is None for f in found.values()):
                if self.attempt >= len(_MARGINS):  # the whole range was bracketed: NaN
                    raise MergeError("a task vector has NaN values: their magnitude has no "
                                     "rank, so it cannot be trimmed (check the inputs)")
                self.attempt += 1
                self._bracket()
                return
            self.mask = self._make_mask(found)
            self.sample, self.selects = None, {}
            if self.rescale:
                self.stage, self._apply = "after", self.mask.applier(0)
                return
        else:
            self.l1_before, self.l1_after = self._before.value(), self._after.value()
        self.done = True
        if not self.rescale:
            self.l1_before = self.l1_after = 0.0

    def _make_mask(self, found) -> Mask:
        lower = upper = None
        if "lower" in found:  # of the elements equal to the value at lo, skip those before lo
            value, below, equal, before = found["lower"]
            lower = _Boundary(value, equal, self.lo - below, equal, before, self.width)
        if "upper" in found:  # of those equal to the value at hi − 1, keep those before hi
            value, below, equal, before = found["upper"]
            upper = _Boundary(value, equal, 0, self.hi - below, before, self.width)
        return _RankRange(lower, upper)


class _RandomDecider(Decider):
    """Draws keep decisions chunk by chunk (chunks of ``grid`` elements of the whole
    tensor) and stores them as bits; one pass."""

    draws = True

    def __init__(self, n: int, grid: int, draw: Callable[[torch.Tensor], torch.Tensor],
                 rescale: bool) -> None:
        self.grid, self.draw, self.rescale = grid, draw, rescale
        self.mask = _Bits(grid, n)
        self._tail: torch.Tensor | None = None
        self._before, self._after = _L1(), _L1()

    def feed(self, delta: torch.Tensor, offset: int) -> None:
        if self._tail is not None:
            delta = torch.cat([self._tail, delta])
        full = delta.numel() - delta.numel() % self.grid
        for c in chunks(delta[:full], self.grid):
            self._decide(c)
        self._tail = delta[full:].clone() if full < delta.numel() else None

    def _decide(self, c: torch.Tensor) -> None:
        keep = self.draw(c)  # 1.0 / 0.0 in c's dtype
        self.mask.add(keep.to(torch.bool))
        if self.rescale:
            self._before.feed(c)
            self._after.feed(c * keep)

    def end_pass(self) -> None:
        if self._tail is not None:
            self._decide(self._tail)
            self._tail = None
        if self.rescale:
            self.l1_before, self.l1_after = self._before.value(), self._after.value()
        self.done = True


def _width(shape: tuple[int, ...]) -> int:
    return max(1, math.prod(shape[1:])) if len(shape) > 1 else max(1, math.prod(shape))


def rank_range_decider(shape: tuple[int, ...], lo: int, hi: int,
                       rescale: bool = False) -> Decider:
    """Keep positions ``[lo, hi)`` of the stable ascending order of ``|δ|``."""
    n = math.prod(shape)
    lo, hi = max(0, lo), min(n, hi)
    if lo >= hi:
        return Fixed(_DropAll())
    if lo == 0 and hi == n:
        return Fixed(_KeepAll())
    return _MagnitudeDecider(n, _width(shape), lo, hi, rescale)


def magnitude_decider(shape: tuple[int, ...], density: float, rescale: bool = False) -> Decider:
    """TIES: keep the ``max(1, int(density·numel))`` largest ``|δ|`` of the whole tensor."""
    n = math.prod(shape)
    if density >= 1:
        return Fixed(_KeepAll())
    if density <= 0 or n == 0:
        return Fixed(_DropAll())
    k = max(1, int(density * n))
    return rank_range_decider(shape, n - k, n, rescale)


def outliers_decider(shape: tuple[int, ...], density: float, gamma: float,
                     rescale: bool = False) -> Decider:
    """Breadcrumbs: drop the ``int(γ·numel)`` largest ``|δ|`` (outliers) and the smallest,
    keeping exactly ``int(density·numel)`` elements."""
    if density >= 1:
        return Fixed(_KeepAll())
    n = math.prod(shape)
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    return rank_range_decider(shape, n_bot, n_bot + target, rescale)


def bernoulli_decider(shape: tuple[int, ...], density: float,
                      generator: torch.Generator | None, rescale: bool = False) -> Decider:
    """DARE: keep each element with probability ``density``."""
    if density >= 1:
        return Fixed(_KeepAll())

    def draw(c: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(c.shape, generator=generator, dtype=c.dtype, device=c.device)
        return keep.lt_(density).to(c.dtype)

    return _RandomDecider(math.prod(shape), CHUNK, draw, rescale)


def _stable_row_order(a: torch.Tensor, narrow: "_NarrowKeys | None" = None) -> torch.Tensor:
    """``a.argsort(dim=1, stable=True)`` for float32 ``a ≥ 0`` on the CPU, several times
    as fast: non-negative floats order as their bits, so sorting the keys
    ``bits · 2³² + column`` (all distinct) of each row gives its stable order. With
    ``narrow``, 32-bit keys are tried first (see :class:`_NarrowKeys`). Elsewhere:
    argsort."""
    if a.dtype != torch.float32 or a.device.type != "cpu" or a.shape[1] >= 1 << 31:
        return a.argsort(dim=1, stable=True)
    if narrow is not None and _numpy() is not None and narrow.fits(a.shape[1]):
        order = narrow.order(a)
        if order is not None:
            return order
    return _wide_row_order(a)


def _wide_row_order(a: torch.Tensor) -> torch.Tensor:
    columns = torch.arange(a.shape[1], dtype=torch.int64)
    keys = a.view(torch.int32).to(torch.int64).bitwise_left_shift_(32).bitwise_or_(columns)
    return _sort_rows_of_distinct(keys).bitwise_and_(0xFFFFFFFF)


class _NarrowKeys:
    """Row orders from 32-bit keys, which sort about twice as fast as 64-bit ones.

    A key is ``coarse · 2^c + column`` (``c`` bits for the column), where ``coarse`` keeps
    the top bits of the value's bits above the block's smallest non-zero value (zeros stay
    below everything). Sorting those keys orders the rows by coarse value, then column.
    That is the exact stable order wherever the exact bits come out non-decreasing, which
    is checked; rows where they do not (two values sharing a coarse value out of column
    order) are sorted again with the 64-bit keys, so the result is always exact. Deltas
    of 16-bit models almost always fit. Where most rows had to be sorted again (float32
    deltas that differ only in their low bits), the rest of the tensor skips this path;
    a tensor's first block is probed on a few rows first, so such a tensor pays for
    little more than those.
    """

    WIDTHS = range(257, (1 << 13) + 1)
    """Where it pays (measured): rows of up to 256 elements sort as fast with 64-bit keys
    (numpy sorts such short rows with a sorting network either way), and wider rows than
    8,192 leave too few bits for the value."""
    GIVE_UP = 0.25
    """Share of a block's rows sorted again above which the rest of the tensor uses
    64-bit keys only."""
    PROBE_ROWS = 8

    def __init__(self) -> None:
        self.useful, self.probed = True, False

    def fits(self, width: int) -> bool:
        return self.useful and width in self.WIDTHS

    def order(self, a: torch.Tensor) -> torch.Tensor | None:
        if not self.useful or a.numel() == 0:
            return None
        if not self.probed:
            self.probed = True
            if a.shape[0] > self.PROBE_ROWS:
                self.order(a[:self.PROBE_ROWS])
                if not self.useful:
                    return None
        np = _numpy()
        rows, width = a.shape
        column_bits = max(1, (width - 1).bit_length())
        bits = a.view(torch.int32)
        values = bits.numpy()
        high = int(values.max())
        if high == 0:  # all zero: the stable order is the columns
            return torch.arange(width, dtype=torch.int64).expand(rows, width).clone()
        low = int((values.view(np.uint32) - np.uint32(1)).min()) + 1  # smallest non-zero
        # 1 ≤ coarse < 2^(31 − column_bits) for non-zero values, 0 for zeros: the keys
        # are non-negative int32
        shift = max(0, (high - low).bit_length() - (30 - column_bits))
        keys = values - np.int32(low)
        keys >>= shift
        keys += 1
        np.maximum(keys, 0, out=keys)
        keys <<= column_bits
        keys |= np.arange(width, dtype=np.int32)
        keys.sort(axis=1)
        keys &= (1 << column_bits) - 1
        order = torch.from_numpy(keys).to(torch.int64)
        if shift:
            exact = torch.gather(bits, 1, order).numpy()
            falls = exact[:, 1:] < exact[:, :-1]
            if falls.any():
                wrong = torch.from_numpy(falls.any(axis=1)).nonzero().view(-1)
                order[wrong] = _wide_row_order(a[wrong])
                if wrong.numel() > self.GIVE_UP * rows:
                    self.useful = False
        return order


def _sort_rows_of_distinct(keys: torch.Tensor) -> torch.Tensor:
    """Each row of a 2-D int64 CPU tensor sorted ascending, its values distinct. Distinct
    values have one sorted order, so any algorithm gives the same result: numpy's
    vectorized sort where numpy is installed (6–7 × torch's here: AVX2, one thread),
    else torch's."""
    np = _numpy()
    if np is None:
        return keys.sort(dim=1).values
    return torch.from_numpy(np.sort(keys.numpy(), axis=1))


@functools.cache
def _numpy():
    """numpy if it is installed (mergesmith does not depend on it: only a faster sort)."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def della_decider(shape: tuple[int, ...], density: float, epsilon: float,
                  generator: torch.Generator | None, rescale: bool = False) -> Decider:
    """DELLA: per row, keep each element with probability ``density − ε + 2ε·rank``, where
    ``rank`` is its ``|δ|`` rank in the row scaled to [0, 1] (a one-element row: 0.5)."""
    width = math.prod(shape) if len(shape) <= 1 else (math.prod(shape[1:]) if shape[0] else 0)
    if density >= 1 or width == 0:
        return Fixed(_KeepAll())
    if density <= 0:
        return Fixed(_DropAll())

    narrow = _NarrowKeys()
    by_rank: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def keep_probabilities(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The keep probability of each rank, computed once per dtype and device with the
        same operations as element by element (so the same numbers)."""
        if (dtype, device) not in by_rank:
            rank = torch.arange(width, dtype=dtype, device=device)
            rank = rank / (width - 1) if width > 1 else rank.fill_(0.5)
            by_rank[dtype, device] = rank.mul_(2 * epsilon).add_(density - epsilon)
        return by_rank[dtype, device]

    def draw(c: torch.Tensor) -> torch.Tensor:
        block = c.view(-1, width)
        probs = torch.empty_like(block)
        probs.scatter_(1, _stable_row_order(block.abs(), narrow),
                       keep_probabilities(block.dtype, block.device).expand_as(block))
        # torch.bernoulli(probs) draws one uniform per element and keeps it below p: the
        # same numbers, state and decisions as this, four times slower on the CPU
        keep = torch.rand(probs.shape, generator=generator, dtype=probs.dtype,
                          device=probs.device)
        return keep.lt_(probs).to(probs.dtype).view(-1)

    return _RandomDecider(math.prod(shape), max(1, CHUNK // width) * width, draw, rescale)


def decide(delta: torch.Tensor, decider: Decider) -> Decider:
    """Run ``decider`` over the whole tensor ``delta`` (one piece per pass)."""
    flat = delta.reshape(-1)
    while not decider.done:
        stride = decider.wants_sample()
        if stride:
            decider.feed_sample(flat[::stride])
        else:
            decider.feed(flat, 0)
        decider.end_pass()
    return decider


# The whole-tensor forms (tests, other methods): decide on ``delta``, return the mask.


def rank_range_mask(v: torch.Tensor, lo: int, hi: int) -> Mask:
    """The mask keeping positions ``[lo, hi)`` of the stable ascending order of ``|v|``."""
    return decide(v, rank_range_decider(tuple(v.shape), lo, hi)).mask


def magnitude_mask(delta: torch.Tensor, density: float) -> Mask:
    return decide(delta, magnitude_decider(tuple(delta.shape), density)).mask


def magnitude_outliers_mask(delta: torch.Tensor, density: float, gamma: float) -> Mask:
    return decide(delta, outliers_decider(tuple(delta.shape), density, gamma)).mask


def bernoulli_mask(delta: torch.Tensor, density: float,
                   generator: torch.Generator | None) -> Mask:
    return decide(delta, bernoulli_decider(tuple(delta.shape), density, generator)).mask


def della_mask(delta: torch.Tensor, density: float, epsilon: float,
               generator: torch.Generator | None) -> Mask:
    return decide(delta, della_decider(tuple(delta.shape), density, epsilon, generator)).mask

"""Stored encodings of output tensors: how a tensor the engine computes in floating point
is turned into the bytes of one or more stored tensors (quantized weights and their
scales). A plain output tensor has no encoding: its values are rounded to its dtype.

An encoding is planned like everything else: its stored parts (names, dtypes, shapes) are
known before any data exists, so the layout gives each part its place in the files. The
engine computes the tensor in ``value_dtype``, in work items whose row ranges start at
multiples of ``row_align``; the sink calls ``encode`` on each item's rows and writes every
part's rows at their planned offsets.

Today: :class:`BlockFP8` (the DeepSeek-V3 layout, ``W`` in float8_e4m3fn and
``W_scale_inv``, one float32 scale per block).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Protocol

from ._torch import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


@dataclass(frozen=True)
class Stored:
    """One tensor as it is in the output files: a plain output tensor, or one part of an
    encoded one. ``rows_per_row`` output rows make one stored row (1, or a block of rows
    for block scales); ``offset`` is its place in its file, set by the layout."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    rows_per_row: int = 1
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize

    def byte_range(self, rows: tuple[int, int] | None) -> tuple[int, int]:
        """(offset, length) of the stored bytes of output rows ``rows`` (None: all)."""
        if rows is None:
            return self.offset, self.nbytes
        row_bytes = prod(self.shape[1:]) * self.dtype.itemsize
        first, end = rows[0] // self.rows_per_row, -(-rows[1] // self.rows_per_row)
        return self.offset + first * row_bytes, (end - first) * row_bytes


class Encoding(Protocol):
    """How an output tensor is stored when it is not one tensor of its dtype."""

    value_dtype: torch.dtype  # what the engine computes and hands to ``encode``
    row_align: int  # work items' row ranges start at multiples of this

    def parts(self, name: str, shape: tuple[int, ...]) -> tuple[Stored, ...]:
        """The stored tensors of output tensor ``name`` (not yet placed)."""
        ...

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The stored rows of every part for these output rows (which start at a multiple
        of ``row_align``), contiguous, in the order of ``parts``."""
        ...

    def describe(self) -> str: ...

    @property
    def encode_seconds(self) -> float:
        """Seconds per 10⁹ elements encoded on the reference machine (2 cores), for the
        time estimate."""
        ...


ENCODE_ELEMENTS = 256 * 1024
"""Rows are encoded in pieces of about this many elements (whole block rows): the
temporaries stay small and in the cache."""


@dataclass(frozen=True)
class BlockFP8:
    """Block-scaled FP8: per block of ``block`` (rows, columns), ``scale_inv = amax / 448``
    of the float32 values and ``q = fp8(values / scale_inv)`` (round to nearest even,
    saturating at ±448): the one rounding. The stored value is ``q · scale_inv``. A block
    whose ``amax / 448`` is 0 (all zeros, or values below float32's range) gets scale 1 and
    stores zeros."""

    block: tuple[int, int]
    value_dtype = torch.float32
    encode_seconds = 0.5

    @property
    def row_align(self) -> int:
        return self.block[0]

    def parts(self, name: str, shape: tuple[int, ...]) -> tuple[Stored, ...]:
        b0, b1 = self.block
        grid = (-(-shape[0] // b0), -(-shape[1] // b1))
        return (Stored(name, FP8, shape), Stored(f"{name}_scale_inv", torch.float32, grid, b0))

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b0, b1 = self.block
        n, cols = rows.shape
        q = torch.empty((n, cols), dtype=FP8)
        scales = torch.empty((-(-n // b0), -(-cols // b1)), dtype=torch.float32)
        step = b0 * max(1, ENCODE_ELEMENTS // (b0 * cols))
        for start in range(0, n, step):
            piece = rows[start:start + step].to(torch.float32)
            q_piece, s_piece = quantize_blocks(piece, self.block)
            q[start:start + step].copy_(q_piece)
            scales[start // b0:start // b0 + s_piece.shape[0]].copy_(s_piece)
        return q, scales

    def describe(self) -> str:
        return f"FP8 block-scaled {list(self.block)}"


def quantize_blocks(x: torch.Tensor, block: tuple[int, int]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled FP8 of a float32 matrix (see :class:`BlockFP8`); edge blocks are padded
    with zeros, which change no block's amax."""
    b0, b1 = block
    n, cols = x.shape
    pad_rows, pad_cols = -n % b0, -cols % b1
    if pad_rows or pad_cols:
        x = torch.nn.functional.pad(x, (0, pad_cols, 0, pad_rows))
    blocks = x.view(x.shape[0] // b0, b0, x.shape[1] // b1, b1)
    scales = blocks.abs().amax(dim=(1, 3)).div_(FP8_MAX)
    scales.masked_fill_(scales == 0, 1.0)
    q = (blocks / scales[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(x.shape)[:n, :cols], scales

"""Quantized checkpoints as inputs: each quantized weight is indexed as the tensor it
dequantizes to, and read (rows at a time) through the source of its format; the engine
and the methods only see floating-point tensors.

Today:
* block-scaled FP8 (the DeepSeek-V3 / Qwen3-FP8 layout): ``W`` in ``float8_e4m3fn`` with
  ``W_scale_inv`` (float32, one per ``weight_block_size`` block, from config.json's
  ``quantization_config`` with ``quant_method: fp8``); the value is ``W · scale_inv`` of
  its block;
* compressed-tensors FP8 (``quant_method: compressed-tensors``, ``format:
  float-quantized``): ``W`` with ``W_weight_scale`` per tensor (one value) or per output
  channel (``[rows, 1]``); the value is ``W · scale`` (the library's ``dequantize`` for
  symmetric float quantization). Activation scales (``input_scale``) describe inference,
  not weights, and are left out of the merged model;
* MXFP4 (``quant_method: mxfp4``, the gpt-oss layout): ``P_blocks`` (uint8 ``[experts,
  rows, groups, 16]``, two e2m1 codes a byte, low nibble first, 32 values a group) with
  ``P_scales`` (uint8 e8m0 exponents ``[experts, rows, groups]``, the group's factor
  ``2^(s-127)``) are the tensor ``P`` of shape ``[experts, groups·32, rows]``: transposed,
  as transformers dequantizes them for gpt-oss's ``experts.gate_up_proj`` and
  ``experts.down_proj``. Other tensors (``modules_to_not_convert``) are stored as they are.
All computed in float32 (exactly, for MXFP4: an e2m1 value times a power of two).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from .._torch import torch
from ..errors import MergeError
from .index import TensorInfo

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2")
                   if hasattr(torch, n))


def fp8_as_float16(q: torch.Tensor) -> torch.Tensor:
    """FP8 values as float16, exactly, divided by ``FP8_FACTOR[q.dtype]``: the bits are moved
    instead of converted (torch's own float8 cast is several times slower on CPUs, and
    this is the hot loop of a quantized merge). e5m2 is the top byte of a float16; e4m3fn's
    exponent and mantissa fit float16's with a bias 8 lower, and its one NaN code is kept."""
    x = q.view(torch.uint8).to(torch.int16)
    if q.dtype == torch.float8_e5m2:
        return (x << 8).view(torch.float16)
    low = x & 0x7F
    half = ((x & 0x80) << 8).bitwise_or_(low << 7).view(torch.float16)
    nan = low == 0x7F
    return half.masked_fill_(nan, float("nan")) if bool(nan.any()) else half


FP8_FACTOR = {dtype: (1.0 if dtype == getattr(torch, "float8_e5m2", None) else 256.0)
              for dtype in FP8_DTYPES}
"""What ``fp8_as_float16`` divides the values by; the readers fold it into the scales."""


@dataclass(frozen=True)
class ScaledFP8:
    """How one compressed-tensors FP8 weight is stored."""

    weight: TensorInfo  # float8, [rows, cols]
    scale: TensorInfo  # float32, one value or [rows, 1]
    format = "fp8-scaled"
    decode_seconds = 0.7
    """Seconds per 10⁹ elements decoded, on the reference machine (2 cores; bench/README)."""

    @property
    def stored_offset(self) -> int:
        """Where its data starts in the file (inputs are read in file order)."""
        return self.weight.offset or 0


@dataclass(frozen=True)
class BlockFP8:
    """How one block-scaled FP8 weight is stored."""

    weight: TensorInfo  # float8, [rows, cols]
    scale: TensorInfo  # float32, [ceil(rows / block[0]), ceil(cols / block[1])]
    block: tuple[int, int]
    format = "fp8-block"
    decode_seconds = 0.7
    """Seconds per 10⁹ elements decoded, on the reference machine (2 cores; bench/README)."""

    @property
    def stored_offset(self) -> int:
        """Where its data starts in the file (inputs are read in file order)."""
        return self.weight.offset or 0


def fold_quantized(tensors: dict[str, TensorInfo], config: dict[str, Any] | None,
                   folder: str) -> dict[str, TensorInfo]:
    """The index of a quantized checkpoint as the tensors it stands for: each quantized
    weight becomes one entry (its scales folded in); checks the layout against the
    config before any data is read."""
    q = (config or {}).get("quantization_config")
    if not isinstance(q, dict):
        if any(t.dtype in FP8_DTYPES for t in tensors.values()):
            raise MergeError(f"{folder}: FP8 weights but config.json has no "
                             "'quantization_config'; the scales cannot be applied")
        return tensors
    method = q.get("quant_method")
    if method == "compressed-tensors":
        return _fold_compressed_tensors(tensors, q, config, folder)
    if method == "mxfp4":
        return _fold_mxfp4(tensors, config)
    if method != "fp8":
        raise MergeError(f"{folder}: config.json quantization_config.quant_method '{method}' "
                         "is not supported; mergesmith reads block-scaled FP8 ('fp8', the "
                         "DeepSeek-V3 / Qwen3-FP8 layout), compressed-tensors FP8 and MXFP4 "
                         "('mxfp4', the gpt-oss layout) — dequantize other formats first")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and b > 0 for b in block)):
        raise MergeError(f"{folder}: quantization_config.weight_block_size must be two "
                         f"positive integers (got {block!r}); per-tensor FP8 is not supported")
    target = _dequantized_dtype(config)
    out: dict[str, TensorInfo] = {}
    used = set()
    for name, info in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if info.dtype not in FP8_DTYPES:
            out[name] = info
            continue
        scale = _scale_of(tensors, info, "_scale_inv")
        if len(info.shape) != 2:
            raise MergeError(f"{info.file}: FP8 tensor '{name}' has shape {list(info.shape)}; "
                             "block scales apply to matrices")
        want = tuple(-(-n // b) for n, b in zip(info.shape, block))
        if scale.shape != want or scale.dtype != torch.float32:
            raise MergeError(f"{scale.file}: '{scale.name}' is {str(scale.dtype)[6:]} "
                             f"{list(scale.shape)}; blocks of {block} over {list(info.shape)} "
                             f"need float32 {list(want)}")
        used.add(scale.name)
        out[name] = TensorInfo(name, info.file, target, info.shape, None,
                               info.nbytes + scale.nbytes,
                               BlockFP8(info, scale, (block[0], block[1])))
    orphans = [n for n in tensors if n.endswith("_scale_inv") and n not in used]
    if orphans:
        raise MergeError(f"{folder}: scales without an FP8 weight: {', '.join(orphans[:3])}")
    return out


def _fold_compressed_tensors(tensors: dict[str, TensorInfo], q: dict[str, Any],
                             config: dict[str, Any] | None,
                             folder: str) -> dict[str, TensorInfo]:
    fmt = q.get("format")
    if fmt != "float-quantized":
        raise MergeError(f"{folder}: compressed-tensors format '{fmt}' is not supported; "
                         "mergesmith reads 'float-quantized' (FP8) checkpoints")
    target = _dequantized_dtype(config)
    out: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        if name.endswith("weight_zero_point"):
            raise MergeError(f"{info.file}: '{name}': asymmetric FP8 (a zero point) is not "
                             "supported")
        if name.endswith(("weight_scale", "input_scale", "output_scale")):
            continue  # weight scales are folded in below; activation scales are dropped
        if info.dtype not in FP8_DTYPES:
            out[name] = info
            continue
        scale = _scale_of(tensors, info, "_scale")
        rows = info.shape[0] if info.shape else 1
        if len(info.shape) != 2 or scale.dtype != torch.float32 or \
                scale.shape not in ((), (1,), (rows, 1)):
            raise MergeError(f"{scale.file}: '{scale.name}' is {str(scale.dtype)[6:]} "
                             f"{list(scale.shape)}: mergesmith reads per-tensor ([1]) and "
                             f"per-channel ([{rows}, 1]) float32 scales of FP8 matrices")
        out[name] = TensorInfo(name, info.file, target, info.shape, None,
                               info.nbytes + scale.nbytes, ScaledFP8(info, scale))
    return out


@dataclass(frozen=True)
class MXFP4:
    """How one MXFP4 tensor is stored (gpt-oss experts)."""

    blocks: TensorInfo  # uint8 [experts, rows, groups, 16]
    scales: TensorInfo  # uint8 [experts, rows, groups]
    format = "mxfp4"
    decode_seconds = 0.7
    """Seconds per 10⁹ elements decoded, on the reference machine (2 cores)."""

    @property
    def stored_offset(self) -> int:
        """Where its data starts in the file (inputs are read in file order)."""
        return self.blocks.offset or 0


def _fold_mxfp4(tensors: dict[str, TensorInfo],
                config: dict[str, Any] | None) -> dict[str, TensorInfo]:
    """Each ``P_blocks`` + ``P_scales`` pair becomes ``P``, named and shaped as transformers
    loads it: the last two dims of the stored matrices swapped (gpt-oss multiplies
    ``x @ W[expert]``), so dim 0 stays the expert and a range of it is a stored slice."""
    target = _dequantized_dtype(config)
    out: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        if name.endswith("_scales"):
            if f"{name[:-7]}_blocks" not in tensors:
                raise MergeError(f"{info.file}: MXFP4 scales '{name}' have no "
                                 f"'{name[:-7]}_blocks'; the checkpoint is incomplete")
            continue
        if not name.endswith("_blocks"):
            out[name] = info
            continue
        stem = name[:-7]
        scales = tensors.get(f"{stem}_scales")
        if scales is None:
            raise MergeError(f"{info.file}: MXFP4 tensor '{name}' has no '{stem}_scales'; "
                             "the checkpoint is incomplete")
        for t in (info, scales):
            if t.dtype != torch.uint8:
                raise MergeError(f"{t.file}: MXFP4 tensor '{t.name}' is "
                                 f"{str(t.dtype)[6:]}; blocks and scales are stored as uint8")
        if len(info.shape) != 4 or info.shape[-1] != 16:
            raise MergeError(f"{info.file}: MXFP4 tensor '{name}' has shape "
                             f"{list(info.shape)}; mergesmith reads gpt-oss expert blocks "
                             "[experts, rows, groups, 16]")
        if scales.shape != info.shape[:-1]:
            raise MergeError(f"{scales.file}: '{scales.name}' has shape {list(scales.shape)}; "
                             f"MXFP4 blocks {list(info.shape)} need scales "
                             f"{list(info.shape[:-1])}")
        if stem in tensors:
            raise MergeError(f"{info.file}: '{stem}' is stored both as it is and as MXFP4 "
                             "blocks; the checkpoint is inconsistent")
        experts, rows, groups, _ = info.shape
        out[stem] = TensorInfo(stem, info.file, target, (experts, groups * 32, rows), None,
                               info.nbytes + scales.nbytes, MXFP4(info, scales))
    return out


def _scale_of(tensors: dict[str, TensorInfo], info: TensorInfo, suffix: str) -> TensorInfo:
    """The scale tensor stored next to an FP8 weight (``<name><suffix>``), or an error."""
    scale = tensors.get(f"{info.name}{suffix}")
    if scale is None:
        raise MergeError(f"{info.file}: FP8 tensor '{info.name}' has no '{info.name}{suffix}'; "
                         "the checkpoint is incomplete")
    return scale


def _dequantized_dtype(config: dict[str, Any] | None) -> torch.dtype:
    """The dtype the model is meant to run in (config.json's), else bfloat16."""
    name = str((config or {}).get("torch_dtype") or (config or {}).get("dtype") or "")
    return {"float32": torch.float32, "float16": torch.float16}.get(name, torch.bfloat16)


DECODE_ELEMENTS = 256 * 1024
"""Quantized weights are decoded in pieces of about this many elements (whole block rows)."""


class BlockFP8Source:
    """Reads rows of block-scaled FP8 weights, dequantized to float32: the FP8 rows of the
    blocks they touch and those blocks' scales, nothing else."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw  # reads the stored tensors (a SafetensorsSource)

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None,
             round_to: torch.dtype | None = None) -> torch.Tensor:
        q: BlockFP8 = info.quant
        n_rows, n_cols = info.shape
        r0, r1 = rows if rows is not None else (0, n_rows)
        b0, b1 = q.block
        first, last = r0 // b0, -(-r1 // b0)
        start, end = first * b0, min(last * b0, n_rows)
        s = self.raw.read(q.scale, (first, last)).mul_(FP8_FACTOR[q.weight.dtype])
        target = round_to if round_to in (torch.bfloat16, torch.float16) else torch.float32
        out = torch.empty((end - start, n_cols), dtype=target)
        step = b0 * max(1, DECODE_ELEMENTS // (b0 * n_cols))  # whole block rows
        work = None if target == torch.float32 else \
            torch.empty((min(step, end - start), n_cols), dtype=torch.float32)
        for i in range(0, end - start, step):  # cache-sized pieces: few temporaries
            rows_here = min(step, end - start - i)
            # the stored bytes too are read piece by piece: no copy of the FP8 rows is held
            w = self.raw.read(q.weight, (start + i, start + i + rows_here))
            piece = out[i:i + step] if work is None else work[:rows_here]
            piece.copy_(fp8_as_float16(w))
            scales = s[i // b0:(i + step) // b0 + 1]
            if rows_here % b0 == 0 and n_cols % b1 == 0:  # blocks tile it: scale a view
                piece.view(rows_here // b0, b0, n_cols // b1, b1).mul_(
                    scales[:rows_here // b0, None, :, None])
            else:  # edge blocks
                piece.mul_(scales.repeat_interleave(b0, 0)[:rows_here]
                           .repeat_interleave(b1, 1)[:, :n_cols])
            if work is not None:
                out[i:i + rows_here].copy_(piece)  # the rounding the caller asked for
        return out[r0 - start:r1 - start]

    def close(self) -> None:
        pass  # the raw source is closed by its owner


class ScaledFP8Source:
    """Reads rows of compressed-tensors FP8 weights, dequantized to float32."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None,
             round_to: torch.dtype | None = None) -> torch.Tensor:
        q: ScaledFP8 = info.quant
        w = self.raw.read(q.weight, rows)
        per_channel = len(q.scale.shape) == 2
        scale = self.raw.read(q.scale, rows if per_channel else None).reshape(
            (-1, 1) if per_channel else ()).mul(FP8_FACTOR[w.dtype])
        values = fp8_as_float16(w).to(torch.float32).mul_(scale)
        return values if round_to is None else values.to(round_to)

    def close(self) -> None:
        pass


@functools.cache
def mxfp4_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """The lookups of MXFP4 decoding (built on first use: ``check`` plans without torch).

    * The two E2M1 values of each byte of a block (low nibble first), each pair as one
      8-byte item: the lookup of a byte is then one 1-D ``index_select`` (4x faster than
      selecting rows of two).
    * The factor of each e8m0 scale, ``2^(s-127)``, exact in float32 (2^-127 is subnormal)
      but for 255: 2^128 is past float32, so it is 2^127 here and the reader doubles its
      values after, as ``ldexp`` (transformers' decoder) does: 0.5 · 2^128 is finite, 0
      stays 0.
    """
    e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                         -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    pairs = torch.stack([e2m1.repeat(16), e2m1.repeat_interleave(16)], 1).contiguous()
    e8m0 = torch.pow(2.0, torch.arange(256, dtype=torch.float64).clamp(max=254) - 127).float()
    return pairs.view(torch.int64).reshape(256), e8m0


class MXFP4Source:
    """Reads experts of MXFP4 tensors, dequantized to float32: the stored bytes of those
    experts only, decoded a few stored rows at a time and written transposed into place."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None,
             round_to: torch.dtype | None = None) -> torch.Tensor:
        q: MXFP4 = info.quant
        e0, e1 = rows if rows is not None else (0, info.shape[0])
        blocks = self.raw.read(q.blocks, (e0, e1))
        factors = self.raw.read(q.scales, (e0, e1))
        _, n_rows, groups, _ = blocks.shape
        n_cols = groups * 32
        target = round_to if round_to in (torch.bfloat16, torch.float16) else torch.float32
        out = torch.empty((e1 - e0, n_cols, n_rows), dtype=target)
        step = max(1, DECODE_ELEMENTS // n_cols)  # stored rows a piece
        work = torch.empty((min(step, n_rows), n_cols), dtype=torch.float32)
        pairs, scale_factors = mxfp4_tables()
        for e in range(e1 - e0):
            for r in range(0, n_rows, step):
                piece = work[:min(step, n_rows - r)]
                codes = blocks[e, r:r + step].reshape(-1).to(torch.int32)
                torch.index_select(pairs, 0, codes, out=piece.view(torch.int64)
                                   .view(-1))
                exps = factors[e, r:r + step]
                groups_of = piece.view(-1, groups, 32)
                groups_of.mul_(scale_factors[exps.to(torch.int64)].unsqueeze(-1))
                if bool((exps == 255).any()):  # the rest of 2^128
                    groups_of[exps == 255] *= 2
                out[e, :, r:r + piece.shape[0]].copy_(piece.T)
        return out

    def close(self) -> None:
        pass

"""Byte sizes and dtype names as users write them."""

from __future__ import annotations

import re

from ._torch import torch
from .errors import MergeError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(text: str | int, what: str = "size") -> int:
    """Parse ``500M``, ``2GB``, ``1.5G``, ``300K``, ``4GiB`` or a plain byte count.

    Suffixes are decimal (``2GB`` = 2·10⁹ bytes); ``KiB``/``MiB``/``GiB`` are binary. A ``B``
    straight after the number (``1B``, ``5b``) is refused: mergekit-yaml writes billions
    that way, so it would silently mean bytes here (see :func:`parse_mergekit_size`).
    """
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise MergeError(f"invalid {what} '{text}': write a number of bytes with an optional "
                         "suffix, e.g. 500M, 2GB, 1.5G, 4GiB")
    number, unit, binary, b = m.groups()
    if b and not unit and not binary:
        raise MergeError(_billions_message(str(text).strip(), number, what))
    base = 1024 if binary else 1000
    return int(float(number) * base ** _POWERS[unit.lower()])


def _billions_message(text: str, number: str, what: str) -> str:
    gb = f"{number}GB"
    if what != "--out-shard-size":
        return (f"{what} '{text}' is ambiguous (bytes, or billions as in mergekit?): write "
                f"{what} {gb} for {format_bytes(float(number) * 1e9)}, or a plain number of "
                "bytes")
    return (f"{what} '{text}' is mergekit's spelling of {format_bytes(float(number) * 1e9)} "
            "(B = billion; its help says parameters, but it counts bytes); mergesmith run "
            f"reads B as bytes: write {what} {gb}, or use 'mergesmith mergekit-yaml', which "
            "takes mergekit's spelling")


_MERGEKIT_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmb]?)\s*$", re.IGNORECASE)
_MERGEKIT_POWERS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}


def parse_mergekit_size(text: str | int, what: str = "--out-shard-size") -> int:
    """mergekit-yaml's ``--out-shard-size``: a whole number with an optional ``K``, ``M`` or
    ``B`` suffix (thousand, million, billion), as mergekit 0.1.5's ``parse_kmb`` reads it.

    mergekit's help calls it a number of parameters, but its writer compares the value with
    each shard's size in *bytes* (``numel · element_size``), so ``1B`` gives files of at most
    10⁹ bytes; the value is returned as bytes to give the same files. Other byte sizes
    (``2GB``, ``4GiB``, ``1.5G``) are accepted as :func:`parse_size` reads them.
    """
    if isinstance(text, int):
        return text
    m = _MERGEKIT_SIZE_RE.match(str(text))
    if m:
        return int(m.group(1)) * _MERGEKIT_POWERS[m.group(2).lower()]
    m = _SIZE_RE.match(str(text))
    if m and m.group(4) and not m.group(2) and not m.group(3):  # 1.5B: billions
        return int(float(m.group(1)) * 10**9)
    if not m:
        raise MergeError(f"invalid {what} '{text}': write a number with an optional K, M or "
                         "B suffix (thousand, million, billion bytes), e.g. 1B, 500M, or a "
                         "byte size such as 2GB")
    return parse_size(text, what)


def format_bytes(n: float) -> str:
    """Human-readable decimal size: ``1.23 GB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "f64": torch.float64, "double": torch.float64,
}

CANONICAL_DTYPE_NAME = {torch.float32: "float32", torch.float16: "float16",
                        torch.bfloat16: "bfloat16", torch.float64: "float64"}


OUTPUT_ONLY_DTYPES: dict[str, torch.dtype] = {"float8_e4m3fn": torch.float8_e4m3fn,
                                              "fp8": torch.float8_e4m3fn}
"""Dtypes a recipe's ``out_dtype`` may name but nothing computes in: block-scaled FP8, a
stored encoding (``mergesmith.encodings``)."""

GGUF_QUANT_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
"""``out_dtype`` names of GGUF block quantizations (a ``.gguf`` output only); GGUF's f32,
f16 and bf16 are the dtypes of those names."""


def parse_dtype(name: str, where: str = "dtype", *, output: bool = False) -> torch.dtype:
    """Map a dtype name (``bfloat16``, ``torch.float16``, ``bf16`` ...) to a torch dtype;
    with ``output``, also the output-only ones (``float8_e4m3fn``, ``fp8``)."""
    key = str(name).strip().lower()
    if key.startswith("torch."):
        key = key[len("torch."):]
    if output and key in OUTPUT_ONLY_DTYPES:
        return OUTPUT_ONLY_DTYPES[key]
    if key not in DTYPE_NAMES:
        also = (", float8_e4m3fn (fp8), or for a .gguf output q8_0, q4_0, q4_1, q5_0, q5_1"
                if output else "")
        hint = (" float8_e4m3fn is an output format: set it as out_dtype"
                if key in OUTPUT_ONLY_DTYPES else _suggest(key))
        raise MergeError(f"{where}: unknown dtype '{name}'. Use one of float32, float16, "
                         f"bfloat16, float64{also} (aliases fp32, fp16, bf16, fp64)." + hint)
    return DTYPE_NAMES[key]


def _suggest(key: str) -> str:
    from .errors import did_you_mean

    return did_you_mean(key, DTYPE_NAMES)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"`` (the spelling config.json uses)."""
    return CANONICAL_DTYPE_NAME.get(dtype, str(dtype).removeprefix("torch."))

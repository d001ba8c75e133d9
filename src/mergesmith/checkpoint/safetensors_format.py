"""The safetensors file layout: header parsing with strict checks, and header building.

We parse headers ourselves (8-byte little-endian length + JSON) because the planner needs
every tensor's byte offset to read in file order and the writer needs to lay out headers
before any tensor exists; the format is small and fully specified.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from math import prod

from .._torch import torch
from ..errors import MergeError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        ST_TO_TORCH[_name] = getattr(torch, _attr)
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors file: absolute byte offset of its data in the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: str) -> tuple[list[HeaderEntry], dict[str, str]]:
    """Read and validate the header of a safetensors file (no tensor data is read).

    Raises :class:`MergeError` naming the file for truncated files, malformed or oversized
    headers, unknown dtypes and tensors whose data would run past the end of the file.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MergeError(f"{path}: not a safetensors file (only {size} bytes; "
                                 "the file is truncated or empty — download it again)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise MergeError(f"{path}: corrupt safetensors header (declared length {n} "
                                 f"bytes, file has {size}); the file is truncated or not "
                                 "safetensors — download it again")
            raw = f.read(n)
    except OSError as e:
        raise MergeError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergeError(f"{path}: corrupt safetensors header (not valid JSON: {e}); "
                         "download the file again") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    entries = []
    for name, info in header.items():
        entries.append(_entry(path, name, info, data_start, size))
    entries.sort(key=lambda e: e.offset)
    for prev, cur in zip(entries, entries[1:]):
        if cur.offset < prev.offset + prev.nbytes:
            raise MergeError(f"{path}: corrupt safetensors header (tensors '{prev.name}' and "
                             f"'{cur.name}' overlap)")
    return entries, metadata if isinstance(metadata, dict) else {}


def _entry(path: str, name: str, info: object, data_start: int, size: int) -> HeaderEntry:
    bad = f"{path}: corrupt safetensors header entry for '{name}'"
    if not isinstance(info, dict):
        raise MergeError(f"{bad} (not an object)")
    st_dtype = info.get("dtype")
    if not isinstance(st_dtype, str) or st_dtype not in ST_TO_TORCH:
        raise MergeError(f"{path}: tensor '{name}' has dtype {st_dtype!r}, which mergesmith "
                         f"cannot read (supported: {', '.join(ST_TO_TORCH)})")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)):
        raise MergeError(f"{bad} (shape or data_offsets malformed)")
    dtype = ST_TO_TORCH[st_dtype]
    begin, end = offsets
    expected = prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise MergeError(f"{bad} (shape {shape} needs {expected} bytes, offsets give "
                         f"{end - begin})")
    if data_start + end > size:
        raise MergeError(f"{path}: tensor '{name}' runs past the end of the file (needs "
                         f"{data_start + end} bytes, file has {size}); the file is truncated — "
                         "download it again")
    return HeaderEntry(name, dtype, tuple(shape), data_start + begin, expected)


def build_header(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """Lay out a safetensors file for tensors given in storage order.

    Returns the header bytes (length prefix included, padded to 8 bytes) and each tensor's
    offset relative to the start of the data section.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offsets, pos = [], 0
    for name, dtype, shape in tensors:
        nbytes = prod(shape) * dtype.itemsize
        header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape),
                        "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-(8 + len(body)) % 8)
    return struct.pack("<Q", len(body)) + body, offsets

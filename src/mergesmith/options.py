"""The options of a merge, in one object from the command line and the API to the engine.

Every field that can change the bytes written is part of the fingerprint an interrupted
merge is resumed against (``--resume`` refuses a run whose fingerprint differs); a field
that cannot says so with ``metadata={"fingerprint": False}``. A new option is therefore
covered by ``--resume`` unless it is declared harmless.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ._torch import torch
from .errors import MergeError
from .units import parse_dtype, parse_size

DEFAULT_SHARD_SIZE = 5_000_000_000

_SAME_BYTES = {"fingerprint": False}
"""Metadata of options that never change the output bytes."""


@dataclass(frozen=True, kw_only=True)
class Options:
    """How to run a merge (the recipe says what to merge)."""

    # -- what decides the bytes ------------------------------------------------
    seed: int | None = None
    """Seed of random methods; None: the recipe's ``seed:`` (else 0)."""
    compute_dtype: torch.dtype = torch.float32
    out_shard_size: int = DEFAULT_SHARD_SIZE
    allow_crimes: bool = False
    unsafe_truncate_embeddings: bool = False
    fp8_block_size: tuple[int, int] | None = None
    """Block of ``out_dtype: float8_e4m3fn`` (rows, columns); None: the FP8 inputs', else
    128×128."""
    out_format: str | None = field(default=None, metadata={"fingerprint": False})
    """``safetensors`` (a model folder) or ``gguf`` (one file); None: ``gguf`` for an
    output path ending in ``.gguf``, else ``safetensors``. (Not in the options' part of
    the resume fingerprint: the planned files and encodings, which it decides, are.)"""

    # -- how the work is done (same bytes) ---------------------------------------
    threads: int | None = field(default=None, metadata=_SAME_BYTES)
    """Worker threads (None: the CPU count)."""
    device: str = field(default="cpu", metadata=_SAME_BYTES)
    memory_limit: int | None = field(default=None, metadata=_SAME_BYTES)
    """Bytes the whole process may use. It changes the row-chunk size, which the resume
    fingerprint covers separately (a resume under another limit works when the chunks are
    the same)."""
    strict_finite: bool = field(default=False, metadata=_SAME_BYTES)
    strict: bool = field(default=False, metadata=_SAME_BYTES)
    """Warnings (e.g. recipe keys or parameters that have no effect) are errors."""
    overwrite: bool = field(default=False, metadata=_SAME_BYTES)
    resume: bool = field(default=False, metadata=_SAME_BYTES)
    evaluate: bool = field(default=True, metadata=_SAME_BYTES)
    ray: str | None = field(default=None, metadata=_SAME_BYTES)
    """Run the work items on a Ray cluster: its address, ``auto`` (``RAY_ADDRESS`` or the
    running cluster) or ``local`` (start one here); None: threads in this process."""
    eval_progress: bool = field(default=False, metadata=_SAME_BYTES)

    # -- which side files are written (the weights are the same) ------------------
    copy_tokenizer: bool = field(default=True, metadata=_SAME_BYTES)
    """Copy the donor's tokenizer files (False: mergekit's ``--no-copy-tokenizer``; a
    recipe's ``tokenizer:`` block still writes the tokenizer it builds)."""
    write_model_card: bool = field(default=True, metadata=_SAME_BYTES)
    """Write ``README.md`` (False: mergekit's ``--no-write-model-card``)."""

    @classmethod
    def parse(cls, **values: Any) -> Options:
        """Options from user-facing values: sizes as ``"500M"``, dtypes as names; unknown
        names are a TypeError (a programming error, not a user's)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"unknown merge option(s): {', '.join(unknown)}")
        values = {k: v for k, v in values.items() if v is not None}  # None: the default
        if "compute_dtype" in values:
            values["compute_dtype"] = _compute_dtype(values["compute_dtype"])
        if "out_shard_size" in values:
            values["out_shard_size"] = parse_size(values["out_shard_size"], "--out-shard-size")
        if values.get("memory_limit") is not None:
            values["memory_limit"] = parse_size(values["memory_limit"], "--memory-limit")
        if "fp8_block_size" in values:
            values["fp8_block_size"] = parse_block_size(values["fp8_block_size"])
        if "out_format" in values:
            values["out_format"] = str(values["out_format"]).lower()
            if values["out_format"] not in OUT_FORMATS:
                raise MergeError(f"--out-format must be one of {', '.join(OUT_FORMATS)}; got "
                                 f"{values['out_format']!r}")
        if values.get("threads") is not None and int(values["threads"]) < 1:
            raise MergeError("--threads must be at least 1")
        return cls(**values)

    def replace(self, **changes: Any) -> Options:
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> dict[str, str]:
        """The fields that decide the output bytes, as text (for the resume manifest)."""
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.metadata.get("fingerprint", True)}


OUT_FORMATS = ("safetensors", "gguf")


def _compute_dtype(value: str | torch.dtype) -> torch.dtype:
    dtype = value if isinstance(value, torch.dtype) else parse_dtype(value, "--compute-dtype")
    if dtype not in (torch.float32, torch.float64):
        raise MergeError("--compute-dtype must be float32 or float64")
    return dtype


def parse_block_size(value: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``128x128`` (or two integers) → (128, 128); anything else is a MergeError."""
    parts = value.lower().split("x") if isinstance(value, str) else value
    try:
        block = tuple(int(str(p).strip()) for p in parts)
    except (TypeError, ValueError):
        block = ()
    if len(block) != 2 or min(block) < 1:
        raise MergeError(f"--fp8-block-size must be two positive integers, rows x columns "
                         f"(e.g. 128x128); got {value!r}")
    return block[0], block[1]

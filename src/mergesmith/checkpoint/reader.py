"""Reading tensor data: exactly the bytes of the rows asked for, straight into a tensor.

Safetensors data is read with ``os.preadv`` straight into the memory of a new tensor (no
intermediate copy, no memory map: resident memory is only what is in flight, and a file
truncated mid-merge is an error, not a crash). ``.bin`` checkpoints are
loaded with ``weights_only=True`` and memory-mapped by torch.
"""

from __future__ import annotations

import os
import threading
from math import prod
from typing import Protocol

from .._torch import torch
from ..errors import MergeIOError
from .buffers import tensor_bytes
from .index import TensorInfo, load_bin


class TensorSource(Protocol):
    """Reads the tensors of one checkpoint format: rows ``[start, end)`` along dim 0 of a
    tensor (all of it when ``rows`` is None), as stored. Safe to call from many threads.

    A new input format (quantized safetensors, GGUF) is a new source: it indexes its files
    into :class:`TensorInfo` entries with its ``format`` and reads them here; the engine
    only sees tensors."""

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor: ...

    def close(self) -> None: ...


class SafetensorsSource:
    """Reads exactly the bytes of the rows asked for, with ``os.preadv`` into a new tensor."""

    def __init__(self, pin_memory: bool = False) -> None:
        """``pin_memory``: read into page-locked memory (fast, asynchronous GPU copies)."""
        self.pin_memory = pin_memory
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise MergeIOError(f"cannot open {path}: {e.strerror}") from None
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self._fds[path] = fd
            return fd

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
        assert info.offset is not None
        shape = info.shape
        if rows is not None:
            shape = (rows[1] - rows[0], *info.shape[1:])
        row_bytes = prod(info.shape[1:]) * info.dtype.itemsize if info.shape else info.nbytes
        begin = info.offset + (rows[0] * row_bytes if rows is not None else 0)
        nbytes = prod(shape) * info.dtype.itemsize
        tensor = torch.empty(shape, dtype=info.dtype, pin_memory=self.pin_memory)
        if nbytes:
            self._pread_into(info.file, tensor_bytes(tensor), begin)
        return tensor

    def _pread_into(self, path: str, view: memoryview, offset: int) -> None:
        fd = self._fd(path)
        done = 0
        while done < len(view):
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:
                raise MergeIOError(f"error reading {path}: {e.strerror}") from None
            if n == 0:
                raise MergeIOError(f"{path} ended early while reading (it was truncated or "
                                   "changed during the merge)")
            done += n

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class TorchBinSource:
    """``.bin`` checkpoints: loaded with ``weights_only=True`` (memory-mapped by torch)."""

    def __init__(self) -> None:
        self._bins: dict[str, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
        with self._lock:
            state = self._bins.get(info.file)
            if state is None:
                state = self._bins[info.file] = load_bin(info.file)
        t = state[info.name]
        if rows is not None:
            t = t[rows[0]:rows[1]]
        return t.clone(memory_format=torch.contiguous_format)

    def close(self) -> None:
        with self._lock:
            self._bins.clear()


class TensorReader:
    """The reader shared by all workers of a merge: each read goes to the source of the
    tensor's format; files stay open until closed."""

    def __init__(self, pin_memory: bool = False) -> None:
        from .gguf_input import GGUFSource
        from .quantized import BlockFP8Source, MXFP4Source, ScaledFP8Source

        safetensors = SafetensorsSource(pin_memory)
        self.sources: dict[str, TensorSource] = {
            "safetensors": safetensors, "bin": TorchBinSource(),
            "fp8-block": BlockFP8Source(safetensors),
            "fp8-scaled": ScaledFP8Source(safetensors), "mxfp4": MXFP4Source(safetensors),
            "gguf": GGUFSource(safetensors)}

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None,
             round_to: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``[start, end)`` along dim 0 of a tensor (all of it when ``rows`` is None).

        ``round_to``: the dtype the caller rounds the values to next (a recipe's ``dtype``);
        sources that compute values (dequantization) produce them in it directly — the
        same numbers, half the memory of float32. Stored tensors come as stored."""
        if info.quant is not None:
            return self.sources[info.format].read(info, rows, round_to)
        return self.sources[info.format].read(info, rows)

    def close(self) -> None:
        for source in self.sources.values():
            source.close()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

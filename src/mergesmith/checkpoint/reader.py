"""Reading tensor data: exactly the bytes of the rows asked for, straight into a tensor.

Safetensors data of at least ``MAP_AT_LEAST`` bytes comes as a private memory map of just
those bytes: the tensor *is* the page cache's copy, so the kernel copies nothing (a 2 GB
SLERP −10 % wall time, task arithmetic −5 %, against reading with ``preadv``). The map is
copy-on-write — a method that works in place on its input changes its own pages, never the
file — and is unmapped when the tensor is freed, so resident memory is still only what is
in flight. The file's size is checked before each map: a file truncated before a read is a
clear error. One truncated *while* a tensor of it is in use ends the process with SIGBUS,
as any memory-mapped reader does (safetensors' own included); the output stays in
``OUT.partial/`` for ``--resume``. Smaller reads, reads into page-locked memory (for a GPU)
and data not aligned to its element size are read with ``os.preadv`` into a new tensor.
``.bin`` checkpoints are loaded with ``weights_only=True`` and memory-mapped by torch.
"""

from __future__ import annotations

import mmap
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


MAP_AT_LEAST = 1 << 16
"""Reads of fewer bytes are copied with ``preadv`` (a map costs two system calls)."""

_CAN_MAP = hasattr(mmap, "MAP_PRIVATE")  # POSIX


def _ended_early(path: str) -> MergeIOError:
    return MergeIOError(f"{path} ended early while reading (it was truncated or changed "
                        "during the merge)")


class SafetensorsSource:
    """Reads exactly the bytes of the rows asked for: a private memory map of them, or
    ``os.preadv`` into a new tensor (see the module's docstring for which)."""

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
        if (_CAN_MAP and not self.pin_memory and nbytes >= MAP_AT_LEAST
                and begin % info.dtype.itemsize == 0):
            return self._mapped(info.file, begin, nbytes, info.dtype).view(shape)
        tensor = torch.empty(shape, dtype=info.dtype, pin_memory=self.pin_memory)
        if nbytes:
            self._pread_into(info.file, tensor_bytes(tensor), begin)
        return tensor

    def _mapped(self, path: str, begin: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        """Bytes ``[begin, begin + nbytes)`` of ``path`` as a 1-D tensor over a private,
        writable (copy-on-write) map of the pages that hold them; the tensor keeps the map
        alive."""
        fd = self._fd(path)
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        try:
            if os.fstat(fd).st_size < begin + nbytes:
                raise _ended_early(path)
            region = mmap.mmap(fd, begin + nbytes - start, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except OSError as e:
            raise MergeIOError(f"error reading {path}: {e.strerror}") from None
        return torch.frombuffer(region, dtype=dtype, count=nbytes // dtype.itemsize,
                                offset=begin - start)

    def _pread_into(self, path: str, view: memoryview, offset: int) -> None:
        fd = self._fd(path)
        done = 0
        while done < len(view):
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as e:
                raise MergeIOError(f"error reading {path}: {e.strerror}") from None
            if n == 0:
                raise _ended_early(path)
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

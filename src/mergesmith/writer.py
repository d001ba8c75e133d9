"""Planned safetensors writer: every header is known before any tensor exists.

Each output file is created at its final size with its header in place; workers then write
each finished tensor (or row chunk) straight to its offset with ``os.pwrite``. Nothing is
buffered per shard, so memory does not grow with the shard size.
"""

from __future__ import annotations

import errno
import os
import shutil
import zlib
from math import prod

import torch

from .checkpoint.buffers import tensor_bytes
from .errors import MergeIOError
from .plan import OutputTensor, Shard
from .units import format_bytes


def _io_error(path: str, e: OSError) -> MergeIOError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return MergeIOError(f"the disk is full while writing {path}; free some space (or write "
                            "to another disk) and run the merge again")
    if e.errno == errno.EFBIG:
        return MergeIOError(f"cannot write {path}: file size limit reached; use a smaller "
                            "--out-shard-size")
    return MergeIOError(f"cannot write {path}: {e.strerror or e}")


class ShardWriter:
    """Owns the output files of a merge; ``write`` is safe to call from many threads."""

    def __init__(self, folder: str, shards: list[Shard], resume: bool = False) -> None:
        """Create the shard files (or, with ``resume``, reopen those of an interrupted run)."""
        self.folder = folder
        self._fds: dict[str, int] = {}
        if not resume:
            check_disk_space(folder, sum(s.size for s in shards))
        try:
            for shard in shards:
                path = os.path.join(folder, shard.filename)
                try:
                    if resume:
                        fd = os.open(path, os.O_RDWR)
                        self._fds[shard.filename] = fd
                    else:
                        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                        self._fds[shard.filename] = fd
                        _reserve(fd, shard.size)
                    _pwrite_all(fd, memoryview(shard.header), 0)
                except OSError as e:
                    raise _io_error(path, e) from None
        except BaseException:
            self.close(sync=False)
            raise

    def write(self, t: OutputTensor, rows: tuple[int, int] | None, data: torch.Tensor,
              crc: int = 0) -> int:
        """Write ``data`` (any dtype; cast here, the single rounding) at its planned place.

        Returns the CRC-32 of the bytes written, continuing ``crc`` (for resume checks)."""
        shape = t.shape if rows is None else (rows[1] - rows[0], *t.shape[1:])
        nbytes = prod(shape) * t.dtype.itemsize
        if nbytes == 0:
            return crc
        if tuple(data.shape) != tuple(shape):
            raise RuntimeError(f"internal error: {t.name} computed shape {tuple(data.shape)}, "
                               f"planned {shape}")
        out = data.to(dtype=t.dtype, memory_format=torch.contiguous_format)  # the one rounding
        row_bytes = prod(t.shape[1:]) * t.dtype.itemsize
        offset = t.offset + (rows[0] * row_bytes if rows is not None else 0)
        view = tensor_bytes(out)
        try:
            _pwrite_all(self._fds[t.file], view, offset)
        except OSError as e:
            raise _io_error(os.path.join(self.folder, t.file), e) from None
        return zlib.crc32(view, crc)

    def close(self, sync: bool = True) -> None:
        """Flush to disk (so a later rename publishes complete files) and close."""
        error = None
        for name, fd in self._fds.items():
            try:
                if sync:
                    os.fsync(fd)
            except OSError as e:
                error = error or _io_error(os.path.join(self.folder, name), e)
            finally:
                os.close(fd)
        self._fds.clear()
        if error:
            raise error


def check_disk_space(folder: str, needed: int) -> None:
    """Fail before any work when the output cannot fit."""
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise MergeIOError(f"not enough disk space in {folder}: the merged model needs "
                           f"{format_bytes(needed)}, {format_bytes(free)} are free; free some "
                           "space or write the output to another disk")


def _reserve(fd: int, size: int) -> None:
    """Allocate the file's blocks now so a full disk fails before the merge, not during it."""
    try:
        os.posix_fallocate(fd, 0, size)
    except (AttributeError, OSError) as e:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        os.ftruncate(fd, size)  # filesystems without fallocate


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)

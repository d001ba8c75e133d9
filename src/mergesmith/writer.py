"""Planned safetensors writer: every header is known before any tensor exists.

Each output file is created at its final size with its header in place; workers then write
each finished tensor (or row chunk) straight to its offset with ``os.pwrite``. Nothing is
buffered per shard, so memory does not grow with the shard size.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import zlib
from math import prod
from typing import Protocol

from ._torch import torch
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


class _ShardDigest:
    """sha256 of a shard computed while the merge runs: the finished ranges are read back
    (from the page cache) as soon as they extend the hashed prefix of the file, and their
    write-back to disk is started, so the final checksum and fsync cost little."""

    def __init__(self, fd: int, size: int, header_size: int, path: str | None = None) -> None:
        """``path``: other processes (other machines) write the file too: each finished
        range is read through a new open of ``path``, which a shared filesystem guarantees
        to show their closed writes (close-to-open consistency)."""
        self.fd, self.size, self.path = fd, size, path
        self.hash = hashlib.sha256()
        self.done_to = 0
        self.ranges: dict[int, int] = {0: header_size}  # start → end of finished ranges

    def finished(self, start: int, end: int) -> None:
        if end > start:
            self.ranges[start] = max(end, self.ranges.get(start, end))
        while self.done_to in self.ranges:
            start = self.done_to
            self._hash(start, self.ranges.pop(start))

    def _hash(self, start: int, end: int) -> None:
        fd = self.fd if self.path is None else os.open(self.path, os.O_RDONLY)
        try:
            block = 16 << 20
            for offset in range(start, end, block):
                data = os.pread(fd, min(block, end - offset), offset)
                if len(data) != min(block, end - offset):
                    raise OSError(errno.EIO, "short read while checksumming")
                self.hash.update(data)
            if hasattr(os, "posix_fadvise"):  # start write-back; keeps the page cache small
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
        finally:
            if fd != self.fd:
                os.close(fd)
        self.done_to = end

    def hexdigest(self) -> str:
        if self.done_to < self.size:  # ranges that never joined the prefix (not expected)
            self._hash(self.done_to, self.size)
        return self.hash.hexdigest()


class OutputSink(Protocol):
    """Where the engine puts merged tensors: each work item's result is written at its
    planned place from any worker thread (``write`` returns the CRC-32 of the bytes, for
    resume); ``finished`` is called, in one thread, once an item is written; ``close``
    makes everything durable and fills ``digests`` (sha256 per file).

    Today: :class:`ShardWriter` (safetensors shards, plain or with stored encodings such
    as block-scaled FP8). A new output format (GGUF) is a new sink: the plan's layout gives
    it every tensor's name, shape, dtype, encoding and place before any data exists."""

    digests: dict[str, str]

    def write(self, t: OutputTensor, rows: tuple[int, int] | None, data: torch.Tensor,
              crc: int = 0) -> int: ...

    def finished(self, t: OutputTensor, rows: tuple[int, int] | None) -> None: ...

    def close(self, sync: bool = True) -> None: ...


class ShardWriter:
    """Owns the output files of a merge; ``write`` is safe to call from many threads.

    ``finished(t, rows)`` (one thread) tells it a write is complete, so checksums can be
    computed while the merge runs; ``digests`` holds them after ``close``."""

    def __init__(self, folder: str, shards: list[Shard], resume: bool = False,
                 digest: bool = True, shared: bool = False) -> None:
        """Create the shard files (or, with ``resume``, reopen those of an interrupted run).
        Without ``digest`` no checksums are computed (a task writing part of the files on
        another node); with ``shared`` other processes write the items and this sink
        checksums each finished range by reading it afresh (the driver of a cluster run)."""
        self.folder = folder
        self.digest = digest
        self.shared = shared
        self._fds: dict[str, int] = {}
        self._digests: dict[str, _ShardDigest] = {}
        self.digests: dict[str, str] = {}
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
                    self._digests[shard.filename] = _ShardDigest(
                        fd, shard.size, len(shard.header), path if shared else None)
                except OSError as e:
                    raise _io_error(path, e) from None
        except BaseException:
            self.close(sync=False)
            raise

    def write(self, t: OutputTensor, rows: tuple[int, int] | None, data: torch.Tensor,
              crc: int = 0) -> int:
        """Write ``data`` (any dtype; cast here, the single rounding) at its planned place;
        an encoded tensor's rows are encoded here (its one rounding) and every part written.

        Returns the CRC-32 of the bytes written, continuing ``crc`` (for resume checks)."""
        shape = t.shape if rows is None else (rows[1] - rows[0], *t.shape[1:])
        if prod(shape) == 0:
            return crc
        if tuple(data.shape) != tuple(shape):
            raise RuntimeError(f"internal error: {t.name} computed shape {tuple(data.shape)}, "
                               f"planned {shape}")
        if t.encoding is None:
            out = data.to(dtype=t.dtype, memory_format=torch.contiguous_format)  # the rounding
            return self._put(t.file, t.byte_ranges(rows)[0][0], out, crc)
        if rows is not None and rows[0] % t.encoding.row_align:
            raise RuntimeError(f"internal error: {t.name} rows {rows} do not start at a "
                               f"multiple of {t.encoding.row_align}")
        for (offset, _), part in zip(t.byte_ranges(rows), t.encoding.encode(data)):
            crc = self._put(t.file, offset, part, crc)
        return crc

    def _put(self, file: str, offset: int, data: torch.Tensor, crc: int) -> int:
        view = tensor_bytes(data)
        try:
            _pwrite_all(self._fds[file], view, offset)
        except OSError as e:
            raise _io_error(os.path.join(self.folder, file), e) from None
        return zlib.crc32(view, crc)

    def finished(self, t: OutputTensor, rows: tuple[int, int] | None) -> None:
        """The bytes of ``t`` (rows ``rows``) are written: extend the running checksum."""
        if not self.digest:
            return
        try:
            for start, length in t.byte_ranges(rows):
                self._digests[t.file].finished(start, start + length)
        except OSError as e:
            raise _io_error(os.path.join(self.folder, t.file), e) from None

    def close(self, sync: bool = True) -> None:
        """Finish the checksums (when ``sync``), flush to disk (so a later rename publishes
        complete files) and close."""
        error = None
        for name, fd in self._fds.items():
            try:
                if sync:
                    if self.digest:
                        self.digests[name] = self._digests[name].hexdigest()
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

"""Planned safetensors writer: every header is known before any tensor exists.

Each output file is created at its final size with its header in place; workers then write
each finished tensor (or row chunk) straight to its offset. Nothing is buffered per shard,
so memory does not grow with the shard size.

Large pieces bypass the page cache: their whole 4 KiB pages are written with ``O_DIRECT``
(:class:`_DirectWrites`) and only the partial pages at their ends with ``os.pwrite``. The
kernel then neither copies the output into freshly allocated cache pages nor writes it
back later — on a 2-core VM the page-cache path cost a task-arithmetic merge a fifth of its
CPU time. The shard's sha256 is taken from the written pieces while they are still in
memory, in file order (:class:`_ShardDigest`), so nothing is read back. Filesystems without
``O_DIRECT`` get plain writes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import shutil
import threading
from math import prod
from typing import Protocol

from ._torch import torch
from .checkpoint.buffers import tensor_bytes
from .errors import MergeIOError
from .hashing import crc32
from .memory import OUTPUT_MEMORY
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
    """sha256 of a shard computed while the merge runs, in file order: each written piece
    is kept (``keep``, any thread) until the hashed prefix of the file reaches it, then
    hashed from memory; a piece not kept (too much waiting, or written by another process)
    is read back from the file."""

    def __init__(self, fd: int, size: int, header_size: int, path: str | None = None,
                 before_read=None, keep_limit: int = 0) -> None:
        """``path``: other processes (other machines) write the file too: each finished
        range is read through a new open of ``path``, which a shared filesystem guarantees
        to show their closed writes (close-to-open consistency). ``before_read``: called
        before reading anything back (finishes this process's queued writes).
        ``keep_limit``: bytes of written pieces kept waiting for the checksum (pieces that
        finish ahead of an earlier one); beyond it, a piece is read back instead."""
        self.fd, self.size, self.path = fd, size, path
        self.before_read = before_read
        self.keep_limit = keep_limit
        self.hash = hashlib.sha256()
        self.done_to = 0
        self.ranges: dict[int, int] = {0: header_size}  # start → end of finished ranges
        self.kept: dict[int, tuple[memoryview, object]] = {}  # offset → (bytes, owner)
        self.kept_bytes = 0
        self.lock = threading.Lock()

    def keep(self, offset: int, view: memoryview, owner: object) -> None:
        """The bytes just written at ``offset`` (``owner`` keeps their memory alive)."""
        with self.lock:
            old = self.kept.pop(offset, None)
            if old is not None:
                self.kept_bytes -= len(old[0])
            if self.kept_bytes + len(view) <= self.keep_limit:
                self.kept[offset] = (view, owner)
                self.kept_bytes += len(view)

    def _take(self, offset: int) -> tuple[memoryview, object] | None:
        """The piece kept at ``offset`` with its owner (hold it while using the bytes)."""
        with self.lock:
            got = self.kept.pop(offset, None)
            if got is not None:
                self.kept_bytes -= len(got[0])
            return got

    def finished(self, start: int, end: int) -> None:
        if end > start:
            self.ranges[start] = max(end, self.ranges.get(start, end))
        while self.done_to in self.ranges:
            start = self.done_to
            self._hash(start, self.ranges.pop(start))

    def _hash(self, start: int, end: int) -> None:
        position = start
        while position < end:
            piece = self._take(position)
            if piece is None or position + len(piece[0]) > end:
                break
            self.hash.update(piece[0])
            position += len(piece[0])
            del piece  # now the owner may free the bytes
        if position < end:
            self._read_back(position, end)
        self.done_to = end

    def _read_back(self, start: int, end: int) -> None:
        with self.lock:  # pieces inside the range are read with it
            for offset in [o for o in self.kept if start <= o < end]:
                self.kept_bytes -= len(self.kept.pop(offset)[0])
        if self.before_read is not None:
            self.before_read()
        fd = self.fd if self.path is None else os.open(self.path, os.O_RDONLY)
        try:
            block = 16 << 20
            for offset in range(start, end, block):
                data = os.pread(fd, min(block, end - offset), offset)
                if len(data) != min(block, end - offset):
                    raise OSError(errno.EIO, "short read while checksumming")
                self.hash.update(data)
        finally:
            if fd != self.fd:
                os.close(fd)

    def hexdigest(self) -> str:
        if self.done_to < self.size:  # ranges that never joined the prefix (not expected)
            self._hash(self.done_to, self.size)
        return self.hash.hexdigest()


DIRECT_ALIGN = 4096
"""Offset, length and memory alignment of ``O_DIRECT`` writes (a page: enough for every
common disk's logical block)."""

STAGING_BUFFERS = 4
"""Staging buffers of the ``O_DIRECT`` writes: workers fill one while the writer thread
writes the others. Together a third of the writer's memory (8 MB each by default)."""


class _DirectWrites:
    """Page-aligned writes that bypass the page cache, done by one background thread.

    ``submit`` copies the bytes into one of a few aligned staging buffers (waiting for a
    free one) and queues it; the thread writes it with ``O_DIRECT`` (on a filesystem or
    disk that refuses, with a plain write, and plain writes from then on). ``drain``
    waits until everything queued is written and raises the first write error."""

    def __init__(self, buffer_bytes: int) -> None:
        """``buffer_bytes``: size of each staging buffer (a multiple of the alignment)."""
        self.buffer_bytes = buffer_bytes
        self._direct_fds: dict[str, int | None] = {}
        self._free: queue.Queue = queue.Queue()
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.error: tuple[str, Exception] | None = None
        self.enabled = True

    def direct_fd(self, path: str) -> int | None:
        """An ``O_DIRECT`` descriptor of ``path``; None where that is not supported."""
        if not self.enabled:
            return None
        with self._lock:
            if path not in self._direct_fds:
                try:
                    self._direct_fds[path] = os.open(path, os.O_WRONLY | os.O_DIRECT)
                except (AttributeError, OSError):  # no O_DIRECT here, or not on this disk
                    self._direct_fds[path] = None
            if self._thread is None and self._direct_fds[path] is not None:
                self._start()
            return self._direct_fds[path]

    def _start(self) -> None:
        for _ in range(STAGING_BUFFERS):  # aligned slices of slightly larger buffers
            raw = torch.empty(self.buffer_bytes + DIRECT_ALIGN, dtype=torch.uint8)
            shift = -raw.data_ptr() % DIRECT_ALIGN
            self._free.put(raw[shift:shift + self.buffer_bytes])
        self._thread = threading.Thread(target=self._run, name="mergesmith-direct-writes",
                                        daemon=True)
        self._thread.start()

    def submit(self, path: str, direct_fd: int, plain_fd: int, view: memoryview,
               offset: int) -> None:
        """Write ``view`` (length and ``offset`` multiples of :data:`DIRECT_ALIGN`) at
        ``offset``; returns once the bytes are copied (``view`` may then change)."""
        source = torch.frombuffer(view, dtype=torch.uint8)
        for start in range(0, len(view), self.buffer_bytes):
            piece = source[start:start + self.buffer_bytes]
            self.raise_error()
            buffer = self._free.get()
            buffer[:len(piece)].copy_(piece)  # (torch's copy lets other threads run)
            self._jobs.put((path, direct_fd, plain_fd, buffer, len(piece), offset + start))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            path, direct_fd, plain_fd, buffer, length, offset = job
            try:
                if self.error is None:
                    self._write(direct_fd, plain_fd, tensor_bytes(buffer[:length]), offset)
            except Exception as e:  # noqa: BLE001 - reported by the next submit or drain
                self.error = (path, e)
            finally:
                self._free.put(buffer)
                self._jobs.task_done()
        self._jobs.task_done()

    def _write(self, direct_fd: int, plain_fd: int, data: memoryview, offset: int) -> None:
        if self.enabled:
            try:
                _pwrite_all(direct_fd, data, offset)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.enabled = False  # alignment the disk does not take: plain writes
        _pwrite_all(plain_fd, data, offset)

    def raise_error(self) -> None:
        if self.error is not None:
            path, e = self.error
            raise _io_error(path, e) if isinstance(e, OSError) else e

    def drain(self) -> None:
        """Wait for every queued write; raise the first error."""
        if self._thread is not None:
            self._jobs.join()
        self.raise_error()

    def close(self) -> None:
        """Stop the thread (after the queued writes) and close the descriptors."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        for fd in self._direct_fds.values():
            if fd is not None:
                os.close(fd)
        self._direct_fds.clear()


class OutputSink(Protocol):
    """Where the engine puts merged tensors: each work item's result is written at its
    planned place from any worker thread (``write`` returns the CRC-32 of the bytes, for
    resume; the data must not change afterwards: a sink may keep it until it is
    checksummed); ``finished`` is called, in one thread, once an item is written; ``close``
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
                 digest: bool = True, shared: bool = False,
                 memory: int = OUTPUT_MEMORY) -> None:
        """Create the shard files (or, with ``resume``, reopen those of an interrupted run).
        Without ``digest`` no checksums are computed (a task writing part of the files on
        another node); with ``shared`` other processes write the items and this sink
        checksums each finished range by reading it afresh (the driver of a cluster run).
        ``memory``: what the writer may hold (:func:`memory.output_memory`), a third of it
        as staging buffers, the rest as pieces waiting for the checksum."""
        self.folder = folder
        self.digest = digest
        self.shared = shared
        self._fds: dict[str, int] = {}
        self._digests: dict[str, _ShardDigest] = {}
        buffer_bytes = max(DIRECT_ALIGN,
                           memory // 3 // STAGING_BUFFERS // DIRECT_ALIGN * DIRECT_ALIGN)
        self._direct = _DirectWrites(buffer_bytes)
        keep_limit = max(0, memory - buffer_bytes * STAGING_BUFFERS)
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
                    digest = _ShardDigest(fd, shard.size, len(shard.header),
                                          path if shared else None, self._direct.drain,
                                          keep_limit)
                    if not shared:
                        digest.keep(0, memoryview(shard.header), shard.header)
                    self._digests[shard.filename] = digest
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
        path = os.path.join(self.folder, file)
        fd = self._fds[file]
        try:
            head = -offset % DIRECT_ALIGN  # bytes before the first whole page
            middle = (len(view) - head) // DIRECT_ALIGN * DIRECT_ALIGN
            direct_fd = self._direct.direct_fd(path) if middle >= DIRECT_ALIGN else None
            if direct_fd is None:
                _pwrite_all(fd, view, offset)
            else:
                _pwrite_all(fd, view[:head], offset)
                self._direct.submit(path, direct_fd, fd, view[head:head + middle], offset + head)
                _pwrite_all(fd, view[head + middle:], offset + head + middle)
        except OSError as e:
            raise _io_error(path, e) from None
        if self.digest and not self.shared:
            self._digests[file].keep(offset, view, data)
        return crc32(view, crc)

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
        if sync:
            try:
                self._direct.drain()
            except MergeIOError as e:
                error = e
        self._direct.close()
        for name, fd in self._fds.items():
            try:
                if sync and error is None:
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

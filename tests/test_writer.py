"""The shard writer: pieces written in any order land in place, page-aligned middles go
around the page cache (O_DIRECT where the filesystem takes it), and the shard's sha256 is
taken from memory in file order, or read back when a piece was not kept."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith import writer as w
from mergesmith.errors import MergeIOError
from mergesmith.plan import Shard

PAGE = w.DIRECT_ALIGN


def _layout(rng: random.Random, header: int, pieces: int, largest: int) -> list[tuple[int, int]]:
    """Consecutive (offset, length) pieces after a header, of random lengths."""
    out, offset = [], header
    for _ in range(pieces):
        length = rng.randint(1, largest)
        out.append((offset, length))
        offset += length
    return out


def _write_all(folder, layout, header: bytes, order_seed: int, keep_limit: int | None = None):
    """Write every piece (in a shuffled order) through a ShardWriter, report each finished
    in another shuffled order; returns (expected file bytes, the writer's digest)."""
    size = layout[-1][0] + layout[-1][1]
    expected = bytearray(size)
    expected[:len(header)] = header
    shard = Shard("s.safetensors", header, size, ())
    sink = w.ShardWriter(str(folder), [shard])
    if keep_limit is not None:
        sink._digests[shard.filename].keep_limit = keep_limit
    rng = random.Random(order_seed)
    datas = {}
    for offset, length in layout:
        data = torch.randint(0, 256, (length,), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(offset))
        expected[offset:offset + length] = bytes(data.numpy())
        datas[offset] = data
    written = list(layout)
    rng.shuffle(written)
    for offset, _ in written:
        sink._put(shard.filename, offset, datas.pop(offset), 0)  # the sink keeps what it needs
    finished = list(layout)
    rng.shuffle(finished)
    for offset, length in finished:
        sink._digests[shard.filename].finished(offset, offset + length)
    sink.close()
    return bytes(expected), sink.digests[shard.filename]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), header=st.integers(8, 3 * PAGE),
       pieces=st.integers(1, 12), largest=st.sampled_from([100, PAGE, 5 * PAGE]),
       kept=st.sampled_from([0, 3 * PAGE, None]))
def test_pieces_land_in_place_and_the_digest_is_the_files(tmp_path_factory, seed, header,
                                                          pieces, largest, kept):
    """Any sizes and offsets (whole pages in the middle of a piece, partial pages at its
    ends), any write and finish order, with all, some or none of the pieces kept in
    memory for the checksum (None: the default limit): the file holds every piece and the digest is its sha256."""
    folder = tmp_path_factory.mktemp("w")
    rng = random.Random(seed)
    layout = _layout(rng, header, pieces, largest)
    head = bytes(rng.randrange(256) for _ in range(header))
    expected, digest = _write_all(folder, layout, head, seed, kept)
    data = (folder / "s.safetensors").read_bytes()
    assert data == expected
    assert digest == hashlib.sha256(expected).hexdigest()


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))


def _direct_supported(folder) -> bool:
    path = folder / "probe"
    path.write_bytes(b"")
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_DIRECT))
        return True
    except (OSError, AttributeError):
        return False


def test_large_pieces_go_around_the_page_cache(tmp_path, monkeypatch):
    """Where the filesystem takes O_DIRECT, whole pages are written through it (and only
    they: offsets and lengths are page multiples)."""
    if not _direct_supported(tmp_path):
        pytest.skip("this filesystem does not open files with O_DIRECT")
    seen = []
    real = os.pwrite

    def pwrite(fd, data, offset):
        if _is_direct(fd):
            seen.append((offset, len(data)))
        return real(fd, data, offset)

    monkeypatch.setattr(w.os, "pwrite", pwrite)
    layout = [(100, 3 * PAGE + 50), (100 + 3 * PAGE + 50, 2 * PAGE)]
    expected, digest = _write_all(tmp_path, layout, bytes(100), 0)
    assert (tmp_path / "s.safetensors").read_bytes() == expected
    assert digest == hashlib.sha256(expected).hexdigest()
    assert seen and all(o % PAGE == 0 and n % PAGE == 0 for o, n in seen)
    whole_pages = sum((o + n) // PAGE - -(-o // PAGE) for o, n in layout)
    assert sum(n for _, n in seen) == whole_pages * PAGE == 3 * PAGE  # 2 + 1 whole pages


def test_a_disk_refusing_direct_writes_gets_plain_ones(tmp_path, monkeypatch):
    """EINVAL from an O_DIRECT write (an alignment the disk does not take): the piece is
    written normally, and so is everything after it."""
    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if _is_direct(fd):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(w.os, "pwrite", pwrite)
    layout = _layout(random.Random(1), 300, 8, 4 * PAGE)
    expected, digest = _write_all(tmp_path, layout, bytes(300), 1)
    assert (tmp_path / "s.safetensors").read_bytes() == expected
    assert digest == hashlib.sha256(expected).hexdigest()
    assert len(refused) <= 1


def test_a_full_disk_during_direct_writes_is_one_clear_error(tmp_path, monkeypatch):
    """ENOSPC in the background writer surfaces as the merge's disk-full error."""
    real = os.pwrite

    def pwrite(fd, data, offset):
        if len(data) >= PAGE:  # a direct write, or the whole piece where there are none
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(w.os, "pwrite", pwrite)
    layout = [(64, 4 * PAGE), (64 + 4 * PAGE, 4 * PAGE)]
    with pytest.raises(MergeIOError, match="disk is full"):
        _write_all(tmp_path, layout, bytes(64), 0)


def test_the_writer_memory_follows_the_limit(tmp_path):
    """Staging buffers are a third of the writer's memory (8 MB each by default), the
    pieces kept for the checksum the rest; under --memory-limit the share shrinks."""
    from mergesmith.memory import OUTPUT_MEMORY, output_memory

    shard = Shard("s.safetensors", bytes(8), 8, ())
    default = w.ShardWriter(str(tmp_path), [shard])
    assert default._direct.buffer_bytes == 8 * 1024 * 1024
    assert default._digests["s.safetensors"].keep_limit == 64 * 1024 * 1024
    default.close()
    assert output_memory(None) == OUTPUT_MEMORY and output_memory(80_000_000) == 10_000_000
    small = w.ShardWriter(str(tmp_path), [shard], memory=output_memory(80_000_000))
    assert small._direct.buffer_bytes % PAGE == 0
    assert small._direct.buffer_bytes * w.STAGING_BUFFERS <= 10_000_000 // 3
    assert 0 < small._digests["s.safetensors"].keep_limit <= 10_000_000
    small.close()


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=9000), st.integers(0, 9000), st.integers(0, 2**32 - 1))
def test_the_journal_crc_is_zlibs(data, split, start):
    """The resume journal's CRC-32 (ISA-L's where installed) gives zlib's values, also
    when continued over pieces: a journal written by either resumes with the other."""
    import zlib

    from mergesmith.hashing import crc32

    head, tail = data[:split], data[split:]
    assert crc32(data) == zlib.crc32(data)
    assert crc32(tail, crc32(head, start)) == zlib.crc32(data, start)
    assert crc32(memoryview(data)) == zlib.crc32(data)

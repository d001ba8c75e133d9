"""Checksums: SHA-256 of whole files (shard checksums for ``mergesmith verify``,
evaluation-cache keys) and the CRC-32 of written pieces (the ``--resume`` journal).

Shards being written are hashed elsewhere: the writer digests each shard's finished ranges
during the merge, and ``write_checksums`` falls back to this only for the others."""

from __future__ import annotations

import hashlib
import os
import sys

try:  # ISA-L's CRC-32: zlib's checksum (same polynomial, same values), about 5 × as fast
    from isal.isal_zlib import crc32
except ImportError:  # a platform without isal's wheels
    from zlib import crc32

__all__ = ["crc32", "file_sha256"]

_BLOCK = 1 << 20  # read size of the fallback loop (Python 3.10)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of the file's bytes, read in blocks (never held in memory at once).

    Raises ``OSError`` when the file cannot be opened or read."""
    with open(path, "rb") as f:
        if sys.version_info >= (3, 11):
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        while block := f.read(_BLOCK):
            h.update(block)
        return h.hexdigest()

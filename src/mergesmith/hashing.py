"""SHA-256 of whole files: shard checksums (``mergesmith verify``) and evaluation-cache keys.

Shards being written are hashed elsewhere: the writer digests each shard's finished ranges
during the merge, and ``write_checksums`` falls back to this only for the others."""

from __future__ import annotations

import hashlib
import os
import sys

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

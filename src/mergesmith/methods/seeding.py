"""Per-tensor random generators: reproducible for any thread count or processing order.

A random method draws from a generator seeded by a stable hash of (seed, tensor name, row
chunk), never from Python's ``hash()`` or torch's global generator.
"""

from __future__ import annotations

import hashlib

from .._torch import torch


def tensor_seed(seed: int | None, name: str, rows: tuple[int, int] | None = None) -> int:
    """Stable 63-bit seed from (seed, tensor name, row chunk).

    Without a seed, random methods use seed 0: a merge is reproducible by default.
    """
    h = hashlib.blake2b(f"{seed or 0}\0{name}\0{rows}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def tensor_generator(seed: int | None, name: str, device: torch.device | str = "cpu",
                     rows: tuple[int, int] | None = None) -> torch.Generator:
    """The generator a random method draws from for one output tensor (or row chunk)."""
    g = torch.Generator(device=device)
    g.manual_seed(tensor_seed(seed, name, rows))
    return g

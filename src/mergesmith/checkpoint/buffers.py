"""Tensor memory as a Python buffer, so file I/O reads into and writes from tensors directly."""

from __future__ import annotations

import ctypes

from .._torch import torch


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy).

    The caller keeps ``t`` alive while the view is used. Lets ``os.preadv`` fill a tensor
    allocated with ``torch.empty`` (no zero-filling) and ``os.pwrite`` write one out.
    """
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(t.data_ptr())).cast("B")

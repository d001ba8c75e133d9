"""Where the math runs: ``--device`` / ``--devices`` names turned into torch devices, with
a clear error for a device this machine does not have."""

from __future__ import annotations

from ._torch import torch
from .errors import MergeError


def resolve_devices(spec: str) -> list[torch.device]:
    """A comma list of devices (``cuda:0,cuda:1``; a bare number means that GPU): work
    items are spread over them, one device per worker thread."""
    names = [n.strip() for n in str(spec).split(",") if n.strip()] or ["cpu"]
    return [resolve_device(f"cuda:{n}" if n.isdigit() else n) for n in names]


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (a GPU when there is one)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MergeError(f"--device: unknown device '{name}' (use cpu, cuda, cuda:N, mps or "
                         "auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda: no CUDA GPU is available to this torch build; use "
                         "--device cpu")
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise MergeError(f"--device {name}: there are only {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None)
                                     and torch.backends.mps.is_available()):
        raise MergeError("--device mps: Apple GPU support is not available here")
    return device

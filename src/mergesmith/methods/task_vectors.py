"""Task vectors read one expert at a time: what the spectral, consensus and SVC methods share.

Notation (also that of ``spectral``, ``consensus`` and ``svc``): base ``θ₀``, experts
``θᵢ``, task vectors ``τᵢ = θᵢ − θ₀`` (``i = 1..T``), weights ``wᵢ`` (default 1), global
scale ``λ``. The sums here read the experts one at a time (``MergeInputs.task_vectors``)
and keep only a running sum, so memory does not grow with the number of experts. Task
arithmetic ``θ₀ + λ·Σ wᵢτᵢ`` is also the fallback of the matrix methods for the tensors
outside their scope (``is_spectral_matrix``), as the papers do.
"""

from __future__ import annotations

from .._torch import torch
from .registry import MergeInputs, Param, Scope

WEIGHT = Param("weight", float, 1.0, Scope.NON_BASE, "weight of the model's task vector")
LAMBDA = Param("lambda", float, 1.0, doc="scale of the merged task vector")


def streaming_task_arithmetic(m: MergeInputs) -> torch.Tensor:
    """θ₀ + λ·Σ wᵢτᵢ, reading the experts one at a time."""
    base = m.base
    acc = torch.zeros_like(base)
    for tau, p in m.task_vectors(base):
        acc.add_(tau.mul_(p["weight"]))
    return base.add_(acc.mul_(m.params["lambda"]))


def sum_task_vectors(m: MergeInputs, base: torch.Tensor) -> torch.Tensor:
    """Σ wᵢτᵢ against ``base``, reading the experts one at a time."""
    acc = torch.zeros_like(base)
    for tau, p in m.task_vectors(base):
        acc.add_(tau.mul_(p["weight"]))
    return acc


def is_2d(shape: tuple[int, ...]) -> bool:
    """A matrix with more than one row and column (a spectrum worth decomposing)."""
    return len(shape) == 2 and min(shape) > 1


def is_spectral_matrix(name: str, shape: tuple[int, ...]) -> bool:
    """A weight matrix the spectral methods apply to: 2-D, not a token embedding or LM
    head (indexed by token, not a linear map of features; the papers leave them out)."""
    from ..arch import is_vocab_tensor

    return is_2d(shape) and not is_vocab_tensor(name)


def is_spectral_input(m: MergeInputs) -> bool:
    """Whether the tensor being merged is a matrix the spectral methods apply to."""
    return is_spectral_matrix(m.tensor_name, m.shape)

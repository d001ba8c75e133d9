"""Singular-Value Calibration (SVC, arXiv 2602.05536) of merged task matrices.

A merge that sums task vectors over-counts the directions several tasks share. SVC
decomposes the merged task matrix ``M = U·S·Vᵀ`` and shrinks each singular value by how
many times the merge holds each task's own response along that direction: a direction
shared by all T tasks is scaled back by 1/T, one a single task owns is left alone.
``singular_value_calibration`` does this for any merged task matrix; ``svc_ta`` is task
arithmetic followed by it, and the task-arithmetic family applies it with ``svc: true``
(costing ``svc_work`` there too). Notation as in ``task_vectors``; only weight matrices
(``is_spectral_matrix``) are calibrated, other tensors get plain task arithmetic. The SVD
runs in float32 on the merge device.
"""

from __future__ import annotations

from collections.abc import Iterable

from .._torch import torch
from .linalg import NO_WORK, DenseWork, full_svd, product_work, svd_work
from .registry import LINES, BasePolicy, MergeInputs, Param, merge_method
from .task_vectors import (
    LAMBDA,
    WEIGHT,
    is_spectral_input,
    is_spectral_matrix,
    streaming_task_arithmetic,
    sum_task_vectors,
)


def svc_work(name: str, shape: tuple[int, ...], tasks: int, params) -> DenseWork:
    """Cost of SVC for `check`: one SVD of the merged matrix, a product per task and the
    rebuild."""
    if not is_spectral_matrix(name, shape):
        return NO_WORK
    m, n = shape
    r = min(m, n)
    return svd_work(m, n) + product_work(m, n, r) * tasks + product_work(m, r, n)


def singular_value_calibration(merged_tv: torch.Tensor, taus: Iterable[torch.Tensor],
                               alpha: float = 1.0) -> torch.Tensor:
    """Singular-Value Calibration (arXiv 2602.05536) of a merged task matrix.

    ``M = U·S·Vᵀ``; for direction ``r`` and task ``i``, ``s_rⁱ = ⟨M·v_r, τᵢ·v_r⟩ /
    ‖τᵢ·v_r‖²`` (how many times task ``i``'s own response along ``v_r`` the merge holds;
    0 where the task has none); ``σ_r`` is multiplied by ``γ_r = T / Σᵢ max(α, s_rⁱ)``.
    A direction shared by all tasks and summed T times is scaled back by 1/T; one that a
    single task owns is left alone (with α = 1)."""
    u, s, vh = full_svd(merged_tv)
    mv = u * s  # M·v_r for every r (columns)
    total = torch.zeros_like(s)
    count = 0
    for tau in taus:  # any iterable: a generator reads one task at a time
        tv = tau @ vh.T  # τᵢ·v_r (columns)
        norm2 = (tv * tv).sum(0)
        proj = (mv * tv).sum(0) / torch.where(norm2 > 0, norm2, torch.ones_like(norm2))
        total += torch.clamp(torch.where(norm2 > 0, proj, torch.zeros_like(proj)), min=alpha)
        count += 1
    return (u * (s * (count / total))) @ vh


@merge_method(
    "svc_ta",
    compute=svc_work,
    base=BasePolicy.REQUIRED,
    params=[WEIGHT, Param("svc_alpha", float, 1.0, doc="floor α of the per-task ratios"),
            LAMBDA],
    extensions=(LINES,),
    min_non_base=1,
    lazy_inputs=True,
    temp_buffers=4.0,
    seconds_per_gb=3.0,
    reference="https://arxiv.org/abs/2602.05536",
)
def svc_ta(m: MergeInputs) -> torch.Tensor:
    """Task arithmetic followed by Singular-Value Calibration of each matrix.

    `M = Σ wᵢτᵢ`; every singular value of `M` is shrunk by how over-accumulated its
    direction is (see `singular_value_calibration`): `θ₀ + λ·SVC(M)`. Streaming, two
    passes."""
    if not is_spectral_input(m):
        return streaming_task_arithmetic(m)
    base = m.base
    weighted = (tau.mul_(p["weight"]) for tau, p in m.task_vectors(base))
    calibrated = singular_value_calibration(sum_task_vectors(m, base), weighted,
                                            m.params["svc_alpha"])
    return base.add_(calibrated.mul_(m.params["lambda"]))

"""Consensus merges: at every element, select which tasks' changes to keep — MagMax,
consensus TA / TIES (TALL masks) and PCB.

Notation as in ``task_vectors``: base ``θ₀``, task vectors ``τᵢ = θᵢ − θ₀``, weights
``wᵢ``, scale ``λ``. These methods decompose nothing: they compare the task vectors
element by element — by magnitude (MagMax), by how many tasks' TALL masks select a weight
(consensus_ta, consensus_ties) or by a balance score of each task within itself and
against the others (PCB) — and keep or weight entries accordingly, so they treat every
tensor, whatever its shape, the same way. Methods marked *streaming* read the experts one
at a time (``lazy_inputs``), in one or more passes, and keep only tensor-sized running
buffers, so memory does not grow with the number of experts; consensus_ties runs the TIES
pipeline of ``task_arithmetic`` on held inputs.
"""

from __future__ import annotations

from collections.abc import Iterable

from .._torch import torch
from . import sparsify
from .registry import LINES, BasePolicy, MergeInputs, Param, Scope, merge_method
from .task_arithmetic import generalized_task_arithmetic, magnitude_sparsifier
from .task_vectors import LAMBDA, WEIGHT, sum_task_vectors

# ------------------------------------------------------------------ MagMax


@merge_method(
    "magmax",
    base=BasePolicy.REQUIRED,
    params=[WEIGHT, LAMBDA],
    extensions=(LINES,),
    min_non_base=1,
    elementwise=True,
    lazy_inputs=True,
    temp_buffers=2.0,
    seconds_per_gb=1.5,
    reference="https://arxiv.org/abs/2407.06322",
)
def magmax(m: MergeInputs) -> torch.Tensor:
    """MagMax: at every element, the weighted task vector of largest magnitude.

    `θ₀ + λ·wⱼτⱼ` with `j = argmaxᵢ |wᵢτᵢ|` per element (the first expert wins ties).
    Streaming and element-wise."""
    base = m.base
    best = torch.zeros_like(base)
    for tau, p in m.task_vectors(base):
        tau.mul_(p["weight"])
        best = torch.where(tau.abs() > best.abs(), tau, best)
    return base.add_(best.mul_(m.params["lambda"]))


# ------------------------------------------------------------------ TALL-mask consensus

_TALL = Param("tall_lambda", float, 0.6, Scope.NON_BASE,
              "TALL mask threshold λₜ: a weight belongs to task t when "
              "|τₜ| ≥ λₜ·|τ_MTL − τₜ|")
_K = Param("k", int, 2, doc="keep weights that at least k tasks' TALL masks select")


def _consensus_mask(tasks: Iterable, mtl: torch.Tensor, k: int) -> torch.Tensor:
    """Σₜ 1{|τₜ| ≥ λₜ·|τ_MTL − τₜ|} ≥ k over ``(τₜ, params)`` pairs (any iterable: a
    second streaming pass over the experts, or the chunks of held inputs)."""
    count = torch.zeros_like(mtl)
    for tau, p in tasks:
        count.add_(tau.abs() >= (mtl - tau).abs_().mul_(p["tall_lambda"]))
    return count >= k


@merge_method(
    "consensus_ta",
    base=BasePolicy.REQUIRED,
    params=[WEIGHT, _TALL, _K, LAMBDA],
    extensions=(LINES,),
    min_non_base=1,
    elementwise=True,
    lazy_inputs=True,
    temp_buffers=3.0,
    seconds_per_gb=1.5,
    reference="https://arxiv.org/abs/2405.07813",
)
def consensus_ta(m: MergeInputs) -> torch.Tensor:
    """Consensus task arithmetic (TALL masks): drop weights fewer than k tasks need.

    `τ_MTL = Σ wᵢτᵢ`; task t's TALL mask is `|τₜ| ≥ λₜ·|τ_MTL − τₜ|`; the result is
    `θ₀ + λ·1{Σₜ maskₜ ≥ k}·τ_MTL`. Two streaming passes; element-wise."""
    base = m.base
    mtl = sum_task_vectors(m, base)
    keep = _consensus_mask(m.task_vectors(base), mtl, m.params["k"])
    return base.add_(mtl.mul_(keep).mul_(m.params["lambda"]))


@merge_method(
    "consensus_ties",
    base=BasePolicy.REQUIRED,
    params=[WEIGHT, Param("density", float, 1.0, Scope.NON_BASE,
                          "fraction of task-vector entries TIES keeps"),
            _TALL, _K, Param("normalize", bool, True, doc="TIES' division by the agreeing weights"),
            LAMBDA],
    extensions=(LINES,),
    min_non_base=1,
    raw_inputs=True,
    temp_buffers=1.0,
    seconds_per_gb=9.0,
    reference="https://arxiv.org/abs/2405.07813",
)
def consensus_ties(m: MergeInputs) -> torch.Tensor:
    """Consensus TIES: the TIES merge, restricted to weights at least k TALL masks select.

    The masks use the plain weighted sum `τ_MTL = Σ wᵢτᵢ` as in consensus_ta; TIES
    (trim to `density`, elect signs, disjoint mean, `λ`) then runs as usual and its task
    vector is zeroed where fewer than `k` tasks agree."""
    compute = torch.promote_types(m.compute_dtype, m.base.dtype)
    merged = generalized_task_arithmetic(m, magnitude_sparsifier, consensus=True)
    out = merged.view(-1)
    base = m.base.reshape(-1)
    others = [(x.reshape(-1), p) for x, p in m.others()]
    for start in range(0, base.numel(), sparsify.CHUNK):  # masks chunk by chunk
        end = start + sparsify.CHUNK
        b = base[start:end].to(compute)
        taus = [(torch.sub(x[start:end], b), p) for x, p in others]
        mtl = torch.zeros_like(b)
        for tau, p in taus:
            mtl.add_(tau, alpha=p["weight"])
        piece = out[start:end]
        piece.sub_(b).mul_(_consensus_mask(taus, mtl, m.params["k"])).add_(b)
    return merged


# ------------------------------------------------------------------ PCB


@merge_method(
    "pcb",
    base=BasePolicy.REQUIRED,
    params=[Param("ratio", float, 0.1, doc="share of each task vector's entries kept, by "
                                          "balance score"),
            LAMBDA],
    extensions=(LINES,),
    min_non_base=1,
    lazy_inputs=True,
    temp_buffers=7.0,
    seconds_per_gb=30.0,
    reference="https://arxiv.org/abs/2410.02396",
)
def pcb(m: MergeInputs) -> torch.Tensor:
    """PCB-merging: keep the entries with the best intra- and inter-task balance.

    Per task, `intraᵢ = exp(T·n(|τᵢ|)²)` with `n` the min–max normalisation over the
    tensor; `interᵢ = softmaxᵢ(τᵢ ⊙ Σⱼ τⱼ)` across tasks per element; `βᵢ = intraᵢ·interᵢ`.
    Each task keeps its top `ratio` entries by `βᵢ`, scored `β̃ᵢ = n(max(βᵢ, qᵢ))` (`qᵢ`
    the cut), and the result is `θ₀ + λ·Σ β̃ᵢτᵢ / Σ β̃ᵢ`.

    Streaming, four passes over the experts, one held at a time: (1) `Σⱼ τⱼ` and each
    task's |τ| range; (2) the softmax denominator as a running log-sum-exp; (3) each
    task's cut `qᵢ` and score range (scalars); (4) the weighted sums. Memory: about seven
    tensor-sized buffers whatever the number of experts."""
    base = m.base
    n = m.n_tasks
    total = torch.zeros_like(base)
    ranges = []
    for tau, _ in m.task_vectors(base):
        total.add_(tau)
        magnitude = tau.abs_()
        ranges.append((float(magnitude.min()), float(magnitude.max())))
    log_norm = torch.full_like(base, float("-inf"))  # log Σⱼ exp(τⱼ ⊙ Στ), online
    scale = torch.zeros_like(base)
    for tau, _ in m.task_vectors(base):
        z = tau.mul_(total)
        new_max = torch.maximum(log_norm, z)
        scale.mul_(torch.exp(log_norm.sub_(new_max))).add_(torch.exp(z.sub_(new_max)))
        log_norm = new_max
    log_norm.add_(scale.log_())
    del scale

    def balance(tau: torch.Tensor, i: int) -> torch.Tensor:
        low, high = ranges[i]
        intra = tau.abs().sub_(low).div_(high - low if high > low else 1.0).square_()
        inter = torch.mul(tau, total).sub_(log_norm)
        return intra.mul_(n).add_(inter).exp_()

    numel = base.numel()
    keep = max(1, int(m.params["ratio"] * numel))
    cuts = []
    for i, (tau, _) in enumerate(m.task_vectors(base)):
        beta = balance(tau, i).reshape(-1)
        cut = float(beta.kthvalue(numel - keep + 1).values)
        cuts.append((cut, max(float(beta.min()), cut), max(float(beta.max()), cut)))
    merged = torch.zeros_like(base)
    weights = torch.zeros_like(base)
    for i, (tau, _) in enumerate(m.task_vectors(base)):
        cut, low, high = cuts[i]
        score = balance(tau, i).clamp_min_(cut).sub_(low).div_(high - low if high > low else 1.0)
        weights.add_(score)
        merged.add_(score.mul_(tau))
    merged.div_(weights.clamp_min_(1e-12))
    return base.add_(merged.mul_(m.params["lambda"]))

"""Data-free merge methods of 2024–2026, per tensor and streaming.

Notation: base ``θ₀``, experts ``θᵢ``, task vectors ``τᵢ = θᵢ − θ₀`` (``i = 1..T``), weights
``wᵢ`` (default 1), global scale ``λ``. Every method works one weight matrix at a time;
tensors that are not matrices (norms, biases, token embeddings and LM heads) fall back to
task arithmetic
``θ₀ + λ·Σ wᵢτᵢ``, as the papers do for parameters outside their scope. Methods marked
*streaming* read the experts one at a time (``lazy_inputs``), in one or two passes, and keep
only running sums or truncated factors, so memory does not grow with the number of experts.
SVDs run in float32 on the merge device (float64 for the small Gram systems of WUDI).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from . import sparsify
from .linalg import (
    NO_WORK,
    DenseWork,
    eigh_work,
    full_svd,
    numerical_rank,
    polar,
    polar_work,
    product_work,
    svd,
    svd_work,
    top_svd,
    top_svd_work,
)
from .registry import LINES, BasePolicy, MergeInputs, Param, Scope, merge_method
from .task_arithmetic import _magnitude, generalized_task_arithmetic

_WEIGHT = Param("weight", float, 1.0, Scope.NON_BASE, "weight of the model's task vector")
_LAMBDA = Param("lambda", float, 1.0, doc="scale of the merged task vector")
_RANDOMIZED = Param("randomized_svd", bool, False,
                    doc="top singular directions by a seeded randomized SVD (much faster "
                        "when few are kept; slightly approximate) instead of an exact one")


def _ta(m: MergeInputs) -> torch.Tensor:
    """θ₀ + λ·Σ wᵢτᵢ, reading the experts one at a time."""
    base = m.base
    acc = torch.zeros_like(base)
    for tau, p in m.task_vectors(base):
        acc.add_(tau.mul_(p["weight"]))
    return base.add_(acc.mul_(m.params["lambda"]))


def _is_matrix(m: MergeInputs) -> bool:
    return _spectral(m.tensor_name, m.shape)


def _is_2d(shape: tuple[int, ...]) -> bool:
    """A matrix with more than one row and column (a spectrum worth decomposing)."""
    return len(shape) == 2 and min(shape) > 1


def _spectral(name: str, shape: tuple[int, ...]) -> bool:
    """A weight matrix the spectral methods apply to: 2-D, not a token embedding or LM
    head (indexed by token, not a linear map of features; the papers leave them out)."""
    from ..arch import is_vocab_tensor

    return _is_2d(shape) and not is_vocab_tensor(name)


# ------------------------------------------------------------------ costs (for `check`)


def _iso_c_work(name: str, shape: tuple[int, ...], tasks: int, params) -> DenseWork:
    if not _spectral(name, shape):
        return NO_WORK
    m, n = shape
    return svd_work(m, n) + product_work(m, min(m, n), n)


def _iso_cts_work(name: str, shape: tuple[int, ...], tasks: int, params) -> DenseWork:
    if not _spectral(name, shape):
        return NO_WORK
    m, n = shape
    r = min(m, n)
    per_task = svd_work(m, n) + product_work(m, r, n) * 2  # projection out of the common part
    return (svd_work(m, n) + per_task * tasks + polar_work(m, r) + polar_work(n, r)
            + product_work(m, r, n))


def _tsv_m_work(name: str, shape: tuple[int, ...], tasks: int, params) -> DenseWork:
    if not _spectral(name, shape):
        return NO_WORK
    m, n = shape
    k = _rank_of(shape, params["rank_fraction"], tasks)
    kept = min(tasks * k, min(m, n))
    return (top_svd_work(m, n, k, params["randomized_svd"]) * tasks + polar_work(m, kept)
            + polar_work(n, kept) + product_work(m, kept, n))


def _cart_work(name: str, shape: tuple[int, ...], tasks: int, params) -> DenseWork:
    if not _is_2d(shape):
        return NO_WORK
    m, n = shape
    k = _rank_of(shape, params["rank_fraction"])
    return (top_svd_work(m, n, k, params["randomized_svd"]) + product_work(m, k, n)) * tasks


def _star_work(name: str, shape: tuple[int, ...], tasks: int, params) -> DenseWork:
    if not _spectral(name, shape):
        return NO_WORK
    m, n = shape
    return (svd_work(m, n) + product_work(m, min(m, n), n)) * tasks


def _wudi_work(name: str, shape: tuple[int, ...], tasks: int, params) -> DenseWork:
    if not _spectral(name, shape):
        return NO_WORK
    rows, cols = shape
    small, large = sorted((tasks * rows, cols))
    return (product_work(rows, cols, rows, float64=True) * tasks  # τᵢ·τᵢᵀ
            + product_work(small, large, small, float64=True) + eigh_work(small)  # Gram, pinv
            + product_work(small, small, small, float64=True)
            + product_work(large, small, small, float64=True)
            + product_work(rows, tasks * rows, cols, float64=True))  # E·(Aᵀ)⁺


def _svc_work(name: str, shape: tuple[int, ...], tasks: int, params) -> DenseWork:
    if not _spectral(name, shape):
        return NO_WORK
    m, n = shape
    r = min(m, n)
    return svd_work(m, n) + product_work(m, n, r) * tasks + product_work(m, r, n)


def _sum_tasks(m: MergeInputs, base: torch.Tensor) -> torch.Tensor:
    acc = torch.zeros_like(base)
    for tau, p in m.task_vectors(base):
        acc.add_(tau.mul_(p["weight"]))
    return acc


# ------------------------------------------------------------------ element-wise


@merge_method(
    "magmax",
    base=BasePolicy.REQUIRED,
    params=[_WEIGHT, _LAMBDA],
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
    params=[_WEIGHT, _TALL, _K, _LAMBDA],
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
    mtl = _sum_tasks(m, base)
    keep = _consensus_mask(m.task_vectors(base), mtl, m.params["k"])
    return base.add_(mtl.mul_(keep).mul_(m.params["lambda"]))


@merge_method(
    "consensus_ties",
    base=BasePolicy.REQUIRED,
    params=[_WEIGHT, Param("density", float, 1.0, Scope.NON_BASE,
                           "fraction of task-vector entries TIES keeps"),
            _TALL, _K, Param("normalize", bool, True, doc="TIES' division by the agreeing weights"),
            _LAMBDA],
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
    merged = generalized_task_arithmetic(m, _magnitude, consensus=True)
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


# ------------------------------------------------------------------ spectral

_ALPHA = Param("lambda", float, 1.0, doc="scale α of the merged task matrix")


@merge_method(
    "iso_c",
    compute=_iso_c_work,
    base=BasePolicy.REQUIRED,
    params=[_WEIGHT, _ALPHA],
    extensions=(LINES,),
    min_non_base=1,
    lazy_inputs=True,
    temp_buffers=3.0,
    seconds_per_gb=2.0,
    reference="https://arxiv.org/abs/2502.04959",
)
def iso_c(m: MergeInputs) -> torch.Tensor:
    """Iso-C: task arithmetic with a flat (isotropic) spectrum.

    `M = Σ wᵢτᵢ = U·S·Vᵀ`; the result is `θ₀ + α·s̄·U·Vᵀ` with `s̄` the mean singular
    value, so every direction of the merged task matrix has the same strength. Streaming."""
    if not _is_matrix(m):
        return _ta(m)
    base = m.base
    u, s, vh = svd(_sum_tasks(m, base))
    return base.add_((u @ vh).mul_(s.mean() * m.params["lambda"]))


@merge_method(
    "iso_cts",
    compute=_iso_cts_work,
    base=BasePolicy.REQUIRED,
    params=[_WEIGHT, Param("common_fraction", float, 0.8,
                           doc="share of the directions taken from the common subspace"),
            _ALPHA],
    extensions=(LINES,),
    min_non_base=1,
    lazy_inputs=True,
    temp_buffers=4.0,
    seconds_per_gb=3.0,
    reference="https://arxiv.org/abs/2502.04959",
)
def iso_cts(m: MergeInputs) -> torch.Tensor:
    """Iso-CTS: Iso-C over a common subspace plus task-specific directions.

    With `r = min(rows, cols)`: the top `k = ⌊f·r⌋` singular directions of `M = Σ wᵢτᵢ`
    form the common subspace; each task adds its top `⌊(r − k)/T⌋` directions after the
    common left subspace is projected out of `wᵢτᵢ`. The concatenated left and right
    vectors are orthogonalised (polar factor) and given one singular value, the mean of
    the selected ones: `θ₀ + α·s̄·U⊥·V⊥ᵀ`. Two streaming passes."""
    if not _is_matrix(m):
        return _ta(m)
    base = m.base
    u, s, vh = full_svd(_sum_tasks(m, base))
    r = s.numel()
    k = max(1, min(r, int(m.params["common_fraction"] * r)))
    k = min(k, numerical_rank(s, base.shape))
    per_task = (r - k) // max(1, m.n_tasks)
    us, vs, values = [u[:, :k]], [vh[:k].T], [s[:k]]
    if per_task > 0:
        common = u[:, :k]
        for tau, p in m.task_vectors(base):
            tau.mul_(p["weight"])
            tau.sub_(common @ (common.T @ tau))
            tu, ts, tvh = full_svd(tau)
            # what is left may be only rounding noise: keep directions that are real
            # relative to the merged matrix, not to the residue itself
            n = min(per_task, int((ts > float(s[0]) * max(base.shape)
                                   * torch.finfo(ts.dtype).eps * 8).sum()))
            us.append(tu[:, :n])
            vs.append(tvh[:n].T)
            values.append(ts[:n])
    mean = torch.cat(values).mean()
    merged = polar(torch.cat(us, 1)) @ polar(torch.cat(vs, 1)).T
    return base.add_(merged.mul_(mean * m.params["lambda"]))


def _rank_of(shape: tuple[int, ...], fraction: float, tasks: int = 1) -> int:
    """Directions kept: ``⌊fraction·min(shape)/tasks⌋``, at least one."""
    return max(1, int(fraction * min(shape) / tasks))


@merge_method(
    "tsv_m",
    compute=_tsv_m_work,
    base=BasePolicy.REQUIRED,
    params=[_WEIGHT, Param("rank_fraction", float, 1.0,
                           doc="share of the full rank split among the tasks: each keeps "
                               "⌊rank_fraction·r/T⌋ singular directions"),
            _ALPHA, _RANDOMIZED],
    extensions=(LINES,),
    min_non_base=1,
    lazy_inputs=True,
    temp_buffers=4.0,
    seconds_per_gb=2.0,
    reference="https://arxiv.org/abs/2412.00081",
)
def tsv_m(m: MergeInputs) -> torch.Tensor:
    """TSV-M: merge the tasks' top singular vectors after decorrelating them.

    Each `wᵢτᵢ = Uᵢ·Sᵢ·Vᵢᵀ` keeps its top `k = ⌊rank_fraction·r/T⌋` directions; the
    concatenations `U = [U₁ₖ …]`, `V = [V₁ₖ …]` are replaced by their polar factors and
    the result is `θ₀ + α·U⊥·diag(S₁ₖ, …)·V⊥ᵀ`. Streaming: one expert at a time, only the
    truncated factors are kept."""
    if not _is_matrix(m):
        return _ta(m)
    base = m.base
    k = _rank_of(base.shape, m.params["rank_fraction"], m.n_tasks)
    us, ss, vs = [], [], []
    randomized = m.params["randomized_svd"]
    for i, (tau, p) in enumerate(m.task_vectors(base)):
        u, s, vh = top_svd(tau.mul_(p["weight"]), k, randomized=randomized,
                           name=f"{m.tensor_name}\0{i}")
        us.append(u)
        ss.append(s)
        vs.append(vh.T)
    u_orth, v_orth = polar(torch.cat(us, 1)), polar(torch.cat(vs, 1))
    merged = (u_orth * torch.cat(ss)) @ v_orth.T
    return base.add_(merged.mul_(m.params["lambda"]))


def _low_rank(x: torch.Tensor, k: int, randomized: bool = False, name: str = "") -> torch.Tensor:
    u, s, vh = top_svd(x, k, randomized=randomized, name=name)
    return (u * s) @ vh


@merge_method(
    "cart",
    compute=_cart_work,
    base=BasePolicy.OPTIONAL,
    params=[Param("rank_fraction", float, 0.08,
                  doc="rank kept of each centred task vector, as a share of the full rank"),
            Param("lambda", float, 1.0, doc="scale of the summed low-rank vectors"),
            _RANDOMIZED],
    min_non_base=1,
    lazy_inputs=True,
    temp_buffers=3.0,
    seconds_per_gb=3.0,
    reference="https://arxiv.org/abs/2412.12153",
    differences="A base_model, if given, is not used: CART centres on the models' mean.",
)
def cart(m: MergeInputs) -> torch.Tensor:
    """CART: centred arithmetic with rank-reduced task vectors.

    `θ̄ = mean θᵢ` (the base, if any, excluded); `θ̄ + λ·Σᵢ LRₖ(θᵢ − θ̄)` with `LRₖ` the
    best rank-`k` approximation, `k = ⌊rank_fraction·r⌋`. Non-matrix tensors: `θ̄`. Two
    streaming passes."""
    idx = [i for i in range(len(m.tensors)) if i != m.base_index]
    mean = m.tensors[idx[0]].clone()
    for i in idx[1:]:
        mean.add_(m.tensors[i])
    mean.div_(len(idx))
    if not _is_2d(tuple(mean.shape)):
        return mean
    k = _rank_of(mean.shape, m.params["rank_fraction"])
    acc = torch.zeros_like(mean)
    for i in idx:
        acc.add_(_low_rank(torch.sub(m.tensors[i], mean), k, m.params["randomized_svd"],
                           f"{m.tensor_name}\0{i}"))
    return mean.add_(acc.mul_(m.params["lambda"]))


@merge_method(
    "star",
    compute=_star_work,
    base=BasePolicy.REQUIRED,
    params=[_WEIGHT, Param("eta", float, 0.4,
                           doc="share of each task matrix's nuclear norm its kept directions "
                               "must reach"),
            Param("normalize", bool, True, doc="divide by the sum of the weights (an average)"),
            _LAMBDA],
    extensions=(LINES,),
    min_non_base=1,
    lazy_inputs=True,
    temp_buffers=3.0,
    seconds_per_gb=2.0,
    reference="https://arxiv.org/abs/2502.10339",
)
def star(m: MergeInputs) -> torch.Tensor:
    """STAR: spectral truncation and rescale of every task matrix, then an average.

    Each `τᵢ = Uᵢ·Sᵢ·Vᵢᵀ` keeps its fewest top directions whose singular values sum to at
    least `eta` of the total, rescaled so the sum (nuclear norm) is unchanged; the result is
    `θ₀ + λ·Σ wᵢτ̂ᵢ / Σ wᵢ` (without normalize: no division). Streaming."""
    base = m.base
    acc = torch.zeros_like(base)
    total_weight = 0.0
    for tau, p in m.task_vectors(base):
        total_weight += p["weight"]
        if not _is_matrix(m):
            acc.add_(tau, alpha=p["weight"])
            continue
        u, s, vh = full_svd(tau)
        share = torch.cumsum(s, 0) / s.sum().clamp_min(1e-30)
        k = int(torch.searchsorted(share, torch.tensor(m.params["eta"], dtype=share.dtype)
                                   - 1e-7)) + 1
        k = max(1, min(k, s.numel()))
        kept = s[:k] * (s.sum() / s[:k].sum().clamp_min(1e-30))
        acc.add_((u[:, :k] * kept) @ vh[:k], alpha=p["weight"])
    if m.params["normalize"]:
        acc.div_(total_weight if abs(total_weight) > 1e-8 else 1.0)
    return base.add_(acc.mul_(m.params["lambda"]))


# ------------------------------------------------------------------ WUDI


@merge_method(
    "wudi",
    compute=_wudi_work,
    base=BasePolicy.REQUIRED,
    params=[_WEIGHT, _LAMBDA],
    extensions=(LINES,),
    min_non_base=1,
    lazy_inputs=True,
    temp_buffers=4.0,
    seconds_per_gb=3.0,
    reference="https://arxiv.org/abs/2503.08099",
    differences="Solves WUDI's quadratic objective exactly (minimum-norm least squares) "
                "instead of running the paper's Adam for a few hundred steps.",
)
def wudi(m: MergeInputs) -> torch.Tensor:
    """WUDI: the task matrix closest to every task on that task's own input subspace.

    Minimises `Σᵢ wᵢ·‖(τ − τᵢ)·τᵢᵀ‖²_F / ‖τᵢ‖²_F` over `τ` exactly: with the stacked
    `A = [√(wᵢ/‖τᵢ‖²)·τᵢ]` and `E = [√(wᵢ/‖τᵢ‖²)·τᵢτᵢᵀ]`, the minimum-norm solution is
    `τ* = E·(Aᵀ)⁺`, computed through the smaller of the Gram matrices `AᵀA` and `AAᵀ` in
    float64. Result `θ₀ + λ·τ*`."""
    if not _is_matrix(m):
        return _ta(m)
    base = m.base
    blocks_a, blocks_e = [], []
    for tau, p in m.task_vectors(base):
        t = tau.double()
        norm2 = float((t * t).sum())
        if norm2 == 0 or p["weight"] == 0:
            continue
        c = (p["weight"] / norm2) ** 0.5
        blocks_a.append(t * c)
        blocks_e.append((t @ t.T).mul_(c))
    if not blocks_a:
        return base
    a = torch.cat(blocks_a, 0)  # (T·rows, cols)
    e = torch.cat(blocks_e, 1)  # (rows, T·rows)
    solution = e @ _pinv_transpose(a)
    return base.add_(solution.to(base.dtype).mul_(m.params["lambda"]))


def _pinv_transpose(a: torch.Tensor) -> torch.Tensor:
    """``(Aᵀ)⁺`` through the smaller Gram matrix (symmetric eigendecomposition)."""
    if a.shape[0] <= a.shape[1]:  # (Aᵀ)⁺ = (A·Aᵀ)⁺·A
        return _pinv_psd(a @ a.T) @ a
    return a @ _pinv_psd(a.T @ a)  # (Aᵀ)⁺ = A·(AᵀA)⁺


def _pinv_psd(g: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(g)
    cutoff = values.abs().max() * g.shape[0] * torch.finfo(g.dtype).eps
    inverse = torch.where(values > cutoff, 1.0 / values, torch.zeros_like(values))
    return (vectors * inverse) @ vectors.T


# ------------------------------------------------------------------ PCB


@merge_method(
    "pcb",
    base=BasePolicy.REQUIRED,
    params=[Param("ratio", float, 0.1, doc="share of each task vector's entries kept, by "
                                          "balance score"),
            _LAMBDA],
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


# ------------------------------------------------------------------ SVC


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
    compute=_svc_work,
    base=BasePolicy.REQUIRED,
    params=[_WEIGHT, Param("svc_alpha", float, 1.0, doc="floor α of the per-task ratios"),
            _LAMBDA],
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
    if not _is_matrix(m):
        return _ta(m)
    base = m.base
    weighted = (tau.mul_(p["weight"]) for tau, p in m.task_vectors(base))
    calibrated = singular_value_calibration(_sum_tasks(m, base), weighted,
                                            m.params["svc_alpha"])
    return base.add_(calibrated.mul_(m.params["lambda"]))

"""Spectral merges: Iso-C, Iso-CTS, TSV-M, CART, STAR and WUDI.

Notation as in ``task_vectors``: base ``θ₀``, experts ``θᵢ``, task vectors ``τᵢ = θᵢ − θ₀``
(``i = 1..T``), weights ``wᵢ`` (default 1), global scale ``λ``. These methods belong
together because each treats a task vector as a linear map and merges in a basis of its
singular (or eigen) vectors: they flatten, truncate, decorrelate or rescale the spectra of
the task matrices or of their sum, where element-wise methods see independent numbers.
Every method works one weight matrix at a time; tensors that are not matrices (norms,
biases, token embeddings and LM heads) fall back to task arithmetic
``θ₀ + λ·Σ wᵢτᵢ``, as the papers do for parameters outside their scope (CART, which
decomposes every 2-D tensor, keeps the models' mean for the rest). Methods marked
*streaming* read the experts one at a time (``lazy_inputs``), in one or two passes, and keep
only running sums or truncated factors, so memory does not grow with the number of experts.
SVDs run in float32 on the merge device (float64 for the small Gram systems of WUDI). Each
method declares its linear algebra (``*_work``) for ``check``'s cost estimate.
"""

from __future__ import annotations

from .._torch import torch
from .linalg import (
    NO_WORK,
    DenseWork,
    full_svd,
    numerical_rank,
    polar,
    polar_work,
    psd_inverse,
    psd_inverse_work,
    product_work,
    svd,
    svd_work,
    top_svd,
    top_svd_work,
)
from .registry import LINES, BasePolicy, MergeInputs, Param, merge_method
from .task_vectors import (
    LAMBDA,
    WEIGHT,
    is_2d,
    is_spectral_input,
    is_spectral_matrix,
    streaming_task_arithmetic,
    sum_task_vectors,
)

_ALPHA = Param("lambda", float, 1.0, doc="scale α of the merged task matrix")
_RANDOMIZED = Param("randomized_svd", bool, None,
                    doc="top singular directions by a seeded randomized SVD (much faster "
                        "when few are kept; approximate) instead of an exact one; unset: "
                        "randomized for a matrix when check's cost model expects it to be "
                        "at least twice as fast")


def _rank_of(shape: tuple[int, ...], fraction: float, tasks: int = 1) -> int:
    """Directions kept: ``⌊fraction·min(shape)/tasks⌋``, at least one."""
    return max(1, int(fraction * min(shape) / tasks))


# ------------------------------------------------------------------ costs (for `check`)


def _iso_c_work(name: str, shape: tuple[int, ...], tasks: int, params) -> DenseWork:
    if not is_spectral_matrix(name, shape):
        return NO_WORK
    m, n = shape
    return svd_work(m, n) + product_work(m, min(m, n), n)


def _iso_cts_work(name: str, shape: tuple[int, ...], tasks: int, params) -> DenseWork:
    if not is_spectral_matrix(name, shape):
        return NO_WORK
    m, n = shape
    r = min(m, n)
    k = max(1, min(r, int(params["common_fraction"] * r)))
    per = (r - k) // tasks
    if per == 0:  # no task-specific directions: the common ones only
        return svd_work(m, n) + polar_work(n, k) + product_work(m, k, n)
    per_task = (top_svd_work(m, n, per, params.get("randomized_svd"))
                + product_work(m, k, n) * 2)  # projection out of the common part
    return (svd_work(m, n) + per_task * tasks + polar_work(m, per * tasks) + polar_work(n, r)
            + product_work(m, r, n))


def _tsv_m_work(name: str, shape: tuple[int, ...], tasks: int, params) -> DenseWork:
    if not is_spectral_matrix(name, shape):
        return NO_WORK
    m, n = shape
    k = _rank_of(shape, params["rank_fraction"], tasks)
    kept = min(tasks * k, min(m, n))
    return (top_svd_work(m, n, k, params.get("randomized_svd")) * tasks + polar_work(m, kept)
            + polar_work(n, kept) + product_work(m, kept, n))


def _cart_work(name: str, shape: tuple[int, ...], tasks: int, params) -> DenseWork:
    if not is_2d(shape):
        return NO_WORK
    m, n = shape
    k = _rank_of(shape, params["rank_fraction"])
    return (top_svd_work(m, n, k, params.get("randomized_svd")) + product_work(m, k, n)) * tasks


def _star_work(name: str, shape: tuple[int, ...], tasks: int, params) -> DenseWork:
    if not is_spectral_matrix(name, shape):
        return NO_WORK
    m, n = shape
    return (svd_work(m, n) + product_work(m, min(m, n), n)) * tasks


def _wudi_work(name: str, shape: tuple[int, ...], tasks: int, params) -> DenseWork:
    if not is_spectral_matrix(name, shape):
        return NO_WORK
    rows, cols = shape
    if cols <= tasks * rows:  # feature side, streaming: Gᵢ = τᵢᵀτᵢ and τᵢ·Gᵢ per task
        return ((product_work(cols, rows, cols, float64=True) * 2) * tasks
                + psd_inverse_work(cols) + product_work(rows, cols, cols, float64=True))
    small = tasks * rows
    return (product_work(rows, cols, rows, float64=True) * tasks  # τᵢ·τᵢᵀ
            + product_work(small, cols, small, float64=True) + psd_inverse_work(small)
            + product_work(small, small, cols, float64=True)
            + product_work(rows, small, cols, float64=True))  # E·(Aᵀ)⁺


# ------------------------------------------------------------------ methods


@merge_method(
    "iso_c",
    compute=_iso_c_work,
    base=BasePolicy.REQUIRED,
    params=[WEIGHT, _ALPHA],
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
    if not is_spectral_input(m):
        return streaming_task_arithmetic(m)
    base = m.base
    u, s, vh = svd(sum_task_vectors(m, base))
    return base.add_((u @ vh).mul_(s.mean() * m.params["lambda"]))


@merge_method(
    "iso_cts",
    compute=_iso_cts_work,
    base=BasePolicy.REQUIRED,
    params=[WEIGHT, Param("common_fraction", float, 0.8,
                          doc="share of the directions taken from the common subspace"),
            _ALPHA, _RANDOMIZED],
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
    common left subspace is projected out of `wᵢτᵢ` (few: by default found by the
    randomized SVD where it pays). The concatenated left and right
    vectors are orthogonalised (polar factor) and given one singular value, the mean of
    the selected ones: `θ₀ + α·s̄·U⊥·V⊥ᵀ`. Two streaming passes."""
    if not is_spectral_input(m):
        return streaming_task_arithmetic(m)
    base = m.base
    u, s, vh = full_svd(sum_task_vectors(m, base))
    r = s.numel()
    k = max(1, min(r, int(m.params["common_fraction"] * r)))
    k = min(k, numerical_rank(s, base.shape))
    per_task = (r - k) // max(1, m.n_tasks)
    us, vs, values = [u[:, :k]], [vh[:k].T], [s[:k]]
    if per_task > 0:
        common = u[:, :k]
        for i, (tau, p) in enumerate(m.task_vectors(base)):
            tau.mul_(p["weight"])
            tau.sub_(common @ (common.T @ tau))
            tu, ts, tvh = top_svd(tau, per_task, randomized=m.params.get("randomized_svd"),
                                  name=f"{m.tensor_name}\0{i}")
            # what is left may be only rounding noise: keep directions that are real
            # relative to the merged matrix, not to the residue itself
            n = min(per_task, int((ts > float(s[0]) * max(base.shape)
                                   * torch.finfo(ts.dtype).eps * 8).sum()))
            us.append(tu[:, :n])
            vs.append(tvh[:n].T)
            values.append(ts[:n])
    mean = torch.cat(values).mean()
    # the tasks' left vectors are orthogonal to the common ones (projected out), so the
    # left polar factor is the common block beside the polar factor of the tasks' block
    tasks_left = torch.cat(us[1:], 1) if len(us) > 1 else us[0][:, :0]
    left = torch.cat([us[0], polar(tasks_left)], 1) if tasks_left.shape[1] else us[0]
    merged = left @ polar(torch.cat(vs, 1)).T
    return base.add_(merged.mul_(mean * m.params["lambda"]))


@merge_method(
    "tsv_m",
    compute=_tsv_m_work,
    base=BasePolicy.REQUIRED,
    params=[WEIGHT, Param("rank_fraction", float, 1.0,
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
    if not is_spectral_input(m):
        return streaming_task_arithmetic(m)
    base = m.base
    k = _rank_of(base.shape, m.params["rank_fraction"], m.n_tasks)
    us, ss, vs = [], [], []
    randomized = m.params.get("randomized_svd")
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
    if not is_2d(tuple(mean.shape)):
        return mean
    k = _rank_of(mean.shape, m.params["rank_fraction"])
    acc = torch.zeros_like(mean)
    for j, i in enumerate(idx):  # seeded by the model's place among the merged ones
        acc.add_(_low_rank(torch.sub(m.tensors[i], mean), k, m.params.get("randomized_svd"),
                           f"{m.tensor_name}\0{j}"))
    return mean.add_(acc.mul_(m.params["lambda"]))


@merge_method(
    "star",
    compute=_star_work,
    base=BasePolicy.REQUIRED,
    params=[WEIGHT, Param("eta", float, 0.4,
                          doc="share of each task matrix's nuclear norm its kept directions "
                              "must reach"),
            Param("normalize", bool, True, doc="divide by the sum of the weights (an average)"),
            LAMBDA],
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
        if not is_spectral_input(m):
            acc.add_(tau, alpha=p["weight"])
            continue
        u, s, vh = full_svd(tau)
        share = torch.cumsum(s, 0) / s.sum().clamp_min(1e-30)
        eta = torch.tensor(m.params["eta"], dtype=share.dtype, device=share.device)
        k = int(torch.searchsorted(share, eta - 1e-7)) + 1
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
    params=[WEIGHT, LAMBDA],
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

    Minimises `Σᵢ wᵢ·‖(τ − τᵢ)·τᵢᵀ‖²_F / ‖τᵢ‖²_F` over `τ` exactly (float64). With
    `cᵢ² = wᵢ/‖τᵢ‖²_F` the minimum-norm solution is `τ* = (Σ cᵢ²·τᵢ·τᵢᵀτᵢ)·G⁺`,
    `G = Σ cᵢ²·τᵢᵀτᵢ` (columns × columns), summed one expert at a time (streaming). When
    the stacked rows `T·rows` are fewer than the columns the same solution is taken through
    the smaller Gram matrix of the stacked `A = [cᵢ·τᵢ]`: `τ* = E·(Aᵀ)⁺`,
    `E = [cᵢ·τᵢτᵢᵀ]`, `(Aᵀ)⁺ = (A·Aᵀ)⁺·A`. Result `θ₀ + λ·τ*`."""
    if not is_spectral_input(m):
        return streaming_task_arithmetic(m)
    base = m.base
    rows, cols = base.shape
    if cols <= m.n_tasks * rows:
        solution = _wudi_feature_side(m, base)
    else:
        solution = _wudi_row_side(m, base)
    if solution is None:
        return base
    return base.add_(solution.to(base.dtype).mul_(m.params["lambda"]))


def _weighted_tasks(m: MergeInputs, base: torch.Tensor):
    """``(τᵢ in float64, cᵢ² = wᵢ/‖τᵢ‖²)`` of the experts that count, one at a time."""
    for tau, p in m.task_vectors(base):
        t = tau.double()
        del tau
        norm2 = float((t * t).sum())
        if norm2 != 0 and p["weight"] != 0:
            yield t, p["weight"] / norm2


def _wudi_feature_side(m: MergeInputs, base: torch.Tensor) -> torch.Tensor | None:
    gram = rhs = None
    for t, c2 in _weighted_tasks(m, base):
        g = (t.T @ t).mul_(c2)
        term = t @ g
        gram = g if gram is None else gram.add_(g)
        rhs = term if rhs is None else rhs.add_(term)
    if gram is None:
        return None
    return rhs @ psd_inverse(gram)


def _wudi_row_side(m: MergeInputs, base: torch.Tensor) -> torch.Tensor | None:
    blocks_a, blocks_e = [], []
    for t, c2 in _weighted_tasks(m, base):
        c = c2 ** 0.5
        blocks_a.append(t * c)
        blocks_e.append((t @ t.T).mul_(c))
    if not blocks_a:
        return None
    a = torch.cat(blocks_a, 0)  # (T·rows, cols), fewer rows than columns
    e = torch.cat(blocks_e, 1)  # (rows, T·rows)
    return e @ (psd_inverse(a @ a.T) @ a)

"""Spherical merges: slerp, nuslerp, multislerp and karcher.

All four treat a tensor (or each of its rows) as a vector, split it into a direction on the
unit sphere and a length, and interpolate the directions along great circles. Each result
is a linear combination Σ cᵢ·xᵢ of the inputs whose coefficients depend only on the inputs'
dot products. So every method here works in two steps:

1. :func:`row_gram`: the dot products of the inputs, accumulated in float64 (the products of
   two float32 numbers are exact in float64, so the angles are as accurate as the data);
2. a small pure function turns them into coefficients (float64, a few numbers per vector),
   and :func:`_combine_` forms Σ cᵢ·xᵢ in the compute dtype, in place in the first input.

No method here is element-wise: the coefficients depend on whole vectors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .._torch import torch
from ..errors import MergeError
from .registry import BasePolicy, MergeInputs, Param, Scope, TensorStatistic, merge_method

_BLOCK = 1 << 20
"""Elements per input converted to float64 at a time by :func:`row_gram` (8 MB of scratch)
for up to ``_GRAM_AT_ONCE`` inputs."""

_GRAM_AT_ONCE = 3
"""Beyond this many inputs :func:`row_gram` converts fewer elements of each at a time, so
its float64 scratch (``_GRAM_AT_ONCE × _BLOCK`` numbers) does not grow with the number of
models."""

_PARALLEL = 1e-8
"""A vector whose component orthogonal to another is below this (relative to unit length)
is treated as (anti)parallel to it: its great-circle direction is undefined."""


# ------------------------------------------------------------------ shared kernels


class _GramScratch:
    """A reused float64 buffer for :func:`row_gram`: its pieces are converted into the same
    memory every time instead of fresh allocations (a streamed pass over a large tensor
    otherwise allocates and faults in megabytes per piece)."""

    def __init__(self, elements: int, device: torch.device) -> None:
        self.buffer = torch.empty(elements, dtype=torch.float64, device=device)

    def fits(self, elements: int, device: torch.device) -> bool:
        return self.buffer.numel() >= elements and self.buffer.device == device

    def view(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.buffer[:math.prod(shape)].view(shape)


def row_gram(vectors: Sequence[torch.Tensor], gram: torch.Tensor | None = None,
             scratch: _GramScratch | None = None) -> torch.Tensor:
    """Row-wise dot products of equally shaped 2-D tensors: ``G[r, i, j] = ⟨vᵢ[r], vⱼ[r]⟩``.

    Accumulated in float64 over pieces of at most ``_BLOCK`` elements per input (fewer
    beyond ``_GRAM_AT_ONCE`` inputs), so the float64 scratch stays small however large the
    tensors are and however many there are (any floating dtype: the conversion to float64
    is exact, and so is the product of two float32 numbers). Contiguous pieces are stacked
    ``[rows, k, cols]`` and multiplied by their transpose: every pair in one batched
    product, one pass over memory. Strided pieces (nuslerp's columns) are multiplied pair
    by pair and summed along their layout, which a contiguous copy would have to gather.
    ``gram``: go on accumulating into it (the next pieces of the same vectors:
    :func:`whole_gram`, which also passes its ``scratch`` along). Each piece's sums are
    symmetric by construction (its upper triangle, mirrored).
    """
    rows, n = vectors[0].shape
    k = len(vectors)
    device = vectors[0].device
    if gram is None:
        gram = torch.zeros(rows, k, k, dtype=torch.float64, device=device)
    block = _BLOCK * _GRAM_AT_ONCE // max(k, _GRAM_AT_ONCE)
    step_r = max(1, block // max(n, 1))
    step_c = max(1, min(n, block))
    elements = k * min(rows, step_r) * min(n, step_c)
    if scratch is None or not scratch.fits(elements, device):
        scratch = _GramScratch(elements, device)
    for r in range(0, rows, step_r):
        for c in range(0, n, step_c):
            pieces = [v[r:r + step_r, c:c + step_c] for v in vectors]
            if all(p.is_contiguous() for p in pieces):
                stacked = scratch.view((pieces[0].shape[0], k, pieces[0].shape[1]))
                for i, p in enumerate(pieces):
                    stacked[:, i].copy_(p)
                product = torch.bmm(stacked, stacked.transpose(1, 2))
            else:
                product = _strided_gram([p.double() for p in pieces])
            gram[r:r + step_r] += product.triu() + product.triu(1).transpose(1, 2)
    return gram


def _strided_gram(pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[rows, k, k]`` dot products of float64 pieces, pair by pair (upper triangle)."""
    k = len(pieces)
    product = torch.zeros(pieces[0].shape[0], k, k, dtype=torch.float64,
                          device=pieces[0].device)
    for i in range(k):
        for j in range(i, k):
            product[:, i, j] = torch.sum(pieces[i] * pieces[j], dim=1)
    return product


def _combine_(rows: Sequence[torch.Tensor], coefs: torch.Tensor) -> torch.Tensor:
    """Σ cᵢ·vᵢ for 2-D views ``vᵢ`` (see :func:`_as_rows`) and coefficients ``[rows, k]``.

    Written into ``rows[0]`` (and so into the tensor it views), in the inputs' dtype,
    accumulated in input order with one rounding per step.
    """
    c = coefs.to(dtype=rows[0].dtype, device=rows[0].device)
    acc = rows[0].mul_(c[:, 0:1])
    for i, v in enumerate(rows[1:], start=1):
        acc.addcmul_(v, c[:, i:i + 1])
    return acc


def _slerp_coefficients(t: float, cos: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """Coefficients ``[rows, 2]`` of ``v0, v1`` for slerp at ``t`` given cos θ per row.

    ``sin((1−t)θ)/sin θ`` and ``sin(tθ)/sin θ``; rows flagged ``linear`` ((anti)parallel
    vectors, where sin θ ≈ 0) get the lerp ``1−t`` and ``t`` instead.
    """
    theta = torch.acos(torch.where(linear, 0.0, cos))
    sin = torch.where(linear, 1.0, torch.sin(theta))  # keep the unused branch finite
    c0 = torch.where(linear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin)
    c1 = torch.where(linear, t, torch.sin(t * theta) / sin)
    return torch.stack([c0, c1], dim=-1)


def _as_rows(x: torch.Tensor, flatten: bool = True, columns: bool = False) -> torch.Tensor:
    """A 2-D view of ``x`` whose rows are the vectors to interpolate.

    ``flatten``: the whole tensor is one vector; else vectors run along the last dimension,
    or along the first (``columns``, nuslerp's ``row_wise``). ``x`` must be contiguous so
    that the result is a view (the combination is written through it).
    """
    if flatten or x.dim() < 2:
        return x.view(1, -1)
    if columns:
        return x.view(x.shape[0], -1).T
    return x.view(-1, x.shape[-1])


def _lone_input(m: MergeInputs) -> torch.Tensor | None:
    """The input itself when only one model has the tensor (mergekit's passthrough policy)."""
    return m.tensors[0] if len(m.tensors) == 1 else None


# ------------------------------------------------------------------ slerp


_GRAM_PIECE = 1 << 18
"""Elements (whole rows) per piece of :func:`whole_gram`: 2 MB of float64 scratch per
input, so the streamed pass can hold few rows of many inputs."""


def gram_piece_rows(shape: tuple[int, ...]) -> int:
    """Rows per piece of :func:`whole_gram`: whole rows of at most ``_GRAM_PIECE``
    elements (one row if a row is longer)."""
    return max(1, _GRAM_PIECE // max(1, math.prod(shape[1:])))


def whole_gram(tensors: Sequence[torch.Tensor], gram: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Gram matrix ``[1, k, k]`` of k equally shaped tensors taken as flat vectors.

    Float64 sums over pieces of whole rows (:func:`gram_piece_rows`; a 1-D tensor:
    pieces of ``_BLOCK`` elements), added in order. The pieces depend only on the shape,
    so a row block of whole pieces (:func:`gram_block_rows`) goes on accumulating into
    ``gram`` exactly the sums of the whole tensor: SLERP's and Model Stock's streamed
    first pass is bit-identical to the whole-tensor merge, and holds nothing between
    blocks but the ``k × k`` numbers."""
    x = tensors[0]
    if x.dim() < 2:
        return row_gram([t.reshape(1, -1) for t in tensors], gram)
    if gram is None:
        gram = torch.zeros(1, len(tensors), len(tensors), dtype=torch.float64,
                           device=x.device)
    step = gram_piece_rows(tuple(x.shape))
    scratch = None
    for r in range(0, x.shape[0], step):
        pieces = [t[r:r + step].reshape(1, -1) for t in tensors]
        if scratch is None:  # sized for the first (largest) piece
            scratch = _GramScratch(len(pieces) * min(pieces[0].shape[1], _BLOCK), x.device)
        row_gram(pieces, gram, scratch)
    return gram


def gram_block_rows(shape: tuple[int, ...]) -> int:
    """Rows per streamed block of a tensor merged in row chunks after a whole-tensor
    Gram matrix (SLERP, Model Stock): whole pieces of :func:`whole_gram`, about ``_BLOCK``
    elements (0: merge it whole — 1-D or at most ``_BLOCK`` elements)."""
    if len(shape) < 2 or math.prod(shape) <= _BLOCK:
        return 0
    piece = gram_piece_rows(shape)
    return piece * max(1, _BLOCK // (piece * math.prod(shape[1:])))


def _slerp_accumulate(state: tuple | None, m: MergeInputs) -> tuple | None:
    tensors, base_index = m.tensors, m.base_index
    if len(tensors) == 1:
        return None  # a lone input is passed through
    return whole_gram([tensors[base_index], tensors[1 - base_index]], state)


def _slerp_coefficients_of(gram: torch.Tensor | None, m: MergeInputs):
    """SLERP's two coefficients ``[1, 2]`` from the whole tensor's Gram matrix."""
    if gram is None:
        return None
    params = m.params
    norms = gram.diagonal(dim1=1, dim2=2).sqrt()
    norms = torch.where(norms > 1e-8, norms, 1.0)  # a zero vector stays unnormalised
    cos = (gram[:, 0, 1] / (norms[:, 0] * norms[:, 1])).clamp(-1.0, 1.0)
    return _slerp_coefficients(params["t"], cos, cos.abs() > 0.9995)


SLERP_STATISTIC = TensorStatistic(gram_block_rows, _slerp_accumulate, _slerp_coefficients_of,
                                  row_multiple=gram_piece_rows, raw_inputs=True)
"""SLERP's norms and dot product, streamed: the tensor is then merged in row chunks."""


@merge_method(
    "slerp",
    base=BasePolicy.REQUIRED,
    min_inputs=2,
    max_inputs=2,
    params=[Param("t", float, doc="interpolation factor: 0 gives the base, 1 the other model")],
    statistic=SLERP_STATISTIC,
    temp_buffers=0.0,
    seconds_per_gb=1.5,
    reference="https://en.wikipedia.org/wiki/Slerp",
    differences="""
        The norms and the dot product are accumulated in float64 (mergekit: float32 in
        chunks of 2^20 elements); the formula and the 0.9995 lerp threshold are the same.
    """,
)
def slerp(m: MergeInputs) -> torch.Tensor:
    """Spherical interpolation between the base and one other model at `t`.

    Each tensor is one flattened vector; the result follows the great circle between the
    two directions (`t` = 0 gives the base, 1 the other model), which keeps the norm of
    similar weights better than a linear average. Nearly (anti)parallel tensors
    (|cos θ| > 0.9995) are interpolated linearly.
    """
    if (lone := _lone_input(m)) is not None:
        return lone
    v0 = m.base.contiguous()
    v1 = next(x for x, _ in m.others()).contiguous()
    rows = [_as_rows(v0), _as_rows(v1)]
    coefficients = m.statistic  # row chunks: from the engine's streamed first pass
    if coefficients is None:
        coefficients = _slerp_coefficients_of(whole_gram([v0, v1]), m)
    _combine_(rows, coefficients)
    return v0


# ------------------------------------------------------------------ nuslerp


def _nuslerp_t(w1: float, w2: float) -> float:
    """Position of the second model: ``w₂/(w₁+w₂)``, 0.5 when the weights cancel."""
    total = w1 + w2
    return 0.5 if abs(total) < 1e-6 else w2 / total


@merge_method(
    "nuslerp",
    base=BasePolicy.OPTIONAL,
    min_inputs=2,
    max_inputs=3,
    min_non_base=2,
    max_non_base=2,
    params=[
        Param("weight", float, scope=Scope.NON_BASE,
              doc="relative weight; t = w₂/(w₁+w₂) (0.5 if the weights cancel)"),
        Param("nuslerp_flatten", bool, True, doc="treat each tensor as one vector"),
        Param("nuslerp_row_wise", bool, False,
              doc="without flatten: interpolate vectors along the first dimension (columns "
                  "of a [out, in] matrix) instead of the last"),
    ],
    temp_buffers=0.0,
    seconds_per_gb=3.5,
    reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp",
    differences="""
        Cosines are accumulated in float64 (mergekit: the input dtype); the (anti)parallel
        test 1 − cos²θ ≤ 1e-16 is therefore decided on exact cosines.
    """,
)
def nuslerp(m: MergeInputs) -> torch.Tensor:
    """Slerp of two models at t = w₂/(w₁+w₂), optionally of their task vectors.

    With a base model the two task vectors (model − base) are interpolated and the base is
    added back. `nuslerp_flatten: false` interpolates each row separately (each column
    with `nuslerp_row_wise`), so every output row keeps its own direction.
    """
    if (lone := _lone_input(m)) is not None:
        return lone
    (x1, p1), (x2, p2) = m.others()
    x1, x2 = x1.contiguous(), x2.contiguous()
    base = m.base if m.base_index is not None else None
    if base is not None:
        x1.sub_(base)
        x2.sub_(base)
    layout = {"flatten": m.params["nuslerp_flatten"], "columns": m.params["nuslerp_row_wise"]}
    v1, v2 = _as_rows(x1, **layout), _as_rows(x2, **layout)
    gram = row_gram([v1, v2])
    norms = gram.diagonal(dim1=1, dim2=2).sqrt().clamp(min=1e-7)
    cos = (gram[:, 0, 1] / (norms[:, 0] * norms[:, 1])).clamp(-1.0, 1.0)
    linear = 1.0 - cos.square() <= _PARALLEL ** 2
    _combine_([v1, v2], _slerp_coefficients(_nuslerp_t(p1["weight"], p2["weight"]), cos, linear))
    return x1.add_(base) if base is not None else x1


# ------------------------------------------------------------------ multislerp


def _check_weight_sum(name: str, params: Mapping[str, Any],
                      model_params: Sequence[Mapping[str, Any]], base_index: int | None) -> None:
    weights = [p["weight"] for i, p in enumerate(model_params) if i != base_index]
    if params["normalize_weights"] and len(weights) > 1 and sum(weights) == 0:
        raise MergeError(f"multislerp: the weights of tensor '{name}' sum to zero ({weights}), "
                         "so they cannot be normalized; change the weights or set "
                         "'normalize_weights: false'")


def _multislerp_coefficients(gram: torch.Tensor, weights: list[float],
                             eps: float) -> torch.Tensor | None:
    """Coefficients of the inputs for multislerp, from their Gram matrix ``[k, k]``.

    mergekit maps the unit vectors uᵢ = xᵢ/(‖xᵢ‖+eps) to the tangent space at
    m̂ = m/‖m‖, m = Σ wᵢuᵢ, sums the weighted tangents τ = Σ wᵢ(uᵢ − ⟨uᵢ,m̂⟩m̂) and maps back
    with r = cos(‖τ‖+eps)·m̂ + sin(‖τ‖+eps)·τ/(‖τ‖+eps). But τ = m − ⟨m,m̂⟩m̂ = 0 exactly,
    so r = cos(eps)·m̂, and the output r·Σ wᵢ‖xᵢ‖ is a multiple of m: computed here in
    closed form (mergekit's explicit τ is float32 rounding noise).

    Returns None when ‖m‖ < eps with more than two inputs (no direction to return).
    """
    w = torch.tensor(weights, dtype=torch.float64, device=gram.device)
    norms = gram.diagonal().sqrt()
    c = w / (norms + eps)  # m = Σ cᵢ·xᵢ
    mean_norm = torch.dot(c, gram @ c).clamp(min=0.0).sqrt()
    if mean_norm < eps:
        return w if len(weights) == 2 else None  # two antipodal inputs: their weighted sum
    return c * (math.cos(eps) * torch.dot(w, norms) / mean_norm)


@merge_method(
    "multislerp",
    base=BasePolicy.OPTIONAL,
    min_non_base=1,
    params=[
        Param("weight", float, scope=Scope.NON_BASE, doc="weight of the model"),
        Param("normalize_weights", bool, True, doc="divide the weights by their sum"),
        Param("eps", float, 1e-8, doc="small constant for numerical stability"),
    ],
    temp_buffers=0.0,
    seconds_per_gb=3.5,
    reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    check=_check_weight_sum,
    differences="""
        Weights that sum to zero with normalize_weights are an error at plan time naming
        the tensor and the weights (mergekit divides by zero and writes NaN). The result is
        computed in closed form (the weighted tangent vector at the mean vanishes
        identically), with float64 dot products; it agrees with mergekit's explicit
        projection to float32 rounding.
    """,
)
def multislerp(m: MergeInputs) -> torch.Tensor:
    """Spherical weighted average of any number of models (or of their task vectors).

    The directions of the inputs are averaged on the unit sphere (the tangent-space
    barycentre at their normalised weighted mean) and the result gets the weighted mean
    of the input norms. With a base model the task vectors (model − base) are merged and
    the base added back. A single model is returned unchanged.
    """
    others = m.others()
    if len(others) == 1:
        return others[0][0]
    xs = [x.contiguous() for x, _ in others]
    weights = [p["weight"] for _, p in others]
    if m.params["normalize_weights"]:
        total = sum(weights)
        weights = [w / total for w in weights]
    base = m.base if m.base_index is not None else None
    if base is not None:
        for x in xs:
            x.sub_(base)
    rows = [_as_rows(x) for x in xs]
    coefs = _multislerp_coefficients(row_gram(rows)[0], weights, m.params["eps"])
    if coefs is None and base is not None and not any(bool(x.any()) for x in xs):
        return base  # every model left this tensor at the base: nothing to merge
    if coefs is None:
        raise MergeError(f"multislerp: the weighted mean direction of tensor '{m.tensor_name}' "
                         "is zero (antipodal inputs whose weights cancel, or inputs equal to "
                         "the base), so it has no direction; change the weights")
    _combine_(rows, coefs[None])
    return xs[0].add_(base) if base is not None else xs[0]


# ------------------------------------------------------------------ karcher


def _karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Coefficients of the inputs for their equal-weight Karcher mean, from their Gram matrix.

    mergekit iterates on the unit vectors uᵢ = xᵢ/‖xᵢ‖ (inputs with ‖xᵢ‖ ≤ tol left out):
    start at the normalised mean u (the first unit if that is shorter than tol), then up to
    ``max_iter`` times T = Σ αᵢ·θᵢ/sin θᵢ·(uᵢ − cos θᵢ·u) over inputs with θᵢ ≥ tol, stop
    when ‖T‖ < tol, else u ← cos‖T‖·u + sin‖T‖·T/‖T‖, renormalised. Every iterate is a
    combination u = Σ βᵢuᵢ, so the same iteration runs here on β with the Gram matrix of
    the units: N² dot products in all instead of about 2N passes over the tensors per
    iteration. An input (anti)parallel to u has no tangent direction and is skipped (as
    in mergekit, where uᵢ − cos θᵢ·u is then exactly zero).

    The output Σ(1/N)‖xᵢ‖·u keeps the mean norm of all inputs.
    """
    squares = gram.diagonal()
    norms = squares.sqrt()
    coefs = torch.zeros_like(norms)
    valid = (norms > tol).nonzero().flatten()
    if len(valid) == 0:
        return coefs
    # ⟨uᵢ,uⱼ⟩ = gᵢⱼ/√(gᵢᵢgⱼⱼ): exactly −1 for x and −x, since √(g·g) = g in floating point
    units = gram[valid][:, valid] / torch.outer(squares[valid], squares[valid]).sqrt()
    units = units.clamp(-1.0, 1.0).fill_diagonal_(1.0)
    alpha = torch.full((len(valid),), 1.0 / len(valid), dtype=torch.float64,
                       device=gram.device)

    def norm(v: torch.Tensor) -> torch.Tensor:
        return torch.dot(v, units @ v).clamp(min=0.0).sqrt()

    eye = torch.eye(len(valid), dtype=torch.float64, device=gram.device)
    mean_norm = norm(alpha)
    beta = eye[0].clone() if mean_norm < tol else alpha / mean_norm
    for _ in range(max_iter):
        cos = (units @ beta).clamp(-1.0, 1.0)
        theta = torch.acos(cos)
        directions = eye - cos[:, None] * beta  # uᵢ − cos θᵢ·u, one per row
        lengths = torch.einsum("ij,jk,ik->i", directions, units, directions).clamp(min=0.0).sqrt()
        active = (theta >= tol) & (lengths > _PARALLEL)
        scale = torch.where(active, alpha * theta / torch.where(active, lengths, 1.0), 0.0)
        tangent = scale @ directions
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        beta = torch.cos(tangent_norm) * beta + torch.sin(tangent_norm) * tangent / tangent_norm
        if (unit_norm := norm(beta)) > tol:
            beta = beta / unit_norm
    coefs[valid] = norms.mean() * beta / norms[valid]
    return coefs


@merge_method(
    "karcher",
    base=BasePolicy.IGNORED,
    params=[
        Param("max_iter", int, 10, doc="maximum number of iterations"),
        Param("tol", float, 1e-5, doc="stop when a step is shorter than this; angles and "
                                      "input norms below it are ignored"),
    ],
    temp_buffers=0.0,
    seconds_per_gb=3.5,
    reference="https://arxiv.org/abs/2603.04972",
    differences="""
        The iteration runs on the inputs' Gram matrix in float64 instead of on float32
        tensors: the same iterates in exact arithmetic, so the results agree to float32
        rounding, and much faster when many iterations are needed.
    """,
)
def karcher(m: MergeInputs) -> torch.Tensor:
    """Karcher (Riemannian) mean of the models' directions, with their mean norm.

    All inputs get equal weight; a configured base model is just another input and takes
    part in the mean (as in mergekit). The mean direction is the point on the unit sphere
    that minimises the summed squared great-circle distances to the inputs, found by
    iterating (up to `max_iter`, until the step is below `tol`). A single model is
    returned unchanged.
    """
    if (lone := _lone_input(m)) is not None:
        return lone
    xs = [x.contiguous() for x in m.tensors]
    rows = [_as_rows(x) for x in xs]
    coefs = _karcher_coefficients(row_gram(rows)[0], m.params["max_iter"], m.params["tol"])
    _combine_(rows, coefs[None])
    return xs[0]

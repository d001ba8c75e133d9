"""RegMean (Jin et al., ICLR 2023): merge linear layers so that they answer every model's
calibration inputs as that model did, in closed form from the inputs' Gram matrices.

The math of one layer is ``regmean_math.regmean_solve``; this module is the method: which
tensors get it, what the others get, and what it costs. The statistics (``NAME::gram`` of
every input model) reach the method through ``MergeInputs.statistics``, planned by
``mergesmith.plan.statistics``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._torch import torch
from ..errors import MergeError
from .linalg import NO_WORK, DenseWork, product_work
from .registry import BasePolicy, MergeInputs, Param, Scope, merge_method
from .regmean_math import regmean_solve

STATISTICS = Param("statistics", str, None, Scope.NON_BASE,
                   "statistics artefact of the model (a file from `mergesmith stats`, or a "
                   "folder holding `<model folder name>.safetensors`); default: computed "
                   "from the recipe's calibration: block")
WEIGHT = Param("weight", float, 1.0, Scope.NON_BASE,
               "the model's coefficient: scales its Gram matrix (RegMean) or Fisher, and its "
               "share of the average of the other tensors")
NORMALIZE = Param("normalize", bool, True,
                  doc="with a base: divide the task vectors of the tensors without statistics "
                      "by the sum of the weights (their weighted average; false: task "
                      "arithmetic)")
ALPHA = Param("alpha", float, 0.9,
              doc="off-diagonal scale of each Gram matrix, αG + (1−α)·diag(G) "
                  "(1: exact least squares; smaller: towards averaging)")
LAMBDA = Param("lambda", float, 1.0,
               doc="with a base: the result is x₀ + λ·(merge − x₀), for every tensor (1: the "
                   "paper's merge; like task arithmetic's λ for n models, λ > 1 moves "
                   "further from the base than the average does)")


def fallback_average(m: MergeInputs) -> torch.Tensor:
    """Tensors merged without statistics: with a base, ``x₀ + λ·Σ wᵢ(xᵢ − x₀)`` (divided by
    ``Σ wᵢ`` when ``normalize``); without one, the weighted average ``Σ wᵢxᵢ / Σ wᵢ``. With
    the defaults (``normalize``, ``λ = 1``) both are the weighted average of the models."""
    others = [i for i in range(len(m.model_params)) if i != m.base_index]
    weights = [m.model_params[i]["weight"] for i in others]
    if m.base_index is None:
        acc = torch.mul(m.tensors[others[0]], weights[0])
        for i, w in zip(others[1:], weights[1:]):
            acc.add_(m.tensors[i], alpha=w)
        return acc.div_(sum(weights))
    base = m.base
    acc = torch.zeros_like(base)
    for i, w in zip(others, weights):
        acc.add_(torch.sub(m.tensors[i], base), alpha=w)
    if m.params["normalize"]:
        acc.div_(sum(weights))
    return acc.mul_(m.params["lambda"]).add_(base)


def check_weights(method: str):
    def check(name: str, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]],
              base_index: int | None) -> None:
        weights = [p["weight"] for k, p in enumerate(model_params) if k != base_index]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise MergeError(f"{method}: the weights of tensor '{name}' must be ≥ 0 with a "
                             f"positive sum (got {weights}): they scale positive "
                             "semi-definite statistics; change the weights")
        alpha = params.get("alpha")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise MergeError(f"{method}: alpha must be in [0, 1] (tensor '{name}', got "
                             f"{alpha:g})")
    return check


def _regmean_work(name: str, shape: tuple[int, ...], tasks: int, params) -> DenseWork:
    """Per model ``Wᵢ·G'ᵢ`` (float64), one Cholesky of ``Σ G'ᵢ`` and the triangular solves
    (weight matrices only; ``check`` does not know which have Grams: all 2-D but
    embeddings)."""
    from ..arch import is_vocab_tensor

    if len(shape) != 2 or is_vocab_tensor(name) and not name.endswith("lm_head.weight"):
        return NO_WORK
    out, cols = shape
    cholesky = DenseWork(cols ** 3 / 3.0 * 2, factorizations=1)
    return (product_work(out, cols, cols, float64=True) * tasks + cholesky
            + product_work(out, cols, cols, float64=True) * 2)


_SOLVE: dict[str, Any] = dict(min_non_base=1, temp_buffers=6.0, seconds_per_gb=2.0,
                              compute=_regmean_work)
"""What RegMean and RegMean++ share: the inputs they take and the cost of the solve."""


@merge_method(
    "regmean",
    base=BasePolicy.OPTIONAL,
    params=[WEIGHT, ALPHA, NORMALIZE, LAMBDA, STATISTICS],
    statistics=("gram",),
    check=check_weights("regmean"),
    **_SOLVE,
    reference="https://arxiv.org/abs/2212.09849",
    differences="Not in mergekit. Grams come from statistics artefacts (a calibration: "
                "block or `statistics:` per model); the ridge fallback for singular Grams "
                "moves W* towards the weighted average where no input reached.",
)
def regmean(m: MergeInputs) -> torch.Tensor:
    """RegMean: per linear layer, the weight that best reproduces every model's outputs on
    its own calibration inputs (closed form from the inputs' Gram matrices).

    For a weight `Wᵢ` (`[out, in]`) with input Gram `Gᵢ = Σ x xᵀ` over model i's
    calibration tokens, `W* = (Σ wᵢ Wᵢ G'ᵢ)(Σ wᵢ G'ᵢ)⁻¹` with `G'ᵢ = α Gᵢ + (1 − α)
    diag(Gᵢ)`: with `α = 1` the least-squares solution of all models' regression problems
    at once (`min Σ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖²`); smaller `α` shrinks the cross terms, moving
    towards a per-input-feature weighted average (default 0.9; the paper tunes α per
    setting). Solved in float64 (Cholesky); a singular `Σ G'ᵢ` gets a small ridge that
    moves `W*` towards the weighted average in the directions no calibration input
    reached.

    Which tensors: every 2-D tensor whose Gram is in every model's statistics (the
    weights of linear layers: attention and MLP projections, and the LM head when the
    statistics include it). All others — embeddings, norms, biases — are merged as in
    the paper, which averages the parameters it cannot regress: the weighted average
    `Σ wᵢxᵢ / Σ wᵢ`; with a `base_model`, `x₀ + λ·Σ wᵢ(xᵢ − x₀)` divided by `Σ wᵢ` when
    `normalize` (the default: again the weighted average; `normalize: false` gives task
    arithmetic). The base model is never part of the regression: RegMean is invariant to
    it (`W* = x₀ + (Σ wᵢτᵢG'ᵢ)(Σ wᵢG'ᵢ)⁻¹`, a Gram-weighted average of the task vectors),
    so with a base, `lambda` scales that merged task vector, `x₀ + λ·(W* − x₀)`, as task
    arithmetic's λ does (an extension; `λ = 1`, the default, is the paper's method).

    Statistics: each model's calibration-input Grams (`mergesmith stats`, or the recipe's
    `calibration:` block), found by the planner before any weight is read; a Gram in some
    models and not others, or of the wrong size, is an error naming model and tensor.
    Memory per tensor: the Grams are `[in, in]` in float64 for the solve (for a 4096×11008
    down projection, ~1 GB per model), so whole tensors, not row chunks.

    RegMean++ (`regmean_plusplus`) solves the same system with each layer's Grams
    taken from the inputs the *already merged* previous layers produce."""
    idx = [i for i in range(len(m.model_params)) if i != m.base_index]
    stats = m.statistics
    if stats is None or any(stats[i] is None for i in idx):
        return fallback_average(m)
    tensors = [m.tensors[i] for i in idx]
    grams = [stats[i].gram().to(tensors[0].device) for i in idx]  # kept on the CPU
    merged = regmean_solve(tensors, grams, alpha=m.params["alpha"],
                           coefficients=[m.model_params[i]["weight"] for i in idx])
    return scale_from_base(m, merged.to(torch.promote_types(m.compute_dtype,
                                                            tensors[0].dtype)))


def scale_from_base(m: MergeInputs, merged: torch.Tensor) -> torch.Tensor:
    """With a base and ``lambda`` ≠ 1: ``x₀ + λ·(merged − x₀)``."""
    lam = m.params["lambda"]
    if m.base_index is None or lam == 1.0:
        return merged
    base = m.base.to(merged.dtype)
    return merged.sub_(base).mul_(lam).add_(base)


@merge_method(
    "regmean_plusplus",
    base=BasePolicy.OPTIONAL,
    params=[WEIGHT, ALPHA, NORMALIZE, LAMBDA],
    statistics=("gram", "merged_gram"),
    check=check_weights("regmean_plusplus"),
    **_SOLVE,
    reference="https://arxiv.org/abs/2508.03121",
    differences="Not in mergekit. Needs a calibration: block; the Grams are computed with "
                "the plan (a sequential pass over the layers, cached), not read from "
                "`mergesmith stats` artefacts.",
)
def regmean_plusplus(m: MergeInputs) -> torch.Tensor:
    """RegMean++: RegMean with each layer's input Grams taken on the hidden states of the
    already merged earlier layers, so a layer is fitted to the inputs it will see in the
    merged model.

    Same closed form and parameters as `regmean` (`W* = (Σ wᵢ Wᵢ G'ᵢ)(Σ wᵢ G'ᵢ)⁻¹`,
    `alpha`, `normalize`, `lambda`; other tensors by the weighted average or, with a base,
    task arithmetic). The difference is where `Gᵢ` comes from: the calibration tokens go
    through the *merged* embeddings and merged layers `< l`; model i's own layer `l` runs
    on those hidden states, and the inputs of its linear layers give `Gᵢ` (inside the
    layer, `o_proj`/`down_proj` inputs come from model i's own earlier sublayers). The
    head's Gram is on the merged final hidden states through each model's final norm.

    Needs a `calibration:` block (its Grams depend on the merge, so artefacts from
    `mergesmith stats` do not apply) and a whole-model recipe of one architecture (no
    slices; use `regmean` for those). Planning runs the sequential pass once — each layer
    merged with the same work items the merge then runs, so the output equals the pass's
    merge — and caches the Grams per (models, calibration tokens, parameters) in the
    statistics cache: `check` pays for the pass once, the merge reuses it. Cost: about one
    forward pass of the calibration tokens through every model and the merged model, plus
    the Gram products and one merge of the linear layers."""
    return regmean(m)

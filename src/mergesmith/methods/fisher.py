"""Fisher merging (Matena & Raffel, NeurIPS 2022): each parameter averaged with weights
proportional to each model's diagonal Fisher information there.

The Fishers (``NAME::fisher`` of every input model) reach the method through
``MergeInputs.statistics`` (row chunks: their rows only), planned by
``mergesmith.plan.statistics``, which also computes each model's normalisation.
"""

from __future__ import annotations

from .._torch import torch
from .registry import BasePolicy, MergeInputs, Param, merge_method
from .regmean import (
    LAMBDA,
    NORMALIZE,
    STATISTICS,
    WEIGHT,
    check_weights,
    fallback_average,
    scale_from_base,
)


@merge_method(
    "fisher",
    base=BasePolicy.OPTIONAL,
    params=[WEIGHT,
            Param("epsilon", float, 1e-6,
                  doc="added to every Fisher value: where all models' Fishers vanish the "
                      "result is the weighted average (MergeLM/FusionBench's "
                      "minimal_fisher_weight)"),
            Param("fisher_normalize", bool, True,
                  doc="divide each model's Fisher by its L2 norm over the whole model first "
                      "(FusionBench's normalize_fisher_weight)"),
            NORMALIZE, LAMBDA, STATISTICS],
    min_non_base=1,
    statistics=("fisher",),
    elementwise=True,
    check=check_weights("fisher"),
    temp_buffers=3.0,
    seconds_per_gb=2.0,
    reference="https://arxiv.org/abs/2111.09832",
    differences="Not in mergekit. Fishers come from statistics artefacts (a calibration: "
                "block or `statistics:` per model).",
)
def fisher(m: MergeInputs) -> torch.Tensor:
    """Fisher merging: the average of the models weighted, parameter by parameter, by their
    diagonal Fisher information.

    `x* = Σ wᵢ(F̂ᵢ + ε) ⊙ xᵢ / Σ wᵢ(F̂ᵢ + ε)`, with `Fᵢ` model i's diagonal Fisher (mean
    squared gradient of the language-model loss on its calibration data) and
    `F̂ᵢ = Fᵢ / ‖Fᵢ‖` (the L2 norm over the whole model) when `fisher_normalize` (the
    default, as FusionBench and MergeLM do, so that models whose gradients differ in scale
    count alike), else `Fᵢ`. `ε` (`epsilon`, default 1e-6 as in MergeLM) is added to every
    Fisher value rather than to the denominator only: a parameter no calibration token
    moved (an unseen token's embedding row) then gets the weighted average of the models,
    not 0; for a parameter that matters the Fishers dominate (a normalised Fisher of a
    1-billion-parameter model averages ~3e-5 per entry). Equal Fishers give the weighted
    average; one model gives itself.

    Tensors without a Fisher in any model's statistics are merged like `regmean`'s
    non-linear tensors: the weighted average (with a `base_model`,
    `x₀ + λ·Σ wᵢ(xᵢ − x₀)`, divided by `Σ wᵢ` when `normalize`). The base model is never
    part of the Fisher average; with one, `lambda` scales the merged task vector,
    `x₀ + λ·(x* − x₀)` (an extension; 1 by default). Element-wise: large tensors are
    merged in row chunks, reading only those rows of the Fishers."""
    idx = [i for i in range(len(m.model_params)) if i != m.base_index]
    stats = m.statistics
    if stats is None or any(stats[i] is None for i in idx):
        return fallback_average(m)
    eps = m.params["epsilon"]
    num = den = None
    for i in idx:
        x = m.tensors[i]
        f = stats[i].fisher().to(device=x.device, dtype=x.dtype).add_(eps)
        f.mul_(m.model_params[i]["weight"])
        if num is None:
            num, den = torch.mul(f, x), f
        else:
            num.addcmul_(f, x)
            den.add_(f)
    return scale_from_base(m, num.div_(den))

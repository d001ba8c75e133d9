"""The task-vector family: one pipeline, eight mergekit methods.

Per tensor, with base ``x₀`` and task vectors ``δᵢ = xᵢ − x₀``:

1. sparsify each ``δᵢ`` with its own density (none, magnitude, Bernoulli, Breadcrumbs'
   outlier band or DELLA's rank-weighted drop), optionally rescaled to its former L1 norm;
2. weight: ``Wᵢ = wᵢ·δᵢ``;
3. combine: ``Σ Wᵢ`` — or, with TIES sign consensus, only the ``Wᵢ`` that agree with the
   sign of ``Σ Wᵢ`` at that element;
4. ``normalize`` divides by the (agreeing) weights' sum, then ``lambda`` scales;
5. ``x₀ + result``.

The variants only choose the sparsifier, consensus and defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import MergeError
from . import sparsify
from .linalg import NO_WORK
from .registry import LINES, SVC, BasePolicy, MergeInputs, Param, Scope, merge_method
from .svc import singular_value_calibration, svc_work

MaskMaker = Callable[[torch.Tensor, Mapping[str, Any], "torch.Generator | None"], sparsify.Mask]


def generalized_task_arithmetic(m: MergeInputs, sparsifier: MaskMaker | None = None,
                                consensus: bool = False) -> torch.Tensor:
    """The shared pipeline, in two passes so that memory does not grow with the number of
    models: inputs stay in their stored dtype; pass 1 looks at one model's whole float32
    task vector at a time and keeps only its mask (a few numbers) and rescale factor;
    pass 2 recomputes every task vector chunk by chunk, masks, weights and combines."""
    compute = torch.promote_types(m.compute_dtype, m.base.dtype)
    base = m.base.reshape(-1)
    others = [(x.reshape(-1), p) for x, p in m.others()]
    if not others:
        return m.base.to(compute, copy=True)
    rescale = m.params.get("rescale", False)
    masks: list[sparsify.Mask | None] = []
    factors: list[float] = []
    for x, p in others:  # pass 1
        mask, factor = None, 1.0
        if sparsifier is not None and p.get("density", 1.0) < 1:
            delta = x.to(compute, copy=True).sub_(base)  # never change the inputs
            mask = sparsifier(delta.view(m.base.shape), p, m.generator)  # DELLA: rows
            if rescale or m.generator is not None:  # random masks: advance the generator
                before = sparsify.l1(delta) if rescale else 0.0
                sparsify.apply_mask_(delta, mask, m.generator)
                if rescale:
                    after = sparsify.l1(delta)
                    if before >= 1e-7 and after >= 1e-7:
                        factor = before / after
            del delta
        masks.append(mask)
        factors.append(factor)
    weights = [p["weight"] for _, p in others]
    appliers = [mask.applier() if mask is not None else None for mask in masks]
    step = sparsify.chunk_elements(next((mk for mk in masks if mk is not None), None))
    out = None if base.numel() <= step else torch.empty(base.shape, dtype=compute,
                                                         device=base.device)
    for start in range(0, base.numel(), step):  # pass 2
        end = start + step
        b = base[start:end].to(compute, copy=True)
        ws = []
        for (x, _), apply, factor, weight in zip(others, appliers, factors, weights):
            delta = torch.sub(x[start:end], b)  # the upcast happens inside the kernel
            if apply is not None:
                apply(delta)
            if factor != 1.0:
                delta.mul_(factor)
            ws.append(delta.mul_(weight))
        b.add_(_combine(ws, weights, consensus, m.params["normalize"], m.params["lambda"]))
        if out is None:
            return _calibrate(m, b.view(m.base.shape), compute)
        out[start:end] = b
    return _calibrate(m, out.view(m.base.shape), compute)


def _calibrate(m: MergeInputs, merged: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """With ``svc``: Singular-Value Calibration of the merged task matrix against the
    weighted task vectors (2-D weights other than token embeddings and heads)."""
    from ..arch import is_vocab_tensor

    if (not m.params.get("svc") or merged.dim() != 2 or min(merged.shape) < 2
            or is_vocab_tensor(m.tensor_name)):
        return merged
    base = m.base.to(compute)
    taus = (torch.sub(x, base).mul_(p["weight"]) for x, p in m.others())
    calibrated = singular_value_calibration(merged - base, taus, m.params["svc_alpha"])
    return base.add_(calibrated)


def _combine(ws: Sequence[torch.Tensor], weights: Sequence[float], consensus: bool,
             normalize: bool, lam: float) -> torch.Tensor:
    """lambda · combine(W) (/ divisor) for one chunk of the weighted task vectors."""
    if consensus:
        # sign of the majority (+ where Σ Wᵢ ≥ 0); an agreeing Wᵢ has Wᵢ·sign > 0, so
        # relu(Wᵢ·sign) is |Wᵢ| where it agrees and 0 elsewhere (zeros never agree)
        sign = torch.copysign(torch.ones((), dtype=ws[0].dtype, device=ws[0].device),
                              sum(ws[1:], ws[0].clone()))
        mixed = torch.zeros_like(ws[0])
        divisor = torch.zeros_like(ws[0]) if normalize else None
        for w_i, weight in zip(ws, weights):
            aligned = w_i * sign
            if divisor is not None:
                divisor.add_(aligned > 0, alpha=weight)
            mixed.add_(aligned.relu_())
        mixed.mul_(sign)
        if divisor is not None:
            mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
    else:
        mixed = ws[0]  # the caller's temporaries: accumulate in place
        for w_i in ws[1:]:
            mixed.add_(w_i)
        if normalize:
            weight_sum = sum(weights)
            mixed.div_(weight_sum if abs(weight_sum) >= 1e-8 else 1.0)
    if lam != 1.0:
        mixed.mul_(lam)
    return mixed


# ------------------------------------------------------------------ the eight methods


def magnitude_sparsifier(delta, p, generator):
    """TIES' trim as a pipeline sparsifier: keep each task vector's ``density`` share of
    largest-magnitude entries (``sparsify.magnitude_mask``)."""
    return sparsify.magnitude_mask(delta, p["density"])


def _bernoulli(delta, p, generator):
    return sparsify.bernoulli_mask(delta, p["density"], generator)


def _outliers(delta, p, generator):
    return sparsify.magnitude_outliers_mask(delta, p["density"], p["gamma"])


def _della(delta, p, generator):
    return sparsify.della_mask(delta, p["density"], p["epsilon"], generator)


def _check_della(name: str, params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]],
                 base_index: int | None) -> None:
    for i, p in enumerate(model_params):
        d, e = p.get("density", 1.0), p.get("epsilon", 0.15)
        if i != base_index and 0 < d < 1 and not (d - e > 0 and d + e < 1):
            raise MergeError(f"della: density {d:g} ± epsilon {e:g} must stay inside (0, 1) "
                             f"(input {i}, tensor '{name}'); lower epsilon or move the density "
                             "away from 0 and 1")


@dataclass(frozen=True)
class _Variant:
    name: str
    sparsifier: MaskMaker | None
    consensus: bool
    normalize: bool
    rescale: bool
    extra: tuple[Param, ...] = ()
    reference: str = ""
    doc: str = ""
    random: bool = False


_GAMMA = Param("gamma", float, 0.01, Scope.NON_BASE,
               "fraction of the largest-magnitude entries dropped as outliers")
_EPSILON = Param("epsilon", float, 0.15, Scope.NON_BASE,
                 "spread of keep probabilities around the density (by magnitude rank)")
_DOCS = {
    "sign": "Sign consensus (TIES): at each element only the task vectors whose weighted "
            "sign agrees with the sign of their sum are kept, and normalize divides by the "
            "weights of those that agree.",
}

VARIANTS = [
    _Variant("task_arithmetic", None, False, False, False,
             reference="https://arxiv.org/abs/2212.04089",
             doc="""Task arithmetic: base + λ·Σ wᵢ(xᵢ − base).

             Adds the weighted task vectors (fine-tune minus base) of the fine-tuned models
             to the base. The simplest way to combine skills of fine-tunes of one base;
             `density` is accepted and ignored, as in mergekit."""),
    _Variant("ties", magnitude_sparsifier, True, True, False,
             reference="https://arxiv.org/abs/2306.01708",
             doc=f"""TIES: trim each task vector to its largest entries, elect signs, merge.

             Keeps the `density` fraction of largest-magnitude entries of each task vector
             (exactly `max(1, int(density·numel))`; ties at the cut go to the later
             positions), then merges with sign consensus. {_DOCS['sign']} Use it when
             fine-tunes interfere (opposite updates cancelling)."""),
    _Variant("dare_linear", _bernoulli, False, False, True, random=True,
             reference="https://arxiv.org/abs/2311.03099",
             doc="""DARE: randomly drop task-vector entries, rescale, add.

             Keeps each entry with probability `density` and rescales the pruned task vector
             to its original L1 norm (mergekit's rescale rule), then adds the weighted sum.
             Random: reproducible with `--seed`."""),
    _Variant("dare_ties", _bernoulli, True, False, True, random=True,
             reference="https://arxiv.org/abs/2311.03099",
             doc=f"""DARE pruning with TIES sign consensus.

             Random drop with probability `1 − density` and L1 rescale, then {_DOCS['sign']}"""),
    _Variant("breadcrumbs", _outliers, False, False, False, (_GAMMA,),
             reference="https://arxiv.org/abs/2312.06795",
             doc="""Model Breadcrumbs: drop the largest outliers and the smallest entries.

             Of each task vector keeps exactly `int(density·numel)` entries: those just
             below the `int(gamma·numel)` largest magnitudes."""),
    _Variant("breadcrumbs_ties", _outliers, True, False, False, (_GAMMA,),
             reference="https://arxiv.org/abs/2312.06795",
             doc=f"""Model Breadcrumbs with TIES sign consensus.

             Breadcrumbs' outlier band, then {_DOCS['sign']}"""),
    _Variant("della", _della, True, True, True, (_EPSILON,), random=True,
             reference="https://arxiv.org/abs/2406.11617",
             doc=f"""DELLA: drop entries with probability that falls with their magnitude rank.

             Per row, each entry is kept with probability `density − ε + 2ε·rank` (rank of
             its magnitude in the row, scaled to [0, 1]), the task vector is rescaled to
             its former L1 norm, then {_DOCS['sign']} Requires `0 < density ± epsilon < 1`."""),
    _Variant("della_linear", _della, False, False, True, (_EPSILON,), random=True,
             reference="https://arxiv.org/abs/2406.11617",
             doc="""DELLA's rank-weighted random drop and rescale, then a plain weighted sum.

             Like `della` without sign consensus."""),
]


def _register(v: _Variant) -> None:
    params = [
        Param("weight", float, scope=Scope.NON_BASE, doc="weight of the model's task vector"),
        Param("density", float, 1.0, Scope.NON_BASE,
              "fraction of task-vector entries kept" if v.sparsifier
              else "accepted for mergekit compatibility (no effect)"),
        *v.extra,
        Param("normalize", bool, v.normalize, doc="divide by the sum of the (agreeing) weights"),
        Param("rescale", bool, v.rescale,
              doc="rescale each pruned task vector to its L1 norm before pruning"),
        Param("lambda", float, 1.0, doc="scale of the combined task vector"),
        Param("int8_mask", bool, False, doc="accepted for mergekit compatibility (no effect)"),
    ]

    def method(m: MergeInputs) -> torch.Tensor:
        return generalized_task_arithmetic(m, v.sparsifier, v.consensus)

    method.__name__ = v.name
    method.__doc__ = v.doc
    differences = ("Float32 arithmetic (mergekit: the input dtype). Random masks come from "
                   "a generator per tensor seeded by (seed, tensor name), so they differ "
                   "from mergekit's even with the same seed, but are identical for any "
                   "thread count." if v.random else
                   "Float32 arithmetic (mergekit: the input dtype)."
                   + (" Ties at the magnitude cut are broken by position, so exactly the "
                      "documented number of entries is kept." if v.sparsifier else ""))
    merge_method(v.name, base=BasePolicy.REQUIRED, params=params, extensions=(LINES, SVC),
                 elementwise=v.sparsifier is None and not v.consensus, random=v.random,
                 temp_buffers=1.0, raw_inputs=True, reference=v.reference,
                 seconds_per_gb=_SECONDS_PER_GB.get(v.sparsifier, 0.9),
                 differences=differences,
                 check=_check_della if v.sparsifier is _della else None,
                 compute=_calibration_work)(method)


def _calibration_work(name: str, shape: tuple[int, ...], tasks: int, params):
    """With ``svc``: one SVD of the merged task matrix and a product per task."""
    return svc_work(name, shape, tasks, params) if params.get("svc") else NO_WORK


_SECONDS_PER_GB = {magnitude_sparsifier: 7.5, _outliers: 7.5, _bernoulli: 5.5, _della: 12.0}
"""Measured on the reference machine (bench/README.md); check's time estimate."""

for _v in VARIANTS:
    _register(_v)

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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._torch import torch
from ..errors import MergeError
from . import sparsify
from .linalg import NO_WORK
from .registry import (
    LINES,
    SVC,
    AnotherPass,
    BasePolicy,
    MergeInputs,
    Param,
    Scope,
    TensorStatistic,
    merge_method,
)
from .svc import singular_value_calibration, svc_work

DeciderMaker = Callable[[tuple[int, ...], Mapping[str, Any], "torch.Generator | None", bool],
                        sparsify.Decider]
"""Makes a sparsifier's decider for one task vector: (whole tensor's shape, the model's
parameters, the tensor's generator, rescale)."""


@dataclass(frozen=True)
class TaskDecisions:
    """What a sparsified merge needs from the whole tensor before merging any row: each
    non-base input's mask (None: not sparsified) and L1 rescale factor."""

    masks: tuple[sparsify.Mask | None, ...]
    factors: tuple[float, ...]


class _Deciding:
    """The streamed first pass(es) of a sparsified merge: one decider per non-base input,
    fed the task vectors' flat pieces block by block (see :data:`TensorStatistic`)."""

    def __init__(self, m: MergeInputs, maker: DeciderMaker, one_at_a_time: bool = False) -> None:
        self.one_at_a_time = one_at_a_time
        shape = m.tensor_shape if m.tensor_shape is not None else m.shape
        self.width = math.prod(shape[1:]) if len(shape) > 1 else 1
        rescale = m.params.get("rescale", False)
        self.deciders = [maker(shape, p, m.generator, rescale)
                         if p.get("density", 1.0) < 1 else None for _, p in self._others(m)]

    @staticmethod
    def _others(m: MergeInputs):
        return [(k, p) for k, p in enumerate(m.model_params) if k != m.base_index]

    def _active(self) -> list[int]:
        """Positions of the deciders this pass feeds: every magnitude decider not done;
        of the random ones only the first not done (they draw from the tensor's one
        generator, input after input). With ``one_at_a_time`` only the first not done:
        when the whole tensors are at hand, another pass costs no reading, and one
        decider's working buffers at a time keep memory flat in the number of models."""
        active, drawing = [], False
        for j, d in enumerate(self.deciders):
            if d is None or d.done or (d.draws and drawing):
                continue
            drawing |= d.draws
            active.append(j)
            if self.one_at_a_time:
                break
        return active

    def feed(self, m: MergeInputs) -> None:
        """One block of rows (``m.rows``; None: the whole tensor)."""
        offset = (m.rows[0] if m.rows is not None else 0) * self.width
        others = self._others(m)
        base = m.base.reshape(-1)
        compute = torch.promote_types(m.compute_dtype, base.dtype)
        for j in self._active():
            d, x = self.deciders[j], m.tensors[others[j][0]].reshape(-1)
            stride = d.wants_sample()
            if stride:  # elements at multiples of the stride in the whole tensor
                first = -offset % stride
                d.feed_sample(x[first::stride].to(compute, copy=True)
                              .sub_(base[first::stride]))
            else:
                d.feed(x.to(compute, copy=True).sub_(base), offset)  # never change inputs

    def end_pass(self) -> TaskDecisions | AnotherPass:
        for j in self._active():
            self.deciders[j].end_pass()
        if any(d is not None and not d.done for d in self.deciders):
            return AnotherPass(self)
        factors = []
        for d in self.deciders:
            before, after = (d.l1_before, d.l1_after) if d is not None else (0.0, 0.0)
            factors.append(before / after if before >= 1e-7 and after >= 1e-7 else 1.0)
        return TaskDecisions(tuple(None if d is None else d.mask for d in self.deciders),
                             tuple(factors))


_BLOCK_ELEMENTS = 1 << 20
"""Elements per streamed block (any size gives the same decisions)."""


def _statistic_rows(shape: tuple[int, ...]) -> int:
    """Rows per streamed block (about 2^20 elements); 0: small tensors are merged whole."""
    if len(shape) < 2 or math.prod(shape) <= 4 * sparsify.CHUNK:
        return 0
    rows = max(1, _BLOCK_ELEMENTS // math.prod(shape[1:]))
    return 0 if rows >= shape[0] else rows


def _decisions_statistic(maker: DeciderMaker) -> TensorStatistic:
    def accumulate(state: _Deciding | None, m: MergeInputs) -> _Deciding:
        state = _Deciding(m, maker) if state is None else state
        state.feed(m)
        return state

    def finish(state: _Deciding | None, m: MergeInputs):
        return None if state is None else state.end_pass()

    return TensorStatistic(_statistic_rows, accumulate, finish)


def _decide_whole(m: MergeInputs, maker: DeciderMaker | None) -> TaskDecisions:
    """The decisions from the whole tensors at hand (one block per pass)."""
    if maker is None:
        n = len(m.model_params) - (m.base_index is not None)
        return TaskDecisions((None,) * n, (1.0,) * n)
    state = _Deciding(m, maker, one_at_a_time=True)  # the same decisions, less memory
    while True:
        state.feed(m)
        result = state.end_pass()
        if not isinstance(result, AnotherPass):
            return result


def generalized_task_arithmetic(m: MergeInputs, maker: DeciderMaker | None = None,
                                consensus: bool = False) -> torch.Tensor:
    """The shared pipeline. Inputs stay in their stored dtype; the sparsifiers' decisions
    (``m.statistic``: streamed by the engine over the whole tensor before row chunks are
    merged; else made here from the whole tensors) hold only compact per-model summaries,
    so memory does not grow with the number of models; then the task vectors are
    recomputed piece by piece, masked, weighted and combined."""
    compute = torch.promote_types(m.compute_dtype, m.base.dtype)
    base = m.base.reshape(-1)
    others = [(x.reshape(-1), p) for x, p in m.others()]
    if not others:
        return m.base.to(compute, copy=True)
    decisions = m.statistic if m.statistic is not None else _decide_whole(m, maker)
    width = math.prod(m.base.shape[1:]) if m.base.dim() > 1 else 1
    start = (m.rows[0] if m.rows is not None else 0) * width
    weights = [p["weight"] for _, p in others]
    appliers = [mask.applier(start) if mask is not None else None for mask in decisions.masks]
    step = sparsify.CHUNK
    out = None if base.numel() <= step else torch.empty(base.shape, dtype=compute,
                                                         device=base.device)
    for begin in range(0, base.numel(), step):
        end = begin + step
        b = base[begin:end].to(compute, copy=True)
        ws = []
        for (x, _), apply, factor, weight in zip(others, appliers, decisions.factors, weights):
            delta = torch.sub(x[begin:end], b)  # the upcast happens inside the kernel
            if apply is not None:
                apply(delta)
            if factor != 1.0:
                delta.mul_(factor)
            ws.append(delta.mul_(weight))
        b.add_(_combine(ws, weights, consensus, m.params["normalize"], m.params["lambda"]))
        if out is None:
            return _calibrate(m, b.view(m.base.shape), compute)
        out[begin:end] = b
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


def magnitude_sparsifier(shape, p, generator, rescale):
    """TIES' trim: keep each task vector's ``density`` share of largest-magnitude entries."""
    return sparsify.magnitude_decider(shape, p["density"], rescale)


def _bernoulli(shape, p, generator, rescale):
    return sparsify.bernoulli_decider(shape, p["density"], generator, rescale)


def _outliers(shape, p, generator, rescale):
    return sparsify.outliers_decider(shape, p["density"], p["gamma"], rescale)


def _della(shape, p, generator, rescale):
    return sparsify.della_decider(shape, p["density"], p["epsilon"], generator, rescale)


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
    sparsifier: DeciderMaker | None
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
                 statistic=_decisions_statistic(v.sparsifier) if v.sparsifier else None,
                 seconds_per_gb=_SECONDS_PER_GB.get(v.sparsifier, 0.9),
                 differences=differences,
                 check=_check_della if v.sparsifier is _della else None,
                 compute=_calibration_work)(method)


def _calibration_work(name: str, shape: tuple[int, ...], tasks: int, params):
    """With ``svc``: one SVD of the merged task matrix and a product per task."""
    return svc_work(name, shape, tasks, params) if params.get("svc") else NO_WORK


_SECONDS_PER_GB = {magnitude_sparsifier: 3.5, _outliers: 4.5, _bernoulli: 3.5, _della: 6.0}
"""Measured on the reference machine (bench/README.md); check's time estimate."""

for _v in VARIANTS:
    _register(_v)

"""``mergesmith inspect``: how task vectors relate, before choosing a merge method.

For a base model ``B`` and models ``M₁…M_k``, the task vectors are ``τᵢ = Mᵢ − B``
(computed in float32 per tensor; sums are accumulated in float64). Per tensor, per layer
and for the whole model:

* **norm** ``‖τᵢ‖_F`` and **relative norm** ``‖τᵢ‖ / ‖B‖``.
* **cosine** between task vectors, per pair: ``Σ τᵢ·τⱼ / √(Σ τᵢ² · Σ τⱼ²)``. Layers and the
  whole model accumulate the sums over their tensors, so the whole-model cosine is the
  cosine of the concatenated, flattened task vectors (not a mean of per-tensor cosines).
* **changed / near-zero**: an entry of ``τᵢ`` is *near zero* when
  ``|τᵢ| ≤ atol + rtol·|B|`` (element-wise, like ``numpy.isclose``; defaults
  ``rtol=1e-5``, ``atol=1e-8``), otherwise *changed*. Re-saving noise of float32 weights
  stays below the default; any change a bfloat16/float16 checkpoint can express is above
  it. (A base in float32 and a fine-tune saved in bfloat16 differ everywhere by rounding:
  raise ``rtol`` to about ``4e-3`` to count that as unchanged.)
* **sparsity** of ``τᵢ``: the fraction of near-zero entries.
* **sign conflict** (k ≥ 2 models): among the entries changed in at least two task
  vectors (the *overlap*), the fraction where the changed entries do not all have the same
  sign. Reported with its **chance level**: the value expected if the signs were
  independent coin flips, ``1 − 2^(1−n)`` for an entry changed in ``n`` models, averaged
  over the same entries (0.5 for two models). Independent fine-tunes sit at chance,
  aligned ones below it, opposed ones above it.
* **sign disagreement** of model ``i``: the fraction of its changed entries whose sign is
  opposite to the elected sign ``sign(Σⱼ changed τⱼ)`` — what a TIES sign election
  would drop from this model.
* **effective rank** of a 2-D ``τᵢ`` (Roy & Vetterli, 2007): ``exp(H(p))`` with
  ``pⱼ = σⱼ / Σσ`` the normalised singular values; reported also relative to the smaller
  side of the matrix. Singular values come from the eigenvalues of the smaller Gram
  matrix (``τᵀτ`` or ``ττᵀ``, float64), several times faster than an SVD on CPU. Matrices
  whose smaller side exceeds ``rank_max_dim`` are skipped, and so are token embeddings and
  output heads (the largest SVDs, and their rank says little about merging). Layers and the
  whole model report the median.

Streaming: one tensor name at a time in the base's file order; element-wise metrics read
row chunks of at most ``chunk_elements`` entries from the base and every model, so memory
stays at a few chunk-sized buffers per model. The effective rank needs a whole matrix: for
a matrix larger than one chunk it is computed afterwards, one model at a time (the base's
matrix, that model's task vector and its float64 Gram matrix in memory).

Recommendations are simple documented rules on the whole-model numbers; see
:func:`recommend`.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..arch import is_pre_layer, is_vocab_tensor, layer_stacks, split_layer
from ..checkpoint import ModelSource, TensorReader, resolve
from ..errors import MergeError
from ..recipe.refs import parse_model_reference

DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-8
DEFAULT_RANK_MAX_DIM = 2048
DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 4M entries (16 MB in float32) per model and chunk

# Recommendation thresholds (whole-model numbers); see recommend().
NEAR_IDENTICAL_COSINE = 0.9
CONFLICT_OF_CHANCE = 0.8
MIN_OVERLAP = 0.1
SPARSE = 0.5
ORTHOGONAL_COSINE = 0.2
LOW_RELATIVE_RANK = 0.2
DOMINANT_NORM_RATIO = 2.0


# ------------------------------------------------------------------ pure metrics


def near_zero(delta: torch.Tensor, base: torch.Tensor, rtol: float = DEFAULT_RTOL,
              atol: float = DEFAULT_ATOL) -> torch.Tensor:
    """Boolean mask of task-vector entries with ``|delta| ≤ atol + rtol·|base|``."""
    return delta.abs() <= atol + rtol * base.abs()


@dataclass
class Sums:
    """Additive sums over a set of entries (a chunk, tensor, layer or the whole model).

    ``gram[i, j] = Σ τᵢ·τⱼ`` (the diagonal holds ``‖τᵢ‖²``); ``near[i]`` counts near-zero
    entries of ``τᵢ``; ``active`` counts entries changed in ≥ 2 models, ``conflicts`` those
    of them whose changed signs differ, ``chance`` sums ``1 − 2^(1−n)`` over them;
    ``disagree[i]`` counts changed entries of ``τᵢ`` opposite to ``sign(Σ changed τ)``.
    """

    numel: int
    base_sq: float
    gram: torch.Tensor
    near: torch.Tensor
    active: int = 0
    conflicts: int = 0
    chance: float = 0.0
    disagree: torch.Tensor | None = None

    @classmethod
    def zero(cls, k: int) -> Sums:
        return cls(0, 0.0, torch.zeros(k, k, dtype=torch.float64),
                   torch.zeros(k, dtype=torch.int64), 0, 0, 0.0,
                   torch.zeros(k, dtype=torch.int64))

    def __add__(self, other: Sums) -> Sums:
        return Sums(self.numel + other.numel, self.base_sq + other.base_sq,
                    self.gram + other.gram, self.near + other.near,
                    self.active + other.active, self.conflicts + other.conflicts,
                    self.chance + other.chance, _add_opt(self.disagree, other.disagree))

    @property
    def k(self) -> int:
        return int(self.gram.shape[0])

    # -- derived metrics (None where undefined)

    def norms(self) -> list[float]:
        return [math.sqrt(max(float(self.gram[i, i]), 0.0)) for i in range(self.k)]

    def relative_norms(self) -> list[float | None]:
        if self.base_sq <= 0:
            return [None] * self.k
        b = math.sqrt(self.base_sq)
        return [n / b for n in self.norms()]

    def cosine(self, i: int, j: int) -> float | None:
        denom = math.sqrt(float(self.gram[i, i]) * float(self.gram[j, j]))
        return float(self.gram[i, j]) / denom if denom > 0 else None

    def cosines(self) -> list[float | None]:
        return [self.cosine(i, j) for i, j in pairs(self.k)]

    def sparsity(self) -> list[float | None]:
        return [int(n) / self.numel if self.numel else None for n in self.near]

    def sign_conflict(self) -> float | None:
        return self.conflicts / self.active if self.active else None

    def sign_conflict_chance(self) -> float | None:
        return self.chance / self.active if self.active else None

    def overlap(self) -> float | None:
        return self.active / self.numel if self.numel and self.k >= 2 else None

    def sign_disagreement(self) -> list[float | None]:
        if self.k < 2 or self.disagree is None:
            return [None] * self.k
        changed = [self.numel - int(n) for n in self.near]
        return [int(d) / c if c else None for d, c in zip(self.disagree, changed)]


def _add_opt(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def pairs(k: int) -> list[tuple[int, int]]:
    """Model pairs ``(i, j)``, ``i < j``, in the order used by every pairwise list."""
    return [(i, j) for i in range(k) for j in range(i + 1, k)]


def chunk_sums(base: torch.Tensor, models: Sequence[torch.Tensor], rtol: float = DEFAULT_RTOL,
               atol: float = DEFAULT_ATOL) -> Sums:
    """:class:`Sums` of the entries of one chunk: ``base`` and each model's same entries."""
    b = base.to(torch.float32).reshape(-1)
    d = torch.stack([m.to(device=b.device, dtype=torch.float32).reshape(-1) - b
                     for m in models])  # (k, n) task vectors
    k, n = d.shape
    tol = atol + rtol * b.abs()
    changed = d.abs() > tol
    d64, b64 = _double(d), _double(b)
    sums = Sums(n, float(torch.dot(b64, b64)), (d64 @ d64.T).cpu(),
                (n - changed.sum(1)).cpu(), disagree=torch.zeros(k, dtype=torch.int64))
    del d64, b64
    if k >= 2:
        pos = (changed & (d > 0)).sum(0)
        neg = (changed & (d < 0)).sum(0)
        count = pos + neg
        active = count >= 2
        sums.active = int(active.sum())
        sums.conflicts = int((active & (pos > 0) & (neg > 0)).sum())
        sums.chance = float((1.0 - torch.pow(2.0, 1.0 - _double(count[active]))).sum())
        elected = torch.sign((d * changed).sum(0))
        opposite = changed & (torch.sign(d) == -elected) & (elected != 0)
        sums.disagree = opposite.sum(1).cpu()
    return sums


def _double(t: torch.Tensor) -> torch.Tensor:
    """float64 copy (on the CPU for Apple GPUs, which have no float64)."""
    return (t.cpu() if t.device.type == "mps" else t).double()


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D tensor (descending, float64) from the eigenvalues of its
    smaller Gram matrix."""
    a = _double(matrix)
    gram = a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T
    del a
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)


def effective_rank_of(s: torch.Tensor) -> float | None:
    """``exp(−Σ pᵢ log pᵢ)`` with ``p = s / Σ s`` (Roy & Vetterli 2007); None when s = 0."""
    s = s.double().clamp_min(0)
    total = float(s.sum())
    if total <= 0:
        return None
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def effective_rank(matrix: torch.Tensor) -> float | None:
    """Entropy effective rank of a 2-D tensor (None for a zero matrix)."""
    if matrix.dim() != 2:
        raise ValueError(f"effective rank needs a matrix, got shape {list(matrix.shape)}")
    return effective_rank_of(singular_values(matrix))


def median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


# ------------------------------------------------------------------ results


@dataclass
class TensorRecord:
    """Everything measured on one tensor."""

    name: str
    layer: str
    shape: tuple[int, ...]
    sums: Sums
    ranks: list[float | None]  # per model; None: not computed or zero task vector
    rank_note: str  # "computed", "not a matrix", "embedding/head", "larger than N", "off"

    @property
    def min_dim(self) -> int:
        return min(self.shape) if len(self.shape) == 2 else 0


@dataclass
class Group:
    """A layer (or the whole model): summed :class:`Sums` and the ranks of its matrices."""

    key: str
    label: str
    sums: Sums
    ranks: list[list[float]]  # per model, effective ranks of its matrices
    relative_ranks: list[list[float]]  # the same divided by the matrix's smaller side
    tensors: int = 0

    def add(self, rec: TensorRecord) -> None:
        self.sums = self.sums + rec.sums
        self.tensors += 1
        for i, r in enumerate(rec.ranks):
            if r is not None:
                self.ranks[i].append(r)
                self.relative_ranks[i].append(r / rec.min_dim)

    def median_ranks(self) -> list[float | None]:
        return [median(r) for r in self.ranks]

    def median_relative_ranks(self) -> list[float | None]:
        return [median(r) for r in self.relative_ranks]


def metrics(sums: Sums, ranks: list[Any], relative_ranks: list[Any]) -> dict[str, Any]:
    """The JSON form of one tensor's, layer's or the whole model's numbers."""
    norms = sums.norms()
    cos = sums.cosines()
    return {
        "numel": sums.numel,
        "base_norm": math.sqrt(sums.base_sq),
        "norm": norms,
        "relative_norm": sums.relative_norms(),
        "sparsity": sums.sparsity(),
        "cosine": cos,
        "mean_cosine": _mean(cos),
        "sign_conflict": sums.sign_conflict(),
        "sign_conflict_chance": sums.sign_conflict_chance(),
        "overlap": sums.overlap(),
        "sign_disagreement": sums.sign_disagreement(),
        "effective_rank": ranks,
        "relative_effective_rank": relative_ranks,
        "sums": {"base_sq": sums.base_sq, "sq": [float(sums.gram[i, i]) for i in range(sums.k)],
                 "dot": [float(sums.gram[i, j]) for i, j in pairs(sums.k)],
                 "near_zero": [int(n) for n in sums.near], "overlap": sums.active,
                 "conflicts": sums.conflicts, "chance": sums.chance,
                 "disagree": [int(x) for x in sums.disagree] if sums.disagree is not None
                 else None},
    }


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


@dataclass
class Recommendation:
    """Merge methods a rule points to (empty for hints), and why, with the numbers."""

    rule: str
    methods: list[str]
    reason: str

    def line(self) -> str:
        head = ", ".join(self.methods) if self.methods else "hint"
        return f"{head}: {self.reason}"


@dataclass
class InspectResult:
    base: str
    models: list[str]  # references as given
    names: list[str]  # short display names
    options: dict[str, Any]
    tensors: list[TensorRecord] = field(default_factory=list)
    layers: list[Group] = field(default_factory=list)
    whole: Group | None = None
    skipped: dict[str, Any] = field(default_factory=dict)
    recommendations: list[Recommendation] = field(default_factory=list)

    @property
    def pair_names(self) -> list[str]:
        return [f"{self.names[i]} vs {self.names[j]}" for i, j in pairs(len(self.names))]

    def group_metrics(self, g: Group) -> dict[str, Any]:
        return metrics(g.sums, g.median_ranks(), g.median_relative_ranks())

    def to_dict(self) -> dict[str, Any]:
        from .. import __version__

        assert self.whole is not None
        return _clean({
            "mergesmith_version": __version__,
            "base": self.base,
            "models": [{"name": n, "ref": r} for n, r in zip(self.names, self.models)],
            "pairs": [[self.names[i], self.names[j]] for i, j in pairs(len(self.names))],
            "options": self.options,
            "definitions": DEFINITIONS,
            "skipped": self.skipped,
            "recommendations": [{"rule": r.rule, "methods": r.methods, "reason": r.reason}
                                for r in self.recommendations],
            "whole_model": {"tensors": self.whole.tensors, **self.group_metrics(self.whole)},
            "layers": [{"layer": g.key, "label": g.label, "tensors": g.tensors,
                        **self.group_metrics(g)} for g in self.layers],
            "tensors": [{"name": t.name, "layer": t.layer, "shape": list(t.shape),
                         "rank_note": t.rank_note,
                         **metrics(t.sums, t.ranks,
                                   [r / t.min_dim if r is not None else None
                                    for r in t.ranks])}
                        for t in self.tensors],
        })

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    def summary(self) -> str:
        from .report import render_summary

        return render_summary(self)


DEFINITIONS = {
    "task_vector": "model − base, per tensor, float32",
    "relative_norm": "‖τ‖ / ‖base‖ (Frobenius; layers and whole model over all their tensors)",
    "cosine": "Σ τᵢ·τⱼ / √(Σ τᵢ² Σ τⱼ²), sums over the tensor, layer or whole model",
    "near_zero": "|τ| ≤ atol + rtol·|base| (element-wise)",
    "sparsity": "fraction of near-zero entries of τ",
    "overlap": "fraction of entries changed (not near zero) in at least two task vectors",
    "sign_conflict": "among overlap entries, the fraction whose changed signs are not all equal",
    "sign_conflict_chance": "the same if signs were independent: mean of 1 − 2^(1−n) over "
                            "overlap entries changed in n models",
    "sign_disagreement": "per model: fraction of its changed entries opposite to "
                         "sign(Σ changed τ) (what a TIES sign election drops)",
    "effective_rank": "exp(H(σ/Σσ)) of a 2-D τ (Roy & Vetterli 2007); layers/whole: median",
    "relative_effective_rank": "effective rank / smaller side of the matrix; layers/whole: median",
}


def _clean(x: Any) -> Any:
    """JSON-safe: non-finite floats → None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


# ------------------------------------------------------------------ recommendations


def recommend(whole: Group, names: Sequence[str]) -> list[Recommendation]:
    """Merge-method suggestions from the whole-model numbers. The rules (thresholds are the
    module constants):

    1. mean pairwise cosine ≥ 0.9 → ``linear``, ``model_stock`` (near-identical deltas).
    2. overlap ≥ 10 % of entries and sign conflict ≥ 0.8 × its chance level →
       ``ties``, ``dare_ties`` (the signs interfere; elect them).
    3. mean sparsity ≥ 50 % and |mean cosine| < 0.2 → ``ram``, ``consensus_ties``,
       ``consensus_ta``, ``task_arithmetic`` (sparse, near-orthogonal deltas barely overlap).
    4. median relative effective rank ≤ 0.2 → ``tsv_m``, ``iso_cts`` (low-rank deltas).
    5. largest / smallest task-vector norm ≥ 2 → a hint to re-weight (weights ∝ 1/‖τ‖).

    With one model only rule 4 and a note apply. When no method rule fires,
    ``task_arithmetic`` is suggested as a neutral start.
    """
    s = whole.sums
    k = s.k
    recs: list[Recommendation] = []
    cos = _mean(s.cosines())
    conflict, chance, overlap = s.sign_conflict(), s.sign_conflict_chance(), s.overlap()
    sparsity = _mean(s.sparsity())
    rel_rank = median([r for per in whole.relative_ranks for r in per])
    if k >= 2 and cos is not None and cos >= NEAR_IDENTICAL_COSINE:
        recs.append(Recommendation(
            "near_identical", ["linear", "model_stock"],
            f"the task vectors point the same way (mean cosine {cos:.3f} ≥ "
            f"{NEAR_IDENTICAL_COSINE}); averaging loses little"))
    if (k >= 2 and conflict is not None and chance and overlap is not None
            and overlap >= MIN_OVERLAP and conflict >= CONFLICT_OF_CHANCE * chance
            and (cos is None or cos < NEAR_IDENTICAL_COSINE)):
        recs.append(Recommendation(
            "sign_conflict", ["ties", "dare_ties"],
            f"signs conflict on {conflict:.1%} of the entries changed by two or more models "
            f"({overlap:.1%} of all entries; chance level {chance:.1%}); a sign election "
            "drops the minority instead of letting them cancel"))
    if (k >= 2 and sparsity is not None and sparsity >= SPARSE and cos is not None
            and abs(cos) < ORTHOGONAL_COSINE):
        recs.append(Recommendation(
            "sparse_orthogonal", ["ram", "consensus_ties", "consensus_ta", "task_arithmetic"],
            f"the deltas are sparse (mean {sparsity:.1%} of entries near zero) and nearly "
            f"orthogonal (mean cosine {cos:.3f}); they barely overlap, so summing them or "
            "consensus masks keep each model's changes"))
    if rel_rank is not None and rel_rank <= LOW_RELATIVE_RANK:
        n = sum(len(r) for r in whole.ranks)
        recs.append(Recommendation(
            "low_rank", ["tsv_m", "iso_cts"] if k >= 2 else [],
            f"the task vectors are low-rank (median effective rank {rel_rank:.1%} of the "
            f"matrix size over {n} matrices)" + (
                "; SVD-based merges keep their top directions" if k >= 2 else
                "; extract-lora would capture it at a small rank")))
    norms = s.norms()
    if k >= 2 and min(norms) > 0 and max(norms) / min(norms) >= DOMINANT_NORM_RATIO:
        big = max(range(k), key=lambda i: norms[i])
        small = min(range(k), key=lambda i: norms[i])
        inv = [1 / n for n in norms]
        weights = ", ".join(f"{names[i]} {inv[i] / max(inv):.2g}" for i in range(k))
        recs.append(Recommendation(
            "dominant_norm", [],
            f"{names[big]}'s task vector is {norms[big] / norms[small]:.1f}× as large as "
            f"{names[small]}'s (‖τ‖ {norms[big]:.4g} vs {norms[small]:.4g}); it will dominate "
            f"a sum — consider weights ∝ 1/‖τ‖ ({weights}) or a method that rescales "
            "(model_stock, iso_cts)"))
    if k < 2:
        recs.append(Recommendation(
            "single_model", [], "one model: give two or more to compare task vectors"))
    elif not any(r.methods for r in recs):
        recs.append(Recommendation(
            "default", ["task_arithmetic"],
            f"no strong pattern (mean cosine {_fmt(cos, '.3f')}, sign conflict "
            f"{_fmt(conflict, '.1%')} at chance {_fmt(chance, '.1%')}, sparsity "
            f"{_fmt(sparsity, '.1%')}); task arithmetic with tuned weights is a neutral start"))
    return recs


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


# ------------------------------------------------------------------ streaming


def _display_names(sources: Sequence[ModelSource]) -> list[str]:
    names: list[str] = []
    for s in sources:
        ref = s.ref
        name = os.path.basename(os.path.normpath(os.path.expanduser(ref.model.path))) or str(ref)
        if ref.lora is not None:
            name += "+" + os.path.basename(os.path.normpath(ref.lora.path))
        base, n = name, 2
        while name in names:
            name, n = f"{base}#{n}", n + 1
        names.append(name)
    return names


def _layer_of(name: str, stacks: dict[str, int]) -> str:
    layer = split_layer(name)
    if layer is not None and layer.prefix in stacks:
        return f"{layer.prefix}.{layer.index}"
    return "embeddings" if is_pre_layer(name) else "other"


def _layer_order(keys: Sequence[str], stacks: dict[str, int]) -> list[tuple[str, str]]:
    """(key, label) in display order: embeddings, each stack's layers, other."""
    stack_rank = {p: i for i, p in enumerate(stacks)}

    def sort_key(key: str) -> tuple[int, int, int]:
        if key == "embeddings":
            return (-1, 0, 0)
        if key == "other":
            return (len(stacks) + 1, 0, 0)
        prefix, index = key.rsplit(".", 1)
        return (stack_rank.get(prefix, len(stacks)), int(index), 0)

    out = []
    for key in sorted(set(keys), key=sort_key):
        label = key
        if len(stacks) == 1 and key not in ("embeddings", "other"):
            label = "layer " + key.rsplit(".", 1)[1]
        out.append((key, label))
    return out


def _read(reader: TensorReader, source: ModelSource, name: str,
          rows: tuple[int, int] | None, device: torch.device) -> torch.Tensor:
    x = reader.read(source.index.tensors[name], rows)
    if source.lora is not None and source.lora.touches(name):
        x = source.lora.apply(name, x, rows)
    return x.to(device=device, dtype=torch.float32)


def _select(base: ModelSource, models: Sequence[ModelSource], names: Sequence[str]
            ) -> tuple[list[str], dict[str, Any]]:
    """Tensors every model has with the base's shape; the rest counted (or an error)."""
    btensors = base.index.tensors
    skipped: dict[str, Any] = {"not_floating_point": 0, "shape_differs": [],
                               "missing_in_a_model": [], "only_in_model": {}}
    for i, m in enumerate(models):
        common = [n for n in btensors if n in m.index.tensors
                  and btensors[n].dtype.is_floating_point]
        if not common:
            example = next(iter(m.index.tensors), "(none)")
            raise MergeError(f"{m.ref} has no floating-point tensor in common with the base "
                             f"{base.ref} (e.g. the base has '{next(iter(btensors), '')}', the "
                             f"model '{example}'); are they the same architecture?")
        skipped["only_in_model"][str(m.ref)] = sum(1 for n in m.index.tensors
                                                   if n not in btensors)
    selected = []
    for name in names:
        info = btensors[name]
        if not info.dtype.is_floating_point:
            skipped["not_floating_point"] += 1
            continue
        missing = differs = False
        for m in models:
            other = m.index.tensors.get(name)
            if other is None:
                missing = True
            elif tuple(other.shape) != tuple(info.shape) or not other.dtype.is_floating_point:
                if not is_vocab_tensor(name):
                    raise MergeError(
                        f"tensor '{name}' has shape {list(other.shape)} ({other.dtype}) in "
                        f"{m.ref} ({other.file}) but {list(info.shape)} in the base "
                        f"{base.ref}; inspect compares fine-tunes of one architecture (only "
                        "embeddings and LM heads may differ in size: they are skipped)")
                differs = True
        if differs:
            skipped["shape_differs"].append(name)
        elif missing:
            skipped["missing_in_a_model"].append(name)
        else:
            selected.append(name)
    if not selected:
        raise MergeError(f"no tensor can be compared: every tensor of the base {base.ref} is "
                         "missing from a model or has another shape there")
    return selected, skipped


def _row_chunks(shape: tuple[int, ...], chunk_elements: int) -> list[tuple[int, int] | None]:
    numel = math.prod(shape)
    if not shape or numel <= chunk_elements:
        return [None]
    row = math.prod(shape[1:]) or 1
    step = max(1, chunk_elements // row)
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def inspect_sources(base: ModelSource, models: Sequence[ModelSource], *,
                    rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                    rank: bool = True, rank_max_dim: int = DEFAULT_RANK_MAX_DIM,
                    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, device: str = "cpu",
                    progress: Callable[[int, int, str], None] | None = None,
                    names: Sequence[str] | None = None) -> InspectResult:
    """Measure resolved models against a resolved base (see :func:`inspect_models`)."""
    if rtol < 0 or atol < 0:
        raise MergeError(f"--rtol and --atol must be ≥ 0 (got {rtol}, {atol})")
    if chunk_elements < 1:
        raise MergeError(f"chunk_elements must be ≥ 1 (got {chunk_elements})")
    if rank and rank_max_dim < 1:
        raise MergeError(f"--rank-max-dim must be ≥ 1 (got {rank_max_dim})")
    if not models:
        raise MergeError("give at least one model to compare with the base")
    torch_device = torch.device(device)
    order = sorted(base.index.tensors, key=base.index.order_key)
    selected, skipped = _select(base, models, order)
    for s in (base, *models):
        s.ensure_local()
    k = len(models)
    stacks = layer_stacks(base.index.tensors)
    result = InspectResult(
        str(base.ref), [str(m.ref) for m in models], list(names or _display_names(models)),
        {"rtol": rtol, "atol": atol, "rank": rank, "rank_max_dim": rank_max_dim,
         "chunk_elements": chunk_elements, "device": device}, skipped=skipped)
    with TensorReader() as reader:
        for done, name in enumerate(selected, 1):
            result.tensors.append(_inspect_tensor(
                reader, base, models, name, _layer_of(name, stacks), rtol, atol,
                rank, rank_max_dim, chunk_elements, torch_device))
            if progress is not None:
                progress(done, len(selected), name)
    groups: dict[str, Group] = {}
    whole = Group("whole_model", "whole model", Sums.zero(k), [[] for _ in range(k)],
                  [[] for _ in range(k)])
    for rec in result.tensors:
        if rec.layer not in groups:
            groups[rec.layer] = Group(rec.layer, rec.layer, Sums.zero(k),
                                      [[] for _ in range(k)], [[] for _ in range(k)])
        groups[rec.layer].add(rec)
        whole.add(rec)
    for key, label in _layer_order(list(groups), stacks):
        groups[key].label = label
        result.layers.append(groups[key])
    result.whole = whole
    result.skipped["rank"] = _rank_counts(result.tensors)
    result.recommendations = recommend(whole, result.names)
    return result


def _rank_counts(records: Sequence[TensorRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.rank_note] = counts.get(r.rank_note, 0) + 1
    return counts


def _rank_note(name: str, shape: tuple[int, ...], rank: bool, rank_max_dim: int) -> str:
    if not rank:
        return "off"
    if len(shape) != 2 or min(shape) < 2:
        return "not a matrix"
    if is_vocab_tensor(name) or is_pre_layer(name):
        return "embedding/head"
    if min(shape) > rank_max_dim:
        return f"larger than {rank_max_dim}"
    return "computed"


def _inspect_tensor(reader: TensorReader, base: ModelSource, models: Sequence[ModelSource],
                    name: str, layer: str, rtol: float, atol: float, rank: bool,
                    rank_max_dim: int, chunk_elements: int, device: torch.device
                    ) -> TensorRecord:
    shape = tuple(base.index.tensors[name].shape)
    k = len(models)
    note = _rank_note(name, shape, rank, rank_max_dim)
    chunks = _row_chunks(shape, chunk_elements)
    sums = Sums.zero(k)
    ranks: list[float | None] = [None] * k
    for rows in chunks:
        b = _read(reader, base, name, rows, device)
        ms = [_read(reader, m, name, rows, device) for m in models]
        sums = sums + chunk_sums(b, ms, rtol, atol)
        if note == "computed" and len(chunks) == 1:
            ranks = [effective_rank(m - b) for m in ms]
        del b, ms
    if note == "computed" and len(chunks) > 1:  # whole matrices: one model at a time
        b = _read(reader, base, name, None, device)
        for i, m in enumerate(models):
            delta = _read(reader, m, name, None, device).sub_(b)
            ranks[i] = effective_rank(delta)
            del delta
        del b
    return TensorRecord(name, layer, shape, sums, ranks, note)


def inspect_models(base: str, models: Sequence[str], *, rtol: float = DEFAULT_RTOL,
                   atol: float = DEFAULT_ATOL, rank: bool = True,
                   rank_max_dim: int = DEFAULT_RANK_MAX_DIM,
                   chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, device: str = "cpu",
                   progress: Callable[[int, int, str], None] | None = None) -> InspectResult:
    """Compare the task vectors ``model − base`` of ``models`` (folders, Hub ids or
    ``model+adapter`` references), streaming one tensor at a time.

    Example::

        from mergesmith.tools.inspect_models import inspect_models
        result = inspect_models("./base", ["./ft_math", "./ft_code"])
        print(result.summary())
        for r in result.recommendations: print(r.line())
    """
    base_source = resolve(parse_model_reference(base, "BASE"), "BASE")
    sources = [resolve(parse_model_reference(m, f"MODEL {i}"), f"MODEL {i}")
               for i, m in enumerate(models, 1)]
    return inspect_sources(base_source, sources, rtol=rtol, atol=atol, rank=rank,
                           rank_max_dim=rank_max_dim, chunk_elements=chunk_elements,
                           device=device, progress=progress)

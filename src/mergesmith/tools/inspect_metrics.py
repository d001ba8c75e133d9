"""The numbers ``mergesmith inspect`` measures, as additive sums so that chunks, tensors,
layers and the whole model combine exactly while the models are streamed.

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
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-8


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
    """Median of the values that are not None (None when there is none)."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None (None when there is none)."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


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
        "mean_cosine": mean(cos),
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

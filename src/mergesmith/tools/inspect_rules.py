"""Rule-based merge-method suggestions from the whole-model numbers, kept apart from the
measuring so the rules and their thresholds can be read and tuned in one place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .inspect_metrics import Group, mean, median

# Recommendation thresholds (whole-model numbers); see recommend().
NEAR_IDENTICAL_COSINE = 0.9
CONFLICT_OF_CHANCE = 0.8
MIN_OVERLAP = 0.1
SPARSE = 0.5
ORTHOGONAL_COSINE = 0.2
LOW_RELATIVE_RANK = 0.2
DOMINANT_NORM_RATIO = 2.0


@dataclass
class Recommendation:
    """Merge methods a rule points to (empty for hints), and why, with the numbers."""

    rule: str
    methods: list[str]
    reason: str

    def line(self) -> str:
        head = ", ".join(self.methods) if self.methods else "hint"
        return f"{head}: {self.reason}"


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
    cos = mean(s.cosines())
    conflict, chance, overlap = s.sign_conflict(), s.sign_conflict_chance(), s.overlap()
    sparsity = mean(s.sparsity())
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

"""``mergesmith inspect``: how task vectors relate, before choosing a merge method.

This module reads the models and puts the pieces together; the metrics are defined in
:mod:`.inspect_metrics`, the recommendations in :mod:`.inspect_rules`, the terminal summary
and the report folder in :mod:`.report`.

Streaming: one tensor name at a time in the base's file order; element-wise metrics read
row chunks of at most ``chunk_elements`` entries from the base and every model, so memory
stays at a few chunk-sized buffers per model. The effective rank needs a whole matrix: for
a matrix larger than one chunk it is computed afterwards, one model at a time (the base's
matrix, that model's task vector and its float64 Gram matrix in memory).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..arch import is_pre_layer, is_vocab_tensor, layer_stacks, split_layer
from ..checkpoint import ModelSource, TensorReader, resolve
from ..errors import MergeError
from ..recipe.refs import parse_model_reference
from .inspect_metrics import (DEFAULT_ATOL, DEFAULT_RTOL, DEFINITIONS, Group, Sums,
                              TensorRecord, chunk_sums, effective_rank, metrics, pairs)
from .inspect_rules import Recommendation, recommend

DEFAULT_RANK_MAX_DIM = 2048
DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 4M entries (16 MB in float32) per model and chunk

__all__ = ["DEFAULT_ATOL", "DEFAULT_CHUNK_ELEMENTS", "DEFAULT_RANK_MAX_DIM", "DEFAULT_RTOL",
           "DEFINITIONS", "Group", "InspectResult", "Recommendation", "Sums", "TensorRecord",
           "chunk_sums", "effective_rank", "inspect_models", "inspect_sources", "metrics",
           "pairs", "recommend"]


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


def _clean(x: Any) -> Any:
    """JSON-safe: non-finite floats → None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


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

"""Planning the statistics of a data-aware merge (RegMean, Fisher): which artefact holds each
input model's statistics, which output tensors have them, and checks before any weight is
read.

Where a model's statistics come from (the provider seam):

1. its ``statistics`` parameter (per model, or top level): a statistics artefact
   (``mergesmith.statistics.store``), or a folder holding ``<model folder name>.safetensors``;
   several values (e.g. per-tensor filters naming several files) are read as one;
2. otherwise :func:`calibration_statistics`, which computes them from the recipe's
   ``calibration:`` block (**the one place the calibration pass is connected**).

Per output tensor, a method declaring ``statistics={"gram"}`` gets them for 2-D tensors
whose Gram exists in every merged model's artefact (a Gram in some models but not in
others is an error naming the model and the tensor), ``{"fisher"}`` for tensors whose
Fisher exists in every model; the other tensors go to the method without statistics (it
falls back to an average, see the methods' docs). The result is
``Plan.statistics``: output tensor name → one :class:`TensorStatistics` per input.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ..errors import MergeError
from ..statistics.store import FISHER, GRAM, Statistics
from .draft import Draft
from .types import OutputTensor


@dataclass(frozen=True)
class TensorStatistics:
    """The statistics of one input tensor (``name`` in its model), read when asked."""

    source: Statistics
    name: str
    rows: tuple[int, int] | None = None
    fisher_scale: float = 1.0
    """The Fisher is multiplied by this (its model's normalisation, 1 when off)."""

    def gram(self) -> Any:
        return self.source.gram(self.name)

    def tokens(self) -> int:
        return self.source.tokens(self.name)

    def fisher(self) -> Any:
        f = self.source.fisher(self.name, self.rows)
        return f if f is None or self.fisher_scale == 1.0 else f.mul_(self.fisher_scale)

    def restrict(self, rows: tuple[int, int] | None) -> TensorStatistics:
        """The same for rows ``start:end`` of the tensor (a row chunk of the merge)."""
        if rows is None:
            return self
        if self.rows is not None:
            rows = (self.rows[0] + rows[0], self.rows[0] + rows[1])
        return TensorStatistics(self.source, self.name, rows, self.fisher_scale)


STATISTICS_PARAM = "statistics"
"""The per-model parameter naming a precomputed statistics artefact."""


def calibration_statistics(d: Draft, model: int, kinds: Collection[str]) -> Statistics:
    """Statistics of model ``model`` computed from the recipe's ``calibration:`` block (the
    same tokens through every model: tokenized with each model's tokenizer, which must
    agree), from the statistics cache when already computed. Planning needs them (which
    tensors have a Gram, their shapes), so ``check`` computes and caches them too."""
    ref = d.refs[model]
    method = d.spec.name
    settings = getattr(d.recipe, "calibration", None)
    if settings is None:
        raise MergeError(
            f"merge method '{method}' needs statistics ({', '.join(sorted(kinds))}) of model "
            f"'{ref}' on calibration data: add a calibration: block to the recipe, or give "
            f"the model 'parameters: {{statistics: PATH}}' naming a precomputed statistics "
            "artefact (mergesmith stats)")
    from ..statistics.calibration import common_tokens
    from ..statistics.collect import compute_statistics

    key = id(settings)
    cached = _TOKENS.get(key)
    if cached is None or cached[0] is not settings:
        folders = [(str(r), s.folder) for r, s in zip(d.refs, d.sources)
                   if getattr(s, "stage", None) is None]
        cached = _TOKENS[key] = (settings, common_tokens(settings, folders))
    device = "cpu" if d.options.device in ("auto", "cpu") else d.options.device
    return compute_statistics(d.sources[model], cached[1], kinds=set(kinds), device=device,
                              cache=True)


_TOKENS: dict[int, tuple[Any, Any]] = {}
"""Calibration tokens per recipe block while planning (tokenized once for all models)."""


def _open(d: Draft, model: int, values: Collection[str]) -> Statistics:
    paths = []
    for value in sorted(values):
        path = os.path.abspath(os.path.expanduser(value))
        if os.path.isdir(path):
            folder = os.path.basename(os.path.normpath(d.sources[model].folder))
            path = os.path.join(path, folder + ".safetensors")
        if not os.path.isfile(path):
            raise MergeError(f"model '{d.refs[model]}': statistics artefact '{path}' (from "
                             f"'{STATISTICS_PARAM}: {value}') does not exist; compute it "
                             "with mergesmith stats or fix the path")
        paths.append(path)
    try:
        return Statistics(paths)
    except Exception as e:  # not safetensors, or another format
        raise MergeError(f"model '{d.refs[model]}': cannot read the statistics artefact "
                         f"{', '.join(paths)}: {e}") from None


def _fisher_scale(stats: Statistics) -> float:
    """1 / the L2 norm of the model's whole diagonal Fisher (FusionBench's and MergeLM's
    ``normalize_fisher_weight``): models whose gradients differ in scale weigh alike."""
    total = 0.0
    for name in stats.names("fisher"):
        f = stats.fisher(name).double()
        total += float((f * f).sum())
    return 1.0 / total ** 0.5 if total > 0 else 1.0


def plan_statistics(d: Draft) -> dict[str, tuple[TensorStatistics, ...]]:
    """Find and check the statistics of every output tensor of a data-aware method (see
    the module docs); nothing for other methods."""
    kinds = d.spec.scheduling.statistics
    mine = [t for t in d.outputs if t.method == d.spec.name and not t.copied]
    if not kinds or not mine or MERGED_GRAM in kinds:  # RegMean++: plan_merged_grams
        return {}
    named: dict[int, set[str]] = {}
    for t in mine:
        for k, (inp, p) in enumerate(zip(t.inputs, t.model_params)):
            if k == t.base_index:
                continue
            named.setdefault(inp.model, set())
            if p.get(STATISTICS_PARAM):
                named[inp.model].add(p[STATISTICS_PARAM])
    sources = {m: _open(d, m, values) if values else calibration_statistics(d, m, kinds)
               for m, values in named.items()}
    scales: dict[int, float] = {}
    if "fisher" in kinds and any(t.params.get("fisher_normalize") for t in mine):
        scales = {m: _fisher_scale(s) for m, s in sources.items()}
    out: dict[str, tuple[TensorStatistics, ...]] = {}
    kind = "gram" if "gram" in kinds else "fisher"
    skipped = 0
    for t in mine:
        found = _tensor_statistics(d, t, kind, sources,
                                   scales if t.params.get("fisher_normalize") else {})
        if found is None:
            skipped += 1
        else:
            out[t.name] = found
    if skipped:
        what = ("no input Gram matrix (not a linear layer's weight: embeddings, norms, "
                "biases)" if kind == "gram" else "no diagonal Fisher")
        d.notes.append(f"{d.spec.name}: {len(out)} tensors merged with their {kind} "
                       f"statistics; {skipped} have {what} and are averaged (see "
                       f"`mergesmith methods {d.spec.name}`)")
    return out


def _tensor_statistics(d: Draft, t: OutputTensor, kind: str, sources: dict[int, Statistics],
                       scales: dict[int, float]) -> tuple[TensorStatistics, ...] | None:
    if t.reindex or t.stack or t.expert_parts:
        return None  # rows re-indexed to a new vocabulary / stacked experts: averaged
    if kind == "gram" and len(t.shape) != 2:
        return None
    suffix = GRAM if kind == "gram" else FISHER
    want = (t.shape[1], t.shape[1]) if kind == "gram" else tuple(t.shape)
    entries: list[TensorStatistics | None] = []
    have, lack = [], []
    for k, inp in enumerate(t.inputs):
        if k == t.base_index:
            entries.append(None)
            continue
        stats = sources[inp.model]
        shape = stats.shape(inp.name + suffix)
        if shape is None:
            lack.append(d.refs[inp.model])
            entries.append(None)
            continue
        if tuple(shape) != want:
            raise MergeError(f"model '{d.refs[inp.model]}': the {kind} statistics of tensor "
                             f"'{inp.name}' have shape {list(shape)}, expected {list(want)}; "
                             "the artefact was computed for another model — recompute it "
                             "for this one")
        have.append(d.refs[inp.model])
        entries.append(TensorStatistics(stats, inp.name, None, scales.get(inp.model, 1.0)))
    if not have:
        return None
    if lack:
        raise MergeError(f"merge method '{d.spec.name}': model '{lack[0]}' has no {kind} "
                         f"statistics for tensor '{t.name}' while '{have[0]}' has; compute "
                         "every model's statistics on the same calibration data (same "
                         "calibration: block, or artefacts from mergesmith stats with the "
                         "same settings)")
    return tuple(entries)  # type: ignore[arg-type]


# ------------------------------------------------------------------ RegMean++ (merged_gram)

MERGED_GRAM = "merged_gram"
"""The statistics kind of RegMean++: Grams of each model's linear inputs where each decoder
layer's input is the hidden states of the *merged* earlier layers. They depend on the merge
itself, so they are computed with the plan, by a sequential pass that merges layer by layer
with the plan's own work items (``plan_merged_grams``)."""


class _LiveGram:
    """A Gram of the sequential pass, as the engine will read it back from the artefact
    (rounded to float32)."""

    def __init__(self, gram: Any, count: int) -> None:
        import torch

        self._gram, self._count = gram.to(dtype=torch.float32), int(count)

    def gram(self) -> Any:
        return self._gram

    def tokens(self) -> int:
        return self._count

    def restrict(self, rows: tuple[int, int] | None) -> _LiveGram:
        return self


def _calibration_tokens(d: Draft, why: str) -> Any:
    settings = getattr(d.recipe, "calibration", None)
    if settings is None:
        raise MergeError(why)
    from ..statistics.calibration import common_tokens

    key = id(settings)
    cached = _TOKENS.get(key)
    if cached is None or cached[0] is not settings:
        folders = [(str(r), s.folder) for r, s in zip(d.refs, d.sources)
                   if getattr(s, "stage", None) is None]
        cached = _TOKENS[key] = (settings, common_tokens(settings, folders))
    return cached[1]


def _merge_digest(p: Any, mine: list[OutputTensor], fingerprints: list[str]) -> str:
    """Everything the merged hidden states depend on besides the calibration tokens."""
    import hashlib
    import json

    what = {"models": fingerprints, "compute": str(p.options.compute_dtype),
            "read": str(p.read_dtype), "seed": p.seed,
            "tensors": [[t.name, str(t.dtype), t.base_index, [i.model for i in t.inputs],
                         t.params, list(t.model_params)] for t in mine]}
    text = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def plan_merged_grams(p: Any, d: Draft) -> Any:
    """RegMean++: run (or find in the statistics cache) the sequential pass for plan ``p``
    and return it with ``statistics`` reading the resulting per-model Gram artefacts.

    The pass carries the calibration tokens through the merged model: for each decoder
    layer every model's own layer runs on the merged hidden states (its linear inputs'
    Grams collected), the layer's tensors are merged by the plan's own work items with
    those Grams, and the merged layer gives the next hidden states. The engine then merges
    with the stored Grams — the same numbers, so the output equals the pass's merge."""
    import contextlib
    import dataclasses
    import json

    from ..statistics.cache import COMPUTE, StatsCache, source_fingerprint
    from ..statistics.store import FORMAT

    name = d.spec.name
    mine = [t for t in p.tensors if t.method == name and not t.copied]
    for t in mine:
        odd = next((i for i in t.inputs if i.name != t.name), None)
        if odd is not None or t.reindex or t.stack or t.expert_parts:
            raise MergeError(
                f"merge method '{name}' merges whole models of one architecture layer by "
                f"layer; output tensor '{t.name}' is made from "
                + (f"'{odd.name}'" if odd is not None else "re-indexed or stacked rows")
                + " (slices, layer ranges or a new vocabulary): use 'regmean' for such recipes")
    if not mine:
        return p
    staged = next((r for r, s in zip(d.refs, d.sources) if getattr(s, "stage", None)), None)
    if staged is not None:
        raise MergeError(f"merge method '{name}' runs its models layer by layer through "
                         f"transformers and cannot take '{staged}', an earlier stage's output "
                         "computed on the fly; run that stage on its own first (mergesmith run "
                         "--stage) and name its output folder")
    tokens = _calibration_tokens(
        d, f"merge method '{name}' needs calibration data: its Grams are taken on the "
           "merged model's hidden states of calibration tokens; add a calibration: block")
    regressed = sorted({i.model for t in mine for k, i in enumerate(t.inputs)
                        if k != t.base_index})
    fingerprints = [source_fingerprint(s) for s in d.sources]
    digest = _merge_digest(p, mine, fingerprints)
    cache = StatsCache()
    keys = {m: {"model": fingerprints[m], "calibration": tokens.fingerprint, "kinds": ["gram"],
                MERGED_GRAM: digest, "position": m, "compute": COMPUTE, "format": FORMAT}
            for m in regressed}
    found = {m: cache.get(k) for m, k in keys.items()}
    if any(s is None for s in found.values()):
        with contextlib.ExitStack() as stack:
            folders = {m: stack.enter_context(cache.building(keys[m])) for m in regressed}
            files = _merged_gram_pass(p, d, mine, regressed, tokens, folders)
            for m in regressed:
                manifest = {"key": keys[m], "files": files[m], "kinds": ["gram"],
                            "tokens": tokens.tokens}
                with open(f"{folders[m]}/manifest.json", "w", encoding="utf-8") as f:
                    json.dump(manifest, f, indent=1)
        found = {m: cache.get(k) for m, k in keys.items()}
        if any(s is None for s in found.values()):  # cache disabled or unwritable
            raise MergeError(f"merge method '{name}': the statistics cache "
                             f"{cache.folder} could not be written; set "
                             "MERGESMITH_STATS_CACHE to a writable folder")
        d.notes.append(f"{name}: Grams taken on the merged model's hidden states (sequential "
                       "pass over the layers, cached)")
    else:
        d.notes.append(f"{name}: Grams of the merged model's hidden states from the "
                       "statistics cache")
    sources = {m: s for m, s in found.items() if s is not None}
    out: dict[str, tuple[TensorStatistics, ...]] = {}
    for t in mine:
        entry = _tensor_statistics(d, t, "gram", sources, {})
        if entry is not None:
            out[t.name] = entry
    return dataclasses.replace(p, statistics=out, notes=tuple(d.notes))


def _merged_gram_pass(p: Any, d: Draft, mine: list[OutputTensor], regressed: list[int],
                      tokens: Any, folders: dict[int, str]) -> dict[int, list[str]]:
    """The sequential pass (``statistics.sequential``) with the plan's work items as the
    merge; writes each model's Grams, one file per layer, into ``folders``."""
    import dataclasses

    import torch

    from ..checkpoint.reader import TensorReader
    from ..execute import WorkItem, _Job
    from ..stages import _Capture
    from ..statistics.sequential import regmean_plusplus_merge
    from ..statistics.store import StatisticsWriter

    by_name = {t.name: t for t in mine}
    others = {t.name: t for t in p.tensors}
    live: dict[str, tuple[Any, ...]] = {}
    plan = dataclasses.replace(p, statistics=live)
    device = torch.device("cpu" if p.options.device in ("auto", "cpu") else p.options.device)
    files: dict[int, list[str]] = {m: [] for m in regressed}
    step = iter(range(1 << 30))
    with TensorReader() as reader:
        capture = _Capture()
        job = _Job(plan, [m.ensure_local() for m in p.models], reader, capture, [device])

        def merge(names: list[str], grams: list[dict[str, tuple[Any, int]]] | None
                  ) -> dict[str, torch.Tensor]:
            if grams is not None:
                label = f"layer-{next(step):05d}.gram.safetensors"
                for m, g in zip(regressed, grams):
                    writer = StatisticsWriter()
                    for n, (gram, count) in g.items():
                        writer.add_gram(n, gram, count)
                    writer.save(f"{folders[m]}/{label}")
                    files[m].append(label)
            values = {}
            for n in dict.fromkeys(names):
                t = by_name.get(n) or others.get(n)
                if t is None:  # not in the output (e.g. a tied head's alias): first model's
                    values[n] = job.reader.read(p.models[regressed[0]].index.tensors[n])
                    continue
                if grams is not None and t.name in by_name and len(t.shape) == 2 and all(
                        n in g for g in grams):
                    pos = {m: k for k, m in enumerate(regressed)}
                    live[n] = tuple(None if k == t.base_index else
                                    _LiveGram(*grams[pos[i.model]][n])
                                    for k, i in enumerate(t.inputs))
                job._compute(WorkItem(t, None))
                values[n] = capture.take()
                live.pop(n, None)
            return values

        sources = [p.models[m] for m in regressed]
        for _ in regmean_plusplus_merge(sources, None, None, tokens, device=device,
                                        merge=merge):
            pass
    return files

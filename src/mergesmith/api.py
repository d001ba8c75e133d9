"""Python API: ``run`` a recipe, ``check`` it, or ``plan`` it without reading tensor data."""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from typing import Any

from . import _torch, memory
from . import resume as resume_module
from .checkpoint import ModelSource, resolve, resolve_tokenizer
from .checkpoint.gguf_input import describe as describe_gguf
from .cluster_estimate import (
    NODE_BANDWIDTH,
    TASK_OVERHEAD_SECONDS,
    ShardCost,
    cluster_seconds,
    node_counts,
)
from .devices import resolve_devices
from .errors import MergeError, MergeIOError
from .execute import chunk_elements_for, execute, item_memory, work_items
from .methods.linalg import NO_WORK, DenseWork
from .options import Options
from .output import (
    check_output,
    partial_path,
    prepare_partial,
    publish,
    publish_file,
    verify_folder,
    verify_gguf,
    write_checksums,
    write_side_files,
)
from .output import verify as verify_plan
from .plan import LayerSource, Plan, make_plan, referenced_models
from .plan.recipe_view import external_tokenizer
from .recipe import load_recipe
from .writer import check_disk_space

RecipeLike = Any  # path, YAML text, mapping or Recipe


@dataclass
class CheckReport:
    """What ``check`` found: the plan and its cost estimate."""

    plan: Plan
    peak_memory: int
    threads: int
    memory_limit: int | None = None
    baseline: int = 0
    seconds: float = 0.0
    over_limit: tuple[tuple[str, int], ...] = ()  # (tensor, bytes) needing more than the limit
    dense: DenseWork = NO_WORK  # SVDs and other dense linear algebra the method needs

    def summary(self) -> str:
        from .units import format_bytes as fb

        p = self.plan
        from .stages import stage_lines

        lines = [
            *stage_lines(p),
            f"recipe:        {p.recipe.source} — merge_method {p.method.name}"
            + (" (the last stage)" if p.stages else ""),
            "models:",
        ]
        for i, m in enumerate(p.models):
            roles = (["base"] if m.ref == p.recipe.base_model else []) + (
                ["donor of config.json and tokenizer"] if i == p.donor else [])
            role = f" ({', '.join(roles)})" if roles else ""
            pending = ", weights to download" if m.pending_download else ""
            if m.stage is not None:
                pending = ", computed by its stage as it is read"
            formats = sorted({t.quant.format for t in m.index.tensors.values() if t.quant
                              and t.quant.format not in ("gguf", "stage")}
                             | ({describe_gguf(m.index)} - {None}))
            quantized = (f", {' and '.join(formats)} weights dequantized as they are read"
                         if formats else "")
            lines.append(f"  {m.ref}: {len(m.index.tensors)} tensors, "
                         f"{fb(m.index.total_bytes)}{pending}{quantized}{role}")
        if p.options.out_format == "gguf":
            kinds = sorted({t.encoding.describe() for t in p.tensors})
            stored = f"one GGUF file: {', '.join(kinds)}"
        else:
            dtypes = sorted({str(s.dtype).removeprefix('torch.')
                             for t in p.tensors for s in t.stored})
            stored = f"{len(p.shards)} file(s), dtype {', '.join(dtypes)}"
        lines += [
            f"output:        {len(p.tensors)} tensors in {stored}",
            f"bytes to read: {fb(p.bytes_read)}",
            f"bytes to write: {fb(p.bytes_written)}",
            f"peak memory:   about {fb(self.peak_memory + self.baseline)} with "
            f"{self.threads} thread(s) ({fb(self.peak_memory)} of tensor data in flight, "
            f"{fb(self.baseline)} for Python, torch and the plan)"
            + (f"; --memory-limit {fb(self.memory_limit)}" if self.memory_limit else ""),
        ]
        if self.over_limit:
            name, need = self.over_limit[0]
            lines.append(
                f"warning: --memory-limit {fb(self.memory_limit or 0)} cannot hold: "
                f"{len(self.over_limit)} tensor(s) need more at once, because "
                f"{p.method.name} needs whole tensors (largest: '{name}', {fb(need)}); they "
                "run one at a time, and the peak is the estimate above")
        lines.append(f"time:          about {self.seconds:.0f} s with {self.threads} thread(s) "
                     "(rough: rates measured on a 2-core x86 machine with the inputs in "
                     "the page cache; reading from disk adds bytes to read ÷ disk speed)")
        if self.dense.factorizations or self.dense.product_flops:
            d = self.dense
            lines.append(
                f"linear algebra: {d.factorizations:,} factorization(s) (SVD, eigh, QR) of "
                f"{_flops(d.factorization_flops)} and {_flops(d.product_flops)} of matrix "
                f"products: about {dense_seconds(d, self.threads):.0f} s of the time above")
        for module, layers in p.layer_maps.items():
            title = "layer map" + ("" if module == "default" else f" of module '{module}'")
            lines.append(f"{title} (output layers ← input layers):")
            lines += [f"  {line}" for line in layer_map_lines(layers)]
        lines += [f"note: {n}" for n in p.notes]
        lines += [f"warning: {w}" for w in p.warnings]
        return "\n".join(lines)


def layer_map_lines(layers: list[LayerSource]) -> list[str]:
    """Compact layer map: runs of consecutive layers from the same models on one line."""
    runs: list[list[LayerSource]] = []
    for layer in layers:
        prev = runs[-1][-1] if runs else None
        if prev is not None and [m for m, _ in prev.inputs] == [m for m, _ in layer.inputs] \
                and all(i == j + 1 for (_, i), (_, j) in zip(layer.inputs, prev.inputs)):
            runs[-1].append(layer)
        else:
            runs.append([layer])

    def span(a: int, b: int) -> str:
        return str(a) if a == b else f"{a}-{b}"

    lines = []
    for run in runs:
        first, last = run[0], run[-1]
        sources = " + ".join(f"{model} [{span(i, j)}]" for (model, i), (_, j)
                             in zip(first.inputs, last.inputs))
        lines.append(f"{span(first.output, last.output):>7} ← {sources}")
    return lines


def _options(options: Options | None, values: dict[str, Any]) -> Options:
    """``options`` with ``values`` (user-facing: ``"500M"``, ``"float64"``) applied."""
    if options is None:
        return Options.parse(**values)
    if not values:
        return options
    parsed = Options.parse(**values)
    return options.replace(**{k: getattr(parsed, k) for k in values if values[k] is not None})


def plan(recipe: RecipeLike, options: Options | None = None, *, stage: str | None = None,
         **option_values: Any) -> Plan:
    """Parse and validate a recipe, resolve its models, and plan the merge (no tensor data).
    Options are an :class:`~mergesmith.options.Options` or its fields as keywords.

    A multi-stage recipe (several YAML documents, or a list of mappings) plans the stages
    its final one needs — the unnamed document, or the one named ``stage`` — and returns
    the final stage's plan; its ``stages`` lists them, and the intermediate stages are
    among its models as sources computed when read (nothing is written)."""
    from .stages import plan_stages, read_stages

    options = _options(options, option_values)
    if isinstance(recipe, (list, tuple)) and len(recipe) == 1:
        recipe = recipe[0]  # a list of one mapping: a recipe of one stage
    graph = read_stages(recipe)
    if graph is not None:
        return plan_stages(graph, options, stage, resolve, resolve_tokenizer)
    r = load_recipe(recipe)
    if stage is not None:
        raise MergeError(f"--stage '{stage}': the recipe has a single stage (a multi-stage "
                         "recipe has several YAML documents separated by '---')")
    sources: dict = {}
    for ref, where in referenced_models(r):
        sources[ref] = resolve(ref, where)
    external = external_tokenizer(r)
    tokenizer = resolve_tokenizer(*external) if external is not None else None
    return make_plan(r, sources, options, tokenizer)


def estimate_peak_memory(p: Plan, threads: int, chunk_elements: int | None = None,
                         budget: int | None = None) -> int:
    """Bytes of tensor data in flight at once: the largest items that run together, under
    the data budget (an item larger than the budget runs alone)."""
    budget = memory.data_budget(None) if budget is None else budget
    counts = _item_memory_counts(p, chunk_elements)
    if not counts:
        return 0
    costs: list[int] = []  # the largest ``threads`` items
    for cost in sorted(counts, reverse=True):
        costs += [cost] * min(counts[cost], threads - len(costs))
        if len(costs) >= threads:
            break
    together = sum(costs)
    return max(costs[0], min(together, budget)) if threads > 1 else costs[0]


def _item_memory_counts(p: Plan, chunk_elements: int | None) -> Counter[int]:
    """How many work items need each number of bytes. The row chunks of one tensor that
    hold as many rows need the same (chunks start at multiples of the step, so an encoded
    tensor's chunks of equal length hold as many scale rows): each length is costed once,
    which keeps this fast on plans of 10⁵ tensors and 10⁶ chunks."""
    counts: Counter[int] = Counter()
    seen: dict[tuple[int, int], int] = {}
    for item in work_items(p, chunk_elements):
        t = item.tensor
        if t.stack or item.rows is None:
            counts[item_memory(p, item)] += 1
            continue
        key = (id(t), item.rows[1] - item.rows[0])
        if key not in seen:
            seen[key] = item_memory(p, item)
        counts[seen[key]] += 1
    return counts


COPY_SECONDS_PER_GB = 0.35
"""Copying buffers as they are, on the reference machine."""

STARTUP_SECONDS = 2.0
"""Starting Python, importing torch and planning, on the reference machine."""

REFERENCE_CORES = 2
"""The methods' ``seconds_per_gb`` were measured with this many worker threads."""


def dense_work(p: Plan) -> DenseWork:
    """The dense linear algebra of every output tensor whose method declares it."""
    total = NO_WORK
    for work in tensor_dense_work(p).values():
        total = total + work
    return total


def tensor_dense_work(p: Plan) -> dict[str, DenseWork]:
    """The dense linear algebra of each output tensor whose method declares it."""
    out: dict[str, DenseWork] = {}
    for t in p.tensors:
        compute = None if t.copied else p.bound(t).spec.cost.compute
        if compute is not None:
            tasks = len(t.inputs) - (t.base_index is not None)
            if t.expert_parts:  # fused experts: one piece of each expert at a time
                n = t.shape[0] * t.expert_parts
                piece = (t.shape[1] // t.expert_parts, *t.shape[2:]) if len(t.shape) > 1 else ()
                out[t.name] = n * compute(t.name, piece, max(1, tasks), t.params)
            else:
                out[t.name] = compute(t.name, t.shape, max(1, tasks), t.params)
    return out


def dense_seconds(work: DenseWork, threads: int) -> float:
    cores = max(1, min(threads, os.cpu_count() or 1))
    return work.seconds() * REFERENCE_CORES / cores


def estimate_seconds(p: Plan, threads: int, dense: DenseWork | None = None) -> float:
    """Wall time of the merge: each output tensor's input bytes at its method's measured
    rate (quantized inputs: the bytes they dequantize to, plus their format's decoding;
    encoded outputs: their quantization), plus the dense linear algebra methods declare
    (SVDs: not proportional to bytes), scaled by the worker threads that can run (at most
    the CPU cores)."""
    cores = max(1, min(threads, os.cpu_count() or 1))
    dense = dense_work(p) if dense is None else dense
    work = sum(tensor_work(p).values())
    return STARTUP_SECONDS + work * REFERENCE_CORES / cores + dense_seconds(dense, threads)


def tensor_work(p: Plan) -> dict[str, float]:
    """Seconds of each output tensor's byte-proportional work on the reference machine
    (``REFERENCE_CORES`` threads); ``estimate_seconds`` scales their sum."""
    per_gb: dict[str, float] = {}
    out: dict[str, float] = {}
    for t in p.tensors:
        if t.method not in per_gb:
            per_gb[t.method] = COPY_SECONDS_PER_GB if t.copied else \
                p.bound(t).spec.cost.seconds_per_gb
        work = 0.0
        for i in t.inputs:
            info = p.input_info(i)
            if info.quant is None:
                work += info.nbytes / 1e9 * per_gb[t.method]
            else:  # the method sees the dequantized tensor; decoding it costs extra
                work += info.numel / 1e9 * (info.dtype.itemsize * per_gb[t.method]
                                            + getattr(info.quant, "decode_seconds", 1.0))
        if t.encoding is not None:  # quantizing the result as it is written
            work += prod(t.shape) / 1e9 * t.encoding.encode_seconds
        out[t.name] = work
    return out


def shard_costs(p: Plan, threads: int) -> list[ShardCost]:
    """Each output shard as a unit of distributed work: the bytes of its tensors' inputs
    and outputs, and their share of ``estimate_seconds`` (without the start-up), with
    ``threads`` worker threads on each node."""
    cores = max(1, min(threads, os.cpu_count() or 1))
    work = tensor_work(p)
    dense = tensor_dense_work(p)
    out = []
    for shard in p.shards:
        seconds = sum(work[t.name] for t in shard.tensors) * REFERENCE_CORES / cores
        heavy = [dense[t.name] for t in shard.tensors if t.name in dense]
        if heavy:
            seconds += dense_seconds(sum(heavy[1:], heavy[0]), threads)
        out.append(ShardCost(
            shard.filename,
            sum(p.input_info(i).nbytes for t in shard.tensors for i in t.inputs),
            sum(t.nbytes for t in shard.tensors), seconds))
    return out


def cluster_lines(report: CheckReport, nodes: int,
                  bandwidth: float = NODE_BANDWIDTH) -> list[str]:
    """The ``check --nodes N`` table: estimated wall time on 1, 2, 4 ... N nodes."""
    from .units import format_bytes as fb

    shards = shard_costs(report.plan, report.threads)
    largest = max(shards, key=lambda s: s.seconds(bandwidth, TASK_OVERHEAD_SECONDS))
    lines = [
        f"on N nodes:    {len(shards)} output file(s) as tasks; each node like this one "
        f"({report.threads} thread(s)), reading and writing {fb(bandwidth)}/s, "
        f"{TASK_OVERHEAD_SECONDS:.0f} s per task; largest task {largest.name}: "
        f"{largest.seconds(bandwidth, TASK_OVERHEAD_SECONDS):.0f} s",
        "  nodes     time   busiest node: tasks      read   written     I/O   compute",
    ]
    for n in node_counts(nodes):
        e = cluster_seconds(shards, n, bandwidth=bandwidth, startup=STARTUP_SECONDS)
        lines.append(f"  {n:>5} {e.seconds:>8.0f} s {e.tasks:>19} {fb(e.read_bytes):>9} "
                     f"{fb(e.write_bytes):>9} {e.io_seconds:>6.0f} s {e.compute_seconds:>7.0f} s"
                     + (f" (uses {e.used_nodes})" if e.used_nodes < n else ""))
    return lines


def _flops(n: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} FLOP"


def check(recipe: RecipeLike, options: Options | None = None, *, stage: str | None = None,
          **option_values: Any) -> CheckReport:
    """Validate a recipe and estimate the merge without reading any tensor data (a
    multi-stage recipe: its stage graph too; ``stage`` as in :func:`plan`)."""
    options = _options(options, option_values)
    p = plan(recipe, options, stage=stage)
    if p.recipe.evaluate is not None:
        from .evaluate.after_merge import check_evaluation

        p = dataclasses.replace(p, notes=(*p.notes, *check_evaluation(p)))
    if getattr(p.recipe, "calibration", None) is not None:  # data-aware methods' tokens
        from .statistics.calibration import check_calibration

        p = dataclasses.replace(p, notes=(*p.notes, *check_calibration(p)))
    n = max(1, options.threads or os.cpu_count() or 1)
    limit = options.memory_limit
    baseline = memory.resident_bytes()
    if _torch.stand_in_active():  # the merge will have imported torch
        baseline += _torch.RESIDENT_BYTES
    budget, writer = memory.merge_budgets(limit, baseline)
    chunk = chunk_elements_for(limit)
    over: list[tuple[str, int]] = []
    if limit is not None:
        seen = set()
        for item in sorted(work_items(p, chunk), key=lambda i: -item_memory(p, i)):
            need = item_memory(p, item)
            if need <= budget:
                break
            if item.tensor.name not in seen:
                seen.add(item.tensor.name)
                over.append((item.tensor.name, need))
    dense = dense_work(p)
    return CheckReport(p, estimate_peak_memory(p, n, chunk, budget) + writer, n, limit,
                       baseline,
                       estimate_seconds(p, n, dense), tuple(over), dense)


@dataclass(frozen=True)
class RunResult:
    """What a run produced: the plan it carried out, and, depending on the recipe, the
    adapter merge's report or the evaluation of the merged model."""

    plan: Plan
    out: str
    adapter_result: Any = None
    evaluation: Any = None
    cluster: tuple[str, ...] = ()
    """With ``ray=``: one line per node (tasks, bytes, seconds)."""


def run(recipe: RecipeLike, out: str | os.PathLike, options: Options | None = None, *,
        progress: Callable[[Plan], Callable[[int, bool], None]] | None = None,
        stage: str | None = None, keep_intermediates: str | os.PathLike | None = None,
        **option_values: Any) -> RunResult:
    """Merge: validate and plan everything, then write ``out`` atomically.

    Options are an :class:`~mergesmith.options.Options` or its fields as keywords
    (``seed=``, ``threads=``, ``memory_limit="2G"``, ``resume=True``, ...).

    The model is built in ``OUT.partial/`` with a manifest of finished work: if the merge
    is interrupted (killed, Ctrl-C, disk full) the folder stays, and ``resume=True``
    continues from it. ``progress``, if given, is called with the plan and returns a
    callback ``(bytes_written, tensor_finished)`` called after each work item.

    A recipe's ``evaluate:`` block runs on the finished folder (unless ``evaluate=False``;
    ``eval_progress`` shows its progress bars); the results go into the model card and
    ``RunResult.evaluation``.

    A multi-stage recipe builds its final stage (or the one named ``stage``) with the
    intermediate stages fused: computed tensor by tensor where they are read, never
    written; ``keep_intermediates=DIR`` also writes each of them to ``DIR/NAME``.
    """
    from . import ray_executor

    options = _options(options, option_values)
    keep = os.fspath(keep_intermediates) if keep_intermediates is not None else None
    with ray_executor.session(options.ray):  # with Ray, the nodes warm up while this plans
        return _run(recipe, os.fspath(out), options, progress, stage, keep)


def _run(recipe: RecipeLike, out: str, options: Options,
         progress: Callable[[Plan], Callable[[int, bool], None]] | None,
         stage: str | None = None, keep: str | None = None) -> RunResult:
    from .stages import check_keep

    if options.out_format is None:
        options = options.replace(out_format="gguf" if out.lower().endswith(".gguf")
                                  else "safetensors")
    resolve_devices(options.device)
    p = plan(recipe, options, stage=stage)
    check_keep(p, keep)
    if p.stages and options.ray is not None:
        raise MergeError("multi-stage recipes do not run on Ray yet; run without --ray")
    for w in p.warnings:
        warnings.warn(w, stacklevel=2)
    check_output(out, options.overwrite, file=options.out_format == "gguf")
    evaluate = options.evaluate and p.recipe.evaluate is not None
    if evaluate:  # before the merge: a missing file should not wait for the end
        from .evaluate.after_merge import check_evaluation

        check_evaluation(p)
    if getattr(p.recipe, "calibration", None) is not None:  # before any weight is read
        from .statistics.calibration import check_calibration

        check_calibration(p)
    if p.recipe.output == "adapter":
        if evaluate:
            warnings.warn(f"{p.recipe.evaluate.where}: not run, the output is a LoRA "
                          "adapter", stacklevel=2)
        return RunResult(p, out, adapter_result=_run_adapter_merge(p, out))
    memory.data_budget(options.memory_limit)  # too small for this process: before writing
    cluster = _merge(p, out, progress(p) if progress else None, keep)
    evaluation = None
    if evaluate:
        from .evaluate.after_merge import evaluate_merge

        eval_device = str(resolve_devices(options.device)[0])
        evaluation = evaluate_merge(p, out, device=eval_device, progress=options.eval_progress)
    return RunResult(p, out, evaluation=evaluation, cluster=cluster)


def _merge(p: Plan, out: str, progress: Callable[[int, bool], None] | None,
           keep: str | None = None) -> tuple[str, ...]:
    """Write the model into ``OUT.partial`` (resuming it if asked), verify, publish; with
    ``ray``, on the cluster (returns its per-node summary)."""
    if p.options.ray is None:
        _merge_here(p, out, progress, None, keep)
        return ()
    from . import ray_executor

    with ray_executor.session(p.options.ray):  # already connected by run(): no-op
        executor = ray_executor.RayExecutor(
            p, os.path.abspath(partial_path(out)), lambda item: item_memory(p, item),
            on_task=getattr(progress, "tasks", None))
        _merge_here(p, out, progress, executor)
        return tuple(executor.summary())


def _merge_here(p: Plan, out: str, progress: Callable[[int, bool], None] | None,
                executor: Any, keep: str | None = None) -> None:
    resume = p.options.resume
    partial = partial_path(out)
    chunk = chunk_elements_for(p.options.memory_limit)
    fp = resume_module.fingerprint(p, chunk)
    finished = resume_module.load_finished(p, partial, fp) if resume else None
    if resume and finished is None:
        warnings.warn(f"nothing to resume in {partial}: starting from the beginning",
                      stacklevel=3)
    elif not resume and os.path.exists(os.path.join(partial, resume_module.MANIFEST)):
        warnings.warn(f"replacing the interrupted merge in {partial} (pass --resume to "
                      "continue it instead)", stacklevel=3)
    partial = prepare_partial(out, keep=finished is not None)
    if finished is None:
        try:
            check_disk_space(partial, sum(s.size for s in p.shards))
        except MergeIOError:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    log = resume_module.ProgressLog(partial, fp, append=finished is not None)
    digests: dict[str, str] = {}
    try:
        if p.stages:  # stages that cannot be fused, and --keep-intermediates
            from .stages import write_stages

            write_stages(p, partial, keep, lambda sp, target: _merge_here(sp, target, None,
                                                                            None))
        found = execute(p, partial, chunk_elements=chunk, finished=finished, digests=digests,
                        record=lambda item, crc: log.record(item.tensor.name, item.rows, crc),
                        progress=progress, executor=executor)
        log.close()
        for w in found:
            warnings.warn(w, stacklevel=3)
        if p.options.out_format == "gguf":  # one file: metadata and tokenizer are inside
            verify_gguf(p, partial)
            publish_file(partial, p.shards[0].filename, out)
            return
        write_side_files(p, partial)
        verify_plan(p, partial)
        resume_module.remove_records(partial)
        write_checksums(p, partial, digests)
        if p.stages:  # stages written first: their folders gave side files until now
            from .stages import remove_written

            remove_written(partial)
        publish(partial, out)
    except (MergeIOError, KeyboardInterrupt):
        log.close()  # resumable: keep what is finished
        raise
    except MergeError:
        log.close()  # the inputs are wrong: nothing worth resuming
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except BaseException:
        log.close()
        raise


def _run_adapter_merge(p: Plan, out: str) -> Any:
    """``output: adapter``: LoRA inputs merged into one adapter (small: written at once)."""
    from .tools.merge_adapters import merge_adapters

    partial = prepare_partial(out, keep=False)
    try:
        result = merge_adapters(p, partial)
        publish(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return result


def verify(folder: str | os.PathLike) -> list[str]:
    """Re-check a merged folder (checksums, headers, index); return the problems found."""
    return verify_folder(os.fspath(folder))


def run_moe(config: Any, out: str | os.PathLike, options: Options | None = None,
            **kwargs: Any) -> Plan:
    """Build a mixture-of-experts model from a mergekit-moe config (see ``mergesmith.moe``)."""
    from .moe import run_moe as _run_moe

    return _run_moe(config, out, options, **kwargs)


def check_moe(config: Any, options: Options | None = None, **option_values: Any) -> Any:
    """Validate a mergekit-moe config and plan it without reading weights."""
    from .moe import check_moe as _check_moe

    return _check_moe(config, options, **option_values)


__all__ = ["CheckReport", "ModelSource", "Options", "RunResult", "check", "check_moe", "plan",
           "run", "run_moe", "verify"]

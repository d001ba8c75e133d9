"""Executing a plan: read → math → write for every output tensor, in parallel, bounded memory.

Work items are output tensors, and row chunks of them for element-wise methods, processed
in input-file order by a pool of worker threads (torch kernels release the GIL). Each
worker uses one intra-op thread: parallelism comes from independent work items, and the
bytes written never depend on the number of threads.
"""

from __future__ import annotations

import gc
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

from ._torch import torch
from .checkpoint import CheckpointIndex, TensorReader
from .devices import resolve_devices
from .errors import MergeError
from .executors import Executor, ThreadExecutor
from .memory import HeapTrimmer, keep_freed_memory, merge_budgets
from .methods.registry import AnotherPass, MergeInputs, TensorStatistic
from .options import Options
from .plan import InputTensor, OutputTensor, Plan
from .writer import OutputSink, ShardWriter

CHUNK_ELEMENTS = 2 * 1024 * 1024
"""Rows of element-wise tensors are processed in chunks of about this many elements
(8 MB per input in float32), so memory stays flat however large a tensor is."""

CHUNK_INPUTS = 3
"""Row chunks hold ``CHUNK_ELEMENTS`` elements of each input for up to this many inputs; a
tensor merged from more inputs gets proportionally fewer rows per chunk, so the data in
flight (and so peak memory) does not grow with the number of models."""

BLOCK_ELEMENTS = 256 * 1024
"""Within a work item, element-wise math runs on row blocks of about this many elements
(1 MB per input in float32): the upcast inputs, the method's temporaries and the result
stay in the CPU cache instead of streaming through main memory several times."""


BLOCKED_ON_CPU = True
"""Use cache-sized row blocks for element-wise math on the CPU (tests turn it off to run
the whole-item path that accelerators use)."""


def chunk_elements_for(memory_limit: int | None) -> int:
    """Row-chunk size of element-wise tensors: smaller under a tight memory limit. Depends
    only on the limit (not on threads), and never changes the bytes written."""
    if memory_limit is None:
        return CHUNK_ELEMENTS
    return max(64 * 1024, min(CHUNK_ELEMENTS, memory_limit // 256))


@dataclass(frozen=True)
class WorkItem:
    tensor: OutputTensor
    rows: tuple[int, int] | None  # None: the whole tensor

    @property
    def nbytes(self) -> int:
        """Bytes it stores in the output files."""
        return sum(length for _, length in self.tensor.byte_ranges(self.rows))


def work_items(plan: Plan, chunk_elements: int | None = None) -> Iterator[WorkItem]:
    """Split the plan into work items; chunk boundaries depend only on shapes and the
    number of inputs (and start at multiples of an encoded tensor's ``row_align``: whole
    blocks of rows)."""
    chunk_elements = chunk_elements or CHUNK_ELEMENTS
    for t in plan.tensors:
        numel = prod(t.shape)
        if t.stack:  # one slice of the stacking axis (one expert) at a time
            for start in range(t.shape[0]):
                yield WorkItem(t, (start, start + 1))
            continue
        whole = not (t.elementwise or t.expert_parts)
        per_input = chunk_elements * CHUNK_INPUTS // max(CHUNK_INPUTS, len(t.inputs))
        if whole or len(t.shape) == 0 or numel <= per_input:
            yield WorkItem(t, None)
            continue
        row = max(1, prod(t.shape[1:]))
        align = t.encoding.row_align if t.encoding is not None else 1
        step = max(1, per_input // row // align) * align
        for start in range(0, t.shape[0], step):
            yield WorkItem(t, (start, min(start + step, t.shape[0])))


def statistic_block_rows(how: TensorStatistic, shape: tuple[int, ...], n_inputs: int) -> int:
    """Rows per block of a statistic's streamed pass: the method's, fewer beyond
    ``CHUNK_INPUTS`` inputs (as row chunks: a block holds every input's rows), in the
    method's row multiples."""
    rows = how.rows(shape)
    if not rows:
        return rows
    fewer = rows * CHUNK_INPUTS // max(CHUNK_INPUTS, n_inputs)
    unit = how.row_multiple(shape) if how.row_multiple is not None else 1
    return max(unit, fewer // unit * unit)


def _read_bytes_per_element(info) -> int:
    """Memory a read takes per element: the stored dtype, or for a quantized weight its
    float32 dequantization and what it is decoded from (FP8: the weight and its expanded
    block scales; MXFP4: half a byte of codes and 1/32 of a scale byte)."""
    if info.quant is not None and info.format != "stage":
        return 8
    return info.dtype.itemsize


def item_memory(plan: Plan, item: WorkItem) -> int:
    """Bytes of tensor data a work item holds at its peak: its largest raw input, the
    inputs in the compute dtype, the method's temporaries and the output buffer (for an
    encoded tensor: in its value dtype, and the encoded bytes); with inputs computed by
    earlier stages of a multi-stage recipe, also the largest of their computations."""
    if plan.stages or any(m.stage is not None for m in plan.models):
        from .stages import stage_memory

        return _item_memory(plan, item) + stage_memory(plan, item)
    return _item_memory(plan, item)


def _item_memory(plan: Plan, item: WorkItem) -> int:
    t = item.tensor
    numel = prod(t.shape) if item.rows is None else \
        (item.rows[1] - item.rows[0]) * prod(t.shape[1:])
    if t.stack:  # whole inputs of the slices it holds, their concatenation, the result
        start, end = item.rows or (0, t.shape[0])
        group = t.inputs[start * t.stack:end * t.stack]
        raw_bytes = sum(_read_bytes_per_element(plan.input_info(i))
                        * plan.input_info(i).numel for i in group)
        width = torch.promote_types(plan.options.compute_dtype, t.dtype).itemsize
        return int(raw_bytes + 3 * width * numel + t.dtype.itemsize * numel)
    raw = [_read_bytes_per_element(plan.input_info(i)) * numel for i in t.inputs]
    if t.copied:
        return sum(raw) + t.dtype.itemsize * numel
    out = t.dtype.itemsize * numel + (item.nbytes if t.encoding is not None else 0)
    width = torch.promote_types(plan.options.compute_dtype, t.dtype).itemsize
    how = plan.bound(t).spec.scheduling
    if how.statistics and t.name in plan.statistics:
        out += _statistics_memory(t, numel, how.statistics)
    if how.lazy_inputs:  # the base, one expert and the method's working buffers
        return int(max(raw) + (2 + how.temp_buffers) * width * numel + out)
    if how.raw_inputs and not (t.elementwise and item.rows is not None):
        # inputs held as stored, one float32 task vector at a time, the result
        return int(sum(raw) + (1 + how.temp_buffers) * width * numel + out)
    return int(max(raw) + (len(t.inputs) + how.temp_buffers) * width * numel + out)


def _statistics_memory(t: OutputTensor, numel: int, kinds: frozenset[str]) -> int:
    """What a data-aware method holds besides the weights: the inputs' Grams as stored
    (float32 ``[in, in]``) and four float64 ones for the solve (a scaled Gram, their sum,
    its Cholesky factor, ``Σ WᵢG'ᵢ``-sized products); or the inputs' Fishers (float32, the
    chunk's size) and the weighted sums."""
    n = len(t.inputs)
    if "gram" in kinds and len(t.shape) == 2:
        cols = t.shape[1]
        return n * 4 * cols * cols + 4 * 8 * max(cols * cols, numel)
    return (n + 2) * 4 * numel


class _LazyInputs(Sequence):
    """Inputs of a ``lazy_inputs`` method: reading input ``k`` happens at ``xs[k]``."""

    def __init__(self, load: Callable[[int], torch.Tensor], n: int,
                 shape: tuple[int, ...], cache: bool = False) -> None:
        self.load, self.n, self.shape = load, n, shape
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self.load(i) for i in range(self.n)[k]]
        if not -self.n <= k < self.n:
            raise IndexError(k)
        if self._cache is None:
            return self.load(k % self.n)
        if k % self.n not in self._cache:  # read once, however often indexed
            self._cache[k % self.n] = self.load(k % self.n)
        return self._cache[k % self.n]


class _Job:
    """Computes one work item and writes it to the sink. Shared state is read-only except
    the reader and the sink."""

    def __init__(self, plan: Plan, indexes: list[CheckpointIndex], reader: TensorReader,
                 sink: OutputSink, devices: list[torch.device],
                 strict_finite: bool = False) -> None:
        self.plan, self.indexes, self.reader, self.sink = plan, indexes, reader, sink
        self.devices = devices
        self.compute_dtype = plan.options.compute_dtype
        self._local = threading.local()
        self._next_device = iter(range(1 << 62))
        self._device_lock = threading.Lock()
        self.bound = {t.name: plan.bound(t) for t in plan.tensors if not t.copied}
        self.strict_finite = strict_finite
        self.warnings: list[str] = []
        self._statistic_values: dict[str, Any] = {}
        self._statistic_locks: dict[str, threading.Lock] = {}
        self._statistic_rows_left: dict[str, int] = {}
        self._statistic_order: list[OutputTensor] | None = None
        self.trim_heap = HeapTrimmer()

    @property
    def device(self) -> torch.device:
        """This worker thread's device (threads are given the devices in turn)."""
        device = getattr(self._local, "device", None)
        if device is None:
            with self._device_lock:
                device = self.devices[next(self._next_device) % len(self.devices)]
            self._local.device = device
            if device.type == "cuda":  # its own stream: transfers overlap other threads' math
                self._local.stream = torch.cuda.Stream(device)
        return device

    def __call__(self, item: WorkItem) -> int:
        """Compute and write one work item; return the CRC-32 of the bytes written."""
        if self.device.type == "cuda":
            with torch.cuda.device(self.device), torch.cuda.stream(self._local.stream):
                crc = self._compute(item)
        else:
            crc = self._compute(item)
        self._written(item)
        self.trim_heap()
        return crc

    def _call(self, t: OutputTensor, xs: Sequence[torch.Tensor],
              generator: torch.Generator | None = None,
              rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The method on inputs ``xs`` (rows ``rows`` of the tensor; None: all of it)."""
        stats = self.plan.statistics.get(t.name)
        if stats is not None:  # data-aware methods: each input's statistics, these rows
            stats = [None if s is None else s.restrict(rows) for s in stats]
        return self.bound[t.name](xs, t.params, t.model_params, tensor_name=t.name,
                                  compute_dtype=self.compute_dtype, generator=generator,
                                  statistics=stats, statistic=self._statistic(t), rows=rows,
                                  tensor_shape=tuple(t.shape) if rows is not None else None)

    def _statistic(self, t: OutputTensor) -> Any:
        """A row-chunked tensor's whole-tensor statistic (``TensorStatistic``): computed
        once, by the first chunk that needs it, streaming the inputs in the method's row
        blocks (other chunks of the tensor wait for it); dropped when the tensor's last
        row is written."""
        how = self.bound[t.name].spec.scheduling.statistic
        if how is None or not t.elementwise:
            return None
        lock = self._statistic_lock(t.name)
        if not lock.acquire(blocking=False):  # another thread computes it: meanwhile,
            self._statistic_ahead(t)  # this one computes the next tensor's
            lock.acquire()
        try:
            self._ensure_statistic(t, how)
            return self._statistic_values[t.name]
        finally:
            lock.release()

    def _statistic_lock(self, name: str) -> threading.Lock:
        with self._device_lock:
            return self._statistic_locks.setdefault(name, threading.Lock())

    def _ensure_statistic(self, t: OutputTensor, how: TensorStatistic) -> None:
        """Compute ``t``'s statistic unless done (the caller holds its lock)."""
        if t.name not in self._statistic_values:
            self._statistic_values[t.name] = self._stream_statistic(t, how)
            self._statistic_rows_left[t.name] = t.shape[0]

    def _statistic_ahead(self, t: OutputTensor) -> None:
        """The statistic of the next tensor after ``t`` (in plan order) that needs one and
        that no thread is computing: statistics of methods that draw random numbers are
        serial, so two threads on one tensor would otherwise take turns."""
        if self._statistic_order is None:
            self._statistic_order = [u for u in self.plan.tensors if not u.copied
                                     and u.elementwise
                                     and self.bound[u.name].spec.scheduling.statistic]
        names = [u.name for u in self._statistic_order]
        if t.name not in names:
            return
        for u in self._statistic_order[names.index(t.name) + 1:][:4]:
            lock = self._statistic_lock(u.name)
            if u.name in self._statistic_values or not lock.acquire(blocking=False):
                continue
            try:
                self._ensure_statistic(u, self.bound[u.name].spec.scheduling.statistic)
            finally:
                lock.release()
            return

    def _stream_statistic(self, t: OutputTensor, how: TensorStatistic) -> Any:
        bound = self.bound[t.name]
        raw = bound.spec.scheduling.raw_inputs or how.raw_inputs
        header = dict(base_index=bound.base_index, params=t.params,
                      model_params=list(t.model_params), tensor_name=t.name,
                      generator=bound.generator(self.plan.seed, t.name, self.device),
                      compute_dtype=self.compute_dtype, tensor_shape=tuple(t.shape))
        step, state = statistic_block_rows(how, tuple(t.shape), len(t.inputs)), None
        while True:
            for start in range(0, t.shape[0], step):
                block = WorkItem(t, (start, min(start + step, t.shape[0])))
                xs = _LazyInputs(
                    lambda k, block=block: (self._round if raw else self._prepare)(
                        self._read(t.inputs[k], block)),
                    len(t.inputs), (block.rows[1] - start, *t.shape[1:]), cache=True)
                state = how.accumulate(state, MergeInputs(tensors=xs, rows=block.rows,
                                                          **header))
                del xs
                self.trim_heap()  # a long pass frees many blocks before its item ends
            result = how.finish(state, MergeInputs(tensors=[], **header))
            if not isinstance(result, AnotherPass):
                return result
            state = result.state

    def _written(self, item: WorkItem) -> None:
        """Rows of a tensor are written: its statistic goes once all of them are."""
        t = item.tensor
        if t.name not in self._statistic_values:
            return
        with self._device_lock:
            rows = t.shape[0] if item.rows is None else item.rows[1] - item.rows[0]
            left = self._statistic_rows_left.get(t.name, 0) - rows
            self._statistic_rows_left[t.name] = left
            if left <= 0:
                self._statistic_values.pop(t.name, None)
                self._statistic_rows_left.pop(t.name, None)

    def _compute(self, item: WorkItem) -> int:
        t = item.tensor
        if t.copied:
            raw = [self._read(i, item) for i in t.inputs]
            for other, inp in zip(raw[1:], t.inputs[1:]):
                if not torch.equal(raw[0], other):
                    name = self.plan.models[inp.model].ref
                    raise MergeError(f"non-floating tensor '{t.name}' differs between the "
                                     f"inputs (e.g. in '{name}'); such buffers cannot be "
                                     "averaged, so they must be equal")
            result = raw[0]
        else:
            bound = self.bound[t.name]
            how = bound.spec.scheduling
            if t.reindex:
                return self._reindexed(t, item)
            if t.stack:
                return self._stacked(t, item)
            if t.expert_parts:
                return self._per_expert(t, item)
            if (how.elementwise and t.elementwise and BLOCKED_ON_CPU
                    and self.device.type == "cpu" and not how.random and len(t.shape) > 0
                    and t.shape[0] > 1):  # (with a statistic: per-block overhead outweighs)
                return self._blocked(t, item)
            if how.lazy_inputs:  # read when the method asks, one at a time
                rows = t.shape if item.rows is None else (item.rows[1] - item.rows[0],
                                                          *t.shape[1:])
                xs: Sequence[torch.Tensor] = _LazyInputs(
                    lambda k: self._prepare(self._read(t.inputs[k], item)), len(t.inputs),
                    tuple(rows))
            elif how.raw_inputs:  # stored dtype; the method upcasts piece by piece
                xs = [self._round(self._read(i, item)) for i in t.inputs]
            else:
                xs = [self._prepare(self._read(i, item)) for i in t.inputs]  # one at a time
            generator = bound.generator(self.plan.seed, t.name, self.device, item.rows)
            result = self._call(t, xs, generator, item.rows)
            if result.device.type != "cpu":
                result = result.to("cpu")
        self._check_finite(t, item, result)
        return self.sink.write(t, item.rows, result)

    def _blocked(self, t: OutputTensor, item: WorkItem) -> int:
        """An element-wise item: inputs read in their own dtype, then upcast, merged and
        rounded to the output dtype one cache-sized row block at a time (an encoded tensor
        stays in its value dtype; the sink encodes it)."""
        raws = [self._read(i, item) for i in t.inputs]
        raw_inputs = self.bound[t.name].spec.scheduling.raw_inputs
        rows = raws[0].shape[0]
        step = max(1, BLOCK_ELEMENTS // max(1, prod(t.shape[1:])))
        out = torch.empty(raws[0].shape, dtype=t.dtype)
        finite = True
        for start in range(0, rows, step):
            end = min(start + step, rows)
            if raw_inputs:
                xs = [self._round(r[start:end]) for r in raws]  # the method upcasts
            else:
                xs = [self._prepare(r[start:end]) for r in raws]
            block = out[start:end]
            first = 0 if item.rows is None else item.rows[0]
            block.copy_(self._call(t, xs, rows=(first + start, first + end)))  # one rounding
            if finite and block.is_floating_point():  # NaN/Inf, also from the rounding
                finite = bool(torch.isfinite(block.sum()))
        if not finite:
            self._check_finite(t, item, out)
        return self.sink.write(t, item.rows, out)

    def _stacked(self, t: OutputTensor, item: WorkItem) -> int:
        """Slices of a stacked tensor, each from its own inputs read whole (one expert's
        tensors), so memory does not depend on how many slices there are."""
        bound = self.bound[t.name]
        start, end = item.rows or (0, t.shape[0])
        whole = WorkItem(t, None)
        raw = bound.spec.scheduling.raw_inputs
        out = torch.empty((end - start, *t.shape[1:]), dtype=t.dtype)
        for e in range(start, end):
            group = slice(e * t.stack, (e + 1) * t.stack)
            xs = [(self._round if raw else self._prepare)(self._read(i, whole))
                  for i in t.inputs[group]]
            generator = bound.generator(self.plan.seed, t.name, self.device, (e, e + 1))
            result = bound(xs, t.params, t.model_params[group], tensor_name=t.name,
                           compute_dtype=self.compute_dtype, generator=generator)
            out[e - start].copy_(result.reshape(t.shape[1:]))  # the one rounding
        self._check_finite(t, item, out)
        return self.sink.write(t, item.rows, out)

    def _per_expert(self, t: OutputTensor, item: WorkItem) -> int:
        """A whole-tensor method on fused experts ``[E, ...]``: each expert (its gate and up
        halves apart when stored so) is merged on its own, as the per-expert checkpoint of
        the same model stores it, so both layouts merge alike; chunks are whole experts."""
        bound = self.bound[t.name]
        raw_inputs = bound.spec.scheduling.raw_inputs
        raws = [self._read(i, item) for i in t.inputs]
        first = 0 if item.rows is None else item.rows[0]
        out = torch.empty(raws[0].shape, dtype=t.dtype)
        parts = t.expert_parts
        size = raws[0].shape[1] // parts if raws[0].dim() > 1 else 0
        for e in range(raws[0].shape[0]):
            for p in range(parts):
                piece = slice(p * size, (p + 1) * size) if parts > 1 else slice(None)
                if raw_inputs:
                    xs = [self._round(r[e][piece]) for r in raws]
                else:
                    xs = [self._prepare(r[e][piece]) for r in raws]
                k = (first + e) * parts + p  # its own random stream, whatever the chunks
                generator = bound.generator(self.plan.seed, t.name, self.device, (k, k + 1))
                out[e][piece].copy_(self._call(t, xs, generator))
        self._check_finite(t, item, out)
        return self.sink.write(t, item.rows, out)

    def _reindexed(self, t: OutputTensor, item: WorkItem) -> int:
        """A vocabulary tensor: raw inputs stay whole, output rows are gathered (one gather
        per model and chunk), merged and written chunk by chunk for element-wise methods."""
        vocab = self.plan.vocab
        assert vocab is not None and item.rows is None and t.encoding is None
        bound = self.bound[t.name]
        raws = [(i.model, self._read(i, item)) for i in t.inputs]
        defaults = vocab.defaults(raws, self._prepare)
        width = max(1, prod(t.shape[1:]))
        step = (max(1, CHUNK_ELEMENTS // width) if bound.spec.scheduling.elementwise
                else t.shape[0])
        pads = {m: vocab.padding_row(m, x, defaults, self._prepare, step)
                for m, x in raws} if vocab.size > vocab.vocab and not vocab.truncate else {}
        crc = 0
        for start in range(0, t.shape[0], step):
            end = min(start + step, t.shape[0])
            xs = [vocab.rows(m, x, defaults, start, end, self._prepare, pads.get(m))
                  for m, x in raws]
            result = self._call(t, xs, bound.generator(self.plan.seed, t.name, self.device))
            self._check_finite(t, item, result)
            crc = self.sink.write(t, (start, end) if step < t.shape[0] else None,
                                  result.cpu(), crc)
        return crc

    def _check_finite(self, t: OutputTensor, item: WorkItem, result: torch.Tensor) -> None:
        """NaN/Inf in an output (from the inputs, or overflow of the output dtype): a
        warning naming the inputs that have them, or an error with ``--strict-finite``."""
        if not result.is_floating_point() or bool(torch.isfinite(result.sum())):
            return  # NaN and ±Inf make the sum non-finite (an overflowing sum is checked below)
        if bool(torch.isfinite(result).all()):
            return
        culprits = [str(self.plan.models[i.model].ref) for i in t.inputs
                    if self.plan.input_info(i).dtype.is_floating_point
                    and not bool(torch.isfinite(self._read(i, item)).all())]
        where = (f"inputs {', '.join(culprits)} contain NaN or Inf" if culprits else
                 "the merged values overflow or are undefined")
        message = f"tensor '{t.name}': {where}, so the output has non-finite values"
        if self.strict_finite:
            raise MergeError(f"{message} (--strict-finite)")
        self.warnings.append(message)

    def _read(self, inp: InputTensor, item: WorkItem) -> torch.Tensor:
        lora = self.plan.models[inp.model].lora
        if lora is not None and lora.touches(inp.name):  # W + s·B·A, in float32
            x = self.reader.read(self.indexes[inp.model].tensors[inp.name], item.rows)
            return lora.apply(inp.name, x, item.rows)
        return self.reader.read(self.indexes[inp.model].tensors[inp.name], item.rows,
                                round_to=self.plan.read_dtype)

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        """Round to the recipe's ``dtype`` (mergekit reads inputs in it); to the device."""
        read_dtype = self.plan.read_dtype
        if read_dtype is not None and x.dtype != read_dtype:
            x = x.to(read_dtype)
        return x.to(device=self.device, non_blocking=self.device.type == "cuda")

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Rounded as by ``_round``, then upcast to the compute dtype."""
        x = self._round(x)
        return x.to(dtype=torch.promote_types(self.compute_dtype, x.dtype))


def execute(plan: Plan, out_dir: str, *, progress: Callable[[int, bool], None] | None = None,
            chunk_elements: int | None = None,
            finished: dict[tuple, int] | None = None,
            record: Callable[[WorkItem, int], None] | None = None,
            digests: dict[str, str] | None = None,
            executor: Executor | None = None) -> list[str]:
    """Write every planned tensor into ``out_dir`` (which must exist); return warnings.

    Threads, devices, the memory limit and ``--strict-finite`` come from ``plan.options``.
    ``digests``, if given, receives the sha256 of every shard (computed during the merge).
    ``progress(nbytes, tensor_finished)`` is called in the calling thread after each work
    item, ``record(item, crc)`` once its bytes are written. Items in ``finished`` (keys
    ``(name, rows)``, from an interrupted run) are skipped; their files are reopened.
    ``executor`` runs the items (default: worker threads under the memory budget).
    """
    options: Options = plan.options
    devices = resolve_devices(options.device)
    threads = max(1, options.threads or max(os.cpu_count() or 1, len(devices)))
    budget, writer_memory = merge_budgets(options.memory_limit)
    keep_freed_memory()
    indexes = [m.ensure_local() for m in plan.models]
    remote = getattr(executor, "remote", False)  # other processes write the files too
    sink = ShardWriter(out_dir, list(plan.shards), resume=finished is not None,
                       shared=remote, memory=writer_memory)  # checksums of the tasks' writes
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc_was_enabled = gc.isenabled()
    stage_source = None
    gc.disable()  # the loop makes no reference cycles; collections only cost time
    ok = False
    try:
        with TensorReader(pin_memory=any(d.type == "cuda" for d in devices)) as reader:
            if any(m.stage is not None for m in plan.models):  # computed by earlier stages
                from .stages import StageSource

                stage_source = reader.sources["stage"] = StageSource(
                    reader, devices, chunk_elements, options.strict_finite)
            job = _Job(plan, indexes, reader, sink, devices, options.strict_finite)
            items = list(work_items(plan, chunk_elements))
            chunks_left = Counter(item.tensor.name for item in items)

            def done(item: WorkItem, crc: int | None) -> None:
                if crc is not None and record:
                    record(item, crc)
                sink.finished(item.tensor, item.rows)
                chunks_left[item.tensor.name] -= 1
                if progress:
                    progress(item.nbytes, chunks_left[item.tensor.name] == 0)

            todo = []
            for item in items:
                if finished and (item.tensor.name, item.rows) in finished:
                    done(item, None)
                else:
                    todo.append(item)
            runner = executor or ThreadExecutor(threads, lambda i: item_memory(plan, i), budget)
            runner.run(job, todo, done)
        ok = True
    finally:
        torch.set_num_threads(old_threads)
        if gc_was_enabled:
            gc.enable()
        try:
            sink.close(sync=ok)
        except Exception:
            if ok:
                raise
    if digests is not None:
        digests.update(sink.digests)
    return (job.warnings + list(getattr(stage_source, "warnings", []))
            + list(getattr(executor, "warnings", [])))

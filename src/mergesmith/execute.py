"""Executing a plan: read → math → write for every output tensor, in parallel, bounded memory.

Work items are output tensors, and row chunks of them for element-wise methods, processed
in input-file order by a pool of worker threads (torch kernels release the GIL). Each
worker uses one intra-op thread: parallelism comes from independent work items, and the
bytes written never depend on the number of threads.
"""

from __future__ import annotations

import ctypes
import gc
import os
import functools
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from math import prod

import torch

from .checkpoint import CheckpointIndex, TensorReader
from .errors import MergeError
from .methods import MergeInputs, get_method
from .methods.apply import tensor_generator
from .plan import COPY, InputTensor, OutputTensor, Plan
from .writer import ShardWriter

MEMORY_BUDGET = 1_000_000_000
"""Tensor data in flight at once (bytes) without ``--memory-limit``; work items wait for
their share."""

MIN_DATA_BUDGET = 32 * 1024 * 1024
"""The least tensor data a memory limit must leave room for."""

CHUNK_ELEMENTS = 2 * 1024 * 1024
"""Rows of element-wise tensors are processed in chunks of about this many elements
(8 MB per input in float32), so memory stays flat however large a tensor is."""

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
        t = self.tensor
        if self.rows is None:
            return t.nbytes
        return (self.rows[1] - self.rows[0]) * prod(t.shape[1:]) * t.dtype.itemsize


def work_items(plan: Plan, chunk_elements: int | None = None) -> Iterator[WorkItem]:
    """Split the plan into work items; chunk boundaries depend only on shapes."""
    chunk_elements = chunk_elements or CHUNK_ELEMENTS
    for t in plan.tensors:
        numel = prod(t.shape)
        if not t.elementwise or len(t.shape) == 0 or numel <= chunk_elements:
            yield WorkItem(t, None)
            continue
        row = max(1, prod(t.shape[1:]))
        step = max(1, chunk_elements // row)
        for start in range(0, t.shape[0], step):
            yield WorkItem(t, (start, min(start + step, t.shape[0])))


def item_memory(plan: Plan, item: WorkItem) -> int:
    """Bytes of tensor data a work item holds at its peak: its largest raw input, the
    inputs in the compute dtype, the method's temporaries and the output buffer."""
    t = item.tensor
    numel = prod(t.shape) if item.rows is None else (item.rows[1] - item.rows[0]) * prod(t.shape[1:])
    raw = [plan.input_info(i).dtype.itemsize * numel for i in t.inputs]
    if t.method == COPY:
        return sum(raw) + t.dtype.itemsize * numel
    width = torch.promote_types(plan.options.compute_dtype, t.dtype).itemsize
    spec = get_method(t.method)
    if spec.lazy_inputs:  # the base, one expert and the method's working buffers
        return int(max(raw) + (2 + spec.temp_buffers) * width * numel + t.dtype.itemsize * numel)
    if spec.raw_inputs and not (t.elementwise and item.rows is not None):
        # inputs held as stored, one float32 task vector at a time, the result
        return int(sum(raw) + (1 + spec.temp_buffers) * width * numel
                   + t.dtype.itemsize * numel)
    return int(max(raw) + (len(t.inputs) + spec.temp_buffers) * width * numel
               + t.dtype.itemsize * numel)


def _keep_freed_memory() -> None:
    """Let glibc reuse freed chunk buffers instead of returning them to the OS.

    Work items allocate and free same-sized buffers thousands of times; by default glibc
    gives large freed blocks back and every new buffer then costs page faults and zeroing
    by the kernel (measured: half the run time of a task-arithmetic merge). Buffers up to
    32 MB now come from the heap and stay there; resident memory is still bounded by the
    data budget. No-op off glibc."""
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: the most glibc allows
        mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap


def _release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it per thread otherwise), so a
    big item that runs alone starts from a small resident set. No-op off glibc."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=None)
def _libc_function(name: str):
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def resident_bytes() -> int:
    """This process's resident memory now (Linux); 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def data_budget(memory_limit: int | None, resident: int | None = None) -> int:
    """Bytes of tensor data allowed in flight: without a limit ``MEMORY_BUDGET``; with one,
    what the limit leaves after the memory already in use (Python, torch, the plan) and a
    tenth for the allocator's slack."""
    if memory_limit is None:
        return MEMORY_BUDGET
    resident = resident_bytes() if resident is None else resident
    budget = int(memory_limit * 0.9) - resident
    if budget < MIN_DATA_BUDGET:
        from .units import format_bytes

        raise MergeError(f"--memory-limit {format_bytes(memory_limit)} leaves no room for "
                         f"tensor data: this process already uses {format_bytes(resident)} "
                         f"(Python, torch and the plan); use at least "
                         f"{format_bytes(int((resident + MIN_DATA_BUDGET) / 0.9) + 1)}")
    return budget


class _Budget:
    """Bytes of tensor data in flight, granted in submission order (no starvation).

    An item larger than the whole budget runs alone."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used, self.turn = limit, 0, 0
        self.cv = threading.Condition()

    def acquire(self, ticket: int, nbytes: int) -> int:
        nbytes = min(nbytes, self.limit)
        with self.cv:
            self.cv.wait_for(lambda: self.turn == ticket and self.used + nbytes <= self.limit)
            self.used += nbytes
            self.turn += 1
            self.cv.notify_all()
        return nbytes

    def release(self, nbytes: int) -> None:
        with self.cv:
            self.used -= nbytes
            self.cv.notify_all()


def resolve_devices(spec: str) -> list[torch.device]:
    """A comma list of devices (``cuda:0,cuda:1``; a bare number means that GPU): work
    items are spread over them, one device per worker thread."""
    names = [n.strip() for n in str(spec).split(",") if n.strip()] or ["cpu"]
    return [resolve_device(f"cuda:{n}" if n.isdigit() else n) for n in names]


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (a GPU when there is one)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MergeError(f"--device: unknown device '{name}' (use cpu, cuda, cuda:N, mps or "
                         "auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda: no CUDA GPU is available to this torch build; use "
                         "--device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MergeError(f"--device {name}: there are only {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None)
                                     and torch.backends.mps.is_available()):
        raise MergeError("--device mps: Apple GPU support is not available here")
    return device


class _LazyInputs(Sequence):
    """Inputs of a ``lazy_inputs`` method: reading input ``k`` happens at ``xs[k]``."""

    def __init__(self, load: Callable[[int], torch.Tensor], n: int,
                 shape: tuple[int, ...]) -> None:
        self.load, self.n, self.shape = load, n, shape

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self.load(i) for i in range(self.n)[k]]
        if not -self.n <= k < self.n:
            raise IndexError(k)
        return self.load(k % self.n)


class _Job:
    """Computes one work item. Shared state is read-only except the reader and writer."""

    def __init__(self, plan: Plan, indexes: list[CheckpointIndex], reader: TensorReader,
                 writer: ShardWriter, devices: list[torch.device],
                 strict_finite: bool = False) -> None:
        self.plan, self.indexes, self.reader, self.writer = plan, indexes, reader, writer
        self.devices = devices
        self._local = threading.local()
        self._next_device = iter(range(1 << 62))
        self._device_lock = threading.Lock()
        self.fn = {t.method: get_method(t.method).fn for t in plan.tensors if t.method != COPY}
        self.raw = {t.method for t in plan.tensors
                    if t.method != COPY and get_method(t.method).raw_inputs}
        self.lazy = {t.method for t in plan.tensors
                     if t.method != COPY and get_method(t.method).lazy_inputs}
        self.strict_finite = strict_finite
        self.warnings: list[str] = []

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
                return self._compute(item)
        return self._compute(item)

    def _compute(self, item: WorkItem) -> int:
        t = item.tensor
        if t.method == COPY:
            raw = [self._read(i, item) for i in t.inputs]
            for other, inp in zip(raw[1:], t.inputs[1:]):
                if not torch.equal(raw[0], other):
                    name = self.plan.models[inp.model].ref
                    raise MergeError(f"non-floating tensor '{t.name}' differs between the "
                                     f"inputs (e.g. in '{name}'); such buffers cannot be "
                                     "averaged, so they must be equal")
            result = raw[0]
        else:
            if t.reindex:
                return self._reindexed(t, item)
            if (t.elementwise and BLOCKED_ON_CPU and self.device.type == "cpu"
                    and not self.plan.method.random
                    and len(t.shape) > 0 and t.shape[0] > 1
                    and prod(t.shape) // max(1, prod(t.shape[1:])) > 0):
                return self._blocked(t, item)
            if t.method in self.lazy:  # read when the method asks, one at a time
                rows = t.shape if item.rows is None else (item.rows[1] - item.rows[0],
                                                          *t.shape[1:])
                xs = _LazyInputs(lambda k: self._prepare(self._read(t.inputs[k], item)),
                                 len(t.inputs), tuple(rows))
            elif t.method in self.raw:  # stored dtype; the method upcasts piece by piece
                xs = [self._round(self._read(i, item)) for i in t.inputs]
            else:
                xs = [self._prepare(self._read(i, item)) for i in t.inputs]  # one at a time
            generator = None
            if self.plan.method.random:
                generator = tensor_generator(self.plan.seed, t.name, self.device, item.rows)
            inputs = MergeInputs(xs, t.base_index, t.params, list(t.model_params), t.name,
                                 generator, self.plan.options.compute_dtype)
            result = self.fn[t.method](inputs)
            if result.device.type != "cpu":
                result = result.to("cpu")
        self._check_finite(t, item, result)
        return self.writer.write(t, item.rows, result)

    def _blocked(self, t: OutputTensor, item: WorkItem) -> int:
        """An element-wise item: inputs read in their own dtype, then upcast, merged and
        rounded to the output dtype one cache-sized row block at a time."""
        raws = [self._read(i, item) for i in t.inputs]
        rows = raws[0].shape[0]
        step = max(1, BLOCK_ELEMENTS // max(1, prod(t.shape[1:])))
        out = torch.empty(raws[0].shape, dtype=t.dtype)
        finite = True
        for start in range(0, rows, step):
            end = min(start + step, rows)
            if t.method in self.raw:
                xs = [self._round(r[start:end]) for r in raws]  # the method upcasts
            else:
                xs = [self._prepare(r[start:end]) for r in raws]
            result = self.fn[t.method](MergeInputs(xs, t.base_index, t.params,
                                                   list(t.model_params), t.name, None))
            block = out[start:end]
            block.copy_(result)  # the one rounding
            if finite and block.is_floating_point():  # NaN/Inf, also from the rounding
                finite = bool(torch.isfinite(block.sum()))
        if not finite:
            self._check_finite(t, item, out)
        return self.writer.write(t, item.rows, out)

    def _reindexed(self, t: OutputTensor, item: WorkItem) -> int:
        """A vocabulary tensor: raw inputs stay whole, output rows are gathered (one gather
        per model and chunk), merged and written chunk by chunk for element-wise methods."""
        vocab = self.plan.vocab
        assert vocab is not None and item.rows is None
        raws = [(i.model, self._read(i, item)) for i in t.inputs]
        defaults = vocab.defaults(raws, self._prepare)
        width = max(1, prod(t.shape[1:]))
        step = max(1, CHUNK_ELEMENTS // width) if get_method(t.method).elementwise else t.shape[0]
        pads = {m: vocab.padding_row(m, x, defaults, self._prepare, step)
                for m, x in raws} if vocab.size > vocab.vocab and not vocab.truncate else {}
        crc = 0
        for start in range(0, t.shape[0], step):
            end = min(start + step, t.shape[0])
            xs = [vocab.rows(m, x, defaults, start, end, self._prepare, pads.get(m))
                  for m, x in raws]
            generator = (tensor_generator(self.plan.seed, t.name, self.device)
                         if self.plan.method.random else None)
            result = self.fn[t.method](MergeInputs(xs, t.base_index, t.params,
                                                   list(t.model_params), t.name, generator))
            self._check_finite(t, item, result)
            crc = self.writer.write(t, (start, end) if step < t.shape[0] else None,
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
        x = self.reader.read(self.indexes[inp.model].tensors[inp.name], item.rows)
        lora = self.plan.models[inp.model].lora
        if lora is not None and lora.touches(inp.name):  # W + s·B·A, in float32
            x = lora.apply(inp.name, x, item.rows)
        return x

    def _round(self, x: torch.Tensor) -> torch.Tensor:
        """Round to the recipe's ``dtype`` (mergekit reads inputs in it); to the device."""
        read_dtype = self.plan.read_dtype
        if read_dtype is not None and x.dtype != read_dtype:
            x = x.to(read_dtype)
        return x.to(device=self.device, non_blocking=self.device.type == "cuda")

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Rounded as by ``_round``, then upcast to the compute dtype."""
        x = self._round(x)
        compute = torch.promote_types(self.plan.options.compute_dtype, x.dtype)
        return x.to(dtype=compute)


def execute(plan: Plan, out_dir: str, *, threads: int | None = None, device: str = "cpu",
            progress: Callable[[int, bool], None] | None = None,
            chunk_elements: int | None = None, strict_finite: bool = False,
            memory_limit: int | None = None,
            finished: dict[tuple, int] | None = None,
            record: Callable[[WorkItem, int], None] | None = None,
            digests: dict[str, str] | None = None) -> list[str]:
    """Write every planned tensor into ``out_dir`` (which must exist); return warnings.

    ``digests``, if given, receives the sha256 of every shard (computed during the merge).

    ``progress(nbytes, tensor_finished)`` is called in the calling thread after each work
    item, ``record(item, crc)`` once its bytes are written. ``memory_limit`` (bytes) bounds
    the whole process: tensor data in flight is kept under what it leaves (an item larger
    than that runs alone). Items in ``finished`` (keys
    ``(name, rows)``, from an interrupted run) are skipped; their files are reopened.
    """
    devices = resolve_devices(device)
    threads = max(1, threads or max(os.cpu_count() or 1, len(devices)))
    budget = data_budget(memory_limit)
    _keep_freed_memory()
    indexes = [m.ensure_local() for m in plan.models]
    writer = ShardWriter(out_dir, plan.shards, resume=finished is not None)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the loop makes no reference cycles; collections only cost time
    ok = False
    try:
        with TensorReader(pin_memory=any(d.type == "cuda" for d in devices)) as reader:
            job = _Job(plan, indexes, reader, writer, devices, strict_finite)
            items = list(work_items(plan, chunk_elements))
            chunks_left = Counter(item.tensor.name for item in items)

            def done(item: WorkItem, crc: int | None) -> None:
                if crc is not None and record:
                    record(item, crc)
                writer.finished(item.tensor, item.rows)
                chunks_left[item.tensor.name] -= 1
                if progress:
                    progress(item.nbytes, chunks_left[item.tensor.name] == 0)

            todo = []
            for item in items:
                if finished and (item.tensor.name, item.rows) in finished:
                    done(item, None)
                else:
                    todo.append(item)
            _run_pool(job, todo, threads, done, budget)
        ok = True
    finally:
        torch.set_num_threads(old_threads)
        if gc_was_enabled:
            gc.enable()
        try:
            writer.close(sync=ok)
        except Exception:
            if ok:
                raise
    if digests is not None:
        digests.update(writer.digests)
    return job.warnings


def _run_pool(job: _Job, items: list[WorkItem], threads: int,
              done: Callable[[WorkItem, int], None], data_bytes: int = MEMORY_BUDGET) -> None:
    """Run items with at most ``threads`` and ``data_bytes`` of tensor data in flight;
    stop at the first error."""
    if threads == 1:
        for item in items:
            if item_memory(job.plan, item) >= data_bytes:
                _release_free_memory()
            done(item, job(item))
        return
    stop = threading.Event()
    budget = _Budget(data_bytes)

    def init() -> None:
        torch.set_num_threads(1)

    def guarded(ticket: int, item: WorkItem) -> tuple[WorkItem, int | None]:
        need = item_memory(job.plan, item)
        granted = budget.acquire(ticket, need)
        if need >= data_bytes:  # runs alone: start it from a trimmed heap
            _release_free_memory()
        try:
            return item, (None if stop.is_set() else job(item))
        finally:
            budget.release(granted)

    with ThreadPoolExecutor(threads, thread_name_prefix="mergesmith", initializer=init) as pool:
        pending: deque[Future[tuple[WorkItem, int | None]]] = deque()
        try:
            for ticket, item in enumerate(items):
                pending.append(pool.submit(guarded, ticket, item))
                if len(pending) >= 2 * threads:
                    _drain(pending, done)
            while pending:
                _drain(pending, done)
        except BaseException:
            stop.set()
            for f in pending:
                f.cancel()
            raise


def _drain(pending: deque[Future[tuple[WorkItem, int | None]]],
           done: Callable[[WorkItem, int], None]) -> None:
    """Wait for at least one item; report finished ones in submission order."""
    finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
    for f in [f for f in pending if f in finished]:
        pending.remove(f)
        item, crc = f.result()  # re-raises a worker's exception
        if crc is not None:
            done(item, crc)

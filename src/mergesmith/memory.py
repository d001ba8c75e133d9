"""Memory of a merge: how much tensor data may be in flight, what the process already uses,
and the allocator settings that keep repeated same-sized buffers cheap."""

from __future__ import annotations

import ctypes
import functools
import os
import threading

from .errors import MergeError

MEMORY_BUDGET = 1_000_000_000
"""Tensor data in flight at once (bytes) without ``--memory-limit``; work items wait for
their share."""

MIN_DATA_BUDGET = 32 * 1024 * 1024
"""The least tensor data a memory limit must leave room for."""


OUTPUT_MEMORY = 96 * 1024 * 1024
"""What the output writer may hold besides the work items' data: its aligned staging
buffers for direct writes (a third) and written pieces waiting for the shard checksum."""


def output_memory(limited_budget: int | None) -> int:
    """The writer's share: :data:`OUTPUT_MEMORY`; under ``--memory-limit`` (the data budget
    that limit leaves) at most an eighth of that budget, taken from it."""
    if limited_budget is None:
        return OUTPUT_MEMORY
    return min(OUTPUT_MEMORY, limited_budget // 8)


def merge_budgets(memory_limit: int | None, resident: int | None = None) -> tuple[int, int]:
    """(tensor data allowed in flight, the output writer's memory): :func:`data_budget`,
    less the writer's share when a limit is given (:func:`output_memory`)."""
    budget = data_budget(memory_limit, resident)
    if memory_limit is None:
        return budget, output_memory(None)
    writer = output_memory(budget)
    return budget - writer, writer


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


class Budget:
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


def keep_freed_memory() -> None:
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


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it per thread otherwise), so a
    big item that runs alone starts from a small resident set. No-op off glibc."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


class HeapTrimmer:
    """Gives freed heap memory back once resident memory has grown by ``slack`` bytes since
    the last time.

    With :func:`keep_freed_memory`, worker threads that allocate buffers of many sizes
    (row chunks, statistic blocks, whole small tensors) leave free chunks between live ones
    in their heaps; glibc never returns those by itself, so the resident set crept up over
    a run (SLERP, 2 GB: 0.8 GB for 20 MB of live tensors). Reading the resident size costs
    microseconds, and a trim happens only after ``slack`` bytes of growth, so buffers of
    steady size are still reused. No-op off glibc."""

    def __init__(self, slack: int = 96 * 1024 * 1024) -> None:
        self.slack = slack
        self._trim = _libc_function("malloc_trim")
        self._lock = threading.Lock()
        self._floor = resident_bytes()

    def __call__(self) -> None:
        if self._trim is None or resident_bytes() <= self._floor + self.slack:
            return
        if not self._lock.acquire(blocking=False):
            return  # another thread is trimming
        try:
            self._trim(0)
            self._floor = resident_bytes()
        finally:
            self._lock.release()


@functools.lru_cache(maxsize=None)
def _libc_function(name: str):
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None

"""Executors: who runs the work items of a plan. The engine hands an executor the items
(in input-file order), a function that computes and writes one item, and a callback for
finished items; the bytes written never depend on the executor.

Today: :class:`ThreadExecutor` (worker threads in this process, a memory budget shared by
the items in flight). A distributed executor (Ray) implements the same ``run``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Protocol, TypeVar

from ._torch import torch
from .memory import MEMORY_BUDGET, Budget, release_free_memory

Item = TypeVar("Item")
Compute = Callable[[Item], int]
"""Compute one item and write its bytes; return their CRC-32."""
Done = Callable[[Item, int], None]
"""Called in the driver thread for each finished item, in submission order."""


class Executor(Protocol):
    def run(self, compute: Compute, items: Sequence[Item], done: Done) -> None:
        """Run every item; stop at the first error and re-raise it."""


class ThreadExecutor:
    """At most ``threads`` items at once and ``data_bytes`` of tensor data in flight
    (``item_memory(item)`` each; an item larger than the budget runs alone)."""

    def __init__(self, threads: int, item_memory: Callable[[Item], int],
                 data_bytes: int = MEMORY_BUDGET) -> None:
        self.threads, self.item_memory, self.data_bytes = threads, item_memory, data_bytes

    def run(self, compute: Compute, items: Sequence[Item], done: Done) -> None:
        if self.threads == 1:
            for item in items:
                if self.item_memory(item) >= self.data_bytes:
                    release_free_memory()
                done(item, compute(item))
            return
        stop = threading.Event()
        budget = Budget(self.data_bytes)

        def guarded(ticket: int, item: Item) -> tuple[Item, int | None]:
            need = self.item_memory(item)
            granted = budget.acquire(ticket, need)
            if need >= self.data_bytes:  # runs alone: start it from a trimmed heap
                release_free_memory()
            try:
                return item, (None if stop.is_set() else compute(item))
            finally:
                budget.release(granted)

        with ThreadPoolExecutor(self.threads, thread_name_prefix="mergesmith",
                                initializer=lambda: torch.set_num_threads(1)) as pool:
            pending: deque[Future[tuple[Item, int | None]]] = deque()
            try:
                for ticket, item in enumerate(items):
                    pending.append(pool.submit(guarded, ticket, item))
                    if len(pending) >= 2 * self.threads:
                        _drain(pending, done)
                while pending:
                    _drain(pending, done)
            except BaseException:
                stop.set()
                for f in pending:
                    f.cancel()
                raise


def _drain(pending: deque, done: Done) -> None:
    """Wait for at least one item; report finished ones in submission order."""
    finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
    for f in [f for f in pending if f in finished]:
        pending.remove(f)
        item, crc = f.result()  # re-raises a worker's exception
        if crc is not None:
            done(item, crc)

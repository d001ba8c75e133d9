"""Wall time of a merge spread over N nodes, from a plan's per-shard costs (pure arithmetic;
``mergesmith check --nodes N`` prints it).

The unit of distribution is an output shard: one task writes one file, reading the inputs
of its tensors. A task takes

    (its input bytes + its output bytes) / node bandwidth + its compute + TASK_OVERHEAD_SECONDS

where its compute is its tensors' share of the single-machine estimate (each node runs as
many threads as this machine), and the bandwidth is what one node reads and writes per
second from the shared storage (disk or network, whichever is slower; reads and writes
are counted one after the other). Tasks are given to nodes longest first, each to the
least-loaded node; the wall time is the start-up plus the busiest node's load. A cluster
of N nodes may leave nodes idle, so the estimate never grows with N, and it is never
below the start-up plus the largest task: a shard is not split.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

NODE_BANDWIDTH = 1e9
"""Bytes per second one node reads and writes (about a 10 Gbit/s link or one SATA SSD;
``--node-bandwidth`` changes it)."""

TASK_OVERHEAD_SECONDS = 2.0
"""Per task: scheduling it, opening its input files and reading their headers, and
publishing its output file."""


@dataclass(frozen=True)
class ShardCost:
    """One output shard as a task: the bytes it reads and writes, and its compute."""

    name: str
    read_bytes: int
    write_bytes: int
    compute_seconds: float

    def seconds(self, bandwidth: float, overhead: float) -> float:
        return (self.read_bytes + self.write_bytes) / bandwidth + self.compute_seconds \
            + overhead


@dataclass(frozen=True)
class NodeEstimate:
    """The estimate for ``nodes`` nodes; the figures of its busiest node."""

    nodes: int
    seconds: float  # wall time, start-up included
    used_nodes: int  # nodes given at least one task (fewer when that is faster)
    tasks: int
    read_bytes: int
    write_bytes: int
    compute_seconds: float
    io_seconds: float


def cluster_seconds(shards: Sequence[ShardCost], nodes: int, *,
                    bandwidth: float = NODE_BANDWIDTH,
                    overhead: float = TASK_OVERHEAD_SECONDS,
                    startup: float = 0.0) -> NodeEstimate:
    """Estimated wall time of ``shards`` on ``nodes`` nodes (see the module's text)."""
    if nodes < 1:
        raise ValueError("nodes must be at least 1")
    if bandwidth <= 0:
        raise ValueError("bandwidth must be positive")
    order = sorted(shards, key=lambda s: -s.seconds(bandwidth, overhead))
    best: tuple[float, list[ShardCost]] | None = None
    used = 1
    for n in range(1, min(nodes, max(1, len(order))) + 1):
        busiest = _longest_first(order, n, bandwidth, overhead)
        if best is None or busiest[0] < best[0]:
            best, used = busiest, n
    assert best is not None
    load, tasks = best
    read = sum(s.read_bytes for s in tasks)
    write = sum(s.write_bytes for s in tasks)
    return NodeEstimate(nodes, startup + load, used, len(tasks), read, write,
                        sum(s.compute_seconds for s in tasks), (read + write) / bandwidth)


def _longest_first(order: Sequence[ShardCost], n: int, bandwidth: float,
                   overhead: float) -> tuple[float, list[ShardCost]]:
    """Tasks (longest first) each to the least-loaded of ``n`` nodes: the busiest node's
    load and tasks."""
    heap: list[tuple[float, int]] = [(0.0, k) for k in range(n)]
    given: list[list[ShardCost]] = [[] for _ in range(n)]
    for s in order:
        load, k = heapq.heappop(heap)
        given[k].append(s)
        heapq.heappush(heap, (load + s.seconds(bandwidth, overhead), k))
    load, k = max(heap)
    return load, given[k]


def node_counts(nodes: int) -> list[int]:
    """The rows of the table for ``--nodes N``: 1, 2, 4, ... up to N, and N."""
    counts = [1]
    while counts[-1] * 2 <= nodes:
        counts.append(counts[-1] * 2)
    return counts + ([nodes] if counts[-1] != nodes else [])

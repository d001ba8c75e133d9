"""Running a plan's work items on a Ray cluster (``--ray``), with the bytes of a local run.

The driver plans, creates the shard files in ``OUT.partial`` (sized, headers in place) and
records progress; it does no tensor work. Work items are grouped into tasks (consecutive
items of one output file, up to ``TASK_BYTES``); each task opens its own reader and the
shard files by path, writes its items with ``pwrite`` at their planned offsets and returns
their CRC-32s. A retried task (a lost node, a crashed worker) writes the same bytes at the
same offsets again, so the result never depends on where or how often a task ran.

Every node must see the input files and ``OUT.partial`` at the same paths (shared
storage): checked up front by a tiny task on each node.
"""

from __future__ import annotations

import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .errors import MergeError

TASK_BYTES = 256 << 20
"""Work items are grouped into tasks of at most this many output bytes (one file each)..."""

TASKS_PER_CPU = 4
"""... and of at most 1/(4 · the cluster's CPUs) of the output, so that every node gets
several tasks and the last ones finish close together (methods differ in cost per byte)."""

MAX_RETRIES = 4
"""Ray re-runs a task lost with its node or worker this many times."""

HIDE_PATHS_ENV = "MERGESMITH_NODE_HIDES"
"""Paths containing this text count as missing on a node whose processes have it set: the
tests simulate a node without the shared storage this way."""


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MergeError("--ray needs the ray package: pip install 'mergesmith[ray]'") \
            from None
    return ray


_warming: list[Any] = []
"""Warm-up tasks started by :func:`connect`, one per node; :func:`check_nodes` waits for
them."""


def connect(address: str) -> bool:
    """Connect to (or, for ``local``, start) a Ray runtime unless one is connected; return
    whether this call did (so the caller disconnects).

    Each node then starts a worker that imports torch and the engine, while this process
    goes on planning (the imports cost a second or two per worker, and the tasks reuse the
    warm workers)."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    import logging

    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}  # one-line errors
    try:
        if address == "local":
            ray.init(include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = "RAY_ADDRESS" if address == "auto" else address
        raise MergeError(f"cannot connect to the Ray cluster at {where}: {e}") from None
    _warming[:] = _on_every_node(_warm_up, list(cluster_nodes()))
    return True


@contextmanager
def session(address: str | None) -> Iterator[None]:
    """Connected to the cluster at ``address`` (``None``: no Ray) for the block; disconnect
    at its end if this block connected."""
    connected = address is not None and connect(address)
    try:
        yield
    finally:
        if connected:
            _warming.clear()
            _import_ray().shutdown()


def _warm_up() -> None:
    import torch  # noqa: F401

    from . import checkpoint, execute, writer  # noqa: F401


def _on_every_node(fn: Callable[..., Any], nodes: list[dict], *args: Any) -> list[Any]:
    """One zero-CPU task of ``fn(*args)`` pinned to each node; their refs."""
    ray = _import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_retries=0)(fn)
    return [remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["id"], soft=False)).remote(*args) for n in nodes]


def cluster_nodes() -> list[dict]:
    """Alive nodes that can run tasks: id, address, CPUs, GPUs, memory."""
    ray = _import_ray()
    return [{"id": n["NodeID"], "address": n.get("NodeManagerAddress", "?"),
             "cpus": int(n["Resources"].get("CPU", 0)),
             "gpus": int(n["Resources"].get("GPU", 0)),
             "memory": int(n["Resources"].get("memory", 0))}
            for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]


def _missing(paths: Sequence[str], writable: Sequence[str]) -> list[str]:
    """Paths this node cannot see (or, for ``writable``, cannot write)."""
    hide = os.environ.get(HIDE_PATHS_ENV)
    out = []
    for p in paths:
        if (hide and hide in p) or not os.path.exists(p):
            out.append(p)
    for p in writable:
        if (hide and hide in p) or not os.access(p, os.W_OK):
            out.append(p)
    return out


def check_nodes(paths: Sequence[str], folder: str) -> None:
    """MergeError naming the first node that cannot see an input file or the output folder."""
    ray = _import_ray()
    if _warming:  # the probes then run in the warm workers rather than start new ones
        ray.wait(_warming, num_returns=len(_warming))
        _warming.clear()
    nodes = cluster_nodes()
    refs = _on_every_node(_missing, nodes, list(paths), [folder])
    for node, ref in zip(nodes, refs):
        name = f"node {node['address']} (Ray node {node['id'][:12]})"
        try:
            missing = ray.get(ref)
        except ray.exceptions.RayError as e:  # e.g. mergesmith not installed there
            cause = getattr(e, "cause", None) or e
            raise MergeError(f"{name} cannot run mergesmith's tasks: "
                             f"{type(cause).__name__}: {str(cause).splitlines()[-1]}; install "
                             "the same mergesmith on every node") from None
        if missing:
            raise MergeError(
                f"{name} cannot see {missing[0]}"
                f"{f' and {len(missing) - 1} more path(s)' if len(missing) > 1 else ''}; "
                "with --ray the inputs and OUT must be on storage every node shares, at the "
                "same paths")


def _run_task(plan: Any, indexes: list, folder: str, keys: list[tuple[int, Any]],
              shard_names: list[str]) -> dict:
    """One task: compute and write its items; return their CRCs, warnings, node, time."""
    import torch

    from .checkpoint import TensorReader
    from .devices import resolve_devices
    from .execute import WorkItem, _Job
    from .writer import ShardWriter

    start = time.monotonic()
    torch.set_num_threads(1)
    devices = resolve_devices(plan.options.device)[:1]  # Ray hands the task its GPU
    shards = [s for s in plan.shards if s.filename in shard_names]
    sink = ShardWriter(folder, shards, resume=True, digest=False)
    ok = False
    try:
        with TensorReader(pin_memory=devices[0].type == "cuda") as reader:
            job = _Job(plan, indexes, reader, sink, devices, plan.options.strict_finite)
            crcs = [job(WorkItem(plan.tensors[i], rows)) for i, rows in keys]
        ok = True
    finally:
        sink.close(sync=ok)  # durable before the driver records the items
    import ray

    return {"crcs": crcs, "warnings": job.warnings, "seconds": time.monotonic() - start,
            "node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname()}


@dataclass
class _NodeTally:
    tasks: int = 0
    nbytes: int = 0
    seconds: float = 0.0


@dataclass
class RayExecutor:
    """Runs work items as Ray tasks; ``run`` has the contract of the local executors (the
    ``compute`` it is given is the driver's and is not used: tasks build their own)."""

    plan: Any
    folder: str
    item_memory: Callable[[Any], int]
    task_bytes: int = TASK_BYTES
    on_task: Callable[[int, int, int], None] | None = None
    """Called after each task with (tasks done, tasks in all, nodes busy)."""
    remote = True  # the driver's sink only creates the files; tasks write them
    warnings: list[str] = field(default_factory=list)
    nodes: dict[str, _NodeTally] = field(default_factory=lambda: defaultdict(_NodeTally))

    def groups(self, items: Sequence[Any], cpus: int = 1) -> list[list[Any]]:
        """Consecutive items of one output file, up to ``task_bytes`` of output each and a
        ``TASKS_PER_CPU``-th of the output per CPU of the cluster."""
        total = sum(item.nbytes for item in items)
        limit = max(1, min(self.task_bytes, total // (TASKS_PER_CPU * max(1, cpus))))
        groups: list[list[Any]] = []
        size = 0
        for item in items:
            if (not groups or groups[-1][0].tensor.file != item.tensor.file
                    or size + item.nbytes > limit):
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += item.nbytes
        return groups

    def run(self, compute: Any, items: Sequence[Any], done: Callable[[Any, int], None]) -> None:
        ray = _import_ray()
        from ray.exceptions import RayTaskError

        plan = self.plan
        indexes = [m.ensure_local() for m in plan.models]  # already local: no work
        check_nodes(_input_paths(plan, indexes), self.folder)
        nodes = cluster_nodes()
        largest = max((n["memory"] for n in nodes), default=0)
        gpu = plan.options.device.startswith("cuda")
        task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(_run_task)
        plan_ref, index_ref = ray.put(plan), ray.put(indexes)
        position = {t.name: i for i, t in enumerate(plan.tensors)}
        groups = self.groups(items, int(ray.cluster_resources().get("CPU", 1)))
        refs = []
        for group in groups:
            # items of a task run one after another: its peak is its largest item
            need = max(self.item_memory(i) for i in group)
            resources: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1 if gpu else 0}
            if largest:
                resources["memory"] = min(need, largest)  # larger: runs alone on the largest
            keys = [(position[i.tensor.name], i.rows) for i in group]
            refs.append(task.options(**resources).remote(
                plan_ref, index_ref, self.folder, keys, [group[0].tensor.file]))
        outstanding = set(refs)
        results: dict[Any, dict] = {}
        reported = 0
        try:
            while reported < len(refs):
                ready, _ = ray.wait(list(outstanding), num_returns=1, timeout=1.0)
                for ref in ready:
                    outstanding.discard(ref)
                    try:
                        results[ref] = ray.get(ref)
                    except RayTaskError as e:
                        cause = getattr(e, "cause", None)
                        raise (cause if isinstance(cause, BaseException) else e) from None
                while reported < len(refs) and refs[reported] in results:  # in order
                    out = results.pop(refs[reported])
                    group = groups[reported]
                    tally = self.nodes[out["node"]]
                    tally.tasks += 1
                    tally.nbytes += sum(i.nbytes for i in group)
                    tally.seconds += out["seconds"]
                    self.warnings += out["warnings"]
                    for item, crc in zip(group, out["crcs"]):
                        done(item, crc)
                    reported += 1
                    if self.on_task:
                        self.on_task(reported, len(refs), min(len(nodes), len(outstanding)))
        except BaseException:
            # Ctrl-C or an error: stop the tasks not finished yet; OUT.partial stays. Not
            # finished ones only, and not force=True: cancelling a task whose completion is
            # arriving can crash Ray's driver-side task manager (seen in tests).
            unreported = refs[reported:]
            _, running = (ray.wait(unreported, num_returns=len(unreported), timeout=0)
                          if unreported else ([], []))
            for ref in running:
                try:
                    ray.cancel(ref, force=False)
                except Exception:  # noqa: BLE001 - already finished or gone
                    pass
            raise

    def summary(self) -> list[str]:
        """One line per node: tasks, bytes written, seconds of task time."""
        from .units import format_bytes

        names = {n["id"]: n["address"] for n in cluster_nodes()}
        return [f"node {names.get(node, 'lost')} ({node[:8]}): {t.tasks} task(s), "
                f"{format_bytes(t.nbytes)}, {t.seconds:.1f} s of work"
                for node, t in sorted(self.nodes.items(),
                                      key=lambda kv: (names.get(kv[0], ""), kv[0]))]


def _input_paths(plan: Any, indexes: list) -> list[str]:
    paths = []
    for m, index in zip(plan.models, indexes):
        paths += [os.path.abspath(f) for f in index.files]
        if m.lora is not None:
            paths.append(os.path.abspath(m.lora.folder))
    return sorted(set(paths))


def cluster_estimate(report: Any, address: str) -> list[str]:
    """``check --ray``: the cluster's nodes and CPUs, and the merge time on 1..N nodes of
    it (``check --nodes``' estimate with this cluster's node count)."""
    from .api import cluster_lines
    from .units import format_bytes

    connected = connect(address)
    try:
        nodes = cluster_nodes()
    finally:
        if connected:
            _import_ray().shutdown()
    if not nodes:
        raise MergeError("the Ray cluster has no node with CPUs")
    cpus = sum(n["cpus"] for n in nodes)
    lines = [f"ray cluster:   {len(nodes)} node(s), {cpus} CPU(s)"
             + (f", {sum(n['gpus'] for n in nodes)} GPU(s)" if any(n["gpus"] for n in nodes)
                else "")]
    lines += [f"  {n['address']} ({n['id'][:8]}): {n['cpus']} CPU(s), "
              f"{format_bytes(n['memory'])} for tasks" for n in nodes]
    return lines + cluster_lines(report, len(nodes))

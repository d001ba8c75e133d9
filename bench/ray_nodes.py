#!/usr/bin/env python3
"""Merges on a Ray cluster of N one-CPU nodes on this machine, against the local engine.

    python bench/ray_nodes.py RECIPE [--nodes 1 2] [--repeats 2] [--local-threads 1]

For each node count a ``ray.cluster_utils.Cluster`` is started (a head and N - 1 workers,
one CPU each), and ``mergesmith run RECIPE OUT --ray ADDRESS --quiet`` runs as its own
process under ``/usr/bin/time -v`` (the driver's wall time, CPU time and peak RSS); the
peak RSS of the Ray worker processes is sampled with psutil every 0.2 s while it runs
(per-node memory: the largest worker). With ``--local-threads`` the same recipe also runs
without Ray (``--threads``), for the overhead of Ray against local threads. The variants
alternate, repeat after repeat (a fresh cluster for each Ray run). The outputs of all runs
must be byte-identical; the script says so.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab import digest  # noqa: E402  (sha256 of the output's safetensors files)

RAY_PROCESS = ("ray::", "default_worker.py", "raylet", "gcs_server", "ray/dashboard",
               "ray/_private", "DashboardAgent")


def worker_rss_sampler(stop: threading.Event, peak: list[int], cpu: dict) -> None:
    """Peak RSS of the Ray worker processes, and the CPU seconds every Ray process (workers,
    raylets, GCS, dashboard) spends while the merge runs: ``cpu[pid] = [first, last]``."""
    import psutil

    while not stop.is_set():
        for p in psutil.process_iter(["cmdline", "memory_info", "cpu_times"]):
            cmd = " ".join(p.info.get("cmdline") or [])
            if not any(k in cmd for k in RAY_PROCESS):
                continue
            times = p.info.get("cpu_times")
            if times is not None:
                used = times.user + times.system
                cpu.setdefault(p.pid, [used, used])[1] = used
            if "ray::" in cmd or "default_worker.py" in cmd:
                mem = p.info.get("memory_info")
                if mem is not None:
                    peak[0] = max(peak[0], mem.rss)
        time.sleep(0.2)


def timed(cmd: list[str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    stop, peak, cpu = threading.Event(), [0], {}
    sampler = threading.Thread(target=worker_rss_sampler, args=(stop, peak, cpu), daemon=True)
    sampler.start()
    time.sleep(0.5)  # a first sample of the cluster's processes before the run
    before = set(cpu)
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}): {done.stderr[-2000:]}")
    text = done.stderr
    driver_cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", text)[1])
                     for k in ("User", "System"))
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)[1]) * 1024
    # processes that start after the first sample (workers) count from zero
    ray_cpu = sum(last - (first if pid in before else 0)
                  for pid, (first, last) in cpu.items())
    return {"wall": wall, "driver_cpu": driver_cpu, "driver_rss": rss, "worker_rss": peak[0],
            "ray_cpu": ray_cpu,
            "digest": digest(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--local-threads", type=int, default=0)
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    out = work / "out"
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeats):  # interleaved: the machine's drift hits every variant alike
        if args.local_threads:
            results.setdefault(f"local {args.local_threads} thread(s)", []).append(timed(
                [sys.executable, "-m", "mergesmith", "run", str(args.recipe), str(out),
                 "--quiet", "--threads", str(args.local_threads)], out))
        for n in args.nodes:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
            try:
                for _ in range(n - 1):
                    cluster.add_node(num_cpus=1)
                cluster.wait_for_nodes()
                results.setdefault(f"ray {n} node(s)", []).append(timed(
                    [sys.executable, "-m", "mergesmith", "run", str(args.recipe), str(out),
                     "--quiet", "--ray", cluster.address], out))
            finally:
                ray.shutdown()
                cluster.shutdown()
    digests = {r["digest"] for runs in results.values() for r in runs}
    first = None
    for name, runs in results.items():
        wall = statistics.median(r["wall"] for r in runs)
        first = first or wall
        walls = ", ".join(f"{r['wall']:.2f}" for r in runs)
        line = (f"{name}: wall {wall:.2f} s (median of {len(runs)}: {walls}; "
                f"{wall / first:.2f}x the "
                f"first), peak RSS {max(r['driver_rss'] for r in runs) / 2**20:.0f} MiB")
        line += (", CPU of every process "
                 f"{statistics.median(r['driver_cpu'] + r['ray_cpu'] for r in runs):.1f} s")
        if name.startswith("ray"):
            line += (f", driver CPU {statistics.median(r['driver_cpu'] for r in runs):.2f} s,"
                     f" largest worker RSS {max(r['worker_rss'] for r in runs) / 2**20:.0f} MiB")
        print(line, flush=True)
    print("outputs identical" if len(digests) == 1 else f"outputs DIFFER: {digests}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

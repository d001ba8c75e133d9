#!/usr/bin/env python3
"""Benchmark the modern data-free methods: time and peak RSS per method, and memory as the
number of experts grows.

1. Every method on base + 3 fine-tunes (``--size-gb``, default 0.5 GB each, bf16), next to
   task arithmetic and TIES: whole-process wall time, CPU time and peak RSS.
2. Iso-C and TSV-M (or ``--scaling-methods``; streaming: experts are read one at a time) with 2 and 8 experts on the
   same tensors, one worker thread: the growth of peak RSS, compared with the size of the
   largest tensor they process (float32).

A method run both with its default path and as ``METHOD+exact`` reports the deviation of the
default output from the exact one, ``‖default − exact‖ / ‖exact − base‖`` over all tensors
(``compare.py``). Models come from ``make_models.py`` (cached). Run with the project's
Python:

    .venv/bin/python bench/modern.py --workdir /tmp/msbench [--size-gb 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import remove  # noqa: E402

METHODS = {
    "task_arithmetic": {"weight": 0.5},
    "ties": {"weight": 0.5, "density": 0.5},
    "magmax": {},
    "consensus_ta": {},
    "consensus_ties": {"density": 0.5},
    "iso_c": {},
    "iso_cts": {},
    "tsv_m": {},
    "cart": {},
    "star": {},
    "wudi": {},
    "pcb": {},
    "svc_ta": {},
    # the same methods with the path forced: the seeded randomized SVD (top directions
    # only) wherever it can save work, or the exact SVD (the default chooses by cost)
    "tsv_m+randomized": {"randomized_svd": True},
    "cart+randomized": {"randomized_svd": True},
    "iso_cts+exact": {"randomized_svd": False},
    "cart+exact": {"randomized_svd": False},
    "tsv_m+exact": {"randomized_svd": False},
}


def recipe(method: str, models: Path, experts: int, params: dict) -> dict:
    per_model = {k: v for k, v in params.items() if k in ("weight", "density")}
    entries = [{"model": str(models / f"ft{i}"), **({"parameters": per_model} if per_model else {})}
               for i in range(1, experts + 1)]
    shared = {k: v for k, v in params.items() if k not in per_model}
    return {"merge_method": method.split("+")[0], "base_model": str(models / "base"),
            "models": entries, "dtype": "bfloat16", **({"parameters": shared} if shared else {})}


def deviation(exact: Path, other: Path, base: Path) -> float | None:
    """``‖other − exact‖ / ‖exact − base‖`` over all tensors (``compare.py``)."""
    proc = subprocess.run([sys.executable, str(HERE / "compare.py"), str(exact), str(other),
                           "--base", str(base)], capture_output=True, text=True, check=False)
    found = re.search(r"\|\|A-B\|\| / \|\|A-base\|\| = ([0-9.eE+-]+|nan)", proc.stdout)
    return float(found.group(1)) if found else None


def estimated_seconds(ms: list[str], recipe_path: Path, extra: tuple[str, ...]) -> float | None:
    """What ``mergesmith check`` predicts for the run (its 'time: about N s' line)."""
    threads = list(extra[extra.index("--threads"):][:2]) if "--threads" in extra else []
    proc = subprocess.run([*ms, "check", str(recipe_path), *threads], capture_output=True, check=False,
                          text=True)
    found = re.search(r"^time:\s+about (\d+) s", proc.stdout, re.MULTILINE)
    return float(found.group(1)) if found else None


def timed(cmd: list[str], log: Path) -> dict:
    """Whole-process wall time, CPU time and peak RSS of one command, from the kernel's
    accounting of that child (``wait4``), so no ``/usr/bin/time`` is needed (GPU machines
    often lack it); its stderr goes to ``log.err``."""
    with open(log.with_suffix(".err"), "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"ok": proc.returncode == 0, "wall_s": wall, "user_s": usage.ru_utime,
            "sys_s": usage.ru_stime, "cpu_s": usage.ru_utime + usage.ru_stime,
            "max_rss_mb": usage.ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mergesmith-bench"))
    ap.add_argument("--size-gb", type=float, default=0.5)
    ap.add_argument("--mergesmith", default=os.environ.get("MERGESMITH") or str(
        Path(__file__).resolve().parents[1] / ".venv" / "bin" / "mergesmith"))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--scaling-methods", default="iso_c,tsv_m",
                    help="methods run with 2 and 8 experts")
    ap.add_argument("--scaling-only", action="store_true",
                    help="only the 2-versus-8-experts memory rows")
    ap.add_argument("--device", default=None,
                    help="where the math runs (mergesmith's --device: cuda, cuda:N, cpu)")
    args = ap.parse_args()
    models = args.workdir / "models" / f"{args.size_gb:g}gb"
    # the 2-versus-8 rows need eight fine-tunes; base + 3 alone needs three (the generator
    # derives each fine-tune from the seed, so the first three are the same either way)
    finetunes = 3 if args.skip_scaling else 8
    subprocess.run([sys.executable, str(HERE / "make_models.py"), str(models), "--size-gb",
                    str(args.size_gb), "--finetunes", str(finetunes)], check=True,
                   stdout=subprocess.DEVNULL)
    device = ("--device", args.device) if args.device else ()
    runs = args.workdir / "runs" / "modern"
    runs.mkdir(parents=True, exist_ok=True)
    out = args.workdir / "out" / "modern"
    ms = shlex.split(args.mergesmith)
    rows = []

    chosen = args.methods.split(",")
    paired = {m.split("+")[0] for m in chosen if m.endswith("+exact")}

    def one(method: str, experts: int, extra: tuple[str, ...] = ()) -> dict:
        path = runs / f"{method}-{experts}.yml"
        path.write_text(yaml.safe_dump(recipe(method, models, experts, METHODS[method])))
        folder = out / method
        remove(folder)
        estimate = estimated_seconds(ms, path, extra)
        stats = timed([*ms, "run", str(path), str(folder), "--quiet", *device, *extra],
                      runs / f"{method}-{experts}")
        row = {"method": method, "experts": experts, "check_estimate_s": estimate, **stats}
        plain = method.split("+")[0]
        exact, default = out / f"{plain}+exact", out / plain
        if experts == 3 and plain in paired and exact.exists() and default.exists():
            row["deviation_from_exact"] = deviation(exact, default, models / "base")
            remove(exact)
            remove(default)
        elif not (experts == 3 and plain in paired and method in (plain, f"{plain}+exact")):
            remove(folder)
        print(json.dumps(row), flush=True)
        return row

    for method in ([] if args.scaling_only else chosen):
        rows.append(one(method, 3))
    if not args.skip_scaling:
        for method in args.scaling_methods.split(","):
            for experts in (2, 8):
                # one worker thread: with two, whether the two largest tensors overlap
                # in time depends on scheduling, not on the number of experts
                rows.append(one(method, experts, ("--threads", "1")))
    name = f"modern-{args.size_gb:g}gb{'-scaling' if args.scaling_only else ''}.json"
    (args.workdir / name).write_text(json.dumps(rows, indent=1))
    print("\n| method | experts | wall s | CPU s | peak RSS MiB | check's estimate s "
          "| deviation from exact |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        dev = r.get("deviation_from_exact")
        print(f"| {r['method']} | {r['experts']} | {r.get('wall_s', 0):.1f} | "
              f"{r.get('cpu_s', 0):.1f} | {r.get('max_rss_mb', 0):.0f} | "
              f"{r.get('check_estimate_s') or '—'} | {'—' if dev is None else f'{dev:.3g}'} |"
              + ("" if r["ok"] else " FAILED"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

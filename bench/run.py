#!/usr/bin/env python3
"""Benchmark mergesmith against mergekit (and the machine's floor).

For every (model size, merge method) this script

1. generates synthetic Llama-shaped inputs (``make_models.py``, cached),
2. writes a mergekit-format recipe,
3. warms the page cache by reading every input file once,
4. repeats ``--repeats`` times, interleaved: mergesmith, mergekit, then the
   floors (read inputs once, write output-size bytes once, naive torch merge),
   each one a whole process under ``/usr/bin/time -v``,
5. reports median wall / CPU seconds and peak RSS per tool, plus ratios.

Results are printed as a Markdown table and saved as JSON and Markdown.
A failing run is recorded (exit status and stderr tail) and the benchmark
continues. Run with the project's Python (it needs torch for the floors):

    .venv/bin/python bench/run.py --size-gb 0.5,2 --methods task_arithmetic,ties
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
MAKE_MODELS = HERE / "make_models.py"
FLOOR = HERE / "floor.py"
# Commands: $MERGESMITH, else this checkout's venv (REPO/.venv), else `mergesmith` on PATH;
# mergekit from $MERGEKIT_VENV (a venv with mergekit 0.1.5), else `mergekit-yaml` on PATH.
DEFAULT_MERGESMITH = os.environ.get("MERGESMITH") or (
    str(HERE.parent / ".venv" / "bin" / "mergesmith")
    if (HERE.parent / ".venv" / "bin" / "mergesmith").exists() else "mergesmith")
DEFAULT_MERGEKIT = (str(Path(os.environ["MERGEKIT_VENV"]) / "bin" / "mergekit-yaml")
                    if os.environ.get("MERGEKIT_VENV") else shutil.which("mergekit-yaml"))
METHODS = ("task_arithmetic", "linear", "ties", "dare_ties", "breadcrumbs", "della", "slerp",
           "model_stock")
ALIASES = {"mergekit": METHODS}
"""``--methods mergekit``: every method of the speed table (mergekit's own methods)."""
RANDOM_METHODS = {"dare_ties", "della"}
FLOOR_METHODS = {"task_arithmetic", "linear", "ties", "dare_ties", "slerp"}
"""Methods the naive torch floor (floor.py merge) implements; the others have no torch row."""
TOOLS = ("mergesmith", "mergekit", "read", "write", "torch")
TIME_FIELDS = {
    "Elapsed (wall clock) time (h:mm:ss or m:ss)": "wall_s",
    "User time (seconds)": "user_s",
    "System time (seconds)": "sys_s",
    "Maximum resident set size (kbytes)": "max_rss_kb",
    "Exit status": "exit_status",
}
CHUNK = 16 * 1024 * 1024


# ------------------------------------------------------------------ recipes

def make_recipe(method: str, base: Path, finetunes: list[Path]) -> dict:
    """A mergekit-format recipe for ``method`` (base + fine-tunes, weights 1/N)."""
    n = len(finetunes)
    weight = round(1.0 / n, 6)

    def entries(**extra) -> list[dict]:
        return [{"model": str(ft), "parameters": {"weight": weight, **extra}} for ft in finetunes]

    if method == "task_arithmetic":
        recipe = {"merge_method": method, "base_model": str(base), "models": entries()}
    elif method == "linear":
        # mergekit's linear merge treats base_model as one more weighted input,
        # so the plain average of the fine-tunes has no base_model.
        recipe = {"merge_method": method, "models": entries()}
    elif method in ("ties", "dare_ties"):
        recipe = {"merge_method": method, "base_model": str(base), "models": entries(density=0.5)}
    elif method == "breadcrumbs":
        recipe = {"merge_method": method, "base_model": str(base),
                  "models": entries(density=0.9, gamma=0.01)}
    elif method == "della":
        recipe = {"merge_method": method, "base_model": str(base),
                  "models": entries(density=0.5, epsilon=0.1), "parameters": {"lambda": 1.0}}
    elif method == "model_stock":
        recipe = {"merge_method": method, "base_model": str(base),
                  "models": [{"model": str(ft)} for ft in finetunes]}
    elif method == "slerp":
        recipe = {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": str(finetunes[0])}],
            "parameters": {"t": 0.5},
        }
    else:
        raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    recipe["dtype"] = "bfloat16"
    return recipe


def recipe_inputs(recipe: dict) -> list[Path]:
    """Distinct model folders a recipe reads."""
    folders = [recipe.get("base_model")] + [m["model"] for m in recipe["models"]]
    return [Path(f) for f in dict.fromkeys(f for f in folders if f)]


def input_files(folders: list[Path]) -> list[Path]:
    return sorted(p for folder in folders for p in folder.glob("*.safetensors"))


# ------------------------------------------------------------------ timing

def parse_time_v(text: str) -> dict:
    """Extract wall/user/sys seconds, peak RSS and exit status from ``time -v`` output."""
    out: dict = {}
    for line in text.splitlines():
        key, sep, value = line.strip().rpartition(": ")
        if not sep or key not in TIME_FIELDS:
            continue
        field = TIME_FIELDS[key]
        if field == "wall_s":
            seconds = 0.0
            for part in value.split(":"):
                seconds = seconds * 60 + float(part)
            out[field] = seconds
        elif field in ("max_rss_kb", "exit_status"):
            out[field] = int(value)
        else:
            out[field] = float(value)
    return out


def tail(path: Path, lines: int = 25, chars: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])[-chars:]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0


def timed_run(cmd: list[str], log_prefix: Path, timeout: float, env: dict,
              out_dir: Path | None = None) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v``; returns the measurements and status.

    ``out_dir``, when given, must contain safetensors afterwards for the run to count.
    """
    time_file = log_prefix.with_suffix(".time")
    stdout_file = log_prefix.with_suffix(".stdout")
    stderr_file = log_prefix.with_suffix(".stderr")
    full = ["/usr/bin/time", "-v", "-o", str(time_file), *cmd]
    result: dict = {"cmd": shlex.join(cmd), "ok": False}
    t0 = time.perf_counter()
    with open(stdout_file, "wb") as so, open(stderr_file, "wb") as se:
        proc = subprocess.Popen(full, stdout=so, stderr=se, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            result["error"] = f"timed out after {timeout:g}s"
    result["harness_wall_s"] = round(time.perf_counter() - t0, 3)
    result["returncode"] = proc.returncode
    try:
        result.update(parse_time_v(time_file.read_text(errors="replace")))
    except OSError:
        pass
    if "user_s" in result:
        result["cpu_s"] = round(result["user_s"] + result["sys_s"], 3)
    if "max_rss_kb" in result:
        result["max_rss_mb"] = round(result["max_rss_kb"] / 1024, 1)
    if out_dir is not None:
        result["out_bytes"] = folder_bytes(out_dir)
    if "error" not in result:
        if proc.returncode != 0:
            result["error"] = f"exit status {proc.returncode}"
        elif "wall_s" not in result:
            result["error"] = "no /usr/bin/time output"
        elif out_dir is not None and not result["out_bytes"]:
            result["error"] = "exit status 0 but no *.safetensors in the output folder"
    result["ok"] = "error" not in result
    if not result["ok"]:
        result["stderr_tail"] = tail(stderr_file)
    return result


# ------------------------------------------------------------------ helpers

def warm_cache(files: list[Path]) -> float:
    """Read every file once so the timed runs start from a warm page cache."""
    t0 = time.perf_counter()
    buf = memoryview(bytearray(CHUNK))
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def mem_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def capture(cmd: list[str]) -> str | None:
    """First line of a command's output, or None."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if out.returncode == 0 and text else None


def machine_info(args: argparse.Namespace) -> dict:
    cpu = None
    try:
        cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                    if l.startswith("model name")), None)
    except OSError:
        pass
    mem_total = None
    try:
        mem_total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    mk_python = Path(args.mergekit[0]).parent / "python" if args.mergekit else None
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_total_gb": round(mem_total / 1e9, 1) if mem_total else None,
        "python": sys.version.split()[0],
        "torch": capture([sys.executable, "-c", "import torch; print(torch.__version__)"]),
        "mergesmith_version": capture([*args.mergesmith, "--version"]),
        "mergesmith_git": capture(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"]),
        "mergekit_version": capture([str(mk_python), "-c",
                                     "import importlib.metadata as m; print(m.version('mergekit'))"])
        if mk_python and mk_python.exists() else None,
        "argv": sys.argv,
    }


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarize(runs: list[dict]) -> dict:
    """Median wall/CPU and max RSS over the successful runs of one tool."""
    ok = [r for r in runs if r["ok"]]
    return {
        "runs": len(runs),
        "ok": len(ok),
        "wall_s": median([r["wall_s"] for r in ok]),
        "cpu_s": median([r["cpu_s"] for r in ok]),
        "max_rss_mb": max((r["max_rss_mb"] for r in ok), default=None),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


# ------------------------------------------------------------------ benchmark

def bench_row(args, size: float, method: str, n_ft: int, models_dir: Path, env: dict) -> dict:
    """All repeats of one (size, method, number of fine-tunes) row."""
    finetunes = [models_dir / f"ft{i}" for i in range(1, n_ft + 1)]
    recipe = make_recipe(method, models_dir / "base", finetunes)
    row_dir = args.workdir / "runs" / f"{size:g}gb-{method}-{n_ft}ft"
    row_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = row_dir / "recipe.yml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    files = input_files(recipe_inputs(recipe))
    in_bytes = sum(p.stat().st_size for p in files)
    out_bytes = folder_bytes(models_dir / "base")
    avail = mem_available_bytes()
    if avail and in_bytes + out_bytes > 0.8 * avail:
        print(f"  warning: inputs + output ({(in_bytes + out_bytes) / 1e9:.1f} GB) do not fit "
              f"comfortably in available memory ({avail / 1e9:.1f} GB); runs will hit the disk")
    estimate = check_estimate(args, recipe_path, env)
    warm_s = warm_cache(files)
    print(f"  page cache warmed: {in_bytes / 1e9:.2f} GB in {warm_s:.1f}s")

    out = args.workdir / "out"
    seed_ms = ["--seed", "0"] if method in RANDOM_METHODS else []
    seed_mk = ["--random-seed", "0"] if method in RANDOM_METHODS else []
    threads = ["--threads", str(args.threads)] if args.threads else []
    commands = {
        "mergesmith": [*args.mergesmith, "run", str(recipe_path), str(out / "mergesmith"),
                       "--quiet", *threads, *seed_ms, *args.ms_args],
        "mergekit": [*args.mergekit, str(recipe_path), str(out / "mergekit"), "--quiet", *seed_mk]
        if args.mergekit else None,
        "read": [sys.executable, str(FLOOR), "read", *map(str, files)],
        "write": [sys.executable, str(FLOOR), "write", str(out / "write.bin"), str(out_bytes)],
        "torch": [sys.executable, str(FLOOR), "merge", str(recipe_path), str(out / "torch"),
                  "--seed", "0", *threads] if method in FLOOR_METHODS else None,
    }
    out_dirs = {"mergesmith": out / "mergesmith", "mergekit": out / "mergekit", "torch": out / "torch"}
    runs: dict[str, list[dict]] = {tool: [] for tool, cmd in commands.items() if cmd}
    for rep in range(1, args.repeats + 1):
        for tool in runs:
            if tool == "torch" and (args.torch_floor == "never"
                                    or (args.torch_floor == "first" and rep > 1)):
                continue
            target = out_dirs.get(tool, out / "write.bin")
            remove(target)
            os.sync()
            r = timed_run(commands[tool], row_dir / f"{tool}-{rep}", args.timeout, env, out_dirs.get(tool))
            remove(target)
            r.update(tool=tool, repeat=rep)
            runs[tool].append(r)
            status = "ok" if r["ok"] else f"FAILED ({r['error']})"
            print(f"  [{rep}/{args.repeats}] {tool:<10} wall {fmt(r.get('wall_s')):>8} s  "
                  f"cpu {fmt(r.get('cpu_s')):>8} s  rss {fmt(r.get('max_rss_mb'), 0):>6} MB  {status}", flush=True)
            if not r["ok"] and r.get("stderr_tail"):
                print("    " + "\n    ".join(r["stderr_tail"].splitlines()[-5:]), flush=True)

    stats = {tool: summarize(rs) for tool, rs in runs.items()}
    ms, mk = stats.get("mergesmith", {}), stats.get("mergekit", {})
    rd, wr = stats["read"], stats["write"]
    io_floor = rd["wall_s"] + wr["wall_s"] if rd["wall_s"] is not None and wr["wall_s"] is not None else None
    return {
        "size_gb": size,
        "method": method,
        "finetunes": len(finetunes) if method != "slerp" else 1,
        "ms_args": args.ms_args,
        "recipe": str(recipe_path),
        "input_bytes": in_bytes,
        "output_bytes": out_bytes,
        "stats": stats,
        "io_floor_wall_s": round(io_floor, 3) if io_floor is not None else None,
        "estimate_s": estimate,
        "ratios": {
            "ms_mk_wall": ratio(ms.get("wall_s"), mk.get("wall_s")),
            "ms_mk_rss": ratio(ms.get("max_rss_mb"), mk.get("max_rss_mb")),
            "ms_io_wall": ratio(ms.get("wall_s"), io_floor),
            "ms_torch_wall": ratio(ms.get("wall_s"), stats.get("torch", {}).get("wall_s")),
        },
        "runs": [r for rs in runs.values() for r in rs],
    }


def check_estimate(args, recipe_path: Path, env: dict) -> float | None:
    """The time `mergesmith check` predicts for this row (compared with the real one)."""
    threads = ["--threads", str(args.threads)] if args.threads else []
    try:
        out = subprocess.run([*args.mergesmith, "check", str(recipe_path), *threads,
                              *[a for a in args.ms_args if a != "--quiet"]],
                             capture_output=True, text=True, env=env, timeout=600).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if line.startswith("time:"):
            try:
                return float(line.split("about", 1)[1].split()[0])
            except (IndexError, ValueError):
                return None
    return None


# ------------------------------------------------------------------ reporting

def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def tool_cell(stats: dict, tool: str, key: str, digits: int = 2) -> str:
    s = stats.get(tool)
    if s is None or s["runs"] == 0:
        return "n/a"
    if not s["ok"]:
        return "FAIL"
    cell = fmt(s[key], digits)
    return cell if s["ok"] == s["runs"] else f"{cell} ({s['ok']}/{s['runs']})"


def markdown(rows: list[dict], meta: dict) -> str:
    """Summary table, per-tool detail table and failure list."""
    lines = [
        f"Benchmark run {meta['date']} on {meta['host']}: {meta['cpu']}, {meta['cpus']} CPUs, "
        f"{meta['mem_total_gb']} GB RAM; torch {meta['torch']}, mergekit {meta['mergekit_version']}, "
        f"mergesmith {meta['mergesmith_version']} ({meta['mergesmith_git']}).",
        "",
        "Median wall / CPU (user+sys) seconds and peak RSS (MB, max over repeats); "
        "io floor = read inputs once + write output once.",
        "",
        "| size GB | models | method | ms wall s | ms CPU s | ms RSS MB | mk wall s | mk CPU s "
        "| mk RSS MB | io floor s | torch wall s | torch RSS MB | ms/mk wall | ms/mk RSS "
        "| ms/io wall | ms/torch wall | check est s |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        st, ra = row["stats"], row["ratios"]
        lines.append("| " + " | ".join([
            f"{row['size_gb']:g}", f"base+{row.get('finetunes', '?')}",
            row["method"] + (f" `{' '.join(row['ms_args'])}`" if row.get("ms_args") else ""),
            tool_cell(st, "mergesmith", "wall_s"), tool_cell(st, "mergesmith", "cpu_s"),
            tool_cell(st, "mergesmith", "max_rss_mb", 0),
            tool_cell(st, "mergekit", "wall_s"), tool_cell(st, "mergekit", "cpu_s"),
            tool_cell(st, "mergekit", "max_rss_mb", 0),
            fmt(row["io_floor_wall_s"]), tool_cell(st, "torch", "wall_s"),
            tool_cell(st, "torch", "max_rss_mb", 0),
            fmt(ra["ms_mk_wall"]), fmt(ra["ms_mk_rss"]), fmt(ra["ms_io_wall"]),
            fmt(ra["ms_torch_wall"]), fmt(row.get("estimate_s"), 0),
        ]) + " |")
    lines += ["", "| size GB | method | tool | ok/runs | wall s | CPU s | RSS MB |",
              "|---:|---|---|---:|---:|---:|---:|"]
    for row in rows:
        for tool, s in row["stats"].items():
            lines.append(f"| {row['size_gb']:g} | {row['method']} | {tool} | {s['ok']}/{s['runs']} "
                         f"| {fmt(s['wall_s'])} | {fmt(s['cpu_s'])} | {fmt(s['max_rss_mb'], 0)} |")
    failures = [(row, r) for row in rows for r in row["runs"] if not r["ok"]]
    if failures:
        lines += ["", "Failures:", ""]
        for row, r in failures:
            last = (r.get("stderr_tail") or "").strip().splitlines()[-1:]
            detail = f": `{last[0][:200]}`" if last else ""
            lines.append(f"- {row['size_gb']:g} GB {row['method']} {r['tool']} #{r['repeat']}: "
                         f"{r['error']}{detail}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ main

def parse_sizes(values: list[str]) -> list[float]:
    return [float(v) for value in values for v in value.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mergesmith-bench"),
                    help="models, recipes, logs and outputs (default /tmp/mergesmith-bench)")
    ap.add_argument("--size-gb", action="append", metavar="GB",
                    help="model size(s) in decimal GB; repeatable or comma list (default 0.5,2)")
    ap.add_argument("--finetunes", default="2",
                    help="fine-tuned models to merge; comma list for several rows (default 2)")
    ap.add_argument("--ms-args", default="", metavar="ARGS",
                    help="extra options for mergesmith run, e.g. '--memory-limit 512M'")
    ap.add_argument("--torch-floor", choices=("always", "first", "never"), default="always",
                    help="run the naive torch merge every repeat, only in the first, or never")
    ap.add_argument("--methods", default="task_arithmetic",
                    help=f"comma list of {', '.join(METHODS)}, or 'mergekit' for all of them "
                         "(default task_arithmetic)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per tool and row (default 3)")
    ap.add_argument("--mergesmith", default=DEFAULT_MERGESMITH, metavar="CMD",
                    help=f"mergesmith command (default {DEFAULT_MERGESMITH})")
    ap.add_argument("--mergekit", default=DEFAULT_MERGEKIT if DEFAULT_MERGEKIT and Path(
                    DEFAULT_MERGEKIT).exists() else None, metavar="CMD",
                    help="mergekit-yaml command (default $MERGEKIT_VENV/bin/mergekit-yaml, else "
                         "mergekit-yaml on PATH)")
    ap.add_argument("--no-mergekit", action="store_true", help="skip mergekit")
    ap.add_argument("--threads", type=int, metavar="N", help="passed to mergesmith (and the torch floor)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the synthetic models (default 0)")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="input shard size in GB (default 1.0)")
    ap.add_argument("--timeout", type=float, default=3600, help="per-run limit in seconds (default 3600)")
    ap.add_argument("--json", type=Path, metavar="FILE", help="results JSON (default WORKDIR/results.json)")
    ap.add_argument("--markdown", type=Path, metavar="FILE", help="results Markdown (default WORKDIR/results.md)")
    args = ap.parse_args(argv)
    args.size_gb = parse_sizes(args.size_gb or ["0.5,2"])
    args.methods = [m for a in args.methods.split(",") if a.strip()
                    for m in ALIASES.get(a.strip(), (a.strip(),))]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    args.finetunes = [int(n) for n in str(args.finetunes).split(",") if n.strip()]
    args.ms_args = shlex.split(args.ms_args)
    if min(args.finetunes) < 1 or args.repeats < 1:
        ap.error("--finetunes and --repeats must be at least 1")
    args.mergesmith = shlex.split(args.mergesmith)
    args.mergekit = None if args.no_mergekit or not args.mergekit else shlex.split(args.mergekit)
    args.workdir = args.workdir.resolve()
    args.json = args.json or args.workdir / "results.json"
    args.markdown = args.markdown or args.workdir / "results.md"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path("/usr/bin/time").exists():
        sys.exit("error: /usr/bin/time (GNU time) is required: apt-get install time")
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "out").mkdir(exist_ok=True)
    # Both tools run offline: the inputs are local and nothing should be fetched.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    meta = machine_info(args)
    print(f"mergesmith: {shlex.join(args.mergesmith)}\nmergekit:   "
          f"{shlex.join(args.mergekit) if args.mergekit else '(skipped)'}")

    rows: list[dict] = []
    for size in args.size_gb:
        models_dir = args.workdir / "models" / f"{size:g}gb"
        print(f"== {size:g} GB models in {models_dir}", flush=True)
        gen = subprocess.run([sys.executable, str(MAKE_MODELS), str(models_dir), "--size-gb", str(size),
                              "--finetunes", str(max(args.finetunes)), "--seed", str(args.seed),
                              "--shard-gb", str(args.shard_gb)], stdout=subprocess.DEVNULL)
        if gen.returncode != 0:
            print(f"  model generation failed (exit {gen.returncode}); skipping {size:g} GB")
            continue
        for n_ft in args.finetunes:
            for method in args.methods:
                if method == "slerp" and n_ft != args.finetunes[0]:
                    continue  # slerp merges two models whatever the count
                print(f"-- {size:g} GB, base + {n_ft}, {method}", flush=True)
                rows.append(bench_row(args, size, method, n_ft, models_dir, env))
                save(args, meta, rows)  # keep partial results if interrupted

    report = markdown(rows, meta)
    save(args, meta, rows, report)
    print("\n" + report)
    print(f"results: {args.json}\n         {args.markdown}")
    return 0


def save(args: argparse.Namespace, meta: dict, rows: list[dict], report: str | None = None) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(report or markdown(rows, meta))


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""``mergesmith search`` on the skill benchmark: the models ``run.py`` trained (same
workdir), a search over task-arithmetic weights and one over TIES densities, each scored
on the validation split; the best of each is reported on the test split next to the grid's
best (``results.json`` of ``run.py``).

    .venv/bin/python bench/skills/run.py --workdir W --methods task_arithmetic,ties
    .venv/bin/python bench/skills/search.py --workdir W [--budget 48]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from run import SKILLS, evaluate, retained  # noqa: E402

from mergesmith.search import search  # noqa: E402

HERE = Path(__file__).resolve().parent


def space(kind: str, work: Path, budget: int, seed: int, workers: int, algorithm: str) -> str:
    models = "\n".join(
        f"  - model: {work / f'ft_{s}'}\n    parameters: "
        + ("{weight: {range: [0, 1]}}" if kind == "task_arithmetic"
           else "{weight: 1.0, density: {range: [0.1, 1.0]}}")
        for s in SKILLS.values())
    params = ("parameters: {lambda: 1.0}" if kind == "task_arithmetic"
              else "parameters: {lambda: {range: [0.3, 1.5]}}")
    return f"""merge_method: {kind}
base_model: {work / 'base'}
models:
{models}
{params}
seed: 0
search:
  objective: {{python: {HERE / 'objective.py'}:validation}}
  direction: maximize
  budget: {budget}
  algorithm: {algorithm}
  seed: {seed}
  workers: {workers}
"""


def label(name: str) -> str:
    """``models[2].parameters.weight`` → ``sorting weight``; ``parameters.lambda`` → ``λ``."""
    m = re.fullmatch(r"models\[(\d+)\]\.parameters\.(\w+)", name)
    if m:
        return f"{list(SKILLS.values())[int(m[1])]} {m[2]}"
    return {"parameters.lambda": "λ"}.get(name, name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mergesmith-skills"))
    ap.add_argument("--budget", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", default="task_arithmetic,ties")
    ap.add_argument("--algorithm", default="cmaes", choices=("cmaes", "tpe", "random"))
    ap.add_argument("--quick", action="store_true", help="as run.py --quick (50/100 examples)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_val, n_test = (50, 100) if args.quick else (200, 500)
    os.environ["SKILLS_N_VAL"] = str(n_val)
    work = args.workdir
    grid = json.loads((work / "results.json").read_text())
    base = grid[0]["test"]
    own = {SKILLS[t]: grid[1 + i]["test"][SKILLS[t]] for i, t in enumerate(SKILLS)}
    rows = []
    for kind in args.kinds.split(","):
        tag = kind if args.algorithm == "cmaes" else f"{kind}-{args.algorithm}"
        spec = work / f"space-{tag}.yml"
        spec.write_text(space(kind, work, args.budget, args.seed, args.workers, args.algorithm))
        out = work / f"search-{tag}"
        t0 = time.time()
        result = search(spec, out, resume=out.exists(), threads=args.threads,
                        echo=lambda line, final: print(line, flush=True))
        seconds = time.time() - t0
        scores = evaluate(out, n_val, n_test)
        for split in ("val", "test"):
            scores[split]["mean"] = sum(scores[split][s] for s in SKILLS.values()) / len(SKILLS)
        scores["test"]["retained"] = retained(scores["test"], base, own)
        tried = [r for r in grid if r["model"] == kind]
        chosen = max(tried, key=lambda r: r["val"]["mean"])
        rows.append({"method": kind, "grid_setting": chosen["settings"],
                     "grid_evaluations": len(tried), "grid": chosen,
                     "search": scores, "best": result.best, "evaluations": len(result.records),
                     "new": result.new_trials, "seconds": seconds})
        print(json.dumps(rows[-1]), flush=True)
    suffix = "" if args.algorithm == "cmaes" else f"-{args.algorithm}"
    (work / f"search-results{suffix}.json").write_text(json.dumps(rows, indent=1))
    lines = ["| method | how | evaluations | setting | val mean | test: "
             + " | ".join(SKILLS.values()) + " | test mean | gain kept | wall time |",
             "|---|---|---:|---|---:|" + "---:|" * (len(SKILLS) + 3)]
    for r in rows:
        g, s = r["grid"], r["search"]
        lines.append(f"| {r['method']} | grid | {r['grid_evaluations']} | {r['grid_setting']} | "
                     f"{g['val']['mean']:.3f} | "
                     + " | ".join(f"{g['test'][k]:.2f}" for k in SKILLS.values())
                     + f" | {g['test']['mean']:.3f} | {100 * g['test']['retained']:.0f} % | |")
        setting = ", ".join(f"{label(k)} {v:.2f}" for k, v in r["best"]["params"].items())
        lines.append(f"| {r['method']} | search ({args.algorithm}) | {r['evaluations']} | "
                     f"{setting} | "
                     f"{s['val']['mean']:.3f} | "
                     + " | ".join(f"{s['test'][k]:.2f}" for k in SKILLS.values())
                     + f" | {s['test']['mean']:.3f} | {100 * s['test']['retained']:.0f} % | "
                     f"{r['seconds']:.0f} s |")
    table = "\n".join(lines)
    (work / f"search-results{suffix}.md").write_text(table + "\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

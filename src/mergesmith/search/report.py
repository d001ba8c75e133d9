"""What a search leaves in OUT: the best model (merged once more with the best
parameters), its concrete recipe as ``mergesmith_config.yml``, a model card that reports
the search, and plots in ``OUT/search/``."""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Any

from ..errors import MergeError


def write_best(result: Any, threads: int | None) -> None:
    import mergesmith

    space, out = result.space, result.out
    best = result.best
    text = space.recipe_text(best["params"])
    staging = os.path.join(out, "search", "best")
    shutil.rmtree(staging, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mergesmith.run(text, staging, threads=threads, overwrite=True)
        except MergeError as e:
            raise MergeError(f"the search finished, but merging its best trial "
                             f"({best['trial']}) again failed: {e}") from None
    for name in os.listdir(out):  # a previous best (a resumed, finished search)
        if name != "search":
            p = os.path.join(out, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    for name in os.listdir(staging):
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    os.rmdir(staging)
    card_path = os.path.join(out, "README.md")
    card = ""
    if os.path.exists(card_path):
        with open(card_path, encoding="utf-8") as f:
            card = f.read().rstrip() + "\n\n"
    with open(card_path, "w", encoding="utf-8") as f:
        f.write(card + search_markdown(result))
    plots(result)


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def search_markdown(result: Any) -> str:
    """The model card's section on the search."""
    space, records, best = result.space, result.records, result.best
    ok = [r for r in records if r["state"] == "complete"]
    failed = len(records) - len(ok)
    sign = 1 if space.objective.direction == "maximize" else -1
    lines = ["## How this recipe was found", "",
             f"`mergesmith search` tried {len(records)} candidate recipe(s) (budget "
             f"{space.budget}; {space.algorithm}, seed {space.seed}, batches of {space.batch}"
             + (f"; {failed} failed" if failed else "")
             + f"; {sum(r.get('seconds') or 0 for r in records):.0f} s of merging and "
             "scoring in all), each merged and scored by "
             f"{space.objective.label} ({space.objective.direction}). The best, trial "
             f"{best['trial']}, scored **{best['score']:.6g}**; its recipe is "
             "`mergesmith_config.yml`.", "",
             "| searched | range | best |", "|---|---|---:|"]
    for d in space.dimensions:
        lines.append(f"| `{d.name}` | {d.describe()} | {_value(best['params'][d.name])} |")
    lines += ["", "Best trials:", "",
              "| trial | score | " + " | ".join(f"`{d.name}`" for d in space.dimensions)
              + " |", "|---:|---:|" + "---:|" * len(space.dimensions)]
    for r in sorted(ok, key=lambda r: (-sign * r["score"], r["trial"]))[:10]:
        lines.append(f"| {r['trial']} | {r['score']:.6g} | "
                     + " | ".join(_value(r["params"][d.name]) for d in space.dimensions) + " |")
    lines += ["", "Every trial is in `search/trials.jsonl`, the space in `search/space.yml`; "
              "plots: `search/progress.png` (score per trial and best so far), "
              "`search/parameters.png` (each parameter against the score).", "",
              "The search space:", "", "```yaml", space.text.rstrip(), "```", ""]
    return "\n".join(lines)


def plots(result: Any) -> list[str]:
    """``progress.png`` and ``parameters.png`` in ``OUT/search``; none without matplotlib
    (a note in the result)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        result.notes.append("no plots: pip install matplotlib")
        return []
    space, records = result.space, result.records
    folder = os.path.join(result.out, "search")
    sign = 1 if space.objective.direction == "maximize" else -1
    ok = [r for r in records if r["state"] == "complete"]
    failed = [r for r in records if r["state"] != "complete"]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter([r["trial"] for r in ok], [r["score"] for r in ok], s=14, label="trial")
    best, xs, ys = None, [], []
    for r in records:
        if r["state"] == "complete" and (best is None or sign * r["score"] > sign * best):
            best = r["score"]
        if best is not None:
            xs.append(r["trial"])
            ys.append(best)
    ax.step(xs, ys, where="post", color="C1", label="best so far")
    for r in failed:
        ax.axvline(r["trial"], color="red", alpha=0.2, lw=1)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"score ({space.objective.direction})")
    ax.set_title(f"{space.objective.label}: {space.algorithm}"
                 + (f", {len(failed)} failed (red)" if failed else ""))
    ax.legend()
    fig.tight_layout()
    written.append(os.path.join(folder, "progress.png"))
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    dims = space.dimensions
    cols = min(3, len(dims))
    rows = (len(dims) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, d in zip(axes.flat, dims):
        values = [r["params"][d.name] for r in ok]
        if d.kind == "choice":
            index = {c: i for i, c in enumerate(d.choices)}
            ax.scatter([index[v] for v in values], [r["score"] for r in ok], s=14)
            ax.set_xticks(range(len(d.choices)), [str(c) for c in d.choices])
        else:
            ax.scatter(values, [r["score"] for r in ok], s=14)
            if d.log:
                ax.set_xscale("log")
        ax.axvline(result.best["params"][d.name] if d.kind != "choice"
                   else d.choices.index(result.best["params"][d.name]), color="C1", lw=1)
        ax.set_xlabel(d.name, fontsize=8)
        ax.set_ylabel("score")
    for ax in list(axes.flat)[len(dims):]:
        ax.axis("off")
    fig.tight_layout()
    written.append(os.path.join(folder, "parameters.png"))
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written

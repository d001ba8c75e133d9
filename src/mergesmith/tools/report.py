"""``inspect`` output: the terminal summary, and the report folder (``inspect.json``,
heatmap PNGs, ``index.html``).

PNGs need matplotlib (``pip install 'mergesmith[report]'``, Agg backend, no display);
without it the HTML and JSON are still written and the report says the plots were skipped.
The HTML is self-contained (inline CSS, the PNGs embedded as data URIs and also saved next
to it).
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import MergeError, MergeIOError
from .inspect_metrics import DEFINITIONS, mean, pairs
from .inspect_models import InspectResult


@dataclass
class Heatmap:
    """One layer × column matrix of a metric (None = undefined)."""

    file: str
    title: str
    columns: list[str]
    rows: list[str]
    values: list[list[float | None]]
    fmt: str = ".3f"


@dataclass
class ReportFiles:
    folder: str
    html: str
    json: str
    pngs: list[str] = field(default_factory=list)
    note: str | None = None  # e.g. "PNG plots skipped: matplotlib is not installed"


def heatmaps(result: InspectResult) -> list[Heatmap]:
    """The per-layer metrics plotted: rows are layers, columns models or model pairs."""
    rows = [g.label for g in result.layers]
    k = len(result.names)
    maps = [
        Heatmap("relative_norm.png", "task-vector norm relative to the base (‖τ‖/‖base‖)",
                result.names, rows, [g.sums.relative_norms() for g in result.layers], ".3g"),
        Heatmap("sparsity.png", "sparsity (fraction of near-zero deltas)", result.names, rows,
                [g.sums.sparsity() for g in result.layers], ".0%"),
    ]
    if k >= 2:
        maps.append(Heatmap("cosine.png", "cosine similarity between task vectors",
                            result.pair_names, rows, [g.sums.cosines() for g in result.layers]))
        maps.append(Heatmap(
            "sign_conflict.png", "sign conflict (all models) and sign disagreement per model",
            ["all models"] + result.names, rows,
            [[g.sums.sign_conflict(), *g.sums.sign_disagreement()] for g in result.layers],
            ".0%"))
    if any(r for g in result.layers for r in g.median_relative_ranks() if r is not None):
        maps.append(Heatmap("effective_rank.png",
                            "effective rank / smaller side of the matrix (median)",
                            result.names, rows,
                            [g.median_relative_ranks() for g in result.layers], ".0%"))
    return maps


def _plot(hm: Heatmap, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in hm.values],
                    dtype=float)
    n_rows, n_cols = data.shape
    fig, ax = plt.subplots(figsize=(min(3 + 1.3 * n_cols, 16), min(1.5 + 0.28 * n_rows, 40)))
    cmap = plt.get_cmap("RdBu_r" if hm.file == "cosine.png" else "viridis").with_extremes(
        bad="#dddddd")
    finite = data[np.isfinite(data)]
    kwargs: dict[str, Any] = {}
    if hm.file == "cosine.png":
        kwargs = {"vmin": -1.0, "vmax": 1.0}
    elif finite.size and finite.min() == finite.max():
        kwargs = {"vmin": finite.min() - 0.5, "vmax": finite.max() + 0.5}
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap,
                      interpolation="nearest", **kwargs)
    ax.set_xticks(range(n_cols), hm.columns, rotation=30 if n_cols > 2 else 0, ha="right"
                  if n_cols > 2 else "center", fontsize=8)
    ax.set_yticks(range(n_rows), hm.rows, fontsize=7 if n_rows > 30 else 8)
    ax.set_title(hm.title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.05)
    if n_rows * n_cols <= 400:
        for r in range(n_rows):
            for c in range(n_cols):
                if np.isfinite(data[r, c]):
                    level = float(image.norm(data[r, c]))
                    dark = abs(level - 0.5) > 0.3 if hm.file == "cosine.png" else level < 0.6
                    ax.text(c, r, format(data[r, c], hm.fmt), ha="center", va="center",
                            fontsize=7, color="white" if dark else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check_report_folder(folder: str) -> None:
    """Fail early (before any tensor is read) when ``folder`` cannot hold the report."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise MergeError(f"--out {folder} is a file; give a folder for the report")
    parent = os.path.dirname(os.path.abspath(folder))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise MergeError(f"--out {folder}: cannot create it ({parent} is not a writable "
                         "folder)")


def write_report(result: InspectResult, folder: str) -> ReportFiles:
    """Write ``inspect.json``, the heatmap PNGs and ``index.html`` into ``folder``."""
    check_report_folder(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        files = ReportFiles(folder, os.path.join(folder, "index.html"),
                            os.path.join(folder, "inspect.json"))
        with open(files.json, "w", encoding="utf-8") as f:
            f.write(result.to_json() + "\n")
        maps = heatmaps(result)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            files.note = ("PNG plots skipped: matplotlib is not installed "
                          "(pip install 'mergesmith[report]')")
        else:
            for hm in maps:
                path = os.path.join(folder, hm.file)
                _plot(hm, path)
                files.pngs.append(path)
        with open(files.html, "w", encoding="utf-8") as f:
            f.write(render_html(result, maps, files))
    except OSError as e:
        raise MergeIOError(f"cannot write the report to {folder}: {e.strerror or e}") from None
    return files


# ------------------------------------------------------------------ terminal summary


def _p(x: float | None, spec: str = ".1%") -> str:
    return "–" if x is None else format(x, spec)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(str(v).ljust(w) if c == 0 else str(v).rjust(w)
                         for c, (v, w) in enumerate(zip(r, widths))).rstrip()

    return [fmt(header), *(fmt(r) for r in rows)]


def notable_layers(result: InspectResult, top: int = 3) -> list[tuple[str, list[str]]]:
    """(what, ["label (value)", ...]) for the most remarkable layers."""
    out: list[tuple[str, list[str]]] = []
    k = len(result.names)
    layers = result.layers

    def pick(values: list[tuple[float, str]], reverse: bool) -> list[str]:
        values.sort(key=lambda v: v[0], reverse=reverse)
        return [label for _, label in values[:top]]

    if k >= 2:
        conf = [(c, f"{g.label} ({c:.1%})") for g in layers
                if (c := g.sums.sign_conflict()) is not None]
        if conf:
            out.append(("most sign conflict", pick(conf, True)))
        cos = [(c, f"{g.label} ({c:.3f})") for g in layers
               if (c := mean(g.sums.cosines())) is not None]
        if cos:
            out.append(("lowest mean cosine", pick(cos, False)))
    rel = [(r, f"{g.label} ({r:.3g}, {result.names[i]})") for g in layers
           for i, r in enumerate(g.sums.relative_norms()) if r is not None]
    if rel:
        out.append(("largest ‖τ‖/‖base‖", pick(rel, True)))
    ranks = [(r, f"{g.label} ({r:.1%}, {result.names[i]})") for g in layers
             for i, r in enumerate(g.median_relative_ranks()) if r is not None]
    if ranks:
        out.append(("lowest effective rank", pick(ranks, False)))
    return out


def render_summary(result: InspectResult) -> str:
    assert result.whole is not None
    w, s = result.whole, result.whole.sums
    k = len(result.names)
    sk = result.skipped
    n_skip = len(sk["shape_differs"]) + len(sk["missing_in_a_model"])
    extra = sum(sk["only_in_model"].values())
    lines = [f"base {result.base}; {k} model(s); {len(result.tensors)} tensors compared"
             + (f", {n_skip} skipped ({len(sk['shape_differs'])} with another shape, "
                f"{len(sk['missing_in_a_model'])} missing in a model)" if n_skip else "")
             + (f"; {extra} tensor(s) only in the models ignored" if extra else "")]
    cos_with = []
    for i in range(k):
        others = [s.cosine(min(i, j), max(i, j)) for j in range(k) if j != i]
        cos_with.append(mean(others))
    disagree = s.sign_disagreement()
    ranks, rel_ranks = w.median_ranks(), w.median_relative_ranks()
    rows = []
    for i, name in enumerate(result.names):
        rank_text = "–" if ranks[i] is None else f"{ranks[i]:.1f} ({rel_ranks[i]:.0%})"
        rows.append([name, f"{s.norms()[i]:.4g}", _p(s.relative_norms()[i], ".4f"),
                     _p(cos_with[i], ".3f"), _p(disagree[i]), _p(s.sparsity()[i]), rank_text])
    lines += _table(["model", "‖τ‖", "‖τ‖/‖base‖", "mean cos", "sign disagr.", "sparsity",
                     "eff. rank (median)"], rows)
    if k >= 2:
        pair_rows = [[p, _p(c, ".3f")] for p, c in zip(result.pair_names, s.cosines())]
        lines += [""] + _table(["pair", "cosine"], pair_rows)
        lines.append(f"sign conflict: {_p(s.sign_conflict())} of the entries changed by ≥2 "
                     f"models ({_p(s.overlap())} of all entries; chance level "
                     f"{_p(s.sign_conflict_chance())})")
    counts = sk.get("rank", {})
    computed = counts.get("computed", 0)
    too_large = sum(v for key, v in counts.items() if key.startswith("larger than"))
    if result.options["rank"] and too_large:
        lines.append(f"effective rank: {computed} matrices computed, {too_large} skipped "
                     f"(smaller side > {result.options['rank_max_dim']}; raise --rank-max-dim, "
                     "slow on CPU, or use --device cuda)")
    notable = notable_layers(result)
    if notable:
        lines += ["", "notable layers:"]
        width = max(len(what) for what, _ in notable)
        lines += [f"  {what.ljust(width)}  {', '.join(items)}" for what, items in notable]
    lines += ["", "recommendations:"]
    lines += [f"  {r.line()}" for r in result.recommendations]
    return "\n".join(lines)


# ------------------------------------------------------------------ HTML

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
code{background:#f3f3f3;padding:0 3px}img{max-width:100%;border:1px solid #eee}
.plots{display:flex;flex-wrap:wrap;gap:1em}.note{color:#a60}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _list(values: Sequence[float | None], spec: str) -> list[str]:
    return [_p(v, spec) for v in values]


def render_html(result: InspectResult, maps: Sequence[Heatmap], files: ReportFiles) -> str:
    assert result.whole is not None
    w, s = result.whole, result.whole.sums
    k = len(result.names)
    parts = [("<!doctype html><html><head><meta charset='utf-8'><title>mergesmith inspect"
              f"</title><style>{_CSS}</style></head><body>"),
             "<h1>mergesmith inspect</h1>",
             f"<p>base <code>{_e(result.base)}</code>; models "
             + ", ".join(f"<code>{_e(n)}</code> (<code>{_e(r)}</code>)"
                         for n, r in zip(result.names, result.models))
             + f"; {len(result.tensors)} tensors compared.</p>"]
    parts.append("<h2>Recommendations</h2><ul>" + "".join(
        f"<li><b>{_e(', '.join(r.methods) or 'hint')}</b>: {_e(r.reason)}</li>"
        for r in result.recommendations) + "</ul>")
    parts.append("<h2>Whole model</h2>")
    ranks, rel = w.median_ranks(), w.median_relative_ranks()
    rows = [[n, f"{s.norms()[i]:.6g}", _p(s.relative_norms()[i], ".5f"),
             _p(s.sparsity()[i]), _p(s.sign_disagreement()[i]), _p(ranks[i], ".2f"),
             _p(rel[i])] for i, n in enumerate(result.names)]
    parts.append(_html_table(["model", "‖τ‖", "‖τ‖/‖base‖", "sparsity", "sign disagreement",
                              "eff. rank (median)", "eff. rank / size"], rows))
    if k >= 2:
        parts.append(_html_table(["pair", "cosine"],
                                 [[p, _p(c, ".4f")] for p, c in
                                  zip(result.pair_names, s.cosines())]))
        parts.append(f"<p>sign conflict: {_e(_p(s.sign_conflict()))} of the entries changed "
                     f"by ≥2 models ({_e(_p(s.overlap()))} of all entries; chance level "
                     f"{_e(_p(s.sign_conflict_chance()))}).</p>")
    notable = notable_layers(result)
    if notable:
        parts.append("<h3>Notable layers</h3><ul>" + "".join(
            f"<li>{_e(what)}: {_e(', '.join(items))}</li>" for what, items in notable)
            + "</ul>")
    sk = result.skipped
    shapes = ", ".join(sk["shape_differs"][:5]) + (" ..." if len(sk["shape_differs"]) > 5 else "")
    only = ", ".join(f"{n} {sk['only_in_model'].get(r, 0)}"
                     for n, r in zip(result.names, result.models))
    ranks_done = ", ".join(f"{why} {n}" for why, n in sk.get("rank", {}).items())
    parts.append(f"<p>skipped: {len(sk['shape_differs'])} tensor(s) with another shape"
                 f"{' (' + _e(shapes) + ')' if shapes else ''}; "
                 f"{len(sk['missing_in_a_model'])} missing in a model; "
                 f"{sk['not_floating_point']} not floating point. Tensors only in a model: "
                 f"{_e(only)}. Effective rank: {_e(ranks_done)}.</p>")
    parts.append("<h2>Plots</h2>")
    if files.note:
        parts.append(f"<p class='note'>{_e(files.note)}</p>")
    else:
        parts.append("<div class='plots'>")
        for hm in maps:
            path = os.path.join(files.folder, hm.file)
            with open(path, "rb") as f:
                data = base64.b64encode(f.read()).decode("ascii")
            parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{_e(hm.file)}' "
                         f"title='{_e(hm.title)}'><figcaption><a href='{_e(hm.file)}'>"
                         f"{_e(hm.file)}</a>: {_e(hm.title)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("<h2>Per layer</h2>")
    header = ["layer", "tensors"]
    header += [f"‖τ‖/‖base‖ {n}" for n in result.names]
    header += [f"cos {p}" for p in result.pair_names]
    header += ["sign conflict"] if k >= 2 else []
    header += [f"sparsity {n}" for n in result.names]
    header += [f"eff. rank {n}" for n in result.names]
    rows = []
    for g in result.layers:
        gs = g.sums
        rows.append([g.label, g.tensors, *_list(gs.relative_norms(), ".4g"),
                     *_list(gs.cosines(), ".3f"),
                     *([_p(gs.sign_conflict())] if k >= 2 else []),
                     *_list(gs.sparsity(), ".1%"), *_list(g.median_ranks(), ".1f")])
    parts.append(_html_table(header, rows))
    parts.append("<h2>Per tensor</h2>")
    header = ["tensor", "shape"] + [f"‖τ‖ {n}" for n in result.names]
    header += [f"cos {p}" for p in result.pair_names]
    header += ["sign conflict"] if k >= 2 else []
    header += [f"sparsity {n}" for n in result.names]
    header += [f"eff. rank {n}" for n in result.names]
    rows = []
    for t in result.tensors:
        ts = t.sums
        rows.append([t.name, "×".join(map(str, t.shape)), *_list(ts.norms(), ".4g"),
                     *_list(ts.cosines(), ".3f"),
                     *([_p(ts.sign_conflict())] if k >= 2 else []),
                     *_list(ts.sparsity(), ".1%"),
                     *(_p(r, ".1f") if r is not None else t.rank_note for r in t.ranks)])
    parts.append(_html_table(header, rows))
    parts.append("<h2>Definitions</h2><ul>" + "".join(
        f"<li><b>{_e(key)}</b>: {_e(text)}</li>" for key, text in DEFINITIONS.items())
        + f"<li>options: {_e(result.options)}</li></ul>")
    parts.append(f"<p>All numbers: <a href='inspect.json'>inspect.json</a>. Mean cosine "
                 f"over pairs: {_e(_p(mean(s.cosines()), '.4f'))}; "
                 f"{len(pairs(k))} pair(s).</p></body></html>\n")
    return "\n".join(parts)

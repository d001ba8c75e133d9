"""A search space: a recipe (one or more YAML documents) whose numeric parameters may be
ranges, plus a ``search:`` block.

Ranges are written where a number may stand under a ``parameters:`` mapping (top-level,
per model, per slice source, per module), including the elements of a gradient list and
the ``value`` of a filter-style entry::

    {range: [lo, hi]}                 a float between lo and hi
    {range: [lo, hi], log: true}      sampled on a log scale (lo > 0)
    {range: [lo, hi], int: true}      an integer between lo and hi
    {choices: [a, b, c]}              one of the listed values
    ... name: NAME                    the same NAME in several places: one shared value

Each range is a *dimension* named after where it stands (``models[0].parameters.weight``,
``parameters.t[1]``; with several documents prefixed by the stage's ``name:`` or the
document number) unless it has a ``name:``. Filling the space puts one value per
dimension in place and gives concrete YAML documents, each substituted on its own, so a
multi-document (multi-stage) space is filled document by document.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import MergeError, did_you_mean

SPEC_KEYS = {"range", "choices", "log", "int", "name"}
SEARCH_KEYS = ("objective", "direction", "budget", "algorithm", "seed", "workers", "batch")
ALGORITHMS = ("cmaes", "random", "tpe")
DIRECTIONS = ("maximize", "minimize")
NON_NUMERIC = {"merge_method", "dtype", "out_dtype", "model", "base_model", "tokenizer_source",
               "tokenizer", "chat_template", "name", "layer_range", "filter", "output",
               "models", "slices", "sources", "modules", "seed", "output_rank", "evaluate"}
"""Keys whose value is never a merge parameter (a range there is an error)."""


@dataclass
class Dimension:
    """One searched value: its name, kind and bounds, and the places it fills."""

    name: str
    kind: str  # "float", "int" or "choice"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    places: list[tuple[int, tuple[Any, ...]]] = field(default_factory=list)
    """(document index, path inside the document)."""

    def midpoint(self) -> Any:
        if self.kind == "choice":
            return self.choices[0]
        assert self.low is not None and self.high is not None
        mid = (math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2)
        return int(round(mid)) if self.kind == "int" else mid

    def describe(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(map(repr, self.choices))
        text = f"{'integer ' if self.kind == 'int' else ''}{self.low:g} … {self.high:g}"
        return text + (" (log scale)" if self.log else "")

    def same_spec(self, other: Dimension) -> bool:
        return (self.kind, self.low, self.high, self.log, self.choices) == (
            other.kind, other.low, other.high, other.log, other.choices)


@dataclass
class Objective:
    """What a trial's merged model is scored with."""

    kind: str  # "python", "text" or "tasks"
    spec: dict[str, Any]
    direction: str
    label: str


@dataclass
class Space:
    """A parsed search space."""

    documents: list[dict[str, Any]]
    dimensions: list[Dimension]
    objective: Objective
    budget: int
    algorithm: str
    seed: int
    workers: int
    batch: int
    text: str
    source: str

    def fill(self, values: dict[str, Any]) -> list[dict[str, Any]]:
        """The concrete documents for one value per dimension."""
        docs = copy.deepcopy(self.documents)
        for dim in self.dimensions:
            value = values[dim.name]
            for index, path in dim.places:
                node: Any = docs[index]
                for key in path[:-1]:
                    node = node[key]
                node[path[-1]] = value
        return docs

    def recipe_text(self, values: dict[str, Any]) -> str:
        """The concrete recipe as YAML text (documents separated by ``---``)."""
        return dump_documents(self.fill(values))

    def midpoint(self) -> dict[str, Any]:
        return {d.name: d.midpoint() for d in self.dimensions}

    def corner(self, high: bool) -> dict[str, Any]:
        """Every range at its low (or high) end; choices at their first (or last) value."""
        return {d.name: (d.choices[-1 if high else 0] if d.kind == "choice"
                         else d.high if high else d.low) for d in self.dimensions}

    def places(self, values: dict[str, Any]) -> dict[str, Any]:
        """Where each value goes: ``{"models[1].parameters.density": 0.4, ...}`` (a
        shared ``name:`` fills several places)."""
        out = {}
        for d in self.dimensions:
            for index, path in d.places:
                prefix = ""
                if len(self.documents) > 1:
                    name = self.documents[index].get("name")
                    prefix = f"{name}:" if isinstance(name, str) else f"document{index + 1}:"
                out[prefix + _path_text(path)] = values[d.name]
        return out


def dump_documents(docs: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.safe_dump(d, sort_keys=False, allow_unicode=True) for d in docs)


def _path_text(path: tuple[Any, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _dimension(spec: dict[str, Any], where: str) -> Dimension:
    unknown = set(map(str, spec)) - SPEC_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise MergeError(f"{where}: unknown key '{key}' in a range (use range, choices, log, "
                         f"int, name).{did_you_mean(key, SPEC_KEYS)}")
    name = spec.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise MergeError(f"{where}.name: must be a non-empty string")
    if ("range" in spec) == ("choices" in spec):
        raise MergeError(f"{where}: give either 'range: [lo, hi]' or 'choices: [...]'")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise MergeError(f"{where}.choices: must be a non-empty list of values")
        for c in choices:
            if not (_is_number(c) or isinstance(c, (bool, str))):
                raise MergeError(f"{where}.choices: {c!r} is not a number, true/false or "
                                 "a string")
        for key in ("log", "int"):
            if key in spec:
                raise MergeError(f"{where}.{key}: applies to 'range', not 'choices'")
        return Dimension(name or where, "choice", choices=tuple(choices))
    r = spec["range"]
    if not isinstance(r, list) or len(r) != 2 or not all(map(_is_number, r)):
        raise MergeError(f"{where}.range: must be two numbers [lo, hi], got {r!r}")
    lo, hi = r
    if lo > hi:
        raise MergeError(f"{where}.range: lo {lo} is greater than hi {hi}; write "
                         f"[{hi}, {lo}]")
    for key in ("log", "int"):
        if key in spec and not isinstance(spec[key], bool):
            raise MergeError(f"{where}.{key}: must be true or false")
    log, as_int = bool(spec.get("log")), bool(spec.get("int"))
    if log and lo <= 0:
        raise MergeError(f"{where}.range: 'log: true' needs lo > 0 (got {lo}); raise lo or "
                         "remove 'log'")
    if as_int and (lo != int(lo) or hi != int(hi)):
        raise MergeError(f"{where}.range: 'int: true' needs integer bounds (got {r!r})")
    kind = "int" if as_int else "float"
    return Dimension(name or where, kind, float(lo) if not as_int else int(lo),
                     float(hi) if not as_int else int(hi), log)


def _is_spec(node: Any) -> bool:
    return isinstance(node, dict) and ("range" in node or "choices" in node)


def _collect(node: Any, path: tuple[Any, ...], doc: int, prefix: str, in_params: bool,
             found: list[Dimension]) -> None:
    if _is_spec(node):
        where = prefix + _path_text(path)
        if not in_params:
            key = next((p for p in reversed(path) if isinstance(p, str)), "the recipe")
            raise MergeError(f"{where}: a range or choices can only stand for a number under "
                             f"'parameters:', and '{key}' is not a merge parameter; write one "
                             "value there")
        dim = _dimension(node, where)
        dim.places.append((doc, path))
        found.append(dim)
        return
    if isinstance(node, dict):
        for key, value in node.items():
            if in_params and key == "filter" and _is_spec(value):
                raise MergeError(f"{prefix}{_path_text((*path, key))}: a filter is a tensor "
                                 "name, not a number; write one value there")
            inside = in_params or key == "parameters"
            if not inside and key in NON_NUMERIC and _is_spec(value):
                raise MergeError(f"{prefix}{_path_text((*path, key))}: '{key}' is not a "
                                 "numeric parameter, so it cannot be a range or choices; "
                                 "write one value there")
            _collect(value, (*path, key), doc, prefix, inside, found)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _collect(value, (*path, i), doc, prefix, in_params, found)


def _objective(raw: Any, where: str, base_dir: str) -> tuple[str, dict[str, Any], str]:
    """(kind, spec, default direction)."""
    if not isinstance(raw, dict) or not raw:
        raise MergeError(f"{where}: give {{python: FILE.py:FUNCTION}}, {{text: FILE}} (or "
                         "jsonl) for perplexity or KL, or {tasks: [...], metric: NAME}")
    spec = dict(raw)
    if "python" in spec:
        extra = set(spec) - {"python"}
        if extra:
            raise MergeError(f"{where}.{sorted(extra)[0]}: a python objective takes only "
                             "'python: FILE.py:FUNCTION'")
        target = spec["python"]
        if not isinstance(target, str) or ":" not in target:
            raise MergeError(f"{where}.python: write FILE.py:FUNCTION (got {target!r})")
        file, _, function = target.rpartition(":")
        path = os.path.abspath(os.path.join(base_dir, file))
        if not os.path.isfile(path):
            raise MergeError(f"{where}.python: no file {file} (paths are resolved from the "
                             "current folder)")
        if not function.isidentifier():
            raise MergeError(f"{where}.python: {function!r} is not a function name")
        return "python", {"file": path, "function": function}, "maximize"
    if "tasks" in spec:
        allowed = {"tasks", "metric", "limit", "include_path", "batch_size", "device",
                   "dtype", "lm_eval_args"}
        _unknown(spec, allowed, where)
        tasks = spec["tasks"]
        tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else tasks
        if not isinstance(tasks, list) or not tasks or not all(
                isinstance(t, str) and t for t in tasks):
            raise MergeError(f"{where}.tasks: a list of lm-eval task names")
        if not isinstance(spec.get("metric"), str):
            raise MergeError(f"{where}.metric: name the task metric to optimise (e.g. acc, "
                             "acc_norm, exact_match)")
        if spec.get("lm_eval_args") is not None and not isinstance(spec["lm_eval_args"], dict):
            raise MergeError(f"{where}.lm_eval_args: a mapping of lm_eval.simple_evaluate "
                             "arguments (e.g. num_fewshot: 5)")
        out = {**spec, "tasks": tasks}
        if out.get("include_path"):
            out["include_path"] = os.path.abspath(os.path.join(base_dir, out["include_path"]))
        return "tasks", out, "maximize"
    if "text" in spec or "jsonl" in spec:
        allowed = {"text", "jsonl", "field", "metric", "max_length", "max_tokens",
                   "batch_size", "device", "dtype"}
        _unknown(spec, allowed, where)
        metric = spec.get("metric", "perplexity")
        metrics = ("perplexity", "kl", "kl_reverse", "top1")
        if metric not in metrics:
            raise MergeError(f"{where}.metric: one of {', '.join(metrics)} (got {metric!r})"
                             + did_you_mean(str(metric), metrics))
        out = {**spec, "metric": metric}
        for key in ("text", "jsonl"):
            if out.get(key):
                p = os.path.abspath(os.path.join(base_dir, out[key]))
                if not os.path.isfile(p):
                    raise MergeError(f"{where}.{key}: no file {out[key]}")
                out[key] = p
        return "text", out, "maximize" if metric == "top1" else "minimize"
    raise MergeError(f"{where}: give 'python: FILE.py:FUNCTION', 'text:'/'jsonl:' (perplexity "
                     f"or KL) or 'tasks:' (lm-eval); got keys {', '.join(map(str, spec))}")


def _unknown(spec: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(map(str, spec)) - allowed)
    if extra:
        raise MergeError(f"{where}.{extra[0]}: unknown key (allowed: "
                         f"{', '.join(sorted(allowed))}).{did_you_mean(extra[0], allowed)}")


def _int(value: Any, where: str, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise MergeError(f"{where}: must be a whole number of at least {least} (got {value!r})")
    return value


def cmaes_popsize(n: int) -> int:
    """CMA-ES's default population for ``n`` dimensions (Hansen): 4 + ⌊3 ln n⌋."""
    return 4 + int(3 * math.log(max(1, n)))


def parse_space(text: str, source: str = "<space>", *, base_dir: str = ".",
                overrides: dict[str, Any] | None = None) -> Space:
    """Parse and validate a space (no model is opened; see :func:`check_space`)."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise MergeError(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not docs:
        raise MergeError(f"{source}: empty")
    if not all(isinstance(d, dict) for d in docs):
        raise MergeError(f"{source}: each YAML document must be a recipe mapping")
    blocks = [(i, d["search"]) for i, d in enumerate(docs) if "search" in d]
    if not blocks:
        raise MergeError(f"{source}: no 'search:' block; add one with at least "
                         "'objective: {python: FILE.py:FUNCTION}' and 'budget: N'")
    if len(blocks) > 1:
        raise MergeError(f"{source}: 'search:' appears in {len(blocks)} documents; write it "
                         "once")
    docs = [{k: v for k, v in d.items() if k != "search"} for d in docs]
    raw = blocks[0][1]
    if not isinstance(raw, dict):
        raise MergeError("search: must be a mapping (objective, direction, budget, ...)")
    raw = {**raw, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    for key in raw:
        if key not in SEARCH_KEYS:
            raise MergeError(f"search.{key}: unknown key (allowed: {', '.join(SEARCH_KEYS)})."
                             + did_you_mean(str(key), SEARCH_KEYS))
    if "objective" not in raw:
        raise MergeError("search.objective: missing; give {python: FILE.py:FUNCTION}, "
                         "{text: FILE} or {tasks: [...], metric: NAME}")
    kind, spec, default_direction = _objective(raw["objective"], "search.objective", base_dir)
    direction = raw.get("direction", default_direction)
    if direction not in DIRECTIONS:
        raise MergeError(f"search.direction: 'maximize' or 'minimize' (got {direction!r})")
    if "budget" not in raw:
        raise MergeError("search.budget: missing; the number of evaluations, e.g. budget: 40")
    budget = _int(raw["budget"], "search.budget", 1)
    algorithm = raw.get("algorithm", "cmaes")
    if algorithm not in ALGORITHMS:
        raise MergeError(f"search.algorithm: one of {', '.join(ALGORITHMS)} (got "
                         f"{algorithm!r}).{did_you_mean(str(algorithm), ALGORITHMS)}")
    seed = _int(raw.get("seed", 0), "search.seed", 0)
    workers = _int(raw.get("workers", 1), "search.workers", 1)

    dims: list[Dimension] = []
    for i, d in enumerate(docs):
        prefix = ""
        if len(docs) > 1:
            prefix = f"{d['name']}:" if isinstance(d.get("name"), str) else f"document{i + 1}:"
        _collect(d, (), i, prefix, False, dims)
    merged: dict[str, Dimension] = {}
    for dim in dims:
        if dim.name in merged:
            first = merged[dim.name]
            if not first.same_spec(dim):
                raise MergeError(f"{dim.name}: the name is used by two ranges that differ; "
                                 "give shared ranges the same bounds, or different names")
            first.places += dim.places
        else:
            merged[dim.name] = dim
    dimensions = list(merged.values())
    if not dimensions:
        raise MergeError(f"{source}: nothing to search; write a parameter as "
                         "{range: [lo, hi]} or {choices: [...]}")
    default_batch = cmaes_popsize(len(dimensions)) if algorithm == "cmaes" else 4
    # CMA-ES: a population of four at least (fewer: one parent, and its weights divide by 0)
    batch = _int(raw.get("batch", default_batch), "search.batch",
                 4 if algorithm == "cmaes" else 1)
    objective = Objective(kind, spec, direction, _objective_label(kind, spec))
    return Space(docs, dimensions, objective, budget, algorithm, seed, workers, batch, text,
                 source)


def _objective_label(kind: str, spec: dict[str, Any]) -> str:
    if kind == "python":
        return f"{os.path.basename(spec['file'])}:{spec['function']}"
    if kind == "tasks":
        return f"lm-eval {', '.join(spec['tasks'])} ({spec['metric']})"
    return f"{spec['metric']} on {os.path.basename(spec.get('text') or spec.get('jsonl'))}"


def load_space(path: str | os.PathLike, *, overrides: dict[str, Any] | None = None) -> Space:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise MergeError(f"cannot read the space {path}: {e.strerror}") from None
    return parse_space(text, path, base_dir=".", overrides=overrides)

"""One trial: merge a concrete recipe into a temporary folder, score it, clean up.

:func:`run_trial` is a plain function of plain values, so it runs the same in a thread of
this process and as a Ray task on another node.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

from ..errors import MergeError

_loaded: dict[tuple[str, str], Callable[[str], Any]] = {}


def load_function(file: str, function: str) -> Callable[[str], Any]:
    """``FUNCTION`` of the Python file ``file`` (imported once per process)."""
    key = (file, function)
    if key not in _loaded:
        name = f"mergesmith_objective_{abs(hash(file))}"
        spec = importlib.util.spec_from_file_location(name, file)
        if spec is None or spec.loader is None:
            raise MergeError(f"search.objective.python: cannot import {file}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # the user's file: any error is theirs
            del sys.modules[name]
            raise MergeError(f"search.objective.python: importing {file} failed: "
                             f"{type(e).__name__}: {e}") from None
        fn = getattr(module, function, None)
        if not callable(fn):
            raise MergeError(f"search.objective.python: {file} has no function {function!r}")
        _loaded[key] = fn
    return _loaded[key]


def score_model(folder: str, kind: str, spec: dict[str, Any],
                parents: list[tuple[str, str]]) -> float:
    """The objective's value for the merged model in ``folder``."""
    if kind == "python":
        return load_function(spec["file"], spec["function"])(folder)
    if kind == "text":
        from ..evaluate import EvalCache, Parent, evaluate

        metric = spec["metric"]
        report = evaluate(folder, text=spec.get("text"), jsonl=spec.get("jsonl"),
                          field_name=spec.get("field") or "text",
                          parents=[Parent(n, f) for n, f in parents] if metric != "perplexity"
                          else [], device=spec.get("device", "cpu"),
                          dtype=spec.get("dtype", "auto"),
                          batch_size=spec.get("batch_size") or 8,
                          max_length=spec.get("max_length"), max_tokens=spec.get("max_tokens"),
                          cache=EvalCache(enabled=False))
        if metric == "perplexity":
            value = report.model.perplexity
        else:
            values = [getattr(p, metric) for p in report.parents]
            if not values or any(v is None for v in values):
                raise MergeError(f"no {metric} against the parents (none could be evaluated)")
            value = sum(values) / len(values)
        assert value is not None
        return float(value)
    if kind == "tasks":
        import torch

        from ..devices import resolve_device
        from ..evaluate.lm_eval_tasks import evaluate_with_lm_eval

        dev = resolve_device(spec.get("device", "cpu"))
        dtype = spec.get("dtype", "float32")
        results = evaluate_with_lm_eval(
            folder, spec["tasks"], limit=spec.get("limit"),
            include_path=spec.get("include_path"), device=dev,
            dtype=getattr(torch, dtype) if isinstance(dtype, str) and hasattr(torch, dtype)
            else dtype, batch_size=spec.get("batch_size") or 8,
            extra=spec.get("lm_eval_args") or None)
        metric = spec["metric"]
        values = []
        for task in spec["tasks"]:
            if metric not in results.get(task, {}):
                have = ", ".join(sorted(results.get(task, {}))) or "none"
                raise MergeError(f"lm-eval task {task} has no metric {metric!r} (it has: "
                                 f"{have})")
            values.append(results[task][metric])
        return sum(values) / len(values)
    raise AssertionError(kind)


def run_trial(number: int, recipe_text: str, kind: str, spec: dict[str, Any],
              parents: list[tuple[str, str]], threads: int | None, tmp_root: str | None,
              cwd: str | None = None) -> dict[str, Any]:
    """Merge ``recipe_text`` into a temporary folder and score it: ``{"trial", "score",
    "seconds", "error"}`` (``error`` set and ``score`` None on a failure)."""
    import warnings

    import mergesmith

    start = time.perf_counter()
    here = os.getcwd()
    if cwd is not None and os.path.isdir(cwd):  # relative paths as the driver sees them
        os.chdir(cwd)
    if tmp_root is not None:
        os.makedirs(tmp_root, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f"trial-{number}-", dir=tmp_root)
    out = os.path.join(folder, "model")
    result: dict[str, Any] = {"trial": number, "score": None, "error": None}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mergesmith.run(recipe_text, out, threads=threads, evaluate=False,
                           write_model_card=False)
        try:
            value = score_model(out, kind, spec, parents)
        except Exception as e:
            raise _ObjectiveError(e) from e
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)  # a 0-d tensor or numpy number
            except (TypeError, ValueError):
                raise MergeError(f"the objective returned {type(value).__name__}, not a "
                                 "number") from None
        if not math.isfinite(value):
            raise MergeError(f"the objective returned {value}")
        result["score"] = float(value)
    except _ObjectiveError as e:
        err = e.__cause__
        result["error"] = f"objective: {type(err).__name__}: {str(err).strip()[:500]}"
        result["traceback"] = "".join(traceback.format_exception(err))[-2000:]
    except MergeError as e:
        result["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    except Exception as e:  # a bug or an odd input: recorded, the search goes on
        result["error"] = f"{type(e).__name__}: {str(e).strip()[:500]}"
        result["traceback"] = "".join(traceback.format_exception(e))[-2000:]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if cwd is not None:
            os.chdir(here)
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


class _ObjectiveError(Exception):
    """The objective raised (its exception is the cause)."""

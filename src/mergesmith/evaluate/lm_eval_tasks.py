"""Task scores through lm-evaluation-harness (``pip install 'mergesmith[eval]'``).

Tasks are lm-eval's built-in ones or YAML files in ``include_path`` (lm-eval's own format;
``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}`` reads local JSONL, so
nothing is downloaded). When every requested task is defined in ``include_path``,
lm-eval's thousands of built-in task files are not indexed (that takes ~20 s).

Each (model, task, limit) result is cached: the key is the model's fingerprint, the task
name, the lm-eval version, ``limit``, and the content of every file in ``include_path``
and of the local data files its YAMLs name — editing any of them re-runs the task.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import yaml

from ..errors import MergeError, did_you_mean
from ..hashing import file_sha256
from .cache import EvalCache, model_fingerprint

INSTALL_HINT = ("task evaluation needs lm-evaluation-harness: pip install 'mergesmith[eval]' "
                "(or pip install 'lm-eval>=0.4')")


def lm_eval_version() -> str | None:
    """The installed lm-eval version, or None."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return None
    try:
        return importlib.metadata.version("lm-eval")
    except importlib.metadata.PackageNotFoundError:
        return getattr(lm_eval, "__version__", "unknown")


def require_lm_eval() -> str:
    version = lm_eval_version()
    if version is None:
        raise MergeError(INSTALL_HINT)
    return version


class _AnyTagLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs, whose ``!function`` tags safe_load refuses."""


_AnyTagLoader.add_multi_constructor("", lambda loader, suffix, node: None)


def _yaml_files(include_path: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(include_path):
        dirs.sort()
        out += [os.path.join(root, f) for f in sorted(files) if f.endswith((".yaml", ".yml"))]
    return out


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_AnyTagLoader)  # noqa: S506 (a SafeLoader subclass)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def local_task_names(include_path: str | None) -> set[str]:
    """Task, group and tag names defined by the YAML files in ``include_path``."""
    if not include_path:
        return set()
    names: set[str] = set()
    for path in _yaml_files(include_path):
        data = _read_yaml(path)
        for key in ("task", "group", "tag"):
            value = data.get(key)
            values = value if isinstance(value, list) else [value]
            names |= {v for v in values if isinstance(v, str)}
    return names


def check_include_path(include_path: str | None, where: str = "--include-path") -> None:
    if include_path is not None and not os.path.isdir(include_path):
        raise MergeError(f"{where} {include_path}: not a folder (give the folder of your task "
                         f"YAML files; relative paths are resolved from {os.getcwd()})")


def task_manager(tasks: Sequence[str], include_path: str | None) -> Any:
    """lm-eval's TaskManager; without its built-in tasks when all of ``tasks`` are local."""
    from lm_eval.tasks import TaskManager

    local = set(tasks) <= local_task_names(include_path)
    return TaskManager(include_path=include_path, include_defaults=not local)


def check_tasks(tasks: Sequence[str], include_path: str | None,
                where: str = "--tasks") -> None:
    """lm-eval is installed, ``include_path`` exists and every task name is known."""
    require_lm_eval()
    check_include_path(include_path)
    if not tasks:
        return
    manager = _quiet(lambda: task_manager(tasks, include_path))
    known = set(manager.all_tasks)
    for t in tasks:
        if t not in known:
            place = f" or in {include_path}" if include_path else ""
            raise MergeError(f"{where}: unknown task '{t}' (not one of lm-eval's tasks{place})."
                             f"{did_you_mean(t, known)}")


def _quiet(fn: Any) -> Any:
    """lm-eval logs at INFO/WARNING on import and indexing; keep the screen for results."""
    import logging

    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return fn()
    finally:
        log.setLevel(level)


def _data_files(config: dict[str, Any]) -> list[str]:
    kwargs = config.get("dataset_kwargs")
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    values: list[Any] = []
    for v in (files.values() if isinstance(files, dict) else [files]):
        values += v if isinstance(v, list) else [v]
    return [v for v in values if isinstance(v, str)]


def config_hash(include_path: str | None) -> str:
    """Content hash of ``include_path``'s files and the local data files its YAMLs name."""
    h = hashlib.sha256()
    if not include_path:
        return "builtin"
    paths: list[str] = []
    for root, dirs, files in os.walk(include_path):
        dirs.sort()
        paths += [os.path.join(root, f) for f in sorted(files)]
    for path in _yaml_files(include_path):
        for data_file in _data_files(_read_yaml(path)):
            if os.path.isfile(data_file) and data_file not in paths:
                paths.append(data_file)
    for path in paths:
        try:
            digest = file_sha256(path)
        except OSError:
            digest = "unreadable"
        h.update(f"{os.path.relpath(path, include_path)}\0{digest}\n".encode())
    return h.hexdigest()


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}`` → ``{"acc": 0.5}``."""
    out = {}
    for key, value in result.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, _, flt = key.partition(",")
        if metric.endswith("_stderr") or metric in ("sample_len", "sample_count"):
            continue
        out[metric if flt in ("", "none") else f"{metric},{flt}"] = float(value)
    return out


def run_tasks(folder: str, tasks: Sequence[str], *, limit: int | None,
              include_path: str | None, device: torch.device, dtype: torch.dtype | str,
              batch_size: int, cache: EvalCache, tokenizer: str | None = None,
              progress: bool = False) -> dict[str, dict[str, float]]:
    """Scores of the model in ``folder`` on ``tasks``: cached ones read, others run (all
    in one lm-eval call)."""
    version = require_lm_eval()
    fp = model_fingerprint(folder)
    if tokenizer is not None and os.path.normpath(tokenizer) != os.path.normpath(folder):
        fp += "+tokenizer:" + model_fingerprint(tokenizer)
    conf = config_hash(include_path)

    def key(task: str) -> dict[str, Any]:
        return {"kind": "task", "model": fp, "task": task, "limit": limit, "config": conf,
                "lm_eval": version, "dtype": str(dtype).removeprefix("torch.")}

    scores: dict[str, dict[str, float]] = {}
    missing = []
    for t in tasks:
        hit = cache.get(key(t))
        if hit is not None:
            scores[t] = hit
        else:
            missing.append(t)
    if missing:
        results = evaluate_with_lm_eval(folder, missing, limit=limit, include_path=include_path,
                                        device=device, dtype=dtype, batch_size=batch_size,
                                        tokenizer=tokenizer, progress=progress)
        for t in missing:
            scores[t] = results.get(t, {})
            cache.put(key(t), scores[t])
    return {t: scores[t] for t in tasks}


@contextlib.contextmanager
def _without_env_report() -> Iterator[None]:
    """simple_evaluate ends by recording the environment (torch's collect_env: ~2.5 s per
    call) and the git hash of the current folder (printing "fatal: not a git repository"
    outside one); neither is part of the scores, so both are skipped when lm-eval has
    them where 0.4.x has them."""
    import lm_eval.evaluator as ev

    saved = {name: getattr(ev, name) for name in ("add_env_info", "get_git_commit_hash")
             if hasattr(ev, name)}
    replacements = {"add_env_info": lambda storage: None, "get_git_commit_hash": lambda: None}
    for name in saved:
        setattr(ev, name, replacements[name])
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(ev, name, fn)


def evaluate_with_lm_eval(folder: str, tasks: Sequence[str], *, limit: int | None,
                          include_path: str | None, device: torch.device,
                          dtype: torch.dtype | str, batch_size: int,
                          tokenizer: str | None = None,
                          progress: bool = False,
                          extra: dict[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """One ``lm_eval.simple_evaluate`` call; returns each task's metrics. ``extra``: more
    ``simple_evaluate`` arguments (``num_fewshot``, ``gen_kwargs``, ...), passed through."""
    import io
    import logging

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = _quiet(lambda: task_manager(tasks, include_path))
    dtype_name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.WARNING if progress else logging.ERROR)
    # lm-eval prints progress bars and notes; shown only with progress
    sink = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    try:
        with sink, _without_env_report():
            lm = HFLM(pretrained=folder, tokenizer=tokenizer or folder, device=str(device),
                      dtype=dtype_name, batch_size=batch_size, trust_remote_code=False)
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit,
                                          task_manager=manager, log_samples=False,
                                          **(extra or {}))
    except MergeError:
        raise
    except Exception as e:  # lm-eval raises many types; all mean the task could not run
        text = (str(e).strip().splitlines() or [""])[0][:300]
        raise MergeError(f"lm-eval failed on {folder} (tasks {', '.join(tasks)}): "
                         f"{type(e).__name__}: {text}") from None
    finally:
        log.setLevel(level)
    results = (out or {}).get("results", {})
    groups = (out or {}).get("groups", {})
    return {t: metrics_of(results.get(t) or groups.get(t) or {}) for t in tasks}

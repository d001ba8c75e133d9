"""The search loop: ask the sampler for a fixed batch of candidates, merge and score them
(in parallel: threads here, or Ray tasks), record each trial, tell the results in trial
order; then write the best model.

Determinism: the candidates depend only on the space, the seed and the results told so
far, never on the number of workers or on which finished first — the batch size is fixed
by the space (``search.batch``, by default CMA-ES's population), and the results of a
batch are told in trial order once the whole batch is done. ``--resume`` replays the
recorded trials the same way (the sampler asks the same candidates; the recorded scores
are told instead of merging again), so an interrupted search ends with the same trials as
an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from ..errors import MergeError
from .space import Space, load_space

TRIALS = "trials.jsonl"


@dataclass
class SearchResult:
    """What a search did: every trial (recorded and new), the best one, where it is."""

    out: str
    space: Space
    records: list[dict[str, Any]]
    best: dict[str, Any]
    new_trials: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise MergeError("mergesmith search needs optuna (and cmaes for CMA-ES): "
                         "pip install 'mergesmith[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def make_sampler(space: Space) -> tuple[Any, list[str]]:
    optuna = _import_optuna()
    notes = []
    if space.algorithm == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise MergeError("search.algorithm: cmaes needs the cmaes package: pip install "
                             "'mergesmith[search]' (or choose 'tpe' or 'random')") from None
        if any(d.kind == "choice" for d in space.dimensions):
            notes.append("CMA-ES samples the 'choices' dimensions at random (it handles only "
                         "numeric ranges)")
        sampler = optuna.samplers.CmaEsSampler(seed=space.seed, popsize=space.batch,
                                               n_startup_trials=0,
                                               warn_independent_sampling=False)
    elif space.algorithm == "tpe":
        sampler = optuna.samplers.TPESampler(seed=space.seed)
    else:
        sampler = optuna.samplers.RandomSampler(seed=space.seed)
    return sampler, notes


def distributions(space: Space) -> dict[str, Any]:
    optuna = _import_optuna()
    d = optuna.distributions
    out = {}
    for dim in space.dimensions:
        if dim.kind == "choice":
            out[dim.name] = d.CategoricalDistribution(list(dim.choices))
        elif dim.kind == "int":
            out[dim.name] = d.IntDistribution(int(dim.low), int(dim.high), log=dim.log)
        else:
            out[dim.name] = d.FloatDistribution(dim.low, dim.high, log=dim.log)
    return out


def check_space(space: Space) -> list[tuple[str, str]]:
    """Everything that can be checked before the first merge: the filled recipe passes
    ``mergesmith.check`` at the space's midpoint, the objective can be loaded. Returns the
    parents (name, folder) a KL objective compares with."""
    import mergesmith

    from .trial import load_function

    points = [("at the middle of every range", space.midpoint()),
              ("with every range at its low end", space.corner(False)),
              ("with every range at its high end", space.corner(True))]
    reports = []
    for what, values in points:  # the midpoint first: its error is the likeliest typo
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                reports.append(mergesmith.check(space.recipe_text(values)))
            except MergeError as e:  # line numbers of the filled text would mislead
                text = re.sub(r" \(<recipe>:\d+\)", "", str(e))
                raise MergeError(f"{space.source} (filled {what}): {text}") from None
    report = reports[0]
    obj = space.objective
    parents: list[tuple[str, str]] = []
    if obj.kind == "python":
        load_function(obj.spec["file"], obj.spec["function"])
    elif obj.kind == "tasks":
        from ..evaluate.lm_eval_tasks import check_tasks

        check_tasks(obj.spec["tasks"], obj.spec.get("include_path"),
                    where="search.objective.tasks")
    else:
        from ..evaluate.runner import read_texts, require_transformers

        require_transformers()
        try:
            read_texts(obj.spec.get("text"), obj.spec.get("jsonl"), obj.spec.get("field") or "text")
        except MergeError as e:
            raise MergeError(f"search.objective: {e}") from None
        if obj.spec["metric"] != "perplexity":
            from ..evaluate.after_merge import recipe_parents

            found, _ = recipe_parents(report.plan)
            if not found:
                raise MergeError(f"search.objective.metric: {obj.spec['metric']} compares "
                                 "with the recipe's input models, and none is a local model "
                                 "folder; use metric: perplexity")
            parents = [(p.name, p.folder) for p in found]
    return parents


def read_records(path: str) -> list[dict[str, Any]]:
    """The recorded trials; a line cut short by a kill is dropped (and the file rewritten
    without it, so that the next line starts clean)."""
    if not os.path.exists(path):
        return []
    good, bad = [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "trial" not in record:
                    raise ValueError
                good.append(record)
            except ValueError:
                bad = True
    if bad:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in good)
        os.replace(tmp, path)
    return good


def _settings(space: Space) -> dict[str, Any]:
    return {"algorithm": space.algorithm, "seed": space.seed, "batch": space.batch,
            "direction": space.objective.direction,
            "dimensions": [[d.name, d.describe()] for d in space.dimensions]}


def _prepare_out(space: Space, out: str, resume: bool) -> str:
    folder = os.path.join(out, "search")
    settings_path = os.path.join(folder, "settings.json")
    if os.path.exists(out) and not os.path.isdir(out):
        raise MergeError(f"{out} is a file; OUT must be a folder (new, or a search's with "
                         "--resume)")
    if resume and os.path.exists(settings_path):
        with open(settings_path, encoding="utf-8") as f:
            saved = json.load(f)
        now = _settings(space)
        for key in now:
            if saved.get(key) != now[key]:
                raise MergeError(f"--resume: the search in {out} was started with another "
                                 f"{key} ({saved.get(key)!r}, now {now[key]!r}); resume with "
                                 "the same space and seed, or search into a new folder")
    elif os.path.exists(out) and os.listdir(out) and not resume:
        what = ("holds a search; add --resume to continue it"
                if os.path.exists(settings_path) else "exists and is not empty")
        raise MergeError(f"{out} {what}, or choose another OUT folder")
    os.makedirs(folder, exist_ok=True)
    shutil.rmtree(os.path.join(folder, "tmp"), ignore_errors=True)  # a killed trial's merge
    with open(settings_path, "w", encoding="utf-8") as f:
        json.dump(_settings(space), f, indent=1)
    with open(os.path.join(folder, "space.yml"), "w", encoding="utf-8") as f:
        f.write(space.text)
    return folder


class _Local:
    """Trials in threads of this process."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers)

    def run(self, calls: list[tuple[Any, ...]], done: Callable[[dict[str, Any]], None]) -> None:
        from .trial import run_trial

        futures = {self.pool.submit(run_trial, *c) for c in calls}
        while futures:
            finished, futures = wait(futures, return_when=FIRST_COMPLETED)
            for f in sorted(finished, key=lambda f: f.result()["trial"]):
                done(f.result())

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Ray:
    """Trials as Ray tasks, at most ``workers`` at once; each merges on its own node."""

    def __init__(self, workers: int) -> None:
        from ..ray_executor import _import_ray
        from .trial import run_trial

        self.ray = _import_ray()
        self.workers = workers
        self.task = self.ray.remote(num_cpus=1, max_retries=0)(run_trial)

    def run(self, calls: list[tuple[Any, ...]], done: Callable[[dict[str, Any]], None]) -> None:
        pending = list(calls)
        running: list[Any] = []
        try:
            while pending or running:
                while pending and len(running) < self.workers:
                    running.append(self.task.remote(*pending.pop(0)))
                ready, running = self.ray.wait(running, num_returns=1)
                for ref in ready:
                    done(self.ray.get(ref))
        except BaseException:
            for ref in running:
                self.ray.cancel(ref, force=True)
            raise

    def close(self) -> None:
        pass


def search(space_path: str | os.PathLike, out: str | os.PathLike, *, resume: bool = False,
           ray: str | None = None, workers: int | None = None, budget: int | None = None,
           seed: int | None = None, threads: int | None = None,
           echo: Callable[[str, bool], None] | None = None) -> SearchResult:
    """Search the space in ``space_path`` and write the best model to ``out``.

    ``workers``, ``budget`` and ``seed`` override the space's ``search:`` block. ``ray``:
    a Ray address (``local`` starts Ray here) — each trial is a Ray task. ``echo(line,
    final)``, if given, receives the progress line after each trial (``final`` on the last
    one) and other notes."""
    from ..ray_executor import session

    space = load_space(space_path, overrides={"workers": workers, "budget": budget,
                                              "seed": seed})
    out = os.fspath(out)
    parents = check_space(space)  # before anything is written
    sampler, notes = make_sampler(space)
    folder = _prepare_out(space, out, resume)
    with session(ray):
        return _search(space, out, folder, sampler, notes, parents, ray, threads, echo)


def _search(space: Space, out: str, folder: str, sampler: Any, notes: list[str],
            parents: list[tuple[str, str]], ray: str | None, threads: int | None,
            echo: Callable[[str, bool], None] | None) -> SearchResult:
    optuna = _import_optuna()
    from optuna.trial import TrialState

    path = os.path.join(folder, TRIALS)
    recorded = {r["trial"]: r for r in read_records(path)}
    study = optuna.create_study(direction=space.objective.direction, sampler=sampler)
    dists = distributions(space)
    names = [d.name for d in space.dimensions]
    workers = space.workers
    per_trial = threads or max(1, (os.cpu_count() or 1) // (1 if ray else workers))
    runner: Any = _Ray(workers) if ray else _Local(workers)
    tmp_root = None if ray else os.path.join(os.path.abspath(folder), "tmp")
    cwd = os.getcwd() if ray else None  # a Ray task starts in the driver's folder
    records: list[dict[str, Any]] = []
    start, new = time.perf_counter(), 0
    for note in notes:
        if echo:
            echo(f"note: {note}", False)
    n = 0
    try:
        with open(path, "a", encoding="utf-8") as log:
            while n < space.budget:
                size = min(space.batch, space.budget - n)
                trials = [study.ask(dists) for _ in range(size)]
                batch = n // space.batch
                calls = []
                for t in trials:
                    params = {k: t.params[k] for k in names}
                    old = recorded.get(t.number)
                    if old is not None and old.get("params") != params:
                        raise MergeError(
                            f"--resume: recorded trial {t.number} had the parameters "
                            f"{old.get('params')}, the sampler now asks {params}; the space, "
                            "seed or algorithm changed (search into a new folder)")
                    if old is None:
                        calls.append((t.number, space.recipe_text(params),
                                      space.objective.kind, space.objective.spec, parents,
                                      per_trial, tmp_root, cwd))
                results: dict[int, dict[str, Any]] = {}

                def done(result: dict[str, Any], batch: int = batch) -> None:
                    nonlocal new
                    t = trials[result["trial"] - n]
                    record = {"trial": t.number, "batch": batch,
                              "params": {k: t.params[k] for k in names},
                              "values": space.places({k: t.params[k] for k in names}),
                              "state": "complete" if result["error"] is None else "failed",
                              "score": result["score"], "seconds": result["seconds"],
                              "error": result["error"]}
                    if "traceback" in result:
                        record["traceback"] = result["traceback"]
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    os.fsync(log.fileno())
                    results[t.number] = record
                    new += 1
                    if echo:
                        echo(_progress_line(space, [*records, *results.values()], recorded,
                                            new, time.perf_counter() - start, workers), False)

                if calls:
                    runner.run(calls, done)
                for t in trials:  # told in trial order: the same sampler state every time
                    record = recorded.get(t.number) or results[t.number]
                    records.append(record)
                    if record["state"] == "complete":
                        study.tell(t, record["score"])
                    else:
                        study.tell(t, state=TrialState.FAIL)
                n += size
    finally:
        runner.close()
    shutil.rmtree(os.path.join(folder, "tmp"), ignore_errors=True)
    seconds = time.perf_counter() - start
    ok = [r for r in records if r["state"] == "complete"]
    if not ok:
        first = next((r["error"] for r in records if r.get("error")), "unknown")
        raise MergeError(f"every trial failed ({len(records)}); the first error: {first} "
                         f"(all of them in {path})")
    sign = 1 if space.objective.direction == "maximize" else -1
    best = max(ok, key=lambda r: (sign * r["score"], -r["trial"]))
    result = SearchResult(out, space, records, best, new, seconds, notes)
    from .report import write_best

    write_best(result, threads)
    if echo:
        echo(_progress_line(space, records, {}, new, seconds, workers, done=True), True)
    return result


def _progress_line(space: Space, records: list[dict[str, Any]], recorded: dict[int, Any],
                   new: int, elapsed: float, workers: int, done: bool = False) -> str:
    allr = {r["trial"]: r for r in [*recorded.values(), *records]}
    count = len(allr)
    ok = [r for r in allr.values() if r["state"] == "complete"]
    failed = count - len(ok)
    sign = 1 if space.objective.direction == "maximize" else -1
    text = f"trial {count}/{space.budget}"
    if ok:
        b = max(ok, key=lambda r: (sign * r["score"], -r["trial"]))
        text += f" · best {b['score']:.6g} (trial {b['trial']})"
    if failed:
        text += f" · {failed} failed"
    if done:
        return text + f" · {new} evaluated in {_duration(elapsed)}"
    if new:
        left = space.budget - count
        text += f" · ETA {_duration(elapsed / new * left)}"
    return text


def _duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"

"""--memory-limit: the budget it leaves, chunking under it, and what check says."""

from __future__ import annotations

import pytest
import torch
from conftest import LLAMA, load_model, random_tensors, recipe_file, write_model
from test_cli import assert_user_error, invoke

import mergesmith
import mergesmith.execute as ex
import mergesmith.memory as mem
from mergesmith import MergeError

MB = 1024 * 1024


def test_budget_is_what_the_limit_leaves():
    assert mem.data_budget(None) == mem.MEMORY_BUDGET
    assert mem.data_budget(1000 * MB, resident=300 * MB) == int(1000 * MB * 0.9) - 300 * MB
    with pytest.raises(MergeError, match="use at least"):
        mem.data_budget(320 * MB, resident=300 * MB)


def test_chunks_shrink_only_under_tight_limits(monkeypatch):
    assert ex.chunk_elements_for(None) == ex.CHUNK_ELEMENTS
    assert ex.chunk_elements_for(8 * 1024 * MB) == ex.CHUNK_ELEMENTS
    assert ex.chunk_elements_for(64 * MB) == 64 * MB // 256
    assert ex.chunk_elements_for(1 * MB) == 64 * 1024


@pytest.fixture
def models(tmp_path):
    base = random_tensors(LLAMA, 0)
    return {"base": write_model(tmp_path / "base", base),
            "a": write_model(tmp_path / "a", random_tensors(LLAMA, 1, base)),
            "b": write_model(tmp_path / "b", random_tensors(LLAMA, 2, base))}


def _recipe(tmp_path, models, method="task_arithmetic", extra=""):
    return recipe_file(tmp_path, f"""merge_method: {method}
base_model: {models['base']}
models:
  - model: {models['a']}
    parameters: {{weight: 0.7{extra}}}
  - model: {models['b']}
    parameters: {{weight: 0.4{extra}}}
""")


@pytest.mark.parametrize("method,extra", [("task_arithmetic", ""), ("ties", ", density: 0.5")])
def test_same_bytes_under_a_tight_limit(tmp_path, models, monkeypatch, items_in_flight,
                                        method, extra):
    """A limit that leaves room for only a few small items: items wait for each other or
    run alone, chunks get smaller, and the output does not change."""
    recipe = _recipe(tmp_path, models, method, extra)
    mergesmith.run(recipe, tmp_path / "free", threads=3)
    peak = items_in_flight
    peak[0] = 0
    monkeypatch.setattr(mem, "resident_bytes", lambda: 0)
    monkeypatch.setattr(mem, "MIN_DATA_BUDGET", 1)
    monkeypatch.setattr(ex, "CHUNK_ELEMENTS", 4096)
    limit = 2000  # bytes: every item is larger, so each runs alone
    mergesmith.run(recipe, tmp_path / "tight", threads=3, memory_limit=limit)
    assert peak[0] == 1
    a, b = load_model(tmp_path / "free"), load_model(tmp_path / "tight")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_cli_limit_too_small_is_a_user_error(tmp_path, models):
    out = tmp_path / "out"
    assert_user_error(invoke("run", str(_recipe(tmp_path, models)), str(out),
                             "--memory-limit", "10M"), "--memory-limit", "use at least", out=out)
    assert_user_error(invoke("run", str(_recipe(tmp_path, models)), str(out),
                             "--memory-limit", "lots"), "--memory-limit", out=out)


def test_check_reports_limit_and_tensors_that_cannot_fit(tmp_path, models, monkeypatch):
    monkeypatch.setattr(mem, "MIN_DATA_BUDGET", 1)
    monkeypatch.setattr(mem, "resident_bytes", lambda: 0)
    ties = _recipe(tmp_path, models, "ties", ", density: 0.5")
    report = mergesmith.check(ties, memory_limit=4000, threads=2)
    text = report.summary()
    assert "--memory-limit" in text and "cannot hold" in text and "ties needs whole" in text
    biggest = max(report.plan.tensors, key=lambda t: t.nbytes).name
    assert report.over_limit[0][0] == biggest
    # element-wise methods are chunked to fit: no warning
    ta = mergesmith.check(_recipe(tmp_path, models), memory_limit=10**9, threads=2)
    assert not ta.over_limit and "cannot hold" not in ta.summary()


def test_check_cli_shows_limit(tmp_path, models):
    result = invoke("check", str(_recipe(tmp_path, models)), "--memory-limit", "2GB")
    assert result.exit_code == 0, result.output
    assert "--memory-limit 2.00 GB" in result.output


def test_time_estimate_follows_methods_and_threads(tmp_path, models):
    from mergesmith.api import STARTUP_SECONDS, estimate_seconds

    ta = mergesmith.check(_recipe(tmp_path, models), threads=1)
    ties = mergesmith.check(_recipe(tmp_path, models, "ties", ", density: 0.5"), threads=1)
    assert STARTUP_SECONDS < ta.seconds < ties.seconds
    work = ties.seconds - STARTUP_SECONDS
    two = estimate_seconds(ties.plan, 2) - STARTUP_SECONDS
    import os

    assert two == pytest.approx(work / min(2, os.cpu_count() or 1))
    assert "time:" in ties.summary()

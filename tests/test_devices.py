"""Device handling, exercised on the CPU: device lists, the whole-item (accelerator) path
and the blocked CPU path give the same bytes."""

from __future__ import annotations

import pytest
import torch
from conftest import LLAMA, load_model, random_tensors, recipe_file, write_model

import mergesmith
import mergesmith.execute as ex
from mergesmith import MergeError


@pytest.fixture
def recipes(tmp_path):
    base = random_tensors(LLAMA, 0)
    paths = {"base": write_model(tmp_path / "base", base, dtype=torch.bfloat16),
             "a": write_model(tmp_path / "a", random_tensors(LLAMA, 1, base), dtype=torch.bfloat16),
             "b": write_model(tmp_path / "b", random_tensors(LLAMA, 2, base), dtype=torch.bfloat16)}

    def make(method, extra=""):
        base = "" if method == "linear" else f"base_model: {paths['base']}\n"
        return recipe_file(tmp_path, f"""merge_method: {method}
{base}models:
  - model: {paths['a']}
    parameters: {{weight: 0.6{extra}}}
  - model: {paths['b']}
    parameters: {{weight: 0.5{extra}}}
""", name=f"{method}.yml")
    return make


def _same(a, b):
    x, y = load_model(a), load_model(b)
    return x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x)


def test_device_lists():
    assert ex.resolve_devices("cpu") == [torch.device("cpu")]
    assert ex.resolve_devices("cpu, cpu") == [torch.device("cpu")] * 2
    if not torch.cuda.is_available():
        with pytest.raises(MergeError, match="no CUDA GPU"):
            ex.resolve_devices("0,1")


@pytest.mark.parametrize("method,extra", [("task_arithmetic", ""), ("linear", ""),
                                          ("ties", ", density: 0.5"),
                                          ("dare_ties", ", density: 0.5")])
def test_several_devices_and_the_accelerator_path_agree(tmp_path, recipes, monkeypatch,
                                                        method, extra):
    recipe = recipes(method, extra)
    mergesmith.run(recipe, tmp_path / "one", threads=2, seed=3)
    mergesmith.run(recipe, tmp_path / "two", threads=3, device="cpu,cpu", seed=3)
    monkeypatch.setattr(ex, "BLOCKED_ON_CPU", False)  # whole items, as on a GPU
    mergesmith.run(recipe, tmp_path / "whole", threads=2, seed=3)
    assert _same(tmp_path / "one", tmp_path / "two")
    assert _same(tmp_path / "one", tmp_path / "whole")


def test_workers_take_devices_in_turn():
    job = ex._Job.__new__(ex._Job)
    job.devices = [torch.device("cpu"), torch.device("meta")]
    import threading

    job._local, job._device_lock = threading.local(), threading.Lock()
    job._next_device = iter(range(100))
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(job.device.type)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == ["cpu", "cpu", "meta", "meta"]

"""`check`'s cost model for SVD-based methods: each method declares the dense linear
algebra it does (methods.linalg.DenseWork); the declaration must match what the method
really runs, and `check` must report it and add it to its time estimate."""

from __future__ import annotations

import pytest
import torch
from conftest import LLAMA, random_tensors, recipe_file, write_model

import mergesmith
from mergesmith import merge_tensors
from mergesmith.api import STARTUP_SECONDS
from mergesmith.methods import get_method
from mergesmith.methods.contract import bind_mapping
from mergesmith.methods.linalg import NO_WORK, svd_work, top_svd_work

CASES = [
    ("iso_c", {}),
    ("iso_cts", {}),
    ("iso_cts", {"randomized_svd": False}),
    ("iso_cts", {"randomized_svd": True}),
    ("tsv_m", {}),
    ("tsv_m", {"randomized_svd": False}),
    ("tsv_m", {"randomized_svd": True}),
    ("cart", {}),
    ("cart", {"randomized_svd": True}),
    ("cart", {"randomized_svd": False}),
    ("star", {}),
    ("wudi", {}),
    ("svc_ta", {}),
    ("task_arithmetic", {"svc": True, "weight": 0.5}),
    ("ties", {"svc": True, "density": 0.5, "weight": 0.5}),
]


@pytest.fixture
def factorizations(monkeypatch):
    """Count the LAPACK factorizations torch runs (SVD, symmetric eigh, QR, Cholesky)."""
    calls = {"n": 0}
    for name in ("svd", "eigh", "qr", "cholesky_ex"):
        original = getattr(torch.linalg, name)

        def counted(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, counted)
    return calls


def _inputs(shape, tasks=3):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=gen)
    return [base] + [base + 0.1 * torch.randn(*shape, generator=gen) for _ in range(tasks)]


@pytest.mark.parametrize("method,params", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("name,shape", [
    ("model.layers.0.mlp.up_proj.weight", (200, 120)),  # a weight matrix
    ("model.layers.0.self_attn.o_proj.weight", (96, 96)),
    ("model.embed_tokens.weight", (200, 120)),  # vocabulary-indexed: no SVD in most methods
    ("model.norm.weight", (120,)),
])
def test_declared_factorizations_are_the_ones_run(method, params, name, shape, factorizations):
    spec = get_method(method)
    tensors = _inputs(shape)
    shared = bind_mapping(spec, params, len(tensors), 0, tensor_name=name)[1].params
    declared = spec.cost.compute(name, shape, len(tensors) - 1, shared)
    factorizations["n"] = 0
    merge_tensors(tensors, method, params, base_index=0, name=name)
    assert declared.factorizations == factorizations["n"]
    assert (declared == NO_WORK) == (factorizations["n"] == 0)


def test_randomized_path_is_cheaper_only_where_it_is_taken():
    exact = svd_work(2048, 1024)
    assert top_svd_work(2048, 1024, 32, randomized=True).factorization_flops \
        < exact.factorization_flops / 5
    # k close to the full rank: top_svd falls back to the exact SVD, and so does the model
    assert top_svd_work(2048, 1024, 600, randomized=True) == exact


def test_methods_without_dense_work_declare_none():
    for method in ("task_arithmetic", "ties", "magmax", "consensus_ta", "pcb"):
        spec = get_method(method)
        if spec.cost.compute is not None:
            shared = bind_mapping(spec, {"weight": 1.0, "density": 0.5}, 3, 0)[1].params
            assert spec.cost.compute("model.layers.0.mlp.up_proj.weight", (64, 32), 2,
                                shared) == NO_WORK


@pytest.fixture
def models(tmp_path):
    base = random_tensors(LLAMA, 0)
    return [write_model(tmp_path / "base", base),
            write_model(tmp_path / "a", random_tensors(LLAMA, 1, base)),
            write_model(tmp_path / "b", random_tensors(LLAMA, 2, base))]


def _check(tmp_path, models, method, parameters=""):
    base, a, b = models
    weight = "" if method == "cart" else "\n    parameters: {weight: 0.5}"
    recipe = recipe_file(tmp_path, f"""merge_method: {method}
base_model: {base}
models:
  - model: {a}{weight}
  - model: {b}{weight}
{parameters}""")
    return mergesmith.check(recipe, threads=2)


def test_check_reports_and_charges_the_linear_algebra(tmp_path, models):
    ta = _check(tmp_path, models, "task_arithmetic")
    assert ta.dense == NO_WORK and "linear algebra" not in ta.summary()
    tsv = _check(tmp_path, models, "tsv_m")
    assert tsv.dense.factorizations > 0
    assert "linear algebra:" in tsv.summary() and "factorization(s)" in tsv.summary()
    assert tsv.seconds > STARTUP_SECONDS
    exact = _check(tmp_path, models, "cart", "parameters: {rank_fraction: 0.1}\n")
    fast = _check(tmp_path, models, "cart",
                  "parameters: {rank_fraction: 0.1, randomized_svd: true}\n")
    assert fast.dense.factorization_flops < exact.dense.factorization_flops
    calibrated = _check(tmp_path, models, "task_arithmetic", "parameters: {svc: true}\n")
    assert calibrated.dense.factorizations > 0 and calibrated.seconds > ta.seconds

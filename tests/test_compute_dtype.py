"""--compute-dtype float64 reaches every path of the engine.

On float32 inputs, the float64 run must equal the float64 formula rounded once to float32,
exactly; the float32 run rounds along the way and must not (otherwise the test could not
tell the two apart). Paths: element-wise blocks (linear: upcast inputs; task arithmetic:
raw inputs upcast by the method), whole items (the path accelerators use), vocabulary
rows (a tokenizer block), adapters and the in-memory API.
"""

from __future__ import annotations

import pytest
import torch
from conftest import LLAMA, load_model, random_tensors, recipe_file, write_model

import mergesmith
import mergesmith.execute as ex

WEIGHTS = (0.3, 0.7)


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("compute")
    base = random_tensors(LLAMA, 0)
    fts = [random_tensors(LLAMA, s, base, scale=0.3) for s in (1, 2)]
    paths = [write_model(root / n, t) for n, t in zip(("base", "a", "b"), [base, *fts])]
    return root, paths, [base, *fts]


def task_arithmetic64(base, a, b):
    """x₀ + Σ wᵢ(xᵢ − x₀) in float64 (the task vectors summed first, as documented)."""
    b64 = base.double()
    return (b64 + (WEIGHTS[0] * (a.double() - b64) + WEIGHTS[1] * (b.double() - b64))).float()


def linear64(base, a, b):
    # linear normalizes by the weight sum: weights 0.2, 0.3, 0.5 add up to 1
    return (0.2 * base.double() + 0.3 * a.double() + 0.5 * b.double()).float()


RECIPES = {
    "task_arithmetic": ("""merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.3}}}}
  - {{model: {b}, parameters: {{weight: 0.7}}}}
{extra}""", task_arithmetic64),
    "linear": ("""merge_method: linear
models:
  - {{model: {base}, parameters: {{weight: 0.2}}}}
  - {{model: {a}, parameters: {{weight: 0.3}}}}
  - {{model: {b}, parameters: {{weight: 0.5}}}}
{extra}""", linear64),
}


def merge(root, paths, method, compute, out, extra=""):
    text, _ = RECIPES[method]
    recipe = recipe_file(root, text.format(base=paths[0], a=paths[1], b=paths[2], extra=extra),
                         name=f"{out}.yml")
    mergesmith.run(recipe, root / out, compute_dtype=compute, overwrite=True)
    return load_model(root / out)


def assert_float64_exact_and_float32_not(root, paths, tensors, method, tag, extra=""):
    _, formula = RECIPES[method]
    expected = {n: formula(*(t[n] for t in tensors)) for n in tensors[0]}
    got64 = merge(root, paths, method, "float64", f"{tag}-64", extra)
    got32 = merge(root, paths, method, "float32", f"{tag}-32", extra)
    for name in expected:
        assert torch.equal(got64[name], expected[name]), name
    assert not all(torch.equal(got32[n], expected[n]) for n in expected)


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
@pytest.mark.parametrize("blocked", [True, False], ids=["blocks", "whole-items"])
def test_float64_is_exactly_rounded_in_the_engine(three, method, blocked, monkeypatch):
    root, paths, tensors = three
    monkeypatch.setattr(ex, "BLOCKED_ON_CPU", blocked)
    assert_float64_exact_and_float32_not(root, paths, tensors, method,
                                         f"{method}-{blocked}")


def test_float64_reaches_vocabulary_rows(tmp_path):
    from test_tokenizer import CORPUS_A, bpe, make_model

    tok = bpe(CORPUS_A)
    base_path, base = make_model(tmp_path / "base", tok, 0)
    fts = []
    for seed, name in ((1, "a"), (2, "b")):
        path, t = make_model(tmp_path / name, tok, seed, base_tensors=base)
        fts.append((path, t))
    paths = [base_path, *(p for p, _ in fts)]
    tensors = [base, *(t for _, t in fts)]
    _, formula = RECIPES["task_arithmetic"]
    got = {}
    for compute in ("float64", "float32"):
        got[compute] = merge(tmp_path, paths, "task_arithmetic", compute, f"vocab-{compute}",
                             "tokenizer: {source: base}")
    name = "model.embed_tokens.weight"
    expected = formula(*(t[name] for t in tensors))
    assert got["float64"][name].shape == expected.shape
    assert torch.equal(got["float64"][name], expected)
    assert not torch.equal(got["float32"][name], expected)


@pytest.mark.parametrize("method", ["task_arithmetic", "linear", "ties"])
def test_float64_in_memory(method):
    g = torch.Generator().manual_seed(3)
    base, a, b = (torch.randn(64, 48, generator=g) for _ in range(3))
    params = {"weight": [0.2, 0.3, 0.5]} if method == "linear" else \
        {"weight": list(WEIGHTS), "density": 1.0}
    base_index = None if method == "linear" else 0
    run = {c: mergesmith.merge_tensors([base, a, b], method, params, base_index=base_index,
                                       compute_dtype=c) for c in (torch.float64, torch.float32)}
    if method == "ties":  # density 1, no sign conflicts resolved away: compare with float64
        exact = mergesmith.merge_tensors([base.double(), a.double(), b.double()], method,
                                         params, base_index=0).float()
    else:
        exact = (linear64 if method == "linear" else task_arithmetic64)(base, a, b)
    assert torch.equal(run[torch.float64], exact)
    assert not torch.equal(run[torch.float32], exact)

"""Method math against independent, written-out formulas on small tensors, plus properties."""

from __future__ import annotations

import itertools

import pytest
import torch

from mergesmith.methods import MergeInputs, get_method


def call(method: str, tensors, base_index=None, params=None, model_params=None):
    spec = get_method(method)
    defaults = {p.name: p.default for p in spec.params if not p.per_model and not p.required}
    inputs = MergeInputs([t.clone() for t in tensors], base_index, {**defaults, **(params or {})},
                         model_params or [{} for _ in tensors])
    return spec.fn(inputs)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture
def xs():
    return [rand(5, 7, seed=s) for s in range(4)]


def test_linear_matches_formula(xs):
    w = [0.5, -0.2, 1.3, 0.4]
    got = call("linear", xs, model_params=[{"weight": v} for v in w])
    want = sum(wi * x for wi, x in zip(w, xs)) / sum(w)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_linear_without_normalize(xs):
    w = [0.5, 0.7, -0.2, 0.0]
    got = call("linear", xs, params={"normalize": False}, model_params=[{"weight": v} for v in w])
    want = 0.5 * xs[0] + 0.7 * xs[1] - 0.2 * xs[2]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_task_arithmetic_matches_formula(xs):
    base, others = xs[0], xs[1:]
    w = [1.0, 0.3, -0.4]
    mp = [{}] + [{"weight": v} for v in w]
    got = call("task_arithmetic", xs, 0, {"lambda": 1.0, "normalize": False}, mp)
    want = base + sum(wi * (x - base) for wi, x in zip(w, others))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lam,normalize", [(0.8, True), (1.7, False), (0.0, True)])
def test_task_arithmetic_lambda_and_normalize(xs, lam, normalize):
    base, others = xs[0], xs[1:]
    w = [0.7, 0.5, -0.3]
    mp = [{}] + [{"weight": v} for v in w]
    got = call("task_arithmetic", xs, 0, {"lambda": lam, "normalize": normalize}, mp)
    mixed = sum(wi * (x - base) for wi, x in zip(w, others))
    if normalize:
        mixed = mixed / sum(w)
    torch.testing.assert_close(got, base + lam * mixed, rtol=1e-12, atol=1e-12)


def test_task_arithmetic_zero_weight_sum_uses_mergekit_guard(xs):
    mp = [{}, {"weight": 1.0}, {"weight": -1.0}]
    got = call("task_arithmetic", xs[:3], 0, {"normalize": True}, mp)
    want = xs[0] + (xs[1] - xs[0]) - (xs[2] - xs[0])  # divisor replaced by 1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_task_arithmetic_base_position_does_not_matter(xs):
    mp = [{"weight": 0.6}, {"weight": 0.2}, {}]
    a = call("task_arithmetic", [xs[1], xs[2], xs[0]], 2, {}, mp)
    b = call("task_arithmetic", [xs[0], xs[1], xs[2]], 0, {}, [{}, mp[0], mp[1]])
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_passthrough_scale(xs):
    torch.testing.assert_close(call("passthrough", xs[:1], model_params=[{"scale": 0.5}]),
                               0.5 * xs[0])
    torch.testing.assert_close(call("passthrough", xs[:1], model_params=[{"scale": None}]), xs[0])


# ---------------------------------------------------------------- properties


def test_one_model_at_weight_one_returns_itself(xs):
    torch.testing.assert_close(call("linear", xs[:1], model_params=[{"weight": 1.0}]), xs[0])
    got = call("task_arithmetic", xs[:2], 0, {}, [{}, {"weight": 1.0}])
    torch.testing.assert_close(got, xs[1], rtol=1e-12, atol=1e-12)


def test_base_alone_returns_base(xs):
    torch.testing.assert_close(call("task_arithmetic", xs[:1], 0, {}, [{}]), xs[0])


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
def test_linear_input_order_does_not_matter(xs, perm):
    w = [0.2, 0.5, 0.3]
    ref = call("linear", xs[:3], model_params=[{"weight": v} for v in w])
    got = call("linear", [xs[i] for i in perm], model_params=[{"weight": w[i]} for i in perm])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("perm", list(itertools.permutations(range(1, 4))))
def test_task_arithmetic_order_of_fine_tunes_does_not_matter(xs, perm):
    w = {1: 0.3, 2: 0.9, 3: -0.5}
    ref = call("task_arithmetic", xs, 0, {}, [{}] + [{"weight": w[i]} for i in (1, 2, 3)])
    got = call("task_arithmetic", [xs[0]] + [xs[i] for i in perm], 0, {},
               [{}] + [{"weight": w[i]} for i in perm])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_identical_inputs_average_to_themselves(xs):
    got = call("linear", [xs[0]] * 3, model_params=[{"weight": w} for w in (0.1, 0.7, 2.0)])
    torch.testing.assert_close(got, xs[0], rtol=1e-12, atol=1e-12)


def test_elementwise_methods_commute_with_row_chunks(xs):
    """Chunked execution relies on this: f(rows of x) == rows of f(x)."""
    mp = [{}] + [{"weight": v} for v in (0.4, 0.9, -0.1)]
    whole = call("task_arithmetic", xs, 0, {"lambda": 0.7, "normalize": True}, mp)
    parts = [call("task_arithmetic", [x[i:i + 2] for x in xs], 0,
                  {"lambda": 0.7, "normalize": True}, mp) for i in range(0, 5, 2)]
    assert torch.equal(torch.cat(parts), whole)


def test_merge_state_dicts_merges_key_by_key_and_copies_buffers():
    from mergesmith import MergeError, merge_state_dicts

    a = {"w": rand(3, 4, seed=1), "b": rand(4, seed=2), "ids": torch.arange(4)}
    b = {"w": rand(3, 4, seed=3), "b": rand(4, seed=4), "ids": torch.arange(4)}
    out = merge_state_dicts([a, b], "linear", {"weight": [0.25, 0.75]})
    for k in ("w", "b"):
        torch.testing.assert_close(out[k], (0.25 * a[k] + 0.75 * b[k]).to(out[k].dtype))
    assert torch.equal(out["ids"], a["ids"])
    with pytest.raises(MergeError, match="differs"):
        merge_state_dicts([a, {**b, "ids": torch.arange(4) + 1}], "linear", {"weight": 1.0})
    with pytest.raises(MergeError, match="different keys"):
        merge_state_dicts([a, {"w": b["w"]}], "linear", {"weight": 1.0})


def test_merge_tensors_rejects_unknown_parameters_and_bad_contracts():
    from mergesmith import MergeError, merge_tensors

    x = rand(4, seed=1)
    with pytest.raises(MergeError, match="Did you mean 'weight'"):
        merge_tensors([x, x], "linear", {"wieght": 1.0})
    with pytest.raises(MergeError, match="needs a base model"):
        merge_tensors([x, x], "ties", {"weight": 1.0})
    with pytest.raises(MergeError, match="takes 1 to 1 inputs|takes"):
        merge_tensors([x, x], "passthrough")

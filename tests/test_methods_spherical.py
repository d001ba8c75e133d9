"""slerp, nuslerp, multislerp and karcher against written-out float64 references.

The references below follow the specification (docs: spec/methods.md and the mergekit
0.1.5 notes) literally, vector by vector, on float64 tensors; they share nothing with the
implementation, which works from Gram matrices and closed forms.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import load_model, recipe_file
from hypothesis import given, settings
from hypothesis import strategies as st

import mergesmith
from mergesmith import MergeError, merge_tensors
from mergesmith.methods import MergeInputs, get_method

F32 = {"rtol": 1e-5, "atol": 1e-6}  # float32 rounding (the conformance tolerance)
F64 = {"rtol": 1e-10, "atol": 1e-12}
PROPERTY = settings(max_examples=25, deadline=None)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def near(x, noise, seed):
    """x plus relative noise: a fine-tune-like neighbour (angles of a few degrees)."""
    return x + noise * rand(*x.shape, seed=seed, dtype=x.dtype)


def check(got, want, dtype):
    torch.testing.assert_close(got.double(), want, **(F64 if dtype == torch.float64 else F32))


def call_fn(method, tensors, base_index=None, params=None):
    """The registered function on its own (what the engine calls), defaults filled in."""
    spec = get_method(method)
    shared = {p.name: p.default for p in spec.params if not p.per_model and not p.required}
    return spec.fn(MergeInputs([t.clone() for t in tensors], base_index,
                               {**shared, **(params or {})}, [{} for _ in tensors]))


# ------------------------------------------------------------------ references


def ref_slerp(t, v0, v1):
    a, b = v0.double().flatten(), v1.double().flatten()
    na, nb = a.norm(), b.norm()
    ua = a / na if na > 1e-8 else a
    ub = b / nb if nb > 1e-8 else b
    d = torch.dot(ua, ub).clamp(-1, 1)
    if d.abs() > 0.9995:
        out = (1 - t) * a + t * b
    else:
        theta = torch.acos(d)
        out = torch.sin((1 - t) * theta) / torch.sin(theta) * a \
            + torch.sin(t * theta) / torch.sin(theta) * b
    return out.reshape(v0.shape)


def ref_nuslerp_vector(t, a, b):
    ua = a / a.norm().clamp(min=1e-7)
    ub = b / b.norm().clamp(min=1e-7)
    theta = torch.acos(torch.dot(ua, ub).clamp(-1, 1))
    if torch.sin(theta).abs() < 1e-8:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


def ref_nuslerp(x1, x2, w1, w2, base=None, flatten=True, row_wise=False):
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    a, b = x1.double(), x2.double()
    if base is not None:
        a, b = a - base.double(), b - base.double()
    if flatten or a.dim() < 2:
        out = ref_nuslerp_vector(t, a.flatten(), b.flatten()).reshape(a.shape)
    else:
        if row_wise:
            a, b = a.transpose(0, -1), b.transpose(0, -1)
        out = torch.empty_like(a)
        for idx in itertools.product(*map(range, a.shape[:-1])):
            out[idx] = ref_nuslerp_vector(t, a[idx], b[idx])
        if row_wise:
            out = out.transpose(0, -1)
    return out if base is None else out + base.double()


def ref_multislerp(xs, weights, base=None, normalize=True, eps=1e-8):
    """Tangent-space barycentre, step by step as written in the mergekit notes."""
    if len(xs) == 1:
        return xs[0].double()
    vs = [x.double().flatten() for x in xs]
    if base is not None:
        vs = [v - base.double().flatten() for v in vs]
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = [v.norm() for v in vs]
    units = [v / (n + eps) for v, n in zip(vs, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    if mean.norm() < eps:
        assert len(vs) == 2
        out = w[0] * vs[0] + w[1] * vs[1]
    else:
        mean = mean / mean.norm()
        tangents = [u - torch.dot(u, mean) * mean for u in units]
        tau = sum(wi * tv for wi, tv in zip(w, tangents))
        tn = tau.norm() + eps
        out = (torch.cos(tn) * mean + torch.sin(tn) / tn * tau) * sum(
            wi * n for wi, n in zip(w, norms))
    if base is not None:
        out = out + base.double().flatten()
    return out.reshape(xs[0].shape)


def ref_karcher(xs, max_iter=10, tol=1e-5):
    """The Karcher iteration of the mergekit notes (§2.5) on full float64 vectors."""
    if len(xs) == 1:
        return xs[0].double()
    vs = [x.double().flatten() for x in xs]
    alpha = [1 / len(vs)] * len(vs)
    norms = [v.norm() for v in vs]
    units = [v / n if n > 0 else torch.zeros_like(v) for v, n in zip(vs, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0], dtype=torch.float64)
    a = [alpha[i] / sum(alpha[j] for j in valid) for i in valid]
    us = [units[i] for i in valid]
    u = sum(ai * ui for ai, ui in zip(a, us))
    u = us[0].clone() if u.norm() < tol else u / u.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(u)
        for ai, ui in zip(a, us):
            cos = torch.dot(u, ui).clamp(-1, 1)
            theta = torch.acos(cos)
            if theta < tol:
                continue
            tangent += ai * theta / torch.sin(theta) * (ui - cos * u)
        tn = tangent.norm()
        if tn < tol:
            break
        u = torch.cos(tn) * u + torch.sin(tn) * tangent / tn
        if u.norm() > tol:
            u = u / u.norm()
    return (sum(ai * n for ai, n in zip(alpha, norms)) * u).reshape(xs[0].shape)


def with_cosine(x, cos, seed):
    """A vector of x's norm at the given cosine to x (Gram–Schmidt on random noise)."""
    u = x.double().flatten() / x.double().norm()
    r = rand(x.numel(), seed=seed, dtype=torch.float64)
    r = r - torch.dot(r, u) * u
    r = r / r.norm()
    return ((cos * u + math.sqrt(1 - cos * cos) * r) * x.double().norm()).reshape(x.shape)


# ------------------------------------------------------------------ slerp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 5), (17,)])
@pytest.mark.parametrize("t", [0.35, 0.5, 0.9, -0.2, 1.3])
def test_slerp_matches_reference(dtype, shape, t):
    base = rand(*shape, seed=1, dtype=dtype)
    other = rand(*shape, seed=2, dtype=dtype)
    got = merge_tensors([base, other], "slerp", {"t": t}, base_index=0)
    check(got, ref_slerp(t, base, other), dtype)
    # the base may come second in the recipe: t still counts from the base
    got = merge_tensors([other, base], "slerp", {"t": t}, base_index=1)
    check(got, ref_slerp(t, base, other), dtype)


@pytest.mark.parametrize("base_index", [0, 1])
def test_slerp_endpoints_are_the_inputs_exactly(base_index):
    xs = [rand(7, 3, seed=3), rand(7, 3, seed=4)]
    base, other = xs[base_index], xs[1 - base_index]
    assert torch.equal(merge_tensors(xs, "slerp", {"t": 0.0}, base_index=base_index), base)
    assert torch.equal(merge_tensors(xs, "slerp", {"t": 1.0}, base_index=base_index), other)


@pytest.mark.parametrize("scale", [2.5, -1.0, -0.3])
def test_slerp_parallel_and_antipodal_inputs_use_lerp(scale):
    base = rand(4, 6, seed=5, dtype=torch.float64)
    other = scale * base
    got = merge_tensors([base, other], "slerp", {"t": 0.25}, base_index=0)
    torch.testing.assert_close(got, 0.75 * base + 0.25 * other, **F64)


@pytest.mark.parametrize("cos", [0.9996, -0.9996, 0.9994, -0.9994, 0.0, 0.3])
def test_slerp_lerp_threshold(cos):
    base = rand(40, seed=6, dtype=torch.float64)
    other = with_cosine(base, cos, seed=7)
    got = merge_tensors([base, other], "slerp", {"t": 0.3}, base_index=0)
    want = ref_slerp(0.3, base, other)
    torch.testing.assert_close(got, want, **F64)
    lerp = 0.7 * base + 0.3 * other
    assert torch.allclose(want, lerp, rtol=0, atol=1e-12) == (abs(cos) > 0.9995)


def test_slerp_zero_tensor_is_not_normalised():
    base, other = torch.zeros(5, 4, dtype=torch.float64), rand(5, 4, seed=8, dtype=torch.float64)
    got = merge_tensors([base, other], "slerp", {"t": 0.4}, base_index=0)
    torch.testing.assert_close(got, ref_slerp(0.4, base, other), **F64)
    torch.testing.assert_close(got, math.sin(0.4 * math.pi / 2) * other, **F64)  # θ = 90°
    tiny = 1e-9 * other / other.norm()  # norm ≤ 1e-8: also left unnormalised
    got = merge_tensors([tiny, other], "slerp", {"t": 0.4}, base_index=0)
    torch.testing.assert_close(got, ref_slerp(0.4, tiny, other), **F64)
    assert not torch.allclose(got, 0.6 * tiny + 0.4 * other)  # not the parallel lerp


@PROPERTY
@given(seed=st.integers(0, 10_000), t=st.floats(-0.5, 1.5))
def test_slerp_is_symmetric_in_t_and_keeps_equal_norms(seed, t):
    a = rand(9, 4, seed=seed, dtype=torch.float64)
    b = with_cosine(a, 0.2, seed=seed + 1)  # same norm
    ab = merge_tensors([a, b], "slerp", {"t": t}, base_index=0)
    ba = merge_tensors([b, a], "slerp", {"t": 1 - t}, base_index=0)
    torch.testing.assert_close(ab, ba, **F64)
    torch.testing.assert_close(ab.norm(), a.norm(), **F64)  # stays on the great circle


def test_slerp_contract_errors():
    a, b, c = (rand(3, 3, seed=s) for s in range(3))
    with pytest.raises(MergeError, match="needs a base model"):
        merge_tensors([a, b], "slerp", {"t": 0.5})
    with pytest.raises(MergeError, match="takes exactly 2 input model.s.*, got 3"):
        merge_tensors([a, b, c], "slerp", {"t": 0.5}, base_index=0)
    with pytest.raises(MergeError, match="takes exactly 2 input model.s.*, got 1"):
        merge_tensors([a], "slerp", {"t": 0.5}, base_index=0)
    with pytest.raises(MergeError, match="needs the parameter 't'"):
        merge_tensors([a, b], "slerp", {}, base_index=0)


@pytest.mark.parametrize("method,params", [
    ("slerp", {"t": 0.3}), ("nuslerp", {}), ("karcher", {}), ("multislerp", {})])
def test_a_lone_input_is_returned_unchanged(method, params):
    """An optional tensor only one model has (mergekit's passthrough policy)."""
    x = rand(4, 5, seed=9)
    assert torch.equal(call_fn(method, [x], base_index=0 if method == "slerp" else None,
                               params=params), x)


# ------------------------------------------------------------------ nuslerp


LAYOUTS = [  # (nuslerp_flatten, nuslerp_row_wise)
    (True, False), (False, False), (False, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5), (11,)])
@pytest.mark.parametrize("flatten,row_wise", LAYOUTS)
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_matches_reference(dtype, shape, flatten, row_wise, with_base):
    base = rand(*shape, seed=10, dtype=dtype)
    x1, x2 = near(base, 0.3, 11), near(base, 0.5, 12)
    params = {"weight": [0.6, 0.4], "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    if with_base:
        got = merge_tensors([x1, base, x2], "nuslerp", params, base_index=1)
    else:
        got = merge_tensors([x1, x2], "nuslerp", params)
    want = ref_nuslerp(x1, x2, 0.6, 0.4, base if with_base else None, flatten, row_wise)
    check(got, want, dtype)


def test_nuslerp_layouts_differ():
    """Flatten, per row and per column are three different interpolations."""
    x1, x2 = rand(5, 6, seed=13), rand(5, 6, seed=14)
    outs = [merge_tensors([x1, x2], "nuslerp", {"weight": [1.0, 2.0], "nuslerp_flatten": f,
                                                "nuslerp_row_wise": r}) for f, r in LAYOUTS]
    for a, b in itertools.combinations(outs, 2):
        assert not torch.allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.0, 0.0], [2.0, -0.5], [3.0, 1.0]])
def test_nuslerp_t_from_weights(weights):
    """t = w₂/(w₁+w₂), 0.5 when the weights cancel; negative weights extrapolate."""
    x1, x2 = rand(8, 3, seed=15, dtype=torch.float64), rand(8, 3, seed=16, dtype=torch.float64)
    got = merge_tensors([x1, x2], "nuslerp", {"weight": weights})
    torch.testing.assert_close(got, ref_nuslerp(x1, x2, *weights), **F64)


def test_nuslerp_one_model_at_full_weight_is_returned():
    x1, x2 = rand(6, 4, seed=17), rand(6, 4, seed=18)
    assert torch.equal(merge_tensors([x1, x2], "nuslerp", {"weight": [1.0, 0.0]}), x1)
    assert torch.equal(merge_tensors([x1, x2], "nuslerp", {"weight": [0.0, 2.0]}), x2)


def test_nuslerp_parallel_antipodal_and_zero_rows():
    x1 = rand(5, 8, seed=19, dtype=torch.float64)
    x2 = rand(5, 8, seed=20, dtype=torch.float64)
    x2[0] = 3 * x1[0]  # parallel: lerp
    x2[1] = -x1[1]  # antipodal: lerp
    x2[2] = 0.0  # zero row: not normalised, θ = 90°
    x1[3] = 0.0
    x1[4] *= 1e-8 / x1[4].norm()  # below the 1e-7 norm floor: cos θ shrinks with it
    got = merge_tensors([x1, x2], "nuslerp", {"weight": [0.7, 0.3], "nuslerp_flatten": False})
    torch.testing.assert_close(got, ref_nuslerp(x1, x2, 0.7, 0.3, flatten=False), **F64)
    torch.testing.assert_close(got[0], 0.7 * x1[0] + 0.3 * x2[0], **F64)
    torch.testing.assert_close(got[1], 0.4 * x1[1], **F64)
    torch.testing.assert_close(got[2], math.sin(0.7 * math.pi / 2) * x1[2], **F64)


@PROPERTY
@given(seed=st.integers(0, 10_000), w1=st.floats(0.1, 3), w2=st.floats(0.1, 3),
       layout=st.sampled_from(LAYOUTS))
def test_nuslerp_does_not_depend_on_model_order(seed, w1, w2, layout):
    x1, x2 = rand(4, 6, seed=seed, dtype=torch.float64), rand(4, 6, seed=seed + 1,
                                                              dtype=torch.float64)
    params = {"nuslerp_flatten": layout[0], "nuslerp_row_wise": layout[1]}
    a = merge_tensors([x1, x2], "nuslerp", {**params, "weight": [w1, w2]})
    b = merge_tensors([x2, x1], "nuslerp", {**params, "weight": [w2, w1]})
    torch.testing.assert_close(a, b, **F64)


def test_nuslerp_contract_errors():
    a, b, c, d = (rand(3, 3, seed=s) for s in range(4))
    with pytest.raises(MergeError, match="takes exactly 2 model.s. besides the base model, got 1"):
        merge_tensors([a, b], "nuslerp", {"weight": 1.0}, base_index=0)
    with pytest.raises(MergeError, match="got 3"):
        merge_tensors([a, b, c], "nuslerp", {"weight": 1.0})
    with pytest.raises(MergeError, match="got 4"):
        merge_tensors([a, b, c, d], "nuslerp", {"weight": 1.0}, base_index=0)
    with pytest.raises(MergeError, match="'weight'"):
        merge_tensors([a, b], "nuslerp", {})


def test_nuslerp_base_among_the_two_models_is_a_plan_error(models, tmp_path):
    recipe = recipe_file(tmp_path, f"""
merge_method: nuslerp
base_model: {models['base']}
models:
  - model: {models['base']}
    parameters: {{weight: 0.5}}
  - model: {models['ft_a']}
    parameters: {{weight: 0.5}}
""")
    with pytest.raises(MergeError, match="exactly 2 model.s. besides the base model, got 1"):
        mergesmith.check(recipe)


# ------------------------------------------------------------------ multislerp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1.0, 2.0], [0.6, -0.2, 0.4, 0.7]])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_matches_reference(dtype, weights, normalize, with_base):
    base = rand(7, 5, seed=21, dtype=dtype)
    xs = [near(base, 0.4, 22 + i) for i in range(len(weights))]
    params = {"weight": weights, "normalize_weights": normalize}
    if with_base:
        got = merge_tensors([base, *xs], "multislerp", params, base_index=0)
    else:
        got = merge_tensors(xs, "multislerp", params)
    check(got, ref_multislerp(xs, weights, base if with_base else None, normalize), dtype)


def test_multislerp_large_eps_matches_reference():
    xs = [rand(30, seed=s, dtype=torch.float64) for s in (26, 27, 28)]
    got = merge_tensors(xs, "multislerp", {"weight": [1.0, 2.0, 3.0], "eps": 0.3})
    torch.testing.assert_close(got, ref_multislerp(xs, [1.0, 2.0, 3.0], eps=0.3), **F64)


@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_single_model_is_returned_unchanged(with_base):
    base, x = rand(4, 4, seed=29), rand(4, 4, seed=30)
    tensors, base_index = ([base, x], 0) if with_base else ([x], None)
    got = merge_tensors(tensors, "multislerp", {"weight": 0.3}, base_index=base_index)
    assert torch.equal(got, x)


def test_multislerp_equal_inputs_give_the_input():
    x = rand(5, 6, seed=31, dtype=torch.float64)
    got = merge_tensors([x, x, x], "multislerp", {"weight": [0.2, 0.5, 0.3]})
    torch.testing.assert_close(got, x, **F64)


@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_two_antipodal_inputs_fall_back_to_the_weighted_sum(with_base):
    base = rand(3, 5, seed=32, dtype=torch.float64) if with_base else torch.zeros(3, 5)
    d = rand(3, 5, seed=33, dtype=torch.float64)
    xs = [base + d, base - d]
    tensors = [base, *xs] if with_base else xs
    got = merge_tensors(tensors, "multislerp", {"weight": [1.0, 1.0]},
                        base_index=0 if with_base else None)
    torch.testing.assert_close(got, base.double(), **F64)  # ½d − ½d = 0
    torch.testing.assert_close(got, ref_multislerp(xs, [1.0, 1.0], base if with_base else None),
                               **F64)


def test_multislerp_three_inputs_without_mean_direction_is_an_error():
    a = rand(12, seed=34, dtype=torch.float64)
    b = with_cosine(a, -0.5, seed=35)
    c = -(a + b)  # three unit directions 120° apart: the weighted mean is zero
    with pytest.raises(MergeError, match="mean direction of tensor 'model.norm.weight' is zero"):
        merge_tensors([a, b, c], "multislerp", {"weight": 1.0}, name="model.norm.weight")


def test_multislerp_zero_weight_sum_is_an_error():
    xs = [rand(3, 3, seed=s) for s in range(3)]
    with pytest.raises(MergeError, match=r"tensor 'w' sum to zero \(\[1.0, -0.5, -0.5\]"):
        merge_tensors(xs, "multislerp", {"weight": [1.0, -0.5, -0.5]}, name="w")
    # without normalisation nothing divides by the sum
    got = merge_tensors(xs, "multislerp", {"weight": [1.0, -0.5, -0.25],
                                           "normalize_weights": False})
    check(got, ref_multislerp(xs, [1.0, -0.5, -0.25], normalize=False), torch.float32)


def test_multislerp_zero_weight_sum_fails_at_plan_time(models, tmp_path):
    recipe = recipe_file(tmp_path, f"""
merge_method: multislerp
base_model: {models['base']}
models:
  - model: {models['ft_a']}
    parameters: {{weight: 0.5}}
  - model: {models['ft_b']}
    parameters:
      weight: [0.5, -0.5]
""")
    with pytest.raises(MergeError, match=r"tensor 'model.layers.2.*sum to zero \(\[0.5, -0.5\]\)"):
        mergesmith.check(recipe)


@PROPERTY
@given(seed=st.integers(0, 10_000), n=st.integers(2, 4), perm_seed=st.integers(0, 100),
       scale=st.floats(0.1, 10))
def test_multislerp_equal_weights_are_order_and_scale_free(seed, n, perm_seed, scale):
    xs = [rand(5, 3, seed=seed + i, dtype=torch.float64) for i in range(n)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed)).tolist()
    a = merge_tensors(xs, "multislerp", {"weight": 1.0})
    b = merge_tensors([xs[i] for i in perm], "multislerp", {"weight": scale})
    torch.testing.assert_close(a, b, **F64)


# ------------------------------------------------------------------ karcher


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_iter,tol", [(10, 1e-5), (0, 1e-5), (1, 1e-5), (2, 1e-9),
                                          (50, 1e-12), (5, 0.3)])
@pytest.mark.parametrize("spread", [0.3, 3.0])
def test_karcher_matches_reference(dtype, max_iter, tol, spread):
    base = rand(6, 5, seed=40, dtype=dtype)
    xs = [base, *(near(base, spread, 41 + i) for i in range(3))]
    got = merge_tensors(xs, "karcher", {"max_iter": max_iter, "tol": tol})
    check(got, ref_karcher(xs, max_iter, tol), dtype)


def test_karcher_skips_inputs_closer_than_tol():
    """Inputs within tol of the mean do not pull it back (mergekit's rule): a cluster of
    four at 0.245 rad from the start is ignored while the fifth input at 1.33 rad pulls."""
    a = rand(16, seed=45, dtype=torch.float64)
    xs = [near(a, 1e-3, 46 + i) for i in range(4)] + [with_cosine(a, 0.0, seed=50)]
    got = merge_tensors(xs, "karcher", {"max_iter": 1, "tol": 0.25})
    torch.testing.assert_close(got, ref_karcher(xs, 1, 0.25), **F64)
    start = merge_tensors(xs, "karcher", {"max_iter": 0})
    assert torch.dot(got, xs[4]) / got.norm() > torch.dot(start, xs[4]) / start.norm() + 0.1


def test_karcher_converges_to_the_riemannian_mean():
    """At the mean the log maps of the inputs sum to zero; the norm is the mean norm."""
    xs = [rand(20, seed=s, dtype=torch.float64) * (1 + s) for s in range(4)]
    got = merge_tensors(xs, "karcher", {"max_iter": 100, "tol": 1e-14})
    u = got / got.norm()
    logs = []
    for x in xs:
        v = x / x.norm()
        cos = torch.dot(u, v)
        theta = torch.acos(cos)
        logs.append(theta / torch.sin(theta) * (v - cos * u))
    assert sum(logs).norm() < 1e-10
    torch.testing.assert_close(got.norm(), sum(x.norm() for x in xs) / 4, **F64)
    # few iterations stop short of it
    short = merge_tensors(xs, "karcher", {"max_iter": 1, "tol": 1e-14})
    assert (short - got).norm() > 1e-6


def test_karcher_without_iterations_is_the_normalised_mean_of_directions():
    x = rand(10, seed=50, dtype=torch.float64)
    xs = [x, near(x, 0.1, 51), near(x, 0.1, 52)]
    mean = sum(x / x.norm() for x in xs)
    want = mean / mean.norm() * sum(x.norm() for x in xs) / 3
    torch.testing.assert_close(merge_tensors(xs, "karcher", {"max_iter": 0}), want, **F64)
    # angles below tol do not pull the mean: here all are, so no step is taken
    torch.testing.assert_close(merge_tensors(xs, "karcher", {"tol": 0.5}), want, **F64)
    assert not torch.allclose(merge_tensors(xs, "karcher", {"tol": 1e-9}), want,
                              rtol=1e-9, atol=0)
    # a tolerance above 1 exceeds the mean's length: mergekit then starts from the first
    # input's direction
    torch.testing.assert_close(merge_tensors(xs, "karcher", {"tol": 1.5}),
                               xs[0] / xs[0].norm() * sum(x.norm() for x in xs) / 3, **F64)


def test_karcher_small_inputs_leave_the_direction_but_count_in_the_norm():
    x, y = rand(8, seed=53, dtype=torch.float64), rand(8, seed=54, dtype=torch.float64)
    zero = torch.zeros(8, dtype=torch.float64)
    got = merge_tensors([x, zero, y], "karcher", {"max_iter": 30, "tol": 1e-10})
    pair = merge_tensors([x, y], "karcher", {"max_iter": 30, "tol": 1e-10})
    torch.testing.assert_close(got, pair * 2 / 3, **F64)
    torch.testing.assert_close(got, ref_karcher([x, zero, y], 30, 1e-10), **F64)
    tiny = 1e-7 * y / y.norm()  # norm 1e-7 ≤ tol: left out of the direction
    got = merge_tensors([x, tiny], "karcher", {"tol": 2e-7})
    torch.testing.assert_close(got, x / x.norm() * (x.norm() + 1e-7) / 2, **F64)


def test_karcher_degenerate_inputs():
    x = rand(4, 3, seed=55, dtype=torch.float64)
    zero = torch.zeros_like(x)
    torch.testing.assert_close(merge_tensors([x, x, x], "karcher", {}), x, **F64)
    assert torch.equal(merge_tensors([zero, zero], "karcher", {}), zero)
    # antipodal: the mean of the directions is zero, so the first input's direction is
    # kept, and the other input has no tangent direction from there (mergekit does the same)
    torch.testing.assert_close(merge_tensors([x, -x], "karcher", {}), x, **F64)
    torch.testing.assert_close(merge_tensors([-x, x], "karcher", {}), -x, **F64)
    torch.testing.assert_close(merge_tensors([x, -x], "karcher", {}), ref_karcher([x, -x]),
                               **F64)
    x32 = x.float()  # the same with float32 rounding of the units
    assert torch.equal(merge_tensors([x32, -x32], "karcher", {}), x32)


def test_karcher_configured_base_is_an_ordinary_input():
    xs = [rand(5, 5, seed=s) for s in (56, 57, 58)]
    with_base = merge_tensors(xs, "karcher", {}, base_index=0)
    assert torch.equal(with_base, merge_tensors(xs, "karcher", {}))
    assert not torch.allclose(with_base, merge_tensors(xs[1:], "karcher", {}))


def test_karcher_recipe_base_model_takes_part_in_the_mean(models, tmp_path):
    recipe = recipe_file(tmp_path, f"""
merge_method: karcher
base_model: {models['base']}
models:
  - model: {models['ft_a']}
  - model: {models['ft_c']}
parameters:
  max_iter: 20
  tol: 1.0e-7
""")
    mergesmith.run(recipe, tmp_path / "out")
    got = load_model(tmp_path / "out")
    x = {k: load_model(p) for k, p in models.items()}
    for name in ["model.layers.1.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"]:
        inputs = [x["ft_a"][name], x["ft_c"][name], x["base"][name]]
        check(got[name], ref_karcher(inputs, 20, 1e-7), torch.float32)


@PROPERTY
@given(seed=st.integers(0, 10_000), n=st.integers(2, 5), perm_seed=st.integers(0, 100),
       scale=st.floats(0.01, 100))
def test_karcher_is_symmetric_and_homogeneous(seed, n, perm_seed, scale):
    xs = [rand(4, 4, seed=seed + i, dtype=torch.float64) for i in range(n)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed)).tolist()
    params = {"max_iter": 50, "tol": 1e-12}
    a = merge_tensors(xs, "karcher", params)
    b = merge_tensors([scale * xs[i] for i in perm], "karcher", params)
    torch.testing.assert_close(b, scale * a, rtol=1e-9, atol=1e-9 * scale)


# ------------------------------------------------------------------ shared


@pytest.mark.parametrize("method,params,base_index", [
    ("slerp", {"t": 0.3}, 0),
    ("nuslerp", {"weight": [1.0, 2.0], "nuslerp_flatten": False}, 0),
    ("multislerp", {"weight": [1.0, 2.0]}, 0),
    ("karcher", {}, None),
])
def test_deterministic_and_shape_preserving(method, params, base_index):
    xs = [rand(9, 7, seed=60 + i) for i in range(3 if method != "slerp" else 2)]
    a = merge_tensors(xs, method, params, base_index=base_index)
    b = merge_tensors(xs, method, params, base_index=base_index)
    assert a.shape == xs[0].shape and a.dtype == torch.float32
    assert torch.equal(a, b)


def test_bfloat16_inputs_are_merged_in_float32_and_rounded_once():
    xs = [rand(6, 6, seed=s).bfloat16() for s in (70, 71)]
    got = merge_tensors(xs, "slerp", {"t": 0.4}, base_index=0)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ref_slerp(0.4, *xs).to(torch.bfloat16))


def test_methods_are_not_elementwise():
    for name in ("slerp", "nuslerp", "multislerp", "karcher"):
        assert not get_method(name).scheduling.elementwise


def test_multislerp_with_every_task_vector_zero_returns_the_base():
    """A tensor no fine-tune changed (frozen) merges to the base instead of stopping."""
    base = torch.randn(4, 5, dtype=torch.float32)
    got = mergesmith.merge_tensors([base, base.clone(), base.clone(), base.clone()],
                                   "multislerp", {"weight": 1.0}, base_index=0)
    assert torch.equal(got, base)


# ------------------------------------------------------------------ streamed SLERP


def test_slerp_of_large_tensors_streams_row_chunks_bit_identically(tmp_path):
    """2-D tensors of more than 2^20 elements are merged in row chunks: the norms
    and dot product come from a streamed first pass (same block order as on the whole
    tensor), so the bytes equal the whole-tensor merge — with default chunks, tiny chunks
    (memory limit) and 1 or 2 threads."""
    import dataclasses

    from conftest import LLAMA, random_tensors, write_model
    from safetensors.torch import load_file

    import mergesmith
    from mergesmith.execute import execute
    from mergesmith.methods import merge_tensors

    config = dict(LLAMA, vocab_size=4096, hidden_size=512, intermediate_size=2304,
                  num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8)
    base = random_tensors(config, 0)
    a = write_model(tmp_path / "a", base, config)
    b = write_model(tmp_path / "b", random_tensors(config, 1, base, scale=0.3), config)
    recipe = (f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n"
              f"  - model: {b}\nparameters: {{t: 0.3}}\ndtype: bfloat16\n")
    plan = mergesmith.plan(recipe)
    embed = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    assert embed.shape == (4096, 512) and embed.elementwise  # streamed: 2 blocks of 2048 rows
    assert not next(t for t in plan.tensors if t.name.endswith("q_proj.weight")).elementwise
    down = next(t for t in plan.tensors if t.name.endswith("down_proj.weight"))
    assert down.shape == (512, 2304) and down.elementwise  # pieces of 113 rows (not 2^18)
    mergesmith.run(recipe, tmp_path / "out")
    outs = [load_file(str(tmp_path / "out" / "model.safetensors"))]
    for threads in (1, 2):  # row chunks of 96 rows: not aligned with the 2048-row blocks
        folder = tmp_path / f"chunks{threads}"
        folder.mkdir()
        small = dataclasses.replace(plan, options=dataclasses.replace(plan.options,
                                                                      threads=threads))
        execute(small, str(folder), chunk_elements=96 * 512)
        outs.append(load_file(str(folder / "model.safetensors")))
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    for name in outs[0]:
        whole = merge_tensors([ta[name].to(torch.bfloat16), tb[name].to(torch.bfloat16)],
                              "slerp", {"t": 0.3}, base_index=0, out_dtype=torch.bfloat16)
        for out in outs:
            assert torch.equal(out[name], whole), name


def test_whole_gram_streamed_in_blocks_of_whole_pieces_is_bit_identical():
    """The streamed Gram (SLERP, Model Stock) sums fixed pieces of whole rows: blocks the
    engine reads for six inputs (fewer rows than for three, in whole pieces) give the
    float64 sums of the whole tensor bit for bit; blocks that cut pieces do not, so the
    comparison can fail."""
    from mergesmith.execute import statistic_block_rows
    from mergesmith.methods.model_stock import MODEL_STOCK_STATISTIC
    from mergesmith.methods.spherical import gram_piece_rows, whole_gram

    g = torch.Generator().manual_seed(3)
    shape = (700, 2304)  # 113 rows per piece: no block size is a power of two
    xs = [torch.randn(shape, generator=g) for _ in range(5)]
    whole = whole_gram(xs)
    rows = statistic_block_rows(MODEL_STOCK_STATISTIC, shape, 6)
    assert rows % gram_piece_rows(shape) == 0
    assert rows < statistic_block_rows(MODEL_STOCK_STATISTIC, shape, 3)

    def streamed(step):
        gram = None
        for r in range(0, shape[0], step):
            gram = whole_gram([x[r:r + step] for x in xs], gram)
        return gram

    assert torch.equal(streamed(rows), whole)
    assert not torch.equal(streamed(rows - 1), whole)


def test_gram_of_stored_dtype_equals_the_upcast_one():
    """SLERP's streamed pass hands the Gram its blocks as read (bfloat16): converting each
    piece straight to float64 gives the same sums as upcasting first. The sums match the
    written-out formula (float64 products, any order of the sums: to float64 rounding) for
    contiguous rows and for strided columns (nuslerp's ``row_wise``), with up to three
    inputs at once and more in smaller pieces; each Gram is exactly symmetric."""
    from mergesmith.methods.spherical import row_gram, whole_gram

    g = torch.Generator().manual_seed(5)
    shape = (700, 2304)
    xs = [torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(3)]
    up = [x.float() for x in xs]
    assert torch.equal(whole_gram(xs), whole_gram(up))

    def written_out(vs):
        """G[r, i, j] = Σ_c vᵢ[r, c]·vⱼ[r, c] in float64."""
        d = [v.double() for v in vs]
        return torch.stack([torch.stack([(d[i] * d[j]).sum(dim=1) for j in range(len(vs))],
                                        dim=-1) for i in range(len(vs))], dim=-2)

    def assert_sums_close(gram, expected):
        """Within float64 rounding of sums over pieces of up to 2^20 products (below
        2^20·ε ≈ 1e-10; a missing or doubled piece is off by a whole piece's share),
        relative to ‖vᵢ‖·‖vⱼ‖: dot products of nearly orthogonal vectors cancel, so their
        own size is no scale."""
        norms = expected.diagonal(dim1=1, dim2=2).sqrt()
        scale = norms[:, :, None] * norms[:, None, :]
        assert ((gram - expected).abs() / scale).max() < 1e-11

    full = [torch.randn(shape, generator=g) for _ in range(5)]  # float32: order matters
    for vs in (full[:3], full, [f.T for f in full[:2]], [f.T for f in full]):
        gram = row_gram(vs)
        assert torch.equal(gram, gram.transpose(1, 2))
        assert_sums_close(gram, written_out(vs))
    flat = [f.reshape(1, -1) for f in full]  # one long row: several pieces per row
    assert_sums_close(row_gram(flat), written_out(flat))

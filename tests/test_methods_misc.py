"""sce, ram, ramplus_tl, model_stock, nearswap and arcee_fusion.

Each method is checked against a written-out float64 formula (the spec's, not a call into the
implementation), on edge cases, on properties (order of the fine-tunes, row chunks), on its
input contract, end to end through a recipe, and — for model_stock — on the conformance case
where we deliberately differ from mergekit 0.1.5 (t clamped to [0, 1]).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import warnings

import pytest
import torch
from conftest import (
    CONFORMANCE,
    LLAMA,
    load_model,
    random_tensors,
    recipe_file,
    write_model,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import mergesmith
from mergesmith import MergeError
from mergesmith.methods import REQUIRED, BasePolicy, MergeInputs, Scope, get_method

MISC = ["sce", "ram", "ramplus_tl", "model_stock", "nearswap", "arcee_fusion"]
TINY = {**LLAMA, "num_hidden_layers": 1}


def rand(*shape, seed, scale=1.0, zeros=0.0):
    """float64 normal noise; a ``zeros`` fraction of the entries set to exactly 0."""
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(*shape, generator=g, dtype=torch.float64)
    return x.masked_fill(torch.rand(*shape, generator=g) < zeros, 0.0)


def fine_tunes(base, n, seed, scale=0.1, zeros=0.0):
    return [base + rand(*base.shape, seed=seed + i, scale=scale, zeros=zeros) for i in range(n)]


def merge(tensors, method, params=None, base_index=0, name="w"):
    return mergesmith.merge_tensors(tensors, method, params or {}, base_index=base_index,
                                    name=name)


@contextlib.contextmanager
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


close = {"rtol": 1e-12, "atol": 1e-12}


# ---------------------------------------------------------------- declarations


@pytest.mark.parametrize("name,inputs,params,elementwise", [
    ("sce", (1, None), {"select_topk": 1.0, "int8_mask": False}, False),
    ("ram", (1, None), {"epsilon": 1e-5}, True),
    ("ramplus_tl", (1, None), {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, False),
    ("model_stock", (3, None), {"filter_wise": False}, False),
    ("nearswap", (2, 2), {"t": REQUIRED}, True),
    ("arcee_fusion", (2, 2), {}, False),
])
def test_declarations_mirror_mergekit_0_1_5(name, inputs, params, elementwise):
    """Base required, input counts, shared parameters and defaults of mergekit 0.1.5 (§3)."""
    spec = get_method(name)
    assert spec.contract.base is BasePolicy.REQUIRED
    assert (spec.contract.min_inputs, spec.contract.max_inputs) == inputs
    assert {p.name: p.default for p in spec.params} == params
    assert all(p.scope is Scope.SHARED for p in spec.params)
    assert spec.scheduling.elementwise is elementwise and not spec.scheduling.random
    assert spec.docs.summary and spec.docs.reference


# ---------------------------------------------------------------- sce


def sce_reference(base, xs, topk):
    """Spec: variance top-k (ties → lowest index), TIES sign mask on Σδ, energy weights."""
    T = torch.stack([x - base for x in xs])
    if topk <= 0:
        return base
    if topk < 1:
        var = ((T - T.mean(0)) ** 2).mean(0).flatten()
        nonzero = int((var != 0).sum())
        k = int(torch.tensor(nonzero, dtype=torch.float32)
                * torch.tensor(topk, dtype=torch.float32))  # float32 product, as mergekit
        if k == 0:
            return base
        chosen = sorted(range(var.numel()), key=lambda i: (-float(var[i]), i))[:k]
        keep = torch.zeros(var.numel(), dtype=T.dtype)
        keep[chosen] = 1
        T = T * keep.view(base.shape)
    eta = (T ** 2).flatten(1).mean(1)
    eta = eta / eta.sum() if abs(float(eta.sum())) >= 1e-6 else torch.full_like(eta, 1 / len(xs))
    majority = torch.where(T.sum(0) >= 0, 1.0, -1.0)
    w = eta.view(-1, *[1] * base.dim()) * (torch.sign(T) == majority)
    return base + (T * w).sum(0) / w.sum(0).clamp(min=1e-6)


@pytest.mark.parametrize("topk", [1.0, 2.0, 0.75, 0.5, 0.3, 0.05])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_sce_matches_formula(topk, n):
    base = rand(6, 8, seed=0)
    xs = fine_tunes(base, n, seed=10 * n, zeros=0.5)  # sparse deltas: zero-variance entries
    got = merge([base, *xs], "sce", {"select_topk": topk})
    torch.testing.assert_close(got, sce_reference(base, xs, topk), **close)


@pytest.mark.parametrize("topk", [0.0, -0.5, 1e-9])
def test_sce_select_topk_zero_returns_the_base_with_its_shape(topk):
    base = rand(4, 6, seed=1)
    got = merge([base, *fine_tunes(base, 3, seed=2)], "sce", {"select_topk": topk})
    assert got.shape == (4, 6) and torch.equal(got, base)


def test_sce_nothing_selected_returns_the_base():
    """2 positions with non-zero variance × 0.4 → k = 0."""
    base = torch.zeros(3, 4, dtype=torch.float64)
    x1, x2 = base.clone(), base.clone()
    x1[0, 0], x2[2, 3] = 0.5, -0.25
    got = merge([base, x1, x2], "sce", {"select_topk": 0.4})
    assert torch.equal(got, base)


def test_sce_variance_ties_at_the_cut_keep_the_lowest_positions():
    # δ₂ = −δ₁ → variance δ₁²: [1, 4, 4, 4, 9, 0]; 5 non-zero × 0.6 → k = 3: 9, then two 4s
    d = torch.tensor([1.0, 2.0, 2.0, -2.0, 3.0, 0.0], dtype=torch.float64)
    base = torch.full((6,), 0.5, dtype=torch.float64)
    got = merge([base, base + d, base - d], "sce", {"select_topk": 0.6})
    torch.testing.assert_close(got, sce_reference(base, [base + d, base - d], 0.6), **close)
    # Σδ = 0 everywhere → majority +: the positive entry of each kept position survives
    want = base + torch.tensor([0.0, 2.0, 2.0, 0.0, 3.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, want, **close)


def test_sce_base_alone_and_equal_inputs():
    base = rand(5, seed=3)
    assert torch.equal(merge([base], "sce"), base)
    assert torch.equal(merge([base, base, base], "sce", {"select_topk": 0.5}), base)
    x = base + 0.25
    # identical fine-tunes: no variance to select from (→ base), but all of it at topk 1
    assert torch.equal(merge([base, x, x], "sce", {"select_topk": 0.5}), base)
    torch.testing.assert_close(merge([base, x, x], "sce"), x, **close)


def test_sce_float32_agrees_with_float64():
    base = rand(64, 48, seed=4).float()
    xs = [x.float() for x in fine_tunes(base.double(), 3, seed=5, scale=0.01, zeros=0.8)]
    got = merge([base, *xs], "sce", {"select_topk": 0.4})
    assert got.dtype == torch.float32
    want = sce_reference(base.double(), [x.double() for x in xs], 0.4)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- ram, ramplus_tl


def ram_reference(base, xs, eps, r=None, alpha=None):
    """Spec: mean of the active (|δ| > ε) entries; RAM+ scales unique entries by λᵢ."""
    T = torch.stack([x - base for x in xs])
    A = T.abs() > eps
    c = A.sum(0).to(base.dtype)
    if r is None:
        return base + (T * A).sum(0) / c.clamp(min=1)
    out = base.clone()
    for i in range(len(xs)):
        n_shared, n_unique = int((A[i] & (c > 1)).sum()), int((A[i] & (c == 1)).sum())
        lam = 1 + r * min(max(n_shared / max(n_unique, eps), 0.0), alpha)
        out += T[i] * A[i] * torch.where(c == 1, lam, 1 / c.clamp(min=1))
    return out


@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.05, 0.2, 10.0])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_ram_matches_formula(eps, n):
    base = rand(7, 5, seed=6)
    xs = fine_tunes(base, n, seed=20 + n, zeros=0.3)
    got = merge([base, *xs], "ram", {"epsilon": eps})
    torch.testing.assert_close(got, ram_reference(base, xs, eps), **close)


@pytest.mark.parametrize("r,alpha", [(0.1, 0.2), (0.3, 0.5), (1.0, 5.0), (0.5, 0.0), (0.4, -0.1)])
@pytest.mark.parametrize("eps", [1e-5, 0.05, 0.15])
def test_ramplus_tl_matches_formula(r, alpha, eps):
    base = rand(9, 4, seed=7)
    xs = fine_tunes(base, 3, seed=30, zeros=0.6)
    got = merge([base, *xs], "ramplus_tl", {"epsilon": eps, "r": r, "alpha": alpha})
    torch.testing.assert_close(got, ram_reference(base, xs, eps, r, alpha), **close)


def test_ram_epsilon_is_a_strict_threshold():
    base = torch.zeros(5, dtype=torch.float64)
    x1 = torch.tensor([0.5, 0.75, 1.0, -0.75, 0.0], dtype=torch.float64)
    x2 = torch.tensor([0.75, -0.75, 0.25, -1.0, 0.0], dtype=torch.float64)
    # |δ| = 0.5 is not active; active counts [1, 2, 1, 2, 0]
    got = merge([base, x1, x2], "ram", {"epsilon": 0.5})
    want = torch.tensor([0.75, 0.0, 1.0, -0.875, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, want, **close)


def test_ramplus_tl_clips_rho():
    base = torch.zeros(8, dtype=torch.float64)
    x1 = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.float64)  # 3 shared, 1 unique
    x2 = torch.tensor([2, 2, 2, 0, 2, 2, 2, 2], dtype=torch.float64)  # 3 shared, 4 unique
    got = merge([base, x1, x2], "ramplus_tl", {"r": 0.4, "alpha": 1.0})
    # ρ₁ = 3 → clipped to α = 1 → λ₁ = 1.4;  ρ₂ = 0.75 → λ₂ = 1.3
    want = torch.tensor([1.5, 1.5, 1.5, 1.4, 2.6, 2.6, 2.6, 2.6], dtype=torch.float64)
    torch.testing.assert_close(got, want, **close)
    # α < 0 acts like torch.clamp(min=0, max=α): λ = 1 + r·α for both
    got = merge([base, x1, x2], "ramplus_tl", {"r": 0.5, "alpha": -0.2})
    want = torch.tensor([1.5, 1.5, 1.5, 0.9, 1.8, 1.8, 1.8, 1.8], dtype=torch.float64)
    torch.testing.assert_close(got, want, **close)


def test_ramplus_tl_model_without_active_entries_gives_no_nan():
    """ε = 0 and an unchanged model: mergekit computes ρ = 0/0 and returns NaN everywhere."""
    base = rand(6, seed=8)
    x2 = base + torch.tensor([0.0, 1.0, -2.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    got = merge([base, base.clone(), x2], "ramplus_tl", {"epsilon": 0.0})
    torch.testing.assert_close(got, x2, **close)  # x2's changes are all unique, ρ₂ = 0


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_ram_base_alone_and_equal_inputs(method):
    base = rand(3, 4, seed=9)
    assert torch.equal(merge([base], method), base)
    assert torch.equal(merge([base, base, base], method), base)
    x = base - 0.5
    torch.testing.assert_close(merge([base, x, x, x], method), x, **close)


def test_ram_and_nearswap_commute_with_row_chunks():
    """They are declared element-wise, so the executor may merge row chunks separately."""
    base = rand(9, 6, seed=10)
    for method, xs, params in [("ram", fine_tunes(base, 3, 11, zeros=0.4), {"epsilon": 0.05}),
                               ("nearswap", fine_tunes(base, 1, 12), {"t": 0.07})]:
        whole = merge([base, *xs], method, params)
        parts = [merge([base[i:i + 4], *(x[i:i + 4] for x in xs)], method, params)
                 for i in range(0, 9, 4)]
        assert torch.equal(torch.cat(parts), whole), method


# ---------------------------------------------------------------- model_stock


def model_stock_reference(base, xs, filter_wise=False):
    """Spec: per row (or whole tensor) t from the mean pairwise cosine, clamped to [0, 1]."""
    def rows(x):
        return x.reshape(-1, x.shape[-1]) if filter_wise and x.dim() > 1 else x.reshape(1, -1)

    b, xr, n = rows(base), [rows(x) for x in xs], len(xs)
    out = []
    for r in range(b.shape[0]):
        o = [x[r] - b[r] for x in xr]
        cos = [max(-1.0, min(1.0, float(o[i] @ o[j]) / max(float(o[i].norm() * o[j].norm()),
                                                           1e-6)))
               for i, j in itertools.combinations(range(n), 2)]
        c = sum(cos) / len(cos)
        den = 1 + (n - 1) * c
        t = 0.0 if abs(den) < 1e-6 else n * c / den
        t = min(max(t, 0.0), 1.0)
        out.append(t * sum(x[r] for x in xr) / n + (1 - t) * b[r])
    return torch.stack(out).reshape(base.shape)


def agreeing(base, n, seed):
    """Fine-tunes sharing a common direction (positive cosines, so t in (0, 1))."""
    shared = rand(*base.shape, seed=seed, scale=0.1)
    return [base + shared + rand(*base.shape, seed=seed + 1 + i, scale=0.08) for i in range(n)]


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_model_stock_matches_formula(n, filter_wise):
    base = rand(6, 10, seed=13)
    xs = agreeing(base, n, seed=40)
    with no_warnings():
        got = merge([base, *xs], "model_stock", {"filter_wise": filter_wise})
    torch.testing.assert_close(got, model_stock_reference(base, xs, filter_wise), **close)


def test_model_stock_negative_cosine_clamps_t_to_the_base_with_a_warning():
    base = rand(5, 6, seed=14)
    o = rand(5, 6, seed=15, scale=0.1)
    xs = [base + o, base - 0.5 * o + rand(5, 6, seed=16, scale=0.02)]  # cos ≈ −0.90, t ≈ −17
    with pytest.warns(UserWarning, match=r"model_stock: tensor 'layers.0.w'.*clamped"):
        got = merge([base, *xs], "model_stock", name="layers.0.w")
    assert torch.equal(got, base)
    torch.testing.assert_close(got, model_stock_reference(base, xs), **close)


def test_model_stock_filter_wise_clamps_only_the_disagreeing_rows():
    base = rand(4, 8, seed=17)
    o = rand(4, 8, seed=18, scale=0.1)
    x1 = base + o
    x2 = base + o * torch.tensor([[1.0], [-1.0], [0.5], [-0.3]], dtype=torch.float64) \
        + rand(4, 8, seed=19, scale=0.03)
    with pytest.warns(UserWarning, match=r"'w'.*2 of 4 rows"):
        got = merge([base, x1, x2], "model_stock", {"filter_wise": True})
    torch.testing.assert_close(got, model_stock_reference(base, [x1, x2], True), **close)
    assert torch.equal(got[1], base[1]) and torch.equal(got[3], base[3])
    assert not torch.equal(got[0], base[0]) and not torch.equal(got[2], base[2])


def test_model_stock_singular_and_degenerate_cases_keep_the_base():
    base = rand(3, 5, seed=20)
    o = rand(3, 5, seed=21, scale=0.1)
    with no_warnings():  # cos = −1 with two models: 1 + cos = 0 → t = 0, nothing clamped
        assert torch.equal(merge([base, base + o, base - o], "model_stock"), base)
        # all inputs equal: zero offsets → cos 0 → t = 0
        assert torch.equal(merge([base, base.clone(), base.clone()], "model_stock"), base)
        # identical fine-tunes: cos = 1 → t = 1 → the fine-tune
        x = base + o
        torch.testing.assert_close(merge([base, x, x.clone(), x.clone()], "model_stock"), x,
                                   **close)


def test_model_stock_one_dimensional_tensor_is_one_row():
    base = rand(12, seed=22)
    xs = agreeing(base, 3, seed=23)
    flat = merge([base, *xs], "model_stock")
    assert torch.equal(merge([base, *xs], "model_stock", {"filter_wise": True}), flat)
    torch.testing.assert_close(flat, model_stock_reference(base, xs), **close)


def test_model_stock_base_position_does_not_matter():
    base = rand(4, 4, seed=24)
    x1, x2 = agreeing(base, 2, seed=25)
    a = merge([base, x1, x2], "model_stock", base_index=0)
    b = merge([x1, x2, base], "model_stock", base_index=2)
    torch.testing.assert_close(a, b, **close)


def test_model_stock_conflict_case_clamps_where_mergekit_does_not(tmp_path, monkeypatch):
    """The conformance case mergekit gets 'wrong' (kind mergekit-bug), with our intent.

    Per row, the ft_a and ft_c task vectors have a negative cosine in 3464 of the 3465 rows,
    so t = 2·cos/(1 + cos) < 0 there: mergekit writes t·mean + (1−t)·base (away from both
    models), we write the base row exactly, in every tensor (so every tensor differs from
    mergekit's). The one row with t ≈ 0.065 (embed_tokens row 443) matches mergekit.
    """
    if not (CONFORMANCE / "recipes" / "model_stock_conflict.yml").exists():
        pytest.skip("../shared/conformance is not available")
    monkeypatch.chdir(CONFORMANCE)
    with pytest.warns(UserWarning, match="model_stock: tensor '.*clamped"):
        mergesmith.run("recipes/model_stock_conflict.yml", tmp_path / "out", threads=1)
    ours = load_model(tmp_path / "out")
    mergekit = load_model(CONFORMANCE / "expected" / "model_stock_conflict")
    base, ft_a, ft_c = (load_model(CONFORMANCE / "models" / m) for m in ("base", "ft_a", "ft_c"))
    assert set(ours) == set(mergekit)
    clamped, kept, differing = 0, [], set()
    for name, out in ours.items():
        rows = out.shape[0] if out.dim() > 1 else 1
        b, a, c, mk, o = (x[name].double().reshape(rows, -1)
                          for x in (base, ft_a, ft_c, mergekit, ours))
        da, dc = a - b, c - b
        cos = (da * dc).sum(-1) / (da.norm(dim=-1) * dc.norm(dim=-1)).clamp(min=1e-6)
        t = 2 * cos / (1 + cos)
        for r in range(rows):
            if t[r] < 0:
                clamped += 1
                assert torch.equal(o[r], b[r]), (name, r)
                assert not torch.allclose(mk[r], b[r], rtol=1e-5, atol=1e-6), (name, r)
                differing.add(name)
            else:
                kept.append((name, r))
                torch.testing.assert_close(o[r], mk[r], rtol=1e-5, atol=1e-6)
    assert clamped == 3464 and kept == [("model.embed_tokens.weight", 443)]
    assert differing == set(ours)


# ---------------------------------------------------------------- nearswap


def nearswap_reference(base, x, t):
    w = (t / (base - x).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * x + (1 - w) * base


@pytest.mark.parametrize("t", [0.0, -1.0, 1e-3, 0.05, 0.3, 1e9])
def test_nearswap_matches_formula(t):
    base = rand(6, 7, seed=26)
    x = base + rand(6, 7, seed=27, scale=0.1, zeros=0.2)
    got = merge([base, x], "nearswap", {"t": t})
    torch.testing.assert_close(got, nearswap_reference(base, x, t), **close)


def test_nearswap_takes_near_values_exactly_and_keeps_the_base_at_t_zero():
    base = rand(50, seed=28)
    x = base + rand(50, seed=29, scale=0.1)
    got = merge([base, x], "nearswap", {"t": 0.05})
    near = (x - base).abs() <= 0.05
    assert near.any() and (~near).any()
    assert torch.equal(got[near], x[near])
    assert torch.equal(merge([base, x], "nearswap", {"t": 0.0}), base)
    assert torch.equal(merge([base, base.clone()], "nearswap", {"t": 0.1}), base)


def test_nearswap_distance_is_clamped_at_1e_minus_6():
    base = torch.ones(3, dtype=torch.float64)
    x = base + torch.tensor([5e-7, -2.5e-7, 4e-6], dtype=torch.float64)
    got = merge([base, x], "nearswap", {"t": 2e-7})
    w = torch.tensor([0.2, 0.2, 0.05], dtype=torch.float64)  # 2e-7 / max(|d|, 1e-6)
    torch.testing.assert_close(got, base + w * (x - base), rtol=1e-12, atol=1e-15)


def test_nearswap_base_position_does_not_matter():
    base = rand(4, 3, seed=30)
    x = base + rand(4, 3, seed=31, scale=0.1)
    torch.testing.assert_close(merge([x, base], "nearswap", {"t": 0.04}, base_index=1),
                               merge([base, x], "nearswap", {"t": 0.04}), **close)


# ---------------------------------------------------------------- arcee_fusion


def arcee_reference(base, x):
    """Spec: importance |x − base|·KL per row; keep importance ≥ median + 1.5·IQR with
    quantile q = sorted[floor(q·(n−1))]."""
    p = torch.softmax(x, -1) + 1e-8
    q = torch.softmax(base, -1) + 1e-8
    importance = (x - base).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
    s = importance.flatten().sort().values
    q1, median, q3 = (s[math.floor(f * (s.numel() - 1))] for f in (0.25, 0.5, 0.75))
    return base + (x - base) * (importance >= median + 1.5 * (q3 - q1))


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6), (17,), (1, 9)])
def test_arcee_fusion_matches_formula(shape):
    base = rand(*shape, seed=32)
    x = base + rand(*shape, seed=33, scale=0.3) * rand(*shape, seed=34).exp()  # heavy tail
    got = merge([base, x], "arcee_fusion")
    want = arcee_reference(base, x)
    torch.testing.assert_close(got, want, **close)
    assert not torch.equal(got, base) and not torch.equal(got, x)


def test_arcee_fusion_quantiles_are_lower_order_statistics():
    """n = 6: q1, median, q3 = sorted[1], sorted[2], sorted[3] → threshold 2 + 1.5·2 = 5 (in
    units of the row's KL): 8 and 10 are kept. Interpolated quantiles (1.25, 2.5, 6.75) would
    give 10.75 and keep nothing."""
    base = torch.zeros(6, dtype=torch.float64)
    x = torch.tensor([3.0, -10.0, 0.0, 8.0, -1.0, 2.0], dtype=torch.float64) * 1e-2
    got = merge([base, x], "arcee_fusion")
    want = torch.tensor([0.0, -10.0, 0.0, 8.0, 0.0, 0.0], dtype=torch.float64) * 1e-2
    torch.testing.assert_close(got, want, **close)


def test_arcee_fusion_rows_of_one_element_take_the_other_model():
    """softmax of one logit is 1: KL = 0, every importance is 0 ≥ threshold 0 (as mergekit)."""
    base = rand(40, 1, seed=46)
    x = base + rand(40, 1, seed=47)
    torch.testing.assert_close(merge([base, x], "arcee_fusion"), arcee_reference(base, x), **close)
    torch.testing.assert_close(merge([base, x], "arcee_fusion"), x, **close)


def test_arcee_fusion_small_and_equal_inputs():
    base = rand(1, seed=35)
    x = base + 0.5
    torch.testing.assert_close(merge([base, x], "arcee_fusion"), x, **close)  # n = 1: kept
    base = rand(4, 5, seed=36)
    assert torch.equal(merge([base, base.clone()], "arcee_fusion"), base)


def test_arcee_fusion_is_exact_and_deterministic_in_float32():
    """No random sampling: the same inputs give the same bits (mergekit samples > 10⁶)."""
    base = rand(300, 64, seed=37).float()
    x = base + rand(300, 64, seed=38, scale=0.05).float()
    a, b = merge([base, x], "arcee_fusion"), merge([base, x], "arcee_fusion")
    assert a.dtype == torch.float32 and torch.equal(a, b)
    want = arcee_reference(base.double(), x.double())
    mismatch = (~torch.isclose(a.double(), want, rtol=1e-5, atol=1e-6)).float().mean()
    assert mismatch < 0.01  # float32 KL noise can flip elements at the threshold


# ---------------------------------------------------------------- properties

fine_tune_sets = st.tuples(st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 7),
                           st.integers(1, 4), st.sampled_from([0.0, 0.5, 0.9]))


@settings(max_examples=30, deadline=None)
@given(fine_tune_sets, st.floats(0.0, 1.0), st.floats(0.0, 0.3), st.data())
def test_order_of_the_fine_tunes_does_not_matter(case, topk, eps, data):
    seed, rows, cols, n, zeros = case
    base = rand(rows, cols, seed=seed)
    xs = fine_tunes(base, n, seed=seed + 1, zeros=zeros)
    perm = data.draw(st.permutations(range(n)))
    for method, params in [("sce", {"select_topk": topk}), ("ram", {"epsilon": eps}),
                           ("ramplus_tl", {"epsilon": eps, "r": 0.5, "alpha": 0.7}),
                           ("model_stock", {"filter_wise": cols > 3})]:
        if method == "model_stock" and n < 2:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # model_stock may clamp
            ref = merge([base, *xs], method, params)
            got = merge([base, *(xs[i] for i in perm)], method, params)
        torch.testing.assert_close(got, ref, **close, msg=method)


@settings(max_examples=30, deadline=None)
@given(fine_tune_sets)
def test_results_stay_between_base_and_fine_tunes(case):
    """ram, model_stock (clamped t) and nearswap never leave the per-element hull."""
    seed, rows, cols, n, zeros = case
    base = rand(rows, cols, seed=seed)
    xs = fine_tunes(base, n, seed=seed + 1, zeros=zeros)
    lo = torch.stack([base, *xs]).min(0).values - 1e-12
    hi = torch.stack([base, *xs]).max(0).values + 1e-12
    outs = [merge([base, *xs], "ram"), merge([base, xs[0]], "nearswap", {"t": 0.1})]
    if n >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs.append(merge([base, *xs], "model_stock", {"filter_wise": True}))
    for out in outs:
        assert ((out >= lo) & (out <= hi)).all()


# ---------------------------------------------------------------- contracts and errors


@pytest.mark.parametrize("method,n,params,match", [
    ("model_stock", 2, {}, "'model_stock' takes at least 3"),
    ("model_stock", 1, {}, "'model_stock' takes at least 3"),
    ("nearswap", 3, {"t": 0.1}, "'nearswap' takes exactly 2 input model.s.*, got 3"),
    ("nearswap", 1, {"t": 0.1}, "'nearswap' takes exactly 2 input model.s.*, got 1"),
    ("arcee_fusion", 3, {}, "'arcee_fusion' takes exactly 2 input model.s.*, got 3"),
    ("arcee_fusion", 1, {}, "'arcee_fusion' takes exactly 2 input model.s.*, got 1"),
])
def test_wrong_input_counts_are_errors(method, n, params, match):
    base = rand(3, 3, seed=39)
    with pytest.raises(MergeError, match=match):
        merge([base, *fine_tunes(base, n - 1, seed=40)], method, params)


@pytest.mark.parametrize("method", MISC)
def test_base_model_is_required(method):
    xs = fine_tunes(rand(3, 3, seed=41), 3 if method == "model_stock" else 2, seed=42)
    params = {"t": 0.1} if method == "nearswap" else {}
    with pytest.raises(MergeError, match=f"'{method}' needs a base model"):
        merge(xs, method, params, base_index=None)


@pytest.mark.parametrize("method,params,match", [
    ("nearswap", {}, "needs the parameter 't'"),
    ("nearswap", {"t": float("nan")}, "'t' is NaN for tensor 'w'"),
    ("sce", {"select_topk": float("nan")}, "'select_topk' is NaN for tensor 'w'"),
    ("ram", {"epsilon": float("nan")}, "'epsilon' is NaN for tensor 'w'"),
    ("ramplus_tl", {"alpha": float("nan")}, "'alpha' is NaN for tensor 'w'"),
    ("sce", {"weight": 0.5}, "unknown parameter 'weight'"),
    ("model_stock", {"filter_wise": 0.5}, "expects a boolean"),
])
def test_invalid_parameters_are_errors(method, params, match):
    base = rand(3, 3, seed=43)
    others = 1 if method == "nearswap" else 2
    with pytest.raises(MergeError, match=match):
        merge([base, *fine_tunes(base, others, seed=44)], method, params)


def test_recipe_with_too_few_models_fails_at_plan_time(tmp_path):
    base = random_tensors(TINY, 0)
    b = write_model(tmp_path / "base", base, TINY)
    a = write_model(tmp_path / "ft_a", random_tensors(TINY, 1, base), TINY)
    recipe = recipe_file(tmp_path, f"merge_method: model_stock\nbase_model: {b}\n"
                                   f"models:\n  - model: {a}\n")
    with pytest.raises(MergeError, match="model_stock' takes at least 3 input"):
        mergesmith.plan(recipe)


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("method,params,n", [
    ("sce", {"select_topk": 0.5}, 3),
    ("ram", {"epsilon": 0.005}, 3),
    ("ramplus_tl", {"epsilon": 0.005, "r": 0.3, "alpha": 0.5}, 3),
    ("model_stock", {"filter_wise": True}, 3),
    ("nearswap", {"t": 0.01}, 1),
    ("arcee_fusion", {}, 1),
])
def test_recipe_merge_equals_merge_tensors(tmp_path, method, params, n):
    """Planning, parameter resolution and execution feed the method what merge_tensors does."""
    base = random_tensors(TINY, 0)
    fts = [random_tensors(TINY, 1 + i, base, scale=0.01 * (i + 1)) for i in range(n)]
    paths = [write_model(tmp_path / f"m{i}", t, TINY) for i, t in enumerate([base, *fts])]
    models = "".join(f"  - model: {p}\n" for p in paths[1:])
    recipe = recipe_file(tmp_path, f"merge_method: {method}\nbase_model: {paths[0]}\n"
                                   f"parameters: {json.dumps(params)}\nmodels:\n{models}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # model_stock may clamp t
        mergesmith.run(recipe, tmp_path / "out", threads=2)
        out = load_model(tmp_path / "out")
        for name, tensor in out.items():
            want = mergesmith.merge_tensors([base[name], *(f[name] for f in fts)], method,
                                            params, base_index=0, name=name)
            assert torch.equal(tensor, want), name


def test_methods_can_be_called_directly_with_merge_inputs():
    """The registered functions take MergeInputs (as the executor calls them)."""
    base = rand(2, 3, seed=45)
    x = base + 0.01
    spec = get_method("nearswap")
    got = spec.fn(MergeInputs([base.clone(), x.clone()], 0, {"t": 1.0}, [{}, {}], "w"))
    assert torch.equal(got, x)


@pytest.mark.parametrize("filter_wise,n_models", [(False, 2), (True, 2), (False, 4)])
def test_model_stock_of_large_tensors_streams_row_chunks_bit_identically(filter_wise,
                                                                         n_models, tmp_path):
    """2-D tensors of more than 2^20 elements are merged in row chunks: the whole
    tensor's t comes from a streamed first pass (the offsets' Gram matrix over the same
    float64 pieces as on the whole tensor); per-row t needs none. The bytes equal the
    whole-tensor merge with default chunks, tiny chunks and 1 or 2 threads, and with four
    fine-tunes, where the first pass reads blocks of fewer rows (whole pieces)."""
    import dataclasses

    from safetensors.torch import load_file

    from mergesmith.execute import execute, statistic_block_rows
    from mergesmith.methods import merge_tensors

    config = dict(LLAMA, vocab_size=4096, hidden_size=512, intermediate_size=2304,
                  num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8)
    base = random_tensors(config, 0)
    folders = [write_model(tmp_path / "base", base, config)]
    shared = random_tensors(config, 9, base, scale=0.3)  # agreeing: t inside (0, 1)
    for k in range(1, n_models + 1):
        folders.append(write_model(tmp_path / f"ft{k}",
                                   random_tensors(config, k, shared, scale=0.2), config))
    recipe = (f"merge_method: model_stock\nbase_model: {folders[0]}\nmodels:\n"
              + "".join(f"  - model: {f}\n" for f in folders[1:])
              + f"parameters: {{filter_wise: {str(filter_wise).lower()}}}\ndtype: bfloat16\n")
    plan = mergesmith.plan(recipe)
    embed = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    assert embed.elementwise  # streamed: 2 blocks of 2048 rows
    down = next(t for t in plan.tensors if t.name.endswith("down_proj.weight"))
    assert down.shape == (512, 2304) and down.elementwise  # pieces of 113 rows (not 2^18)
    if n_models > 2:  # the first pass holds fewer rows than alone, in whole pieces
        how = plan.bound(down).spec.scheduling.statistic
        rows = statistic_block_rows(how, down.shape, n_models + 1)
        assert rows < how.rows(down.shape) and rows % 113 == 0
    with no_warnings():
        mergesmith.run(recipe, tmp_path / "out")
    outs = [load_file(str(tmp_path / "out" / "model.safetensors"))]
    for threads in (1, 2):  # row chunks of 96 rows: not aligned with the 2048-row blocks
        folder = tmp_path / f"chunks{threads}"
        folder.mkdir()
        small = dataclasses.replace(plan, options=dataclasses.replace(plan.options,
                                                                      threads=threads))
        execute(small, str(folder), chunk_elements=96 * 512)
        outs.append(load_file(str(folder / "model.safetensors")))
    inputs = [load_file(str(f / "model.safetensors")) for f in folders]
    for name in outs[0]:
        whole = merge_tensors([x[name].to(torch.bfloat16) for x in inputs], "model_stock",
                              {"filter_wise": filter_wise}, base_index=0,
                              out_dtype=torch.bfloat16)
        for out in outs:
            assert torch.equal(out[name], whole), name
        if name == "model.embed_tokens.weight":  # not the base or the plain mean
            assert not torch.equal(whole, inputs[0][name].to(torch.bfloat16))

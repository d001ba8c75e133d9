"""The task-vector family against written-out float64 references, plus sparsifier properties."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import LLAMA, random_tensors, recipe_file, write_model
from hypothesis import given, settings
from hypothesis import strategies as st

import mergesmith
from mergesmith import MergeError, merge_tensors
from mergesmith.methods import sparsify

# ------------------------------------------------------------------ references


def stable_positions(delta: torch.Tensor) -> torch.Tensor:
    """Position of each element in the stable ascending order of |δ| (flat)."""
    order = torch.sort(delta.abs().flatten(), stable=True).indices
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel())
    return pos.view(delta.shape)


def ref_magnitude(delta, density):
    if density >= 1:
        return delta.clone()
    n = delta.numel()
    if density <= 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * n))
    return delta * (stable_positions(delta) >= n - k)


def ref_breadcrumbs(delta, density, gamma):
    if density >= 1:
        return delta.clone()
    n = delta.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    pos = stable_positions(delta)
    return delta * ((pos >= n_bot) & (pos < n_bot + target))


def ref_gta(base, xs, weights, sparse=None, consensus=False, normalize=False, lam=1.0):
    """base + λ·combine(wᵢ·sparse(xᵢ − base)), all in float64, written out."""
    base = base.double()
    deltas = [(x.double() - base) for x in xs]
    if sparse is not None:
        deltas = [sparse(d) for d in deltas]
    W = [w * d for w, d in zip(weights, deltas)]
    if consensus:
        total = sum(W)
        majority = torch.where(total >= 0, 1.0, -1.0).double()
        masks = [(torch.sign(wd) == majority).double() for wd in W]
        mixed = sum(wd * mk for wd, mk in zip(W, masks))
        divisor = sum(w * mk for w, mk in zip(weights, masks))
        divisor[divisor == 0] = 1.0
    else:
        mixed = sum(W)
        divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture
def inputs():
    base = rand(6, 9, seed=0)
    return base, [base + 0.1 * rand(6, 9, seed=s) for s in (1, 2, 3)]


def merge(method, base, xs, **params):
    return merge_tensors([base, *xs], method, params, base_index=0).double()


# ------------------------------------------------------------------ formulas


@pytest.mark.parametrize("densities", [[0.5, 0.7, 0.3], [1.0, 1.0, 1.0], [0.0, 0.2, 1.0],
                                       [0.01, 0.99, 0.5]])
def test_ties_matches_reference(inputs, densities):
    base, xs = inputs
    weights = [1.0, 0.6, -0.4]
    got = merge("ties", base, xs, weight=weights, density=densities, **{"lambda": 0.9})
    deltas_ref = [ref_magnitude(x.double() - base.double(), d) for x, d in zip(xs, densities)]
    want = ref_gta(base, [base.double() + d for d in deltas_ref], weights,
                   consensus=True, normalize=True, lam=0.9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_ties_with_density_one_is_sign_consensus_task_arithmetic(inputs):
    base, xs = inputs
    w = [0.3, 0.9, 0.5]
    got = merge("ties", base, xs, weight=w)
    want = ref_gta(base, xs, w, consensus=True, normalize=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.9, 0.2), (0.3, 0.0), (0.5, 0.8)])
def test_breadcrumbs_match_reference(inputs, method, density, gamma):
    base, xs = inputs
    w = [0.5, 0.25, 1.5]
    got = merge(method, base, xs, weight=w, density=density, gamma=gamma, normalize=True)
    sparse_xs = [base.double() + ref_breadcrumbs(x.double() - base.double(), density, gamma)
                 for x in xs]
    want = ref_gta(base, sparse_xs, w, consensus=method.endswith("ties"), normalize=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_consensus_with_negative_and_zero_weights(inputs):
    base, xs = inputs
    w = [0.0, -0.5, 1.0]
    got = merge("ties", base, xs, weight=w, density=0.6)
    sparse_xs = [base.double() + ref_magnitude(x.double() - base.double(), 0.6) for x in xs]
    want = ref_gta(base, sparse_xs, w, consensus=True, normalize=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dare_with_density_one_is_task_arithmetic(inputs):
    base, xs = inputs
    w = [0.4, 0.4, 0.2]
    for method, consensus in (("dare_linear", False), ("dare_ties", True)):
        got = merge(method, base, xs, weight=w, normalize=True, **{"lambda": 1.2})
        want = ref_gta(base, xs, w, consensus=consensus, normalize=True, lam=1.2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_one_model_at_weight_one_returns_itself(inputs):
    base, xs = inputs
    for method in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                   "della_linear"):
        got = merge(method, base, xs[:1], weight=1.0)
        torch.testing.assert_close(got, xs[0].double(), rtol=1e-6, atol=1e-6, msg=method)


def test_base_alone_returns_base(inputs):
    base, _ = inputs
    for method in ("ties", "dare_ties", "della"):
        assert torch.equal(merge_tensors([base], method, {}, base_index=0), base)


def test_fine_tune_order_does_not_matter_for_deterministic_members(inputs):
    base, xs = inputs
    w, d = [0.2, 0.7, 0.4], [0.5, 0.8, 0.3]
    for method in ("ties", "breadcrumbs_ties", "task_arithmetic"):
        a = merge(method, base, xs, weight=w, density=d)
        b = merge(method, base, xs[::-1], weight=w[::-1], density=d[::-1])
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=method)


def test_task_arithmetic_accepts_density_and_rescale_like_mergekit(inputs):
    base, xs = inputs
    a = merge("task_arithmetic", base, xs, weight=0.3, density=0.2, rescale=True)
    torch.testing.assert_close(a, ref_gta(base, xs, [0.3] * 3), rtol=1e-5, atol=1e-6)


def test_one_dimensional_tensors(inputs):
    base = rand(17, seed=4)
    xs = [base + 0.1 * rand(17, seed=5), base + 0.1 * rand(17, seed=6)]
    got = merge("breadcrumbs_ties", base, xs, weight=[1.0, 1.0], density=0.5, gamma=0.1)
    sparse_xs = [base.double() + ref_breadcrumbs(x.double() - base.double(), 0.5, 0.1)
                 for x in xs]
    want = ref_gta(base, sparse_xs, [1.0, 1.0], consensus=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ sparsifiers


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), lo=st.integers(0, 320), width=st.integers(0, 320),
       distinct=st.sampled_from([3, 1000]), seed=st.integers(0, 10**6))
def test_keep_rank_range_matches_stable_sort(n, lo, width, distinct, seed):
    g = torch.Generator().manual_seed(seed)
    v = (torch.randint(-distinct, distinct, (n,), generator=g) / 7).float()  # many ties
    want = v * ((stable_positions(v) >= lo) & (stable_positions(v) < lo + width))
    got = v.clone()
    sparsify.apply_mask_(got, sparsify.rank_range_mask(got, lo, lo + width))
    assert torch.equal(got, want)


@pytest.mark.parametrize("ties", [False, True])
def test_selection_on_tensors_larger_than_the_sampling_threshold(ties, monkeypatch):
    monkeypatch.setattr(sparsify, "CHUNK", 1 << 12)  # exercise the bracketed path cheaply
    g = torch.Generator().manual_seed(1)
    n = 100_003
    v = torch.randint(-50, 50, (n,), generator=g).float() if ties else torch.randn(n, generator=g)
    for lo, hi in ((n - 4000, n), (31_000, 77_000), (0, 5), (n - 1, n)):
        got = v.clone()
        sparsify.apply_mask_(got, sparsify.rank_range_mask(got, lo, hi))
        pos = stable_positions(v)
        assert torch.equal(got, v * ((pos >= lo) & (pos < hi))), (lo, hi)
        assert int((got != 0).sum()) <= hi - lo


@pytest.mark.parametrize("density", [0.0, 0.001, 0.1, 0.5, 0.999, 1.0])
def test_magnitude_keeps_exactly_the_documented_count(density):
    d = rand(40, 25, seed=9)
    out = d.clone()
    sparsify.apply_mask_(out, sparsify.magnitude_mask(out, density))
    n = d.numel()
    expected = n if density >= 1 else 0 if density <= 0 else max(1, int(density * n))
    assert int((out != 0).sum()) == expected
    if 0 < density < 1:  # and they are the largest ones
        assert out[out != 0].abs().min() >= d.abs().flatten().sort().values[n - expected]


@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.3, 0.3), (0.8, 0.5), (0.2, 0.0)])
def test_breadcrumbs_keeps_exactly_target(density, gamma):
    d = rand(30, 11, seed=3)
    out = d.clone()
    sparsify.apply_mask_(out, sparsify.magnitude_outliers_mask(out, density, gamma))
    assert int((out != 0).sum()) == int(density * d.numel())


def test_dare_rescale_preserves_l1_and_keeps_about_density():
    base = torch.zeros(200, 300)
    x = rand(200, 300, seed=2)
    for density in (0.1, 0.5, 0.9):
        out = merge_tensors([base, x], "dare_linear", {"weight": 1.0, "density": density},
                            base_index=0, seed=3)
        kept = float((out != 0).float().mean())
        assert abs(kept - density) < 0.01
        assert float(out.abs().sum()) == pytest.approx(float(x.abs().sum()), rel=1e-5)
        no_rescale = merge_tensors([base, x], "dare_linear",
                                   {"weight": 1.0, "density": density, "rescale": False},
                                   base_index=0, seed=3)
        assert torch.equal(no_rescale != 0, out != 0)  # same mask, only the scale differs


def test_dare_density_zero_gives_the_base(inputs):
    base, xs = inputs
    got = merge_tensors([base, *xs], "dare_ties", {"weight": 1.0, "density": 0.0}, base_index=0)
    assert torch.equal(got, base)


def test_della_keep_probability_rises_with_magnitude_rank():
    rows, width = 4000, 10
    delta = torch.arange(1, width + 1).float().repeat(rows, 1)  # rank = column
    g = torch.Generator().manual_seed(0)
    out = delta.clone()
    sparsify.apply_mask_(out, sparsify.della_mask(out, 0.5, 0.2, g))
    kept = (out != 0).float().mean(0)
    expected = 0.5 - 0.2 + 0.4 * torch.arange(width) / (width - 1)
    assert torch.allclose(kept, expected, atol=0.03)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), width=st.integers(1, 300), levels=st.integers(1, 40),
       seed=st.integers(0, 2**31 - 1))
def test_della_row_order_is_the_stable_argsort(rows, width, levels, seed):
    """DELLA's ranks sort |δ| per row by its bits with the column as tie-break: exactly
    argsort(stable=True), with many ties, zeros, -0.0 and infinities."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(-levels, levels + 1, (rows, width), generator=g).float() / 7
    v[0, 0] = -0.0
    if width > 2:
        v[-1, 1], v[-1, 2] = float("inf"), float("-inf")
    a = v.abs()
    expected = a.argsort(dim=1, stable=True)
    assert torch.equal(sparsify._stable_row_order(a), expected)
    with pytest.MonkeyPatch.context() as mp:  # without numpy: torch's sort, same order
        mp.setattr(sparsify, "_numpy", lambda: None)
        assert torch.equal(sparsify._stable_row_order(a), expected)


@settings(max_examples=120, deadline=None)
@given(rows=st.integers(1, 6), width=st.integers(1, 700), levels=st.integers(1, 40),
       jitter=st.integers(0, 9), spread=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_della_narrow_keys_give_the_stable_argsort(rows, width, levels, jitter, spread, seed):
    """The 32-bit keys give exactly argsort(stable=True): values that share their coarse
    bits but differ in the low ones (``jitter`` ulps), zeros, and spans wide enough that
    only a few bits of the value fit next to the column."""
    pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, levels + 1, (rows, width), generator=g).float() / 7
    bits = v.view(torch.int32)
    bits += torch.randint(0, jitter + 1, bits.shape, generator=g, dtype=torch.int32) * (bits != 0)
    if spread:
        v.view(-1)[0] = 1e-30
        v.view(-1)[-1] = float("inf")
    expected = v.argsort(dim=1, stable=True)
    narrow = sparsify._NarrowKeys()
    assert torch.equal(narrow.order(v), expected)
    assert torch.equal(sparsify._stable_row_order(v, narrow), expected)


def test_della_narrow_keys_sort_misfits_again_and_give_up_when_most_rows_misfit():
    """Rows whose near-equal values come out of column order are sorted again (exact);
    once most of a block's rows had to be (or of the rows probed first), the tensor's
    later blocks skip the path."""
    pytest.importorskip("numpy")
    width = 600
    row = torch.linspace(1e-6, 1.0, width)  # a span of 2^28 ulps: coarse steps of 2^8
    odd = row.clone()
    low = int(row.view(torch.int32)[0])
    start = low + ((int(row.view(torch.int32)[10]) - low) >> 8 << 8) + 16
    odd.view(torch.int32)[10] = start + 1  # one ulp apart, in one coarse step, reversed
    odd.view(torch.int32)[11] = start

    few = torch.stack([row] * 7 + [odd])  # 1 of 8 rows misfits
    narrow = sparsify._NarrowKeys()
    assert torch.equal(narrow.order(few), few.argsort(dim=1, stable=True))
    assert narrow.useful

    most = torch.stack([odd] * 7 + [row])
    assert torch.equal(narrow.order(most), most.argsort(dim=1, stable=True))
    assert not narrow.useful
    assert narrow.order(most) is None
    assert torch.equal(sparsify._stable_row_order(most, narrow),
                       most.argsort(dim=1, stable=True))

    # a tensor whose first rows misfit is given up after a probe of those rows alone
    narrow = sparsify._NarrowKeys()
    block = torch.stack([odd] * 20 + [row] * 20)
    assert narrow.order(block) is None and not narrow.useful
    assert torch.equal(sparsify._stable_row_order(block, narrow),
                       block.argsort(dim=1, stable=True))


def test_della_masks_are_the_same_with_and_without_narrow_keys(monkeypatch):
    """The path that sorts narrow keys changes no decision (bf16-like deltas, rows in the
    width range where it is used, and a float32 tensor where it gives up)."""
    pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(5)
    base = torch.randn(300, 1024, generator=g).mul(0.02).bfloat16().float()
    tuned = (base + torch.randn(300, 1024, generator=g).mul(0.002)).bfloat16().float()
    for delta in (tuned - base, torch.randn(300, 1024, generator=g)):
        masks = []
        for widths in (sparsify._NarrowKeys.WIDTHS, range(0)):
            monkeypatch.setattr(sparsify._NarrowKeys, "WIDTHS", widths)
            out = delta.clone()
            sparsify.apply_mask_(out, sparsify.della_mask(
                out, 0.5, 0.1, torch.Generator().manual_seed(9)))
            masks.append(out != 0)
        assert torch.equal(masks[0], masks[1])


def test_della_row_order_uses_numpy_when_installed():
    """The fast sort is really taken where numpy is installed (the test environment)."""
    pytest.importorskip("numpy")
    assert sparsify._numpy() is not None


@settings(max_examples=80, deadline=None)
@given(n=st.integers(1, 200), skip=st.integers(0, 9), p=st.floats(0, 1),
       seed=st.integers(0, 2**31 - 1), data=st.data())
def test_random_drop_bits_pack_and_unpack_exactly(n, skip, p, seed, data):
    """Packed keep bits (DARE, DELLA): byte j holds flags 8j … 8j+7, the first in the lowest
    bit (the written-out per-byte sum), from any slice; unpacking any range gives them back
    as 0/1 bytes."""
    g = torch.Generator().manual_seed(seed)
    keep = (torch.rand(n + skip, generator=g) < p)[skip:]  # misaligned views too
    flags = torch.cat([keep.to(torch.uint8), torch.zeros(-n % 8, dtype=torch.uint8)])
    by_sum = (flags.view(-1, 8).to(torch.int64) * (2 ** torch.arange(8))).sum(1)
    packed = sparsify._pack(keep)
    assert torch.equal(packed, by_sum.to(torch.uint8))
    start = data.draw(st.integers(0, n))
    end = data.draw(st.integers(start, n))
    back = sparsify._unpack(packed, start, end)
    assert back.dtype == torch.uint8 and torch.equal(back, keep[start:end].to(torch.uint8))


def test_della_one_element_rows_use_rank_one_half():
    g = torch.Generator().manual_seed(0)
    out = torch.ones(20000, 1)
    sparsify.apply_mask_(out, sparsify.della_mask(out, 0.4, 0.3, g))
    assert abs(float((out != 0).float().mean()) - 0.4) < 0.02


def test_della_rejects_density_epsilon_outside_unit_interval(inputs):
    base, xs = inputs
    with pytest.raises(MergeError, match="must stay inside"):
        merge_tensors([base, xs[0]], "della", {"weight": 1.0, "density": 0.1}, base_index=0)
    merge_tensors([base, xs[0]], "della", {"weight": 1.0, "density": 0.1, "epsilon": 0.05},
                  base_index=0)


def test_della_matches_reference_given_the_same_mask(inputs):
    """Reproduce DELLA with the same generator stream: rank probabilities, bernoulli, L1."""
    base, xs = inputs
    w, density, eps = [0.7, 0.3], 0.5, 0.1
    got = merge_tensors([base, *xs[:2]], "della", {"weight": w, "density": density,
                                                   "epsilon": eps, "lambda": 1.1},
                        base_index=0, seed=5, name="t").double()
    g = mergesmith.methods.tensor_generator(5, "t")
    deltas = []
    for x in xs[:2]:
        d = (x - base)
        order = d.abs().argsort(dim=1, stable=True)
        rank = torch.empty_like(d).scatter_(1, order, torch.arange(d.shape[1]).float()
                                           .expand_as(d)) / (d.shape[1] - 1)
        mask = torch.bernoulli(density - eps + 2 * eps * rank, generator=g)
        pruned = d.double() * mask.double()
        deltas.append(pruned * d.double().abs().sum() / pruned.abs().sum())
    want = ref_gta(base, [base.double() + d for d in deltas], w, consensus=True,
                   normalize=True, lam=1.1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ determinism


def test_random_methods_reproducible_and_seed_dependent(inputs):
    base, xs = inputs
    p = {"weight": [0.5, 0.5, 0.5], "density": 0.5}
    a = merge_tensors([base, *xs], "dare_ties", p, base_index=0, seed=7, name="w")
    b = merge_tensors([base, *xs], "dare_ties", p, base_index=0, seed=7, name="w")
    c = merge_tensors([base, *xs], "dare_ties", p, base_index=0, seed=8, name="w")
    d = merge_tensors([base, *xs], "dare_ties", p, base_index=0, seed=7, name="other")
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


@pytest.mark.parametrize("method,extra", [("dare_ties", ""), ("della", "      epsilon: 0.1\n")])
def test_seeded_recipe_is_bit_identical_across_runs_and_threads(tmp_path, method, extra):
    base = random_tensors(LLAMA, 0)
    paths = [write_model(tmp_path / "base", base)]
    for s in (1, 2):
        paths.append(write_model(tmp_path / f"ft{s}", random_tensors(LLAMA, s, base)))
    recipe = recipe_file(tmp_path, f"""merge_method: {method}
base_model: {paths[0]}
models:
  - model: {paths[1]}
    parameters:
      weight: 0.6
      density: 0.5
{extra}  - model: {paths[2]}
    parameters:
      weight: 0.4
      density: 0.7
{extra}""")

    def digest(out):
        return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()

    runs = {}
    for name, threads, seed in (("a", 1, 7), ("b", 4, 7), ("c", 2, 7), ("d", 1, 8)):
        mergesmith.run(recipe, tmp_path / name, threads=threads, seed=seed)
        runs[name] = digest(tmp_path / name)
    assert runs["a"] == runs["b"] == runs["c"]
    assert runs["a"] != runs["d"]


# ------------------------------------------------------------------ streamed decisions

STREAMED = [
    ("ties", "density: 0.3"),
    ("breadcrumbs", "density: 0.5, gamma: 0.05"),
    ("breadcrumbs_ties", "density: 0.4, gamma: 0.1"),
    ("dare_ties", "density: 0.5"),
    ("dare_linear", "density: 0.3"),
    ("della", "density: 0.5, epsilon: 0.1"),
    ("della_linear", "density: 0.6, epsilon: 0.2"),
]
SHARED = {"breadcrumbs_ties": {"rescale": True}, "della_linear": {"rescale": False}}


@pytest.mark.parametrize("n_models", [2, 4])
@pytest.mark.parametrize("method,params", STREAMED, ids=[m for m, _ in STREAMED])
def test_sparsified_merges_stream_row_chunks_bit_identically(method, params, n_models,
                                                             tmp_path, monkeypatch):
    """Large tensors of the sparsifying methods are merged in row chunks: the engine
    streams the decisions (magnitude thresholds with per-row tie counts, random draws kept
    as bits, L1 norms) block by block first, so the bytes equal the whole-tensor merge —
    with tiny chunks and blocks (sampled brackets, chunks across random-stream chunks),
    1 or 2 threads, and with four fine-tunes, where blocks and chunks hold fewer rows."""
    import dataclasses
    import json

    from conftest import LLAMA, random_tensors, write_model
    from safetensors.torch import load_file

    import mergesmith
    from mergesmith.execute import execute
    from mergesmith.methods import task_arithmetic

    monkeypatch.setattr(sparsify, "CHUNK", 1 << 12)
    monkeypatch.setattr(task_arithmetic, "_BLOCK_ELEMENTS", 9 * 1000)  # not whole chunks
    config = dict(LLAMA, vocab_size=1000, hidden_size=96, intermediate_size=72,
                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4)
    base = random_tensors(config, 0)
    folders = [write_model(tmp_path / "base", base, config, dtype=torch.bfloat16)]
    weights = [0.7, 0.5, -0.2, 0.4][:n_models]
    for k in range(1, n_models + 1):
        folders.append(write_model(tmp_path / f"ft{k}", random_tensors(config, k, base),
                                   config, dtype=torch.bfloat16))
    recipe = (f"merge_method: {method}\nbase_model: {folders[0]}\nmodels:\n"
              + "".join(f"  - model: {f}\n    parameters: {{weight: {w}, {params}}}\n"
                        for f, w in zip(folders[1:], weights))
              + f"parameters: {json.dumps(SHARED.get(method, {}))}\ndtype: bfloat16\n")
    plan = mergesmith.plan(recipe, seed=5)
    embed = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    assert embed.elementwise  # streamed
    outs = []
    for threads in (1, 2):  # row chunks of 7 rows
        folder = tmp_path / f"chunks{threads}"
        folder.mkdir()
        small = dataclasses.replace(plan, options=dataclasses.replace(plan.options,
                                                                      threads=threads))
        execute(small, str(folder), chunk_elements=7 * 96)
        outs.append(load_file(str(folder / "model.safetensors")))
    inputs = [load_file(str(f / "model.safetensors")) for f in folders]
    parameters = dict(p.split(": ") for p in params.split(", "))
    parameters = {k: v == "true" if v in ("true", "false") else float(v)
                  for k, v in parameters.items()}
    streamed = 0
    for name in outs[0]:
        t = next(t for t in plan.tensors if t.name == name)
        streamed += t.elementwise
        whole = merge_tensors([x[name] for x in inputs], method,
                              {**parameters, **SHARED.get(method, {}), "weight": weights},
                              base_index=0, seed=5,
                              name=name, out_dtype=torch.bfloat16)
        for out in outs:
            assert torch.equal(out[name], whole), name
    assert streamed >= 2  # the embedding and the head

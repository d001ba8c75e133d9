"""The data-free methods of 2024–2026 against naive, written-out versions of their papers'
equations (float64, loops), on small random, low-rank, orthogonal and conflicting task
vectors; plus the properties the math promises."""

from __future__ import annotations

import pytest
import torch

from mergesmith import merge_tensors
from mergesmith.methods.linalg import randomized_svd
from mergesmith.methods.svc import singular_value_calibration

D = torch.float64


def g(seed):
    return torch.Generator().manual_seed(seed)


def case(kind, shape=(7, 5), tasks=3, seed=0):
    """base and expert tensors whose task vectors are random, low-rank, mutually
    orthogonal or conflicting."""
    base = torch.randn(*shape, generator=g(seed))
    rows, cols = shape
    if kind == "random":
        taus = [0.1 * torch.randn(*shape, generator=g(seed + i + 1)) for i in range(tasks)]
    elif kind == "low_rank":
        taus = [0.1 * torch.randn(rows, 1, generator=g(seed + i + 1))
                @ torch.randn(1, cols, generator=g(seed + 10 + i)) for i in range(tasks)]
    elif kind == "orthogonal":
        q_left, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g(seed + 1)))
        q_right, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g(seed + 2)))
        taus = [(0.2, 0.5, 1.1)[i] * torch.outer(q_left[:, i], q_right[:, i]) for i in range(tasks)]
    elif kind == "conflicting":
        t = 0.1 * torch.randn(*shape, generator=g(seed + 1))
        taus = [t, -0.9 * t, 0.5 * t + 0.05 * torch.randn(*shape, generator=g(seed + 2))][:tasks]
    return base, [base + t for t in taus]


KINDS = ["random", "low_rank", "orthogonal", "conflicting"]


def run(method, base, xs, **params):
    return merge_tensors([base, *xs], method, params, base_index=0).to(D)


def close(got, want, tol=2e-5):
    torch.testing.assert_close(got.to(D), want.to(D), rtol=tol, atol=tol)


def deltas(base, xs):
    return [x.to(D) - base.to(D) for x in xs]


# ------------------------------------------------------------------ element-wise


@pytest.mark.parametrize("kind", KINDS)
def test_magmax(kind):
    base, xs = case(kind)
    w = [1.0, 0.5, 2.0]
    taus = deltas(base, xs)
    want = base.to(D).clone()
    for r in range(base.shape[0]):
        for c in range(base.shape[1]):
            vals = [wi * t[r, c] for wi, t in zip(w, taus)]
            best = vals[0]
            for v in vals[1:]:
                if abs(v) > abs(best):
                    best = v
            want[r, c] += 0.8 * best
    close(run("magmax", base, xs, weight=w, **{"lambda": 0.8}), want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_consensus_ta(kind, k):
    base, xs = case(kind)
    w, lam_t = [1.0, 0.7, 1.3], [0.6, 0.4, 0.5]
    taus = deltas(base, xs)
    mtl = sum(wi * t for wi, t in zip(w, taus))
    want = base.to(D).clone()
    for r in range(base.shape[0]):
        for c in range(base.shape[1]):
            votes = sum(1 for t, lt in zip(taus, lam_t)
                        if abs(t[r, c]) >= lt * abs(mtl[r, c] - t[r, c]))
            if votes >= k:
                want[r, c] += 1.1 * mtl[r, c]
    got = run("consensus_ta", base, xs, weight=w, tall_lambda=lam_t, k=k, **{"lambda": 1.1})
    close(got, want)


def test_consensus_with_k_1_and_no_threshold_keeps_everything():
    base, xs = case("random")
    got = run("consensus_ta", base, xs, k=1, tall_lambda=0.0)
    close(got, run("task_arithmetic", base, xs, weight=1.0))


def test_consensus_ties_is_ties_masked_by_consensus():
    base, xs = case("random")
    p = {"density": 0.6, "k": 2, "tall_lambda": 0.5}
    ties = run("ties", base, xs, weight=1.0, density=0.6)
    taus = deltas(base, xs)
    mtl = sum(taus)
    votes = sum((t.abs() >= 0.5 * (mtl - t).abs()).to(D) for t in taus)
    want = base.to(D) + (ties - base.to(D)) * (votes >= 2)
    close(run("consensus_ties", base, xs, **p), want)


# ------------------------------------------------------------------ spectral


def svd(x):
    """Thin SVD without the (arbitrary) directions of zero singular value."""
    u, s, vh = torch.linalg.svd(x.to(D), full_matrices=False)
    r = int((s > s[0] * 1e-6).sum())
    return u[:, :r], s[:r], vh[:r]


def polar(x):
    p, _, qh = svd(x)
    return p @ qh


@pytest.mark.parametrize("kind", KINDS)
def test_iso_c(kind):
    base, xs = case(kind)
    w = [1.0, 0.5, 1.5]
    m = sum(wi * t for wi, t in zip(w, deltas(base, xs)))
    u, s, vh = svd(m)
    want = base.to(D) + 1.3 * s.mean() * u @ vh
    got = run("iso_c", base, xs, weight=w, **{"lambda": 1.3})
    close(got, want)
    merged = (got - base.to(D)) / 1.3
    sv = torch.linalg.svdvals(merged)
    sv = sv[sv > 1e-4 * sv[0]]  # isotropic on the task matrix's own (numerical) rank
    assert torch.allclose(sv, sv.mean().expand_as(sv), rtol=1e-4)


WELL_POSED = ["random", "low_rank", "orthogonal"]  # conflicting tasks share directions, and
# the polar factor of duplicated directions is not unique (a property of the method)


@pytest.mark.parametrize("kind", WELL_POSED)
def test_iso_cts(kind):
    base, xs = case(kind, shape=(9, 8), tasks=3)
    taus = deltas(base, xs)
    m = sum(taus)
    u, s, vh = svd(m)
    r = 8
    k = min(int(0.5 * r), s.numel())
    per = (r - k) // 3
    us, vs, vals = [u[:, :k]], [vh[:k].T], [s[:k]]
    proj = torch.eye(9, dtype=D) - u[:, :k] @ u[:, :k].T
    for t in taus:
        tu, ts, tvh = torch.linalg.svd(proj @ t, full_matrices=False)
        n = min(per, int((ts > 1e-5 * s[0]).sum()))  # real directions only
        us.append(tu[:, :n])
        vs.append(tvh[:n].T)
        vals.append(ts[:n])
    want = base.to(D) + torch.cat(vals).mean() * polar(torch.cat(us, 1)) @ polar(torch.cat(vs, 1)).T
    close(run("iso_cts", base, xs, common_fraction=0.5), want, tol=1e-4)


@pytest.mark.parametrize("kind", WELL_POSED)
def test_tsv_m(kind):
    base, xs = case(kind, shape=(8, 6))
    taus = [wi * t for wi, t in zip([1.0, 2.0, 0.5], deltas(base, xs))]
    k = 6 // 3
    us, ss, vs = [], [], []
    for t in taus:
        u, s, vh = svd(t)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    want = base.to(D) + 0.9 * polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vs, 1)).T
    close(run("tsv_m", base, xs, weight=[1.0, 2.0, 0.5], **{"lambda": 0.9}), want, tol=1e-4)


def test_tsv_m_with_one_task_is_a_truncation():
    base, xs = case("random", shape=(8, 6), tasks=1)
    u, s, vh = svd(deltas(base, xs)[0])
    want = base.to(D) + (u[:, :3] * s[:3]) @ vh[:3]
    close(run("tsv_m", base, xs, rank_fraction=0.5), want, tol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_cart(kind):
    _, xs = case(kind, shape=(8, 6))
    mean = sum(x.to(D) for x in xs) / len(xs)
    k = max(1, int(0.34 * 6))
    want = mean.clone()
    for x in xs:
        u, s, vh = svd(x.to(D) - mean)
        want += 0.7 * (u[:, :k] * s[:k]) @ vh[:k]
    got = merge_tensors(xs, "cart", {"rank_fraction": 0.34, "lambda": 0.7}).to(D)
    close(got, want)


def test_cart_of_one_model_is_that_model():
    _, xs = case("random", tasks=1)
    close(merge_tensors(xs, "cart", {}), xs[0])


def decaying(shape, rank, seed, noise=1e-5):
    """A matrix with `rank` strong directions and a small full-rank remainder."""
    rows, cols = shape
    low = torch.randn(rows, rank, generator=g(seed)) @ torch.randn(rank, cols, generator=g(seed + 1))
    return 0.1 * low + noise * torch.randn(rows, cols, generator=g(seed + 2))


def test_randomized_svd_matches_the_exact_top_directions():
    x = decaying((200, 120), rank=6, seed=3)
    u, s, vh = randomized_svd(x, 6, g(0))
    eu, es, evh = torch.linalg.svd(x.to(D), full_matrices=False)
    torch.testing.assert_close(s.to(D), es[:6], rtol=1e-5, atol=0)
    # same subspaces: the projections onto them agree
    close(u.to(D) @ u.T.to(D), eu[:, :6] @ eu[:, :6].T, tol=1e-4)
    close(vh.T.to(D) @ vh.to(D), evh[:6].T @ evh[:6], tol=1e-4)
    again = randomized_svd(x, 6, g(0))
    assert all(torch.equal(a, b) for a, b in zip((u, s, vh), again))


@pytest.mark.parametrize("method,params", [("tsv_m", {"rank_fraction": 0.15}),
                                           ("cart", {"rank_fraction": 0.05})])
def test_randomized_svd_option_approximates_the_exact_merge(method, params):
    base = torch.randn(120, 90, generator=g(1))
    xs = [base + decaying((120, 90), rank=4, seed=10 * i) for i in range(1, 4)]
    exact = run(method, base, xs, randomized_svd=False, **params) - base.to(D)
    fast = run(method, base, xs, randomized_svd=True, **params) - base.to(D)
    assert not torch.equal(fast, exact)
    assert float((fast - exact).norm() / exact.norm()) < 1e-3
    assert torch.equal(fast, run(method, base, xs, randomized_svd=True, **params) - base.to(D))


@pytest.mark.parametrize("method,shape,params,randomized", [
    ("cart", (2816, 1024), {}, True),  # keeps 81 of 1024 directions: several times cheaper
    ("tsv_m", (2816, 1024), {}, False),  # 341 of 1024 per task (3 tasks): about even
    ("tsv_m", (1024, 1024), {"rank_fraction": 0.1}, True),
    ("iso_cts", (1024, 1024), {}, True),  # each task adds ⌊(1024 − 819)/3⌋ = 68 directions
    ("cart", (64, 48), {"rank_fraction": 0.5}, False),  # k near the rank: never randomized
])
def test_unset_randomized_svd_follows_the_cost_model(method, shape, params, randomized):
    from mergesmith.methods import get_method
    from mergesmith.methods.contract import bind_mapping

    spec = get_method(method)
    name = "model.layers.0.mlp.up_proj.weight"

    def work(extra):
        bound = bind_mapping(spec, {**params, **extra}, 4, 0, tensor_name=name)[1].params
        return spec.cost.compute(name, shape, 3, bound)

    unset, forced, other = work({}), work({"randomized_svd": randomized}), \
        work({"randomized_svd": not randomized})
    assert unset == forced
    if randomized:  # chosen because the model expects it to be at least twice as fast
        assert unset != other and 2 * forced.seconds() <= other.seconds()


def test_unset_randomized_svd_merges_as_the_path_it_chooses():
    base = torch.randn(300, 200, generator=g(1))
    xs = [base + decaying((300, 200), rank=4, seed=10 * i) for i in range(1, 4)]
    params = {"rank_fraction": 0.05}  # 10 of 200 directions: the randomized path pays
    unset = run("cart", base, xs, **params)
    assert torch.equal(unset, run("cart", base, xs, randomized_svd=True, **params))
    assert not torch.equal(unset, run("cart", base, xs, randomized_svd=False, **params))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eta", [0.3, 0.6, 1.0])
def test_star(kind, eta):
    base, xs = case(kind)
    w = [1.0, 2.0, 1.0]
    acc = torch.zeros_like(base, dtype=D)
    for wi, t in zip(w, deltas(base, xs)):
        u, s, vh = svd(t)
        total = float(s.sum())
        k = 1
        while float(s[:k].sum()) < eta * total - 1e-9 * total:
            k += 1
        kept = s[:k] * total / float(s[:k].sum())
        acc += wi * (u[:, :k] * kept) @ vh[:k]
    want = base.to(D) + acc / sum(w)
    close(run("star", base, xs, weight=w, eta=eta), want, tol=1e-4)


def test_star_keeping_everything_is_the_average_task_vector():
    base, xs = case("random")
    close(run("star", base, xs, eta=1.0),
          run("task_arithmetic", base, xs, weight=1.0 / 3), tol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_pcb(kind):
    base, xs = case(kind)
    taus = torch.stack([t.reshape(-1) for t in deltas(base, xs)])
    n, d = taus.shape

    def minmax(row):
        lo, hi = row.min(), row.max()
        return (row - lo) / (hi - lo) if hi > lo else row - lo

    intra = torch.stack([torch.exp(n * minmax(t.abs()) ** 2) for t in taus])
    total = taus.sum(0)
    inter = torch.zeros_like(taus)
    for j in range(d):
        e = torch.exp(taus[:, j] * total[j])
        inter[:, j] = e / e.sum()
    beta = intra * inter
    keep = max(1, int(0.4 * d))
    scores = []
    for i in range(n):
        cut = torch.sort(beta[i], descending=True).values[keep - 1]
        scores.append(minmax(torch.maximum(beta[i], cut)))
    scores = torch.stack(scores)
    merged = (scores * taus).sum(0) / scores.sum(0).clamp_min(1e-12)
    want = base.to(D) + 1.2 * merged.reshape(base.shape)
    close(run("pcb", base, xs, ratio=0.4, **{"lambda": 1.2}), want, tol=1e-4)


# ------------------------------------------------------------------ WUDI


def wudi_objective(t, taus, w):
    return sum(wi * torch.linalg.matrix_norm((t - ti) @ ti.T) ** 2 / torch.linalg.matrix_norm(ti) ** 2
               for wi, ti in zip(w, taus))


@pytest.mark.parametrize("kind", ["random", "conflicting"])
def test_wudi_exact_solution_agrees_with_the_papers_optimiser(kind):
    """The closed form equals running the optimiser to convergence (Adam, as the paper)."""
    base, xs = case(kind, shape=(4, 6), tasks=3)
    w = [1.0, 0.5, 2.0]
    taus = deltas(base, xs)
    t = sum(taus).clone().requires_grad_(True)  # the paper's starting point
    opt = torch.optim.Adam([t], lr=1e-2)
    for step in range(6000):
        opt.zero_grad()
        loss = wudi_objective(t, taus, w)
        loss.backward()
        opt.step()
        if step == 4000:
            for group in opt.param_groups:
                group["lr"] = 1e-3
    got = run("wudi", base, xs, weight=w) - base.to(D)
    assert float(wudi_objective(got, taus, w)) <= float(loss.detach()) + 1e-9
    close(got, t.detach(), tol=1e-3)


def test_wudi_is_the_minimum_of_its_objective_when_it_is_unique():
    base, xs = case("random", shape=(3, 5), tasks=2)  # 2·3 ≥ 5: a unique minimiser
    taus = deltas(base, xs)
    got = run("wudi", base, xs) - base.to(D)
    # the gradient vanishes: Σ (t − τᵢ)·τᵢᵀτᵢ / ‖τᵢ‖² = 0
    grad = sum((got - ti) @ ti.T @ ti / torch.linalg.matrix_norm(ti) ** 2 for ti in taus)
    assert float(grad.abs().max()) < 1e-5


# ------------------------------------------------------------------ SVC


def test_svc_shrinks_shared_directions_and_keeps_unique_ones():
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g(3), dtype=D))
    p, _ = torch.linalg.qr(torch.randn(5, 5, generator=g(4), dtype=D))
    shared = torch.outer(q[:, 0], p[:, 0])
    taus = [shared + 0.5 * torch.outer(q[:, i + 1], p[:, i + 1]) for i in range(3)]
    merged = sum(taus)  # the shared direction is over-counted 3 times
    got = singular_value_calibration(merged, taus)
    sv_dirs = {round(float(q[:, 0] @ got @ p[:, 0]), 6),
               *(round(float(q[:, i + 1] @ got @ p[:, i + 1]), 6) for i in range(3))}
    assert sv_dirs == {1.0, 0.5}  # shared back to 1 (from 3); unique ones unchanged


def test_svc_ta_method_matches_the_helper():
    base, xs = case("random")
    taus = deltas(base, xs)
    want = base.to(D) + singular_value_calibration(sum(taus), taus)
    close(run("svc_ta", base, xs), want, tol=1e-4)


# ------------------------------------------------------------------ shared properties


MATRIX_METHODS = ["iso_c", "iso_cts", "tsv_m", "star", "wudi", "svc_ta"]


@pytest.mark.parametrize("method", MATRIX_METHODS + ["magmax", "consensus_ta", "pcb"])
def test_vectors_fall_back_to_task_arithmetic(method):
    base = torch.randn(6, generator=g(1))
    xs = [base + 0.1 * torch.randn(6, generator=g(i + 2)) for i in range(2)]
    got = merge_tensors([base, *xs], method, {}, base_index=0)
    if method in ("iso_c", "iso_cts", "tsv_m", "wudi", "svc_ta"):
        close(got, merge_tensors([base, *xs], "task_arithmetic", {"weight": 1.0}, base_index=0))
    assert got.shape == base.shape


@pytest.mark.parametrize("method", MATRIX_METHODS + ["magmax", "consensus_ta", "pcb", "cart"])
def test_order_of_the_experts_does_not_matter(method):
    base, xs = case("random", shape=(8, 6))
    a = merge_tensors([base, *xs], method, {}, base_index=0)
    b = merge_tensors([base, *xs[::-1]], method, {}, base_index=0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["magmax", "consensus_ta", "iso_c", "tsv_m", "star", "wudi",
                                    "svc_ta"])
def test_lines_scales_with_depth(method, tmp_path):
    """LiNeS multiplies lambda by lines_alpha + lines_beta·depth (checked on one tensor by
    passing the resolved lambda)."""
    base, xs = case("random")
    half = merge_tensors([base, *xs], method, {"lambda": 0.5}, base_index=0)
    one = merge_tensors([base, *xs], method, {"lambda": 1.0}, base_index=0)
    torch.testing.assert_close(half - base, 0.5 * (one - base), rtol=1e-4, atol=1e-6)


def test_lines_in_a_recipe_scales_each_layer_by_depth(tmp_path):
    """lines_alpha + lines_beta·depth multiplies each tensor's task vector: depth 0 for
    embeddings, ℓ/(L−1) for layer ℓ, 1 after the layers."""
    from conftest import LLAMA, load_model, random_tensors, recipe_file, write_model

    import mergesmith

    base = random_tensors(LLAMA, 0)
    folders = {"base": write_model(tmp_path / "base", base),
               "a": write_model(tmp_path / "a", random_tensors(LLAMA, 1, base))}

    def merge(extra, out):
        recipe = recipe_file(tmp_path, f"""merge_method: task_arithmetic
base_model: {folders['base']}
models:
  - model: {folders['a']}
    parameters: {{weight: 1.0}}
parameters: {{{extra}}}
""", name=f"{out}.yml")
        mergesmith.run(recipe, tmp_path / out)
        return load_model(tmp_path / out)

    plain, lines = merge("", "plain"), merge("lines_alpha: 0.2, lines_beta: 0.6", "lines")
    layers = max(int(n.split(".")[2]) for n in base if n.startswith("model.layers.")) + 1
    checked = 0
    for name, b in base.items():
        if name.startswith("model.layers."):
            depth = int(name.split(".")[2]) / (layers - 1)
        elif "embed" in name:
            depth = 0.0
        else:
            depth = 1.0
        scale = 0.2 + 0.6 * depth
        torch.testing.assert_close(lines[name] - b, scale * (plain[name] - b),
                                   rtol=1e-4, atol=1e-6, msg=name)
        checked += 1
    assert checked == len(base)


@pytest.mark.parametrize("method", ["magmax", "consensus_ta", "consensus_ties", "iso_c",
                                    "iso_cts", "tsv_m", "cart", "star", "wudi", "pcb",
                                    "svc_ta"])
def test_whole_model_merge_equals_the_method_per_tensor(tmp_path, method):
    """Through the engine (lazy reads, row chunks, raw inputs) the result is the method
    applied tensor by tensor; token embeddings and heads take the task-arithmetic path."""
    from conftest import LLAMA, load_model, random_tensors, recipe_file, write_model

    import mergesmith
    import mergesmith.execute as ex

    base = random_tensors(LLAMA, 0)
    experts = [random_tensors(LLAMA, i, base) for i in (1, 2, 3)]
    paths = [write_model(tmp_path / f"m{i}", t) for i, t in enumerate([base, *experts])]
    models = "".join(f"  - model: {p}\n" for p in paths[1:])
    recipe = recipe_file(tmp_path, f"merge_method: {method}\nbase_model: {paths[0]}\n"
                                   f"models:\n{models}")
    old = ex.CHUNK_ELEMENTS
    ex.CHUNK_ELEMENTS = 256  # element-wise methods in row chunks
    try:
        mergesmith.run(recipe, tmp_path / "out", threads=2)
    finally:
        ex.CHUNK_ELEMENTS = old
    got = load_model(tmp_path / "out")
    for name, b in base.items():
        want = merge_tensors([b, *(e[name] for e in experts)], method, {}, base_index=0,
                             name=name)
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5, msg=name)
        if "embed" in name:
            ta = merge_tensors([b, *(e[name] for e in experts)], "task_arithmetic",
                               {"weight": 1.0}, base_index=0)
            if method in ("iso_c", "iso_cts", "tsv_m", "wudi", "svc_ta"):
                torch.testing.assert_close(got[name], ta, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,extra", [("task_arithmetic", {}), ("ties", {"density": 0.7})])
def test_svc_as_an_option_of_task_vector_methods(method, extra):
    base, xs = case("random")
    w = [1.0, 0.5, 0.8]
    plain = run(method, base, xs, weight=w, **extra)
    got = run(method, base, xs, weight=w, svc=True, **extra)
    taus = [wi * t for wi, t in zip(w, deltas(base, xs))]
    want = base.to(D) + singular_value_calibration(plain - base.to(D), taus)
    close(got, want, tol=1e-4)


def test_svc_turns_off_row_chunks_in_the_plan(tmp_path):
    from conftest import LLAMA, random_tensors, recipe_file, write_model

    import mergesmith

    base = random_tensors(LLAMA, 0)
    paths = [write_model(tmp_path / "b", base),
             write_model(tmp_path / "a", random_tensors(LLAMA, 1, base))]
    recipe = recipe_file(tmp_path, f"merge_method: task_arithmetic\nbase_model: {paths[0]}\n"
                                   f"models:\n  - model: {paths[1]}\n    parameters: {{weight: 1}}\n"
                                   "parameters: {svc: true}\n")
    plan = mergesmith.plan(recipe)
    assert not any(t.elementwise for t in plan.tensors if len(t.shape) == 2)

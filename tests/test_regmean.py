"""RegMean and Fisher merging: the written-out formulas, the properties they are built on,
end to end through ``mergesmith.run`` with statistics artefacts, and the errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import LLAMA, load_model
from hypothesis import given, settings
from hypothesis import strategies as st

import mergesmith
from mergesmith.errors import MergeError
from mergesmith.methods import get_method
from mergesmith.methods.contract import BoundMethod
from mergesmith.statistics.store import Statistics, StatisticsWriter


class Stats:
    """An input's statistics as the engine hands them to a method."""

    def __init__(self, gram=None, fisher=None):
        self._gram, self._fisher = gram, fisher

    def gram(self):
        return self._gram

    def fisher(self):
        return self._fisher.clone()


def call(method: str, tensors, stats, params=None, weights=None, base_index=None):
    spec = get_method(method)
    n = len(tensors)
    weights = weights or [1.0] * n
    shared = {p.name: p.default for p in spec.params if not p.per_model}
    shared.update(params or {})
    model_params = [{} if k == base_index else {"weight": w, "statistics": None}
                    for k, w in enumerate(weights)]
    return BoundMethod(spec, base_index)(tensors, shared, model_params, tensor_name="w",
                                         compute_dtype=torch.float64, statistics=stats)


def closed_form(weights, grams, alpha, coefficients):
    """(Σ cᵢ Wᵢ G'ᵢ)(Σ cᵢ G'ᵢ)⁻¹ in float64, written out with torch.linalg.solve."""
    total = rhs = 0
    for w, g, c in zip(weights, grams, coefficients):
        g = g.double()
        g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        total = total + c * g
        rhs = rhs + c * (w.double() @ g)
    return torch.linalg.solve(total, rhs.T).T  # total symmetric: W* total = rhs


# ---------------------------------------------------------------- RegMean, the math


def test_regmean_on_regression_tasks_is_least_squares_of_all_tasks():
    """The property RegMean is built on: with α = 1, merging the least-squares solutions of
    two regression tasks gives the least-squares solution of the two tasks together."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 6, generator=g, dtype=torch.float64) * s for s in (1.0, 3.0)]
    ys = [x @ torch.randn(6, 4, generator=g, dtype=torch.float64)
          + 0.3 * torch.randn(40, 4, generator=g, dtype=torch.float64) for x in xs]
    ws = [torch.linalg.lstsq(x, y).solution.T for x, y in zip(xs, ys)]  # [out, in]
    merged = call("regmean", ws, [Stats(x.T @ x) for x in xs], {"alpha": 1.0})
    joint = torch.linalg.lstsq(torch.cat(xs), torch.cat(ys)).solution.T
    torch.testing.assert_close(merged, joint, rtol=1e-9, atol=1e-10)
    assert not torch.allclose(merged, (ws[0] + ws[1]) / 2, atol=1e-3)  # not an average


def _problem(seed: int, n: int, out: int = 5, cols: int = 7):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(out, cols, generator=g, dtype=torch.float64) for _ in range(n)]
    grams = []
    for _ in range(n):
        x = torch.randn(3 * cols, cols, generator=g, dtype=torch.float64)
        grams.append(x.T @ x)
    return ws, grams


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 4), alpha=st.sampled_from([0.5, 0.9, 1.0]),
       data=st.data())
def test_regmean_closed_form_and_order(seed, n, alpha, data):
    ws, grams = _problem(seed, n)
    coefficients = data.draw(st.lists(st.floats(0.1, 3.0), min_size=n, max_size=n))
    merged = call("regmean", ws, [Stats(gr) for gr in grams], {"alpha": alpha},
                  weights=coefficients)
    torch.testing.assert_close(merged, closed_form(ws, grams, alpha, coefficients),
                               rtol=1e-8, atol=1e-9)
    order = data.draw(st.permutations(range(n)))
    shuffled = call("regmean", [ws[i] for i in order], [Stats(grams[i]) for i in order],
                    {"alpha": alpha}, weights=[coefficients[i] for i in order])
    torch.testing.assert_close(shuffled, merged, rtol=1e-9, atol=1e-10)


def test_regmean_one_model_returns_itself():
    ws, grams = _problem(1, 1)
    torch.testing.assert_close(call("regmean", ws, [Stats(grams[0])]), ws[0],
                               rtol=1e-10, atol=1e-10)


def test_lambda_scales_the_merged_task_vector_from_the_base():
    ws, grams = _problem(6, 3)
    stats = [Stats(grams[0]), Stats(grams[1]), None]
    plain = call("regmean", ws[:2], stats[:2], {"alpha": 0.9})
    scaled = call("regmean", ws, stats, {"alpha": 0.9, "lambda": 1.5}, weights=[1, 1, 0],
                  base_index=2)
    torch.testing.assert_close(scaled, ws[2] + 1.5 * (plain - ws[2]))
    fs = [Stats(fisher=g[:5].abs()) for g in grams[:2]]
    plain = call("fisher", ws[:2], fs)
    scaled = call("fisher", ws, fs + [None], {"lambda": 0.5}, weights=[1, 1, 0], base_index=2)
    torch.testing.assert_close(scaled, ws[2] + 0.5 * (plain - ws[2]))


def test_regmean_equal_grams_and_alpha_zero_diagonal_are_averages():
    ws, grams = _problem(2, 3)
    same = call("regmean", ws, [Stats(grams[0])] * 3, {"alpha": 0.7}, weights=[1, 2, 1])
    torch.testing.assert_close(same, (ws[0] + 2 * ws[1] + ws[2]) / 4)


def test_regmean_without_statistics_averages_or_adds_task_vectors():
    g = torch.Generator().manual_seed(3)
    base, a, b = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(call("regmean", [a, b], None, weights=[1, 3]), (a + 3 * b) / 4)
    torch.testing.assert_close(call("regmean", [a, b, base], None, weights=[1, 3, 0],
                                    base_index=2), (a + 3 * b) / 4)
    ta = call("regmean", [a, b, base], None, {"normalize": False, "lambda": 0.5},
              weights=[1, 3, 0], base_index=2)
    torch.testing.assert_close(ta, base + 0.5 * ((a - base) + 3 * (b - base)))


# ---------------------------------------------------------------- Fisher, the math


def test_fisher_is_the_written_out_formula():
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    fs = [torch.rand(3, 5, generator=g, dtype=torch.float64) ** 4 for _ in range(3)]
    fs[0][0] = 0.0
    for f in fs:
        f[1, 1] = 0.0  # all Fishers vanish there: the weighted average
    lam, eps = [0.5, 1.0, 2.0], 1e-3
    merged = call("fisher", xs, [Stats(fisher=f) for f in fs], {"epsilon": eps}, weights=lam)
    num = sum(c * (f + eps) * x for c, f, x in zip(lam, fs, xs))
    den = sum(c * (f + eps) for c, f in zip(lam, fs))
    torch.testing.assert_close(merged, num / den)
    average = sum(c * x for c, x in zip(lam, xs)) / sum(lam)
    torch.testing.assert_close(merged[1, 1], average[1, 1])


def test_fisher_one_model_and_equal_fishers():
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    f = torch.rand(4, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(call("fisher", xs[:1], [Stats(fisher=f)]), xs[0])
    same = call("fisher", xs, [Stats(fisher=f), Stats(fisher=f)], weights=[1.0, 3.0])
    torch.testing.assert_close(same, (xs[0] + 3 * xs[1]) / 4)


# ---------------------------------------------------------------- end to end


def _linear_inputs(folder: Path, seed: int, tokens: int = 24) -> dict[str, torch.Tensor]:
    """Σ x xᵀ of the input of every nn.Linear of the (transformers) model, by weight name,
    collected with forward hooks on random token ids."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def collect(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return collect

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(hook(name + ".weight"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model(input_ids=torch.randint(0, LLAMA["vocab_size"], (2, tokens), generator=g))
    return grams


def _write_grams(path: Path, grams: dict[str, torch.Tensor], skip=()) -> Path:
    w = StatisticsWriter()
    for name, gram in grams.items():
        if name not in skip:
            w.add_gram(name, gram, 48)
    w.save(path)
    return path


@pytest.fixture
def regmean_models(models, tmp_path):
    stats = {k: _write_grams(tmp_path / f"{k}.stats.safetensors",
                             _linear_inputs(models[k], seed=i), skip=("lm_head.weight",))
             for i, k in enumerate(("ft_a", "ft_b", "ft_c"))}
    return models, stats


def test_regmean_end_to_end_equals_the_closed_form(regmean_models, tmp_path):
    models, stats = regmean_models
    recipe = {"merge_method": "regmean", "base_model": str(models["base"]),
              "parameters": {"alpha": 0.9},
              "models": [{"model": str(models[k]),
                          "parameters": {"weight": w, "statistics": str(stats[k])}}
                         for k, w in (("ft_a", 1.0), ("ft_b", 2.0), ("ft_c", 0.5))]}
    result = mergesmith.run(recipe, tmp_path / "out")
    out = load_model(tmp_path / "out")
    fts = {k: load_model(models[k]) for k in ("ft_a", "ft_b", "ft_c")}
    grams = {k: Statistics(stats[k]) for k in fts}
    coef = [1.0, 2.0, 0.5]
    linear = [n for n in out if grams["ft_a"].gram(n) is not None]
    assert len(linear) == 7 * LLAMA["num_hidden_layers"]
    for name in linear:
        want = closed_form([fts[k][name] for k in fts], [grams[k].gram(name) for k in fts],
                           0.9, coef)
        torch.testing.assert_close(out[name], want.float(), rtol=2e-5, atol=2e-6)
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        want = sum(c * fts[k][name].double() for c, k in zip(coef, fts)) / sum(coef)
        torch.testing.assert_close(out[name], want.float(), rtol=2e-5, atol=2e-6)
    assert any("regmean:" in n and "averaged" in n for n in result.plan.notes)


def test_regmean_statistics_folder_and_one_model(regmean_models, tmp_path):
    """A top-level statistics folder (``<model folder name>.safetensors`` in it); one model
    at weight 1 returns itself."""
    models, stats = regmean_models
    folder = tmp_path / "stats"
    folder.mkdir()
    (folder / "ft_a.safetensors").write_bytes(stats["ft_a"].read_bytes())
    recipe = {"merge_method": "regmean", "parameters": {"statistics": str(folder)},
              "models": [{"model": str(models["ft_a"])}]}
    mergesmith.run(recipe, tmp_path / "out")
    out, ft = load_model(tmp_path / "out"), load_model(models["ft_a"])
    for name in out:
        torch.testing.assert_close(out[name], ft[name], rtol=1e-5, atol=1e-6)


def test_regmean_check_estimates_and_lists_statistics(regmean_models):
    models, stats = regmean_models
    recipe = {"merge_method": "regmean",
              "models": [{"model": str(models[k]), "parameters": {"statistics": str(stats[k])}}
                         for k in ("ft_a", "ft_b")]}
    report = mergesmith.check(recipe)
    assert report.dense.factorizations == 7 * LLAMA["num_hidden_layers"] + 1  # + lm_head
    from mergesmith.execute import WorkItem, item_memory

    p = report.plan
    down = next(t for t in p.tensors if t.name == "model.layers.0.mlp.down_proj.weight")
    cols = LLAMA["intermediate_size"]
    assert item_memory(p, WorkItem(down, None)) >= 2 * 4 * cols ** 2 + 4 * 8 * cols ** 2


def test_regmean_errors_before_reading_weights(regmean_models, tmp_path):
    models, stats = regmean_models

    def recipe(stats_a, stats_b="ft_b"):
        return {"merge_method": "regmean",
                "models": [{"model": str(models["ft_a"]),
                            **({"parameters": {"statistics": str(stats_a)}} if stats_a else {})},
                           {"model": str(models["ft_b"]),
                            "parameters": {"statistics": str(stats[stats_b])}}]}

    with pytest.raises(MergeError, match=r"needs statistics .*calibration: block"):
        mergesmith.plan(recipe(None))
    with pytest.raises(MergeError, match="does not exist"):
        mergesmith.plan(recipe(tmp_path / "nope.safetensors"))
    partial = _write_grams(tmp_path / "partial.safetensors",
                           {"model.layers.0.mlp.up_proj.weight": torch.eye(32)})
    with pytest.raises(MergeError, match=r"model '.*ft_a' has no gram statistics for tensor "
                                         r"'model\.layers\.\d\.\S+' while '.*ft_b' has"):
        mergesmith.plan(recipe(partial))
    full = Statistics(stats["ft_a"])
    grams = {n: full.gram(n) for n in full.names("gram")}
    grams["model.layers.0.mlp.up_proj.weight"] = torch.eye(3)
    wrong = _write_grams(tmp_path / "wrong.safetensors", grams)
    with pytest.raises(MergeError, match=r"shape \[3, 3\], expected \[32, 32\]"):
        mergesmith.plan(recipe(wrong, "ft_a"))


def test_regmean_missing_statistics_exits_2_on_the_cli(models, tmp_path):
    from conftest import recipe_file, run_cli

    path = recipe_file(tmp_path, f"merge_method: regmean\nmodels:\n  - model: {models['ft_a']}\n"
                                 f"  - model: {models['ft_b']}\n")
    done = run_cli("run", str(path), str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr
    assert "calibration: block" in done.stderr and "ft_a" in done.stderr


def _fishers(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(t.shape, generator=g) ** 3 for n, t in tensors.items()}


def test_fisher_end_to_end_in_row_chunks(models, tmp_path, monkeypatch):
    from mergesmith import execute

    monkeypatch.setattr(execute, "CHUNK_ELEMENTS", 512)  # several chunks and blocks per
    monkeypatch.setattr(execute, "BLOCK_ELEMENTS", 96)  # tensor: the Fisher rows follow
    fts = {k: load_model(models[k]) for k in ("ft_a", "ft_b")}
    fishers, paths = {}, {}
    for i, k in enumerate(fts):
        fishers[k] = _fishers(fts[k], i)
        if k == "ft_b":
            fishers[k]["model.norm.weight"] = torch.zeros_like(fishers[k]["model.norm.weight"])
        w = StatisticsWriter()
        for n, f in fishers[k].items():
            w.add_fisher(n, f)
        paths[k] = tmp_path / f"{k}.fisher.safetensors"
        w.save(paths[k])
    coef = {"ft_a": 1.0, "ft_b": 3.0}
    recipe = {"merge_method": "fisher", "base_model": str(models["base"]),
              "parameters": {"epsilon": 1e-8},
              "models": [{"model": str(models[k]),
                          "parameters": {"weight": coef[k], "statistics": str(paths[k])}}
                         for k in fts]}
    mergesmith.run(recipe, tmp_path / "out")
    out = load_model(tmp_path / "out")
    norms = {k: sum(float((f.double() ** 2).sum()) for f in fishers[k].values()) ** 0.5
             for k in fts}
    for name in out:
        num = sum(coef[k] * (fishers[k][name].double() / norms[k] + 1e-8) * fts[k][name].double()
                  for k in fts)
        den = sum(coef[k] * (fishers[k][name].double() / norms[k] + 1e-8) for k in fts)
        torch.testing.assert_close(out[name], (num / den).float(), rtol=1e-5, atol=1e-6)


def test_fisher_lora_input_is_dequantized_like_any_input(models, tmp_path):
    """A LoRA adapter on one input: the method sees W + s·B·A, as every method does."""
    lora = tmp_path / "lora"
    lora.mkdir()
    import json

    from safetensors.torch import save_file

    name = "model.layers.0.self_attn.q_proj"
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    save_file({f"base_model.model.{name}.lora_A.weight": a,
               f"base_model.model.{name}.lora_B.weight": b},
              str(lora / "adapter_model.safetensors"))
    (lora / "adapter_config.json").write_text(json.dumps(
        {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "peft_type": "LORA"}))
    fts = {k: load_model(models[k]) for k in ("ft_a", "ft_b")}
    paths = {}
    for i, k in enumerate(fts):
        w = StatisticsWriter()
        w.add_fisher(name + ".weight", torch.full((32, 32), 1.0 + i))
        paths[k] = tmp_path / f"{k}.f.safetensors"
        w.save(paths[k])
    recipe = {"merge_method": "fisher", "parameters": {"fisher_normalize": False, "epsilon": 0},
              "models": [{"model": f"{models['ft_a']}+{lora}",
                          "parameters": {"statistics": str(paths["ft_a"])}},
                         {"model": str(models["ft_b"]),
                          "parameters": {"statistics": str(paths["ft_b"])}}]}
    mergesmith.run(recipe, tmp_path / "out")
    out = load_model(tmp_path / "out")
    adapted = fts["ft_a"][name + ".weight"] + 2.0 * b @ a
    torch.testing.assert_close(out[name + ".weight"],
                               (adapted + 2 * fts["ft_b"][name + ".weight"]) / 3,
                               rtol=1e-5, atol=1e-5)

"""``merge_method: regmean_plusplus`` in a recipe: the planner runs RegMean++'s sequential
pass (each layer's Grams on the merged model's hidden states, merged with the plan's own work
items), caches the Grams, and the engine merges with them. Checked against RegMean++ written
out on whole in-memory models (test_statistics.reference_regmean_plusplus)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from conftest import LLAMA, random_tensors, recipe_file, run_cli  # noqa: E402
from test_evaluate import TEXT, tiny_lm  # noqa: E402
from test_statistics import assert_close, reference_regmean_plusplus  # noqa: E402

import mergesmith  # noqa: E402
from mergesmith.statistics.calibration import common_tokens, settings_from  # noqa: E402
from mergesmith.statistics.sequential import regmean_plusplus_merge  # noqa: E402


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESMITH_STATS_CACHE", str(tmp_path / "stats-cache"))
    monkeypatch.setenv("MERGESMITH_EVAL_CACHE", str(tmp_path / "eval-cache"))


CALIB = "{text: %s, max_tokens: 96, max_length: 32, batch_size: 2}"


def _models(tmp_path: Path, n: int = 3) -> list[Path]:
    base = random_tensors(LLAMA, 0)
    return [tiny_lm(tmp_path / f"m{i}", i, base=base if i else None, scale=0.05)
            for i in range(n)]


def _recipe(tmp_path: Path, models: list[Path], extra: str = "", models_extra: str = "",
            name: str = "r.yml") -> Path:
    text = tmp_path / "calib.txt"
    text.write_text(TEXT * 3)
    entries = "".join(f"  - model: {m}\n{models_extra}" for m in models)
    return recipe_file(tmp_path, f"""merge_method: regmean_plusplus
models:
{entries}parameters: {{alpha: 0.9}}
dtype: float32
calibration: {CALIB % text}
{extra}""", name=name)


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def _tokens(tmp_path: Path, models: list[Path]):
    settings = settings_from({"text": str(tmp_path / "calib.txt"), "max_tokens": 96,
                              "max_length": 32, "batch_size": 2})
    return common_tokens(settings, [(str(m), str(m)) for m in models])


def test_recipe_method_equals_regmean_plusplus_written_out(tmp_path):
    models = _models(tmp_path)
    out = tmp_path / "out"
    mergesmith.run(_recipe(tmp_path, models), out)
    merged = _load(out)
    tokens = _tokens(tmp_path, models)
    assert bool(tokens.attention_mask.all())
    ref = reference_regmean_plusplus(models, tokens, 0.9)
    assert set(ref) == set(merged)
    for name, r in ref.items():
        assert_close(merged[name], r, rel=1e-5)
    # the Python function (same pass, its own averaging) agrees too
    direct = dict(regmean_plusplus_merge(models, None, None, tokens, alpha=0.9))
    for name, r in direct.items():
        assert_close(merged[name], r, rel=1e-5)
    # and RegMean++ is not RegMean: later layers see the merged model's inputs
    plain = tmp_path / "plain"
    mergesmith.run(_recipe(tmp_path, models, name="plain.yml").read_text().replace(
        "regmean_plusplus", "regmean"), plain)
    w = "model.layers.1.mlp.down_proj.weight"
    assert (merged[w] - _load(plain)[w]).abs().max() > 1e-5
    # layer 0's attention input is the merged embedding: identical Grams where the
    # embeddings are equal would give RegMean's answer; here they differ, so just finite
    assert all(t.isfinite().all() for t in merged.values())


def test_one_model_with_weight_one_returns_it(tmp_path):
    models = _models(tmp_path, 1)
    out = tmp_path / "out"
    mergesmith.run(_recipe(tmp_path, models), out)
    merged, original = _load(out), _load(models[0])
    assert set(merged) == set(original)
    for name, t in original.items():
        assert_close(merged[name], t, rel=1e-6)


def test_with_a_base_and_weights_the_output_is_the_pass_merge(tmp_path):
    """With a base model and unequal weights the Grams still come from the merged model:
    the stored Grams are exactly the pass's, so running the merge twice (second time from
    the cache) gives the same bytes, and a change of weight recomputes them."""
    models = _models(tmp_path)
    text = tmp_path / "calib.txt"
    text.write_text(TEXT * 3)

    def recipe(w: float, name: str) -> Path:
        return recipe_file(tmp_path, f"""merge_method: regmean_plusplus
base_model: {models[0]}
models:
  - model: {models[1]}
    parameters: {{weight: {w}}}
  - model: {models[2]}
    parameters: {{weight: 1.0}}
dtype: float32
calibration: {CALIB % text}
""", name=name)

    report = mergesmith.check(recipe(0.5, "a.yml"))
    assert any("sequential pass" in n for n in report.plan.notes), report.plan.notes
    first, second = tmp_path / "o1", tmp_path / "o2"
    mergesmith.run(recipe(0.5, "a.yml"), first)
    p = mergesmith.plan(recipe(0.5, "a.yml"))
    assert any("from the statistics cache" in n for n in p.notes), p.notes
    mergesmith.run(recipe(0.5, "a.yml"), second)
    for f in first.glob("*.safetensors"):
        assert f.read_bytes() == (second / f.name).read_bytes()
    p = mergesmith.plan(recipe(0.25, "b.yml"))
    assert any("sequential pass" in n for n in p.notes), p.notes
    entries = [e for e in (tmp_path / "stats-cache").iterdir() if e.name.startswith("stats-")]
    assert len(entries) == 4  # two regressed models × two weightings


def test_slices_are_refused_with_one_line(tmp_path):
    models = _models(tmp_path, 2)
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    recipe = recipe_file(tmp_path, f"""merge_method: regmean_plusplus
slices:
  - sources:
      - model: {models[0]}
        layer_range: [0, 1]
      - model: {models[1]}
        layer_range: [1, 2]
calibration: {CALIB % text}
""")
    proc = run_cli("check", str(recipe))
    assert proc.returncode == 2, proc.stderr
    assert "use 'regmean'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_without_calibration_is_exit_2(tmp_path):
    models = _models(tmp_path, 2)
    recipe = recipe_file(tmp_path, f"""merge_method: regmean_plusplus
models:
  - model: {models[0]}
  - model: {models[1]}
""")
    proc = run_cli("run", str(recipe), str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert "calibration" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_earlier_stage_as_input_is_refused(tmp_path):
    models = _models(tmp_path, 2)
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    recipe = recipe_file(tmp_path, f"""name: avg
merge_method: linear
models:
  - model: {models[0]}
    parameters: {{weight: 0.5}}
  - model: {models[1]}
    parameters: {{weight: 0.5}}
---
merge_method: regmean_plusplus
models:
  - model: avg
  - model: {models[1]}
calibration: {CALIB % text}
""")
    proc = run_cli("check", str(recipe))
    assert proc.returncode == 2, proc.stderr
    assert "earlier stage" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

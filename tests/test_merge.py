"""End-to-end merges of tiny models against formulas computed here, independently."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import LLAMA, load_model, random_tensors, recipe_file, write_model
from safetensors.torch import load_file

import mergesmith
from mergesmith.checkpoint.safetensors_format import read_header


def layer_t(name: str, layers: int = LLAMA["num_hidden_layers"]) -> float:
    """Gradient position written out: model.layers.i.* → i/(n−1), other tensors → 0."""
    parts = name.split(".")
    if len(parts) > 3 and parts[1] == "layers":
        return int(parts[2]) / (layers - 1)
    return 0.0


def lerp(values: list[float], t: float) -> float:
    s = t * (len(values) - 1)
    i = min(int(s), len(values) - 2)
    return values[i] + (s - i) * (values[i + 1] - values[i])


def sources(models) -> dict[str, dict[str, torch.Tensor]]:
    return {k: {n: t.double() for n, t in load_model(p).items()} for k, p in models.items()}


def assert_close_f32(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_task_arithmetic_formula_with_lambda_normalize_negative_filter_gradient(models, tmp_path):
    recipe = recipe_file(tmp_path, f"""
merge_method: task_arithmetic
base_model: {models['base']}
models:
  - model: {models['ft_a']}
    parameters:
      weight:
        - filter: mlp
          value: [0.2, 1.0]
        - value: 0.7
  - model: {models['ft_b']}
    parameters:
      weight: -0.3
  - model: {models['ft_c']}
    parameters:
      weight: [0.5, 0.1, 0.9]
parameters:
  lambda: 0.8
  normalize: true
""")
    out = tmp_path / "out"
    mergesmith.run(recipe, out)
    x = sources(models)
    want = {}
    for name, base in x["base"].items():
        t = layer_t(name)
        w_a = lerp([0.2, 1.0], t) if "mlp" in name else 0.7
        w = {"ft_a": w_a, "ft_b": -0.3, "ft_c": lerp([0.5, 0.1, 0.9], t)}
        mixed = sum(wi * (x[m][name] - base) for m, wi in w.items()) / sum(w.values())
        want[name] = base + 0.8 * mixed
    assert_close_f32(load_model(out), want)


def test_canonical_recipe(models, tmp_path):
    recipe = recipe_file(tmp_path, f"""
merge_method: task_arithmetic
base_model: {models['base']}
models:
  - model: {models['ft_a']}
    parameters: {{weight: 1.0}}
  - model: {models['ft_b']}
    parameters: {{weight: 0.3}}
""")
    mergesmith.run(recipe, tmp_path / "out")
    x = sources(models)
    want = {n: x["ft_a"][n] + 0.3 * (x["ft_b"][n] - b) for n, b in x["base"].items()}
    assert_close_f32(load_model(tmp_path / "out"), want)


def test_linear_formula(models, tmp_path):
    recipe = recipe_file(tmp_path, f"""
merge_method: linear
models:
  - model: {models['ft_a']}
    parameters: {{weight: 1.0}}
  - model: {models['ft_b']}
    parameters:
      weight: [0.1, 0.9]
  - model: {models['ft_c']}
    parameters: {{weight: -0.25}}
""")
    mergesmith.run(recipe, tmp_path / "out")
    x = sources(models)
    want = {}
    for name in x["ft_a"]:
        w = {"ft_a": 1.0, "ft_b": lerp([0.1, 0.9], layer_t(name)), "ft_c": -0.25}
        want[name] = sum(wi * x[m][name] for m, wi in w.items()) / sum(w.values())
    assert_close_f32(load_model(tmp_path / "out"), want)


def test_passthrough_scale_formula(models, tmp_path):
    recipe = recipe_file(tmp_path, f"""
merge_method: passthrough
models:
  - model: {models['ft_c']}
    parameters:
      scale:
        - filter: o_proj
          value: 0.5
        - filter: re:mlp\\.(up|down)_proj
          value: [1.0, 0.4]
""")
    mergesmith.run(recipe, tmp_path / "out")
    x = sources(models)["ft_c"]
    want = {}
    for name, v in x.items():
        s = 0.5 if "o_proj" in name else (lerp([1.0, 0.4], layer_t(name))
                                          if ("mlp.up_proj" in name or "mlp.down_proj" in name)
                                          else 1.0)
        want[name] = s * v
    assert_close_f32(load_model(tmp_path / "out"), want)


def test_every_donor_tensor_is_written_with_config_and_side_files(models, tmp_path):
    recipe = recipe_file(tmp_path, f"""
merge_method: task_arithmetic
base_model: {models['base']}
models:
  - model: {models['ft_a']}
    parameters: {{weight: 0.5}}
""")
    out = tmp_path / "out"
    mergesmith.run(recipe, out)
    assert set(load_model(out)) == set(load_file(str(models["base"] / "model.safetensors")))
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "README.md",
            "mergesmith_config.yml", "model.safetensors"} <= names
    assert (out / "mergesmith_config.yml").read_text() == recipe.read_text()
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "- mergesmith" in card and "task_arithmetic" in card
    assert not (tmp_path / "out.partial").exists()


def test_output_loads_in_transformers_and_runs(models, tmp_path):
    transformers = pytest.importorskip("transformers")
    recipe = recipe_file(tmp_path, f"""
merge_method: task_arithmetic
base_model: {models['base']}
models:
  - model: {models['ft_a']}
    parameters: {{weight: 1.0}}
  - model: {models['ft_b']}
    parameters: {{weight: 0.3}}
dtype: bfloat16
""")
    out = tmp_path / "out"
    mergesmith.run(recipe, out, out_shard_size="20K")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, LLAMA["vocab_size"])
    assert torch.isfinite(logits).all()


def test_sharded_output_round_trips_with_correct_index(models, tmp_path):
    recipe = recipe_file(tmp_path, f"""
merge_method: linear
models:
  - model: {models['ft_a']}
    parameters: {{weight: 0.5}}
  - model: {models['ft_b']}
    parameters: {{weight: 0.5}}
""")
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    mergesmith.run(recipe, single)
    mergesmith.run(recipe, sharded, out_shard_size="30K")
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    tensors = load_model(sharded)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in tensors.values())
    for name, fname in index["weight_map"].items():
        assert name in load_file(str(sharded / fname))
    assert set(index["weight_map"]) == set(tensors)
    for f in files:  # no shard exceeds the budget unless it holds a single tensor
        entries, meta = read_header(str(sharded / f))
        assert meta == {"format": "pt"}
        assert len(entries) == 1 or sum(e.nbytes for e in entries) <= 30_000
    reference = load_model(single)
    assert all(torch.equal(tensors[n], reference[n]) for n in reference)


@pytest.mark.parametrize("shards", [1, 2])
def test_bin_inputs_give_the_same_result_as_safetensors(tmp_path, shards):
    base = random_tensors(LLAMA, 0)
    ft = random_tensors(LLAMA, 1, base)
    for fmt in ("safetensors", "bin"):
        write_model(tmp_path / fmt / "base", base, fmt=fmt, shards=shards)
        write_model(tmp_path / fmt / "ft", ft, fmt=fmt, shards=shards)
        recipe = recipe_file(tmp_path / fmt, f"""
merge_method: task_arithmetic
base_model: {tmp_path / fmt / 'base'}
models:
  - model: {tmp_path / fmt / 'ft'}
    parameters: {{weight: 0.6}}
""")
        mergesmith.run(recipe, tmp_path / fmt / "out")
    a, b = load_model(tmp_path / "safetensors" / "out"), load_model(tmp_path / "bin" / "out")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_unindexed_shards_are_read(tmp_path):
    base = random_tensors(LLAMA, 0)
    write_model(tmp_path / "base", base, shards=2, index=False)
    recipe = recipe_file(tmp_path, f"""
merge_method: passthrough
models:
  - model: {tmp_path / 'base'}
""")
    mergesmith.run(recipe, tmp_path / "out")
    out = load_model(tmp_path / "out")
    assert all(torch.equal(out[n], base[n]) for n in base)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_bit_identical_for_any_thread_count_and_chunking(models, tmp_path, monkeypatch):
    recipe = recipe_file(tmp_path, f"""
merge_method: task_arithmetic
base_model: {models['base']}
models:
  - model: {models['ft_a']}
    parameters: {{weight: 0.7}}
  - model: {models['ft_b']}
    parameters: {{weight: [0.1, 0.4]}}
  - model: {models['ft_c']}
    parameters: {{weight: -0.2}}
parameters: {{normalize: true, lambda: 1.3}}
dtype: bfloat16
""")
    mergesmith.run(recipe, tmp_path / "t1", threads=1)
    mergesmith.run(recipe, tmp_path / "t4", threads=4, out_shard_size="40K")
    monkeypatch.setattr("mergesmith.execute.CHUNK_ELEMENTS", 100)  # force row chunks
    mergesmith.run(recipe, tmp_path / "t4c", threads=4)
    mergesmith.run(recipe, tmp_path / "t1c", threads=1)
    a = load_model(tmp_path / "t1")
    for other in ("t4", "t4c", "t1c"):
        b = load_model(tmp_path / other)
        assert all(torch.equal(a[n], b[n]) for n in a), other
    assert _digest(tmp_path / "t1") == _digest(tmp_path / "t1c")


def test_bfloat16_inputs_are_computed_in_float32_and_rounded_once(tmp_path):
    base = random_tensors(LLAMA, 0)
    ft = random_tensors(LLAMA, 1, base)
    write_model(tmp_path / "base", base, dtype=torch.bfloat16)
    write_model(tmp_path / "ft", ft, dtype=torch.bfloat16)
    recipe = recipe_file(tmp_path, f"""
merge_method: task_arithmetic
base_model: {tmp_path / 'base'}
models:
  - model: {tmp_path / 'ft'}
    parameters: {{weight: 0.37}}
""")
    mergesmith.run(recipe, tmp_path / "out")
    out = load_model(tmp_path / "out")
    for name, b in base.items():
        b32 = b.to(torch.bfloat16).float()
        f32 = ft[name].to(torch.bfloat16).float()
        want = (b32 + (f32 - b32) * 0.37).to(torch.bfloat16)
        assert out[name].dtype == torch.bfloat16
        assert torch.equal(out[name], want), name


def test_out_dtype_and_config_dtype(models, tmp_path):
    recipe = recipe_file(tmp_path, f"""
merge_method: linear
models:
  - model: {models['ft_a']}
    parameters: {{weight: 1.0}}
out_dtype: float16
""")
    mergesmith.run(recipe, tmp_path / "out")
    assert all(t.dtype == torch.float16 for t in load_model(tmp_path / "out").values())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "float16"


def test_overwrite_replaces_existing_output(models, tmp_path):
    recipe = recipe_file(tmp_path, f"""
merge_method: passthrough
models:
  - model: {models['ft_a']}
""")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(mergesmith.MergeError, match="already exists"):
        mergesmith.run(recipe, out)
    mergesmith.run(recipe, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()


def test_check_reads_no_tensor_data(models, tmp_path, monkeypatch):
    recipe = recipe_file(tmp_path, f"""
merge_method: task_arithmetic
base_model: {models['base']}
models:
  - model: {models['ft_a']}
    parameters: {{weight: 0.5}}
""")

    def forbidden(*a, **k):
        raise AssertionError("check read tensor data")

    monkeypatch.setattr("mergesmith.checkpoint.reader.TensorReader.read", forbidden)
    report = mergesmith.check(recipe)
    n = len(load_file(str(models["base"] / "model.safetensors")))
    assert len(report.plan.tensors) == n
    assert report.plan.bytes_written == sum(
        t.numel() * 4 for t in load_file(str(models["base"] / "model.safetensors")).values())
    assert "bytes to read" in report.summary()


def test_progress_reports_every_byte_and_tensor(models, tmp_path, monkeypatch):
    monkeypatch.setattr("mergesmith.execute.CHUNK_ELEMENTS", 300)
    recipe = recipe_file(tmp_path, f"""
merge_method: linear
models:
  - model: {models['ft_a']}
    parameters: {{weight: 1.0}}
""")
    seen = {"bytes": 0, "tensors": 0}

    def progress(plan):
        def update(nbytes, finished):
            seen["bytes"] += nbytes
            seen["tensors"] += finished
        return update

    plan = mergesmith.run(recipe, tmp_path / "out", threads=3, progress=progress).plan
    assert seen == {"bytes": plan.bytes_written, "tensors": len(plan.tensors)}


def test_memory_budget_serialises_big_items_without_changing_output(models, tmp_path,
                                                                    monkeypatch,
                                                                    items_in_flight):
    recipe = recipe_file(tmp_path, f"""
merge_method: ties
base_model: {models['base']}
models:
  - model: {models['ft_a']}
    parameters: {{weight: 0.7, density: 0.5}}
  - model: {models['ft_b']}
    parameters: {{weight: 0.5, density: 0.3}}
""")
    mergesmith.run(recipe, tmp_path / "free", threads=4)
    import mergesmith.memory as mem

    peak = items_in_flight
    peak[0] = 0
    monkeypatch.setattr(mem, "MEMORY_BUDGET", 1000)  # every item is "too big": one at a time
    mergesmith.run(recipe, tmp_path / "tight", threads=4)
    assert peak[0] == 1
    a, b = load_model(tmp_path / "free"), load_model(tmp_path / "tight")
    assert all(torch.equal(a[n], b[n]) for n in a)

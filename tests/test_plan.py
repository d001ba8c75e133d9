"""Planning: parameter precedence, filters, gradients per slice, layer maps, config patching."""

from __future__ import annotations

import json

import pytest
from conftest import LLAMA, random_tensors, recipe_file, write_model

import mergesmith
from mergesmith import MergeError


@pytest.fixture
def trio(tmp_path):
    base = random_tensors(LLAMA, 0)
    return {k: write_model(tmp_path / k, random_tensors(LLAMA, s, base) if s else base)
            for s, k in enumerate(("base", "a", "b"))}


def out(plan, name):
    return next(t for t in plan.tensors if t.name == name)


def test_precedence_source_over_slice_over_top(tmp_path, trio):
    recipe = recipe_file(tmp_path, f"""merge_method: linear
slices:
  - sources:
      - model: {trio['a']}
        layer_range: [0, 3]
        parameters: {{weight: 0.7}}
      - model: {trio['b']}
        layer_range: [0, 3]
    parameters:
      weight: 0.3
      normalize: false
parameters:
  weight: 0.1
  normalize: true
""")
    p = mergesmith.plan(recipe)
    t = out(p, "model.layers.1.mlp.up_proj.weight")
    assert [m["weight"] for m in t.model_params] == [0.7, 0.3]
    assert t.params["normalize"] is False


def test_top_level_fills_what_lower_levels_do_not_match(tmp_path, trio):
    recipe = recipe_file(tmp_path, f"""merge_method: linear
models:
  - model: {trio['a']}
    parameters:
      weight:
        - filter: mlp
          value: 2.0
  - model: {trio['b']}
parameters:
  weight: 0.5
""")
    p = mergesmith.plan(recipe)
    assert [m["weight"] for m in out(p, "model.layers.0.mlp.up_proj.weight").model_params] == [2.0, 0.5]
    assert [m["weight"] for m in out(p, "model.layers.0.self_attn.q_proj.weight").model_params] == [0.5, 0.5]


def test_filters_see_input_names_for_models_and_output_names_for_globals(tmp_path, trio):
    recipe = recipe_file(tmp_path, f"""merge_method: passthrough
slices:
  - sources:
      - model: {trio['a']}
        layer_range: [2, 3]
        parameters:
          scale:
            - filter: layers.2.
              value: 0.5
            - value: 1.0
""")
    p = mergesmith.plan(recipe)
    t = out(p, "model.layers.0.mlp.up_proj.weight")  # output layer 0 ← input layer 2
    assert t.inputs[0].name == "model.layers.2.mlp.up_proj.weight"
    assert t.model_params[0]["scale"] == 0.5


def test_gradient_restarts_in_every_slice_and_nonlayer_uses_first_value(tmp_path, trio):
    recipe = recipe_file(tmp_path, f"""merge_method: passthrough
slices:
  - sources:
      - model: {trio['a']}
        layer_range: [0, 3]
  - sources:
      - model: {trio['b']}
        layer_range: [1, 3]
parameters:
  scale: [0.0, 1.0]
""")
    p = mergesmith.plan(recipe)
    scales = [out(p, f"model.layers.{i}.mlp.up_proj.weight").model_params[0]["scale"]
              for i in range(5)]
    assert scales == pytest.approx([0.0, 0.5, 1.0, 0.0, 1.0])
    assert out(p, "model.embed_tokens.weight").model_params[0]["scale"] == 0.0
    assert out(p, "lm_head.weight").inputs[0].model == p.models.index(
        next(m for m in p.models if str(m.ref) == str(trio['b'])))
    assert p.config["num_hidden_layers"] == 5


def test_layer_types_follow_the_layers(tmp_path):
    config = dict(LLAMA, num_hidden_layers=4,
                  layer_types=["sliding", "full", "sliding", "full"])
    base = random_tensors(config, 0)
    path = write_model(tmp_path / "m", base, config)
    recipe = recipe_file(tmp_path, f"""merge_method: passthrough
slices:
  - sources:
      - model: {path}
        layer_range: [0, 2]
  - sources:
      - model: {path}
        layer_range: [1, 4]
""")
    p = mergesmith.plan(recipe)
    assert p.config["num_hidden_layers"] == 5
    assert p.config["layer_types"] == ["sliding", "full", "full", "sliding", "full"]


def test_tied_lm_head_falls_back_to_embedding(tmp_path, trio):
    tied = dict(LLAMA, tie_word_embeddings=True)
    t = random_tensors(tied, 9)
    path = write_model(tmp_path / "tied", t, tied)
    recipe = recipe_file(tmp_path, f"""merge_method: linear
models:
  - model: {trio['a']}
    parameters: {{weight: 1}}
  - model: {path}
    parameters: {{weight: 1}}
""")
    p = mergesmith.plan(recipe, allow_crimes=True)
    head = out(p, "lm_head.weight")
    assert head.inputs[1].name == "model.embed_tokens.weight"


def test_extra_tensors_of_other_models_are_reported(tmp_path, trio):
    tensors = random_tensors(LLAMA, 4)
    tensors["model.extra.weight"] = tensors["model.norm.weight"].clone()
    path = write_model(tmp_path / "extra", tensors)
    recipe = recipe_file(tmp_path, f"""merge_method: linear
models:
  - model: {trio['a']}
    parameters: {{weight: 1}}
  - model: {path}
    parameters: {{weight: 1}}
""")
    p = mergesmith.plan(recipe)
    assert any("model.extra.weight" in w for w in p.warnings)


def test_missing_tensor_is_a_plan_error(tmp_path, trio):
    tensors = random_tensors(LLAMA, 4)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    path = write_model(tmp_path / "partial", tensors)
    recipe = recipe_file(tmp_path, f"""merge_method: task_arithmetic
base_model: {trio['base']}
models:
  - model: {path}
    parameters: {{weight: 1}}
""")
    with pytest.raises(MergeError, match="has no tensor 'model.layers.1.mlp.up_proj.weight'"):
        mergesmith.plan(recipe)


def test_different_architectures_need_allow_crimes(tmp_path, trio):
    other = dict(LLAMA, architectures=["MistralForCausalLM"], model_type="mistral")
    path = write_model(tmp_path / "mistral", random_tensors(LLAMA, 3), other)
    recipe = recipe_file(tmp_path, f"""merge_method: linear
models:
  - model: {trio['a']}
    parameters: {{weight: 1}}
  - model: {path}
    parameters: {{weight: 1}}
""")
    with pytest.raises(MergeError, match="--allow-crimes"):
        mergesmith.plan(recipe)
    assert mergesmith.plan(recipe, allow_crimes=True).tensors


def test_base_is_auto_added_for_linear_and_needs_a_weight(tmp_path, trio):
    recipe = recipe_file(tmp_path, f"""merge_method: linear
base_model: {trio['base']}
models:
  - model: {trio['a']}
    parameters: {{weight: 1}}
""")
    with pytest.raises(MergeError, match="needs one too"):
        mergesmith.plan(recipe)


def test_donor_is_base_else_first_model(tmp_path, trio):
    cfg = json.loads((trio["b"] / "config.json").read_text())
    cfg["marker"] = "b"
    (trio["b"] / "config.json").write_text(json.dumps(cfg))
    recipe = recipe_file(tmp_path, f"""merge_method: linear
models:
  - model: {trio['b']}
    parameters: {{weight: 1}}
  - model: {trio['a']}
    parameters: {{weight: 1}}
""")
    assert mergesmith.plan(recipe).config["marker"] == "b"


def test_output_dtype_defaults_to_input_dtype(tmp_path, trio):
    import torch

    recipe = recipe_file(tmp_path, f"""merge_method: linear
models:
  - model: {trio['a']}
    parameters: {{weight: 1}}
""")
    assert {t.dtype for t in mergesmith.plan(recipe).tensors} == {torch.float32}


def _two_stack_model(tmp_path, name, seed):
    """An encoder-decoder-shaped checkpoint built by hand (names like T5's)."""
    from safetensors.torch import save_file

    g = torch_generator(seed)
    tensors = {"shared.weight": rnd(g, 16, 8), "lm_head.weight": rnd(g, 16, 8)}
    for side, n in (("encoder", 2), ("decoder", 3)):
        for i in range(n):
            tensors[f"{side}.block.{i}.layer.0.q.weight"] = rnd(g, 8, 8)
            tensors[f"{side}.block.{i}.layer.1.norm.weight"] = rnd(g, 8)
        tensors[f"{side}.final_layer_norm.weight"] = rnd(g, 8)
    folder = tmp_path / name
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["T5ForConditionalGeneration"], "num_layers": 2,
        "num_decoder_layers": 3, "layer_types": ["a", "b", "c"]}))
    return folder, tensors


def torch_generator(seed):
    import torch

    return torch.Generator().manual_seed(seed)


def rnd(g, *shape):
    import torch

    return torch.randn(*shape, generator=g)


def test_modules_recipe_merges_named_modules_and_carries_the_rest(tmp_path):
    a, ta = _two_stack_model(tmp_path, "a", 1)
    b, tb = _two_stack_model(tmp_path, "b", 2)
    recipe = recipe_file(tmp_path, f"""merge_method: passthrough
modules:
  decoder:
    slices:
      - sources:
          - model: {a}
            layer_range: [0, 3]
      - sources:
          - model: {b}
            layer_range: [2, 3]
""")
    p = mergesmith.plan(recipe)
    names = {t.name for t in p.tensors}
    assert "decoder.block.3.layer.0.q.weight" in names and "encoder.block.1.layer.0.q.weight" in names
    assert p.config["num_decoder_layers"] == 4 and p.config["num_layers"] == 2
    assert any("module 'encoder'" in n and "copied" in n for n in p.notes)
    assert any("module 'shared'" in n for n in p.notes)
    head = out(p, "lm_head.weight")  # the decoder's post-layer tensor: from the last slice
    assert p.models[head.inputs[0].model].folder == str(b)
    report = mergesmith.check(recipe).summary()
    assert "layer map of module 'decoder'" in report
    assert "0-2 ←" in report and "3 ←" in report


def test_slices_on_a_multi_module_model_ask_for_modules(tmp_path):
    a, _ = _two_stack_model(tmp_path, "a", 1)
    recipe = recipe_file(tmp_path, f"""merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
""")
    with pytest.raises(MergeError, match="several modules .*decoder.*modules:"):
        mergesmith.plan(recipe)


def test_unknown_module_name_lists_the_modules(tmp_path):
    a, _ = _two_stack_model(tmp_path, "a", 1)
    recipe = recipe_file(tmp_path, f"""merge_method: linear
modules:
  decodr:
    models:
      - model: {a}
        parameters: {{weight: 1}}
""")
    with pytest.raises(MergeError, match="no module 'decodr'. Did you mean 'decoder'"):
        mergesmith.plan(recipe)


def test_module_parameters_sit_between_slice_and_top_level(tmp_path):
    a, _ = _two_stack_model(tmp_path, "a", 1)
    b, _ = _two_stack_model(tmp_path, "b", 2)
    recipe = recipe_file(tmp_path, f"""merge_method: linear
parameters: {{weight: 0.1}}
modules:
  encoder:
    parameters: {{weight: 0.5}}
    models:
      - model: {a}
      - model: {b}
        parameters: {{weight: 0.9}}
""")
    p = mergesmith.plan(recipe)
    t = out(p, "encoder.block.0.layer.0.q.weight")
    assert [m["weight"] for m in t.model_params] == [0.5, 0.9]


def test_untied_head_added_when_some_inputs_have_one(tmp_path, trio):
    tied = dict(LLAMA, tie_word_embeddings=True)
    path = write_model(tmp_path / "tied", random_tensors(tied, 9), tied)
    recipe = recipe_file(tmp_path, f"""merge_method: linear
models:
  - model: {path}
    parameters: {{weight: 1}}
  - model: {trio['a']}
    parameters: {{weight: 1}}
""")
    p = mergesmith.plan(recipe)
    head = out(p, "lm_head.weight")
    assert head.inputs[0].name == "model.embed_tokens.weight"  # the tied donor's embedding
    assert p.config["tie_word_embeddings"] is False


def test_output_stays_tied_when_all_inputs_are(tmp_path):
    tied = dict(LLAMA, tie_word_embeddings=True)
    x = write_model(tmp_path / "x", random_tensors(tied, 1), tied)
    y = write_model(tmp_path / "y", random_tensors(tied, 2), tied)
    recipe = recipe_file(tmp_path, f"""merge_method: linear
models:
  - model: {x}
    parameters: {{weight: 1}}
  - model: {y}
    parameters: {{weight: 1}}
""")
    p = mergesmith.plan(recipe)
    assert "lm_head.weight" not in {t.name for t in p.tensors}
    assert p.config["tie_word_embeddings"] is True


def test_non_floating_buffers_are_copied_when_equal_and_refused_when_not(tmp_path):
    import torch

    base = random_tensors(LLAMA, 0)
    buffers = dict(base, **{"model.position_ids": torch.arange(8)})
    a = write_model(tmp_path / "a", buffers)
    b = write_model(tmp_path / "b", dict(random_tensors(LLAMA, 1, base),
                                         **{"model.position_ids": torch.arange(8)}))
    c = write_model(tmp_path / "c", dict(random_tensors(LLAMA, 2, base),
                                         **{"model.position_ids": torch.arange(8) + 1}))
    text = """merge_method: linear
models:
  - model: {x}
    parameters: {{weight: 1}}
  - model: {y}
    parameters: {{weight: 1}}
"""
    mergesmith.run(recipe_file(tmp_path, text.format(x=a, y=b)), tmp_path / "ok")
    from conftest import load_model

    out = load_model(tmp_path / "ok")
    assert out["model.position_ids"].dtype == torch.int64
    assert torch.equal(out["model.position_ids"], torch.arange(8))
    with pytest.raises(MergeError, match="non-floating tensor 'model.position_ids' differs"):
        mergesmith.run(recipe_file(tmp_path, text.format(x=a, y=c)), tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_override_architecture_replaces_the_config_architecture(tmp_path, trio):
    other = dict(LLAMA, architectures=["MyLlamaForCausalLM"])
    path = write_model(tmp_path / "renamed", random_tensors(LLAMA, 3), other)
    recipe = recipe_file(tmp_path, f"""merge_method: linear
models:
  - model: {trio['a']}
    parameters: {{weight: 1}}
  - model:
      model: {{path: {path}}}
      override_architecture: LlamaForCausalLM
    parameters: {{weight: 1}}
""")
    assert mergesmith.plan(recipe).config["architectures"] == ["LlamaForCausalLM"]

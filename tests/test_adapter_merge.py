"""``output: adapter``: LoRA adapters merged into a LoRA adapter."""

from __future__ import annotations

import pytest
import torch
from conftest import load_model, recipe_file
from safetensors.torch import load_file
from test_cli import assert_user_error, invoke
from test_lora import LLAMA

import mergesmith

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture
def adapters(tmp_path):
    """A base and two adapters with different ranks, targets and scales."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    base.save_pretrained(tmp_path / "base")
    specs = {"one": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
             "two": dict(r=2, lora_alpha=6, target_modules=["q_proj", "down_proj",
                                                            "embed_tokens"])}
    for name, spec in specs.items():
        torch.manual_seed(hash(name) % 1000)
        model = peft.get_peft_model(
            transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
            peft.LoraConfig(init_lora_weights=False, **spec))
        model.save_pretrained(tmp_path / name)
    return tmp_path / "base", tmp_path / "one", tmp_path / "two"


def _recipe(tmp_path, base, inputs, method="linear", extra="", name="recipe.yml"):
    models = "".join(f"  - model: {base}+{a}\n    parameters: {{weight: {w}}}\n"
                     for a, w in inputs)
    base_line = "" if method == "linear" else f"base_model: {base}\n"
    return recipe_file(tmp_path, f"merge_method: {method}\n{base_line}models:\n{models}{extra}",
                       name=name)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_exact_methods_equal_the_full_model_merge(tmp_path, adapters, method):
    base, one, two = adapters
    inputs = [(one, 0.7), (two, 0.3)] if method == "linear" else [(one, 0.8), (two, -0.5)]
    full = _recipe(tmp_path, base, inputs, method, name="full.yml")
    mergesmith.run(full, tmp_path / "full")
    merged = _recipe(tmp_path, base, inputs, method, "output: adapter\n", name="adapter.yml")
    mergesmith.run(merged, tmp_path / "adapter")
    applied = recipe_file(tmp_path, f"merge_method: passthrough\nmodels:\n"
                                    f"  - model: {base}+{tmp_path / 'adapter'}\n", name="a.yml")
    mergesmith.run(applied, tmp_path / "applied")
    got, want = load_model(tmp_path / "applied"), load_model(tmp_path / "full")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    # and PEFT loads it
    model = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(base), tmp_path / "adapter")
    merged_model = model.merge_and_unload()
    for name, p in merged_model.state_dict().items():
        if name in want:
            torch.testing.assert_close(p, want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_one_adapter_at_weight_one_comes_back(tmp_path, adapters):
    base, one, _ = adapters
    mergesmith.run(_recipe(tmp_path, base, [(one, 1.0)], "linear", "output: adapter\n"),
                   tmp_path / "same")
    a = load_file(one / "adapter_model.safetensors")
    b = load_file(tmp_path / "same" / "adapter_model.safetensors")
    # PEFT also saved an unchanged copy of the base embedding ("base_layer"); it is dropped
    lora = {k for k in a if ".lora_" in k}
    assert lora == set(b) and all(torch.equal(a[k], b[k]) for k in lora)


def test_ties_on_adapters_is_reduced_to_the_requested_rank(tmp_path, adapters):
    base, one, two = adapters
    recipe = _recipe(tmp_path, base, [(one, 1.0), (two, 1.0)], "ties",
                     "parameters: {density: 0.5}\noutput: adapter\noutput_rank: 3\n")
    result = invoke("run", str(recipe), str(tmp_path / "ties"))
    assert result.exit_code == 0, result.output
    assert "largest relative error" in result.output
    tensors = load_file(tmp_path / "ties" / "adapter_model.safetensors")
    assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")} == {3}


def test_adapter_output_needs_adapters(tmp_path, adapters):
    base, _, _ = adapters
    recipe = recipe_file(tmp_path, f"merge_method: linear\nmodels:\n  - model: {base}\n"
                                   f"    parameters: {{weight: 1.0}}\noutput: adapter\n")
    out = tmp_path / "out"
    assert_user_error(invoke("run", str(recipe), str(out)), "LoRA inputs", out=out)

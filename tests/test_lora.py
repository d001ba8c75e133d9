"""LoRA adapters as inputs (``base+adapter``): equal to PEFT's merge_and_unload.

PEFT is a test dependency only; it builds the adapters and the reference merges.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_model, recipe_file
from test_cli import assert_user_error, invoke

import mergesmith

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def _perturb_saved_modules(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p))


def make_adapter(tmp_path, lora_kwargs, arch="llama", seed=0):
    """A tiny base model, a random (non-zero) adapter on it, and PEFT's merged model."""
    torch.manual_seed(seed)
    if arch == "llama":
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    else:
        base = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    base.save_pretrained(tmp_path / "base")
    config = peft.LoraConfig(init_lora_weights=False, **lora_kwargs)
    model = peft.get_peft_model(base, config)
    _perturb_saved_modules(model)
    model.save_pretrained(tmp_path / "adapter")
    model.merge_and_unload().save_pretrained(tmp_path / "peft_merged")
    return tmp_path / "base", tmp_path / "adapter", tmp_path / "peft_merged"


CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
    "rslora": dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "up_proj"]),
    "per_module_ranks": dict(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"],
                             rank_pattern={"k_proj": 2, "layers.1.self_attn.q_proj": 3},
                             alpha_pattern={"down_proj": 5}),
    "modules_to_save": dict(r=4, lora_alpha=4, target_modules=["v_proj"],
                            modules_to_save=["lm_head"]),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "gate_proj"]),
}


def assert_same_model(got_folder, want_folder, rtol=1e-5, atol=1e-6):
    got, want = load_model(got_folder), load_model(want_folder)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_applied_like_peft(tmp_path, case):
    base, adapter, merged = make_adapter(tmp_path, CASES[case])
    recipe = recipe_file(tmp_path, f"merge_method: passthrough\nmodels:\n"
                                   f"  - model: {base}+{adapter}\n")
    mergesmith.run(recipe, tmp_path / "out")
    assert_same_model(tmp_path / "out", merged)
    # the adapter really changed something (the test could not pass by copying the base)
    assert any(not torch.equal(a, b) for a, b in zip(load_model(base).values(),
                                                     load_model(merged).values()))


def test_fan_in_fan_out_layers(tmp_path):
    base, adapter, merged = make_adapter(
        tmp_path, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                       fan_in_fan_out=True), arch="gpt2")
    recipe = recipe_file(tmp_path, f"merge_method: passthrough\nmodels:\n"
                                   f"  - model: {base}+{adapter}\n")
    mergesmith.run(recipe, tmp_path / "out")
    got, want = load_model(tmp_path / "out"), load_model(merged)
    for name in want:
        if name in got:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_adapter_inside_task_arithmetic_with_mapping_form(tmp_path):
    """base + 1.0·((base+adapter) − base) is the adapted model; in row chunks too."""
    base, adapter, merged = make_adapter(tmp_path, CASES["plain"])
    recipe = recipe_file(tmp_path, f"""merge_method: task_arithmetic
base_model: {base}
models:
  - model: {{model: {base}, lora: {adapter}}}
    parameters: {{weight: 1.0}}
""")
    import mergesmith.execute as ex

    ex_chunk = ex.CHUNK_ELEMENTS
    try:
        ex.CHUNK_ELEMENTS = 200  # row chunks: ΔW computed per block of rows
        mergesmith.run(recipe, tmp_path / "out")
    finally:
        ex.CHUNK_ELEMENTS = ex_chunk
    assert_same_model(tmp_path / "out", merged)


def test_dora_is_refused(tmp_path):
    base, adapter, _ = make_adapter(tmp_path, dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                   use_dora=True))
    recipe = recipe_file(tmp_path, f"merge_method: passthrough\nmodels:\n"
                                   f"  - model: {base}+{adapter}\n")
    out = tmp_path / "out"
    assert_user_error(invoke("run", str(recipe), str(out)), "DoRA", out=out)


def test_adapter_for_another_model_is_refused(tmp_path):
    _, adapter, _ = make_adapter(tmp_path / "one", CASES["plain"])
    other = dict(LLAMA, hidden_size=48)
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**other)).save_pretrained(
        tmp_path / "other")
    recipe = recipe_file(tmp_path, f"merge_method: passthrough\nmodels:\n"
                                   f"  - model: {tmp_path / 'other'}+{adapter}\n")
    assert_user_error(invoke("check", str(recipe)), "another model")


def test_adapter_folder_without_config_is_refused(tmp_path):
    base, adapter, _ = make_adapter(tmp_path, CASES["plain"])
    (adapter / "adapter_config.json").unlink()
    recipe = recipe_file(tmp_path, f"merge_method: passthrough\nmodels:\n"
                                   f"  - model: {base}+{adapter}\n")
    assert_user_error(invoke("check", str(recipe)), "adapter_config.json")


def test_other_peft_types_are_refused(tmp_path):
    base, adapter, _ = make_adapter(tmp_path, CASES["plain"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["peft_type"] = "IA3"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    recipe = recipe_file(tmp_path, f"merge_method: passthrough\nmodels:\n"
                                   f"  - model: {base}+{adapter}\n")
    assert_user_error(invoke("check", str(recipe)), "IA3")

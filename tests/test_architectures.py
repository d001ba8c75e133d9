"""Any architecture without tables: tiny transformers models of many families, merged three ways.

For each family: a linear merge, a task-arithmetic merge and a frankenmerge that changes the
depth. Every output loads with its Auto class and runs; merged tensors equal the formula;
frankenmerge layer k equals the source layer the recipe names; no donor tensor is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_model, recipe_file

import mergesmith
from mergesmith import arch

transformers = pytest.importorskip("transformers")
T = transformers

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _configs():
    """family → (config, Auto class name, module to slice or None)."""
    return {
        "llama": (T.LlamaConfig(**TINY, head_dim=8), "AutoModelForCausalLM", None),
        "mistral": (T.MistralConfig(**TINY, head_dim=8), "AutoModelForCausalLM", None),
        "qwen2": (T.Qwen2Config(**TINY, tie_word_embeddings=True), "AutoModelForCausalLM", None),
        "gemma2": (T.Gemma2Config(**TINY, head_dim=8), "AutoModelForCausalLM", None),
        "phi3": (T.Phi3Config(**TINY, pad_token_id=0), "AutoModelForCausalLM", None),
        "gpt2": (T.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64),
                 "AutoModelForCausalLM", None),
        "gpt_neox": (T.GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=3, num_attention_heads=4,
                                     max_position_embeddings=64),
                     "AutoModelForCausalLM", None),
        "mixtral": (T.MixtralConfig(**TINY, head_dim=8, num_local_experts=3,
                                    num_experts_per_tok=2), "AutoModelForCausalLM", None),
        "bert": (T.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                              num_hidden_layers=3, num_attention_heads=4,
                              max_position_embeddings=64), "AutoModelForMaskedLM", None),
        "t5": (T.T5Config(vocab_size=64, d_model=32, d_ff=48, d_kv=8, num_layers=2,
                          num_decoder_layers=3, num_heads=4, decoder_start_token_id=0),
               "AutoModelForSeq2SeqLM", "decoder"),
        "llava": (T.LlavaConfig(
            vision_config=T.CLIPVisionConfig(hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             image_size=32, patch_size=8),
            text_config=T.LlamaConfig(**TINY, head_dim=8), image_token_index=63),
            "AutoModelForImageTextToText", "text_decoder"),
    }


FAMILIES = list(_configs())


def _build(config, auto: str, folder: Path, seed: int, base: dict | None = None) -> Path:
    torch.manual_seed(seed)
    model = getattr(T, auto).from_config(config)
    if base is not None:  # a "fine-tune": the base plus seeded noise
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base[name] + 0.02 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    name = request.param
    config, auto, module = _configs()[name]
    root = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    base_model = getattr(T, auto).from_config(config)
    base_model.save_pretrained(root / "base")
    base = {k: v.detach().clone() for k, v in base_model.named_parameters()}
    _build(config, auto, root / "ft1", 1, base)
    _build(config, auto, root / "ft2", 2, base)
    return {"name": name, "auto": auto, "module": module, "root": root,
            "base": root / "base", "ft1": root / "ft1", "ft2": root / "ft2"}


def _run_and_load(f, recipe_text: str, out: Path):
    mergesmith.run(recipe_file(f["root"], recipe_text), out, overwrite=True)
    model = getattr(T, f["auto"]).from_pretrained(out)
    model.eval()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    kwargs = {"decoder_input_ids": ids} if f["name"] == "t5" else {}
    with torch.no_grad():
        result = model(input_ids=ids, **kwargs)
    values = result.logits if hasattr(result, "logits") else result.last_hidden_state
    assert torch.isfinite(values).all(), f["name"]
    return load_model(out)


def _donor_names(folder: Path) -> set[str]:
    return set(load_model(folder))


def test_linear_merge(family):
    f = family
    out = _run_and_load(f, f"""merge_method: linear
models:
  - model: {f['ft1']}
    parameters: {{weight: 0.3}}
  - model: {f['ft2']}
    parameters: {{weight: 0.7}}
""", f["root"] / "linear")
    a, b = load_model(f["ft1"]), load_model(f["ft2"])
    assert set(out) == set(a)
    for name, x in a.items():
        if x.is_floating_point():
            want = (0.3 * x.double() + 0.7 * b[name].double()) / 1.0
            torch.testing.assert_close(out[name].double(), want, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(out[name], x)


def test_task_arithmetic_merge(family):
    f = family
    out = _run_and_load(f, f"""merge_method: task_arithmetic
base_model: {f['base']}
models:
  - model: {f['ft1']}
    parameters: {{weight: 0.6}}
  - model: {f['ft2']}
    parameters: {{weight: 0.4}}
""", f["root"] / "ta")
    base, a, b = load_model(f["base"]), load_model(f["ft1"]), load_model(f["ft2"])
    assert set(out) == set(base)
    for name, x in base.items():
        if x.is_floating_point():
            want = x.double() + 0.6 * (a[name].double() - x) + 0.4 * (b[name].double() - x)
            torch.testing.assert_close(out[name].double(), want, rtol=1e-5, atol=1e-6)


def test_frankenmerge_changes_depth(family):
    f = family
    names = list(load_model(f["ft1"]))
    modules = arch.infer_modules(names)
    target = arch.find_module(modules, f["module"] or arch.DEFAULT_MODULE)
    n = target.layers
    slices = f"""
  - sources:
      - model: {f['ft1']}
        layer_range: [0, {n}]
  - sources:
      - model: {f['ft2']}
        layer_range: [1, {n}]
"""
    if f["module"]:
        indented = "\n".join("    " + line if line else line for line in slices.splitlines())
        body = f"modules:\n  {f['module']}:\n    slices:{indented}\n"
    else:
        body = f"slices:{slices}"
    out = _run_and_load(f, f"merge_method: passthrough\n{body}", f["root"] / "franken")
    a, b = load_model(f["ft1"]), load_model(f["ft2"])
    depth = 2 * n - 1
    sources = [(a, i) for i in range(n)] + [(b, i) for i in range(1, n)]
    for k, (src, i) in enumerate(sources):
        rests = target.layer_tensors(src, i)
        assert rests
        for rest in rests:
            assert torch.equal(out[f"{target.stack}.{k}.{rest}"], src[f"{target.stack}.{i}.{rest}"])
    assert not any(n_.startswith(f"{target.stack}.{depth}.") for n_ in out)
    assert _donor_names(f["ft1"]) <= set(out)  # no donor tensor is missing
    config = json.loads((f["root"] / "franken" / "config.json").read_text())
    counts = [v for p, v in arch.walk_config(config) if p[-1] in (
        "num_hidden_layers", "n_layer", "num_decoder_layers") and v == depth]
    assert counts, config
    module_tensors = set(target.tensors)
    for name, x in out.items():  # pre-layer tensors from the first slice, post from the last;
        layer = arch.split_layer(name)  # other modules copied from the donor (ft1)
        if layer is None or layer.prefix != target.stack:
            owner = b if name in module_tensors and not arch.is_pre_layer(name) else a
            assert torch.equal(x, owner[name]), name


def test_every_donor_tensor_is_planned(family):
    f = family
    p = mergesmith.plan(recipe_file(f["root"], f"""merge_method: linear
models:
  - model: {f['ft1']}
    parameters: {{weight: 1.0}}
"""))
    assert {t.name for t in p.tensors} == _donor_names(f["ft1"])

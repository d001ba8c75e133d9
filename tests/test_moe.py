"""``mergesmith moe``: MoE models from tiny dense experts load in transformers and generate,
expert tensors equal the sources', routers follow mergekit-moe's formulas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file
from test_gguf_export import bpe_tokenizer

from mergesmith.cli import cli
from mergesmith.moe import check_moe, run_moe

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
              max_position_embeddings=128)
KINDS = {"llama": ("LlamaConfig", {}), "mistral": ("MistralConfig", {}),
         "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
         "qwen3": ("Qwen3Config", {"head_dim": 16})}


def dense(folder: Path, kind: str = "llama", seed: int = 0, **over) -> Path:
    cls, extra = KINDS[kind]
    config = getattr(transformers, cls)(**{**COMMON, **extra, **over})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    bpe_tokenizer(folder, qwen_split=kind.startswith("qwen"))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-models")
    out = {}
    for kind in ("llama", "qwen2", "qwen3"):
        for i in range(3):
            out[f"{kind}{i}"] = dense(root / f"{kind}{i}", kind, seed=i)
    out["mistral0"] = dense(root / "mistral0", "mistral", seed=7)
    out["wide"] = dense(root / "wide", "llama", seed=8, intermediate_size=128)
    return out


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESMITH_MOE_CACHE", str(tmp_path / "moe-cache"))


PROMPTS = [["the cat sat on the mat", "a small cat"], ["numbers one two three", "count to ten"],
           ["the river flows to the sea", "water and rain"]]


def config(models, kind: str, n: int = 2, shared: int = 0, **top) -> dict:
    cfg = {"base_model": str(models[f"{kind}0"]), "gate_mode": "random", "dtype": "float32",
           "experts": [{"source_model": str(models[f"{kind}{i % 3}"]),
                        "positive_prompts": PROMPTS[i % 3]} for i in range(n)]}
    if shared:
        cfg["shared_experts"] = [{"source_model": str(models[f"{kind}{(i + 1) % 3}"])}
                                 for i in range(shared)]
    cfg.update(top)
    return cfg


def generate(out: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 9, 12]])
    got = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert got.shape == (1, 8)
    return got


def mlp(folder: Path, layer: int, proj: str) -> torch.Tensor:
    return load_file(folder / "model.safetensors")[f"model.layers.{layer}.mlp.{proj}.weight"]


def test_mixtral_layout_experts_and_generation(models, tmp_path):
    cfg = config(models, "llama", n=3, experts_per_token=2)
    cfg["experts"][1]["residual_scale"] = 0.5
    out = tmp_path / "out"
    run_moe(cfg, out, seed=1)
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["MixtralForCausalLM"]
    assert c["num_local_experts"] == 3 and c["num_experts_per_tok"] == 2
    got = load_file(out / "model.safetensors")
    base = load_file(models["llama0"] / "model.safetensors")
    for layer in range(2):
        p = f"model.layers.{layer}.mlp."
        gate_up, down = got[p + "experts.gate_up_proj"], got[p + "experts.down_proj"]
        assert gate_up.shape == (3, 192, 64) and down.shape == (3, 64, 96)
        for e in range(3):
            src = models[f"llama{e % 3}"]
            assert torch.equal(gate_up[e], torch.cat([mlp(src, layer, "gate_proj"),
                                                      mlp(src, layer, "up_proj")]))
            scale = 0.5 if e == 1 else 1.0
            assert torch.equal(down[e], mlp(src, layer, "down_proj") * scale)
        assert got[p + "gate.weight"].shape == (3, 64)
    for name, t in base.items():
        if ".mlp." not in name:
            assert torch.equal(got[name], t), name
    generate(out)


def test_random_gates_are_seeded(models, tmp_path):
    cfg = config(models, "llama", n=2)
    a, b, c = (tmp_path / x for x in "abc")
    run_moe(cfg, a, seed=3)
    run_moe(cfg, b, seed=3)
    run_moe(cfg, c, seed=4)
    name = "model.layers.1.mlp.gate.weight"
    ra, rb, rc = (load_file(x / "model.safetensors")[name] for x in (a, b, c))
    assert torch.equal(ra, rb) and not torch.equal(ra, rc)
    assert ra.std() > 0.5  # N(0, 1) as mergekit's randn
    u = tmp_path / "u"
    run_moe({**cfg, "gate_mode": "uniform_random"}, u, seed=3)
    ru = load_file(u / "model.safetensors")[name]
    assert ru.abs().max() <= 1 / 8  # U(-1/√64, 1/√64)


def test_cheap_embed_formula(models, tmp_path):
    cfg = config(models, "llama", n=2, gate_mode="cheap_embed")
    cfg["experts"][0]["negative_prompts"] = ["numbers"]
    out = tmp_path / "out"
    run_moe(cfg, out)
    tok = transformers.AutoTokenizer.from_pretrained(models["llama0"])
    embed = load_file(models["llama0"] / "model.safetensors")["model.embed_tokens.weight"]

    def vec(prompts):
        s = torch.zeros(64)
        for p in prompts:  # padding adds nothing: each prompt's tokens summed
            ids = tok(tok.bos_token + p, add_special_tokens=False)["input_ids"]
            s += embed[ids].sum(0)
        return s / s.norm()

    want0 = vec(PROMPTS[0]) - vec(["numbers"])
    want = torch.stack([want0 / want0.norm(), vec(PROMPTS[1])])
    got = load_file(out / "model.safetensors")
    for layer in range(2):
        torch.testing.assert_close(got[f"model.layers.{layer}.mlp.gate.weight"], want)


def test_hidden_gates_route_prompts_to_their_expert(models, tmp_path):
    cfg = config(models, "llama", n=3, gate_mode="hidden", experts_per_token=1)
    out = tmp_path / "out"
    run_moe(cfg, out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for k in range(3):
        for prompt in PROMPTS[k]:
            ids = tok(tok.bos_token + prompt, return_tensors="pt",
                      add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                h = model.model.embed_tokens(ids)[0, -1]  # the input of layer 0
            logits = model.model.layers[0].mlp.gate.weight.float() @ h.float()
            assert int(logits.argmax()) == k, (prompt, logits)
    generate(out)


def test_qwen2_moe_shared_expert_tied(models, tmp_path):
    cfg = config(models, "qwen2", n=2, shared=1)
    cfg["shared_experts"][0]["positive_prompts"] = ["anything"]
    out = tmp_path / "out"
    run_moe(cfg, out)
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["Qwen2MoeForCausalLM"] and c["num_experts"] == 2
    assert c["tie_word_embeddings"] is True
    got = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in got
    shared = models["qwen21"]
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert torch.equal(got[f"model.layers.1.mlp.shared_expert.{proj}.weight"],
                           mlp(shared, 1, proj))
    assert got["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 64)
    base = load_file(models["qwen20"] / "model.safetensors")
    assert torch.equal(got["model.layers.0.self_attn.q_proj.bias"],
                       base["model.layers.0.self_attn.q_proj.bias"])
    generate(out)


def test_qwen3_moe(models, tmp_path):
    out = tmp_path / "out"
    run_moe(config(models, "qwen3", n=2), out)
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["Qwen3MoeForCausalLM"]
    got = load_file(out / "model.safetensors")
    assert torch.equal(got["model.layers.0.mlp.experts.down_proj"][1],
                       mlp(models["qwen31"], 0, "down_proj"))
    generate(out)


def test_deepseek_style_several_shared_experts(models, tmp_path):
    out = tmp_path / "out"
    run_moe(config(models, "llama", n=2, shared=2), out)
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["Glm4MoeForCausalLM"] and c["n_shared_experts"] == 2
    got = load_file(out / "model.safetensors")
    a, b = models["llama1"], models["llama2"]
    p = "model.layers.0.mlp.shared_experts."
    assert torch.equal(got[p + "gate_proj.weight"],
                       torch.cat([mlp(a, 0, "gate_proj"), mlp(b, 0, "gate_proj")]))
    assert torch.equal(got[p + "down_proj.weight"],
                       torch.cat([mlp(a, 0, "down_proj"), mlp(b, 0, "down_proj")], dim=1))
    generate(out)


def _fails(tmp_path, cfg: dict | str) -> str:
    path = tmp_path / "moe.yml"
    if isinstance(cfg, dict):
        import yaml

        cfg = yaml.safe_dump(cfg, sort_keys=False)
    path.write_text(cfg)
    r = CliRunner().invoke(cli, ["moe", str(path), str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.strip().splitlines()
             if not line.startswith("warning: ")]
    assert len(lines) == 1, r.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    return lines[0]


def test_bad_inputs_one_line_before_weights(models, tmp_path):
    cfg = config(models, "llama", n=2)
    bad = {**cfg, "experts": [cfg["experts"][0], {"source_model": str(models["wide"])}]}
    assert "intermediate_size 128" in _fails(tmp_path, bad)
    bad = {**cfg, "experts": [cfg["experts"][0], {"source_model": str(models["qwen20"])}]}
    assert "qwen2 model" in _fails(tmp_path, bad)
    assert "experts_per_token is 3" in _fails(tmp_path, {**cfg, "experts_per_token": 3})
    bad = {**cfg, "gate_mode": "hidden"}
    bad["experts"] = [cfg["experts"][0], {"source_model": str(models["llama1"])}]
    assert "no positive_prompts" in _fails(tmp_path, bad)
    text = (f"base_model: {models['llama0']}\nexperts_per_token: 1\nexperts:\n"
            f"  - source_model: {models['llama1']}\n    positiv_prompts: [a]\n")
    msg = _fails(tmp_path, text)  # mergekit-moe ignores the key: why prompts are missing
    assert "no positive_prompts" in msg
    assert "Perhaps because of" in msg and "unknown key 'positiv_prompts'" in msg
    assert "moe.yml:5" in msg
    assert "Possible outputs" in _fails(tmp_path, {**cfg, "architecture": "qwen3"})


def test_check_prints_the_plan(models, tmp_path):
    report = check_moe(config(models, "llama", n=3))
    text = report.summary()
    assert "MixtralForCausalLM" in text and "3 experts per layer" in text
    assert not list((tmp_path).glob("moe-cache/*"))  # nothing computed, nothing read


def test_work_items_do_not_grow_with_experts(models):
    """The engine's per-item memory (what the scheduler bounds) is one expert's tensors,
    whether there are 2 or 8 experts (process RSS is left to the bench)."""
    from mergesmith.execute import item_memory, work_items

    def peak(n: int) -> int:
        p = check_moe(config(models, "llama", n=n)).plan
        return max(item_memory(p, i) for i in work_items(p))

    assert peak(8) == peak(2)


def test_shared_expert_from_a_model_that_is_not_an_expert(models, tmp_path):
    """mergekit-moe 0.1.5 crashes on this ('NoneType' object has no attribute 'get_tensor',
    tests/data/moe/error_shared_expert_not_loaded): a shared expert whose model is neither
    the base nor a routed expert is read like any other input."""
    cfg = config(models, "qwen2", n=2)
    cfg["shared_experts"] = [{"source_model": str(models["qwen22"]),
                              "positive_prompts": ["anything"]}]
    out = tmp_path / "out"
    run_moe(cfg, out)
    got = load_file(out / "model.safetensors")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert torch.equal(got[f"model.layers.0.mlp.shared_expert.{proj}.weight"],
                           mlp(models["qwen22"], 0, proj))
    generate(out)


def test_an_fp8_expert_is_read_as_what_it_dequantizes_to(models, tmp_path):
    """Experts are model references of any kind mergesmith reads: here a block-scaled FP8
    copy of an expert gives that expert's dequantized weights (rounded to the dtype)."""
    import shutil

    from safetensors.torch import save_file
    from test_quantized import dequantize, quantize

    src = models["llama1"]
    fp8 = tmp_path / "fp8"
    shutil.copytree(src, fp8)
    tensors = load_file(src / "model.safetensors")
    stored, want = {}, {}
    for name, t in tensors.items():
        if ".mlp." in name:
            q, s = quantize(t.float(), (16, 16))
            stored[name], stored[f"{name}_scale_inv"] = q, s
            want[name] = dequantize(q, s, (16, 16))
        else:
            stored[name] = t
    save_file(stored, str(fp8 / "model.safetensors"), metadata={"format": "pt"})
    c = json.loads((fp8 / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
    (fp8 / "config.json").write_text(json.dumps(c))
    cfg = config(models, "llama", n=2)
    cfg["experts"][1]["source_model"] = str(fp8)
    out = tmp_path / "out"
    run_moe(cfg, out)
    got = load_file(out / "model.safetensors")
    layer = "model.layers.1.mlp."
    assert torch.equal(got[layer + "experts.down_proj"][1],
                       want[layer + "down_proj.weight"].to(got[layer + "experts.down_proj"].dtype))
    generate(out)


def test_the_moe_command_reports_what_it_wrote(models, tmp_path):
    """The command line end to end, with its progress bar and closing line."""
    import yaml

    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(config(models, "llama", n=2)))
    r = CliRunner().invoke(cli, ["moe", str(path), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert f"wrote {tmp_path / 'out'}" in r.output
    assert (tmp_path / "out" / "config.json").exists()

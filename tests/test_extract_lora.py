"""extract-lora: PEFT-loadable adapters, exact at the true rank, honest error reports."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_model, recipe_file
from safetensors.torch import load_file
from test_cli import assert_user_error, invoke

import mergesmith
from mergesmith.tools.extract_lora import choose_rank, extract_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def models(tmp_path, true_rank=None, seed=0):
    """A base and a fine-tune whose matrices differ by a dense (or rank-``true_rank``)
    update; norms change too."""
    torch.manual_seed(seed)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    ft = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for _, p in ft.named_parameters():
            if p.dim() == 2 and true_rank:
                p.add_(0.1 * torch.randn(p.shape[0], true_rank) @ torch.randn(true_rank, p.shape[1]))
            else:
                p.add_(0.05 * torch.randn_like(p))
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    return tmp_path / "base", tmp_path / "ft", ft


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_full_rank_adapter_loads_in_peft_and_reproduces_the_fine_tune(tmp_path):
    base, ft_folder, ft = models(tmp_path)
    extract_lora(str(ft_folder), str(base), str(tmp_path / "lora"), rank=64)
    model = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(base), tmp_path / "lora")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    want, got = logits(ft, ids), logits(model, ids)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4


def test_true_rank_is_exact_and_applies_through_a_recipe(tmp_path):
    base, ft_folder, _ = models(tmp_path, true_rank=8)
    result = extract_lora(str(ft_folder), str(base), str(tmp_path / "lora"), rank=8)
    assert {r.rank for r in result.reports if r.kind in ("lora", "embedding")} == {8}
    recipe = recipe_file(tmp_path, f"merge_method: passthrough\nmodels:\n"
                                   f"  - model: {base}+{tmp_path / 'lora'}\n")
    mergesmith.run(recipe, tmp_path / "applied")
    got, want = load_model(tmp_path / "applied"), load_model(ft_folder)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=2e-6, msg=name)


def test_report_matches_a_direct_computation(tmp_path):
    base, ft_folder, _ = models(tmp_path)
    extract_lora(str(ft_folder), str(base), str(tmp_path / "lora"), rank=3)
    report = {r["name"]: r for r in
              json.loads((tmp_path / "lora" / "extract_report.json").read_text())}
    adapter = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    b_w, f_w = load_model(base), load_model(ft_folder)
    checked = 0
    for name, r in report.items():
        if r["kind"] != "lora":
            continue
        module = "base_model.model." + name[: -len(".weight")]
        delta = (f_w[name] - b_w[name]).double()
        approx = adapter[module + ".lora_B.weight"].double() @ adapter[module + ".lora_A.weight"].double()
        direct = float(torch.linalg.matrix_norm(delta - approx) / torch.linalg.matrix_norm(delta))
        assert r["relative_error"] == pytest.approx(direct, rel=1e-4)
        assert 0.05 < direct < 1  # rank 3 of a dense update: a real, visible error
        checked += 1
    assert checked >= 14


def test_energy_chooses_ranks_per_matrix(tmp_path):
    base, ft_folder, _ = models(tmp_path)
    result = extract_lora(str(ft_folder), str(base), str(tmp_path / "lora"), energy=0.9)
    ranks = {r.rank for r in result.reports if r.kind == "lora"}
    assert len(ranks) > 1
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["alpha_pattern"] == config["rank_pattern"]
    assert all(r.relative_error ** 2 <= 0.1 + 1e-6 for r in result.reports if r.kind == "lora")


def test_choose_rank_by_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert choose_rank(s, None, 9 / 14) == 1
    assert choose_rank(s, None, 0.9) == 2
    assert choose_rank(s, None, 1.0) == 3
    assert choose_rank(s, 10, None) == 4


def test_randomized_svd_is_close_at_the_true_rank(tmp_path):
    base, ft_folder, _ = models(tmp_path, true_rank=2)
    result = extract_lora(str(ft_folder), str(base), str(tmp_path / "lora"), rank=2,
                          randomized=True, embeddings="skip")
    assert max(r.relative_error for r in result.reports if r.kind == "lora") < 1e-4


def test_cli_errors_and_summary(tmp_path):
    base, ft_folder, _ = models(tmp_path)
    out = tmp_path / "lora"
    assert_user_error(invoke("extract-lora", "--model", str(ft_folder), "--base", str(base),
                             "--out", str(out), "--rank", "4", "--energy", "0.9"),
                      "exactly one of --rank or --energy", out=out)
    assert_user_error(invoke("extract-lora", "--model", str(tmp_path / "nope"), "--base",
                             str(base), "--out", str(out), "--rank", "4"), "--model", out=out)
    result = invoke("extract-lora", "--model", str(ft_folder), "--base", str(base),
                    "--out", str(out), "--rank", "4", "-q")
    assert result.exit_code == 0, result.output
    assert "low-rank matrices" in result.output and (out / "adapter_config.json").exists()

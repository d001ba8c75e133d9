"""Mixture-of-experts checkpoints with ordinary recipes: MoE tensors recognised by name,
the filter keywords ``experts``/``router``/``shared_expert``, fused expert tensors merged per
expert (same result as the per-expert layout), and the Assembly-of-Experts recipe on tiny
Qwen2-MoE and DeepSeek-V3 models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_model, recipe_file

import mergesmith
from mergesmith import arch
from mergesmith.execute import work_items
from mergesmith.methods.in_memory import merge_tensors
from mergesmith.recipe.params import Conditional

ROLES = {
    # Mixtral / Phi-MoE (per expert)
    "model.layers.0.block_sparse_moe.experts.3.w1.weight": "experts",
    "model.layers.0.block_sparse_moe.gate.weight": "router",
    # Qwen2-MoE
    "model.layers.1.mlp.experts.0.gate_proj.weight": "experts",
    "model.layers.1.mlp.shared_expert.up_proj.weight": "shared_expert",
    "model.layers.1.mlp.shared_expert_gate.weight": "shared_expert",
    "model.layers.1.mlp.gate.weight": "router",
    # DeepSeek-V2/V3
    "model.layers.3.mlp.shared_experts.down_proj.weight": "shared_expert",
    "model.layers.3.mlp.gate.e_score_correction_bias": "router",
    "model.layers.0.mlp.gate_proj.weight": None,  # a dense layer's projection
    # transformers v5 fused experts, gpt-oss, Llama 4
    "model.layers.0.mlp.experts.gate_up_proj": "experts",
    "model.layers.0.mlp.experts.down_proj": "experts",
    "model.layers.0.mlp.experts.gate_up_proj_bias": "experts",
    "model.layers.0.mlp.router.weight": "router",
    "model.layers.0.mlp.router.bias": "router",
    "language_model.model.layers.0.feed_forward.router.weight": "router",
    "language_model.model.layers.0.feed_forward.shared_expert.down_proj.weight":
        "shared_expert",
    # Switch Transformers, Granite-MoE
    "encoder.block.1.layer.1.mlp.experts.expert_0.wi.weight": "experts",
    "model.layers.0.block_sparse_moe.router.layer.weight": "router",
    # not MoE
    "model.layers.0.self_attn.q_proj.weight": None,
    "model.layers.0.mlp.up_proj.weight": None,
    "model.embed_tokens.weight": None,
    "lm_head.weight": None,
}


@pytest.mark.parametrize("name", list(ROLES))
def test_moe_roles(name):
    assert arch.moe_role(name) == ROLES[name]


def test_filter_keywords_are_moe_roles():
    names = list(ROLES)
    for word in arch.MOE_ROLES:
        got = {n for n in names if Conditional(word, 1.0).matches(n)}
        assert got == {n for n in names if ROLES[n] == word}, word
    # the substring meaning stays available as a regular expression
    shared = "model.layers.3.mlp.shared_experts.down_proj.weight"
    assert not Conditional("experts", 1.0).matches(shared)
    assert Conditional("re:experts", 1.0).matches(shared)
    assert Conditional("mlp", 1.0).matches(shared)  # other words: substrings, as before


def test_fused_expert_layouts():
    assert arch.is_fused_experts("m.layers.0.mlp.experts.down_proj", (4, 64, 32))
    assert arch.is_fused_experts("m.layers.0.mlp.experts.down_proj_bias", (4, 64))
    assert not arch.is_fused_experts("m.layers.0.mlp.experts.3.down_proj.weight", (64, 32))
    assert not arch.is_fused_experts("m.layers.0.ffn.experts.mlp.w1", (4 * 32, 64))  # DBRX
    assert not arch.is_fused_experts("m.layers.0.mlp.shared_experts.down_proj", (4, 8, 8))
    gate_up = "m.layers.0.mlp.experts.gate_up_proj"
    assert arch.down_proj_sibling(gate_up) == "m.layers.0.mlp.experts.down_proj"
    assert arch.expert_parts(gate_up, (4, 64, 64), (4, 64, 32)) == 2  # [E, 2I, H] halves
    assert arch.expert_parts(gate_up, (4, 64, 64), (4, 32, 64)) == 1  # gpt-oss [E, H, 2I]
    assert arch.expert_parts("m.layers.0.mlp.experts.down_proj", (4, 64, 32), None) == 1
    assert arch.expert_parts("m.layers.0.mlp.up_proj.weight", (64, 32), None) == 0


def test_real_recipes_use_no_moe_keyword_as_substring():
    """The keywords change no recipe of the corpus: none filters on these words."""
    folder = Path(__file__).parent / "data" / "real_recipes"
    found = []
    for path in folder.rglob("*.yml"):
        text = path.read_text(errors="replace")
        for word in arch.MOE_ROLES:
            if f"filter: {word}" in text or f"filter: '{word}'" in text \
                    or f'filter: "{word}"' in text:
                found.append((path.name, word))
    assert not found


# ------------------------------------------------------------------ tiny models

T = pytest.importorskip("transformers")


def _qwen2_moe():
    return T.Qwen2MoeConfig(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                            shared_expert_intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                            num_experts_per_tok=2, vocab_size=128, max_position_embeddings=64)


def _deepseek_v3():
    return T.DeepseekV3Config(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                              n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                              first_k_dense_replace=1, n_group=1, topk_group=1,
                              vocab_size=128, q_lora_rank=16, kv_lora_rank=16,
                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                              max_position_embeddings=64)


CONFIGS = {"qwen2_moe": _qwen2_moe, "deepseek_v3": _deepseek_v3}


def _family(root: Path, make_config, seeds: dict[str, int], fused: bool) -> dict[str, Path]:
    """A random base and fine-tunes of it (base + noise), saved per expert or fused."""
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(make_config())
    base = {k: v.clone() for k, v in model.state_dict().items()}
    paths = {}
    for name, seed in seeds.items():
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    v.copy_(base[k] + (0.02 * torch.randn(v.shape, generator=g) if seed else 0))
        paths[name] = root / f"{name}-{'fused' if fused else 'experts'}"
        model.save_pretrained(paths[name], save_original_format=not fused)
    return paths


def _merge(root: Path, recipe: dict, name: str) -> Path:
    out = root / name
    mergesmith.run(recipe_file(root, yaml.safe_dump(recipe), f"{name}.yml"), out,
                   overwrite=True)
    return out


def _aoe(parent_a: Path, parent_b: Path, method: str = "linear") -> dict:
    """Assembly of Experts: routed experts from B's side by 0.25, the rest parent A's."""
    if method == "linear":
        return {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": str(parent_a),
             "parameters": {"weight": [{"filter": "experts", "value": 0.75}, {"value": 1.0}]}},
            {"model": str(parent_b),
             "parameters": {"weight": [{"filter": "experts", "value": 0.25}, {"value": 0.0}]}},
        ]}
    return {"merge_method": "slerp", "dtype": "float32", "base_model": str(parent_a),
            "models": [{"model": str(parent_a)}, {"model": str(parent_b)}],
            "parameters": {"t": [{"filter": "experts", "value": 0.25}, {"value": 0.0}]}}


def _generates(folder: Path) -> None:
    model = T.AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[1, 2, 3, 4]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
def test_assembly_of_experts_linear(tmp_path, family, fused):
    paths = _family(tmp_path, CONFIGS[family], {"a": 1, "b": 2}, fused)
    out = load_model(_merge(tmp_path, _aoe(paths["a"], paths["b"]), "aoe"))
    a, b = load_model(paths["a"]), load_model(paths["b"])
    assert set(out) == set(a)
    roles = {arch.moe_role(n) for n in out}
    assert {"experts", "router", "shared_expert", None} <= roles
    for n, x in out.items():
        if arch.moe_role(n) == "experts":
            assert torch.equal(x, (a[n] * 0.75 + b[n] * 0.25) / 1.0), n
        else:  # attention, shared experts, routers, norms, embeddings: parent A's
            assert torch.equal(x, a[n]), n
    _generates(tmp_path / "aoe")


@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
def test_assembly_of_experts_slerp(tmp_path, fused):
    paths = _family(tmp_path, _qwen2_moe, {"a": 1, "b": 2}, fused)
    out = load_model(_merge(tmp_path, _aoe(paths["a"], paths["b"], "slerp"), "aoe"))
    a, b = load_model(paths["a"]), load_model(paths["b"])
    for n, x in out.items():
        if arch.moe_role(n) != "experts":
            assert torch.equal(x, a[n]), n
        elif not fused:
            want = merge_tensors([a[n], b[n]], "slerp", {"t": 0.25}, base_index=0)
            assert torch.equal(x, want), n
        else:  # per expert, gate and up halves apart
            halves = 2 if n.endswith("gate_up_proj") else 1
            for e in range(x.shape[0]):
                for xa, xb, xo in zip(a[n][e].chunk(halves), b[n][e].chunk(halves),
                                      x[e].chunk(halves)):
                    want = merge_tensors([xa, xb], "slerp", {"t": 0.25}, base_index=0)
                    assert torch.equal(xo, want), (n, e)
    _generates(tmp_path / "aoe")


def _as_fused(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A per-expert checkpoint's tensors in transformers' fused layout (gate_up = [gate; up]
    per expert, stacked over experts)."""
    out, groups = {}, {}
    for n, x in tensors.items():
        head, sep, rest = n.partition(".experts.")
        if not sep or arch.moe_role(n) != "experts":
            out[n] = x
            continue
        e, proj = rest.split(".")[:2]
        groups.setdefault(head, {}).setdefault(proj, {})[int(e)] = x
    for head, projs in groups.items():
        n = len(projs["down_proj"])
        out[f"{head}.experts.down_proj"] = torch.stack([projs["down_proj"][e] for e in range(n)])
        out[f"{head}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([projs["gate_proj"][e], projs["up_proj"][e]]) for e in range(n)])
    return out


LAYOUT_RECIPES = {
    "linear": {"merge_method": "linear", "models": [
        {"model": "a", "parameters": {"weight": 0.6}},
        {"model": "b", "parameters": {"weight": 0.4}}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.7}},
        {"model": "b", "parameters": {"weight": 0.5}}]},
    "slerp": {"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.4},
              "models": [{"model": "a"}, {"model": "b"}]},
    "ties": {"merge_method": "ties", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.7, "density": 0.5}},
        {"model": "b", "parameters": {"weight": 0.5, "density": 0.3}}]},
    "tsv_m": {"merge_method": "tsv_m", "base_model": "base", "models": [
        {"model": "base"}, {"model": "a"}, {"model": "b"}]},
}


@pytest.mark.parametrize("method", list(LAYOUT_RECIPES))
def test_fused_layout_merges_like_per_expert_layout(tmp_path, method):
    """Whole-tensor methods (SLERP's norms, TIES' magnitude thresholds) merge each expert
    of a fused tensor on its own: the same result as the per-expert checkpoint."""
    results = {}
    for fused in (False, True):
        paths = _family(tmp_path, _qwen2_moe, {"base": 0, "a": 1, "b": 2}, fused)
        recipe = yaml.safe_load(yaml.safe_dump(LAYOUT_RECIPES[method]))
        recipe["dtype"] = "float32"
        for key in ("base_model",):
            if key in recipe:
                recipe[key] = str(paths[recipe[key]])
        for m in recipe["models"]:
            m["model"] = str(paths[m["model"]])
        results[fused] = load_model(_merge(tmp_path, recipe, f"out-{fused}"))
    per_expert, fused = _as_fused(results[False]), results[True]
    assert set(per_expert) == set(fused)
    for n in fused:
        torch.testing.assert_close(fused[n], per_expert[n], rtol=1e-6, atol=1e-7, msg=n)


def test_fused_experts_chunked_by_expert(tmp_path):
    """A whole-tensor method on a fused tensor runs in chunks of whole experts."""
    paths = _family(tmp_path, _qwen2_moe, {"a": 1, "b": 2}, True)
    recipe = {"merge_method": "slerp", "base_model": str(paths["a"]), "parameters": {"t": 0.5},
              "models": [{"model": str(paths["a"])}, {"model": str(paths["b"])}]}
    plan = mergesmith.plan(recipe_file(tmp_path, yaml.safe_dump(recipe)))
    name = "model.layers.0.mlp.experts.gate_up_proj"
    t = next(t for t in plan.tensors if t.name == name)
    assert not t.elementwise and t.expert_parts == 2
    rows = [i.rows for i in work_items(plan, chunk_elements=64 * 64) if i.tensor is t]
    assert rows == [(0, 1), (1, 2), (2, 3), (3, 4)]
    shared = next(t for t in plan.tensors if "shared_expert.up_proj" in t.name)
    assert shared.expert_parts == 0


def test_gpt_oss_fused_experts_merge_per_expert(tmp_path):
    """gpt-oss stores experts fused (gate and up interleaved, biases ``[E, n]``): a
    whole-tensor method runs once per expert matrix and bias; the output loads and runs."""
    config = T.GptOssConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
                            max_position_embeddings=64)
    paths = _family(tmp_path, lambda: config, {"a": 1, "b": 2}, True)
    out = load_model(_merge(tmp_path, _aoe(paths["a"], paths["b"], "slerp"), "aoe"))
    a, b = load_model(paths["a"]), load_model(paths["b"])
    fused = [n for n in out if arch.is_fused_experts(n, tuple(out[n].shape))]
    assert len(fused) == 8  # gate_up, down and their biases, in two layers
    for n, x in out.items():
        if n not in fused:
            assert torch.equal(x, a[n]), n
            continue
        for e in range(x.shape[0]):
            want = merge_tensors([a[n][e], b[n][e]], "slerp", {"t": 0.25}, base_index=0)
            assert torch.equal(x[e], want), (n, e)
    _generates(tmp_path / "aoe")


def test_dense_work_of_fused_experts_counts_each_expert(tmp_path):
    """``check``'s estimate of a spectral method counts one SVD per expert piece: the
    same work as for the per-expert checkpoint."""
    works = []
    for fused in (False, True):
        paths = _family(tmp_path, _qwen2_moe, {"base": 0, "a": 1, "b": 2}, fused)
        recipe = {"merge_method": "tsv_m", "base_model": str(paths["base"]),
                  "models": [{"model": str(paths[k])} for k in ("base", "a", "b")]}
        plan = mergesmith.plan(recipe_file(tmp_path, yaml.safe_dump(recipe)))
        works.append(mergesmith.api.dense_work(plan))
    assert works[0].factorizations > 0
    assert works[0].factorizations == works[1].factorizations

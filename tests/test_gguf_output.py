"""GGUF output of merges (``OUT`` ending in ``.gguf``): the file re-read equals the
quantization of the float32 merge, block by block; transformers loads it; chunking and
threads do not change a byte; bad combinations are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from conftest import recipe_file  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_gguf_export import tiny_model  # noqa: E402

import mergesmith  # noqa: E402
from mergesmith import MergeError  # noqa: E402
from mergesmith.checkpoint.gguf_export import gguf_tensor_plan  # noqa: E402


def two_models(tmp_path, kind="llama"):
    """Two random models of one family (same tokenizer), in float32."""
    a, config = tiny_model(kind, tmp_path / "a")
    b, _ = tiny_model(kind, tmp_path / "b")
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b.save_pretrained(tmp_path / "b")
    return a, b, config


def linear_recipe(tmp_path, out_dtype: str, weights=(0.3, 0.7)) -> str:
    return recipe_file(tmp_path, f"""merge_method: linear
models:
  - model: {tmp_path / 'a'}
    parameters: {{weight: {weights[0]}}}
  - model: {tmp_path / 'b'}
    parameters: {{weight: {weights[1]}}}
dtype: float32
out_dtype: {out_dtype}
""")


def formula(a, b, weights=(0.3, 0.7)) -> dict[str, torch.Tensor]:
    sa, sb = a.state_dict(), b.state_dict()
    total = weights[0] + weights[1]
    return {k: (weights[0] * sa[k].float() + weights[1] * sb[k].float()) / total for k in sa}


@pytest.mark.parametrize("kind,out_type", [("llama", "q8_0"), ("llama", "q4_1"),
                                           ("llama", "f16"), ("gemma2", "q5_0")])
def test_gguf_output_is_the_quantized_formula(tmp_path, kind, out_type):
    a, b, config = two_models(tmp_path, kind)
    out = tmp_path / "out.gguf"
    mergesmith.run(linear_recipe(tmp_path, out_type), out)
    assert out.is_file() and not (tmp_path / "out.gguf.partial").exists()

    want = formula(a, b)
    plan = gguf_tensor_plan({k: v.shape for k, v in want.items()}, config, out_type)
    reader = gguf.GGUFReader(str(out))
    stored = {t.name: t for t in reader.tensors}
    assert set(stored) == {t.name for t in plan.tensors}
    for t in plan.tensors:  # exactly llama.cpp's bytes for the float32 merge
        rows = t.apply(want[t.hf_name]).numpy()
        expected = gguf.quants.quantize(rows, t.encoding.qtype)
        got = stored[t.name]
        assert got.tensor_type.name == t.encoding.type_name, t.name
        assert np.array_equal(np.asarray(got.data).reshape(-1).view(np.uint8),
                              np.ascontiguousarray(expected).reshape(-1).view(np.uint8)), t.name

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "a"), gguf_file=str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = loaded(torch.tensor([[1, 5, 9, 20, 33]])).logits
    assert torch.isfinite(logits).all()
    if out_type == "f16":
        assert torch.equal(loaded.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           want["model.layers.0.self_attn.q_proj.weight"].half().float())


def test_chunks_and_threads_do_not_change_a_byte(tmp_path):
    two_models(tmp_path)
    recipe = linear_recipe(tmp_path, "q8_0")
    mergesmith.run(recipe, tmp_path / "whole.gguf", threads=1)
    from mergesmith import execute

    plan = mergesmith.plan(recipe, out_format="gguf")
    chunks = [i for i in execute.work_items(plan, 512) if i.rows is not None]
    assert any(i.tensor.encoding.row_align > 1 for i in chunks)  # Q/K rows: whole heads
    assert all(i.rows[0] % i.tensor.encoding.row_align == 0 for i in chunks)
    for threads in (1, 3):
        out = tmp_path / f"chunked{threads}.gguf"
        old = execute.CHUNK_ELEMENTS
        execute.CHUNK_ELEMENTS = 512  # rows of a few heads at a time
        try:
            mergesmith.run(recipe, out, threads=threads)
        finally:
            execute.CHUNK_ELEMENTS = old
        assert out.read_bytes() == (tmp_path / "whole.gguf").read_bytes()


def test_gguf_and_safetensors_outputs_hold_the_same_merge(tmp_path):
    """An f32 GGUF output read back by transformers equals the safetensors output."""
    two_models(tmp_path)
    recipe = linear_recipe(tmp_path, "float32")
    mergesmith.run(recipe, tmp_path / "folder")
    mergesmith.run(recipe, tmp_path / "out.gguf")
    st = load_file(str(tmp_path / "folder" / "model.safetensors"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "folder"), gguf_file=str(tmp_path / "out.gguf"), dtype=torch.float32)
    got = loaded.state_dict()
    for name, value in st.items():
        assert torch.equal(got[name], value), name


def test_check_shows_the_gguf_output(tmp_path):
    two_models(tmp_path)
    report = mergesmith.check(linear_recipe(tmp_path, "q4_0"), out_format="gguf")
    assert any("one GGUF file (llama, q4_0)" in n for n in report.plan.notes)
    assert report.plan.shards[0].filename == "model.gguf"


@pytest.mark.parametrize("out_dtype,out_name,message", [
    ("q8_0", "folder", "q8_0 is a GGUF type"),
    ("float8_e4m3fn", "x.gguf", "GGUF output is written as"),
])
def test_bad_gguf_combinations(tmp_path, out_dtype, out_name, message):
    two_models(tmp_path)
    with pytest.raises(MergeError, match=message):
        mergesmith.run(linear_recipe(tmp_path, out_dtype), tmp_path / out_name)
    assert not list(tmp_path.glob(f"{out_name}*"))


def test_gguf_output_into_an_existing_folder_is_refused(tmp_path):
    two_models(tmp_path)
    (tmp_path / "old.gguf").mkdir()
    with pytest.raises(MergeError, match="is a folder; a GGUF output is one file"):
        mergesmith.run(linear_recipe(tmp_path, "q8_0"), tmp_path / "old.gguf")
    assert not list((tmp_path / "old.gguf").iterdir())


def test_existing_gguf_file_needs_overwrite(tmp_path):
    two_models(tmp_path)
    recipe = linear_recipe(tmp_path, "f16")
    (tmp_path / "x.gguf").write_bytes(b"old")
    with pytest.raises(MergeError, match="already exists"):
        mergesmith.run(recipe, tmp_path / "x.gguf")
    mergesmith.run(recipe, tmp_path / "x.gguf", overwrite=True)
    assert gguf.GGUFReader(str(tmp_path / "x.gguf")).tensors


def test_interrupted_gguf_output_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    from conftest import failing_pwrite

    from mergesmith import MergeIOError

    two_models(tmp_path)
    recipe = linear_recipe(tmp_path, "q4_0")
    mergesmith.run(recipe, tmp_path / "reference.gguf", threads=1)
    with monkeypatch.context() as mp:
        mp.setattr("mergesmith.writer.os.pwrite", failing_pwrite(6))
        with pytest.raises(MergeIOError):
            mergesmith.run(recipe, tmp_path / "out.gguf", threads=1)
    assert (tmp_path / "out.gguf.partial" / "mergesmith_progress.log").exists()
    assert not (tmp_path / "out.gguf").exists()
    mergesmith.run(recipe, tmp_path / "out.gguf", threads=1, resume=True)
    assert (tmp_path / "out.gguf").read_bytes() == (tmp_path / "reference.gguf").read_bytes()
    assert not (tmp_path / "out.gguf.partial").exists()

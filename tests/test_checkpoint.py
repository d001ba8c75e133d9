"""Reading checkpoints: strict safetensors headers, the planned writer, Hub cache resolution."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import LLAMA, random_tensors, recipe_file, write_model
from safetensors.torch import load_file, save_file

import mergesmith
from mergesmith import MergeError
from mergesmith.checkpoint import TensorReader, index_folder
from mergesmith.checkpoint.safetensors_format import build_header, read_header
from mergesmith.recipe import parse_model_reference


def raw_file(path, header: dict, data: bytes = b"") -> str:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return str(path)


def test_header_matches_safetensors_library(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.randn(2, dtype=torch.float64).to(torch.bfloat16)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    entries, _ = read_header(str(tmp_path / "x.safetensors"))
    reader = TensorReader()
    index = index_folder(str(tmp_path))
    for e in entries:
        assert torch.equal(reader.read(index.tensors[e.name]), tensors[e.name])
    assert torch.equal(reader.read(index.tensors["a"], (1, 3)), tensors["a"][1:3])
    reader.close()


@pytest.mark.parametrize("make,fragment", [
    (lambda p: p.write_bytes(b"abc"), "truncated or empty"),
    (lambda p: p.write_bytes(struct.pack("<Q", 10**12) + b"{}"), "corrupt safetensors header"),
    (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"nope"), "not valid JSON"),
    (lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                        b"\0" * 8), "runs past the end"),
    (lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}},
                        b"\0" * 16), "needs 16 bytes"),
    (lambda p: raw_file(p, {"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}},
                        b"\0" * 4), "cannot read"),
    (lambda p: raw_file(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                            "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                        b"\0" * 12), "overlap"),
])
def test_malformed_safetensors_are_explained(tmp_path, make, fragment):
    path = tmp_path / "model.safetensors"
    make(path)
    with pytest.raises(MergeError) as info:
        read_header(str(path))
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_index_naming_a_missing_shard(tmp_path):
    folder = write_model(tmp_path / "m", random_tensors(LLAMA, 0), shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MergeError, match="names the shard 'model-00002-of-00002.safetensors'"):
        index_folder(str(folder))


class _Payload:
    """What a hostile checkpoint carries: a callable run at unpickling time."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_refused(tmp_path, capsys):
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"w": torch.zeros(2), "x": _Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(MergeError, match="never runs pickled code"):
        index_folder(str(folder))
    assert "must never run" not in capsys.readouterr().out


def test_build_header_is_loadable_by_safetensors(tmp_path):
    tensors = [("x", torch.float32, (2, 3)), ("y", torch.bfloat16, (5,)), ("z", torch.int8, ())]
    header, offsets = build_header(tensors, {"format": "pt"})
    assert len(header) % 8 == 0
    data = bytearray(sum(torch.Size(s).numel() * d.itemsize for _, d, s in tensors))
    (tmp_path / "f.safetensors").write_bytes(header + bytes(data))
    loaded = load_file(str(tmp_path / "f.safetensors"))
    assert {k: (v.dtype, tuple(v.shape)) for k, v in loaded.items()} == {
        n: (d, s) for n, d, s in tensors}
    assert offsets == [0, 24, 34]


def test_hub_id_resolves_from_the_offline_cache(tmp_path, monkeypatch):
    """A Hub id found complete in the huggingface_hub cache works with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / ("a" * 40)
    base = random_tensors(LLAMA, 0)
    write_model(snap, base)
    (cache / "models--acme--tiny" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    recipe = recipe_file(tmp_path, """merge_method: passthrough
models:
  - model: acme/tiny
""")
    mergesmith.run(recipe, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(out[k], base[k]) for k in base)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- acme/tiny" in card  # Hub inputs are listed as base_model in the card
    missing = recipe_file(tmp_path, "merge_method: passthrough\nmodels:\n  - model: acme/other\n")
    with pytest.raises(MergeError, match="HF_HUB_OFFLINE"):
        mergesmith.plan(missing)


def test_local_looking_path_is_not_sent_to_the_hub(tmp_path):
    from mergesmith.checkpoint import resolve

    with pytest.raises(MergeError, match="model folder not found"):
        resolve(parse_model_reference("./does/not/exist"), "models[0].model")


def test_missing_lora_adapter_folder_is_named(tmp_path):
    from mergesmith.checkpoint import resolve

    write_model(tmp_path / "base", random_tensors(LLAMA, 0))
    with pytest.raises(MergeError, match="adapter folder not found"):
        resolve(parse_model_reference(f"{tmp_path / 'base'}+./no/adapter"), "models[0].model")


@pytest.mark.parametrize("fp8", [False, True])
def test_uncached_hub_model_is_planned_from_metadata_and_downloaded_after(tmp_path, monkeypatch,
                                                                          fp8):
    """Online path, with huggingface_hub's network calls replaced by a local 'remote'; an FP8
    checkpoint is planned as the tensors it dequantizes to from its metadata alone."""
    import shutil
    from types import SimpleNamespace

    import huggingface_hub
    from test_quantized import write_fp8_model

    if fp8:
        remote, expected = write_fp8_model(tmp_path / "remote", random_tensors(LLAMA, 0))
    else:
        remote = write_model(tmp_path / "remote", random_tensors(LLAMA, 0), shards=2)
        expected = random_tensors(LLAMA, 0)
    st_dtypes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3"}
    cache = tmp_path / "cache"
    calls = []

    def snapshot_download(repo, revision=None, ignore_patterns=None, local_files_only=False):
        calls.append(("snapshot", local_files_only))
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        shutil.copytree(remote, cache, dirs_exist_ok=True)
        return str(cache)

    def hf_hub_download(repo, filename, revision=None):
        calls.append(("file", filename))
        cache.mkdir(exist_ok=True)
        shutil.copy(remote / filename, cache / filename)
        return str(cache / filename)

    def get_safetensors_metadata(repo, revision=None):
        calls.append(("metadata",))
        files = {}
        for f in remote.glob("*.safetensors"):
            entries, _ = read_header(str(f))
            start = min(e.offset for e in entries)
            files[f.name] = SimpleNamespace(tensors={
                e.name: SimpleNamespace(dtype=st_dtypes[e.dtype], shape=list(e.shape),
                                        data_offsets=[e.offset - start,
                                                      e.offset - start + e.nbytes])
                for e in entries})
        return SimpleNamespace(files_metadata=files)

    class Api:
        def model_info(self, repo, revision=None):
            return SimpleNamespace(siblings=[SimpleNamespace(rfilename=p.name)
                                             for p in remote.iterdir()])

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", get_safetensors_metadata)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    recipe = recipe_file(tmp_path, "merge_method: passthrough\nmodels:\n  - model: acme/remote\n")

    report = mergesmith.check(recipe)
    assert report.plan.models[0].pending_download
    assert ("snapshot", False) not in calls  # checking never downloads weights
    assert not list(cache.glob("*.safetensors"))
    assert {t.name for t in report.plan.tensors} == set(expected)
    planned = report.plan.models[0].index.tensors.values()
    assert any(info.format == "fp8-block" for info in planned) == fp8

    mergesmith.run(recipe, tmp_path / "out")
    assert ("snapshot", False) in calls
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(expected)
    assert all(torch.equal(out[k], expected[k].to(out[k].dtype)) for k in expected)


@pytest.mark.parametrize("version", [(3, 10), (3, 11)])  # the block loop, hashlib.file_digest
def test_file_sha256_matches_hashlib(tmp_path, monkeypatch, version):
    import hashlib
    import sys

    from mergesmith.hashing import file_sha256

    if version >= (3, 11) and not hasattr(hashlib, "file_digest"):
        pytest.skip("hashlib.file_digest needs Python 3.11")
    monkeypatch.setattr(sys, "version_info", version)
    for size in (0, 3, (1 << 20) + 7):
        data = torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes()
        (tmp_path / "f").write_bytes(data)
        assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    with pytest.raises(OSError):
        file_sha256(tmp_path / "missing")

"""Safetensors reads through private memory maps: the same values as copying reads, the
file never written, the map gone with the tensor, truncation a clear error."""

from __future__ import annotations

import gc
import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergesmith.checkpoint.reader as reader_module
from mergesmith.checkpoint import TensorReader, index_folder
from mergesmith.errors import MergeIOError

pytestmark = pytest.mark.skipif(not reader_module._CAN_MAP, reason="no POSIX mmap")

MAPS = Path("/proc/self/maps")


def _model(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "big.bf16": torch.randn(300, 257, generator=g).to(torch.bfloat16),
        "big.f32": torch.randn(129, 200, generator=g),
        "big.i64": torch.randint(-9, 9, (70, 190), generator=g),
        "small.f16": torch.randn(5, 3, generator=g).to(torch.float16),
        "odd.i8": torch.randint(-100, 100, (77, 1001), generator=g, dtype=torch.int8),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path / "model.safetensors"


def _mapped_paths() -> str:
    return MAPS.read_text() if MAPS.exists() else ""


@pytest.mark.parametrize("rows", [None, (0, 1), (3, 50), (60, 70)])
def test_mapped_and_copied_reads_agree_with_the_file(tmp_path, monkeypatch, rows):
    path = _model(tmp_path)
    expected = load_file(str(path))
    index = index_folder(str(tmp_path))
    spans = {n: None if rows is None else (min(rows[0], len(t) - 1), min(rows[1], len(t)))
             for n, t in expected.items()}  # rows inside each tensor
    reads = {}
    for mode, least in (("mapped", 0), ("copied", 1 << 62)):
        monkeypatch.setattr(reader_module, "MAP_AT_LEAST", least)
        with TensorReader() as reader:
            reads[mode] = {n: reader.read(index.tensors[n], spans[n]) for n in expected}
    for name, want in expected.items():
        span = spans[name]
        want = want if span is None else want[span[0]:span[1]]
        for mode in reads:
            got = reads[mode][name]
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8)), \
                (mode, name)


def test_large_reads_are_mapped_and_the_map_goes_with_the_tensor(tmp_path):
    if not MAPS.exists():
        pytest.skip("no /proc/self/maps")
    path = _model(tmp_path)
    index = index_folder(str(tmp_path))
    with TensorReader() as reader:
        before = _mapped_paths().count(str(path))
        big = reader.read(index.tensors["big.bf16"])
        assert big.nbytes >= reader_module.MAP_AT_LEAST
        assert _mapped_paths().count(str(path)) == before + 1
        small = reader.read(index.tensors["small.f16"])  # copied: too small to map
        assert _mapped_paths().count(str(path)) == before + 1
        del big, small
        gc.collect()
        assert _mapped_paths().count(str(path)) == before


def test_writing_into_a_mapped_tensor_leaves_the_file_and_later_reads_alone(tmp_path):
    path = _model(tmp_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    index = index_folder(str(tmp_path))
    with TensorReader() as reader:
        first = reader.read(index.tensors["big.f32"])
        original = first.clone()
        first.add_(1.0)  # methods may work in place on their inputs
        again = reader.read(index.tensors["big.f32"])
        assert torch.equal(again, original) and torch.equal(first, original + 1.0)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_a_file_truncated_before_a_read_is_a_clear_error(tmp_path):
    path = _model(tmp_path)
    index = index_folder(str(tmp_path))
    info = index.tensors["big.bf16"]
    with TensorReader() as reader:
        reader.read(info)  # opens the file
        os.truncate(path, info.offset + 10)
        with pytest.raises(MergeIOError, match="ended early"):
            reader.read(info)

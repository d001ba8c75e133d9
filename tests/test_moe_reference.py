"""The mergekit-moe reference data is self-consistent and its inputs rebuild bit-exactly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import moe_inputs  # noqa: E402

DATA = Path(__file__).parent / "data" / "moe"
CASES = sorted(p.name for p in DATA.iterdir() if (p / "config.yml").exists())


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def test_inputs_rebuild_bit_identical(tmp_path):
    moe_inputs.write_all(tmp_path / "inputs")
    want = dict(line.split("  ", 1)[::-1] for line in
                (DATA / "inputs.sha256").read_text().splitlines())
    got = moe_inputs.file_digests(tmp_path / "inputs")
    assert got == {k.strip(): v for k, v in want.items()}


@pytest.mark.parametrize("case", CASES)
def test_case_files_consistent(case):
    folder = DATA / case
    if (folder / "error.txt").exists():
        assert not (folder / "tensors.json").exists()
        return
    manifest = json.loads((folder / "tensors.json").read_text())["tensors"]
    stored = load_file(str(folder / "expected.safetensors"))
    assert stored, case
    for name, tensor in stored.items():
        entry = manifest[name]
        assert list(tensor.shape) == entry["shape"]
        assert _sha(tensor) == entry["sha256"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"][0].endswith("ForCausalLM")

"""Tiny models built in the tests (no downloads) and helpers to run merges on them."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergesmith.demo import llama_shapes

# ../shared/conformance beside the checkout; MERGESMITH_CONFORMANCE names another copy (a GPU
# machine gets the checkout alone)
CONFORMANCE = Path(os.environ.get("MERGESMITH_CONFORMANCE") or
                   Path(__file__).resolve().parents[2] / "shared" / "conformance")

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 64,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def random_tensors(config: dict, seed: int, base: dict | None = None,
                   scale: float = 0.01) -> dict[str, torch.Tensor]:
    """Base weights (seed) or a fine-tune of ``base`` (base + seeded noise)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in llama_shapes(config).items():
        noise = torch.randn(shape, generator=g)
        if base is not None:
            out[name] = base[name] + scale * noise
        elif len(shape) == 1:
            out[name] = 1.0 + 0.05 * noise
        else:
            out[name] = 0.05 * noise
    return out


def write_model(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None,
                *, dtype: torch.dtype = torch.float32, shards: int = 1, fmt: str = "safetensors",
                index: bool = True) -> Path:
    """Save a model folder: safetensors (optionally sharded, with/without index) or .bin."""
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(config or LLAMA)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
               for k, v in tensors.items()}
    names = list(tensors)
    groups = [names[i::shards] for i in range(shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    prefix = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, group in enumerate(groups):
        fname = (f"{prefix}.{ext}" if shards == 1
                 else f"{prefix}-{i + 1:05d}-of-{shards:05d}.{ext}")
        part = {k: tensors[k] for k in group}
        if fmt == "safetensors":
            save_file(part, str(folder / fname), metadata={"format": "pt"})
        else:
            torch.save(part, folder / fname)
        weight_map.update({k: fname for k in group})
    if shards > 1 and index:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / f"{prefix}.{ext}.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


def load_model(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an output folder (single or sharded safetensors)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """A float32 base and three fine-tunes (ft_b sharded with an index)."""
    base = random_tensors(LLAMA, 0)
    paths = {"base": write_model(tmp_path / "base", base)}
    paths["ft_a"] = write_model(tmp_path / "ft_a", random_tensors(LLAMA, 1, base))
    paths["ft_b"] = write_model(tmp_path / "ft_b", random_tensors(LLAMA, 2, base), shards=3)
    paths["ft_c"] = write_model(tmp_path / "ft_c", random_tensors(LLAMA, 3, base, scale=0.02))
    return paths


def recipe_file(tmp_path: Path, text: str, name: str = "recipe.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_cli(*args: str, cwd: str | os.PathLike | None = None):
    """Run the real console entry point in a subprocess; returns CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "mergesmith", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def items_in_flight(monkeypatch):
    """Counts work items computing at once; ``peak[0]`` is the most seen together."""
    import threading

    import mergesmith.execute as ex

    lock, running, peak = threading.Lock(), [0], [0]
    original = ex._Job.__call__

    def counting(self, item):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            return original(self, item)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(ex._Job, "__call__", counting)
    return peak


def failing_pwrite(after: int):
    """A stand-in for ``os.pwrite`` that reports a full disk after ``after`` writes."""
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    return pwrite


@pytest.fixture(scope="session")
def compare():
    """``main(argv)`` of the conformance set's compare.py (mergekit outputs vs ours)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("conformance_compare",
                                                  CONFORMANCE / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main

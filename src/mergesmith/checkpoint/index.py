"""Tensor index of a model folder: name → (file, dtype, shape, byte offset), from headers only."""

from __future__ import annotations

import glob
import json
import os
import pickle
from dataclasses import dataclass, field
from math import prod
from typing import Any

from .._torch import torch
from ..errors import MergeError
from .safetensors_format import read_header

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5",
                   ".msgpack", ".onnx", ".pkl")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. ``offset`` is the absolute byte offset (safetensors only)."""

    name: str
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int | None
    nbytes: int
    quant: Any = None
    """For a quantized weight: how it is stored (e.g. ``quantized.BlockFP8``: its
    ``format``, ``stored_offset`` and ``decode_seconds``); ``dtype`` is then the dtype it
    dequantizes to, ``nbytes`` what is stored."""

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def format(self) -> str:
        """Which :class:`~mergesmith.checkpoint.reader.TensorSource` reads it."""
        if self.quant is not None:
            return self.quant.format
        return "bin" if self.offset is None else "safetensors"


@dataclass
class CheckpointIndex:
    """All tensors of one model folder, in file order, plus its ``config.json``."""

    folder: str
    tensors: dict[str, TensorInfo]
    files: list[str]
    config: dict[str, Any] | None
    format: str  # "safetensors" or "bin"
    _file_rank: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._file_rank = {f: i for i, f in enumerate(self.files)}

    def order_key(self, name: str) -> tuple[int, int]:
        """Sort key that reads this model's files in order, each front to back."""
        info = self.tensors[name]
        if info.quant is not None:  # where its stored parts begin
            return self._file_rank[info.file], info.quant.stored_offset
        return self._file_rank[info.file], info.offset or 0

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_config(folder: str) -> dict[str, Any] | None:
    """``config.json`` of a folder, or None when absent."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergeError(f"{path}: cannot read config.json ({e})") from None
    if not isinstance(config, dict):
        raise MergeError(f"{path}: config.json is not a JSON object")
    return config


def index_folder(folder: str) -> CheckpointIndex:
    """Index the weights of a Hugging Face model folder (safetensors preferred, then .bin)."""
    if not os.path.isdir(folder):
        raise MergeError(f"model folder not found: {folder}")
    config = read_config(folder)
    st_files = _safetensors_files(folder)
    if st_files:
        from .quantized import fold_quantized

        tensors = fold_quantized(_index_safetensors(st_files), config, folder)
        return CheckpointIndex(folder, tensors, st_files, config, "safetensors")
    bin_files = _bin_files(folder)
    if bin_files:
        tensors = _index_bin(bin_files)
        return CheckpointIndex(folder, tensors, bin_files, config, "bin")
    raise MergeError(_no_weights_message(folder))


def _no_weights_message(folder: str) -> str:
    names = sorted(os.listdir(folder))
    if os.path.exists(os.path.join(folder, "adapter_config.json")):
        return (f"{folder} holds a LoRA adapter, not a full model; refer to it as "
                "'base_model+adapter' (LoRA inputs are not supported yet)")
    ggufs = [n for n in names if n.endswith(".gguf")]
    other = [n for n in names if n.endswith(WEIGHT_SUFFIXES) and n not in ggufs]
    if ggufs:
        found = f"; it has {', '.join(ggufs)}: name the .gguf file as the model"
    elif other:
        found = f"; it has {', '.join(other)}, which mergesmith cannot read"
    elif names:
        found = f"; it contains: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
    else:
        found = "; it is empty"
    return (f"no model weights in {folder}: expected *.safetensors (with or without "
            f"model.safetensors.index.json), pytorch_model*.bin or one .gguf model{found}")


def _from_index_json(folder: str, index_name: str) -> list[str] | None:
    path = os.path.join(folder, index_name)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise MergeError(f"{path}: not a valid weight index ({e!r}); it needs a "
                         "'weight_map' of tensor name → file") from None
    for name in files:
        if (not isinstance(name, str) or os.path.isabs(name) or os.path.basename(name) != name
                or name in (".", "..")):
            raise MergeError(f"{path} names the shard {name!r}, which is not a file name in "
                             f"{folder}; refusing to read outside the model folder")
        if not os.path.exists(os.path.join(folder, name)):
            raise MergeError(f"{path} names the shard {name!r}, which is missing from "
                             f"{folder}; download the model again")
    return [os.path.join(folder, f) for f in files]


def _safetensors_files(folder: str) -> list[str]:
    indexed = _from_index_json(folder, "model.safetensors.index.json")
    if indexed is not None:
        return indexed
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return [single]
    return sorted(f for f in glob.glob(os.path.join(folder, "*.safetensors"))
                  if not os.path.basename(f).startswith("adapter_model"))


def _bin_files(folder: str) -> list[str]:
    indexed = _from_index_json(folder, "pytorch_model.bin.index.json")
    if indexed is not None:
        return indexed
    single = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(single):
        return [single]
    return sorted(glob.glob(os.path.join(folder, "pytorch_model-*.bin")))


def _index_safetensors(files: list[str]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        entries, _ = read_header(path)
        for e in entries:
            _add(tensors, TensorInfo(e.name, path, e.dtype, e.shape, e.offset, e.nbytes))
    return tensors


def _add(tensors: dict[str, TensorInfo], info: TensorInfo) -> None:
    if info.name in tensors:
        raise MergeError(f"tensor '{info.name}' appears in both {tensors[info.name].file} and "
                         f"{info.file}; the checkpoint is inconsistent")
    tensors[info.name] = info


def load_bin(path: str) -> dict[str, torch.Tensor]:
    """Load a ``pytorch_model*.bin`` safely (``weights_only``), memory-mapped where possible."""
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # old non-zip format cannot be memory-mapped
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise MergeError(f"refusing to load {path}: it contains objects other than tensors "
                         f"and mergesmith never runs pickled code ({str(e).splitlines()[0]}). "
                         "Convert it to safetensors with its authors' tools.") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise MergeError(f"cannot read {path}: {str(e).splitlines()[0]} (the file may be "
                         "truncated; download it again)") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise MergeError(f"{path} does not hold a state dict (got {type(data).__name__})")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _index_bin(files: list[str]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for name, t in load_bin(path).items():
            _add(tensors, TensorInfo(name, path, t.dtype, tuple(t.shape), None,
                                     t.numel() * t.element_size()))
    return tensors

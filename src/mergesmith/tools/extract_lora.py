"""Extract a LoRA adapter from a fine-tune: per-matrix SVD of ``FT − BASE``.

Each 2-D weight's task vector ``Δ`` is factored as ``Δ ≈ B·A`` with ``B = U_k·√S_k`` and
``A = √S_k·V_kᵀ`` (so the adapter's scale ``α/r`` is 1: ``lora_alpha`` = rank per module).
The rank is fixed (``--rank``) or the smallest that keeps a fraction of ``‖Δ‖²_F``
(``--energy``). Token embeddings get embedding LoRAs (``ΔWᵀ = B·A``), or are saved whole
(``modules_to_save``), or skipped. Other changed tensors (norms, biases) cannot be
low-rank and are saved whole. The output is a PEFT folder (``adapter_config.json`` with
``rank_pattern``/``alpha_pattern`` when ranks differ, ``adapter_model.safetensors``) and a
report of every matrix's relative error ``‖Δ − B·A‖_F / ‖Δ‖_F``.

Tensors are read one at a time in file order; only the (small) factors are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..arch import input_embedding_name
from ..checkpoint import TensorReader, index_folder
from ..errors import MergeError
from ..methods.seeding import tensor_generator
from ..methods.linalg import randomized_svd

_PREFIX = "base_model.model."


@dataclass
class MatrixReport:
    name: str
    shape: tuple[int, ...]
    rank: int
    relative_error: float
    kind: str  # "lora", "embedding", "full", "skipped"


@dataclass
class ExtractResult:
    folder: str
    reports: list[MatrixReport] = field(default_factory=list)

    def summary(self) -> str:
        lora = [r for r in self.reports if r.kind in ("lora", "embedding")]
        full = [r for r in self.reports if r.kind == "full"]
        lines = [f"wrote {self.folder}: {len(lora)} low-rank matrices, {len(full)} full tensors"]
        if lora:
            worst = max(lora, key=lambda r: r.relative_error)
            ranks = Counter(r.rank for r in lora)
            lines.append(f"ranks: {', '.join(f'{k}×{n}' for k, n in sorted(ranks.items()))}; "
                         f"largest relative error {worst.relative_error:.3g} ({worst.name})")
        return "\n".join(lines)


def choose_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """``rank`` (at most the number of singular values), or the smallest ``k`` with
    ``Σ_{i<k} sᵢ² ≥ energy·Σ sᵢ²`` (at least 1)."""
    if rank is not None:
        return max(1, min(rank, s.numel()))
    power = s.double() ** 2
    total = float(power.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(power, 0) / total
    return int(min(s.numel(), int(torch.searchsorted(kept, energy - 1e-12)) + 1))


def factor(delta: torch.Tensor, rank: int | None, energy: float | None,
           randomized: bool = False, name: str = "") -> tuple[torch.Tensor, torch.Tensor, float]:
    """``B, A`` with ``B·A`` the best rank-k approximation of ``delta`` (float32), and the
    relative Frobenius error of that approximation. The randomized SVD is seeded by
    ``name``: extracting twice gives identical files."""
    d = delta.double()
    norm = float(torch.linalg.matrix_norm(d))
    if randomized and rank is not None and rank < min(d.shape) // 2:
        u, s, vh = randomized_svd(d, rank, tensor_generator(0, f"svd\0{name}"))
    else:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        k = choose_rank(s, rank, energy)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    root = s.sqrt()
    b, a = u * root, root[:, None] * vh
    error = float(torch.linalg.matrix_norm(d - b @ a)) / norm if norm > 0 else 0.0
    return b.float().contiguous(), a.float().contiguous(), error


def extract_lora(model: str, base: str, out: str, *, rank: int | None = None,
                 energy: float | None = None, include: str | None = None,
                 exclude: str | None = None, embeddings: str = "lora",
                 randomized: bool = False, device: str = "cpu", overwrite: bool = False,
                 progress: Callable[[str], None] | None = None) -> ExtractResult:
    """Write a PEFT LoRA adapter to ``out`` such that ``base + adapter ≈ model``."""
    if (rank is None) == (energy is None):
        raise MergeError("give exactly one of --rank or --energy")
    if rank is not None and rank < 1:
        raise MergeError(f"--rank must be at least 1 (got {rank})")
    if energy is not None and not 0 < energy <= 1:
        raise MergeError(f"--energy must be in (0, 1] (got {energy})")
    if embeddings not in ("lora", "full", "skip"):
        raise MergeError(f"--embeddings must be lora, full or skip (got {embeddings})")
    patterns = {}
    for flag, pattern in (("--include", include), ("--exclude", exclude)):
        if pattern:
            try:
                patterns[flag] = re.compile(pattern)
            except re.error as e:
                raise MergeError(f"{flag}: invalid regular expression {pattern!r}: {e}") from None
    for path, who in ((model, "--model"), (base, "--base")):
        if not os.path.isdir(path):
            raise MergeError(f"{who}: model folder not found: {path}")
    if os.path.exists(out) and not overwrite:
        raise MergeError(f"output folder {out} already exists; choose another or pass "
                         "--overwrite")
    ft_index, base_index = index_folder(model), index_folder(base)
    torch_device = torch.device(device)
    embedding_name = input_embedding_name(base_index.tensors)

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    embedding_modules: list[str] = []
    saved_modules: list[str] = []
    result = ExtractResult(out)
    names = sorted(base_index.tensors, key=base_index.order_key)
    with TensorReader() as reader:
        # modules with a changed vector (bias, norm) are saved whole: PEFT cannot both
        # adapt a layer with LoRA and replace it
        whole = {n.rsplit(".", 1)[0] for n in names
                 if len(base_index.tensors[n].shape) < 2 and n in ft_index.tensors
                 and base_index.tensors[n].dtype.is_floating_point
                 and tuple(ft_index.tensors[n].shape) == tuple(base_index.tensors[n].shape)
                 and not torch.equal(reader.read(ft_index.tensors[n]),
                                     reader.read(base_index.tensors[n]))}
        for name in names:
            info = base_index.tensors[name]
            other = ft_index.tensors.get(name)
            if other is None or not info.dtype.is_floating_point:
                continue
            if tuple(other.shape) != tuple(info.shape):
                raise MergeError(f"tensor '{name}' has shape {list(other.shape)} in {model} "
                                 f"but {list(info.shape)} in {base}; extract-lora needs the "
                                 "same architecture and vocabulary")
            if "--include" in patterns and not patterns["--include"].search(name):
                continue
            if "--exclude" in patterns and patterns["--exclude"].search(name):
                continue
            delta = (reader.read(other).to(torch_device, torch.float32)
                     - reader.read(info).to(torch_device, torch.float32))
            if not bool(delta.any()):
                continue
            owner = name.rsplit(".", 1)[0]
            module = owner if name.endswith(".weight") else None
            is_embedding = name == embedding_name
            if progress:
                progress(name)
            if (delta.dim() != 2 or module is None or owner in whole
                    or (is_embedding and embeddings == "full")):
                tensors[_PREFIX + name] = reader.read(other).contiguous()
                if owner not in saved_modules:
                    saved_modules.append(owner)
                result.reports.append(MatrixReport(name, tuple(info.shape), 0, 0.0, "full"))
                continue
            if is_embedding and embeddings == "skip":
                result.reports.append(MatrixReport(name, tuple(info.shape), 0, 1.0, "skipped"))
                continue
            if is_embedding:  # PEFT embedding LoRA: ΔWᵀ = B·A
                b, a, error = factor(delta.T, rank, energy, randomized, name)
                tensors[f"{_PREFIX}{module}.lora_embedding_A"] = a.cpu()
                tensors[f"{_PREFIX}{module}.lora_embedding_B"] = b.cpu()
                embedding_modules.append(module)
                kind = "embedding"
            else:
                b, a, error = factor(delta, rank, energy, randomized, name)
                tensors[f"{_PREFIX}{module}.lora_A.weight"] = a.cpu()
                tensors[f"{_PREFIX}{module}.lora_B.weight"] = b.cpu()
                kind = "lora"
            ranks[module] = a.shape[0]
            result.reports.append(MatrixReport(name, tuple(info.shape), a.shape[0], error, kind))
    if not ranks and not saved_modules:
        raise MergeError(f"{model} does not differ from {base} in any selected tensor: "
                         "nothing to extract")
    _write_adapter(out, base, tensors, ranks, saved_modules, overwrite, result.reports)
    return result


def _write_adapter(out: str, base: str, tensors: dict[str, torch.Tensor],
                   ranks: dict[str, int], saved_modules: list[str], overwrite: bool,
                   reports: list[MatrixReport]) -> None:
    from safetensors.torch import save_file

    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": os.path.abspath(base),
        "r": r,
        "lora_alpha": r,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: k for m, k in sorted(ranks.items()) if k != r},
        "alpha_pattern": {m: k for m, k in sorted(ranks.items()) if k != r},
        "modules_to_save": sorted(saved_modules) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    partial = out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    save_file(tensors, os.path.join(partial, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(partial, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(partial, "extract_report.json"), "w", encoding="utf-8") as f:
        json.dump([{**r.__dict__, "shape": list(r.shape)} for r in reports], f, indent=1)
    if os.path.exists(out) and overwrite:
        shutil.rmtree(out)
    os.replace(partial, out)


__all__ = ["ExtractResult", "MatrixReport", "choose_rank", "extract_lora", "factor"]

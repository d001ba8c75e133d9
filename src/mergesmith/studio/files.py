"""Reading what the studio shows: model folders under the roots, cached Hub models, and
paths named in a recipe (which must stay inside the roots too)."""

from __future__ import annotations

import json
import os
from typing import Any

from .security import PathRefused, StudioConfig

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
MODEL_KEYS = {"model", "base_model", "tokenizer_source", "source", "lora", "text", "jsonl",
              "file", "path", "data", "statistics", "include_path"}


def looks_like_model(folder: str) -> bool:
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return "config.json" in names or any(n.endswith(WEIGHT_SUFFIXES) for n in names) \
        or "adapter_config.json" in names


def local_models(config: StudioConfig, depth: int = 3) -> list[dict[str, Any]]:
    """Model folders under the roots (at most ``depth`` levels down), runs' outputs included."""
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    for root in config.roots:
        for folder, dirs, _ in os.walk(root, followlinks=False):
            rel_depth = folder[len(root):].count(os.sep)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                             and not d.endswith(".partial"))
            if rel_depth >= depth:
                dirs[:] = []
            if folder == root or folder in seen or not looks_like_model(folder):
                continue
            seen.add(folder)
            found.append({"path": folder, "kind": "folder",
                          "label": os.path.relpath(folder, root), "root": root})
            dirs[:] = []  # a model's subfolders are not models
    return found


def hub_models() -> list[dict[str, Any]]:
    """Models in the Hugging Face cache (no network)."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir()
    except Exception:  # no cache yet, or an unreadable one
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        out.append({"path": repo.repo_id, "kind": "hub", "label": repo.repo_id,
                    "size": repo.size_on_disk})
    return out


def hub_snapshot(repo_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        return None


def model_summary(config: StudioConfig, ref: str) -> dict[str, Any]:
    """Architecture, layers, dtype, size and quantization of a folder or a cached Hub id."""
    from ..checkpoint.index import index_folder
    from ..errors import MergeError

    kind = "folder"
    if os.path.isabs(ref) or ref.startswith((".", "~")) or os.path.exists(
            os.path.join(config.workdir, ref)):
        folder = config.confine(ref)
    else:
        folder = hub_snapshot(ref)
        kind = "hub"
        if folder is None:
            raise PathRefused(f"{ref}: not a folder under the allowed roots, nor a model in "
                              "the Hugging Face cache", 404)
    try:
        index = index_folder(folder)
    except MergeError as e:
        raise PathRefused(str(e), 400) from None
    cfg = index.config or {}
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    dtypes: dict[str, int] = {}
    for t in index.tensors.values():
        name = str(t.dtype).removeprefix("torch.")
        dtypes[name] = dtypes.get(name, 0) + 1
    quant = cfg.get("quantization_config")
    formats = sorted({t.quant.format for t in index.tensors.values() if t.quant})
    return {
        "ref": ref, "kind": kind, "folder": folder,
        "architecture": ", ".join(cfg.get("architectures") or []) or cfg.get("model_type"),
        "model_type": cfg.get("model_type"),
        "layers": cfg.get("num_hidden_layers", text_cfg.get("num_hidden_layers")),
        "hidden_size": cfg.get("hidden_size", text_cfg.get("hidden_size")),
        "vocab_size": cfg.get("vocab_size", text_cfg.get("vocab_size")),
        "dtype": cfg.get("torch_dtype") or (max(dtypes, key=dtypes.get) if dtypes else None),
        "tensor_dtypes": dtypes,
        "tensors": len(index.tensors), "bytes": index.total_bytes, "files": len(index.files),
        "format": index.format,
        "quantization": (quant.get("quant_method") if isinstance(quant, dict) else None)
        or (", ".join(formats) if formats else None),
    }


def recipe_paths(data: Any) -> list[str]:
    """Every string of a parsed recipe that could name a file or folder."""
    out: list[str] = []

    def walk(node: Any, key: str | None) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str):
            for part in node.split("+"):  # BASE+ADAPTER references
                part = part.strip()
                if part and (key in MODEL_KEYS or "/" in part or part.startswith(("~", "."))):
                    out.append(part)

    walk(data, None)
    return out


def check_recipe_paths(config: StudioConfig, text: str) -> None:
    """Refuse a recipe naming an existing file or folder outside the roots (Hub ids pass)."""
    import yaml

    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        return  # the recipe parser reports the syntax error with its line
    for doc in docs:
        for p in recipe_paths(doc):
            candidate = os.path.expanduser(p)
            if not os.path.isabs(candidate):
                candidate = os.path.join(config.workdir, candidate)
            if (os.path.isabs(os.path.expanduser(p)) or p.startswith((".", "~"))
                    or os.path.lexists(candidate)) and not config.allowed(p):
                raise PathRefused(f"{p}: outside the folders the studio may read "
                                  "(--workdir and --allow)")


def read_jsonl(path: str, limit: int = 10000) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
            if len(rows) >= limit:
                break
    return rows

"""Evaluation results cached by what they depend on, so that nothing is evaluated twice.

The cache is a folder of small JSON files, one per result, named by the SHA-256 of its key:
``$MERGESMITH_EVAL_CACHE`` if set, else ``$XDG_CACHE_HOME/mergesmith/eval`` (by default
``~/.cache/mergesmith/eval``). It lives outside the model folders on purpose: input models
may be read-only or shared (the Hugging Face cache), a key is the model's *content*
(so a copied or re-merged identical model hits the same entries), and a merged folder keeps
exactly the files that were verified. Delete the folder to clear it.

A model's fingerprint covers its weights and the files that change its outputs:

* weights: the sha256 recorded in ``mergesmith_checksums.json`` (folders written by
  mergesmith; used when the recorded sizes match the files), otherwise each weight file's
  name, size and modification time (hashing gigabytes would cost more than many small
  evaluations);
* ``config.json`` and the tokenizer files, by content.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..checkpoint.index import WEIGHT_SUFFIXES
from ..hashing import file_sha256

CACHE_ENV = "MERGESMITH_EVAL_CACHE"
FORMAT = 1  # bump when the meaning of stored results changes

_CONTENT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                  "added_tokens.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mergesmith" / "eval"


def model_fingerprint(folder: str | os.PathLike) -> str:
    """A hash of what decides a model folder's outputs (see the module docstring)."""
    folder = os.fspath(folder)
    parts: dict[str, Any] = {}
    names = sorted(os.listdir(folder))
    recorded = _recorded_checksums(folder)
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json"):
            if name in recorded:
                parts[name] = recorded[name]
            elif name.endswith(".index.json"):
                parts[name] = file_sha256(path)
            else:
                st = os.stat(path)
                parts[name] = [st.st_size, st.st_mtime_ns]
        elif name in _CONTENT_FILES:
            parts[name] = file_sha256(path)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _recorded_checksums(folder: str) -> dict[str, str]:
    """Shard sha256s from mergesmith_checksums.json, for files whose size still matches."""
    try:
        with open(os.path.join(folder, "mergesmith_checksums.json"), encoding="utf-8") as f:
            files = json.load(f).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}
    out = {}
    for name, info in files.items() if isinstance(files, dict) else ():
        try:
            if os.path.getsize(os.path.join(folder, name)) == info.get("size"):
                out[name] = info["sha256"]
        except (OSError, KeyError, AttributeError, TypeError):
            continue
    return out


class EvalCache:
    """``get``/``put`` of JSON results by a key mapping; ``enabled=False`` stores nothing."""

    def __init__(self, folder: str | os.PathLike | None = None, enabled: bool = True) -> None:
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.enabled = enabled

    def _path(self, key: dict[str, Any]) -> tuple[Path, str]:
        text = json.dumps({"format": FORMAT, **key}, sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()
        return self.folder / f"{key.get('kind', 'result')}-{digest[:32]}.json", text

    def get(self, key: dict[str, Any]) -> Any:
        if not self.enabled:
            return None
        path, text = self._path(key)
        try:
            with open(path, encoding="utf-8") as f:
                entry = json.load(f)
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or json.dumps(entry.get("key"), sort_keys=True) != text:
            return None
        return entry.get("value")

    def put(self, key: dict[str, Any], value: Any) -> None:
        """Store atomically; a cache that cannot be written is skipped silently."""
        if not self.enabled:
            return
        path, text = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"key": json.loads(text), "value": value}, f, indent=1)
            os.replace(tmp, path)
        except OSError:
            pass

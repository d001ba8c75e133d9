"""Statistics artefacts cached by what they depend on, like ``eval``'s results.

One folder per entry, ``stats-<sha256 of the key>``, under ``$MERGESMITH_STATS_CACHE``, else
``$XDG_CACHE_HOME/mergesmith/stats`` (by default ``~/.cache/mergesmith/stats``). The key:
the model's content fingerprint (:func:`mergesmith.evaluate.cache.model_fingerprint`: the
recorded checksums or each weight file's name, size and mtime; config and tokenizer files
by content; a LoRA reference adds the adapter's), the calibration fingerprint (token ids,
mask, settings), the kinds, the compute settings and the artefact format. An entry is built
in a temporary folder and renamed into place with its ``manifest.json``, so a cache never
holds half an entry. Delete the folder to clear it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .store import FORMAT, Statistics

CACHE_ENV = "MERGESMITH_STATS_CACHE"
COMPUTE = {"dtype": "float32", "accumulate": "float64", "version": 1}


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mergesmith" / "stats"


def source_fingerprint(model: Any) -> str:
    from ..evaluate.cache import model_fingerprint

    if isinstance(model, (str, os.PathLike)):
        return model_fingerprint(model)
    fp = model_fingerprint(model.folder)
    lora = getattr(model, "lora", None)
    if lora is not None:
        folder = getattr(lora, "folder", None)
        extra = model_fingerprint(folder) if folder and os.path.isdir(folder) else str(model.ref)
        fp = hashlib.sha256(f"{fp}+{extra}".encode()).hexdigest()
    return fp


class StatsCache:
    def __init__(self, folder: str | os.PathLike | None = None, enabled: bool = True) -> None:
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.enabled = enabled

    def key(self, model: Any, tokens: Any, kinds: set[str]) -> dict[str, Any]:
        return {"model": source_fingerprint(model), "calibration": tokens.fingerprint,
                "kinds": sorted(kinds), "compute": COMPUTE, "format": FORMAT}

    def _name(self, key: dict[str, Any]) -> str:
        text = json.dumps(key, sort_keys=True)
        return "stats-" + hashlib.sha256(text.encode()).hexdigest()[:32]

    def final_path(self, key: dict[str, Any], out: str | None = None) -> Path:
        return Path(out) if out is not None else self.folder / self._name(key)

    def open(self, folder: Path) -> Statistics:
        with open(folder / "manifest.json", encoding="utf-8") as f:
            manifest = json.load(f)
        stats = Statistics([folder / name for name in manifest["files"]]) if manifest[
            "files"] else _EmptyStatistics()
        stats.folder = folder  # type: ignore[attr-defined]
        stats.manifest = manifest  # type: ignore[attr-defined]
        return stats

    def get(self, key: dict[str, Any]) -> Statistics | None:
        if not self.enabled:
            return None
        folder = self.final_path(key)
        try:
            with open(folder / "manifest.json", encoding="utf-8") as f:
                manifest = json.load(f)
            if json.dumps(manifest.get("key"), sort_keys=True) != json.dumps(key, sort_keys=True):
                return None
            return self.open(folder)
        except (OSError, ValueError, KeyError):
            return None

    @contextlib.contextmanager
    def building(self, key: dict[str, Any], out: str | None = None) -> Iterator[str]:
        """A temporary folder to write the entry into; renamed into place on success."""
        final = self.final_path(key, out)
        if final.exists() and (not final.is_dir() or (
                any(final.iterdir()) and not (final / "manifest.json").exists())):
            from ..errors import MergeError

            raise MergeError(f"{final}: exists and is not a statistics folder; choose "
                             "another output path")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-")
        try:
            yield tmp
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)


class _EmptyStatistics(Statistics):
    def __init__(self) -> None:  # noqa: D107 - a model without statistics (no linear layer)
        self.paths, self._where, self.metadata = [], {}, {}

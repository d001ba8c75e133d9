"""The statistics artefact: one safetensors file per (model, calibration tokens, settings).

Keys, for a model tensor named ``NAME`` (its name in the model's checkpoint):

* ``NAME::gram`` — float32 ``[in, in]``: Σ over calibration tokens of x xᵀ, x the input of
  the linear layer whose weight is ``NAME`` (``[out, in]``); a sum, not a mean;
* ``NAME::tokens`` — int64 ``[1]``: how many token vectors went into that sum;
* ``NAME::fisher`` — float32, ``NAME``'s shape: the diagonal Fisher, mean over calibration
  batches of the squared gradient of the language-model loss.

The file's metadata (strings) records what it was computed from: ``format``, ``kinds``
(``gram``, ``fisher`` or both, comma-separated) and whatever the producer adds (model
fingerprint, calibration fingerprint, settings).

Writing is atomic (a temporary file renamed), so a cache never holds half an artefact.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from typing import Any

FORMAT = "1"
GRAM, TOKENS, FISHER = "::gram", "::tokens", "::fisher"


class StatisticsWriter:
    """Collects statistics tensors, then ``save`` writes them at once (atomically).

    Statistics of one layer at a time are small next to the model; a producer that must
    bound memory for huge models writes several artefacts (one per layer range) and
    :class:`Statistics` reads any of them by tensor name."""

    def __init__(self) -> None:
        self.tensors: dict[str, Any] = {}

    def add_gram(self, name: str, gram: Any, tokens: int) -> None:
        import torch

        self.tensors[name + GRAM] = gram.detach().to(torch.float32).contiguous().cpu()
        self.tensors[name + TOKENS] = torch.tensor([int(tokens)], dtype=torch.int64)

    def add_fisher(self, name: str, fisher: Any) -> None:
        import torch

        self.tensors[name + FISHER] = fisher.detach().to(torch.float32).contiguous().cpu()

    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        kinds = sorted({k.rsplit("::", 1)[1] for k in self.tensors} - {"tokens"})
        meta = {"format": FORMAT, "kinds": ",".join(kinds), **(metadata or {})}
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".stats-", suffix=".tmp")
        os.close(fd)
        try:
            save_file(self.tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


class Statistics:
    """Read access to one model's statistics artefact(s), tensor by tensor (lazily: only
    the tensors asked for are read)."""

    def __init__(self, paths: str | os.PathLike | Iterable[str | os.PathLike]) -> None:
        from safetensors import safe_open

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [os.fspath(p) for p in paths]
        self._where: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        for path in self.paths:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{path}: not a mergesmith statistics artefact of "
                                     f"format {FORMAT}")
                self.metadata.update(meta)
                for key in f.keys():
                    self._where[key] = path

    def _get(self, key: str) -> Any:
        from safetensors import safe_open

        path = self._where.get(key)
        if path is None:
            return None
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(key)

    def gram(self, name: str) -> Any:
        """Σ x xᵀ of the inputs of the linear layer with weight ``name`` (None if absent)."""
        return self._get(name + GRAM)

    def tokens(self, name: str) -> int:
        t = self._get(name + TOKENS)
        return 0 if t is None else int(t.item())

    def fisher(self, name: str, rows: tuple[int, int] | None = None) -> Any:
        """Diagonal Fisher of tensor ``name`` (None if absent); ``rows``: only rows
        ``start:end`` of it (read alone, for a row chunk of the merge)."""
        if rows is None:
            return self._get(name + FISHER)
        from safetensors import safe_open

        path = self._where.get(name + FISHER)
        if path is None:
            return None
        with safe_open(path, framework="pt") as f:
            return f.get_slice(name + FISHER)[rows[0]:rows[1]]

    def shape(self, key: str) -> tuple[int, ...] | None:
        """Shape of a stored key (e.g. ``NAME::gram``) without reading it (None if absent)."""
        from safetensors import safe_open

        path = self._where.get(key)
        if path is None:
            return None
        with safe_open(path, framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def names(self, kind: str) -> list[str]:
        """Tensor names that have statistics of ``kind`` (``gram`` or ``fisher``)."""
        suffix = "::" + kind
        return sorted(k[: -len(suffix)] for k in self._where if k.endswith(suffix))

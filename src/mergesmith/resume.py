"""Crash safety: a manifest of finished work in ``OUT.partial`` so a merge can resume.

At the start of a merge, ``OUT.partial/mergesmith_manifest.json`` records a fingerprint of
everything that decides the output bytes (recipe, options, plan layout, input files). After
each work item's bytes are written, a line ``name, rows, crc32`` is appended to
``mergesmith_progress.log``. A process killed at any moment leaves at most a torn last line.

``--resume`` accepts a partial folder only if its fingerprint matches the new plan, then
re-reads every logged item and keeps those whose checksum still matches: the result is
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

from . import __version__
from .errors import MergeError
from .hashing import crc32
from .plan import Plan

MANIFEST = "mergesmith_manifest.json"
PROGRESS = "mergesmith_progress.log"

ItemKey = tuple[str, "tuple[int, int] | None"]


def fingerprint(plan: Plan, chunk_elements: int) -> str:
    """Hash of everything that decides the bytes of the output: the recipe, every option
    that can change them (:meth:`Options.fingerprint`), the row-chunk size, the planned
    tensors and the input files."""
    inputs = []
    for m in plan.models:
        if getattr(m, "stage", None) is not None:  # computed by an earlier stage
            inputs.append([str(m.ref), fingerprint(m.stage, chunk_elements)])
            continue
        files = []
        adapter_files = []
        if m.lora is not None:
            adapter_files = [os.path.join(m.lora.folder, n)
                             for n in sorted(os.listdir(m.lora.folder))]
        for f in [*m.index.files, *adapter_files]:
            try:
                st = os.stat(f)
                files.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
            except OSError:
                files.append([f, None, None])
        inputs.append([str(m.ref), files])
    data = {
        "version": __version__,
        "recipe": plan.recipe.text,
        "options": plan.options.fingerprint(),
        "chunk_elements": chunk_elements,
        "tensors": [[t.name, str(t.dtype), list(t.shape), t.file, t.offset, t.method,
                     [[i.model, i.name] for i in t.inputs], t.params, list(t.model_params)]
                    + ([repr(t.encoding), [repr(p) for p in t.parts]] if t.encoding else [])
                    for t in plan.tensors],
        "inputs": inputs,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


class ProgressLog:
    """Appends one line per finished work item (name, rows, crc32 of its bytes)."""

    def __init__(self, folder: str, fp: str, append: bool) -> None:
        if not append:
            with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
                json.dump({"format": 1, "fingerprint": fp, "mergesmith_version": __version__},
                          f, indent=1)
        self._file = open(os.path.join(folder, PROGRESS), "a" if append else "w",
                          encoding="utf-8")

    def record(self, name: str, rows: tuple[int, int] | None, crc: int) -> None:
        span = "-" if rows is None else f"{rows[0]}:{rows[1]}"
        self._file.write(f"{name}\t{span}\t{crc:08x}\n")
        self._file.flush()  # in the page cache: survives the process being killed

    def close(self) -> None:
        self._file.close()


def _parse(lines: Iterable[str]) -> dict[ItemKey, int]:
    done = {}
    for line in lines:
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 3 or not line.endswith("\n"):
            continue  # a line torn by a kill
        name, span, crc = parts
        try:
            rows = None if span == "-" else tuple(int(v) for v in span.split(":"))
            done[(name, rows)] = int(crc, 16)
        except ValueError:
            continue
    return done


def load_finished(plan: Plan, folder: str, fp: str) -> dict[ItemKey, int] | None:
    """Finished items of an interrupted merge in ``folder`` whose bytes still check out.

    None when there is nothing to resume; MergeError when the folder belongs to a
    different merge.
    """
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.exists(manifest):
        return None
    try:
        with open(manifest, encoding="utf-8") as f:
            recorded = json.load(f).get("fingerprint")
        with open(os.path.join(folder, PROGRESS), encoding="utf-8") as f:
            done = _parse(f)
    except (OSError, ValueError, AttributeError):
        return None
    if recorded != fp:
        raise MergeError(f"{folder} holds an interrupted merge of a different recipe, options "
                         "or input files; it cannot be resumed. Remove it (or run without "
                         "--resume, which starts over)")
    for shard in plan.shards:
        path = os.path.join(folder, shard.filename)
        if not os.path.exists(path) or os.path.getsize(path) != shard.size:
            return None
    good: dict[ItemKey, int] = {}
    handles: dict[str, Any] = {}
    tensors = {t.name: t for t in plan.tensors}
    try:
        for (name, rows), crc in done.items():
            if name not in tensors:
                continue
            t = tensors[name]
            fh = handles.get(t.file)
            if fh is None:  # (setdefault would open the file again for every item)
                fh = handles[t.file] = open(os.path.join(folder, t.file), "rb")
            got = 0
            for offset, length in t.byte_ranges(rows):
                got = _crc_of(fh, offset, length, got)
            if got == crc:
                good[(name, rows)] = crc
    finally:
        for fh in handles.values():
            fh.close()
    return good


def _crc_of(fh: Any, offset: int, length: int, crc: int = 0) -> int:
    """CRC-32 of a byte range, continuing ``crc`` (-1 when the file is short)."""
    if crc < 0:
        return crc
    fh.seek(offset)
    while length > 0:
        block = fh.read(min(length, 16 << 20))
        if not block:
            return -1
        crc = crc32(block, crc)
        length -= len(block)
    return crc


def remove_records(folder: str) -> None:
    for name in (MANIFEST, PROGRESS):
        try:
            os.remove(os.path.join(folder, name))
        except FileNotFoundError:
            pass

"""The output files: tensors in the order their inputs are read, packed into shards by size,
each with its header and every tensor's offset fixed before any data exists."""

from __future__ import annotations

import dataclasses

from ..checkpoint import ModelSource
from ..checkpoint.safetensors_format import TORCH_TO_ST, build_header
from ..errors import MergeError
from .types import OutputTensor, Shard


def processing_order(outputs: list[OutputTensor], sources: list[ModelSource],
                     donor: int) -> list[OutputTensor]:
    """Order outputs so that each input file is read front to back."""

    def key(t: OutputTensor) -> tuple:
        primary = next((i for i in t.inputs if i.model == donor), t.inputs[0])
        return (primary.model,) + sources[primary.model].index.order_key(primary.name)

    return sorted(outputs, key=key)


def check_unique(outputs: list[OutputTensor]) -> None:
    seen: set[str] = set()
    for t in outputs:
        for p in t.stored:
            if p.name in seen:
                raise MergeError(f"two parts of the recipe both produce tensor '{p.name}'")
            seen.add(p.name)


def layout(tensors: list[OutputTensor], max_shard: int
           ) -> tuple[list[OutputTensor], list[Shard]]:
    """Pack tensors into shards by size (greedy, in processing order); return the tensors
    (same order) with their file and offset, and the shards."""
    groups: list[list[OutputTensor]] = []
    size = 0
    for t in tensors:
        if not groups or (groups[-1] and max_shard > 0 and size + t.nbytes > max_shard):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    placed: dict[str, OutputTensor] = {}
    shards = []
    n = len(groups)
    for i, group in enumerate(groups):
        filename = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        # widest dtypes first keeps every tensor aligned to its element size
        stored = sorted(((t, p) for t in group for p in t.stored),
                        key=lambda tp: -tp[1].dtype.itemsize)
        header, offsets = build_header([(p.name, p.dtype, p.shape) for _, p in stored],
                                       {"format": "pt"})
        at = {p.name: len(header) + off for (_, p), off in zip(stored, offsets)}
        for t in group:
            assert all(p.dtype in TORCH_TO_ST for p in t.stored)
            parts = tuple(dataclasses.replace(p, offset=at[p.name]) for p in t.parts)
            placed[t.name] = dataclasses.replace(t, file=filename, offset=at[t.stored[0].name],
                                                 parts=parts)
        holders = dict.fromkeys(t.name for t, _ in stored)
        shards.append(Shard(filename, header, len(header) + sum(t.nbytes for t in group),
                            tuple(placed[name] for name in holders)))
    return [placed[t.name] for t in tensors], shards

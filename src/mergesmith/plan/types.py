"""What a plan is made of: output tensors with their inputs and resolved parameters, the
output files, the layer maps. Frozen once planned; what a run produces is a ``RunResult``
(``mergesmith.api``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Any

from .._torch import torch
from ..checkpoint import ModelSource, TensorInfo
from ..encodings import Encoding, Stored
from ..methods import MethodSpec
from ..methods.contract import BoundMethod
from ..options import Options
from ..recipe import Recipe
from ..tokenizer import VocabPlan

COPY = "copy"
"""Pseudo-method of non-floating tensors (buffers): equal in every input, copied as is."""


@dataclass(frozen=True)
class InputTensor:
    """One input of an output tensor: tensor ``name`` of ``Plan.models[model]``."""

    model: int
    name: str


@dataclass(frozen=True, eq=False)
class OutputTensor:
    """A planned output tensor. ``file``/``offset`` place its bytes in the output.

    With an ``encoding`` (e.g. block-scaled FP8), ``dtype`` is the dtype the engine
    computes it in, and it is stored as the encoding's ``parts``, each placed on its own
    (``offset`` is the first part's)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    method: str
    inputs: tuple[InputTensor, ...]
    base_index: int | None
    params: dict[str, Any]
    model_params: tuple[dict[str, Any], ...]
    elementwise: bool
    file: str = ""
    offset: int = 0
    reindex: bool = False  # rows re-indexed to the output vocabulary (Plan.vocab)
    encoding: Encoding | None = None
    parts: tuple[Stored, ...] = ()  # the stored tensors of an encoded one
    stack: int = 0
    """Inputs per slice of dim 0 (0: not stacked). Slice ``e`` is made from
    ``inputs[e*stack:(e+1)*stack]`` alone (MoE experts fused along an expert axis), so it
    is computed one slice at a time and memory does not grow with the number of slices."""
    expert_parts: int = 0  # a whole-tensor method on fused experts: pieces per expert

    @property
    def nbytes(self) -> int:
        """Bytes stored in the output files."""
        if self.encoding is not None:
            return sum(p.nbytes for p in self.parts)
        return prod(self.shape) * self.dtype.itemsize

    @property
    def stored(self) -> tuple[Stored, ...]:
        """The tensors in the output files that hold this one."""
        if self.encoding is not None:
            return self.parts
        return (Stored(self.name, self.dtype, self.shape, 1, self.offset),)

    def byte_ranges(self, rows: tuple[int, int] | None) -> list[tuple[int, int]]:
        """(offset, length) in ``file`` of the bytes of rows ``rows`` (None: all), in the
        order they are written and checksummed."""
        return [p.byte_range(rows) for p in self.stored]

    @property
    def copied(self) -> bool:
        """A non-floating buffer copied as is (no method runs)."""
        return self.method == COPY


@dataclass(frozen=True, eq=False)
class Shard:
    """One output file: its header bytes and the tensors it holds, in storage order."""

    filename: str
    header: bytes
    size: int
    tensors: tuple[OutputTensor, ...]


@dataclass(frozen=True)
class LayerSource:
    """One output layer of a slices recipe: which layer of which models it merges."""

    output: int
    inputs: tuple[tuple[str, int], ...]  # (model reference, input layer)


@dataclass(frozen=True, eq=False)
class Plan:
    """Everything ``execute`` needs, decided before reading any tensor data."""

    recipe: Recipe
    method: MethodSpec
    models: list[ModelSource]
    donor: int
    tensors: tuple[OutputTensor, ...]
    shards: tuple[Shard, ...]
    config: dict[str, Any]
    options: Options
    read_dtype: torch.dtype | None
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    layer_maps: dict[str, list[LayerSource]] = field(default_factory=dict)
    vocab: VocabPlan | None = None
    generation_config: dict[str, Any] | None = None  # patched; None: copied as is
    chat_template: str | None = None
    stages: tuple[Any, ...] = ()
    """A multi-stage recipe's stages (``stages.StageInfo``), in order, this plan's last;
    empty for a recipe of one stage."""
    statistics: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    """Data-aware methods: output tensor name → per input, the statistics it is merged with
    (``plan.statistics.TensorStatistics``; None at the base); tensors not listed have
    none."""

    @property
    def seed(self) -> int | None:
        """The run's seed: the option, else the recipe's ``seed:``."""
        return self.options.seed if self.options.seed is not None else self.recipe.seed

    def input_info(self, inp: InputTensor) -> TensorInfo:
        return self.models[inp.model].index.tensors[inp.name]

    def bound(self, t: OutputTensor) -> BoundMethod:
        """The method of an output tensor, bound to its inputs (contract checked when
        planned)."""
        from ..methods import get_method
        from ..methods.registry import internal_method

        return BoundMethod(internal_method(t.method) or get_method(t.method), t.base_index)

    @property
    def bytes_read(self) -> int:
        return sum(self.input_info(i).nbytes for t in self.tensors for i in t.inputs)

    @property
    def bytes_written(self) -> int:
        return sum(t.nbytes for t in self.tensors)

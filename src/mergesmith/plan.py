"""Recipe + model indexes → Plan: every output tensor with its inputs and resolved parameters,
and the output file layout. Pure and cheap: no tensor data is read.

Everything that can be wrong in a recipe (unknown parameters, wrong types, missing tensors,
shape mismatches, impossible layer ranges, contract violations) is found here, so a merge
that starts will not fail halfway for a reason the recipe could have told us.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch

from . import arch
from .checkpoint import ModelSource, TensorInfo
from .checkpoint.safetensors_format import TORCH_TO_ST, build_header
from .errors import MergeError, did_you_mean
from .methods import BasePolicy, MethodSpec, Scope, get_method
from .recipe import ModelReference, Recipe, Setting, coerce, evaluate
from .recipe.params import UNSET, leaf_values
from .tokenizer import (ModelVocab, VocabPlan, build_vocab_plan, load_vocab, remap_special_ids,
                        resolve_chat_template, truncation_plan)
from .units import dtype_name

COPY = "copy"
"""Pseudo-method of non-floating tensors (buffers): equal in every input, copied as is."""

DEFAULT_SHARD_SIZE = 5_000_000_000


@dataclass(frozen=True)
class InputTensor:
    """One input of an output tensor: tensor ``name`` of ``Plan.models[model]``."""

    model: int
    name: str


@dataclass
class OutputTensor:
    """A planned output tensor. ``file``/``offset`` place its bytes in the output."""

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

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


@dataclass
class Shard:
    """One output file: its header bytes and the tensors it holds, in storage order."""

    filename: str
    header: bytes
    size: int
    tensors: list[OutputTensor]


@dataclass(frozen=True)
class LayerSource:
    """One output layer of a slices recipe: which layer of which models it merges."""

    output: int
    inputs: tuple[tuple[str, int], ...]  # (model reference, input layer)


@dataclass
class PlanOptions:
    out_shard_size: int = DEFAULT_SHARD_SIZE
    compute_dtype: torch.dtype = torch.float32
    seed: int | None = None
    allow_crimes: bool = False
    unsafe_truncate_embeddings: bool = False


@dataclass
class Plan:
    """Everything ``execute`` needs, decided before reading any tensor data."""

    recipe: Recipe
    method: MethodSpec
    models: list[ModelSource]
    donor: int
    tensors: list[OutputTensor]
    shards: list[Shard]
    config: dict[str, Any]
    options: PlanOptions
    read_dtype: torch.dtype | None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    layer_maps: dict[str, list[LayerSource]] = field(default_factory=dict)
    vocab: VocabPlan | None = None
    generation_config: dict[str, Any] | None = None  # patched; None: copied as is
    chat_template: str | None = None
    adapter_result: Any = field(default=None, repr=False)  # set by an adapter merge
    evaluation: Any = field(default=None, repr=False)  # set by a recipe's 'evaluate:'

    @property
    def seed(self) -> int | None:
        return self.options.seed

    def input_info(self, inp: InputTensor) -> TensorInfo:
        return self.models[inp.model].index.tensors[inp.name]

    @property
    def bytes_read(self) -> int:
        return sum(self.input_info(i).nbytes for t in self.tensors for i in t.inputs)

    @property
    def bytes_written(self) -> int:
        return sum(t.nbytes for t in self.tensors)


# ------------------------------------------------------------------ normalised recipe


@dataclass
class _Source:
    ref: ModelReference
    layer_range: tuple[int, int] | None
    params: dict[str, Setting]
    path: tuple


@dataclass
class _Slice:
    """Inputs merged together, with the parameter levels above them (slice, module)."""

    sources: list[_Source]
    base: ModelReference | None
    params: dict[str, Setting]
    path: tuple
    module_params: dict[str, Setting] = field(default_factory=dict)


def _recipe_levels(recipe: Recipe):
    """(path, models, slices, parameters) of the recipe itself and of each module."""
    yield (), recipe.models, recipe.slices, recipe.parameters
    for name, m in (recipe.modules or {}).items():
        yield ("modules", name), m.models, m.slices, m.parameters


def referenced_models(recipe: Recipe) -> list[tuple[ModelReference, str]]:
    """Every model reference of a recipe, once, base first then recipe order, with its field."""
    refs: dict[ModelReference, str] = {}
    if recipe.base_model is not None:
        refs[recipe.base_model] = recipe.at("base_model")
    for path, models, slices, _ in _recipe_levels(recipe):
        for i, m in enumerate(models or []):
            refs.setdefault(m.ref, recipe.at(*path, "models", i, "model"))
        for i, s in enumerate(slices or []):
            if s.base_model is not None:
                refs.setdefault(s.base_model, recipe.at(*path, "slices", i, "base_model"))
            for j, src in enumerate(s.sources):
                refs.setdefault(src.ref, recipe.at(*path, "slices", i, "sources", j, "model"))
    return list(refs.items())


# ------------------------------------------------------------------ parameters


def _check_parameter_names(recipe: Recipe, spec: MethodSpec) -> None:
    """Every parameter name and literal value in the recipe must fit the method."""
    levels: list[tuple[tuple, dict[str, Setting], bool]] = []
    for path, models, slices, params in _recipe_levels(recipe):
        levels.append(((*path, "parameters"), params, False))
        for i, m in enumerate(models or []):
            levels.append(((*path, "models", i, "parameters"), m.parameters, True))
        for i, s in enumerate(slices or []):
            levels.append(((*path, "slices", i, "parameters"), s.parameters, False))
            for j, src in enumerate(s.sources):
                levels.append(((*path, "slices", i, "sources", j, "parameters"),
                               src.parameters, True))
    known = [p.name for p in spec.params]
    for path, settings, model_level in levels:
        for name, setting in settings.items():
            param = spec.param(name)
            if param is None:
                takes = spec.describe_params()
                raise MergeError(f"{recipe.at(*path, name)}: unknown parameter '{name}' for "
                                 f"merge method '{spec.name}'.{did_you_mean(name, known)} "
                                 f"'{spec.name}' takes: {takes}.")
            if model_level and not param.per_model:
                raise MergeError(f"{recipe.at(*path, name)}: '{name}' applies to the whole "
                                 f"merge, not to one model (mergekit ignores it here); move "
                                 "it to the top-level or slice 'parameters'")
            for value in leaf_values(setting):
                try:
                    coerce(value, param.type, name)
                except MergeError as e:
                    raise MergeError(f"{recipe.at(*path, name)}: {e}") from None


def _lookup(levels: list[dict[str, Setting]], name: str, tensor_name: str, t: float) -> Any:
    for settings in levels:
        if name in settings:
            value = evaluate(settings[name], tensor_name, t)
            if value is not UNSET:
                return value
    return UNSET


# ------------------------------------------------------------------ planning


class _Planner:
    def __init__(self, recipe: Recipe, models: dict[ModelReference, ModelSource],
                 options: PlanOptions) -> None:
        self.recipe = recipe
        self.options = options
        self.spec = get_method(recipe.merge_method, recipe.at("merge_method"))
        self.refs = list(models)
        self.sources = [models[r] for r in self.refs]
        self.model_index = {r: i for i, r in enumerate(self.refs)}
        self.outputs: list[OutputTensor] = []
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.layer_maps: dict[str, list[LayerSource]] = {}
        self.untie = False  # an LM head was added to a tied donor
        self.vocab: VocabPlan | None = None
        self.vocabs: dict[int, ModelVocab] = {}
        self.generation_config: dict[str, Any] | None = None
        self.chat_template: str | None = None
        self.rows = {i: r for i, s in enumerate(self.sources)
                     if (r := arch.vocab_rows(s.index.tensors)) is not None}
        self._modules: dict[int, dict[str, arch.Module]] = {}

    def modules_of(self, model: int) -> dict[str, arch.Module]:
        if model not in self._modules:
            self._modules[model] = arch.infer_modules(list(self.sources[model].index.tensors))
        return self._modules[model]

    # -- normalisation -------------------------------------------------------

    def whole(self, models: list, path: tuple, module_params: dict[str, Setting]) -> _Slice:
        """``models:`` as one slice; mergekit adds a base_model that is not listed."""
        sources = [_Source(m.ref, None, m.parameters, (*path, "models", i))
                   for i, m in enumerate(models)]
        base = self.recipe.base_model
        if base is not None and all(s.ref != base for s in sources):
            if self.spec.base is BasePolicy.FORBIDDEN:
                self._forbidden_base(("base_model",))
            sources.append(_Source(base, None, {}, ("base_model",)))
        return _Slice(sources, base, {}, path, module_params)

    def slices(self, slices: list, path: tuple, module_params: dict[str, Setting]) -> list[_Slice]:
        out = []
        for i, s in enumerate(slices):
            sources = [_Source(src.ref, src.layer_range, src.parameters,
                               (*path, "slices", i, "sources", j))
                       for j, src in enumerate(s.sources)]
            out.append(_Slice(sources, s.base_model or self.recipe.base_model, s.parameters,
                              (*path, "slices", i), module_params))
        return out

    def _forbidden_base(self, path: tuple) -> None:
        raise MergeError(f"{self.recipe.at(*path)}: merge method '{self.spec.name}' takes "
                         "exactly one model and no base_model; remove 'base_model' (use the "
                         "model itself as the only input)")

    def check_contract(self, sl: _Slice) -> int | None:
        """Validate inputs of a slice against the method; return the base's position."""
        spec, r = self.spec, self.recipe
        where = r.at(*sl.path) if sl.path else r.at("models")
        seen: set[ModelReference] = set()
        for src in sl.sources:
            if src.ref in seen:
                raise MergeError(f"{r.at(*src.path)}: model '{src.ref}' is listed twice in the "
                                 "same merge; list each input once")
            seen.add(src.ref)
        base_pos = next((i for i, s in enumerate(sl.sources) if s.ref == sl.base), None)
        if spec.base is BasePolicy.REQUIRED and sl.base is None:
            raise MergeError(f"merge method '{spec.name}' needs a base model: add "
                             "'base_model: <the model the others were fine-tuned from>'")
        if spec.base is BasePolicy.REQUIRED and base_pos is None:
            raise MergeError(f"{where}: the base model '{sl.base}' must be one of the slice's "
                             f"sources for '{spec.name}'")
        if spec.base is BasePolicy.FORBIDDEN and sl.base is not None and base_pos is not None \
                and len(sl.sources) > 1:
            self._forbidden_base(("base_model",))
        n = len(sl.sources)
        if n < spec.min_inputs or (spec.max_inputs is not None and n > spec.max_inputs):
            if spec.max_inputs == spec.min_inputs:
                want = f"exactly {spec.min_inputs}"
            elif spec.max_inputs is None:
                want = f"at least {spec.min_inputs}"
            else:
                want = f"{spec.min_inputs} to {spec.max_inputs}"
            base_note = " (the base model counts)" if sl.base is not None else ""
            raise MergeError(f"{where}: merge method '{spec.name}' takes {want} input "
                             f"model(s){base_note}, got {n}")
        if spec.base in (BasePolicy.IGNORED, BasePolicy.FORBIDDEN):
            return None
        others = n - (base_pos is not None)
        if others < spec.min_non_base or (spec.max_non_base is not None
                                          and others > spec.max_non_base):
            lo, hi = spec.min_non_base, spec.max_non_base
            want = (f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None
                    else f"{lo} to {hi}")
            raise MergeError(f"{where}: merge method '{spec.name}' takes {want} model(s) "
                             f"besides the base model, got {others}")
        return base_pos

    # -- tensors -------------------------------------------------------------

    def model_of(self, ref: ModelReference) -> int:
        return self.model_index[ref]

    def find_input(self, src: _Source, name: str, out_name: str) -> InputTensor:
        m = self.model_of(src.ref)
        tensors = self.sources[m].index.tensors
        if name in tensors:
            return InputTensor(m, name)
        if arch.is_output_head(name):
            embed = arch.input_embedding_name(tensors)
            if embed is not None:  # tied embeddings: the head is the embedding
                return InputTensor(m, embed)
        raise MergeError(f"model '{src.ref}' has no tensor '{name}' (needed for output "
                         f"tensor '{out_name}'); it is not the same architecture as the "
                         "others, or its checkpoint is incomplete")

    def add_output(self, out_name: str, sl: _Slice, base_pos: int | None,
                   in_names: list[str], t: float) -> None:
        spec, r = self.spec, self.recipe
        inputs = [self.find_input(src, n, out_name) for src, n in zip(sl.sources, in_names)]
        infos = [self.sources[i.model].index.tensors[i.name] for i in inputs]
        shape, reindex = self._output_shape(out_name, sl, inputs, infos)
        floating = [info.dtype.is_floating_point for info in infos]
        if any(floating) and not all(floating):
            listing = ", ".join(f"{src.ref}: {str(info.dtype).removeprefix('torch.')}"
                                for src, info in zip(sl.sources, infos))
            raise MergeError(f"tensor '{out_name}' is floating-point in some models and not in "
                             f"others ({listing}); quantized or integer weights cannot be "
                             "merged with floating-point ones — use unquantized checkpoints")
        if not any(floating):
            self.outputs.append(OutputTensor(out_name, shape, infos[0].dtype, COPY,
                                             tuple(inputs), None, {}, tuple({} for _ in inputs),
                                             True))
            return
        params: dict[str, Any] = {}
        shared_levels = [sl.params, sl.module_params, r.parameters]
        for p in spec.params:
            if p.per_model:
                continue
            value = _lookup(shared_levels, p.name, out_name, t)
            if value is UNSET:
                if p.required:
                    raise MergeError(f"merge method '{spec.name}' needs the parameter "
                                     f"'{p.name}' for tensor '{out_name}'; add it under "
                                     "'parameters:'")
                value = p.default
            params[p.name] = self._coerce(value, p.type, p.name, out_name)
        if "lines_alpha" in params:  # LiNeS: the task vector's scale grows with depth
            depth = (t if arch.split_layer(out_name) is not None
                     else 0.0 if arch.is_pre_layer(out_name) else 1.0)
            params["lambda"] = params.get("lambda", 1.0) * (
                params["lines_alpha"] + params["lines_beta"] * depth)
        model_params = []
        for k, (src, inp) in enumerate(zip(sl.sources, inputs)):
            values: dict[str, Any] = {}
            for p in spec.params:
                if not p.per_model or (p.scope is Scope.NON_BASE and k == base_pos):
                    continue
                value = _lookup([src.params, sl.params, sl.module_params, r.parameters],
                                p.name, inp.name, t)
                if value is UNSET:
                    if p.required:
                        extra = (" (mergekit adds the base model to the inputs of "
                                 f"'{spec.name}', so it needs one too)"
                                 if src.path == ("base_model",) else "")
                        raise MergeError(f"{r.at(*src.path)}: model '{src.ref}' needs the "
                                         f"parameter '{p.name}' for tensor '{inp.name}' (merge "
                                         f"method '{spec.name}'){extra}")
                    value = p.default
                values[p.name] = self._coerce(value, p.type, p.name, inp.name)
            model_params.append(values)
        if spec.check is not None:
            spec.check(out_name, params, model_params, base_pos)
        dtype = r.out_dtype or r.dtype or _promote(info.dtype for info in infos)
        self.outputs.append(OutputTensor(out_name, shape, dtype, spec.name, tuple(inputs),
                                         base_pos, params, tuple(model_params),
                                         spec.elementwise and not reindex
                                         and not params.get("svc"), reindex=reindex))

    def _output_shape(self, out_name: str, sl: _Slice, inputs: list[InputTensor],
                      infos: list[TensorInfo]) -> tuple[tuple[int, ...], bool]:
        """Shape of an output tensor, and whether its rows are re-indexed to the output
        vocabulary. Vocabulary-size mismatches without a tokenizer block are errors."""
        shapes = {info.shape for info in infos}
        vocab_like = arch.is_vocab_tensor(out_name) and all(
            info.shape and info.shape[0] == self.rows.get(i.model) for i, info in zip(inputs, infos))
        if vocab_like and len({s[1:] for s in shapes}) == 1:
            rest = infos[0].shape[1:]
            if self.vocab is not None:
                return (self.vocab.size, *rest), True
            if len(shapes) > 1 and self.options.unsafe_truncate_embeddings:
                self.vocab = truncation_plan(min(self.rows.values()))
                self.notes.append(f"UNSAFE: vocabulary tensors cut to the smallest vocabulary "
                                  f"({self.vocab.size} rows); token ids above it are invalid")
                return (self.vocab.size, *rest), True
            if len(shapes) > 1:
                listing = ", ".join(f"{src.ref}: {info.shape[0]}"
                                    for src, info in zip(sl.sources, infos))
                raise MergeError(f"tensor '{out_name}': the models have different vocabulary "
                                 f"sizes ({listing}). Add 'tokenizer: {{source: union}}' (all "
                                 "tokens) or 'tokenizer: {source: base}' (the base's tokens) to "
                                 "the recipe to align them, or pass "
                                 "--unsafe-truncate-embeddings if the ids agree up to the "
                                 "smallest size")
        if len(shapes) > 1:
            listing = ", ".join(f"{src.ref}: {list(info.shape)}" for src, info in zip(sl.sources, infos))
            raise MergeError(f"tensor '{out_name}' has different shapes in the inputs "
                             f"({listing})")
        return infos[0].shape, False

    @staticmethod
    def _coerce(value: Any, kind: type, name: str, tensor: str) -> Any:
        if value is None:
            return None
        try:
            return coerce(value, kind, name)
        except MergeError as e:
            raise MergeError(f"{e} (for tensor '{tensor}', after evaluating gradients)") from None

    def carry(self, names: list[str], donor: int, why: str) -> None:
        """Copy donor tensors unchanged (cast to the recipe's output dtype if it has one)."""
        r = self.recipe
        for name in names:
            info = self.sources[donor].index.tensors[name]
            inp = (InputTensor(donor, name),)
            if info.dtype.is_floating_point:
                dtype = r.out_dtype or r.dtype or info.dtype
                self.outputs.append(OutputTensor(name, info.shape, dtype, "passthrough", inp,
                                                 None, {}, ({"scale": None},), True))
            else:
                self.outputs.append(OutputTensor(name, info.shape, info.dtype, COPY, inp,
                                                 None, {}, ({},), True))
        if names:
            self.notes.append(why)

    # -- whole models (or modules) --------------------------------------------

    def plan_whole(self, sl: _Slice, donor: int, names: list[str],
                   module: str | None = None) -> None:
        """Merge every tensor in ``names`` (the donor's, or one module's) name by name."""
        base_pos = self.check_contract(sl)
        stacks = arch.layer_stacks(names)
        for name in names:
            self.add_output(name, sl, base_pos, [name] * len(sl.sources),
                            arch.gradient_position(name, stacks))
        self.add_untied_heads(sl, base_pos, donor, names)
        planned = set(names)
        for src in sl.sources:
            m = self.model_of(src.ref)
            own = arch.find_module(self.modules_of(m), module) if module else None
            scope = own.tensors if own is not None else self.sources[m].index.tensors
            extra = {n for n in scope if n not in planned and not arch.is_output_head(n)}
            if extra and m != donor:
                shown = ", ".join(sorted(extra)[:3]) + (" ..." if len(extra) > 3 else "")
                self.warnings.append(f"{len(extra)} tensor(s) of '{src.ref}' are not in the "
                                     f"base model '{self.refs[donor]}' and are not merged: "
                                     f"{shown}")

    def add_untied_heads(self, sl: _Slice, base_pos: int | None, donor: int,
                         names: list[str]) -> None:
        """Inputs with an LM head the donor ties to its embedding: the output gets a head
        (the tied inputs contribute their embedding) and ``tie_word_embeddings: false``."""
        if arch.input_embedding_name(names) is None:
            return
        heads = {n for src in sl.sources
                 for n in self.sources[self.model_of(src.ref)].index.tensors
                 if arch.is_output_head(n) and n not in self.sources[donor].index.tensors}
        for head in sorted(heads):
            self.add_output(head, sl, base_pos, [head] * len(sl.sources), 0.0)
            self.untie = True
            self.notes.append(f"'{head}': some inputs have their own LM head, so the output "
                              "has one too (tied inputs contribute their embedding) and "
                              "config.json gets tie_word_embeddings: false")

    # -- slices ---------------------------------------------------------------

    def plan_slices(self, slices: list[_Slice], donor: int, module: arch.Module) -> None:
        """Plan a layer-wise recipe for one module (the whole model when it has one)."""
        contracts = [self.check_contract(sl) for sl in slices]
        stacks: dict[ModelReference, arch.Module] = {}
        for sl in slices:
            for src in sl.sources:
                m = self.model_of(src.ref)
                own = arch.find_module(self.modules_of(m), module.name)
                if own is None or own.stack is None:
                    raise MergeError(f"{self.recipe.at(*src.path)}: '{src.ref}' has no stack "
                                     f"of layers for module '{module.name}'")
                start, end = src.layer_range or (0, 0)
                if end > own.layers:
                    raise MergeError(f"{self.recipe.at(*src.path, 'layer_range')}: layer_range "
                                     f"[{start}, {end}] is past the end of '{src.ref}', which "
                                     f"has {own.layers} layers (valid: 0 to {own.layers})")
                stacks[src.ref] = own
        loose = module.loose()
        for name in [n for n in loose if arch.is_pre_layer(n)]:
            self.add_output(name, slices[0], contracts[0], [name] * len(slices[0].sources), 0.0)
        layer_map: list[LayerSource] = []
        for sl, base_pos in zip(slices, contracts):
            first = sl.sources[0]
            start0, end0 = first.layer_range or (0, 0)
            n = end0 - start0
            first_names = self.sources[self.model_of(first.ref)].index.tensors
            for i in range(n):
                out_layer = len(layer_map)
                t = 1.0 if n == 1 else i / (n - 1)
                for rest in stacks[first.ref].layer_tensors(first_names, start0 + i):
                    in_names = [f"{stacks[src.ref].stack}.{(src.layer_range or (0, 0))[0] + i}"
                                f".{rest}" for src in sl.sources]
                    self.add_output(f"{module.stack}.{out_layer}.{rest}", sl, base_pos,
                                    in_names, t)
                layer_map.append(LayerSource(out_layer, tuple(
                    (str(src.ref), (src.layer_range or (0, 0))[0] + i) for src in sl.sources)))
        post = [n for n in loose if not arch.is_pre_layer(n)]
        for name in post:
            self.add_output(name, slices[-1], contracts[-1], [name] * len(slices[-1].sources),
                            0.0)
        self.layer_maps[module.name] = layer_map
        self._report_lost_layer_tensors(module, donor)

    def _report_lost_layer_tensors(self, module: arch.Module, donor: int) -> None:
        """Layer tensors the donor has (e.g. only in layer 0) that no output layer has."""
        names = self.sources[donor].index.tensors
        wanted = {layer.rest for n in module.tensors
                  if (layer := arch.split_layer(n)) and layer.prefix == module.stack}
        written = {layer.rest for t in self.outputs
                   if (layer := arch.split_layer(t.name)) and layer.prefix == module.stack}
        for rest in sorted(wanted - written):
            layers = sorted({layer.index for n in names if (layer := arch.split_layer(n))
                             and layer.prefix == module.stack and layer.rest == rest})
            self.warnings.append(f"'{module.stack}.N.{rest}' (donor layers {layers}) is in no "
                                 "output layer: the slices do not use those layers")

    # -- architecture and config -------------------------------------------

    def check_architectures(self) -> None:
        archs = {}
        for ref, src in zip(self.refs, self.sources):
            a = ([ref.override_architecture] if ref.override_architecture
                 else (src.config or {}).get("architectures"))
            if a:
                archs.setdefault(tuple(a), ref)
        if len(archs) > 1 and not self.options.allow_crimes:
            listing = "; ".join(f"{ref}: {', '.join(a)}" for a, ref in archs.items())
            raise MergeError(f"the input models have different architectures ({listing}). "
                             "Merging them is usually a mistake; pass --allow-crimes to try "
                             "anyway (the base model's architecture is used)")

    def output_config(self, donor: int) -> dict[str, Any]:
        config = copy.deepcopy(self.sources[donor].config)
        if config is None:
            raise MergeError(f"model '{self.refs[donor]}' (the donor of the output config) has "
                             "no config.json; the merged model could not be loaded without one")
        ref = self.refs[donor]
        if ref.override_architecture:
            config["architectures"] = [ref.override_architecture]
        out_dtype = self.recipe.out_dtype or self.recipe.dtype
        if out_dtype is not None:
            keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
            for k in keys:
                config[k] = dtype_name(out_dtype)
        if self.untie:
            for path, value in list(arch.walk_config(config)):
                if path[-1] == "tie_word_embeddings" and value:
                    arch.set_path(config, path, False)
            config.setdefault("tie_word_embeddings", False)
        modules = self.modules_of(donor)
        for name, layer_map in self.layer_maps.items():
            self._patch_layers(config, modules[name], layer_map)
        if self.vocab is not None:
            self._patch_vocab(config, donor)
        return config

    def _patch_vocab(self, config: dict[str, Any], donor: int) -> None:
        """vocab_size (also nested) = rows written; special token ids follow the tokens."""
        assert self.vocab is not None
        old = config.get("vocab_size", self.rows.get(donor))
        for path, value in list(arch.walk_config(config)):
            if path[-1] == "vocab_size" and value in (old, self.rows.get(donor)):
                arch.set_path(config, path, self.vocab.size)
        if old != self.vocab.size:
            self.notes.append(f"config.json: vocab_size {old} → {self.vocab.size}")
        if self.vocab.truncate or donor not in self.vocabs:
            return
        old_tokens = self.vocabs[donor].token_of()
        new_ids = {t: i for i, t in enumerate(self.vocab.tokens)}
        remap_special_ids(config, old_tokens, new_ids, self.notes, "config.json")
        path = os.path.join(self.sources[donor].folder, "generation_config.json")
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    generation = json.load(f)
            except (OSError, ValueError) as e:
                raise MergeError(f"{path}: cannot read ({e})") from None
            remap_special_ids(generation, old_tokens, new_ids, self.notes,
                              "generation_config.json")
            self.generation_config = generation

    def plan_vocabulary(self, donor: int) -> None:
        """``tokenizer:``/``tokenizer_source:``: the output vocabulary, before any tensor."""
        r = self.recipe
        if r.tokenizer is None:
            return
        self.vocabs = {m: load_vocab(self.sources[m].folder, rows, str(self.refs[m]))
                       for m, rows in self.rows.items()}
        if not self.vocabs:
            raise MergeError(f"{r.tokenizer.where}: the models have no token embeddings to "
                             "align")
        base = self.model_index.get(r.base_model) if r.base_model is not None else None
        if base is None:
            base = donor

        def model_of(ref: ModelReference, where: str) -> int:
            if ref not in self.model_index:
                raise MergeError(f"{where}: '{ref}' is not one of the merged models")
            return self.model_index[ref]

        self.vocab = build_vocab_plan(r.tokenizer, self.vocabs, base, model_of,
                                      {i: str(ref) for i, ref in enumerate(self.refs)})
        self.notes.extend(self.vocab.notes)
        self.notes.append(f"output vocabulary: {self.vocab.vocab} tokens"
                          + (f", padded to {self.vocab.size} rows"
                             if self.vocab.size > self.vocab.vocab else ""))

    def plan_chat_template(self) -> None:
        r = self.recipe
        if r.chat_template is None:
            return
        template = resolve_chat_template(r.chat_template, [s.folder for s in self.sources],
                                         r.at("chat_template"))
        if template is None:
            self.warnings.append("chat_template: auto: no input model has a chat template; "
                                 "the base model's tokenizer files are kept as they are")
        self.chat_template = template

    def _patch_layers(self, config: dict[str, Any], module: arch.Module,
                      layer_map: list[LayerSource]) -> None:
        old, new = module.layers, len(layer_map)
        keys = arch.layer_count_keys(config, old, module.name)
        if not keys:
            self.warnings.append(f"no layer-count key with value {old} found in config.json "
                                 f"for module '{module.name}'; the output config keeps it")
            return
        sources = [layer.inputs[0][1] for layer in layer_map]
        relisted = []
        for path in keys:
            arch.set_path(config, path, new)
            for lst in arch.per_layer_lists(config, old, path[:-1]):
                values = arch.get_path(config, lst)
                arch.set_path(config, lst, [values[i] for i in sources])
                relisted.append(".".join(lst))
        if new != old or relisted:
            self.notes.append(f"config.json: {', '.join('.'.join(p) for p in keys)} "
                              f"{old} → {new}" + (f"; per-layer lists re-sliced: "
                                                 f"{', '.join(relisted)}" if relisted else ""))


def _promote(dtypes: Any) -> torch.dtype:
    out = None
    for d in dtypes:
        out = d if out is None else torch.promote_types(out, d)
    assert out is not None
    return out


def _donor_ref(recipe: Recipe) -> ModelReference:
    """The base model, else the first model the recipe names (never a set's order)."""
    if recipe.base_model is not None:
        return recipe.base_model
    for _, models, slices, _ in _recipe_levels(recipe):
        if models:
            return models[0].ref
        if slices:
            return slices[0].sources[0].ref
    raise MergeError("the recipe names no models")


def make_plan(recipe: Recipe, models: dict[ModelReference, ModelSource],
              options: PlanOptions | None = None) -> Plan:
    """Plan a merge. ``models`` maps every reference of the recipe to its resolved source."""
    options = options or PlanOptions()
    p = _Planner(recipe, models, options)
    _check_parameter_names(recipe, p.spec)
    p.check_architectures()
    donor = p.model_of(_donor_ref(recipe))
    donor_names = list(p.sources[donor].index.tensors)
    modules = p.modules_of(donor)
    p.plan_vocabulary(donor)
    p.plan_chat_template()
    if recipe.models is not None:
        p.plan_whole(p.whole(recipe.models, (), {}), donor, donor_names)
    elif recipe.slices is not None:
        if len(modules) > 1:
            names = ", ".join(modules)
            raise MergeError(f"{recipe.at('slices')}: '{p.refs[donor]}' has several modules "
                             f"({names}); layer slices must name the module they apply to: "
                             f"write 'modules: {{<module>: {{slices: ...}}}}' (modules not "
                             "named are copied from the base model)")
        module = next(iter(modules.values()))
        if module.stack is None:
            raise MergeError(f"{recipe.at('slices')}: '{p.refs[donor]}' has no numbered layers "
                             "to slice; use 'models:'")
        p.plan_slices(p.slices(recipe.slices, (), {}), donor, module)
    else:
        _plan_modules(p, recipe, donor, modules)
    config = p.output_config(donor)
    ordered = _processing_order(p, donor)
    _check_unique(ordered)
    shards = _layout(ordered, options.out_shard_size)
    return Plan(recipe, p.spec, p.sources, donor, ordered, shards, config, options, recipe.dtype,
                p.notes, p.warnings, p.layer_maps, p.vocab, p.generation_config, p.chat_template)


def _plan_modules(p: _Planner, recipe: Recipe, donor: int,
                  modules: dict[str, arch.Module]) -> None:
    """``modules:``: each named module merged on its own; the others copied from the donor."""
    assert recipe.modules is not None
    chosen: dict[str, arch.Module] = {}
    for name in recipe.modules:
        module = arch.find_module(modules, name)
        if module is None:
            raise MergeError(f"{recipe.at('modules', name)}: '{p.refs[donor]}' has no module "
                             f"'{name}'.{did_you_mean(name, modules)} Its modules: "
                             f"{', '.join(modules)}.")
        if module.name in chosen:
            raise MergeError(f"{recipe.at('modules', name)}: module '{module.name}' is named "
                             "twice")
        chosen[module.name] = module
    for name, spec in recipe.modules.items():
        module = arch.find_module(modules, name)
        path = ("modules", name)
        if spec.models is not None:
            p.plan_whole(p.whole(spec.models, path, spec.parameters), donor, module.tensors,
                         module.name)
        else:
            if module.stack is None:
                raise MergeError(f"{recipe.at(*path)}: module '{module.name}' has no numbered "
                                 "layers to slice; use 'models:' for it")
            p.plan_slices(p.slices(spec.slices, path, spec.parameters), donor, module)
    for module in modules.values():
        if module.name not in chosen:
            p.carry(module.tensors, donor, f"module '{module.name}' ({len(module.tensors)} "
                    f"tensors) is not in the recipe: copied from '{p.refs[donor]}'")


def _check_unique(outputs: list[OutputTensor]) -> None:
    seen: set[str] = set()
    for t in outputs:
        if t.name in seen:
            raise MergeError(f"two parts of the recipe both produce tensor '{t.name}'")
        seen.add(t.name)


def _processing_order(p: _Planner, donor: int) -> list[OutputTensor]:
    """Order outputs so that each input file is read front to back."""

    def key(t: OutputTensor) -> tuple:
        primary = next((i for i in t.inputs if i.model == donor), t.inputs[0])
        return (primary.model,) + p.sources[primary.model].index.order_key(primary.name)

    return sorted(p.outputs, key=key)


def _layout(tensors: list[OutputTensor], max_shard: int) -> list[Shard]:
    """Pack tensors into shards by size (greedy, in processing order) and fix their offsets."""
    groups: list[list[OutputTensor]] = []
    size = 0
    for t in tensors:
        if not groups or (groups[-1] and max_shard > 0 and size + t.nbytes > max_shard):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    shards = []
    n = len(groups)
    for i, group in enumerate(groups):
        filename = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        # widest dtypes first keeps every tensor aligned to its element size
        stored = sorted(group, key=lambda t: -t.dtype.itemsize)
        header, offsets = build_header([(t.name, t.dtype, t.shape) for t in stored],
                                       {"format": "pt"})
        for t, off in zip(stored, offsets):
            t.file, t.offset = filename, len(header) + off
            assert t.dtype in TORCH_TO_ST
        shards.append(Shard(filename, header, len(header) + sum(t.nbytes for t in group), stored))
    return shards

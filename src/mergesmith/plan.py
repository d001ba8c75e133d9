"""Recipe + model indexes → Plan: every output tensor with its inputs and resolved parameters,
and the output file layout. Pure and cheap: no tensor data is read.

Everything that can be wrong in a recipe (unknown parameters, wrong types, missing tensors,
shape mismatches, impossible layer ranges, contract violations) is found here, so a merge
that starts will not fail halfway for a reason the recipe could have told us.
"""

from __future__ import annotations

import copy
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


@dataclass
class PlanOptions:
    out_shard_size: int = DEFAULT_SHARD_SIZE
    compute_dtype: torch.dtype = torch.float32
    seed: int | None = None
    allow_crimes: bool = False


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
    sources: list[_Source]
    base: ModelReference | None
    params: dict[str, Setting]
    path: tuple


def referenced_models(recipe: Recipe) -> list[tuple[ModelReference, str]]:
    """Every model reference of a recipe, once, base first then recipe order, with its field."""
    refs: dict[ModelReference, str] = {}
    if recipe.base_model is not None:
        refs[recipe.base_model] = recipe.at("base_model")
    for i, m in enumerate(recipe.models or []):
        refs.setdefault(m.ref, recipe.at("models", i, "model"))
    for i, s in enumerate(recipe.slices or []):
        if s.base_model is not None:
            refs.setdefault(s.base_model, recipe.at("slices", i, "base_model"))
        for j, src in enumerate(s.sources):
            refs.setdefault(src.ref, recipe.at("slices", i, "sources", j, "model"))
    return list(refs.items())


def _unsupported(recipe: Recipe) -> None:
    if recipe.modules:
        raise MergeError(f"{recipe.at('modules')}: 'modules:' recipes are not supported yet; "
                         "use 'models:' or 'slices:'")
    if recipe.tokenizer is not None or recipe.tokenizer_source is not None:
        key = "tokenizer" if recipe.tokenizer is not None else "tokenizer_source"
        raise MergeError(f"{recipe.at(key)}: vocabulary merging ('{key}') is not supported "
                         "yet; remove it to copy the tokenizer of the base model")
    if recipe.chat_template is not None:
        raise MergeError(f"{recipe.at('chat_template')}: 'chat_template' is not supported yet; "
                         "remove it to keep the base model's template")


# ------------------------------------------------------------------ parameters


def _check_parameter_names(recipe: Recipe, spec: MethodSpec) -> None:
    """Every parameter name and literal value in the recipe must fit the method."""
    levels: list[tuple[tuple, dict[str, Setting], bool]] = [(("parameters",), recipe.parameters, False)]
    for i, m in enumerate(recipe.models or []):
        levels.append((("models", i, "parameters"), m.parameters, True))
    for i, s in enumerate(recipe.slices or []):
        levels.append((("slices", i, "parameters"), s.parameters, False))
        for j, src in enumerate(s.sources):
            levels.append((("slices", i, "sources", j, "parameters"), src.parameters, True))
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

    # -- normalisation -------------------------------------------------------

    def slices(self) -> list[_Slice]:
        r, spec = self.recipe, self.spec
        if r.models is not None:
            sources = [_Source(m.ref, None, m.parameters, ("models", i))
                       for i, m in enumerate(r.models)]
            base = r.base_model
            if base is not None and all(s.ref != base for s in sources):
                if spec.base is BasePolicy.FORBIDDEN:
                    self._forbidden_base(("base_model",))
                sources.append(_Source(base, None, {}, ("base_model",)))
            return [_Slice(sources, base, {}, ())]
        assert r.slices is not None
        out = []
        for i, s in enumerate(r.slices):
            sources = [_Source(src.ref, src.layer_range, src.parameters, ("slices", i, "sources", j))
                       for j, src in enumerate(s.sources)]
            out.append(_Slice(sources, s.base_model or r.base_model, s.parameters, ("slices", i)))
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
        shapes = {info.shape for info in infos}
        if len(shapes) > 1:
            listing = ", ".join(f"{src.ref}: {list(info.shape)}" for src, info in zip(sl.sources, infos))
            hint = ""
            if len({s[1:] for s in shapes}) == 1 and (arch.is_pre_layer(out_name)
                                                      or arch.is_output_head(out_name)):
                hint = (" The models have different vocabulary sizes; merging them needs "
                        "vocabulary alignment, which is not supported yet — use models with "
                        "the same tokenizer.")
            raise MergeError(f"tensor '{out_name}' has different shapes in the inputs "
                             f"({listing}).{hint}")
        shape = infos[0].shape
        if not all(info.dtype.is_floating_point for info in infos):
            self.outputs.append(OutputTensor(out_name, shape, infos[0].dtype, COPY,
                                             tuple(inputs), None, {}, tuple({} for _ in inputs),
                                             True))
            return
        params: dict[str, Any] = {}
        shared_levels = [sl.params, r.parameters]
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
        model_params = []
        for k, (src, inp) in enumerate(zip(sl.sources, inputs)):
            values: dict[str, Any] = {}
            for p in spec.params:
                if not p.per_model or (p.scope is Scope.NON_BASE and k == base_pos):
                    continue
                value = _lookup([src.params, sl.params, r.parameters], p.name, inp.name, t)
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
                                         spec.elementwise))

    @staticmethod
    def _coerce(value: Any, kind: type, name: str, tensor: str) -> Any:
        if value is None:
            return None
        try:
            return coerce(value, kind, name)
        except MergeError as e:
            raise MergeError(f"{e} (for tensor '{tensor}', after evaluating gradients)") from None

    # -- whole-model form ----------------------------------------------------

    def plan_models(self, sl: _Slice, donor: int) -> None:
        base_pos = self.check_contract(sl)
        names = self.sources[donor].index.tensors
        stacks = arch.layer_stacks(names)
        for name in names:
            self.add_output(name, sl, base_pos, [name] * len(sl.sources),
                            arch.gradient_position(name, stacks))
        for src in sl.sources:
            m = self.model_of(src.ref)
            extra = set(self.sources[m].index.tensors) - set(names)
            if extra and m != donor:
                shown = ", ".join(sorted(extra)[:3]) + (" ..." if len(extra) > 3 else "")
                self.warnings.append(f"{len(extra)} tensor(s) of '{src.ref}' are not in the "
                                     f"base model '{self.refs[donor]}' and are not merged: "
                                     f"{shown}")

    # -- slices form -----------------------------------------------------------

    def plan_slices(self, slices: list[_Slice], donor: int) -> list[int]:
        """Plan a layer-wise recipe; return, per output layer, the donor-side source layer."""
        prefix = self._layer_prefix(slices)
        contracts = [self.check_contract(sl) for sl in slices]
        for sl in slices:
            for src in sl.sources:
                count = arch.layer_stacks(self.sources[self.model_of(src.ref)].index.tensors)[prefix]
                start, end = src.layer_range or (0, 0)
                if end > count:
                    raise MergeError(f"{self.recipe.at(*src.path, 'layer_range')}: layer_range "
                                     f"[{start}, {end}] is past the end of '{src.ref}', which "
                                     f"has {count} layers (valid: 0 to {count})")
        donor_names = self.sources[donor].index.tensors
        loose = [n for n in donor_names if (arch.split_layer(n) or _NO_LAYER).prefix != prefix]
        pre = [n for n in loose if arch.is_pre_layer(n)]
        post = [n for n in loose if not arch.is_pre_layer(n)]
        for name in pre:
            self.add_output(name, slices[0], contracts[0], [name] * len(slices[0].sources), 0.0)
        layer_map: list[int] = []
        out_layer = 0
        for sl, base_pos in zip(slices, contracts):
            start0, end0 = sl.sources[0].layer_range or (0, 0)
            n = end0 - start0
            first_model = self.sources[self.model_of(sl.sources[0].ref)].index.tensors
            for i in range(n):
                t = 1.0 if n == 1 else i / (n - 1)
                rests = [layer.rest for name in first_model
                         if (layer := arch.split_layer(name)) and layer.prefix == prefix
                         and layer.index == start0 + i]
                for rest in rests:
                    in_names = [f"{prefix}.{(src.layer_range or (0, 0))[0] + i}.{rest}"
                                for src in sl.sources]
                    self.add_output(f"{prefix}.{out_layer}.{rest}", sl, base_pos, in_names, t)
                layer_map.append(start0 + i)
                out_layer += 1
        for name in post:
            self.add_output(name, slices[-1], contracts[-1], [name] * len(slices[-1].sources), 0.0)
        return layer_map

    def _layer_prefix(self, slices: list[_Slice]) -> str:
        prefixes: set[str] = set()
        for sl in slices:
            for src in sl.sources:
                stacks = arch.layer_stacks(self.sources[self.model_of(src.ref)].index.tensors)
                if len(stacks) != 1:
                    found = ", ".join(stacks) or "none"
                    raise MergeError(f"{self.recipe.at(*src.path)}: 'slices:' needs models with "
                                     f"one stack of layers; '{src.ref}' has {found} "
                                     "('modules:' recipes for multi-stack models are not "
                                     "supported yet)")
                prefixes |= set(stacks)
        if len(prefixes) != 1:
            raise MergeError(f"the models of the slices name their layers differently "
                             f"({', '.join(sorted(prefixes))}); they are different architectures")
        return prefixes.pop()

    # -- architecture and config -------------------------------------------

    def check_architectures(self) -> None:
        archs = {}
        for ref, src in zip(self.refs, self.sources):
            a = (src.config or {}).get("architectures")
            if a:
                archs.setdefault(tuple(a), ref)
        if len(archs) > 1 and not self.options.allow_crimes:
            listing = "; ".join(f"{ref}: {', '.join(a)}" for a, ref in archs.items())
            raise MergeError(f"the input models have different architectures ({listing}). "
                             "Merging them is usually a mistake; pass --allow-crimes to try "
                             "anyway (the base model's architecture is used)")

    def output_config(self, donor: int, layer_map: list[int] | None) -> dict[str, Any]:
        config = copy.deepcopy(self.sources[donor].config)
        if config is None:
            raise MergeError(f"model '{self.refs[donor]}' (the donor of the output config) has "
                             "no config.json; the merged model could not be loaded without one")
        out_dtype = self.recipe.out_dtype or self.recipe.dtype
        if out_dtype is not None:
            keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
            for k in keys:
                config[k] = dtype_name(out_dtype)
        if layer_map is not None:
            stacks = arch.layer_stacks(self.sources[donor].index.tensors)
            old = next(iter(stacks.values()))
            keys = arch.layer_count_keys(config, old)
            lists = arch.per_layer_lists(config, old)
            for path in keys:
                arch.set_path(config, path, len(layer_map))
            for path in lists:
                values = arch.get_path(config, path)
                arch.set_path(config, path, [values[i] for i in layer_map])
            if not keys:
                self.warnings.append(f"no layer-count key with value {old} found in "
                                     "config.json; the output config keeps the donor's count")
            elif len(layer_map) != old:
                self.notes.append(f"config.json: {', '.join('.'.join(p) for p in keys)} "
                                  f"{old} → {len(layer_map)}"
                                  + (f"; per-layer lists re-sliced: "
                                     f"{', '.join('.'.join(p) for p in lists)}" if lists else ""))
        return config


_NO_LAYER = arch.LayerName("", -1, "")


def _promote(dtypes: Any) -> torch.dtype:
    out = None
    for d in dtypes:
        out = d if out is None else torch.promote_types(out, d)
    assert out is not None
    return out


def make_plan(recipe: Recipe, models: dict[ModelReference, ModelSource],
              options: PlanOptions | None = None) -> Plan:
    """Plan a merge. ``models`` maps every reference of the recipe to its resolved source."""
    options = options or PlanOptions()
    _unsupported(recipe)
    p = _Planner(recipe, models, options)
    _check_parameter_names(recipe, p.spec)
    p.check_architectures()
    slices = p.slices()
    donor_ref = recipe.base_model or slices[0].sources[0].ref
    donor = p.model_of(donor_ref)
    if recipe.models is not None:
        p.plan_models(slices[0], donor)
        layer_map = None
    else:
        layer_map = p.plan_slices(slices, donor)
    config = p.output_config(donor, layer_map)
    ordered = _processing_order(p, donor)
    shards = _layout(ordered, options.out_shard_size)
    read_dtype = recipe.dtype
    return Plan(recipe, p.spec, p.sources, donor, ordered, shards, config, options, read_dtype,
                p.notes, p.warnings)


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

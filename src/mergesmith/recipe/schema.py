"""The recipe: mergekit's YAML format, validated strictly.

Structure (keys and their types) is checked by pydantic models with ``extra="forbid"``;
model references and parameter settings are then parsed by :mod:`.refs` and :mod:`.params`.
The result is a plain :class:`Recipe` the planner reads. Unknown keys, wrong types and
conflicting fields are :class:`~mergesmith.errors.MergeError` with the file, line and the
closest valid key.
"""

from __future__ import annotations

import os
import typing
import warnings
from dataclasses import dataclass, field
from typing import Literal, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, ValidationError

from .._torch import torch
from ..errors import MergeError, did_you_mean
from ..units import GGUF_QUANT_TYPES, parse_dtype
from .params import Setting, parse_setting
from .refs import ModelReference, parse_model_reference
from .yaml_positions import load_yaml

# ------------------------------------------------------------------ structure (pydantic)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _InputModel(_Strict):
    model: Any
    parameters: Optional[dict[str, Any]] = None


class _SliceSource(_Strict):
    model: Any
    layer_range: tuple[StrictInt, StrictInt]
    parameters: Optional[dict[str, Any]] = None


class _OutputSlice(_Strict):
    sources: list[_SliceSource]
    base_model: Any = None
    parameters: Optional[dict[str, Any]] = None
    residual_weight: Optional[float] = None


class _Module(_Strict):
    models: Optional[list[_InputModel]] = None
    slices: Optional[list[_OutputSlice]] = None
    parameters: Optional[dict[str, Any]] = None


class _TokenEmbedding(_Strict):
    source: Any = None
    force: bool = False


class _Tokenizer(_Strict):
    source: Any = "union"
    tokens: Optional[dict[str, _TokenEmbedding]] = None
    pad_to_multiple_of: Optional[int] = None


class _Evaluate(_Strict):
    text: Optional[str] = None
    jsonl: Optional[str] = None
    field: Optional[str] = None
    tasks: Optional[Union[list[str], str]] = None
    include_path: Optional[str] = None
    limit: Optional[StrictInt] = None
    parents: StrictBool = True
    max_length: Optional[StrictInt] = None
    max_tokens: Optional[StrictInt] = None
    batch_size: Optional[StrictInt] = None


class _Calibration(_Strict):
    text: Optional[str] = None
    jsonl: Optional[str] = None
    field: Optional[str] = None
    chat_template: StrictBool = False
    max_tokens: Optional[StrictInt] = None
    max_length: Optional[StrictInt] = None
    batch_size: Optional[StrictInt] = None
    seed: Optional[StrictInt] = None


class _Recipe(_Strict):
    merge_method: str
    base_model: Any = None
    models: Optional[list[_InputModel]] = None
    slices: Optional[list[_OutputSlice]] = None
    modules: Optional[dict[str, _Module]] = None
    parameters: Optional[dict[str, Any]] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer: Optional[_Tokenizer] = None
    tokenizer_source: Any = None
    chat_template: Optional[str] = None
    name: Optional[str] = None
    seed: Optional[StrictInt] = None
    output: Optional[Literal["model", "adapter"]] = None
    output_rank: Optional[StrictInt] = None
    evaluate: Optional[_Evaluate] = None
    calibration: Optional[_Calibration] = None
    strict: Optional[StrictBool] = None


_OWN_BLOCKS = {_Evaluate, _Calibration}
"""Blocks only mergesmith reads: unknown keys in them are errors, not ignored keys."""


# ------------------------------------------------------------------ the parsed recipe


@dataclass
class InputModel:
    """An entry of ``models:`` (a whole model)."""

    ref: ModelReference
    parameters: dict[str, Setting]
    where: str


@dataclass
class SliceSource:
    """One source of an output slice: ``layer_range`` of one model."""

    ref: ModelReference
    layer_range: tuple[int, int]
    parameters: dict[str, Setting]
    where: str


@dataclass
class OutputSlice:
    """An entry of ``slices:``: consecutive output layers merged from its sources."""

    sources: list[SliceSource]
    base_model: ModelReference | None
    parameters: dict[str, Setting]
    where: str


@dataclass(frozen=True)
class ZeroRow:
    """``{kind: zero}``: an all-zero embedding row."""


@dataclass(frozen=True)
class ModelRow:
    """A model's embedding row: of the same token, or of ``token``/``token_id`` if given."""

    model: ModelReference
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenOverride:
    """An entry of ``tokenizer.tokens``: where the token's embedding rows come from."""

    source: ZeroRow | ModelRow | None  # None: the usual rules (the token is just added)
    force: bool = False


@dataclass
class TokenizerRecipe:
    """``tokenizer:`` (or legacy ``tokenizer_source:``): the output vocabulary."""

    source: str | ModelReference  # "union", "base", or a model
    tokens: dict[str, TokenOverride]
    pad_to_multiple_of: int | None
    where: str


@dataclass
class ModuleRecipe:
    """An entry of ``modules:``: one module of a multi-module model, merged on its own."""

    name: str
    models: list[InputModel] | None
    slices: list[OutputSlice] | None
    parameters: dict[str, Setting]
    where: str


@dataclass
class EvaluateRecipe:
    """``evaluate:``: what ``mergesmith run`` evaluates once the merged folder is written.
    Paths are resolved like model paths (from the current folder)."""

    text: str | None = None
    jsonl: str | None = None
    field_name: str = "text"  # the key of 'jsonl' lines (the recipe's 'field:')
    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None
    limit: int | None = None
    parents: bool = True
    max_length: int | None = None
    max_tokens: int | None = None
    batch_size: int | None = None
    where: str = "evaluate"


@dataclass
class Recipe:
    """A validated recipe. ``text`` is the YAML as written (saved next to the merged model)."""

    merge_method: str
    base_model: ModelReference | None
    models: list[InputModel] | None
    slices: list[OutputSlice] | None
    parameters: dict[str, Setting]
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None
    seed: int | None = None
    gguf_type: str | None = None  # out_dtype q8_0, q4_0, ...: a GGUF block quantization
    name: str | None = None
    modules: dict[str, ModuleRecipe] | None = None
    tokenizer: TokenizerRecipe | None = None
    chat_template: str | None = None
    output: str = "model"  # or "adapter": LoRA inputs merged into a LoRA adapter
    output_rank: int | None = None
    evaluate: EvaluateRecipe | None = None
    calibration: Any = None
    """``calibration:``: a :class:`~mergesmith.statistics.calibration.CalibrationSettings`
    (the data data-aware methods run through the models), or None."""
    strict: bool = False
    text: str = ""
    source: str = "<recipe>"
    positions: dict[tuple, tuple[int, int]] = field(default_factory=dict, repr=False)
    ignored: list[str] = field(default_factory=list)
    """Warnings for what the recipe says that has no effect (mergekit ignores it too): keys
    that are not recipe keys, parameters the method does not take."""

    def at(self, *path: Any) -> str:
        """``models[1].parameters`` plus ``(recipe.yml:12)`` when the line is known."""
        text = _format_path(path)
        pos = None
        for n in range(len(path), 0, -1):
            pos = self.positions.get(tuple(path[:n]))
            if pos:
                break
        return f"{text} ({self.source}:{pos[0]})" if pos else text


def _format_path(path: typing.Sequence[Any]) -> str:
    out = ""
    for p in path:
        if not isinstance(p, int) and not str(p).isprintable():
            p = _quote(p)  # a user-written key with control characters
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "recipe"


# ------------------------------------------------------------------ loading


def load_recipe(source: Union[str, os.PathLike, dict, Recipe]) -> Recipe:
    """Read a recipe from a YAML file path, YAML text, or an already-parsed mapping."""
    if isinstance(source, Recipe):
        return source
    if isinstance(source, dict):
        import yaml

        return parse_recipe(source, yaml.safe_dump(source, sort_keys=False), "<recipe>", {})
    text_or_path = os.fspath(source)
    inline = text_or_path.lstrip().startswith("merge_method")
    data, text, name, positions = read_yaml_document(text_or_path, "recipe", inline)
    return parse_recipe(data, text, name, positions)


def read_yaml_document(text_or_path: str, kind: str, inline: bool = False
                       ) -> tuple[Any, str, str, dict]:
    """A YAML document given as a file path or as its text (several lines, or ``inline``):
    its data, text, name for messages and key positions. Missing or unreadable files are
    one-line errors naming the ``kind`` of document."""
    if "\n" not in text_or_path and not inline:
        path = os.path.expanduser(text_or_path)
        if not os.path.exists(path):
            raise MergeError(f"{kind} file not found: {text_or_path}")
        if os.path.isdir(path):
            raise MergeError(f"{kind} path {text_or_path} is a folder; give the YAML file")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise MergeError(f"cannot read {kind} {text_or_path}: {e}") from None
        name = text_or_path
    else:
        text, name = text_or_path, f"<{kind}>"
    data, positions = load_yaml(text, name)
    return data, text, name, positions


def parse_recipe(data: Any, text: str, source: str, positions: dict) -> Recipe:
    """Validate the YAML data of a recipe and build a :class:`Recipe`."""
    if not isinstance(data, dict):
        raise MergeError(f"{source}: a recipe is a YAML mapping starting with "
                         f"'merge_method: ...', got {type(data).__name__}")
    ignored: list[str] = []
    try:
        raw = _Recipe.model_validate(_drop_ignored_keys(data, _Recipe, (), ignored, source,
                                                        positions))
    except ValidationError:
        try:  # explain with the ignored keys in place: "modle" is why "model" is missing
            _Recipe.model_validate(data)
        except ValidationError as e:
            raise MergeError(_explain(e, source, positions)) from None
        raise

    r = Recipe(merge_method=raw.merge_method, base_model=None, models=None, slices=None,
               parameters={}, dtype=None, out_dtype=None, text=text, source=source,
               positions=positions, ignored=ignored, strict=bool(raw.strict))

    given = [k for k in ("models", "slices", "modules") if getattr(raw, k)]
    if len(given) != 1:
        what = "none of them" if not given else " and ".join(given)
        raise MergeError(f"{source}: give exactly one of 'models', 'slices' or 'modules' "
                         f"(found {what})")
    if raw.tokenizer is not None and raw.tokenizer_source is not None:
        raise MergeError(f"{r.at('tokenizer_source')}: 'tokenizer_source' and 'tokenizer' "
                         "cannot be used together; move the source into "
                         "'tokenizer: {source: ...}'")

    if raw.base_model is not None:
        r.base_model = parse_model_reference(raw.base_model, r.at("base_model"))
    r.parameters = _settings(raw.parameters, r, ("parameters",))
    if raw.models:
        r.models = _models(raw.models, r, ("models",))
    if raw.slices:
        r.slices = [_slice(s, r, ("slices", i)) for i, s in enumerate(raw.slices)]
    if raw.modules:
        r.modules = {name: _module(name, m, r) for name, m in raw.modules.items()}
    r.dtype = parse_dtype(raw.dtype, r.at("dtype")) if raw.dtype else None
    if raw.out_dtype and str(raw.out_dtype).strip().lower() in GGUF_QUANT_TYPES:
        r.gguf_type = str(raw.out_dtype).strip().lower()  # planned with the GGUF output
    else:
        r.out_dtype = (parse_dtype(raw.out_dtype, r.at("out_dtype"), output=True)
                       if raw.out_dtype else None)
    r.seed = raw.seed
    r.name = raw.name
    if raw.tokenizer is not None:
        r.tokenizer = _tokenizer(raw.tokenizer, r)
    elif raw.tokenizer_source is not None:
        r.tokenizer = TokenizerRecipe(_vocab_source(raw.tokenizer_source, r.at("tokenizer_source")),
                                      {}, None, r.at("tokenizer_source"))
    r.chat_template = raw.chat_template
    r.output = raw.output or "model"
    if raw.output_rank is not None:
        if raw.output_rank < 1:
            raise MergeError(f"{r.at('output_rank')}: output_rank must be at least 1")
        if r.output != "adapter":
            raise MergeError(f"{r.at('output_rank')}: output_rank applies only with "
                             "'output: adapter'")
    r.output_rank = raw.output_rank
    if raw.evaluate is not None:
        r.evaluate = _evaluate(raw.evaluate, r)
    if raw.calibration is not None:
        r.calibration = _calibration(raw.calibration, r.at("calibration"),
                                     lambda key: r.at("calibration", key))
    return r


def parse_calibration_block(data: Any, where: str = "calibration") -> Any:
    """A ``calibration:`` mapping (YAML data) → CalibrationSettings, validated like the
    recipe's block (used by the API and by ``mergesmith stats --calibration``)."""
    if isinstance(data, dict) and "calibration" in data and len(data) == 1:
        data = data["calibration"]
    try:
        raw = _Calibration.model_validate(data)
    except ValidationError as e:
        raise MergeError(_explain(e, where, {}, _Calibration)) from None
    return _calibration(raw, where, lambda key: f"{where}.{key}")


def _calibration(c: _Calibration, where: str, at: Any) -> Any:
    from ..statistics.calibration import (
        DEFAULT_BATCH_SIZE,
        DEFAULT_MAX_LENGTH,
        DEFAULT_MAX_TOKENS,
        CalibrationSettings,
    )

    if (c.text is None) == (c.jsonl is None):
        raise MergeError(f"{where}: give exactly one of 'text: FILE' or 'jsonl: FILE'")
    if c.field is not None and c.jsonl is None:
        raise MergeError(f"{at('field')}: 'field' names the JSON key of 'jsonl' lines; "
                         "it needs 'jsonl'")
    if c.chat_template and c.jsonl is None:
        raise MergeError(f"{at('chat_template')}: 'chat_template' applies to 'jsonl' rows "
                         "with a list of messages")
    for key, least in (("max_length", 2), ("max_tokens", 2), ("batch_size", 1), ("seed", 0)):
        value = getattr(c, key)
        if value is not None and value < least:
            raise MergeError(f"{at(key)}: must be at least {least} (got {value})")
    for key in ("text", "jsonl", "field"):
        if getattr(c, key) == "":
            raise MergeError(f"{at(key)}: empty")
    return CalibrationSettings(
        text=c.text, jsonl=c.jsonl, field_name=c.field, chat_template=c.chat_template,
        max_tokens=c.max_tokens or DEFAULT_MAX_TOKENS,
        max_length=c.max_length or DEFAULT_MAX_LENGTH,
        batch_size=c.batch_size or DEFAULT_BATCH_SIZE,
        seed=c.seed if c.seed is not None else 0, where=where)


def _evaluate(e: _Evaluate, r: Recipe) -> EvaluateRecipe:
    def at(*key: str) -> str:
        return r.at("evaluate", *key)

    if e.text is not None and e.jsonl is not None:
        raise MergeError(f"{at('jsonl')}: give 'text' or 'jsonl', not both")
    if e.field is not None and e.jsonl is None:
        raise MergeError(f"{at('field')}: 'field' names the JSON key of 'jsonl' lines; "
                         "it needs 'jsonl'")
    tasks = e.tasks if isinstance(e.tasks, list) else (
        [t.strip() for t in e.tasks.split(",")] if e.tasks else [])
    if any(not t for t in tasks):
        raise MergeError(f"{at('tasks')}: empty task name")
    if e.text is None and e.jsonl is None and not tasks:
        raise MergeError(f"{at()}: nothing to evaluate; give 'text' (or 'jsonl') for "
                         "perplexity and KL against the inputs, and/or 'tasks' (lm-eval)")
    for key in ("include_path", "limit"):
        if getattr(e, key) is not None and not tasks:
            raise MergeError(f"{at(key)}: '{key}' applies to 'tasks', and there are none")
    for key, least in (("limit", 1), ("max_length", 2), ("max_tokens", 2), ("batch_size", 1)):
        value = getattr(e, key)
        if value is not None and value < least:
            raise MergeError(f"{at(key)}: must be at least {least} (got {value})")
    for key in ("text", "jsonl", "include_path", "field"):
        if getattr(e, key) == "":
            raise MergeError(f"{at(key)}: empty")
    return EvaluateRecipe(e.text, e.jsonl, e.field or "text", tasks, e.include_path, e.limit,
                          e.parents, e.max_length, e.max_tokens, e.batch_size, at())


def _vocab_source(value: Any, where: str) -> str | ModelReference:
    if value in ("union", "base"):
        return value
    if isinstance(value, str) and value.startswith("model:"):  # older mergekit's syntax
        value = value.removeprefix("model:")
    return parse_model_reference(value, where)


def _tokenizer(t: _Tokenizer, r: Recipe) -> TokenizerRecipe:
    tokens = {}
    for token, entry in (t.tokens or {}).items():
        where = r.at("tokenizer", "tokens", token, "source")
        tokens[token] = TokenOverride(_token_source(entry.source, where), entry.force)
    pad = t.pad_to_multiple_of
    if pad is not None and pad < 1:
        raise MergeError(f"{r.at('tokenizer', 'pad_to_multiple_of')}: must be a positive integer")
    return TokenizerRecipe(_vocab_source(t.source, r.at("tokenizer", "source")), tokens, pad,
                           r.at("tokenizer"))


def _token_source(value: Any, where: str) -> ZeroRow | ModelRow | None:
    if isinstance(value, dict) and "kind" in value:
        kind = value.get("kind")
        allowed = {"zero": {"kind"}, "model_token": {"kind", "model", "token", "token_id"}}
        if kind not in allowed:
            raise MergeError(f"{where}: unknown token source kind {kind!r} (use 'zero' or "
                             "'model_token')")
        unknown = set(value) - allowed[kind]
        if unknown:
            raise MergeError(f"{where}: unknown key {sorted(map(repr, map(str, unknown)))[0]} for kind {kind} "
                             f"(allowed: {', '.join(sorted(allowed[kind]))})")
        if kind == "zero":
            return ZeroRow()
        if ("token" in value) == ("token_id" in value):
            raise MergeError(f"{where}: give exactly one of 'token' or 'token_id'")
        token_id = value.get("token_id")
        if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool)
                                     or token_id < 0):
            raise MergeError(f"{where}.token_id: expected a non-negative integer")
        if "model" not in value:
            raise MergeError(f"{where}: model_token needs 'model'")
        return ModelRow(parse_model_reference(value["model"], f"{where}.model"),
                        value.get("token"), token_id)
    if value is None:
        return None
    return ModelRow(parse_model_reference(value, where))


def _models(models: list[_InputModel], r: Recipe, path: tuple) -> list[InputModel]:
    return [InputModel(parse_model_reference(m.model, r.at(*path, i, "model")),
                       _settings(m.parameters, r, (*path, i, "parameters")),
                       _format_path((*path, i)))
            for i, m in enumerate(models)]


def _module(name: str, m: _Module, r: Recipe) -> ModuleRecipe:
    path = ("modules", name)
    if bool(m.models) == bool(m.slices):
        raise MergeError(f"{r.at(*path)}: module {_quote(name)} needs exactly one of 'models' "
                         "or 'slices'")
    return ModuleRecipe(
        name,
        _models(m.models, r, (*path, "models")) if m.models else None,
        [_slice(s, r, (*path, "slices", i)) for i, s in enumerate(m.slices)] if m.slices else None,
        _settings(m.parameters, r, (*path, "parameters")),
        _format_path(path),
    )


def _slice(s: _OutputSlice, r: Recipe, path: tuple) -> OutputSlice:
    if not s.sources:
        raise MergeError(f"{r.at(*path, 'sources')}: an output slice needs at least one source")
    if s.residual_weight is not None:
        warnings.warn(f"{r.at(*path, 'residual_weight')}: 'residual_weight' is ignored "
                      "(mergekit ignores it too)", stacklevel=2)
    sources = []
    for j, src in enumerate(s.sources):
        start, end = src.layer_range
        where = r.at(*path, "sources", j, "layer_range")
        if start < 0 or end <= start:
            raise MergeError(f"{where}: layer_range [{start}, {end}] is empty or negative; "
                             "write [start, end) with 0 <= start < end")
        sources.append(SliceSource(
            parse_model_reference(src.model, r.at(*path, "sources", j, "model")),
            (start, end),
            _settings(src.parameters, r, (*path, "sources", j, "parameters")),
            _format_path((*path, "sources", j)),
        ))
    lengths = {src.layer_range[1] - src.layer_range[0] for src in sources}
    if len(lengths) > 1:
        ranges = ", ".join(f"{src.ref} {list(src.layer_range)}" for src in sources)
        raise MergeError(f"{r.at(*path)}: all sources of a slice must span the same number of "
                         f"layers; got {ranges}")
    base = (parse_model_reference(s.base_model, r.at(*path, "base_model"))
            if s.base_model is not None else None)
    return OutputSlice(sources, base, _settings(s.parameters, r, (*path, "parameters")),
                       _format_path(path))


def _settings(raw: dict[str, Any] | None, r: Recipe, path: tuple) -> dict[str, Setting]:
    return {name: parse_setting(value, r.at(*path, name), r.ignored)
            for name, value in (raw or {}).items()}


# ------------------------------------------------------------------ keys mergekit ignores

_MOVE_TO_PARAMETERS = "Move it under 'parameters:' to apply it."
_KEY_HINTS = {
    "merge_method": "A slice cannot choose its own method; the top-level 'merge_method' "
                    "applies to every slice.",
    "revision": "Write the revision into the model reference: 'org/name@REVISION'.",
}


def _drop_ignored_keys(data: Any, model: Any, path: tuple, ignored: list[str], source: str,
                       positions: dict) -> Any:
    """``data`` without the keys the recipe's schema does not know (mergekit ignores them
    as well), each reported in ``ignored`` with where it is and the likely fix."""
    if not isinstance(data, dict) or model in _OWN_BLOCKS:
        return data
    out = {}
    for key, value in data.items():
        info = model.model_fields.get(key) if isinstance(key, str) else None
        if info is None:
            ignored.append(_ignored_key_message(key, model, path, source, positions))
            continue
        inner = _inner_model(info.annotation)
        if inner is not None and isinstance(value, list):
            value = [_drop_ignored_keys(v, inner, (*path, key, i), ignored, source, positions)
                     for i, v in enumerate(value)]
        elif inner is not None and isinstance(value, dict) and _is_mapping_of(info.annotation):
            value = {k: _drop_ignored_keys(v, inner, (*path, key, k), ignored, source,
                                           positions) for k, v in value.items()}
        elif inner is not None:
            value = _drop_ignored_keys(value, inner, (*path, key), ignored, source, positions)
        out[key] = value
    return out


def _is_mapping_of(annotation: Any) -> bool:
    """``dict[str, Model]`` (modules, tokens), as opposed to a model itself."""
    if typing.get_origin(annotation) is dict:
        return True
    return any(_is_mapping_of(a) for a in typing.get_args(annotation))


def _ignored_key_message(key: Any, model: Any, path: tuple, source: str,
                         positions: dict) -> str:
    from ..methods import all_methods

    pos = positions.get((*path, key)) or positions.get(path)
    where = (f"{_format_path((*path, key))} ({source}:{pos[0]}:{pos[1]})" if pos
             else _format_path((*path, key)))
    allowed = sorted(model.model_fields)
    hint = _KEY_HINTS.get(key, "")
    parameters = {p.name for spec in all_methods().values() for p in spec.params}
    if not hint and key in parameters and "parameters" in model.model_fields:
        hint = _MOVE_TO_PARAMETERS
    if not hint:
        hint = did_you_mean(str(key), allowed).strip()
    return (f"{where}: unknown key {_quote(key)} has no effect (mergekit ignores it too)."
            + (f" {hint}" if hint else ""))


# ------------------------------------------------------------------ pydantic errors → one line


def _explain(err: ValidationError, source: str, positions: dict, root: Any = None) -> str:
    # A misspelled key also makes the real key "missing": explain the misspelling first.
    e = sorted(err.errors(), key=lambda x: x["type"] != "extra_forbidden")[0]
    loc = tuple(e["loc"])
    kind = e["type"]

    def at(path: tuple) -> str:
        for n in range(len(path), 0, -1):
            pos = positions.get(tuple(path[:n]))
            if pos:
                return f"{source}:{pos[0]}:{pos[1]}"
        return source

    if kind == "extra_forbidden":
        key, parent = loc[-1], loc[:-1]
        allowed = sorted(_fields_at(parent, root))
        where = _format_path(parent) if parent else "the top level"
        return (f"{at(loc)}: unknown key {_quote(key)} in {where}.{did_you_mean(key, allowed)} "
                f"Allowed keys: {', '.join(allowed)}.")
    if kind == "missing":
        key, parent = loc[-1], loc[:-1]
        where = _format_path(parent) if parent else "the recipe"
        hint = " (for example 'merge_method: task_arithmetic')" if key == "merge_method" else ""
        return f"{at(parent)}: {where} is missing the required key '{key}'{hint}"
    value = e.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return f"{at(loc)}: {_format_path(loc)}: {e['msg'].lower()} (got {shown})"


def _quote(key: object) -> str:
    """A user-written key in a message: quoted, control characters escaped."""
    text = repr(str(key))
    return text if text.startswith("'") else f"'{text[1:-1]}'"


def _fields_at(loc: tuple, root: Any = None) -> set[str]:
    """Valid keys of the pydantic model found by following ``loc`` from the recipe root
    (or from ``root``, another strict schema such as the MoE config's)."""
    model: Any = root or _Recipe
    for part in loc:
        if isinstance(part, int) or part not in model.model_fields:
            continue  # a list index or a key of a free-form mapping (module name, token)
        model = _inner_model(model.model_fields[part].annotation)
        if model is None:
            return set()
    return set(model.model_fields) if model is not None else set()


def _inner_model(ann: Any) -> Any:
    """Find the pydantic model inside ``Optional[list[Model]]``/``dict[str, Model]``."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None

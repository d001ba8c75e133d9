"""The mergekit-moe YAML (unchanged keys), parsed like recipes: wrong types are one line
naming the key and its line; unknown keys, which mergekit-moe ignores, are warnings that
name the key, its line and the likely fix."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import MergeError
from ..recipe.refs import ModelReference, parse_model_reference
from ..recipe.schema import _drop_ignored_keys, _explain, _format_path, read_yaml_document
from ..units import parse_dtype

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random",
              "uniform_random")
PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")
"""Gate modes computed from the experts' prompts (they need positive prompts)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Expert(_Strict):
    source_model: Any
    positive_prompts: Optional[list[str]] = None
    negative_prompts: Optional[list[str]] = None
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None


class _MoEConfig(_Strict):
    base_model: Any
    experts: list[_Expert]
    gate_mode: Literal[GATE_MODES] = "hidden"  # type: ignore[valid-type]
    dtype: Optional[str] = None
    experts_per_token: int = 2
    shared_experts: Optional[list[_Expert]] = None
    architecture: Optional[str] = None


@dataclass(frozen=True)
class Expert:
    model: ModelReference
    positive_prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    noise_scale: float | None
    residual_scale: float | None
    where: str  # "experts[2] (moe.yml:14)"


@dataclass
class MoEConfig:
    base_model: ModelReference
    experts: list[Expert]
    shared_experts: list[Expert]
    gate_mode: str
    dtype: torch.dtype | None
    experts_per_token: int
    architecture: str | None
    text: str = ""
    source: str = "<moe config>"
    positions: dict = field(default_factory=dict, repr=False)

    def at(self, *path: Any) -> str:
        """``experts[1].positive_prompts (moe.yml:12)``: a place in the config."""
        for n in range(len(path), 0, -1):
            pos = self.positions.get(tuple(path[:n]))
            if pos:
                return f"{_format_path(path)} ({self.source}:{pos[0]})"
        return _format_path(path)


def load_moe_config(source: str | os.PathLike | dict | MoEConfig) -> MoEConfig:
    """Read a mergekit-moe config from a file, YAML text or a mapping."""
    if isinstance(source, MoEConfig):
        return source
    if isinstance(source, dict):
        import yaml

        return parse_moe_config(source, yaml.safe_dump(source, sort_keys=False),
                                "<moe config>", {})
    data, body, name, positions = read_yaml_document(os.fspath(source), "MoE config")
    return parse_moe_config(data, body, name, positions)


def parse_moe_config(data: Any, text: str, source: str, positions: dict) -> MoEConfig:
    if not isinstance(data, dict):
        raise MergeError(f"{source}: an MoE config is a YAML mapping with 'base_model' and "
                         f"'experts', got {type(data).__name__}")
    ignored: list[str] = []  # keys mergekit-moe ignores: warnings, as in recipes
    kept = _drop_ignored_keys(data, _MoEConfig, (), ignored, source, positions)
    try:
        raw = _MoEConfig.model_validate(kept)
    except ValidationError as e:
        raise MergeError(_explain(e, source, positions, _MoEConfig)) from None
    for message in ignored:
        warnings.warn(message, stacklevel=2)
    try:
        return _checked(raw, text, source, positions)
    except MergeError as e:  # e.g. prompts "missing" because their key is misspelled
        if not ignored:
            raise
        raise MergeError(f"{e}. Perhaps because of: {ignored[0]}") from None


def _checked(raw: _MoEConfig, text: str, source: str, positions: dict) -> MoEConfig:
    c = MoEConfig(base_model=None, experts=[], shared_experts=[],  # type: ignore[arg-type]
                  gate_mode=raw.gate_mode, dtype=None,
                  experts_per_token=raw.experts_per_token, architecture=raw.architecture,
                  text=text, source=source, positions=positions)
    c.base_model = parse_model_reference(raw.base_model, c.at("base_model"))
    if raw.dtype is not None:
        c.dtype = parse_dtype(raw.dtype, c.at("dtype"))

    def expert(e: _Expert, key: str, i: int) -> Expert:
        where = c.at(key, i)
        return Expert(parse_model_reference(e.source_model, c.at(key, i, "source_model")),
                      tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ()),
                      e.noise_scale, e.residual_scale, where)

    c.experts = [expert(e, "experts", i) for i, e in enumerate(raw.experts)]
    c.shared_experts = [expert(e, "shared_experts", i)
                        for i, e in enumerate(raw.shared_experts or [])]
    if not c.experts:
        raise MergeError(f"{c.at('experts')}: give at least one expert")
    n = len(c.experts)
    if not 1 <= c.experts_per_token <= n:
        raise MergeError(f"{c.at('experts_per_token')}: experts_per_token is "
                         f"{c.experts_per_token}, but there are {n} expert(s); it must be "
                         f"between 1 and {n}")
    if c.gate_mode in PROMPT_MODES:
        for e in c.experts:  # an empty string is a prompt (BOS alone), as for mergekit-moe
            if not e.positive_prompts:
                raise MergeError(f"{e.where}: gate_mode '{c.gate_mode}' routes by the "
                                 "experts' prompts, and this expert has no positive_prompts "
                                 "(give some, or use gate_mode: random)")
        prompts = {(e.positive_prompts, e.negative_prompts) for e in c.experts}
        if len(c.experts) > 1 and len(prompts) == 1:  # mergekit-moe refuses this
            warnings.warn(f"{c.at('experts')}: every expert has the same prompts, so the "
                          "routers cannot tell the experts apart (mergekit-moe refuses such "
                          "a config; give each expert its own prompts)", stacklevel=3)
    return c

"""In-memory merging: ``merge_tensors`` and ``merge_state_dicts`` (no files, no recipe).

The same methods, parameter typing, input contracts and per-tensor random generators as a
recipe merge, for tensors a program already holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import MergeError, did_you_mean
from ..recipe.params import coerce
from .registry import REQUIRED, BasePolicy, MergeInputs, MethodSpec, Scope, get_method


def tensor_seed(seed: int | None, name: str, rows: tuple[int, int] | None = None) -> int:
    """Stable 63-bit seed from (seed, tensor name, row chunk) — never Python's ``hash()``.

    Without a seed, random methods use seed 0: a merge is reproducible by default.
    """
    h = hashlib.blake2b(f"{seed or 0}\0{name}\0{rows}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def tensor_generator(seed: int | None, name: str, device: torch.device | str = "cpu",
                     rows: tuple[int, int] | None = None) -> torch.Generator:
    """The generator a random method draws from for one output tensor."""
    g = torch.Generator(device=device)
    g.manual_seed(tensor_seed(seed, name, rows))
    return g


def check_contract(spec: MethodSpec, n_inputs: int, base_index: int | None) -> None:
    """Base policy and input counts of a method (the base counts as an input)."""
    if spec.base is BasePolicy.REQUIRED and base_index is None:
        raise MergeError(f"merge method '{spec.name}' needs a base model (base_index)")
    if spec.base is BasePolicy.FORBIDDEN and base_index is not None:
        raise MergeError(f"merge method '{spec.name}' takes no base model")
    if n_inputs < spec.min_inputs or (spec.max_inputs is not None and n_inputs > spec.max_inputs):
        raise MergeError(f"merge method '{spec.name}' takes {spec.min_inputs}"
                         f"{'+' if spec.max_inputs is None else f' to {spec.max_inputs}'} "
                         f"inputs, got {n_inputs}")
    if spec.base in (BasePolicy.REQUIRED, BasePolicy.OPTIONAL):
        others = n_inputs - (base_index is not None)
        if others < spec.min_non_base or (spec.max_non_base is not None
                                          and others > spec.max_non_base):
            raise MergeError(f"merge method '{spec.name}' takes {spec.min_non_base}"
                             f"{'+' if spec.max_non_base is None else f' to {spec.max_non_base}'}"
                             f" non-base inputs, got {others}")


def resolve_parameters(spec: MethodSpec, parameters: Mapping[str, Any], n_inputs: int,
                       base_index: int | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Typed shared parameters and per-input parameter dicts from an API-style mapping.

    Per-model values may be a scalar (broadcast), a sequence aligned with the inputs, or —
    for parameters that skip the base — a sequence over the non-base inputs only.
    """
    known = [p.name for p in spec.params]
    for name in parameters:
        if name not in known:
            raise MergeError(f"unknown parameter '{name}' for merge method '{spec.name}'."
                             f"{did_you_mean(name, known)} '{spec.name}' takes: "
                             f"{spec.describe_params()}.")
    effective_base = None if spec.base in (BasePolicy.IGNORED, BasePolicy.FORBIDDEN) else base_index
    shared: dict[str, Any] = {}
    per_input: list[dict[str, Any]] = [{} for _ in range(n_inputs)]
    non_base = [i for i in range(n_inputs) if i != effective_base]
    for p in spec.params:
        value = parameters.get(p.name, p.default)
        if not p.per_model:
            if p.required and p.name not in parameters:
                raise MergeError(f"merge method '{spec.name}' needs the parameter '{p.name}'")
            shared[p.name] = None if value is None else coerce(value, p.type, p.name)
            continue
        targets = non_base if p.scope is Scope.NON_BASE else list(range(n_inputs))
        if isinstance(value, (list, tuple)):
            if len(value) == n_inputs:
                values = {i: value[i] for i in targets}
            elif len(value) == len(targets):
                values = dict(zip(targets, value))
            else:
                raise MergeError(f"parameter '{p.name}' has {len(value)} values for "
                                 f"{len(targets)} inputs")
        else:
            values = {i: value for i in targets}
        for i, v in values.items():
            if v is REQUIRED or (v is None and p.required):
                raise MergeError(f"merge method '{spec.name}' needs the parameter "
                                 f"'{p.name}' for input {i}")
            per_input[i][p.name] = None if v is None else coerce(v, p.type, p.name)
    return shared, per_input


def merge_tensors(tensors: Sequence[torch.Tensor], method: str,
                  parameters: Mapping[str, Any] | None = None, *, base_index: int | None = None,
                  seed: int | None = None, name: str = "tensor",
                  compute_dtype: torch.dtype = torch.float32,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Merge same-shaped tensors with a registered method, as a recipe merge would.

    Inputs are upcast to ``compute_dtype`` (float32; float64 inputs stay float64) and the
    result is rounded once to ``out_dtype`` (default: the inputs' promoted dtype).

    >>> merge_tensors([base, ft], "task_arithmetic", {"weight": 0.5}, base_index=0)
    """
    spec = get_method(method, "method")
    tensors = list(tensors)
    if not tensors:
        raise MergeError("merge_tensors needs at least one tensor")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise MergeError(f"tensors to merge have different shapes: {sorted(shapes)}")
    if base_index is not None and not 0 <= base_index < len(tensors):
        raise MergeError(f"base_index {base_index} is out of range for {len(tensors)} tensors")
    check_contract(spec, len(tensors), base_index)
    shared, per_input = resolve_parameters(spec, parameters or {}, len(tensors), base_index)
    effective_base = None if spec.base in (BasePolicy.IGNORED, BasePolicy.FORBIDDEN) else base_index
    if spec.check is not None:
        spec.check(name, shared, per_input, effective_base)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    compute = torch.promote_types(compute_dtype, dtype)
    xs = [t.detach().to(dtype=compute).clone() for t in tensors]  # methods may work in place
    generator = tensor_generator(seed, name, xs[0].device) if spec.random else None
    result = spec.fn(MergeInputs(xs, effective_base, shared, per_input, name, generator))
    return result.to(out_dtype or dtype)


def merge_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]], method: str,
                      parameters: Mapping[str, Any] | None = None, *,
                      base_index: int | None = None, seed: int | None = None,
                      compute_dtype: torch.dtype = torch.float32,
                      out_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Merge whole state dicts key by key (all must have the same keys and shapes).

    Non-floating tensors (buffers) must be equal in every input and are copied.
    """
    if not state_dicts:
        raise MergeError("merge_state_dicts needs at least one state dict")
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))
            raise MergeError(f"state dict {i} has different keys from state dict 0 "
                             f"(e.g. {diff[:3]})")
    out = {}
    for key in keys:
        values = [sd[key] for sd in state_dicts]
        if not all(v.is_floating_point() for v in values):
            if not all(torch.equal(values[0], v) for v in values[1:]):
                raise MergeError(f"non-floating tensor '{key}' differs between the inputs")
            out[key] = values[0].clone()
            continue
        out[key] = merge_tensors(values, method, parameters, base_index=base_index, seed=seed,
                                 name=key, compute_dtype=compute_dtype, out_dtype=out_dtype)
    return out

"""In-memory merging: ``merge_tensors`` and ``merge_state_dicts`` (no files, no recipe).

The same methods, parameter typing, input contracts and per-tensor random generators as a
recipe merge, for tensors a program already holds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._torch import torch
from ..errors import MergeError
from .contract import bind_mapping
from .registry import get_method


def merge_tensors(tensors: Sequence[torch.Tensor], method: str,
                  parameters: Mapping[str, Any] | None = None, *, base_index: int | None = None,
                  seed: int | None = None, name: str = "tensor",
                  compute_dtype: torch.dtype = torch.float32,
                  out_dtype: torch.dtype | None = None, depth: float = 0.0) -> torch.Tensor:
    """Merge same-shaped tensors with a registered method, as a recipe merge would.

    Inputs are upcast to ``compute_dtype`` (float32; float64 inputs stay float64) and the
    result is rounded once to ``out_dtype`` (default: the inputs' promoted dtype).
    ``depth`` (0 at the embeddings, 1 at the head) is where the tensor sits in the model,
    for parameters that change with depth (LiNeS).

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
    bound, resolved = bind_mapping(spec, parameters or {}, len(tensors), base_index,
                                   tensor_name=name, depth=depth)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    compute = torch.promote_types(compute_dtype, dtype)
    xs = [t.detach().to(dtype=compute).clone() for t in tensors]  # methods may work in place
    result = bound(xs, resolved.params, resolved.model_params, tensor_name=name,
                   compute_dtype=compute, generator=bound.generator(seed, name, xs[0].device))
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

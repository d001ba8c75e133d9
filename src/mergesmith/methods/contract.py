"""A merge method bound to the inputs of one merge: the one place that checks a method's
input contract, resolves its parameters and calls it.

The planner (recipes), the executor (every path: element-wise blocks, raw and lazy inputs,
vocabulary rows, accelerators), adapter merging and the in-memory API
(``merge_tensors``) all go through :class:`BoundMethod`, so a rule written here holds
everywhere: the base policy and input counts, the parameter precedence and typing, the
extensions' effect on parameters (LiNeS, SVC), the compute dtype and the per-tensor
generator.

Where parameter values come from differs (a recipe's levels with gradients and filters, or
a plain mapping): that is a :class:`ParameterLookup`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .._torch import torch
from ..errors import MergeError, did_you_mean
from ..recipe.params import UNSET, coerce
from .registry import BasePolicy, MergeInputs, MethodSpec, Param, Scope
from .seeding import tensor_generator


class ParameterLookup(Protocol):
    """Where the values of one output tensor's parameters come from.

    ``shared(name)`` and ``model(k, name)`` return the value given for the whole tensor or
    for input ``k``, or ``UNSET``; the error methods word a problem for the user (naming
    the recipe field or the API argument)."""

    def shared(self, name: str) -> Any: ...

    def model(self, k: int, name: str) -> Any: ...

    def missing(self, param: Param, k: int | None) -> MergeError: ...

    def invalid(self, error: MergeError, param: Param, k: int | None) -> MergeError: ...


@dataclass(frozen=True)
class Resolved:
    """Typed parameter values of one output tensor: shared, and one dict per input."""

    params: dict[str, Any]
    model_params: tuple[dict[str, Any], ...]


def _want(lo: int, hi: int | None) -> str:
    return f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"


@dataclass(frozen=True)
class BoundMethod:
    """A method and the position of its base among the inputs as the math sees it
    (``None`` when the method has no base, or ignores it)."""

    spec: MethodSpec
    base_index: int | None

    @classmethod
    def bind(cls, spec: MethodSpec, n_inputs: int, base_index: int | None, *,
             base_named: bool | None = None, where: str = "",
             base_hint: str = "") -> BoundMethod:
        """Check the input contract; ``base_index`` is the base's position among the
        inputs, ``base_named`` whether a base was named at all (it may be missing from
        the inputs); ``where`` prefixes messages (a recipe field), ``base_hint`` says how
        to name a base."""
        c, name = spec.contract, spec.name
        prefix = f"{where}: " if where else ""
        named = base_index is not None if base_named is None else base_named
        if c.base is BasePolicy.REQUIRED and not named:
            raise MergeError(f"merge method '{name}' needs a base model{base_hint}")
        if c.base is BasePolicy.REQUIRED and base_index is None:
            raise MergeError(f"{prefix}the base model must be one of the inputs of '{name}'")
        if c.base is BasePolicy.FORBIDDEN and base_index is not None and n_inputs > 1:
            raise MergeError(f"{prefix}merge method '{name}' takes exactly one model and no "
                             "base model; remove the base model (use the model itself as the "
                             "only input)")
        if n_inputs < c.min_inputs or (c.max_inputs is not None and n_inputs > c.max_inputs):
            base_note = " (the base model counts)" if named else ""
            raise MergeError(f"{prefix}merge method '{name}' takes "
                             f"{_want(c.min_inputs, c.max_inputs)} input model(s){base_note}, "
                             f"got {n_inputs}")
        if c.base in (BasePolicy.IGNORED, BasePolicy.FORBIDDEN):
            return cls(spec, None)
        others = n_inputs - (base_index is not None)
        if others < c.min_non_base or (c.max_non_base is not None and others > c.max_non_base):
            raise MergeError(f"{prefix}merge method '{name}' takes "
                             f"{_want(c.min_non_base, c.max_non_base)} model(s) besides the "
                             f"base model, got {others}")
        return cls(spec, base_index)

    # -- parameters ------------------------------------------------------------

    def resolve(self, lookup: ParameterLookup, n_inputs: int, tensor_name: str,
                depth: float) -> Resolved:
        """Every declared parameter for one output tensor: the value found by ``lookup``
        or the default, typed; then the extensions' adjustments (``depth``: 0 at the
        embeddings, 1 at the head) and the method's own check."""
        spec = self.spec
        shared = {p.name: self._value(lookup, p, None)
                  for p in spec.params if not p.per_model}
        for extension in spec.extensions:
            if extension.adjust is not None:
                extension.adjust(shared, depth)
        per_input = []
        for k in range(n_inputs):
            per_input.append({p.name: self._value(lookup, p, k) for p in spec.params
                              if p.per_model and not (p.scope is Scope.NON_BASE
                                                      and k == self.base_index)})
        if spec.check is not None:
            spec.check(tensor_name, shared, per_input, self.base_index)
        return Resolved(shared, tuple(per_input))

    @staticmethod
    def _value(lookup: ParameterLookup, p: Param, k: int | None) -> Any:
        value = lookup.shared(p.name) if k is None else lookup.model(k, p.name)
        if value is UNSET:
            if p.required:
                raise lookup.missing(p, k)
            value = p.default
        if value is None:
            return None
        try:
            return coerce(value, p.type, p.name)
        except MergeError as e:
            raise lookup.invalid(e, p, k) from None

    def whole_tensors(self, params: Mapping[str, Any],
                      shape: tuple[int, ...] | None = None) -> bool:
        """Whether this tensor needs whole tensors (not row chunks) with these parameters
        (and this shape: a method with a streamed ``statistic`` takes row chunks where its
        blocks fit the shape)."""
        how = self.spec.scheduling
        chunked = how.elementwise or (how.statistic is not None and shape is not None
                                      and how.statistic.rows(tuple(shape)) > 0)
        return not chunked or any(
            e.whole_tensor is not None and e.whole_tensor(params) for e in self.spec.extensions)

    # -- the call ----------------------------------------------------------------

    def generator(self, seed: int | None, tensor_name: str,
                  device: torch.device | str = "cpu",
                  rows: tuple[int, int] | None = None) -> torch.Generator | None:
        """The per-tensor generator of a random method (None for the others)."""
        if not self.spec.scheduling.random:
            return None
        return tensor_generator(seed, tensor_name, device, rows)

    def __call__(self, tensors: Sequence[torch.Tensor], params: Mapping[str, Any],
                 model_params: Sequence[Mapping[str, Any]], *, tensor_name: str,
                 compute_dtype: torch.dtype, generator: torch.Generator | None = None,
                 statistics: Sequence[Any] | None = None, statistic: Any = None,
                 rows: tuple[int, int] | None = None,
                 tensor_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Run the method on one tensor (or row chunk). ``tensors`` are in recipe order,
        upcast to ``compute_dtype`` except for ``raw_inputs`` methods, which get them as
        stored and upcast pieces themselves. ``statistics``: one entry per input for
        data-aware methods (see ``MergeInputs.statistics``); ``statistic``, ``rows`` and
        ``tensor_shape``: see :class:`MergeInputs`."""
        return self.spec.fn(MergeInputs(
            tensors=tensors,
            base_index=self.base_index, params=params, model_params=list(model_params),
            tensor_name=tensor_name, generator=generator, compute_dtype=compute_dtype,
            statistics=statistics, statistic=statistic, rows=rows, tensor_shape=tensor_shape))


class MappingLookup:
    """Parameters given as one mapping (the in-memory API): a per-model value may be a
    scalar (every input), a sequence over all inputs, or one over the non-base inputs."""

    def __init__(self, bound: BoundMethod, parameters: Mapping[str, Any], n_inputs: int,
                 where: str) -> None:
        spec = bound.spec
        known = [p.name for p in spec.params]
        for name in parameters:
            if name not in known:
                raise MergeError(f"{where}: unknown parameter '{name}' for merge method "
                                 f"'{spec.name}'.{did_you_mean(name, known)} '{spec.name}' "
                                 f"takes: {spec.describe_params()}.")
        self.spec, self.where, self.parameters = spec, where, parameters
        self.per_input: dict[str, dict[int, Any]] = {}
        non_base = [i for i in range(n_inputs) if i != bound.base_index]
        for p in spec.params:
            if not p.per_model or p.name not in parameters:
                continue
            targets = non_base if p.scope is Scope.NON_BASE else list(range(n_inputs))
            value = parameters[p.name]
            if not isinstance(value, (list, tuple)):
                self.per_input[p.name] = {i: value for i in targets}
            elif len(value) == n_inputs:
                self.per_input[p.name] = {i: value[i] for i in targets}
            elif len(value) == len(targets):
                self.per_input[p.name] = dict(zip(targets, value))
            else:
                raise MergeError(f"{where}: parameter '{p.name}' has {len(value)} values for "
                                 f"{len(targets)} inputs")

    def shared(self, name: str) -> Any:
        return self.parameters.get(name, UNSET)

    def model(self, k: int, name: str) -> Any:
        return self.per_input.get(name, {}).get(k, UNSET)

    def missing(self, param: Param, k: int | None) -> MergeError:
        who = "" if k is None else f" for input {k}"
        return MergeError(f"{self.where}: merge method '{self.spec.name}' needs the parameter "
                          f"'{param.name}'{who}")

    def invalid(self, error: MergeError, param: Param, k: int | None) -> MergeError:
        return MergeError(f"{self.where}: {error}")


def bind_mapping(spec: MethodSpec, parameters: Mapping[str, Any], n_inputs: int,
                 base_index: int | None, *, tensor_name: str = "tensor",
                 depth: float = 0.0) -> tuple[BoundMethod, Resolved]:
    """Bind a method to ``n_inputs`` in-memory tensors and resolve ``parameters`` (a plain
    mapping) for one of them: what ``merge_tensors`` does before the call."""
    bound = BoundMethod.bind(spec, n_inputs, base_index, base_hint=" (base_index)")
    lookup = MappingLookup(bound, parameters, n_inputs, f"tensor '{tensor_name}'")
    return bound, bound.resolve(lookup, n_inputs, tensor_name, depth)

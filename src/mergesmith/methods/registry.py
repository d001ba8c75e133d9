"""The method registry: how a merge method declares itself.

A merge method is a pure function ``fn(inputs: MergeInputs) -> Tensor`` registered with
:func:`merge_method`, which declares its parameters (name, type, default, scope) and its
input contract (base required/optional/ignored/forbidden, how many inputs). The planner
uses the declaration to validate recipes and resolve parameters; ``mergesmith methods``
and the docs are generated from it. Third-party packages register methods by exposing a
module (or a :class:`MethodSpec`) in the ``mergesmith.methods`` entry-point group.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._torch import torch
from ..errors import MergeError, did_you_mean

if TYPE_CHECKING:
    from .linalg import DenseWork


class Scope(str, enum.Enum):
    """Who a parameter's value belongs to."""

    SHARED = "shared"  # one value per output tensor (mergekit's "global" parameters)
    INPUT = "input"  # one value per input model, the base included
    NON_BASE = "non_base"  # one value per input model other than the base


class BasePolicy(str, enum.Enum):
    """What a method does with ``base_model``."""

    REQUIRED = "required"  # task-vector methods: the base is input 0 of the math
    OPTIONAL = "optional"
    IGNORED = "ignored"  # a configured base is just another input
    FORBIDDEN = "forbidden"


REQUIRED = object()
"""Default marker of a parameter the recipe must give."""


@dataclass(frozen=True)
class Param:
    """A declared parameter of a merge method."""

    name: str
    type: type = float
    default: Any = REQUIRED
    scope: Scope = Scope.SHARED
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def per_model(self) -> bool:
        return self.scope is not Scope.SHARED

    def describe(self) -> str:
        kind = {float: "number", bool: "boolean", int: "integer",
                str: "string"}.get(self.type, self.type.__name__)
        who = "per model" if self.per_model else "per tensor"
        shown = {True: "true", False: "false", None: "unset"}.get(self.default, self.default) \
            if isinstance(self.default, (bool, type(None))) else self.default
        default = "required" if self.required else f"default {shown}"
        return f"{self.name} ({kind}, {who}, {default})"


@dataclass
class MergeInputs:
    """What a method function receives for one output tensor (or one chunk of its rows).

    ``tensors`` are in recipe order in the compute dtype; ``model_params[i]`` holds the
    per-model parameters of ``tensors[i]``; ``params`` the shared ones.
    """

    tensors: list[torch.Tensor]
    base_index: int | None
    params: Mapping[str, Any]
    model_params: list[Mapping[str, Any]]
    tensor_name: str = ""
    generator: torch.Generator | None = None
    compute_dtype: torch.dtype = torch.float32
    """Methods declared with ``raw_inputs`` get ``tensors`` in their stored dtype and
    upcast (piece by piece) to this. Built only by
    :meth:`mergesmith.methods.contract.BoundMethod.__call__`."""
    statistic: Any = None
    """Methods declared with a ``statistic`` (:class:`TensorStatistic`): its value for the
    whole tensor when the engine merges row chunks; None when the method gets whole
    tensors (it computes the statistic itself)."""
    rows: tuple[int, int] | None = None
    """The rows of the whole tensor these inputs are (None: all of it)."""
    tensor_shape: tuple[int, ...] | None = None
    """The whole tensor's shape when ``rows`` are given (None: the inputs' own shape)."""
    statistics: Sequence[Any] | None = None
    """Methods declared with ``statistics`` (data-aware: RegMean, Fisher): one entry per
    input, in recipe order, with ``gram()``, ``fisher()`` and ``tokens()`` reading that
    input tensor's statistics (``fisher()`` of this chunk's rows), or ``None`` for the
    whole list when the tensor has none (the method then falls back, e.g. to an average;
    the planner decides and checks which tensors have them)."""

    @property
    def base(self) -> torch.Tensor:
        if self.base_index is None:
            raise ValueError("this merge has no base tensor")
        return self.tensors[self.base_index]

    def others(self) -> list[tuple[torch.Tensor, Mapping[str, Any]]]:
        """Non-base inputs with their per-model parameters, in recipe order."""
        return [(t, p) for i, (t, p) in enumerate(zip(self.tensors, self.model_params))
                if i != self.base_index]

    def task_vectors(self, base: torch.Tensor | None = None):
        """``(τᵢ = xᵢ − base, params)`` of the non-base inputs, one at a time: with
        ``lazy_inputs`` each input is read only when its turn comes, so a pass over the
        experts holds one of them at a time. Call again for another pass."""
        base = self.base if base is None else base
        for i, p in enumerate(self.model_params):
            if i != self.base_index:
                yield torch.sub(self.tensors[i], base), p

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensors' shape, without reading a lazy input."""
        known = getattr(self.tensors, "shape", None)
        return tuple(known) if known is not None else tuple(self.tensors[0].shape)

    @property
    def n_tasks(self) -> int:
        return len(self.model_params) - (self.base_index is not None)


MethodFn = Callable[[MergeInputs], "torch.Tensor"]
CheckFn = Callable[[str, Mapping[str, Any], Sequence[Mapping[str, Any]], "int | None"], None]
ComputeFn = Callable[[str, tuple[int, ...], int, Mapping[str, Any]], "DenseWork"]
AdjustFn = Callable[[dict[str, Any], float], None]


@dataclass(frozen=True, kw_only=True)
class Contract:
    """What a method accepts: the base policy and how many inputs (the base counts)."""

    base: BasePolicy = BasePolicy.IGNORED
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int = 0
    max_non_base: int | None = None


@dataclass(frozen=True)
class TensorStatistic:
    """What a method needs from the whole tensor before it can merge any row (SLERP's
    norms and dot product, the TIES threshold, DARE's draws); given it, rows merge alone.

    The engine streams the inputs in blocks of ``rows(shape)`` rows, in order, through
    ``state = accumulate(state, block)`` (``block`` a :class:`MergeInputs` of those rows:
    ``block.rows``, ``block.tensor_shape``, the tensor's own generator; its ``tensors``
    are read when indexed) starting from ``state = None``, then calls
    ``finish(state, header)`` (``header``: the same without tensors). ``finish`` returns
    the statistic — handed to every row chunk as ``MergeInputs.statistic`` — or
    :class:`AnotherPass` to stream the blocks once more. ``rows(shape)``: rows per block
    (at most: see ``row_multiple``); 0: this shape is merged whole (the method computes it
    itself).
    The result must be bit-identical to the whole tensor's: sums run over the method's
    own fixed pieces, whatever the blocks."""

    rows: Callable[[tuple[int, ...]], int]
    accumulate: Callable[[Any, "MergeInputs"], Any]
    finish: Callable[[Any, "MergeInputs"], Any]
    row_multiple: Callable[[tuple[int, ...]], int] | None = None
    """Blocks must be whole multiples of this many rows (the method sums over pieces of
    that size); None: any rows. The engine takes fewer rows than ``rows(shape)`` for
    many inputs, so that a block's data does not grow with the number of models."""
    raw_inputs: bool = False
    """``accumulate`` gets the blocks as read (rounded to the recipe's ``dtype``), not
    upcast to the compute dtype: a statistic that converts small pieces itself (to
    float64: SLERP's dot products) skips a float32 copy of every block."""


@dataclass(frozen=True)
class AnotherPass:
    """Returned by ``TensorStatistic.finish``: stream the blocks again, from ``state``."""

    state: Any


@dataclass(frozen=True, kw_only=True)
class Scheduling:
    """How the engine feeds the method (see :func:`merge_method` for each field)."""

    elementwise: bool = False
    raw_inputs: bool = False
    lazy_inputs: bool = False
    random: bool = False
    temp_buffers: float = 2.0
    statistics: frozenset[str] = frozenset()
    """Statistics the method reads besides the weights (``gram``, ``fisher``)."""
    statistic: TensorStatistic | None = None
    """A whole-tensor statistic streamed in a first pass (then row chunks, see above)."""


@dataclass(frozen=True, kw_only=True)
class Cost:
    """What ``check`` needs to estimate the method's time."""

    seconds_per_gb: float = 1.0
    compute: ComputeFn | None = None


@dataclass(frozen=True, kw_only=True)
class Docs:
    """Text for ``mergesmith methods``, docs/methods.md and model cards."""

    summary: str = ""
    description: str = ""
    reference: str = ""
    differences: str = ""


@dataclass(frozen=True, kw_only=True)
class Extension:
    """A group of parameters several methods opt into, with what it does to the plan of a
    tensor: ``adjust(params, depth)`` rewrites the shared parameters of one output tensor
    (``depth`` 0 at the embeddings, 1 at the head); ``whole_tensor(params)`` says when the
    method then needs whole tensors instead of row chunks."""

    name: str
    params: tuple[Param, ...]
    adjust: AdjustFn | None = None
    whole_tensor: Callable[[Mapping[str, Any]], bool] | None = None


def _lines_adjust(params: dict[str, Any], depth: float) -> None:
    params["lambda"] = params.get("lambda", 1.0) * (
        params["lines_alpha"] + params["lines_beta"] * depth)


LINES = Extension(
    name="LiNeS",
    params=(
        Param("lines_alpha", float, 1.0, doc="LiNeS (arXiv 2410.17146): the task vector's "
              "scale at the first layer (and the embeddings); multiplies lambda"),
        Param("lines_beta", float, 0.0, doc="LiNeS: added to the scale linearly with depth, "
              "reaching lines_alpha + lines_beta at the last layer (and the head)"),
    ),
    adjust=_lines_adjust,
)
"""Layer-increasing scaling of task vectors: ``lambda`` times ``alpha + beta·depth``."""

SVC = Extension(
    name="SVC",
    params=(
        Param("svc", bool, False, doc="Singular-Value Calibration (arXiv 2602.05536) of every "
              "merged weight matrix: directions the tasks share are scaled back from their "
              "sum"),
        Param("svc_alpha", float, 1.0, doc="SVC: floor α of the per-task ratios"),
    ),
    whole_tensor=lambda params: bool(params.get("svc")),
)
"""Post-hoc calibration of merged matrices (whole matrices: turns off row chunks)."""


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """A registered merge method: its math and its declaration, in named parts so that a
    new field cannot shift the others."""

    name: str
    fn: MethodFn
    params: tuple[Param, ...] = ()
    """Every parameter, the extensions' included (``merge_method`` appends them)."""
    extensions: tuple[Extension, ...] = ()
    contract: Contract = Contract()
    scheduling: Scheduling = Scheduling()
    cost: Cost = Cost()
    docs: Docs = Docs()
    check: CheckFn | None = None
    """``check(tensor_name, params, model_params, base_index)``: validates resolved
    parameters at plan time; raises MergeError."""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def describe_params(self) -> str:
        return ", ".join(p.describe() for p in self.params) or "no parameters"


_REGISTRY: dict[str, MethodSpec] = {}
_ENTRY_POINTS_LOADED = False
_INTERNAL: dict[str, MethodSpec] = {}


def register_internal(spec: MethodSpec) -> MethodSpec:
    """A method that plans made by mergesmith itself use (e.g. MoE expert stacking): not a
    recipe's ``merge_method``, not listed."""
    _INTERNAL[spec.name] = spec
    return spec


def internal_method(name: str) -> MethodSpec | None:
    return _INTERNAL.get(name)


def register(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Add a method to the registry (``replace`` to override an existing name)."""
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name].fn is not spec.fn:
        raise ValueError(f"merge method '{spec.name}' is already registered")
    names = [p.name for p in spec.params]
    if len(set(names)) != len(names):
        raise ValueError(f"merge method '{spec.name}' declares a parameter twice")
    _REGISTRY[spec.name] = spec
    return spec


def merge_method(name: str, *, params: Sequence[Param] = (),
                 extensions: Sequence[Extension] = (), base: BasePolicy = BasePolicy.IGNORED,
                 min_inputs: int = 1, max_inputs: int | None = None, min_non_base: int = 0,
                 max_non_base: int | None = None, elementwise: bool = False,
                 random: bool = False, temp_buffers: float = 2.0, reference: str = "",
                 differences: str = "", check: CheckFn | None = None,
                 raw_inputs: bool = False, seconds_per_gb: float = 1.0,
                 lazy_inputs: bool = False, compute: ComputeFn | None = None,
                 statistics: Sequence[str] = (), statistic: TensorStatistic | None = None,
                 replace: bool = False) -> Callable[[MethodFn], MethodFn]:
    """Decorator registering ``fn(inputs: MergeInputs) -> Tensor`` as merge method ``name``.

    * ``base``, ``min_inputs``/``max_inputs`` (the base included) and
      ``min_non_base``/``max_non_base``: the input contract, checked at plan time.
    * ``extensions``: parameter groups the method takes (:data:`LINES`, :data:`SVC`); the
      engine applies their effect on the parameters, the method sees the result.
    * ``elementwise``: the method may be applied to row chunks of a tensor (bounded memory);
      otherwise it receives whole tensors.
    * ``random``: ``inputs.generator`` is a per-tensor generator seeded from (seed, name).
    * ``temp_buffers``: how many tensor-sized compute buffers the method needs besides its
      inputs (the scheduler's memory estimate).
    * ``raw_inputs``: the method receives whole tensors in their stored dtype (bf16: half
      the memory of float32 copies) and upcasts pieces to ``inputs.compute_dtype`` itself;
      it must not change its inputs.
    * ``lazy_inputs``: ``inputs.tensors[i]`` reads input ``i`` when indexed (a fresh copy in
      the compute dtype each time): methods that pass over the experts one at a time keep
      memory independent of their number (see ``MergeInputs.task_vectors``).
    * ``seconds_per_gb``: wall seconds per GB of input on the reference machine (2 CPU
      cores, inputs in the page cache) for ``check``'s time estimate: the cost of streaming
      the inputs through the method's element-wise work.
    * ``compute(tensor_name, shape, n_tasks, params)``: the dense linear algebra (SVDs,
      eigendecompositions, large products) one output tensor needs, as a
      :class:`~mergesmith.methods.linalg.DenseWork`; ``check`` reports it and adds it to
      the time estimate. For methods whose cost is not proportional to bytes.
    * ``check(tensor_name, params, model_params, base_index)``: validates resolved parameters
      at plan time (before any data is read); raise MergeError.
    * ``statistics``: kinds of calibration statistics the method reads (``"gram"``,
      ``"fisher"``): the planner finds every input model's statistics artefact, checks which
      tensors have them, and the engine hands them over as ``inputs.statistics``.
    * ``statistic``: a :class:`TensorStatistic` — the method is not element-wise, but only
      because of a few whole-tensor numbers: the engine computes them in a streaming first
      pass and merges row chunks (bounded memory) with them (``inputs.statistic``).
    * ``differences``: where the method knowingly differs from mergekit (for the docs).

    The docstring's first paragraph is the summary shown by ``mergesmith methods``; the rest
    goes into the generated documentation.
    """

    def wrap(fn: MethodFn) -> MethodFn:
        doc = inspect.cleandoc(fn.__doc__ or "")
        summary, _, description = doc.partition("\n\n")
        register(MethodSpec(
            name=name, fn=fn,
            params=(*params, *(p for e in extensions for p in e.params)),
            extensions=tuple(extensions),
            contract=Contract(base=base, min_inputs=min_inputs, max_inputs=max_inputs,
                              min_non_base=min_non_base, max_non_base=max_non_base),
            scheduling=Scheduling(elementwise=elementwise, raw_inputs=raw_inputs,
                                  lazy_inputs=lazy_inputs, random=random,
                                  temp_buffers=temp_buffers,
                                  statistics=frozenset(statistics), statistic=statistic),
            cost=Cost(seconds_per_gb=seconds_per_gb, compute=compute),
            docs=Docs(summary=summary.replace("\n", " "), description=description.strip(),
                      reference=reference, differences=inspect.cleandoc(differences)),
            check=check), replace=replace)
        return fn

    return wrap


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="mergesmith.methods"):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not break the built-in methods
            import warnings

            warnings.warn(f"could not load merge method plugin '{ep.name}' ({ep.value}): {e}",
                          stacklevel=2)
            continue
        if isinstance(obj, MethodSpec):
            register(obj, replace=True)


def all_methods() -> dict[str, MethodSpec]:
    """Every registered method, built-in and from plugins, by name."""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str, where: str = "merge_method") -> MethodSpec:
    """Look a method up by name; unknown names raise with the closest names."""
    _load_entry_points()
    spec = _REGISTRY.get(name)
    if spec is None:
        methods = all_methods()
        raise MergeError(f"{where}: unknown merge method '{name}'.{did_you_mean(name, methods)} "
                         f"Available: {', '.join(methods)}.")
    return spec

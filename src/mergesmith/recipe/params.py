"""Parameter settings: scalars, gradients and filtered lists, and their evaluation per tensor.

A setting is what a recipe writes for one parameter name:

* a scalar (number, boolean or string such as ``"0.5"``),
* a gradient ``[v0, v1, ...]`` interpolated over the layers of a slice,
* a list of conditional entries ``[{filter: "mlp", value: ...}, {value: ...}]``
  (a single unwrapped ``{filter, value}`` mapping is accepted too).

Evaluation follows mergekit: the first entry whose filter matches the tensor name wins
(substring match; missing filter or ``"*"`` matches all; ``re:`` prefix = regular expression,
our extension), and an unmatched list falls through to the next precedence level.

Three filter words are keywords for the parts of a mixture-of-experts layer, not substrings
(our extension): ``experts`` (routed experts only, not shared ones), ``router`` and
``shared_expert`` (see :func:`mergesmith.arch.moe_role`). A recipe that means the substring
writes ``re:experts``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Union

from ..arch import MOE_ROLES, moe_role
from ..errors import MergeError

Scalar = Union[bool, int, float, str]


@dataclass(frozen=True)
class Gradient:
    """Values interpolated over ``t`` in [0, 1] (numbers) or stepped (booleans, strings)."""

    values: tuple[Scalar, ...]

    def at(self, t: float) -> Scalar:
        n = len(self.values)
        if n == 1:
            return self.values[0]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.values)
        if not numeric:  # booleans and strings: step function, as mergekit 0.1.5
            return self.values[min(int(t * (n - 1)), n - 1)]
        s = t * (n - 1)
        i = min(int(math.floor(s)), n - 1)
        j = min(i + 1, n - 1)
        frac = s - i
        a, b = float(self.values[i]), float(self.values[j])
        return a * (1.0 - frac) + b * frac


@dataclass(frozen=True)
class Conditional:
    """One entry of a filtered list: applies when ``filter`` matches the tensor name."""

    filter: str | None
    value: Scalar | Gradient

    def matches(self, tensor_name: str) -> bool:
        f = self.filter
        if f is None or f == "*":
            return True
        if f.startswith("re:"):
            return _regex(f[3:]).search(tensor_name) is not None
        if f in MOE_ROLES:
            return moe_role(tensor_name) == f
        return f in tensor_name


Setting = Union[Scalar, Gradient, tuple[Conditional, ...]]

UNSET = object()
"""Returned by :func:`evaluate` when no conditional entry matches (fall through)."""


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _scalar(value: Any, where: str) -> Scalar:
    if isinstance(value, (bool, int, float, str)):
        return value
    raise MergeError(f"{where}: expected a number, boolean or list of numbers, "
                     f"got {type(value).__name__} {value!r}")


def _value(value: Any, where: str) -> Scalar | Gradient:
    if isinstance(value, list):
        if not value:
            raise MergeError(f"{where}: empty list; give a value or a non-empty gradient")
        return Gradient(tuple(_scalar(v, f"{where}[{i}]") for i, v in enumerate(value)))
    return _scalar(value, where)


def parse_setting(value: Any, where: str, ignored: list[str] | None = None) -> Setting:
    """Turn the YAML value of one parameter into a :data:`Setting` (structure only; types
    later). Keys of filtered entries other than ``filter``/``value`` are errors, or, with
    ``ignored``, warnings appended to it (mergekit ignores them)."""
    if isinstance(value, dict):
        return (_conditional(value, where, ignored),)
    if isinstance(value, list) and value and any(isinstance(v, dict) for v in value):
        return tuple(_conditional(v, f"{where}[{i}]", ignored) for i, v in enumerate(value))
    return _value(value, where)


def _conditional(entry: Any, where: str, ignored: list[str] | None = None) -> Conditional:
    if not isinstance(entry, dict):
        raise MergeError(f"{where}: a filtered list must contain only {{filter, value}} "
                         f"entries, got {entry!r}")
    unknown = set(entry) - {"filter", "value"}
    if unknown:
        from ..errors import did_you_mean

        key = sorted(map(str, unknown))[0]
        hint = (" Write 'filter:' to restrict it (older mergekit examples wrote 'pattern:')."
                if key == "pattern" else did_you_mean(key, ['filter', 'value']))
        if ignored is None:
            raise MergeError(f"{where}: unknown key {str(key)!r} in a filtered entry (allowed: "
                             f"filter, value).{hint}")
        effect = (", so the entry applies to every tensor" if "filter" not in entry else "")
        ignored.append(f"{where}: unknown key {str(key)!r} in a filtered entry has no effect "
                       f"(mergekit ignores it too){effect}.{hint}")
    if "value" not in entry:
        raise MergeError(f"{where}: filtered entry needs a 'value'")
    flt = entry.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise MergeError(f"{where}.filter: expected a string, got {flt!r}")
    if flt is not None and flt.startswith("re:"):
        try:
            _regex(flt[3:])
        except re.error as e:
            raise MergeError(f"{where}.filter: invalid regular expression '{flt[3:]}': {e}") from None
    return Conditional(flt, _value(entry["value"], f"{where}.value"))


def evaluate(setting: Setting, tensor_name: str, t: float) -> Any:
    """Value of a setting for one tensor at gradient position ``t``, or :data:`UNSET`."""
    if isinstance(setting, tuple):
        for cond in setting:
            if cond.matches(tensor_name):
                return cond.value.at(t) if isinstance(cond.value, Gradient) else cond.value
        return UNSET
    if isinstance(setting, Gradient):
        return setting.at(t)
    return setting


def leaf_values(setting: Setting) -> list[Scalar]:
    """Every literal value in a setting (used to type-check a recipe before planning)."""
    out: list[Scalar] = []
    items = setting if isinstance(setting, tuple) else (setting,)
    for item in items:
        v = item.value if isinstance(item, Conditional) else item
        out.extend(v.values if isinstance(v, Gradient) else (v,))
    return out


# ---------------------------------------------------------------------------- typing

_TRUE = {"true", "yes", "on", "1", "t", "y"}
_FALSE = {"false", "no", "off", "0", "f", "n"}


def coerce(value: Any, kind: type, name: str) -> Any:
    """Convert a raw recipe value to the parameter's type (float, bool or int), or raise.

    Follows mergekit 0.1.5's lax typing: numeric strings are numbers, ``true`` is 1.0 for a
    float parameter, booleans accept ``1``/``0``/``"false"`` but not ``0.5``, integers accept
    ``10.0`` but not ``10.5``.
    """
    if kind is float:
        if isinstance(value, bool):
            return 1.0 if value else 0.0
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise MergeError(f"parameter '{name}' expects a number, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise MergeError(f"parameter '{name}' expects a boolean (true/false), got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise MergeError(f"parameter '{name}' expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.strip())
            except ValueError:
                f = math.nan
            if f.is_integer():
                return int(f)
        raise MergeError(f"parameter '{name}' expects an integer, got {value!r}")
    if kind is str:  # paths (e.g. a statistics artefact): taken as written
        if isinstance(value, str) and value.strip():
            return value
        raise MergeError(f"parameter '{name}' expects a path or name (a string), got {value!r}")
    raise TypeError(f"unsupported parameter type {kind!r}")

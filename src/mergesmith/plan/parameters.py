"""Parameters in a recipe: names and literal types checked up front, and the one precedence
rule for values (a model's own ``parameters``, then its slice's, its module's, the top
level's; gradients and filters evaluated for the tensor at hand)."""

from __future__ import annotations

from typing import Any

from ..errors import MergeError, did_you_mean
from ..methods import MethodSpec, Param
from ..recipe import Recipe, Setting, coerce, evaluate
from ..recipe.params import UNSET, leaf_values
from .recipe_view import Slice, recipe_levels

_NO_EFFECT_HINTS = {
    ("slerp", "weight"): "slerp interpolates with 't'; use 't'.",
    ("nuslerp", "geodesic"): "nuslerp has no 'geodesic' switch; 'nuslerp_flatten' and "
                             "'nuslerp_row_wise' choose how it interpolates.",
}


def check_parameter_names(recipe: Recipe, spec: MethodSpec) -> list[str]:
    """Every parameter in the recipe must fit the method. Literal values of its parameters
    must have their types (an error, as in mergekit). Names the method does not take, and
    per-tensor parameters given to one model, have no effect (mergekit ignores them too):
    one warning each, returned."""
    levels: list[tuple[tuple, dict[str, Setting], bool]] = []
    for path, models, slices, params in recipe_levels(recipe):
        levels.append(((*path, "parameters"), params, False))
        for i, m in enumerate(models or []):
            levels.append(((*path, "models", i, "parameters"), m.parameters, True))
        for i, s in enumerate(slices or []):
            levels.append(((*path, "slices", i, "parameters"), s.parameters, False))
            for j, src in enumerate(s.sources):
                levels.append(((*path, "slices", i, "sources", j, "parameters"),
                               src.parameters, True))
    known = [p.name for p in spec.params]
    ignored = []
    for path, settings, model_level in levels:
        for name, setting in settings.items():
            param = spec.param(name)
            if param is None:
                hint = _NO_EFFECT_HINTS.get((spec.name, name)) or \
                    did_you_mean(name, known).strip() or f"'{spec.name}' takes: " \
                    f"{', '.join(known) or 'no parameters'}."
                ignored.append(f"{recipe.at(*path, name)}: unknown parameter '{name}' for "
                               f"merge method '{spec.name}' has no effect (mergekit ignores "
                               f"it too). {hint}")
                continue
            if model_level and not param.per_model:
                ignored.append(f"{recipe.at(*path, name)}: '{name}' applies to the whole "
                               "merge, not to one model, so it has no effect here (mergekit "
                               "ignores it too); move it to the top-level or slice "
                               "'parameters'")
                continue
            for value in leaf_values(setting):
                try:
                    coerce(value, param.type, name)
                except MergeError as e:
                    raise MergeError(f"{recipe.at(*path, name)}: {e}") from None
    return ignored


class RecipeLookup:
    """The values of one output tensor's parameters in a recipe (a
    :class:`~mergesmith.methods.contract.ParameterLookup`)."""

    def __init__(self, recipe: Recipe, spec: MethodSpec, sl: Slice, in_names: list[str],
                 out_name: str, position: float) -> None:
        self.recipe, self.spec, self.slice = recipe, spec, sl
        self.in_names, self.out_name, self.position = in_names, out_name, position
        self.shared_levels = [sl.params, sl.module_params, recipe.parameters]

    def _find(self, levels: list[dict[str, Setting]], name: str, tensor: str) -> Any:
        for settings in levels:
            if name in settings:
                value = evaluate(settings[name], tensor, self.position)
                if value is not UNSET:
                    return value
        return UNSET

    def shared(self, name: str) -> Any:
        return self._find(self.shared_levels, name, self.out_name)

    def model(self, k: int, name: str) -> Any:
        own = self.slice.sources[k].params
        return self._find([own, *self.shared_levels], name, self.in_names[k])

    def missing(self, param: Param, k: int | None) -> MergeError:
        spec = self.spec
        if k is None:
            return MergeError(f"merge method '{spec.name}' needs the parameter '{param.name}' "
                              f"for tensor '{self.out_name}'; add it under 'parameters:'")
        src = self.slice.sources[k]
        extra = (f" (mergekit adds the base model to the inputs of '{spec.name}', so it "
                 "needs one too)" if src.path == ("base_model",) else "")
        return MergeError(f"{self.recipe.at(*src.path)}: model '{src.ref}' needs the parameter "
                          f"'{param.name}' for tensor '{self.in_names[k]}' (merge method "
                          f"'{spec.name}'){extra}")

    def invalid(self, error: MergeError, param: Param, k: int | None) -> MergeError:
        tensor = self.out_name if k is None else self.in_names[k]
        return MergeError(f"{error} (for tensor '{tensor}', after evaluating gradients)")

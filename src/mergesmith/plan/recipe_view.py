"""The recipe normalised for planning: every merge as a slice of sources with the parameter
levels above it, whatever form the recipe used (``models:``, ``slices:``, ``modules:``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import MergeError
from ..methods import BasePolicy, MethodSpec
from ..recipe import ModelReference, Recipe, Setting


@dataclass
class Source:
    """One input of a merge: a model, its layer range and its own parameters."""

    ref: ModelReference
    layer_range: tuple[int, int] | None
    params: dict[str, Setting]
    path: tuple  # where in the recipe (for messages)


@dataclass
class Slice:
    """Inputs merged together, with the parameter levels above them (slice, module)."""

    sources: list[Source]
    base: ModelReference | None
    params: dict[str, Setting]
    path: tuple
    module_params: dict[str, Setting] = field(default_factory=dict)


def recipe_levels(recipe: Recipe):
    """(path, models, slices, parameters) of the recipe itself and of each module."""
    yield (), recipe.models, recipe.slices, recipe.parameters
    for name, m in (recipe.modules or {}).items():
        yield ("modules", name), m.models, m.slices, m.parameters


def referenced_models(recipe: Recipe) -> list[tuple[ModelReference, str]]:
    """Every model reference of a recipe, once, base first then recipe order, with its field."""
    refs: dict[ModelReference, str] = {}
    if recipe.base_model is not None:
        refs[recipe.base_model] = recipe.at("base_model")
    for path, models, slices, _ in recipe_levels(recipe):
        for i, m in enumerate(models or []):
            refs.setdefault(m.ref, recipe.at(*path, "models", i, "model"))
        for i, s in enumerate(slices or []):
            if s.base_model is not None:
                refs.setdefault(s.base_model, recipe.at(*path, "slices", i, "base_model"))
            for j, src in enumerate(s.sources):
                refs.setdefault(src.ref, recipe.at(*path, "slices", i, "sources", j, "model"))
    return list(refs.items())


def external_tokenizer(recipe: Recipe) -> tuple[ModelReference, str] | None:
    """The model the recipe takes its vocabulary from when it is not one of the merged
    models (mergekit allows that: the tokenizer is read, the weights are not)."""
    source = recipe.tokenizer.source if recipe.tokenizer is not None else None
    if not isinstance(source, ModelReference):
        return None
    if any(ref == source for ref, _ in referenced_models(recipe)):
        return None
    return source, f"{recipe.tokenizer.where}.source"


def donor_ref(recipe: Recipe) -> ModelReference:
    """The donor of config.json and the tokenizer: the base model, else the first model the
    recipe names (never a set's order)."""
    if recipe.base_model is not None:
        return recipe.base_model
    for _, models, slices, _ in recipe_levels(recipe):
        if models:
            return models[0].ref
        if slices:
            return slices[0].sources[0].ref
    raise MergeError("the recipe names no models")


def forbidden_base(recipe: Recipe, spec: MethodSpec) -> MergeError:
    return MergeError(f"{recipe.at('base_model')}: merge method '{spec.name}' takes exactly one "
                      "model and no base_model; remove 'base_model' (use the model itself as "
                      "the only input)")


def whole(recipe: Recipe, spec: MethodSpec, models: list, path: tuple,
          module_params: dict[str, Setting]) -> Slice:
    """``models:`` as one slice; mergekit adds a base_model that is not listed."""
    sources = [Source(m.ref, None, m.parameters, (*path, "models", i))
               for i, m in enumerate(models)]
    base = recipe.base_model
    if base is not None and all(s.ref != base for s in sources):
        if spec.contract.base is BasePolicy.FORBIDDEN:
            raise forbidden_base(recipe, spec)
        sources.append(Source(base, None, {}, ("base_model",)))
    return Slice(sources, base, {}, path, module_params)


def slices(recipe: Recipe, slices: list, path: tuple,
           module_params: dict[str, Setting]) -> list[Slice]:
    """``slices:`` of the recipe or of a module; each slice's base defaults to the recipe's."""
    out = []
    for i, s in enumerate(slices):
        sources = [Source(src.ref, src.layer_range, src.parameters,
                          (*path, "slices", i, "sources", j))
                   for j, src in enumerate(s.sources)]
        out.append(Slice(sources, s.base_model or recipe.base_model, s.parameters,
                         (*path, "slices", i), module_params))
    return out

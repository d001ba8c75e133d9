"""Which output tensors a recipe makes: whole models (``models:``), layer slices
(``slices:``), and modules merged one by one (``modules:``); every donor tensor is merged,
copied or reported."""

from __future__ import annotations

from .. import arch
from ..errors import MergeError, did_you_mean
from ..recipe import ModelReference, Recipe
from . import recipe_view
from .draft import Draft
from .recipe_view import Slice
from .tensors import add_output, bind, carry
from .types import LayerSource


def plan_whole(d: Draft, sl: Slice, donor: int, names: list[str],
               module: str | None = None) -> None:
    """Merge every tensor in ``names`` (the donor's, or one module's) name by name."""
    bound = bind(d, sl)
    stacks = arch.layer_stacks(names)
    for name in names:
        add_output(d, name, sl, bound, [name] * len(sl.sources),
                   arch.gradient_position(name, stacks))
    add_untied_heads(d, sl, donor, names)
    planned = set(names)
    for src in sl.sources:
        m = d.model_of(src.ref)
        own = arch.find_module(d.modules_of(m), module) if module else None
        scope = own.tensors if own is not None else d.sources[m].index.tensors
        extra = {n for n in scope if n not in planned and not arch.is_output_head(n)}
        if extra and m != donor:
            shown = ", ".join(sorted(extra)[:3]) + (" ..." if len(extra) > 3 else "")
            d.warnings.append(f"{len(extra)} tensor(s) of '{src.ref}' are not in the "
                              f"base model '{d.refs[donor]}' and are not merged: {shown}")


def add_untied_heads(d: Draft, sl: Slice, donor: int, names: list[str]) -> None:
    """Inputs with an LM head the donor ties to its embedding: the output gets a head
    (the tied inputs contribute their embedding) and ``tie_word_embeddings: false``."""
    if arch.input_embedding_name(names) is None:
        return
    heads = {n for src in sl.sources
             for n in d.sources[d.model_of(src.ref)].index.tensors
             if arch.is_output_head(n) and n not in d.sources[donor].index.tensors}
    bound = bind(d, sl)
    for head in sorted(heads):
        add_output(d, head, sl, bound, [head] * len(sl.sources), 0.0)
        d.untie = True
        d.notes.append(f"'{head}': some inputs have their own LM head, so the output "
                       "has one too (tied inputs contribute their embedding) and "
                       "config.json gets tie_word_embeddings: false")


def plan_slices(d: Draft, slices: list[Slice], donor: int, module: arch.Module) -> None:
    """Plan a layer-wise recipe for one module (the whole model when it has one)."""
    bounds = [bind(d, sl) for sl in slices]
    stacks: dict[ModelReference, arch.Module] = {}
    for sl in slices:
        for src in sl.sources:
            m = d.model_of(src.ref)
            own = arch.find_module(d.modules_of(m), module.name)
            if own is None or own.stack is None:
                raise MergeError(f"{d.recipe.at(*src.path)}: '{src.ref}' has no stack "
                                 f"of layers for module '{module.name}'")
            start, end = src.layer_range or (0, 0)
            if end > own.layers:
                raise MergeError(f"{d.recipe.at(*src.path, 'layer_range')}: layer_range "
                                 f"[{start}, {end}] is past the end of '{src.ref}', which "
                                 f"has {own.layers} layers (valid: 0 to {own.layers})")
            stacks[src.ref] = own
    loose = module.loose()
    for name in [n for n in loose if arch.is_pre_layer(n)]:
        add_output(d, name, slices[0], bounds[0], [name] * len(slices[0].sources), 0.0)
    layer_map: list[LayerSource] = []
    for sl, bound in zip(slices, bounds):
        first = sl.sources[0]
        start0, end0 = first.layer_range or (0, 0)
        n = end0 - start0
        first_names = d.sources[d.model_of(first.ref)].index.tensors
        for i in range(n):
            out_layer = len(layer_map)
            t = 1.0 if n == 1 else i / (n - 1)
            for rest in stacks[first.ref].layer_tensors(first_names, start0 + i):
                in_names = [f"{stacks[src.ref].stack}.{(src.layer_range or (0, 0))[0] + i}"
                            f".{rest}" for src in sl.sources]
                add_output(d, f"{module.stack}.{out_layer}.{rest}", sl, bound, in_names, t)
            layer_map.append(LayerSource(out_layer, tuple(
                (str(src.ref), (src.layer_range or (0, 0))[0] + i) for src in sl.sources)))
    for name in [n for n in loose if not arch.is_pre_layer(n)]:
        add_output(d, name, slices[-1], bounds[-1], [name] * len(slices[-1].sources), 0.0)
    d.layer_maps[module.name] = layer_map
    _report_lost_layer_tensors(d, module, donor)


def _report_lost_layer_tensors(d: Draft, module: arch.Module, donor: int) -> None:
    """Layer tensors the donor has (e.g. only in layer 0) that no output layer has."""
    names = d.sources[donor].index.tensors
    wanted = {layer.rest for n in module.tensors
              if (layer := arch.split_layer(n)) and layer.prefix == module.stack}
    written = {layer.rest for t in d.outputs
               if (layer := arch.split_layer(t.name)) and layer.prefix == module.stack}
    for rest in sorted(wanted - written):
        layers = sorted({layer.index for n in names if (layer := arch.split_layer(n))
                         and layer.prefix == module.stack and layer.rest == rest})
        d.warnings.append(f"'{module.stack}.N.{rest}' (donor layers {layers}) is in no "
                          "output layer: the slices do not use those layers")


def plan_recipe(d: Draft, recipe: Recipe, donor: int) -> None:
    """Every output tensor of the recipe, whichever form it has."""
    modules = d.modules_of(donor)
    if recipe.models is not None:
        plan_whole(d, recipe_view.whole(recipe, d.spec, recipe.models, (), {}), donor,
                   list(d.sources[donor].index.tensors))
    elif recipe.slices is not None:
        if len(modules) > 1:
            names = ", ".join(modules)
            raise MergeError(f"{recipe.at('slices')}: '{d.refs[donor]}' has several modules "
                             f"({names}); layer slices must name the module they apply to: "
                             f"write 'modules: {{<module>: {{slices: ...}}}}' (modules not "
                             "named are copied from the base model)")
        module = next(iter(modules.values()))
        if module.stack is None:
            raise MergeError(f"{recipe.at('slices')}: '{d.refs[donor]}' has no numbered layers "
                             "to slice; use 'models:'")
        plan_slices(d, recipe_view.slices(recipe, recipe.slices, (), {}), donor, module)
    else:
        _plan_modules(d, recipe, donor, modules)


def _plan_modules(d: Draft, recipe: Recipe, donor: int,
                  modules: dict[str, arch.Module]) -> None:
    """``modules:``: each named module merged on its own; the others copied from the donor."""
    assert recipe.modules is not None
    chosen: dict[str, arch.Module] = {}
    for name in recipe.modules:
        module = arch.find_module(modules, name)
        if module is None:
            raise MergeError(f"{recipe.at('modules', name)}: '{d.refs[donor]}' has no module "
                             f"'{name}'.{did_you_mean(name, modules)} Its modules: "
                             f"{', '.join(modules)}.")
        if module.name in chosen:
            raise MergeError(f"{recipe.at('modules', name)}: module '{module.name}' is named "
                             "twice")
        chosen[module.name] = module
    for name, spec in recipe.modules.items():
        module = chosen[arch.find_module(modules, name).name]
        path = ("modules", name)
        if spec.models is not None:
            plan_whole(d, recipe_view.whole(recipe, d.spec, spec.models, path, spec.parameters),
                       donor, module.tensors, module.name)
        else:
            if module.stack is None:
                raise MergeError(f"{recipe.at(*path)}: module '{module.name}' has no numbered "
                                 "layers to slice; use 'models:' for it")
            plan_slices(d, recipe_view.slices(recipe, spec.slices, path, spec.parameters),
                        donor, module)
    for module in modules.values():
        if module.name not in chosen:
            carry(d, module.tensors, donor, f"module '{module.name}' ({len(module.tensors)} "
                  f"tensors) is not in the recipe: copied from '{d.refs[donor]}'")

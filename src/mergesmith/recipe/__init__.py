"""Recipes: mergekit's YAML format, parsed and validated before any model is opened."""

from .params import Conditional, Gradient, Setting, coerce, evaluate
from .refs import ModelPath, ModelReference, parse_model_reference
from .schema import (EvaluateRecipe, InputModel, ModelRow, ModuleRecipe, OutputSlice, Recipe, SliceSource,
                     TokenizerRecipe, TokenOverride, ZeroRow, load_recipe)

__all__ = [
    "Conditional", "EvaluateRecipe", "Gradient", "InputModel", "ModelPath", "ModuleRecipe", "ModelReference", "OutputSlice",
    "Recipe", "Setting", "SliceSource", "coerce", "evaluate", "load_recipe",
    "parse_model_reference", "ModelRow", "TokenizerRecipe", "TokenOverride", "ZeroRow",
]

"""Recipe + model indexes → Plan: every output tensor with its inputs and resolved
parameters, and the output file layout. Pure and cheap: no tensor data is read.

Everything that can be wrong in a recipe (unknown parameters, wrong types, missing tensors,
shape mismatches, impossible layer ranges, contract violations) is found here, so a merge
that starts will not fail halfway for a reason the recipe could have told us.

The steps, one module each: ``recipe_view`` (the recipe as slices of sources),
``parameters`` (names, types, precedence), ``tensors`` (one output tensor), ``layers``
(whole models, slices, modules), ``vocabulary`` (tokenizer and chat template), ``config``
(the output config.json), ``layout`` (processing order and output files); ``planner``
runs them and freezes the result.
"""

from .planner import make_plan
from .recipe_view import referenced_models
from .types import COPY, InputTensor, LayerSource, OutputTensor, Plan, Shard

__all__ = ["COPY", "InputTensor", "LayerSource", "OutputTensor", "Plan", "Shard", "make_plan",
           "referenced_models"]

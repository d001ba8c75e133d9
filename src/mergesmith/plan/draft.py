"""The state of a plan being made: what has been planned so far, and lookups into the
inputs. Only the planning steps (``tensors``, ``layers``, ``vocabulary``, ``config``) change
it; ``make_plan`` freezes it into a :class:`~mergesmith.plan.types.Plan`."""

from __future__ import annotations

from typing import Any

from .. import arch
from ..checkpoint import ModelSource
from ..methods import get_method
from ..options import Options
from ..recipe import ModelReference, Recipe
from ..tokenizer import ModelVocab, VocabPlan
from .types import LayerSource, OutputTensor


class Draft:
    def __init__(self, recipe: Recipe, models: dict[ModelReference, ModelSource],
                 options: Options) -> None:
        self.recipe = recipe
        self.options = options
        self.spec = get_method(recipe.merge_method, recipe.at("merge_method"))
        self.refs = list(models)
        self.sources = [models[r] for r in self.refs]
        self.model_index = {r: i for i, r in enumerate(self.refs)}
        self.outputs: list[OutputTensor] = []
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.layer_maps: dict[str, list[LayerSource]] = {}
        self.untie = False  # an LM head was added to a tied donor
        self.vocab: VocabPlan | None = None
        self.vocabs: dict[int, ModelVocab] = {}
        self.generation_config: dict[str, Any] | None = None
        self.chat_template: str | None = None
        self.quantization_config: dict[str, Any] | None = None  # of a quantized output
        self.external_tokenizer: Any = None  # checkpoint.TokenizerSource of the vocabulary
        self.rows = {i: r for i, s in enumerate(self.sources)
                     if (r := arch.vocab_rows(s.index.tensors)) is not None}
        self._modules: dict[int, dict[str, arch.Module]] = {}

    def modules_of(self, model: int) -> dict[str, arch.Module]:
        if model not in self._modules:
            self._modules[model] = arch.infer_modules(list(self.sources[model].index.tensors))
        return self._modules[model]

    def model_of(self, ref: ModelReference) -> int:
        return self.model_index[ref]

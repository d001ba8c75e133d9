"""``make_plan``: the planning steps in order, then the frozen plan."""

from __future__ import annotations

from ..checkpoint import ModelSource, TokenizerSource
from ..errors import MergeError
from ..options import Options
from ..recipe import ModelReference, Recipe
from .config import check_architectures, output_config
from .draft import Draft
from .encoding import plan_encodings
from .gguf import check_output_format, plan_gguf
from .layers import plan_recipe
from .layout import check_unique, layout, processing_order
from .parameters import check_parameter_names
from .recipe_view import donor_ref
from .statistics import MERGED_GRAM, plan_merged_grams, plan_statistics
from .types import Plan
from .vocabulary import plan_chat_template, plan_vocabulary

GGUF_FILENAME = "model.gguf"
"""The file a GGUF output is built as in ``OUT.partial/`` (then renamed to ``OUT``)."""


def make_plan(recipe: Recipe, models: dict[ModelReference, ModelSource],
              options: Options | None = None,
              tokenizer: TokenizerSource | None = None) -> Plan:
    """Plan a merge. ``models`` maps every reference of the recipe to its resolved source
    (which also reads the side files planning needs: config, tokenizer, generation config);
    ``tokenizer`` is the vocabulary's source when it is not a merged model
    (``recipe_view.external_tokenizer``). Nothing else is read."""
    options = options or Options()
    d = Draft(recipe, models, options)
    d.external_tokenizer = tokenizer
    d.warnings += recipe.ignored
    d.warnings += check_parameter_names(recipe, d.spec)
    check_architectures(d)
    check_output_format(d)
    donor = d.model_of(donor_ref(recipe))
    ignored = list(d.warnings)
    try:
        plan_vocabulary(d, donor)
        plan_chat_template(d)
        plan_recipe(d, recipe, donor)
    except MergeError as e:  # e.g. a required parameter missing because it is misspelled
        if not ignored:
            raise
        more = f" (and {len(ignored) - 1} more ignored)" if len(ignored) > 1 else ""
        raise MergeError(f"{e}. Perhaps because of: {ignored[0]}{more}") from None
    statistics = plan_statistics(d)  # data-aware methods: before any weight is read
    plan_encodings(d, donor)
    config = output_config(d, donor)
    ordered = processing_order(d.outputs, d.sources, donor)
    check_unique(ordered)
    if options.out_format == "gguf":
        tensors, shards = plan_gguf(d, donor, config, ordered, GGUF_FILENAME)
    else:
        tensors, shards = layout(ordered, options.out_shard_size)
    if d.warnings and (options.strict or recipe.strict):
        more = f" (and {len(d.warnings) - 1} more)" if len(d.warnings) > 1 else ""
        why = "--strict" if options.strict else recipe.at("strict")
        raise MergeError(f"{d.warnings[0]}{more}. {why}: warnings are errors; fix the recipe "
                         "or drop strict mode")
    p = Plan(recipe=recipe, method=d.spec, models=d.sources, donor=donor,
             tensors=tuple(tensors), shards=tuple(shards), config=config, options=options,
             read_dtype=recipe.dtype, notes=tuple(d.notes), warnings=tuple(d.warnings),
             layer_maps=d.layer_maps, vocab=d.vocab, generation_config=d.generation_config,
             chat_template=d.chat_template, statistics=statistics)
    if MERGED_GRAM in d.spec.scheduling.statistics:  # RegMean++: a sequential pass
        p = plan_merged_grams(p, d)
    return p

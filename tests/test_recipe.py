"""Recipe parsing: references, settings (filters, gradients), typing, precedence."""

from __future__ import annotations

import pytest

from mergesmith import MergeError
from mergesmith.recipe import (Conditional, Gradient, ModelPath, coerce, evaluate, load_recipe,
                               parse_model_reference)
from mergesmith.recipe.params import UNSET, parse_setting


def test_reference_string_forms():
    r = parse_model_reference("org/name@main+org/lora@v2")
    assert r.model == ModelPath("org/name", "main") and r.lora == ModelPath("org/lora", "v2")
    assert str(r) == "org/name@main+org/lora@v2"
    assert parse_model_reference("./models/base").model.path == "./models/base"


def test_reference_mapping_form():
    r = parse_model_reference({"model": {"path": "a/b", "revision": "x"},
                               "override_architecture": "LlamaForCausalLM"})
    assert r.model == ModelPath("a/b", "x") and r.override_architecture == "LlamaForCausalLM"


@pytest.mark.parametrize("bad", ["a@b@c", "a+b+c", {"model": "a", "extra": 1}, 3])
def test_reference_errors(bad):
    with pytest.raises(MergeError):
        parse_model_reference(bad)


def test_gradient_interpolation_written_out():
    g = Gradient((0.0, 1.0, 0.5))
    assert g.at(0.0) == 0.0 and g.at(1.0) == 0.5
    assert g.at(0.25) == pytest.approx(0.5)  # s = 0.5 between 0.0 and 1.0
    assert g.at(0.75) == pytest.approx(0.75)  # s = 1.5 between 1.0 and 0.5
    assert Gradient((0.3,)).at(0.7) == 0.3


def test_boolean_gradient_is_a_step_function():
    g = Gradient((False, True))
    assert [g.at(t) for t in (0.0, 0.34, 0.67, 1.0)] == [False, False, False, True]


def test_filters_first_match_wins_and_fall_through():
    s = parse_setting([{"filter": "self_attn", "value": 0.2},
                       {"filter": "mlp", "value": [0.8, 0.4]}], "t")
    assert evaluate(s, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.2
    assert evaluate(s, "model.layers.0.mlp.up_proj.weight", 0.5) == pytest.approx(0.6)
    assert evaluate(s, "model.norm.weight", 0.0) is UNSET
    star = parse_setting([{"filter": "*", "value": 1}], "t")
    assert evaluate(star, "anything", 0.0) == 1


def test_regex_filter_extension():
    s = parse_setting([{"filter": r"re:layers\.[01]\.", "value": 0.1}, {"value": 0.9}], "w")
    assert evaluate(s, "model.layers.1.mlp.up_proj.weight", 0) == 0.1
    assert evaluate(s, "model.layers.11.mlp.up_proj.weight", 0) == 0.9


def test_unwrapped_conditional_mapping_works():
    s = parse_setting({"filter": "mlp", "value": 0.5}, "w")
    assert s == (Conditional("mlp", 0.5),)


@pytest.mark.parametrize("value,kind,want", [
    ("0.5", float, 0.5), ("1e-3", float, 0.001), (True, float, 1.0), (3, float, 3.0),
    (True, bool, True), (1, bool, True), ("false", bool, False), (0.0, bool, False),
    (10, int, 10), (10.0, int, 10), ("10", int, 10),
])
def test_coercion_follows_mergekit(value, kind, want):
    got = coerce(value, kind, "p")
    assert got == want and type(got) is kind


@pytest.mark.parametrize("value,kind", [(0.5, bool), ("maybe", bool), (10.5, int),
                                        ("abc", float), (True, int)])
def test_coercion_rejects(value, kind):
    with pytest.raises(MergeError):
        coerce(value, kind, "p")


def test_recipe_parses_all_top_level_fields():
    r = load_recipe("""merge_method: task_arithmetic
base_model: a/base
models:
  - model: a/one
    parameters: {weight: 0.5}
parameters: {lambda: 0.9}
dtype: bf16
out_dtype: torch.float16
name: my-merge
seed: 7
""")
    assert r.merge_method == "task_arithmetic" and str(r.base_model) == "a/base"
    assert r.models[0].parameters == {"weight": 0.5}
    assert str(r.dtype) == "torch.bfloat16" and str(r.out_dtype) == "torch.float16"
    assert r.seed == 7 and r.name == "my-merge"


@pytest.mark.parametrize("text,fragment", [
    ("merge_method: linear\nmodels: []\n", "exactly one of"),
    ("models:\n  - model: a\n", "merge_method"),
    ("merge_method: linear\nmodels:\n  - model: a\ndtype: fp8\n", "unknown dtype"),
    ("merge_method: linear\nmodels:\n  - model: a\nmodels:\n  - model: b\n", "duplicate key"),
    ("merge_method: linear\nmodels:\n  - model: a\ntokenizer: {source: base}\n"
     "tokenizer_source: base\n", "cannot be used together"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n"
     "        layer_range: [0, 2]\n      - model: b\n        layer_range: [0, 3]\n",
     "same number of layers"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n"
     "        layer_range: [2, 2]\n", "empty"),
    ("- just a list\n", "YAML mapping"),
])
def test_recipe_errors(text, fragment):
    with pytest.raises(MergeError, match=None) as info:
        load_recipe(text)
    assert fragment in str(info.value)


def test_misspelled_filter_is_ignored_and_applies_everywhere():
    recipe = load_recipe("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n"
                         "      weight:\n        - {filtr: mlp, value: 1}\n")
    [message] = recipe.ignored
    assert "applies to every tensor" in message and "Did you mean 'filter'" in message


def test_ignored_key_points_at_line():
    recipe = load_recipe("merge_method: linear\nmodels:\n  - model: a\n    paramters: {}\n")
    [message] = recipe.ignored
    assert "<recipe>:4:5" in message and "Did you mean 'parameters'" in message

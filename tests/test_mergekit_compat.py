"""Recipes as people publish them: what mergekit ignores, we accept with one warning each
(where it is, that it has no effect, the likely fix); --strict and `strict: true` make the
warnings errors; every value form mergekit reads, we read."""

from __future__ import annotations

import pytest
import torch
from conftest import LLAMA, load_model, random_tensors, recipe_file, write_model
from test_cli import assert_user_error, invoke

import mergesmith


@pytest.fixture(scope="module")
def m(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    base = random_tensors(LLAMA, 0)
    return {"root": root, "base": write_model(root / "base", base),
            "a": write_model(root / "a", random_tensors(LLAMA, 1, base)),
            "b": write_model(root / "b", random_tensors(LLAMA, 2, base))}


TIES = """merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {b}
    parameters: {{weight: 0.4, density: 0.7}}
parameters:
  normalize: true
"""
SLERP = """merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {a}
parameters:
  t: 0.3
"""
PASSTHROUGH = """merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
  - sources:
      - model: {b}
        layer_range: [1, 3]
"""

# (name, clean recipe, the same recipe with something mergekit ignores, fragments of the
# one warning: the key, its place, the fix)
IGNORED = [
    ("top_level_parameter", TIES, TIES + "lambda: 0.5\n",
     ["unknown key 'lambda'", "recipe.yml:10:", "no effect", "Move it under 'parameters:'"]),
    ("top_level_typo", TIES, TIES + "dype: bfloat16\n",
     ["unknown key 'dype'", "recipe.yml:10:", "Did you mean 'dtype'"]),
    ("top_level_unknown", TIES, TIES + "out_path: ./merged\n",
     ["unknown key 'out_path'", "recipe.yml:10:", "mergekit ignores it too"]),
    ("merge_method_in_slice", PASSTHROUGH,
     PASSTHROUGH.replace("  - sources:\n      - model: {b}",
                         "  - merge_method: linear\n    sources:\n      - model: {b}"),
     ["slices[1].merge_method", "unknown key 'merge_method'", "top-level 'merge_method'"]),
    ("revision_on_source", PASSTHROUGH,
     PASSTHROUGH.replace("layer_range: [0, 2]", "layer_range: [0, 2]\n        revision: main"),
     ["slices[0].sources[0].revision", "'org/name@REVISION'"]),
    ("weight_on_slerp", SLERP, SLERP.replace("  - model: {a}",
                                             "  - model: {a}\n    parameters: {{weight: 1.0}}"),
     ["models[1].parameters.weight", "unknown parameter 'weight'", "use 't'"]),
    ("parameter_typo", TIES, TIES + "  lamda: 1.0\n",
     ["parameters.lamda", "recipe.yml:10", "Did you mean 'lambda'"]),
    ("int8_mask_on_linear", "merge_method: linear\nmodels:\n  - model: {a}\n"
                            "    parameters: {{weight: 0.5}}\n  - model: {b}\n"
                            "    parameters: {{weight: 0.5}}\n",
     "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
     "  - model: {b}\n    parameters: {{weight: 0.5}}\nparameters:\n  int8_mask: true\n",
     ["parameters.int8_mask", "'linear' takes: weight"]),
    ("pattern_instead_of_filter", SLERP.replace("t: 0.3", "t:\n    - value: 0.3"),
     SLERP.replace("t: 0.3", "t:\n    - pattern: mlp\n      value: 0.3"),
     ["parameters.t", "unknown key 'pattern'", "applies to every tensor",
      "Write 'filter:'"]),
    ("shared_parameter_on_a_model", TIES,
     TIES.replace("{{weight: 0.6, density: 0.5}}", "{{weight: 0.6, density: 0.5, lambda: 3}}"),
     ["models[0].parameters.lambda", "applies to the whole merge", "move it to the top-level"]),
]


@pytest.mark.parametrize("name,clean,noisy,fragments", IGNORED, ids=[c[0] for c in IGNORED])
def test_ignored_is_one_warning_and_changes_nothing(m, tmp_path, name, clean, noisy,
                                                    fragments):
    noisy_recipe = recipe_file(tmp_path, noisy.format(**m))
    result = invoke("check", str(noisy_recipe))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert all(f in warnings[0] for f in fragments), warnings[0]
    with pytest.warns(UserWarning, match="no effect"):
        mergesmith.run(noisy_recipe, tmp_path / "noisy")
    mergesmith.run(recipe_file(tmp_path, clean.format(**m), "clean.yml"), tmp_path / "clean")
    a, b = load_model(tmp_path / "noisy"), load_model(tmp_path / "clean")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # strict mode: the same line is an error, before anything is written
    out = tmp_path / "strict"
    assert_user_error(invoke("run", str(noisy_recipe), str(out), "--strict"), fragments[0],
                      "--strict", out=out)
    strict_recipe = recipe_file(tmp_path, "strict: true\n" + noisy.format(**m), "strict.yml")
    assert_user_error(invoke("check", str(strict_recipe)), fragments[0], "strict")


def test_a_misspelled_required_parameter_is_named_in_the_error(m, tmp_path):
    recipe = recipe_file(tmp_path, TIES.format(**m).replace("weight: 0.6", "wieght: 0.6"))
    assert_user_error(invoke("check", str(recipe)), "needs the parameter 'weight'",
                      "unknown parameter 'wieght'", "Did you mean 'weight'")


def test_mergesmith_blocks_stay_strict(m, tmp_path):
    recipe = recipe_file(tmp_path, TIES.format(**m) + "evaluate:\n  txt: eval.txt\n")
    assert_user_error(invoke("check", str(recipe)), "unknown key 'txt' in evaluate")


VALUE_FORMS = [
    ("string_float_tol", "merge_method: karcher\nmodels:\n  - model: {a}\n  - model: {b}\n"
                         "parameters:\n  tol: 1e-10\n  max_iter: 10.0\n"),
    ("bool_as_float", TIES.replace("normalize: true", "normalize: 1.0")),
    ("leading_dot_number", TIES.replace("weight: 0.6", "weight: .6")),
    ("null_parameters", TIES.replace("parameters:\n  normalize: true\n",
                                     "parameters:\n  # nothing set here\n")),
    ("anchors_and_aliases", "merge_method: ties\nbase_model: &base {base}\nmodels:\n"
                            "  - model: {a}\n    parameters: &p {{weight: 0.5, density: 0.5}}\n"
                            "  - model: {b}\n    parameters: *p\n  - model: *base\n"),
    ("document_markers", "---\n" + TIES + "...\n"),
    ("revision_in_reference", TIES.replace("model: {a}\n", "model: {a}@main\n")),
]


@pytest.mark.parametrize("name,text", VALUE_FORMS, ids=[c[0] for c in VALUE_FORMS])
def test_value_forms_mergekit_reads(m, tmp_path, name, text):
    result = invoke("check", str(recipe_file(tmp_path, text.format(**m))))
    assert result.exit_code == 0, result.output
    assert "warning:" not in result.output, result.output


def test_old_tokenizer_source_syntax(m):
    from mergesmith.recipe import load_recipe

    recipe = load_recipe(TIES.format(**m) + f"tokenizer_source: model:{m['base']}\n")
    assert str(recipe.tokenizer.source) == str(m["base"])


def test_windows_paths_are_kept_as_written():
    from mergesmith.recipe import load_recipe

    recipe = load_recipe("merge_method: slerp\nbase_model: D:\\models\\base\nmodels:\n"
                         "  - model: D:\\models\\base\n  - model: C:\\ft\\chat\n"
                         "parameters:\n  t: 0.5\n")
    assert [str(m.ref) for m in recipe.models] == ["D:\\models\\base", "C:\\ft\\chat"]
    assert recipe.base_model == recipe.models[0].ref

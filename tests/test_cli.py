"""The command line: bad input gets one clear line, exit code 2, no traceback, no output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LLAMA, random_tensors, recipe_file, run_cli, write_model

from mergesmith.cli import cli


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_user_error(result, *fragments: str, out: Path | None = None) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    text = result.stderr.strip()
    assert text.startswith("error: "), text
    assert len(text.splitlines()) == 1, text
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in text, text
    if out is not None:
        assert not out.exists() and not Path(str(out) + ".partial").exists()
    return text


@pytest.fixture
def two(tmp_path):
    base = random_tensors(LLAMA, 0)
    return {"base": write_model(tmp_path / "base", base),
            "ft": write_model(tmp_path / "ft", random_tensors(LLAMA, 1, base))}


def ta_recipe(tmp_path, two, extra: str = "", model_params: str = "weight: 0.5") -> Path:
    return recipe_file(tmp_path, f"""merge_method: task_arithmetic
base_model: {two['base']}
models:
  - model: {two['ft']}
    parameters:
      {model_params}
{extra}""")


def test_unknown_key_names_line_and_suggestion(tmp_path, two):
    recipe = ta_recipe(tmp_path, two, "tokenizer_souce: union\n")
    out = tmp_path / "out"
    text = assert_user_error(invoke("run", str(recipe), str(out), "--strict"), "tokenizer_souce",
                             "Did you mean 'tokenizer_source'", ":7:", out=out)
    assert "recipe.yml" in text


def test_unknown_nested_key(tmp_path, two):
    recipe = recipe_file(tmp_path, f"""merge_method: task_arithmetic
base_model: {two['base']}
models:
  - modle: {two['ft']}
""")
    assert_user_error(invoke("check", str(recipe)), "unknown key 'modle'", "models[0]",
                      "Did you mean 'model'")


def test_unknown_method(tmp_path, two):
    recipe = recipe_file(tmp_path, f"""merge_method: task_arithmatic
base_model: {two['base']}
models:
  - model: {two['ft']}
""")
    out = tmp_path / "out"
    assert_user_error(invoke("run", str(recipe), str(out)), "task_arithmatic",
                      "Did you mean 'task_arithmetic'", out=out)


def test_unknown_parameter(tmp_path, two):
    recipe = ta_recipe(tmp_path, two, model_params="wieght: 0.5")
    out = tmp_path / "out"
    assert_user_error(invoke("run", str(recipe), str(out), "--strict"),
                      "unknown parameter 'wieght'",
                      "Did you mean 'weight'", "models[0].parameters.wieght", out=out)


def test_global_parameter_given_per_model(tmp_path, two):
    recipe = ta_recipe(tmp_path, two, model_params="weight: 0.5\n      lambda: 2")
    assert_user_error(invoke("check", str(recipe), "--strict"),
                      "'lambda' applies to the whole merge")


def test_wrong_parameter_type(tmp_path, two):
    recipe = ta_recipe(tmp_path, two, "parameters:\n  normalize: 0.5\n")
    assert_user_error(invoke("check", str(recipe)), "normalize", "boolean")


def test_missing_required_weight(tmp_path, two):
    recipe = recipe_file(tmp_path, f"""merge_method: task_arithmetic
base_model: {two['base']}
models:
  - model: {two['ft']}
""")
    out = tmp_path / "out"
    assert_user_error(invoke("run", str(recipe), str(out)), "needs the parameter 'weight'",
                      str(two["ft"]), out=out)


def test_missing_model_folder(tmp_path, two):
    recipe = recipe_file(tmp_path, f"""merge_method: task_arithmetic
base_model: {two['base']}
models:
  - model: {tmp_path / 'nope'}
    parameters: {{weight: 1}}
""")
    out = tmp_path / "out"
    assert_user_error(invoke("run", str(recipe), str(out)), "model folder not found",
                      str(tmp_path / "nope"), out=out)


def test_folder_without_weights(tmp_path, two):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(LLAMA))
    recipe = recipe_file(tmp_path, f"""merge_method: task_arithmetic
base_model: {two['base']}
models:
  - model: {empty}
    parameters: {{weight: 1}}
""")
    out = tmp_path / "out"
    assert_user_error(invoke("run", str(recipe), str(out)), "no model weights", str(empty),
                      out=out)


def test_mismatched_shapes(tmp_path, two):
    wide = dict(LLAMA, intermediate_size=40)
    other = write_model(tmp_path / "wide", random_tensors(wide, 5), wide)
    recipe = recipe_file(tmp_path, f"""merge_method: linear
models:
  - model: {two['base']}
    parameters: {{weight: 1}}
  - model: {other}
    parameters: {{weight: 1}}
""")
    out = tmp_path / "out"
    assert_user_error(invoke("run", str(recipe), str(out)), "different shapes",
                      "mlp.down_proj.weight", "[32, 48]", "[32, 40]", out=out)


def test_output_exists_without_overwrite(tmp_path, two):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("run", str(ta_recipe(tmp_path, two)), str(out))
    assert_user_error(result, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_output_path_is_a_file(tmp_path, two):
    out = tmp_path / "out"
    out.write_text("x")
    assert_user_error(invoke("run", str(ta_recipe(tmp_path, two)), str(out)), "is a file")


def test_yaml_syntax_error_has_position(tmp_path):
    recipe = recipe_file(tmp_path, "merge_method: linear\nmodels:\n  - model: [a\n")
    assert_user_error(invoke("check", str(recipe)), "YAML syntax error", "recipe.yml:")


def test_models_and_slices_together(tmp_path, two):
    recipe = recipe_file(tmp_path, f"""merge_method: passthrough
models:
  - model: {two['ft']}
slices:
  - sources:
      - model: {two['ft']}
        layer_range: [0, 2]
""")
    assert_user_error(invoke("check", str(recipe)), "exactly one of 'models', 'slices'")


def test_layer_range_past_the_end(tmp_path, two):
    recipe = recipe_file(tmp_path, f"""merge_method: passthrough
slices:
  - sources:
      - model: {two['ft']}
        layer_range: [1, 9]
""")
    assert_user_error(invoke("check", str(recipe)), "layer_range", "has 3 layers")


def test_linear_zero_weight_sum(tmp_path, two):
    recipe = recipe_file(tmp_path, f"""merge_method: linear
models:
  - model: {two['base']}
    parameters: {{weight: 1}}
  - model: {two['ft']}
    parameters: {{weight: -1}}
""")
    assert_user_error(invoke("check", str(recipe)), "sum to zero", "normalize: false")


def test_passthrough_with_base_model(tmp_path, two):
    recipe = recipe_file(tmp_path, f"""merge_method: passthrough
base_model: {two['base']}
models:
  - model: {two['ft']}
""")
    assert_user_error(invoke("check", str(recipe)), "remove 'base_model'")


def test_check_prints_plan(tmp_path, two):
    result = invoke("check", str(ta_recipe(tmp_path, two)))
    assert result.exit_code == 0, result.output
    assert "bytes to read" in result.output and "peak memory" in result.output
    assert "ok: the recipe is valid" in result.output


def test_run_prints_progress_and_summary(tmp_path, two):
    out = tmp_path / "out"
    result = invoke("run", str(ta_recipe(tmp_path, two)), str(out), "--threads", "2")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert (out / "model.safetensors").exists()


def test_help_teaches():
    result = invoke("--help")
    assert result.exit_code == 0
    for word in ("demo", "check", "run", "methods", "Exit codes"):
        assert word in result.output
    run_help = invoke("run", "--help").output
    for option in ("--seed", "--threads", "--device", "--out-shard-size", "--overwrite",
                   "--quiet", "--debug"):
        assert option in run_help


def test_methods_lists_parameters():
    result = invoke("methods")
    assert result.exit_code == 0
    assert "task_arithmetic" in result.output and "lambda" in result.output


def test_real_entry_point_error_has_no_traceback(tmp_path):
    """The installed console script behaves like the in-process runner."""
    recipe = recipe_file(tmp_path, "merge_method: nope\nmodels:\n  - model: ./x\n")
    result = run_cli("run", str(recipe), str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")
def test_cuda_requested_without_gpu(tmp_path, two):
    out = tmp_path / "out"
    assert_user_error(invoke("run", str(ta_recipe(tmp_path, two)), str(out), "--device", "cuda"),
                      "no CUDA GPU", out=out)


def test_demo_builds_merges_and_verifies(tmp_path):
    lines: list[str] = []
    from mergesmith.demo import run_demo

    run_demo(str(tmp_path / "demo"), echo=lines.append)
    text = "\n".join(lines)
    assert (tmp_path / "demo" / "merged" / "model.safetensors").exists()
    assert "exactly rounded bfloat16 result" in text
    if __import__("importlib").util.find_spec("transformers"):
        assert "all finite: True" in text
    run_demo(str(tmp_path / "demo"), echo=lines.append)  # rerunning rebuilds its own folder
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(Exception, match="was not made by 'mergesmith demo'"):
        run_demo(str(tmp_path / "mine"), echo=lines.append)

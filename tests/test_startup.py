"""Start-up: commands that need no tensors never import torch (≈ 1 s), ``check`` plans
with a stand-in for torch's dtypes and reports what it reports with torch, and the
generated method catalogue the commands print from stays in step with the registry."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mergesmith import method_catalogue

PROBE = """
import sys
from mergesmith.cli import cli
try:
    cli({args!r}, prog_name="mergesmith")
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "transformers", "safetensors.torch", "numpy")
               if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


def heavy_imports(*args: str) -> tuple[str, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(args=list(args))],
                          capture_output=True, text=True, timeout=120)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("HEAVY:")]
    assert marker, proc.stdout + proc.stderr
    return marker[0][len("HEAVY:"):], proc.stdout


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["check", "--help"],
                                  ["methods"], ["methods", "ties"], ["run"]],
                         ids=lambda a: " ".join(a))
def test_command_does_not_import_torch(args):
    heavy, out = heavy_imports(*args)
    assert heavy == "", f"mergesmith {' '.join(args)} imported {heavy}"
    if args[0] == "methods":
        assert "task_arithmetic  (base: required)" in out or "ties  (base" in out


def test_catalogue_is_up_to_date():
    assert method_catalogue.FILE.read_text(encoding="utf-8") == method_catalogue.text(), (
        "src/mergesmith/method_catalogue.json is stale: run "
        "`python -m mergesmith.method_catalogue`")


def test_methods_prints_what_the_registry_says():
    from click.testing import CliRunner

    from mergesmith.cli import cli
    from mergesmith.methods import get_method

    out = CliRunner().invoke(cli, ["methods", "della"]).output
    spec = get_method("della")
    assert out.splitlines()[0] == f"della  (base: {spec.contract.base.value})"
    for p in spec.params:
        assert p.describe() in out


def test_plugins_make_the_command_ask_the_registry(monkeypatch):
    monkeypatch.setattr(method_catalogue, "has_plugins", lambda: True)
    assert method_catalogue.load() is None


# ------------------------------------------------------------------ check without torch

CHECK_PROBE = """
import sys
from mergesmith.cli import cli
sys.argv = ["mergesmith", "check", {recipe!r}]
try:
    cli(sys.argv[1:], prog_name="mergesmith")
except SystemExit as e:
    code = e.code
print("TORCH:" + str("torch" in sys.modules))
"""


def _check(recipe: Path, *flags: str, with_torch: bool) -> tuple[int, list[str]]:
    """``mergesmith check`` in a new process: exit code and output lines (the resident
    memory measured, which differs from run to run, left out of the peak-memory line)."""
    env = {k: v for k, v in os.environ.items() if k != "MERGESMITH_CHECK_WITH_TORCH"}
    if with_torch:
        env["MERGESMITH_CHECK_WITH_TORCH"] = "1"
    proc = subprocess.run([sys.executable, "-m", "mergesmith", "check", str(recipe), *flags],
                          capture_output=True, text=True, timeout=300, env=env,
                          cwd=recipe.parent)
    lines = [re.sub(r"about [0-9.]+ MB|, [0-9.]+ MB for Python", "", line)
             if line.startswith("peak memory") else line
             for line in (proc.stdout + proc.stderr).splitlines()]
    return proc.returncode, lines


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    """A bfloat16 base, two fine-tunes and an FP8 (block-scaled) fine-tune."""
    import torch
    from conftest import LLAMA, random_tensors, write_model
    from test_quantized import write_fp8_model

    root = tmp_path_factory.mktemp("check")
    base = random_tensors(LLAMA, 0)
    write_model(root / "base", base, dtype=torch.bfloat16)
    for k in (1, 2):
        write_model(root / f"ft{k}", random_tensors(LLAMA, k, base), dtype=torch.bfloat16)
    write_fp8_model(root / "fp8", random_tensors(LLAMA, 3, base))
    return root


CHECK_RECIPES = {
    "ties": ("merge_method: ties\nbase_model: base\nmodels:\n"
             "  - {model: ft1, parameters: {weight: 0.6, density: 0.5}}\n"
             "  - {model: ft2, parameters: {weight: 0.4, density: 0.7}}\ndtype: bfloat16\n"),
    "fp8_input": ("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                  "  - {model: fp8, parameters: {weight: 0.5}}\n"
                  "  - {model: ft1, parameters: {weight: 0.5}}\n"),
    "multi_stage": ("name: tied\nmerge_method: ties\nbase_model: base\nmodels:\n"
                    "  - {model: ft1, parameters: {weight: 0.6, density: 0.5}}\n"
                    "  - {model: ft2, parameters: {weight: 0.4, density: 0.7}}\n"
                    "dtype: bfloat16\n---\nmerge_method: slerp\nbase_model: tied\n"
                    "models:\n  - model: tied\n  - model: ft2\nparameters: {t: 0.3}\n"),
    "union_tokenizer": "conformance: tokenizer_union",
    "bad_parameter": ("merge_method: ties\nbase_model: base\nmodels:\n"
                      "  - {model: ft1, parameters: {weight: 0.6, density: lots}}\n"),
}


@pytest.mark.parametrize("name", CHECK_RECIPES)
def test_check_without_torch_says_what_check_with_torch_says(name, tiny_models):
    """``check`` plans with torch's dtypes only (a stand-in, no torch import); a plan that
    needs torch itself (a vocabulary union builds index tensors) runs again with it. Either
    way the report — tensors, bytes, memory, time, errors — is the one torch gives."""
    from conftest import CONFORMANCE

    recipe = tiny_models / f"{name}.yml"
    text = CHECK_RECIPES[name]
    if text.startswith("conformance: "):  # models with tokenizers
        text = (CONFORMANCE / "recipes" / f"{text.split()[-1]}.yml").read_text()
        text = text.replace("./models", str(CONFORMANCE / "models"))
    recipe.write_text(text)
    flags = ("--memory-limit", "2GB") if name == "ties" else ()
    fast = _check(recipe, *flags, with_torch=False)
    assert fast == _check(recipe, *flags, with_torch=True)
    assert fast[0] == (2 if name == "bad_parameter" else 0), fast
    if name != "bad_parameter":
        assert fast[1][-1] == "ok: the recipe is valid"


def test_check_of_a_plain_recipe_does_not_import_torch(tiny_models):
    recipe = tiny_models / "plain.yml"
    recipe.write_text(CHECK_RECIPES["ties"])
    proc = subprocess.run([sys.executable, "-c", CHECK_PROBE.format(recipe=str(recipe))],
                          capture_output=True, text=True, timeout=120, cwd=tiny_models)
    assert "ok: the recipe is valid" in proc.stdout, proc.stdout + proc.stderr
    assert "TORCH:False" in proc.stdout, proc.stdout


GC_PROBE = """
import gc
import click
from mergesmith import _torch, cli

@click.command()
def touch():
    enabled_before = gc.isenabled()
    collections = sum(s["collections"] for s in gc.get_stats())
    _torch.torch.zeros(1)
    during = sum(s["collections"] for s in gc.get_stats()) - collections
    print("GC:", enabled_before, gc.isenabled(), during, gc.get_freeze_count())

if {console}:
    cli.run_console_script(touch, "probe")
else:
    touch(standalone_mode=False)
"""


@pytest.mark.parametrize("console", [True, False], ids=["console script", "library"])
def test_torch_is_imported_with_the_collector_paused(console):
    """Importing torch through the package pauses the garbage collector (it would collect
    many times over torch's new objects) and restores it. A console script (a process of
    its own) also freezes torch's objects, so the collections that follow skip them; a
    library user's process is left as it was."""
    proc = subprocess.run([sys.executable, "-c", GC_PROBE.format(console=console)],
                          capture_output=True, text=True, timeout=120)
    line = [x for x in proc.stdout.splitlines() if x.startswith("GC:")]
    assert line, proc.stdout + proc.stderr
    _, before, after, collections, frozen = line[0].split()
    assert before == after == "True"
    # none while torch was imported (unpaused: hundreds); in a library user's process the
    # first allocation after it may start one young collection
    assert int(collections) <= (0 if console else 1)
    if console:
        assert int(frozen) > 100_000  # torch's objects
    else:
        assert int(frozen) == 0

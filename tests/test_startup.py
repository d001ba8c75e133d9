"""Start-up: commands that need no tensors never import torch (≈ 1 s), and the generated
method catalogue they print from stays in step with the registry."""

from __future__ import annotations

import subprocess
import sys

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

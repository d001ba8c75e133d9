"""mergekit 0.1.5 conformance: run the shared recipes and compare with its outputs.

Uses ``../shared/conformance`` (compare.py decides, with each case's tolerances). Cases
whose features later issues add (other methods, vocabulary merging) are not listed here yet.
"""

from __future__ import annotations

import importlib.util
import io
from contextlib import redirect_stdout

import pytest
from conftest import CONFORMANCE

import mergesmith

CASES = [
    "task_arithmetic_seed",
    "task_arithmetic",
    "linear",
    "linear_nonorm",
    "passthrough_scale",
    "passthrough_frankenmerge",
    "bf16_passthrough_f32out",
    "bf16_linear_f32out",
    "slices_linear",
]

pytestmark = pytest.mark.skipif(not (CONFORMANCE / "compare.py").exists(),
                                reason="../shared/conformance is not available")


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("conformance_compare",
                                                  CONFORMANCE / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("case", CASES)
def test_case_matches_mergekit(case, compare, tmp_path, monkeypatch):
    monkeypatch.chdir(CONFORMANCE)  # recipes name models as ./models/...
    out = tmp_path / case
    mergesmith.run(f"recipes/{case}.yml", out, seed=42)
    buf = io.StringIO()
    with redirect_stdout(buf):
        status = compare([f"expected/{case}", str(out)])
    report = buf.getvalue()
    assert status == 0, report
    assert " 0 failed" in report.splitlines()[-1]

"""mergekit 0.1.5 conformance: run every shared recipe and compare with mergekit's output.

Uses ``../shared/conformance``: ``compare.py`` decides, with each case's kind and tolerances
from ``cases.json`` (random cases are compared by statistics). Cases where we knowingly
differ are listed in KNOWN_DIFFERENCES; each has its own test of our intended behaviour.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest
from conftest import CONFORMANCE

import mergesmith

pytestmark = pytest.mark.skipif(not (CONFORMANCE / "compare.py").exists(),
                                reason="../shared/conformance is not available")

CASES = sorted(json.loads((CONFORMANCE / "cases.json").read_text())["cases"]) if (
    CONFORMANCE / "cases.json").exists() else []

KNOWN_DIFFERENCES = {
    # mergekit leaves model_stock's t unclamped; we clamp to [0, 1] (spec fix). Our intended
    # output is tested in tests/test_methods_misc.py.
    "model_stock_conflict": "model_stock clamps t to [0, 1]",
}


def run_case(case, compare, tmp_path, monkeypatch, device: str = "cpu") -> tuple[int, str]:
    monkeypatch.chdir(CONFORMANCE)  # recipes name models as ./models/...
    out = tmp_path / case
    mergesmith.run(f"recipes/{case}.yml", out, seed=42, device=device)
    buf = io.StringIO()
    with redirect_stdout(buf):
        status = compare([f"expected/{case}", str(out)])
    return status, buf.getvalue()


@pytest.mark.filterwarnings("ignore:model_stock:UserWarning")
@pytest.mark.parametrize("case", CASES)
def test_case_matches_mergekit(case, compare, tmp_path, monkeypatch):
    status, report = run_case(case, compare, tmp_path, monkeypatch)
    if case in KNOWN_DIFFERENCES:
        assert status == 1, f"expected to differ ({KNOWN_DIFFERENCES[case]}):\n{report}"
        return
    assert status == 0, report
    assert " 0 failed" in report.splitlines()[-1]

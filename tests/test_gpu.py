"""The GPU path (``device="cuda"``) gives the CPU's results. Skipped without CUDA.

* Every conformance recipe merged on the GPU matches mergekit 0.1.5's output as the CPU run
  does (``compare.py``'s tolerances; DARE/DELLA, which draw from the GPU's own generator
  there, by their statistics).
* Every other method (the cases of ``test_output_digests.py``) lands within float32
  rounding of the CPU's output: per tensor ``‖gpu − cpu‖ ≤ TOLERANCE · ‖cpu − base‖``. The
  seeded randomized SVD draws its test matrix on the CPU, so it takes the same directions
  on both.
* A GPU merge is repeatable: twice on the GPU gives the same bytes.

Run on a machine with a GPU (``bench/README.md``, "GPU"); ``MERGESMITH_CONFORMANCE`` names
a copy of the shared conformance folder when ``../shared`` is not beside the checkout, and
``MERGESMITH_GPU_REPORT=FILE`` writes every measured deviation there as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import CONFORMANCE  # noqa: E402
from test_conformance import CASES, KNOWN_DIFFERENCES, run_case  # noqa: E402
from test_output_digests import EXTRA, _recipe  # noqa: E402

import mergesmith  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif(not (CONFORMANCE / "compare.py").exists(),
                       reason="the conformance folder is not available"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

TOLERANCE = 1e-2
"""GPU versus CPU, relative to the merge's change of the tensor: float32 rounding in
another order, grown where a method truncates a spectrum with close singular values
(measured on an H200: at most 6.4e-4, Iso-CTS; most methods 1e-4 or less). A device bug —
a wrong operand, a lost update — moves a tensor by O(1)."""

_REPORT: dict[str, dict] = {}


def _record(case: str, entry: dict) -> None:
    _REPORT[case] = entry
    path = os.environ.get("MERGESMITH_GPU_REPORT")
    if path:
        Path(path).write_text(json.dumps(_REPORT, indent=1, sort_keys=True))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("case", CASES)
def test_conformance_case_on_the_gpu(case, compare, tmp_path, monkeypatch):
    status, report = run_case(case, compare, tmp_path, monkeypatch, device="cuda")
    _record(f"conformance/{case}", {"status": status, "summary": report.splitlines()[-1:]})
    if case in KNOWN_DIFFERENCES:
        assert status == 1, f"expected to differ ({KNOWN_DIFFERENCES[case]}):\n{report}"
        return
    assert status == 0, report


@pytest.mark.parametrize("case", sorted(EXTRA))
def test_method_on_the_gpu_matches_the_cpu(case, tmp_path, monkeypatch):
    monkeypatch.chdir(CONFORMANCE)  # recipes name models as ./models/...
    monkeypatch.setenv("MERGESMITH_STATS_CACHE", str(tmp_path / "stats-cache"))
    recipe = _recipe(f"method/{case}", tmp_path)
    outs = {}
    for run, device in (("cpu", "cpu"), ("gpu", "cuda"), ("gpu again", "cuda")):
        outs[run] = tmp_path / run.replace(" ", "-")
        mergesmith.run(recipe, outs[run], seed=42, device=device)
    cpu, gpu, again = (_tensors(outs[k]) for k in ("cpu", "gpu", "gpu again"))
    base = _tensors(CONFORMANCE / "models" / "base")
    assert cpu.keys() == gpu.keys() == again.keys()
    deviation = {}
    for name, c in cpu.items():
        g, b = gpu[name].double(), base.get(name)
        change = float((c.double() - b.double()).norm()) if b is not None and \
            b.shape == c.shape else float(c.double().norm())
        deviation[name] = float((g - c.double()).norm()) / max(change, 1e-12)
    worst = max(deviation, key=deviation.get)
    identical = all(torch.equal(gpu[n], again[n]) for n in gpu)
    _record(f"method/{case}", {"worst_tensor": worst, "worst_deviation": deviation[worst],
                                "repeat_identical": identical})
    assert identical, "two GPU runs gave different bytes"
    assert deviation[worst] <= TOLERANCE, (
        f"{worst}: ‖gpu − cpu‖ / ‖cpu − base‖ = {deviation[worst]:.3g} > {TOLERANCE}")

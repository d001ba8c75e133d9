"""Every method's output stays bit-identical: the merged tensors of every conformance recipe
and of one recipe per method that has none (on the same conformance models) are hashed and
compared with the digests stored in ``tests/data/output_digests.json``.

An optimisation that changes any output bit fails here. When an output is *meant* to
change, regenerate the digests and say why in the commit:

    python tests/test_output_digests.py --update

Digests are of the tensors (name, dtype, shape, bytes), not of the files, so metadata does
not matter. They are kept per kind of CPU numerics: torch's vector unit (``AVX2``,
``AVX512``, …) and the CPU's vendor (``AuthenticAMD``, ``GenuineIntel``: the BLAS torch
ships takes other code paths on each, so matrix products round differently; an AMD CPU
with AVX-512 matches neither the AMD AVX2 set nor the Intel AVX-512 one). On a CPU kind
with no recorded set the test is skipped, saying so. ``--update`` records this kind's
set; a case whose digest changed here is dropped from the other kinds' sets (its output
changed there too, and cannot be recorded from here), and skipped there until someone
records it on such a CPU. ``ATEN_CPU_CAPABILITY=avx2`` makes an AVX-512 machine use (and
check or record) the AVX2 kernels.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import CONFORMANCE  # noqa: E402

DIGESTS = HERE / "data" / "output_digests.json"
MODELS = ["./models/ft_a", "./models/ft_b", "./models/ft_c"]
CALIBRATION_TEXT = ("The quick brown fox jumps over the lazy dog. " * 6 + "\n") * 4

# Methods without a conformance recipe: base + three models, defaults (data-aware ones
# with a calibration: block, written next to the output).
EXTRA = {
    "cart": {}, "consensus_ta": {}, "consensus_ties": {}, "iso_c": {}, "iso_cts": {},
    "magmax": {}, "pcb": {}, "star": {}, "svc_ta": {}, "tsv_m": {}, "wudi": {},
    "tsv_m_randomized": {"method": "tsv_m", "parameters": {"randomized_svd": True}},
    "cart_randomized": {"method": "cart", "parameters": {"randomized_svd": True}},
    "regmean": {"calibration": True}, "fisher": {"calibration": True},
    "regmean_plusplus": {"calibration": True},
}


def _conformance_cases() -> list[str]:
    path = CONFORMANCE / "cases.json"
    return sorted(json.loads(path.read_text())["cases"]) if path.exists() else []


def cases() -> list[str]:
    return [f"conformance/{c}" for c in _conformance_cases()] + [f"method/{m}" for m in EXTRA]


def _recipe(case: str, work: Path) -> str | dict:
    kind, name = case.split("/", 1)
    if kind == "conformance":
        return str(CONFORMANCE / "recipes" / f"{name}.yml")
    spec = EXTRA[name]
    recipe: dict = {"merge_method": spec.get("method", name), "base_model": "./models/base",
                    "models": [{"model": m} for m in MODELS]}
    if "parameters" in spec:
        recipe["parameters"] = spec["parameters"]
    if spec.get("calibration"):
        text = work / "calibration.txt"
        text.write_text(CALIBRATION_TEXT)
        recipe["calibration"] = {"text": str(text), "max_tokens": 128, "max_length": 32,
                                 "batch_size": 2}
    return recipe


def digest(folder: Path) -> str:
    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                tensors[k] = (f, k)
    for name in sorted(tensors):
        f, k = tensors[name]
        with safe_open(str(f), "pt") as st:
            t = st.get_tensor(k).contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def merge(case: str, work: Path) -> str:
    import os

    import mergesmith

    old = os.getcwd()
    os.chdir(CONFORMANCE)  # recipes name models as ./models/...
    try:
        out = work / case.replace("/", "__")
        mergesmith.run(_recipe(case, work), out, seed=42)
    finally:
        os.chdir(old)
    return digest(out)


def _cpu() -> str:
    """``"<torch's vector unit> <CPU vendor>"``, e.g. ``"AVX2 AuthenticAMD"``."""
    import platform

    import torch

    vendor = platform.machine() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":", 1)[1].strip() for line in f
                           if line.startswith("vendor_id")), vendor)
    except OSError:
        pass
    return f"{torch.backends.cpu.get_cpu_capability()} {vendor}"


def _stored() -> dict[str, dict[str, str]]:
    """``{cpu kind: {case: digest}}``."""
    return json.loads(DIGESTS.read_text())["digests"] if DIGESTS.exists() else {}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESMITH_STATS_CACHE", str(tmp_path / "stats-cache"))


@pytest.mark.skipif(not (CONFORMANCE / "cases.json").exists(),
                    reason="../shared/conformance is not available")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", cases())
def test_output_is_bit_identical_to_the_stored_digest(case, tmp_path):
    stored = _stored()
    mine = stored.get(_cpu())
    if mine is None:
        pytest.skip(f"digests recorded with {sorted(stored)} CPU kernels; this CPU uses "
                    f"{_cpu()} (reductions may round differently)")
    if case not in mine:
        assert any(case in other for other in stored.values()), (
            f"no stored digest for {case}: run `python tests/test_output_digests.py --update`")
        pytest.skip(f"{case}'s output changed on purpose on another CPU kind and has not been "
                    f"recorded with {_cpu()} kernels yet")
    assert merge(case, tmp_path) == mine[case], (
        f"{case}: the merged tensors changed. If that is intended, regenerate the digests "
        "(python tests/test_output_digests.py --update) and say why in the commit")


def test_every_method_has_a_digest():
    """A new method gets a digest case (a conformance recipe or an EXTRA entry)."""
    from mergesmith.methods import all_methods

    if not (CONFORMANCE / "recipes").exists():
        pytest.skip("../shared/conformance is not available")
    covered = {EXTRA[m].get("method", m) for m in EXTRA}
    for case in _conformance_cases():
        text = (CONFORMANCE / "recipes" / f"{case}.yml").read_text()
        covered |= {line.split(":", 1)[1].strip() for line in text.splitlines()
                    if line.startswith("merge_method:")}
    missing = sorted(set(all_methods()) - covered)
    assert not missing, f"methods without a digest case: {missing}; add them to EXTRA"


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--update"]:
        sys.exit(__doc__)
    import os

    os.environ.setdefault("MERGESMITH_STATS_CACHE", tempfile.mkdtemp())
    stored = _stored()
    before = stored.get(_cpu(), {})
    with tempfile.TemporaryDirectory() as tmp:
        now = {c: merge(c, Path(tmp)) for c in cases()}
    changed = sorted(c for c in now if before.get(c) != now[c])
    for cpu, digests in stored.items():
        if cpu != _cpu() and before:  # a first record of this kind changes nothing elsewhere
            dropped = [c for c in changed if digests.pop(c, None) is not None]
            if dropped:
                print(f"dropped from {cpu} (changed here, record them there): {dropped}")
    stored[_cpu()] = now
    DIGESTS.write_text(json.dumps({"digests": stored}, indent=1, sort_keys=True) + "\n")
    print(f"{len(now)} digests for {_cpu()} written to {DIGESTS}; "
          + (f"changed: {changed or 'none'}" if before else "the first set of this CPU kind"))

"""Published mergekit recipes run unchanged (``tests/data/real_recipes``).

Every recipe of the corpus that mergekit 0.1.5's own schema accepts must pass ``check`` on
tiny stand-ins (warnings allowed: they are what mergekit silently ignores); for the sample
in ``expected/``, ``run`` must give mergekit's tensors (the conformance set's comparison
and tolerances; DARE/DELLA by statistics, their random streams differ by design).
"""

from __future__ import annotations

import importlib.util
import io
import json
import warnings
from contextlib import redirect_stdout

import pytest
from conftest import CONFORMANCE
from real_recipes import EXPECTED, TOKENIZER, corpus, on_standins, schema_accepted

import mergesmith

pytestmark = pytest.mark.skipif(not (TOKENIZER / "tokenizer.json").exists(),
                                reason="../shared/conformance (the stand-ins' tokenizer) "
                                       "is not available")

ACCEPTED = [p for p in corpus() if p.name in schema_accepted()]
SAMPLE = sorted(p.name for p in EXPECTED.iterdir()) if EXPECTED.exists() else []


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return tmp_path_factory.mktemp("standins")


def test_the_corpus_is_there():
    assert len(ACCEPTED) >= 100, f"only {len(ACCEPTED)} recipes mergekit accepts"
    assert len(SAMPLE) >= 20


@pytest.mark.parametrize("path", ACCEPTED, ids=[p.stem for p in ACCEPTED])
def test_every_recipe_mergekit_accepts_checks(path, standins):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mergesmith.check(on_standins(path.read_text(), standins), threads=1)


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("conformance_compare",
                                                  CONFORMANCE / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", SAMPLE)
def test_sample_gives_mergekits_tensors(case, standins, compare, tmp_path):
    from real_recipes import CONFIGS, layers_needed

    text = (CONFIGS / f"{case}.yml").read_text()
    out = tmp_path / "out"
    mergesmith.run(on_standins(text, standins), out, seed=42)
    expected = EXPECTED / case
    kind = json.loads((expected / "case.json").read_text())["kind"]
    base = standins / f"L{layers_needed(text)}" / "m0"
    buf = io.StringIO()
    with redirect_stdout(buf):
        status = compare([str(expected), str(out), "--kind", kind, "--base", str(base),
                          "--no-tokenizer"])
    assert status == 0, buf.getvalue()

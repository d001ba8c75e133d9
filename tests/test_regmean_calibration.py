"""A ``calibration:`` block feeds the data-aware methods: the statistics are computed from
it (the same tokens through every model), cached, and the merge equals RegMean's closed
form on those statistics; bad calibration input is exit 2 before any weight is read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

from conftest import LLAMA, random_tensors, recipe_file, run_cli  # noqa: E402
from test_evaluate import TEXT, tiny_lm  # noqa: E402

import mergesmith  # noqa: E402
from mergesmith.statistics.calibration import common_tokens, settings_from  # noqa: E402
from mergesmith.statistics.collect import compute_statistics  # noqa: E402


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGESMITH_STATS_CACHE", str(tmp_path / "stats-cache"))
    monkeypatch.setenv("MERGESMITH_EVAL_CACHE", str(tmp_path / "eval-cache"))


def _setup(tmp_path: Path) -> tuple[Path, list[Path], Path]:
    base = random_tensors(LLAMA, 0)
    models = [tiny_lm(tmp_path / "a", 1, base=base, scale=0.05),
              tiny_lm(tmp_path / "b", 2, base=base, scale=0.05)]
    text = tmp_path / "calib.txt"
    text.write_text(TEXT * 3)
    recipe = recipe_file(tmp_path, f"""merge_method: regmean
models:
  - model: {models[0]}
  - model: {models[1]}
parameters: {{alpha: 0.9}}
dtype: float32
calibration: {{text: {text}, max_tokens: 200, max_length: 48, batch_size: 2}}
""")
    return recipe, models, text


def test_calibration_block_gives_the_closed_form(tmp_path):
    recipe, models, text = _setup(tmp_path)
    out = tmp_path / "out"
    mergesmith.run(recipe, out)
    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(f))
    settings = settings_from({"text": str(text), "max_tokens": 200, "max_length": 48,
                              "batch_size": 2})
    tokens = common_tokens(settings, [(str(m), str(m)) for m in models])
    stats = [compute_statistics(str(m), tokens, kinds={"gram"}) for m in models]
    assert all(s.cached for s in stats)  # the merge computed and cached them
    name = "model.layers.0.self_attn.q_proj.weight"
    weights = [load_file(next(m.glob("*.safetensors")))[name].double() for m in models]
    grams = []
    for s in stats:
        g = s.gram(name).double()
        grams.append(0.9 * g + 0.1 * torch.diag(torch.diagonal(g)))
    expected = torch.linalg.solve(sum(grams), sum(w @ g for w, g in zip(weights, grams)).T).T
    torch.testing.assert_close(merged[name].double(), expected, rtol=2e-5, atol=1e-6)


def test_missing_calibration_file_is_exit_2(tmp_path):
    recipe, _, text = _setup(tmp_path)
    text.unlink()
    proc = run_cli("run", str(recipe), str(tmp_path / "out"), "-q")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "calib" in proc.stderr
    assert not (tmp_path / "out").exists()

"""Published mergekit-moe configs (tests/data/real_moe_configs, with their sources) run
unchanged on stand-in experts: every model reference is replaced by a tiny Llama (or Qwen3
for ``architecture: qwen3``) of tests/moe_inputs.py; everything else is the config as
published. What mergekit 0.1.5's own schema accepts (schema.tsv) must build a model that
loads; what it rejects must be one clear error here too."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import moe_inputs  # noqa: E402

import mergesmith.api  # noqa: E402
from mergesmith import MergeError  # noqa: E402

DATA = Path(__file__).parent / "data" / "real_moe_configs"
SCHEMA = {row["file"]: row for row in csv.DictReader(
    (DATA / "schema.tsv").read_text().splitlines(), delimiter="\t")}
CONFIGS = sorted(p.name for p in DATA.glob("*.yml"))
STAND_INS = {"llama": ["llama_base", "llama_e0", "llama_e1", "llama_e2", "llama_e3"],
             "qwen3": ["qwen3_base", "qwen3_e0", "qwen3_e1"]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-moe") / "inputs"
    moe_inputs.write_all(root)
    return root


def with_stand_ins(data: dict, inputs: Path) -> dict:
    """The config with each distinct model reference replaced by a stand-in (in order of
    appearance, reused cyclically when there are more references than stand-ins)."""
    family = "qwen3" if str(data.get("architecture", "")).startswith("qwen3") else "llama"
    names = STAND_INS[family]
    chosen: dict[str, str] = {}

    def stand_in(ref) -> str:
        key = json.dumps(ref, sort_keys=True)
        if key not in chosen:
            chosen[key] = str(inputs / names[len(chosen) % len(names)])
        return chosen[key]

    data = dict(data)
    for key in ("base_model", "yamlbase_model"):  # 010.yml spells it so (mergekit rejects it)
        if key in data:
            data[key] = stand_in(data[key])
    for group in ("experts", "shared_experts"):
        for e in data.get(group) or []:
            if isinstance(e, dict) and "source_model" in e:
                e["source_model"] = stand_in(e["source_model"])
    return data


def test_the_corpus_is_large_enough():
    assert len(CONFIGS) >= 15
    assert sum(SCHEMA[c]["schema"] == "accepted" for c in CONFIGS) >= 15


@pytest.mark.parametrize("name", CONFIGS)
def test_real_moe_config_runs_on_stand_ins(name, inputs, tmp_path):
    data = with_stand_ins(yaml.safe_load((DATA / name).read_text()), inputs)
    if SCHEMA[name]["schema"] != "accepted":  # mergekit's schema rejects it: so do we
        with pytest.raises(MergeError):
            mergesmith.api.run_moe(data, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        return
    out = tmp_path / "out"
    mergesmith.api.run_moe(data, out, seed=0)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"][0].endswith("ForCausalLM")
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 20]])).logits
    assert torch.isfinite(logits).all()

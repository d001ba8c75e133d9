"""Multi-stage recipes (mergekit-multi's format): fused execution equals running the stages
one after another and reading the written intermediates back, byte for byte; nothing is
written unless asked (or needed); the stage graph's errors are one line and exit code 2."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
from conftest import LLAMA, failing_pwrite, random_tensors, run_cli, write_model

import mergesmith.api as api
import mergesmith.execute as ex
from mergesmith.errors import MergeError, MergeIOError

THREE_STAGES = """\
name: tied
merge_method: ties
base_model: base
models:
  - model: ft1
    parameters: {weight: 0.6, density: 0.5}
  - model: ft2
    parameters: {weight: 0.4, density: 0.7}
dtype: bfloat16
---
name: blended
merge_method: slerp
base_model: tied
models:
  - model: tied
  - model: ft3
parameters:
  t: [0, 0.5, 1]
dtype: bfloat16
---
merge_method: task_arithmetic
base_model: base
models:
  - model: blended
    parameters:
      weight:
        - filter: mlp
          value: 0.8
        - filter: self_attn
          value: 1.2
        - value: 1.0
  - model: ft1
    parameters: {weight: 0.3}
dtype: bfloat16
"""


@pytest.fixture
def work(tmp_path: Path, monkeypatch) -> Path:
    """bfloat16 base and three fine-tunes in the working folder (as mergekit-multi's
    configs name them: relative paths)."""
    base = random_tensors(LLAMA, 0)
    write_model(tmp_path / "base", base, dtype=torch.bfloat16)
    for k in (1, 2, 3):
        write_model(tmp_path / f"ft{k}", random_tensors(LLAMA, k, base, scale=0.02 * k),
                    dtype=torch.bfloat16)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_by_one(text: str, names: list[str]) -> None:
    """Each document run on its own into the folder of its name: later documents then
    read that folder (the same relative path as the stage name)."""
    for doc, name in zip(text.split("\n---\n"), names):
        api.run(doc, name, overwrite=True)


def data(folder: str | Path) -> bytes:
    return (Path(folder) / "model.safetensors").read_bytes()


def test_fused_three_stages_equal_the_stages_run_one_by_one(work):
    api.run(THREE_STAGES, "fused")
    one_by_one(THREE_STAGES, ["tied", "blended", "final"])
    assert data("fused") == data("final")
    assert (work / "fused" / "config.json").read_text() == \
        (work / "final" / "config.json").read_text()
    # the whole multi-document recipe is saved with the model
    assert (work / "fused" / "mergesmith_config.yml").read_text() == THREE_STAGES


def test_fused_run_writes_no_intermediate(work, tmp_path_factory, monkeypatch):
    import tempfile

    scratch = tmp_path_factory.mktemp("tmpdir")
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    (work / "multi.yml").write_text(THREE_STAGES)
    before = {p.relative_to(work) for p in work.rglob("*")}
    api.run("multi.yml", "out")
    after = {p.relative_to(work) for p in work.rglob("*")}
    new = after - before
    assert new and all(p.parts[0] == "out" for p in new), sorted(map(str, new))
    assert not list(scratch.iterdir())  # nor in the temporary folder


def test_keep_intermediates_equal_separate_runs(work):
    api.run(THREE_STAGES, "fused", keep_intermediates="kept")
    one_by_one(THREE_STAGES, ["tied", "blended", "final"])
    assert sorted(os.listdir("kept")) == ["blended", "tied"]
    for name in ("tied", "blended"):
        assert data(work / "kept" / name) == data(name)
    assert data("fused") == data("final")
    assert not (work / "fused.partial").exists()


def test_chunked_random_stages_equal_separate_runs(work, monkeypatch):
    """Row chunks (forced small) and a random method: the element-wise middle stage is
    computed in its own row chunks and a whole-tensor read (TIES) gets them concatenated;
    DARE is seeded per tensor as in its own run; out_dtype float32 in the middle rounds
    there, not to the final dtype."""
    monkeypatch.setattr(ex, "CHUNK_ELEMENTS", 256)
    text = """\
name: dared
merge_method: dare_ties
base_model: base
models:
  - model: ft1
    parameters: {weight: 0.5, density: 0.6}
  - model: ft2
    parameters: {weight: 0.5, density: 0.6}
dtype: bfloat16
seed: 7
---
name: wide
merge_method: linear
models:
  - model: dared
    parameters: {weight: 0.7}
  - model: ft3
    parameters: {weight: 0.3}
dtype: bfloat16
out_dtype: float32
---
merge_method: ties
base_model: base
models:
  - model: wide
    parameters: {weight: 1.0, density: 0.5}
dtype: float32
out_dtype: bfloat16
"""
    api.run(text, "fused")
    one_by_one(text, ["dared", "wide", "final"])
    assert data("fused") == data("final")


def test_slices_read_from_a_stage(work):
    """A stage as a slice source (a frankenmerge of a merged model)."""
    text = """\
name: avg
merge_method: linear
models:
  - model: ft1
    parameters: {weight: 0.5}
  - model: ft2
    parameters: {weight: 0.5}
---
merge_method: passthrough
slices:
  - sources: [{model: avg, layer_range: [0, 2]}]
  - sources: [{model: ft3, layer_range: [1, 3]}]
"""
    api.run(text, "fused")
    one_by_one(text, ["avg", "final"])
    assert data("fused") == data("final")


def test_stage_option_builds_one_named_stage(work):
    api.run(THREE_STAGES, "only", stage="blended")
    one_by_one(THREE_STAGES, ["tied", "blended"])
    assert data("only") == data("blended")
    with pytest.raises(MergeError, match="no stage of that name.*tied, blended"):
        api.plan(THREE_STAGES, stage="nope")


def test_python_api_takes_a_list_of_mappings(work):
    import yaml

    docs = [yaml.safe_load(d) for d in THREE_STAGES.split("\n---\n")]
    p = api.plan(docs)
    assert [s.name for s in p.stages] == ["tied", "blended", None]
    api.run(docs, "fused")
    one_by_one(THREE_STAGES, ["tied", "blended", "final"])
    assert data("fused") == data("final")


def test_check_shows_the_stage_graph(work):
    (work / "multi.yml").write_text(THREE_STAGES)
    r = run_cli("check", "multi.yml", cwd=work)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "stages:        3 in order (2 intermediate stage(s) fused" in out
    assert "1. tied (document 1, ties): reads base, ft1, ft2 → fused" in out
    assert "2. blended (document 2, slerp): reads tied, ft3 → fused" in out
    assert "3. (unnamed) (document 3, task_arithmetic): reads base, blended, ft1 → the output" \
        in out
    assert "blended: 30 tensors" in out and "computed by its stage as it is read" in out


def test_a_stage_that_cannot_be_fused_is_written_first(work):
    """An FP8 intermediate (an encoded output) is merged into OUT.partial/.stages first;
    check says so; the result still equals the separate runs and nothing stays behind."""
    text = """\
name: fp8
merge_method: linear
models:
  - model: ft1
    parameters: {weight: 0.5}
  - model: ft2
    parameters: {weight: 0.5}
out_dtype: float8_e4m3fn
---
merge_method: task_arithmetic
base_model: base
models:
  - model: fp8
    parameters: {weight: 1.0}
dtype: bfloat16
"""
    summary = api.check(text).summary()
    assert "written first to OUT.partial/.stages/fp8 because its output is encoded" in summary
    api.run(text, "fused")
    one_by_one(text, ["fp8", "final"])
    assert data("fused") == data("final")
    assert sorted(os.listdir(work)) == ["base", "final", "fp8", "ft1", "ft2", "ft3", "fused"]


def test_resume_across_stages(work, monkeypatch):
    (work / "multi.yml").write_text(THREE_STAGES)
    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", failing_pwrite(12))
        with pytest.raises(MergeIOError):
            api.run("multi.yml", "out", threads=1)
    assert (work / "out.partial" / "mergesmith_progress.log").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "nothing to resume"
        api.run("multi.yml", "out", resume=True, threads=1)
    one_by_one(THREE_STAGES, ["tied", "blended", "final"])
    assert data("out") == data("final")


def test_resume_refuses_a_changed_intermediate_stage(work, monkeypatch):
    (work / "multi.yml").write_text(THREE_STAGES)
    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", failing_pwrite(12))
        with pytest.raises(MergeIOError):
            api.run("multi.yml", "out", threads=1)
    # ft2 is read only by the first stage: the fingerprint covers every stage's inputs
    write_model(work / "ft2", random_tensors(LLAMA, 9, random_tensors(LLAMA, 0)),
                dtype=torch.bfloat16)
    with pytest.raises(MergeError, match="interrupted merge of a different recipe"):
        api.run("multi.yml", "out", resume=True, threads=1)


def test_peak_memory_estimate_counts_the_stages(work):
    one = api.check(THREE_STAGES.split("\n---\n")[0])
    three = api.check(THREE_STAGES)
    assert three.peak_memory > one.peak_memory  # the computed inputs are in flight too


# ------------------------------------------------------------------ errors (one line, exit 2)


def _error(work: Path, text: str, *args: str) -> str:
    (work / "bad.yml").write_text(text)
    r = run_cli("run", "bad.yml", "out", *args, cwd=work)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not (work / "out").exists() and not (work / "out.partial").exists()
    return lines[0]


LINEAR = "merge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\n"


def test_cycle_is_one_line(work):
    text = ("name: a\n" + LINEAR.format(a="b", b="ft1") + "---\nname: b\n"
            + LINEAR.format(a="a", b="ft2") + "---\n" + LINEAR.format(a="b", b="ft3"))
    line = _error(work, text)
    assert "the stages form a cycle" in line and ("a → b → a" in line or "b → a → b" in line)


def test_self_reference_is_a_cycle(work):
    line = _error(work, "name: a\n" + LINEAR.format(a="a", b="ft1") + "---\n"
                  + LINEAR.format(a="a", b="ft2"))
    assert "cycle: a → a" in line


def test_duplicate_name_is_one_line(work):
    line = _error(work, "name: a\n" + LINEAR.format(a="ft1", b="ft2") + "---\nname: a\n"
                  + LINEAR.format(a="ft2", b="ft3") + "---\n" + LINEAR.format(a="a", b="ft1"))
    assert "documents 1 and 2 are both named 'a'" in line


def test_two_unnamed_stages_is_one_line(work):
    line = _error(work, "name: a\n" + LINEAR.format(a="ft1", b="ft2") + "---\n"
                  + LINEAR.format(a="a", b="ft3") + "---\n" + LINEAR.format(a="a", b="ft1"))
    assert "documents 2, 3 have no 'name:'" in line


def test_unknown_stage_option_is_one_line(work):
    line = _error(work, THREE_STAGES, "--stage", "nope")
    assert "--stage 'nope'" in line and "tied, blended" in line


def test_unknown_name_is_a_missing_model(work):
    line = _error(work, "name: a\n" + LINEAR.format(a="ft1", b="ft2") + "---\n"
                  + LINEAR.format(a="ab", b="ft3"))
    assert "model folder not found: ab" in line or "'ab'" in line


# ------------------------------------------------------------------ published configs

REAL = Path(__file__).parent / "data" / "multi" / "real"


def _on_standins(text: str, root: Path) -> str:
    """A multi-document recipe with every model path that is not a stage name replaced
    by a stand-in (``real_recipes.on_standins``, per document)."""
    import re

    import yaml
    from real_recipes import layers_needed, model_paths, write_standin

    docs = text.split("\n---\n")
    names = {d.get("name") for d in map(yaml.safe_load, docs) if isinstance(d, dict)}
    layers = layers_needed(text)
    paths: list[str] = []
    for doc in docs:
        paths += [p for p in model_paths(doc)[0] if p not in names and p not in paths]
    folders = {p: write_standin(root / f"L{layers}" / f"m{k}", layers, k)
               for k, p in enumerate(paths)}
    for path in sorted(folders, key=len, reverse=True):
        pattern = re.compile(r"(?<![\w./-])" + re.escape(path) + r"(?![\w.-])")
        text = pattern.sub(lambda _, f=str(folders[path]): f, text)
    return text


REAL_RUNS = {"001_mergekit-mega.yml": ("ties", ["gradient-slerp", "gradient-slerp-ties"]),
             "002_mergekit-docs-multimerge.yml": ("dare_ties",
                                                  ["first-merge", "second-merge", None]),
             "003_kansensakura-zero-rp.yml": ("passthrough",
                                              ["knowledge_core", "rp_blend", None])}


@pytest.mark.parametrize("name", sorted(REAL_RUNS))
def test_published_multi_stage_configs_run_on_standins(name, tmp_path):
    from real_recipes import TOKENIZER

    if not (TOKENIZER / "tokenizer.json").exists():
        pytest.skip("../shared/conformance (the stand-ins' tokenizer) is not available")
    method, stages = REAL_RUNS[name]
    text = _on_standins((REAL / name).read_text(), tmp_path / "standins")
    report = api.check(text)
    assert [s.name for s in report.plan.stages] == stages
    assert report.plan.method.name == method
    assert "stages:" in report.summary()
    result = api.run(text, tmp_path / "out", keep_intermediates=tmp_path / "kept")
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path / "kept")) == sorted(s for s in stages[:-1])
    assert result.plan.stages[-1].name == stages[-1]


def test_the_old_mega_format_is_refused(tmp_path):
    text = (REAL / "004_mergekit-mega-out-path.yml").read_text()
    with pytest.raises(MergeError, match="documents 1, 2 have no 'name:'"):
        api.plan(text)


def test_a_stage_with_a_new_vocabulary_is_written_first(tmp_path, monkeypatch):
    """``tokenizer_source: union`` on an intermediate stage: its embeddings are re-indexed
    whole, so it is written first (check says so); the next stage reads its vocabulary and
    the result equals the separate runs."""
    pytest.importorskip("tokenizers")
    from test_tokenizer import CORPUS_A, bpe, make_model

    base_tok = bpe(CORPUS_A)
    _, base_t = make_model(tmp_path / "base", base_tok, 0)
    chat_tok = bpe(CORPUS_A)
    chat_tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    make_model(tmp_path / "chat", chat_tok, 1, base_t)
    monkeypatch.chdir(tmp_path)
    text = """\
name: u
merge_method: linear
base_model: base
models:
  - {model: base, parameters: {weight: 0.5}}
  - {model: chat, parameters: {weight: 0.5}}
tokenizer_source: union
---
merge_method: linear
models:
  - {model: u, parameters: {weight: 0.7}}
  - {model: chat, parameters: {weight: 0.3}}
tokenizer_source: u
"""
    assert "written first to OUT.partial/.stages/u because its vocabulary is rebuilt" in \
        api.check(text).summary()
    api.run(text, "fused")
    one_by_one(text, ["u", "final"])
    assert data("fused") == data("final")
    assert (tmp_path / "fused" / "tokenizer.json").read_text() == \
        (tmp_path / "final" / "tokenizer.json").read_text()
    assert not (tmp_path / "fused" / ".stages").exists()


def test_cli_keep_intermediates_and_check_stage(work):
    (work / "multi.yml").write_text(THREE_STAGES)
    r = run_cli("run", "multi.yml", "out", "--keep-intermediates", "kept", "--quiet", cwd=work)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(work / "kept")) == ["blended", "tied"]
    r = run_cli("check", "multi.yml", "--stage", "tied", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "stages:        1 in order" in r.stdout and "merge_method ties" in r.stdout
    r = run_cli("run", "--help")
    assert "--keep-intermediates" in r.stdout and "--stage" in r.stdout


def test_diamond_of_stages_with_a_lora_input(tmp_path, monkeypatch):
    """Two stages read the same stage (computed for each), one input is base+LoRA (applied
    inside the computed stage): still the separate runs' bytes."""
    from real_recipes import TOKENIZER, write_standin, write_standin_lora

    if not (TOKENIZER / "tokenizer.json").exists():
        pytest.skip("../shared/conformance (the stand-ins' tokenizer) is not available")
    for k in range(3):
        write_standin(tmp_path / f"m{k}", 4, k)
    write_standin_lora(tmp_path / "lora", 4, 1)
    monkeypatch.chdir(tmp_path)
    text = """\
name: s
merge_method: linear
models:
  - {model: m1, parameters: {weight: 0.5}}
  - {model: m0+lora, parameters: {weight: 0.5}}
---
name: a
merge_method: slerp
base_model: s
models: [{model: s}, {model: m2}]
parameters: {t: 0.3}
---
name: b
merge_method: task_arithmetic
base_model: m0
models: [{model: s, parameters: {weight: 1.5}}]
---
merge_method: linear
models:
  - {model: a, parameters: {weight: 0.5}}
  - {model: b, parameters: {weight: 0.5}}
dtype: bfloat16
"""
    p = api.plan(text)
    assert [s.name for s in p.stages] == ["s", "a", "b", None]
    api.run(text, "fused")
    one_by_one(text, ["s", "a", "b", "final"])
    assert data("fused") == data("final")

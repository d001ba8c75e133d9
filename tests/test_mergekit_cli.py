"""``mergesmith mergekit-yaml`` (console script ``mergesmith-yaml``): mergekit 0.1.5's command
line runs unchanged; every one of its flags is carried out, accepted with a note, or refused
with a reason; ``--out-shard-size`` means what it means in mergekit."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import (LLAMA, failing_pwrite, load_model, random_tensors, recipe_file, run_cli,
                      write_model)
from safetensors import safe_open

import mergesmith
from mergesmith import MergeError
from mergesmith.cli import cli
from mergesmith.mergekit_cli import (MAPPED, MERGEKIT_YAML_FLAGS, NOTED, REFUSED,
                                     mergekit_options, mergekit_yaml)
from mergesmith.units import parse_mergekit_size, parse_size

MERGEKIT_0_1_5_FLAGS = [
    # copied from `mergekit-yaml --help` of mergekit 0.1.5, section by section
    "--allow-crimes", "--no-allow-crimes",
    "--unsafe-truncate-embeddings", "--no-unsafe-truncate-embeddings",
    "--trust-remote-code", "--no-trust-remote-code",
    "--transformers-cache", "--lora-merge-cache",
    "--lora-merge-dtype", "--random-seed", "-v", "--quiet", "--no-quiet",
    "--cuda", "--no-cuda", "--device", "--low-cpu-memory", "--no-low-cpu-memory",
    "--lazy-unpickle", "--no-lazy-unpickle", "--read-to-gpu", "--no-read-to-gpu",
    "--multi-gpu", "--no-multi-gpu", "-j", "--num-threads", "--gpu-rich",
    "--async-write", "--no-async-write", "--write-threads",
    "--out-shard-size", "--copy-tokenizer", "--no-copy-tokenizer",
    "--clone-tensors", "--no-clone-tensors", "--write-model-card", "--no-write-model-card",
    "--safe-serialization", "--no-safe-serialization",
]

VALUES = {"--transformers-cache": "hf-cache", "--lora-merge-cache": "lora-cache",
          "--lora-merge-dtype": "bfloat16", "--random-seed": "7", "--device": "cpu",
          "-j": "2", "--num-threads": "2", "--write-threads": "2", "--out-shard-size": "30K"}
"""A value for each flag that takes one."""

GPU_FLAGS = {"--cuda", "--multi-gpu", "--gpu-rich"}
HAS_GPU = torch.cuda.is_available()


def spellings(flag) -> list[str]:
    return [s for decl in flag.decls for s in decl.split("/")]


def by_spelling() -> dict[str, object]:
    return {s: f for f in MERGEKIT_YAML_FLAGS for s in spellings(f)}


def invoke(*args: str, command=mergekit_yaml):
    return CliRunner().invoke(command, list(args))


@pytest.fixture
def lazy(tmp_path, monkeypatch):
    """LazyMergekit's setup: two fine-tunes of one base in bfloat16, its slerp recipe as
    config.yaml, and the current folder where the notebook runs."""
    base = random_tensors(LLAMA, 0)
    write_model(tmp_path / "model_a", random_tensors(LLAMA, 1, base), dtype=torch.bfloat16)
    write_model(tmp_path / "model_b", random_tensors(LLAMA, 2, base), dtype=torch.bfloat16)
    (tmp_path / "model_a" / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    recipe_file(tmp_path, """slices:
  - sources:
      - model: model_a
        layer_range: [0, 3]
      - model: model_b
        layer_range: [0, 3]
merge_method: slerp
base_model: model_a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""", name="config.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- the flag table ------------------------------------------------------------------------

def test_every_mergekit_flag_has_a_decision():
    table = by_spelling()
    missing = [s for s in MERGEKIT_0_1_5_FLAGS if s not in table]
    assert not missing, f"mergekit-yaml flags without a decision: {missing}"
    assert set(table) == set(MERGEKIT_0_1_5_FLAGS)  # and no invented ones
    for flag in MERGEKIT_YAML_FLAGS:
        assert flag.kind in (MAPPED, NOTED, REFUSED)
        assert flag.help.strip()
        if flag.kind == NOTED:
            assert flag.note.startswith(spellings(flag)[-1] if flag.default is True
                                        else spellings(flag)[0])


def test_table_matches_installed_mergekit():
    """When mergekit is importable, its own option list is the reference."""
    options = pytest.importorskip("mergekit.options")
    fields = options.MergeOptions.model_fields
    assert {f.name for f in MERGEKIT_YAML_FLAGS} == set(fields)
    for flag in MERGEKIT_YAML_FLAGS:
        default = (parse_mergekit_size(flag.default) if flag.name == "out_shard_size"
                   else flag.default)
        assert default == fields[flag.name].default, flag.name


@pytest.mark.parametrize("spelling", MERGEKIT_0_1_5_FLAGS)
def test_each_flag_is_mapped_noted_or_refused(lazy, spelling):
    flag = by_spelling()[spelling]
    args = [spelling] + ([VALUES[spelling]] if spelling in VALUES else [])
    result = invoke("config.yaml", "merge", *args)
    negative = spelling.startswith("--no-")
    if flag.kind == REFUSED and not negative:
        assert result.exit_code == 2, result.output
        assert "never runs code from a model repository" in result.stderr
        assert "Traceback" not in result.output and not (lazy / "merge").exists()
        return
    if spelling in GPU_FLAGS and not HAS_GPU:
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith(f"error: {spelling}: no CUDA GPU")
        return
    assert result.exit_code == 0, (result.output, result.exception)
    assert (lazy / "merge" / "config.json").exists()
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: --")]
    if flag.note and not negative and flag.default is not True \
            and VALUES.get(spelling) != str(flag.default):
        assert notes == [f"note: {flag.note}"], result.stderr
    elif flag.note and negative and flag.default is True:
        assert notes == [f"note: {flag.note}"], result.stderr
    else:
        assert notes == [], result.stderr  # the default or a mapped flag: nothing to say


def test_help_groups_flags_by_what_mergesmith_does():
    text = invoke("--help").output
    sections = ["mergekit options mergesmith carries out",
                "mergekit options accepted with no effect",
                "mergekit options refused", "mergesmith options (not in mergekit)"]
    positions = [text.index(s) for s in sections]
    assert positions == sorted(positions)
    kinds = {MAPPED: 0, NOTED: 1, REFUSED: 2}
    for flag in MERGEKIT_YAML_FLAGS:
        # an option's line starts with two spaces (wrapped help text with more)
        line = re.compile(r"^  (-\w, )?" + re.escape(flag.decls[0].split("/")[0]) + r"\b", re.M)
        at = line.search(text).start()
        section = kinds[flag.kind]
        assert positions[section] < at < positions[section + 1], flag.name
    assert "Exit codes" in text and "--out-shard-size 1B --lazy-unpickle" in text


# -- the mapping ---------------------------------------------------------------------------

def test_mapped_flags_set_the_options():
    options, notes = mergekit_options({
        "random_seed": 7, "num_threads": 3, "device": "cpu", "out_shard_size": "2B",
        "allow_crimes": True, "unsafe_truncate_embeddings": True, "copy_tokenizer": False,
        "write_model_card": False, "quiet": True, "overwrite": True, "resume": True,
        "memory_limit": "8G", "compute_dtype": "float64", "strict_finite": True,
        "no_evaluate": True})
    assert notes == []
    assert (options.seed, options.threads, options.device) == (7, 3, "cpu")
    assert options.out_shard_size == 2_000_000_000
    assert options.allow_crimes and options.unsafe_truncate_embeddings
    assert not options.copy_tokenizer and not options.write_model_card
    assert options.overwrite and options.resume and options.strict_finite
    assert options.memory_limit == 8_000_000_000 and options.compute_dtype == torch.float64
    assert not options.evaluate and not options.eval_progress
    default, _ = mergekit_options({})
    assert default.out_shard_size == 5_000_000_000  # mergekit's default, 5B
    assert default.copy_tokenizer and default.write_model_card and default.device == "cpu"


def test_device_overrides_cuda_as_in_mergekit():
    options, _ = mergekit_options({"cuda": True, "device": "cpu"})
    assert options.device == "cpu"


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_multi_gpu_uses_every_visible_gpu():
    every = ",".join(str(i) for i in range(torch.cuda.device_count()))
    for values in ({"multi_gpu": True}, {"gpu_rich": True}, {"multi_gpu": True, "device": "cpu"}):
        assert mergekit_options(values)[0].device == every
    assert mergekit_options({"cuda": True})[0].device == "cuda"


def test_trust_remote_code_is_refused_with_the_reason(lazy):
    with pytest.raises(MergeError, match="never runs code"):
        mergekit_options({"trust_remote_code": True})
    result = invoke("config.yaml", "merge", "--trust-remote-code", "--allow-crimes")
    assert result.exit_code == 2
    text = result.stderr.strip()
    assert text.startswith("error: --trust-remote-code is refused") and len(text.splitlines()) == 1
    assert "does not need it" in text
    assert not (lazy / "merge").exists() and not (lazy / "merge.partial").exists()


# -- running -------------------------------------------------------------------------------

def test_lazymergekit_command_line(lazy):
    """The command LazyMergekit's notebook runs, unchanged, through the console entry."""
    result = run_cli("mergekit-yaml", "config.yaml", "merge", "--copy-tokenizer",
                     "--allow-crimes", "--out-shard-size", "1B", "--lazy-unpickle", cwd=lazy)
    assert result.returncode == 0, result.stderr
    assert "note: --lazy-unpickle: no effect" in result.stderr
    assert "wrote merge: 30 tensors" in result.stdout
    out = lazy / "merge"
    assert (out / "model.safetensors").exists()  # far less than 10⁹ bytes: one file
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "mergesmith_config.yml", "generation_config.json"):
        assert (out / name).exists(), name
    reference = lazy / "reference"
    mergesmith.run(lazy / "config.yaml", reference)
    got, want = load_model(out), load_model(reference)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert all(t.dtype == torch.bfloat16 for t in got.values())


def _files(out: Path) -> dict[str, list[str]]:
    """Tensor names per output file."""
    files = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            files[f.name] = list(st.keys())
    return files


def test_out_shard_size_counts_bytes_as_mergekit_does(lazy):
    """mergekit 0.1.5's writer compares --out-shard-size with numel·element_size, so 30K
    is at most 30,000 bytes per file; shards are filled greedily in writing order."""
    result = invoke("config.yaml", "merge", "--out-shard-size", "30K", "--quiet")
    assert result.exit_code == 0, result.output
    limit = 30_000
    files = _files(lazy / "merge")
    nbytes = {n: t.numel() * t.element_size() for n, t in load_model(lazy / "merge").items()}
    assert len(files) > 1
    for names in files.values():
        assert sum(nbytes[n] for n in names) <= limit or len(names) == 1
    # the greedy packing: in the plan's writing order, a file ends only when the next
    # tensor would not fit
    order = [t.name for t in mergesmith.plan(lazy / "config.yaml").tensors]
    expected, size = [[]], 0
    for name in order:
        if expected[-1] and size + nbytes[name] > limit:
            expected.append([])
            size = 0
        expected[-1].append(name)
        size += nbytes[name]
    assert [sorted(names) for names in files.values()] == [sorted(g) for g in expected]
    index = json.loads((lazy / "merge" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(order)


def test_out_shard_size_zero_is_one_file(lazy):
    result = invoke("config.yaml", "merge", "--out-shard-size", "0", "--quiet")
    assert result.exit_code == 0, result.output
    assert list(_files(lazy / "merge")) == ["model.safetensors"]


@pytest.mark.parametrize("text, expected", [
    ("5B", 5 * 10**9), ("1b", 10**9), ("500M", 500 * 10**6), ("30K", 30_000), ("30k", 30_000),
    ("1000", 1000), ("0", 0), (12345, 12345),
    # beyond mergekit's forms, byte sizes as mergesmith writes them
    ("1.5B", 1_500_000_000), ("2GB", 2 * 10**9), ("4GiB", 4 * 2**30), ("5G", 5 * 10**9)])
def test_mergekit_size_forms(text, expected):
    assert parse_mergekit_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1B", "1.5.B", "B", "1 T B"])
def test_bad_mergekit_size_is_a_user_error(lazy, text):
    result = invoke("config.yaml", "merge", "--out-shard-size", text)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and "--out-shard-size" in result.stderr


def test_no_copy_tokenizer_and_no_model_card(lazy):
    result = invoke("config.yaml", "merge", "--no-copy-tokenizer", "--no-write-model-card",
                    "--quiet")
    assert result.exit_code == 0, result.output
    out = lazy / "merge"
    for name in ("tokenizer.json", "tokenizer_config.json", "README.md"):
        assert not (out / name).exists(), name
    for name in ("config.json", "generation_config.json", "mergesmith_config.yml"):
        assert (out / name).exists(), name
    assert mergesmith.verify(out) == []


def test_no_copy_tokenizer_drops_the_chat_template_with_a_warning(lazy):
    text = (lazy / "config.yaml").read_text() + "chat_template: chatml\n"
    (lazy / "config.yaml").write_text(text)
    result = invoke("config.yaml", "merge", "--no-copy-tokenizer", "--quiet")
    assert result.exit_code == 0, result.output
    assert "chat_template is not written" in result.stderr
    assert not (lazy / "merge" / "chat_template.jinja").exists()
    result = invoke("config.yaml", "kept", "--quiet")
    assert (lazy / "kept" / "chat_template.jinja").exists()


def test_verbose_prints_the_plan(lazy):
    result = invoke("config.yaml", "merge", "-v", "--quiet", "--out-shard-size", "30K")
    assert result.exit_code == 0, result.output
    assert "plan: 30 tensors in" in result.stderr
    assert "model-00001-of-" in result.stderr and "layer map" in result.stderr


def test_same_engine_as_run(lazy):
    """Same bytes as `mergesmith run`, and its exit codes: existing output 2, I/O 1."""
    assert invoke("config.yaml", "merge", "--random-seed", "3", "--quiet").exit_code == 0
    ran = CliRunner().invoke(cli, ["run", "config.yaml", "by-run", "--seed", "3", "--quiet"])
    assert ran.exit_code == 0
    for name in ("model.safetensors", "config.json", "mergesmith_checksums.json"):
        assert (lazy / "merge" / name).read_bytes() == (lazy / "by-run" / name).read_bytes()
    again = invoke("config.yaml", "merge")
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert invoke("config.yaml", "merge", "--overwrite", "--quiet").exit_code == 0


def test_io_failure_exit_1_and_resume_fingerprint(lazy, monkeypatch):
    """A full disk exits 1 and keeps OUT.partial; --resume with another --out-shard-size is
    refused (the fingerprint covers it); with the same one it finishes the same bytes."""
    args = ["config.yaml", "merge", "--out-shard-size", "30K", "-j", "1", "--quiet"]
    with monkeypatch.context() as m:
        m.setattr("mergesmith.writer.os.pwrite", failing_pwrite(8))
        result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert (lazy / "merge.partial").exists() and not (lazy / "merge").exists()
    other = invoke(*args[:3], "20K", *args[4:], "--resume")
    assert other.exit_code == 2 and "cannot be resumed" in other.stderr
    assert (lazy / "merge.partial").exists()
    resumed = invoke(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert invoke("config.yaml", "reference", "--out-shard-size", "30K", "--quiet").exit_code == 0
    assert _files(lazy / "merge") == _files(lazy / "reference")
    for name in _files(lazy / "reference"):
        assert (lazy / "merge" / name).read_bytes() == (lazy / "reference" / name).read_bytes()


def test_interrupt_exits_130(lazy, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mergesmith.api.run", interrupted)
    result = invoke("config.yaml", "merge")
    assert result.exit_code == 130 and "interrupted" in result.stderr


def test_subcommand_and_console_script():
    import subprocess

    group = CliRunner().invoke(cli, ["--help"]).output
    assert "mergekit-yaml" in group
    assert cli.get_command(None, "mergekit-yaml") is mergekit_yaml
    # what the console script does, in a fresh interpreter (the module imported first)
    script = ("import sys; sys.argv = ['mergesmith-yaml', '--help']; "
              "from mergesmith.mergekit_cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: mergesmith-yaml [OPTIONS] CONFIG OUT")
    if sys.version_info >= (3, 11):
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        scripts = tomllib.loads(pyproject.read_text())["project"]["scripts"]
        assert scripts["mergesmith-yaml"] == "mergesmith.mergekit_cli:main"


# -- `mergesmith run` keeps bytes, and refuses mergekit's count --------------------------

@pytest.mark.parametrize("text, expected", [
    ("500M", 500 * 10**6), ("2GB", 2 * 10**9), ("4GiB", 4 * 2**30), ("1.5G", 1_500_000_000),
    ("300K", 300_000), ("40KB", 40_000), ("123", 123), ("0", 0)])
def test_run_sizes_are_bytes(text, expected):
    assert parse_size(text, "--out-shard-size") == expected


@pytest.mark.parametrize("text, suggestion", [("1B", "1GB"), ("5b", "5GB"), ("0.5B", "0.5GB")])
def test_run_refuses_a_mergekit_count(lazy, text, suggestion):
    result = CliRunner().invoke(cli, ["run", "config.yaml", "merge", "--out-shard-size", text])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and message.startswith("error: ")
    assert f"write --out-shard-size {suggestion}" in message
    assert "mergesmith mergekit-yaml" in message
    assert not (lazy / "merge").exists()
    with pytest.raises(MergeError, match=f"--memory-limit {suggestion}"):
        parse_size(text, "--memory-limit")

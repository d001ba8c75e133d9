"""Crash safety: killed or interrupted merges, full disks, resume, verification."""

from __future__ import annotations

import errno
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import LLAMA, random_tensors, recipe_file, write_model

import mergesmith
from mergesmith import MergeError, MergeIOError
from mergesmith.cli import cli

BIG = dict(LLAMA, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
           num_attention_heads=8, num_key_value_heads=4, head_dim=48, vocab_size=4096)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """Base + 2 fine-tunes big enough that a merge takes a noticeable time (~60 MB each)."""
    root = tmp_path_factory.mktemp("big")
    base = random_tensors(BIG, 0)
    write_model(root / "base", base, BIG)
    write_model(root / "a", random_tensors(BIG, 1, base), BIG, shards=3)
    write_model(root / "b", random_tensors(BIG, 2, base), BIG)
    recipe = recipe_file(root, f"""merge_method: ties
base_model: {root / 'base'}
models:
  - model: {root / 'a'}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {root / 'b'}
    parameters: {{weight: 0.4, density: 0.7}}
""")
    return root, recipe


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def cli_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mergesmith", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_killed_merges_resume_to_identical_bytes(big, tmp_path):
    """SIGKILL at random points of the merge, resume, compare bytes with a clean run."""
    root, recipe = big
    args = ["--quiet", "--out-shard-size", "20MB", "--threads", "1"]
    reference = tmp_path / "reference" / "merged"  # same folder names: same model cards
    proc = cli_process("run", str(recipe), str(reference), *args)
    assert _wait_for(Path(str(reference) + ".partial") / "mergesmith_manifest.json", proc)
    start = time.time()
    assert _wait_for(reference, proc)
    merge_time = time.time() - start  # from the start of writing to the rename of OUT
    assert proc.wait() == 0
    expected = files(reference)
    rng = random.Random(1234)
    resumed = 0
    for attempt in range(5):
        out = tmp_path / f"run{attempt}" / "merged"
        proc = cli_process("run", str(recipe), str(out), *args)
        assert _wait_for(Path(str(out) + ".partial") / "mergesmith_manifest.json", proc)
        time.sleep(rng.uniform(0.05, 0.9) * merge_time)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not out.exists():  # killed before the rename (else OUT must be complete, below)
            done = subprocess.run([sys.executable, "-m", "mergesmith", "run", str(recipe),
                                   str(out), *args, "--resume"], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            resumed += "nothing to resume" not in done.stderr
        assert files(out) == expected, attempt
        assert not Path(str(out) + ".partial").exists()
    assert resumed >= 3  # the kills landed mid-merge and were resumed


def test_sigint_stops_cleanly_and_resumes(big, tmp_path):
    root, recipe = big
    out = tmp_path / "out"
    proc = cli_process("run", str(recipe), str(out), "--out-shard-size", "20MB", "--threads", "1")
    log = Path(str(out) + ".partial") / "mergesmith_progress.log"
    deadline = time.time() + 60
    while not (log.exists() and log.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    assert not out.exists() and log.exists()
    mergesmith.run(recipe, out, resume=True, out_shard_size="20MB")
    assert not mergesmith.verify(out)


def test_disk_filling_up_mid_write_then_resume(big, tmp_path, monkeypatch):
    root, recipe = big
    reference = tmp_path / "reference" / "out"
    mergesmith.run(recipe, reference, out_shard_size="20MB")
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 25:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    out = tmp_path / "out"
    monkeypatch.setattr("mergesmith.writer.os.pwrite", pwrite)
    with pytest.raises(MergeIOError, match="disk is full"):
        mergesmith.run(recipe, out, out_shard_size="20MB", threads=2)
    monkeypatch.undo()
    assert not out.exists()
    assert (Path(str(out) + ".partial") / "mergesmith_manifest.json").exists()
    mergesmith.run(recipe, out, out_shard_size="20MB", resume=True)
    assert files(out) == files(reference)


def test_file_size_limit_is_an_io_error(tmp_path):
    """A real OS limit: RLIMIT_FSIZE below the output size (EFBIG on the reservation)."""
    base = random_tensors(LLAMA, 0)
    write_model(tmp_path / "m", base)
    recipe = recipe_file(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {tmp_path / 'm'}\n")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    done = subprocess.run([sys.executable, "-m", "mergesmith", "run", str(recipe),
                           str(tmp_path / "out"), "--quiet"], capture_output=True, text=True,
                          preexec_fn=limit)
    assert done.returncode == 1, done.stderr
    assert "file size limit" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_resume_refuses_a_partial_of_another_recipe(big, tmp_path, monkeypatch):
    root, recipe = big
    out = tmp_path / "out"
    partial = Path(str(out) + ".partial")
    monkeypatch.setattr("mergesmith.writer.os.pwrite", _fail_after(5))
    with pytest.raises(MergeIOError):
        mergesmith.run(recipe, out, out_shard_size="20MB", threads=1)
    monkeypatch.undo()
    changed = recipe_file(tmp_path, recipe.read_text().replace("0.6", "0.65"))
    with pytest.raises(MergeError, match="different recipe"):
        mergesmith.run(changed, out, out_shard_size="20MB", resume=True)
    assert partial.exists()
    with pytest.warns(UserWarning, match="replacing the interrupted merge"):
        mergesmith.run(changed, out, out_shard_size="20MB")  # without --resume: starts over


def test_resume_redoes_items_whose_bytes_were_corrupted(big, tmp_path, monkeypatch):
    root, recipe = big
    reference = tmp_path / "reference" / "out"
    mergesmith.run(recipe, reference, out_shard_size="20MB")
    out = tmp_path / "out"
    monkeypatch.setattr("mergesmith.writer.os.pwrite", _fail_after(30))
    with pytest.raises(MergeIOError):
        mergesmith.run(recipe, out, out_shard_size="20MB", threads=1)
    monkeypatch.undo()
    partial = Path(str(out) + ".partial")
    shard = sorted(partial.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF  # flip a byte of a finished tensor
    shard.write_bytes(bytes(data))
    mergesmith.run(recipe, out, out_shard_size="20MB", resume=True)
    assert files(out) == files(reference)


def _fail_after(n: int):
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    return pwrite


def test_verify_command_detects_changes(tmp_path):
    base = random_tensors(LLAMA, 0)
    write_model(tmp_path / "m", base)
    recipe = recipe_file(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {tmp_path / 'm'}\n")
    out = tmp_path / "out"
    mergesmith.run(recipe, out)
    ok = CliRunner().invoke(cli, ["verify", str(out)])
    assert ok.exit_code == 0 and "intact" in ok.output
    shard = out / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    bad = CliRunner().invoke(cli, ["verify", str(out)])
    assert bad.exit_code == 1 and "sha256 differs" in bad.stderr
    (out / "model.safetensors").write_bytes(b"\x00")
    assert CliRunner().invoke(cli, ["verify", str(out)]).exit_code == 1


def test_nan_inputs_warn_by_default(tmp_path):
    base = random_tensors(LLAMA, 0)
    broken = dict(base)
    broken["model.norm.weight"] = base["model.norm.weight"].clone()
    broken["model.norm.weight"][3] = float("inf")
    write_model(tmp_path / "a", base)
    write_model(tmp_path / "b", broken)
    recipe = recipe_file(tmp_path, f"""merge_method: linear
models:
  - model: {tmp_path / 'a'}
    parameters: {{weight: 1}}
  - model: {tmp_path / 'b'}
    parameters: {{weight: 1}}
""")
    with pytest.warns(UserWarning, match="model.norm.weight.*contain NaN or Inf"):
        mergesmith.run(recipe, tmp_path / "out")
    assert (tmp_path / "out").exists()
    assert torch.isinf(torch.tensor(0.0)) == False  # noqa: E712 (sanity of the import)

"""Crash safety: killed or interrupted merges, full disks, resume, verification."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import LLAMA, failing_pwrite, random_tensors, recipe_file, write_model

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


def _default_sigint() -> None:
    """A shell that starts the tests in the background makes them ignore SIGINT, and
    children inherit that; the merge must see Ctrl-C as a user's terminal sends it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mergesmith", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _complete_lines(log: Path) -> list[str]:
    """The complete lines of a progress log (a kill can leave a torn last line)."""
    try:
        text = log.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return text.splitlines(keepends=True)[:text.count("\n")]


def _wait_for_lines(log: Path, proc: subprocess.Popen, n: int,
                    timeout: float = 300) -> list[str]:
    """Poll ``log`` until it holds at least ``n`` complete lines; return them.

    Progress, not time, decides when this returns: the timeout is only a safety net.
    """
    deadline = time.monotonic() + timeout
    while True:
        lines = _complete_lines(log)
        if len(lines) >= n:
            return lines
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the merge exited (code {proc.returncode}) with {len(lines)} of the "
                        f"{n} progress lines waited for: the kill point is wrong\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            pytest.fail(f"no progress within {timeout} s: {len(lines)} of {n} lines in {log}")
        time.sleep(0.005)  # poll interval


def test_killed_merges_resume_to_identical_bytes(big, tmp_path):
    """SIGKILL on observed progress (early, middle, late), resume each time: same bytes.

    A chain: the first run is killed after an early line of its progress log, the run
    resuming it after a middle line, the next one after a late line; the last resume
    finishes. The kill points are counts of finished work items, never times.
    """
    root, recipe = big
    args = ["--quiet", "--out-shard-size", "20MB", "--threads", "1"]
    reference = tmp_path / "reference" / "merged"  # same folder names: same model cards
    items = 0

    def count(plan):
        def update(nbytes: int, finished: bool) -> None:
            nonlocal items
            items += 1  # called once per work item, each logged once by an uninterrupted run

        return update

    mergesmith.run(recipe, reference, out_shard_size="20MB", threads=1, progress=count)
    expected = files(reference)
    kill_points = [max(1, items // 10), items // 2, items * 4 // 5]
    assert 1 <= kill_points[0] < kill_points[1] < kill_points[2] < items - 5, (kill_points, items)

    out = tmp_path / "run" / "merged"
    partial = Path(str(out) + ".partial")
    log = partial / "mergesmith_progress.log"
    manifest = partial / "mergesmith_manifest.json"
    before: list[str] = []  # complete lines left by the previous killed run
    for n in kill_points:
        resuming = bool(before)
        if resuming:  # a resumed run keeps the manifest (a fresh start writes a new one)
            st = manifest.stat()
            kept = (st.st_ino, st.st_mtime_ns, manifest.read_bytes())
        proc = cli_process("run", str(recipe), str(out), *args,
                           *(["--resume"] if resuming else []))
        lines = _wait_for_lines(log, proc, max(n, len(before) + 1))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, err
        if resuming:
            assert "nothing to resume" not in err, err
            st = manifest.stat()
            assert (st.st_ino, st.st_mtime_ns, manifest.read_bytes()) == kept, \
                "the resumed run did not reuse the partial merge"
            assert lines[:len(before)] == before, "the resumed run did not append to the log"
        lines = _complete_lines(log)  # the kill may land a few items after line n
        assert not out.exists() and partial.is_dir(), "the kill did not interrupt the merge"
        assert manifest.exists()
        assert n <= len(lines) < items, f"killed after {len(lines)} of {items} items " \
                                        f"(kill point {n})"
        before = lines
    done = subprocess.run([sys.executable, "-m", "mergesmith", "run", str(recipe), str(out),
                           *args, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "nothing to resume" not in done.stderr, done.stderr
    assert files(out) == expected
    assert not partial.exists()


def test_sigint_stops_cleanly_and_resumes(big, tmp_path):
    root, recipe = big
    out = tmp_path / "out"
    proc = cli_process("run", str(recipe), str(out), "--out-shard-size", "20MB", "--threads", "1")
    log = Path(str(out) + ".partial") / "mergesmith_progress.log"
    _wait_for_lines(log, proc, 1)
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
    monkeypatch.setattr("mergesmith.writer.os.pwrite", failing_pwrite(5))
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
    monkeypatch.setattr("mergesmith.writer.os.pwrite", failing_pwrite(30))
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

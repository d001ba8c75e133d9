"""The bad-input catalogue (tests/bad_inputs/catalogue.py) through the real CLI entry point:
exit code, one line naming the culprit and the fix, no traceback, no output folder."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest
from bad_inputs.catalogue import CASES
from click.testing import CliRunner

from mergesmith.cli import cli


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """Mount a small tmpfs (needs root); skip the test where that is impossible."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_catalogue_is_big_enough():
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, tmp_path):
    with contextlib.ExitStack() as stack:
        if case.needs == "readonly":
            stack.enter_context(tmpfs(tmp_path / "ro", "ro,size=1m"))
        elif case.needs == "tinyfs":
            stack.enter_context(tmpfs(tmp_path / "tiny", "size=64k"))
        default_out = tmp_path / "out"
        args = [a.replace("{out}", str(default_out)) for a in case.build(tmp_path)]
        out = Path(args[2]) if len(args) > 2 and args[0] == "run" else default_out
        existed = out.exists()
        before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
        result = CliRunner().invoke(cli, args)

        assert result.exit_code == case.exit_code, (result.exit_code, result.output,
                                                    result.exception)
        text = result.stderr.strip()
        lines = [line for line in text.splitlines()  # warnings and the progress bar aside
                 if not line.startswith("warning: ") and "\r" not in line
                 and not line.startswith("merging")]
        assert len(lines) == 1 and lines[0].startswith("error: "), text
        assert "Traceback" not in result.output
        for fragment in case.fragments:
            fragment = fragment.replace("{ft}", str(tmp_path / "ft"))
            assert fragment in lines[0], (fragment, lines[0])
        if existed:  # the user's file or folder is left exactly as it was
            assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before
        else:
            assert not out.exists()
        if case.exit_code == 2:  # user errors leave nothing behind at all
            assert not Path(str(out) + ".partial").exists()
    if case.name == "hostile_pickle":
        assert not (tmp_path / "bad" / "PWNED").exists()

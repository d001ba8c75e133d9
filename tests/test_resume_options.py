"""--resume and the options: every option that can change the output bytes is part of the
fingerprint, so resuming with a different value is refused; the others may change."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
from conftest import (LLAMA, failing_pwrite, load_model, random_tensors, recipe_file,
                      write_model)

import mergesmith
from mergesmith import MergeError, MergeIOError, Options

FINGERPRINTED = [f.name for f in dataclasses.fields(Options)
                 if f.metadata.get("fingerprint", True)]

CHANGED = {
    "seed": 7,
    "compute_dtype": "float64",
    "out_shard_size": "40KB",
    "allow_crimes": True,
    "unsafe_truncate_embeddings": True,
    "fp8_block_size": "64x64",
}
"""A different value for each fingerprinted option."""


def test_every_fingerprinted_option_is_tested():
    # a new option that changes bytes must get a value above (and so a test below)
    assert set(FINGERPRINTED) == set(CHANGED)
    assert {"threads", "device", "memory_limit", "resume", "overwrite"} <= \
        {f.name for f in dataclasses.fields(Options)} - set(FINGERPRINTED)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A recipe, the output of an uninterrupted run, and the partial folder of a run
    stopped by a full disk after a few tensors."""
    root = tmp_path_factory.mktemp("resume-options")
    base = random_tensors(LLAMA, 0)
    paths = [write_model(root / n, t) for n, t in
             (("base", base), ("a", random_tensors(LLAMA, 1, base)),
              ("b", random_tensors(LLAMA, 2, base)))]
    recipe = recipe_file(root, f"""merge_method: dare_ties
base_model: {paths[0]}
models:
  - {{model: {paths[1]}, parameters: {{weight: 0.6, density: 0.5}}}}
  - {{model: {paths[2]}, parameters: {{weight: 0.4, density: 0.7}}}}
""")
    mergesmith.run(recipe, root / "reference", threads=1)
    mp = pytest.MonkeyPatch()
    mp.setattr("mergesmith.writer.os.pwrite", failing_pwrite(8))
    with pytest.raises(MergeIOError):
        mergesmith.run(recipe, root / "out", threads=1)
    mp.undo()
    assert (root / "out.partial" / "mergesmith_progress.log").exists()
    return root, recipe


def _copy(root, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(root / "out.partial", tmp_path / "out.partial")
    return out


@pytest.mark.parametrize("name", FINGERPRINTED)
def test_changing_a_fingerprinted_option_refuses_resume(interrupted, tmp_path, name):
    root, recipe = interrupted
    out = _copy(root, tmp_path)
    with pytest.raises(MergeError, match="cannot be resumed"):
        mergesmith.run(recipe, out, resume=True, threads=1,
                       **{name: CHANGED[name]})
    assert (tmp_path / "out.partial").exists()  # the user's partial work is kept


@pytest.mark.parametrize("change", [{"threads": 3}, {"memory_limit": "8G"},
                                    {"strict_finite": True}, {"copy_tokenizer": False},
                                    {"write_model_card": False}])
def test_other_options_may_change_on_resume(interrupted, tmp_path, change, recwarn):
    root, recipe = interrupted
    out = _copy(root, tmp_path)
    mergesmith.run(recipe, out, resume=True, **{"threads": 1, **change})
    assert not [w for w in recwarn if "nothing to resume" in str(w.message)]
    reference = load_model(root / "reference")
    got = load_model(out)
    assert all((got[n] == reference[n]).all() for n in reference)

#!/usr/bin/env python3
"""Regenerate ``expected/``: mergekit 0.1.5's outputs for a sample of the corpus, on the
tiny stand-ins of ``tests/real_recipes.py``.

    python make_expected.py MERGEKIT_YAML CASE [CASE ...]

``MERGEKIT_YAML`` is the ``mergekit-yaml`` of a venv with mergekit 0.1.5 (never a
dependency of mergesmith). Each case runs as ``mergekit-yaml RECIPE OUT --random-seed 42``
with ``HF_HUB_OFFLINE=1`` and ``PYTHONHASHSEED=0``; its tensors and config.json are kept
(small: the stand-ins have 16 hidden units) with ``case.json`` saying how to compare
(random methods by statistics). Recipes run with ``dtype: float32`` (see
``real_recipes.in_float32``). Run it with the project's test environment (torch,
safetensors, PyYAML), from anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/

from real_recipes import CONFIGS, EXPECTED, in_float32, on_standins  # noqa: E402

RANDOM = ("dare", "della")


def main() -> None:
    mergekit, cases = sys.argv[1], sys.argv[2:]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for case in cases:
            text = (CONFIGS / f"{case}.yml").read_text()
            recipe = root / f"{case}.yml"
            recipe.write_text(in_float32(on_standins(text, root / "models")))
            out = root / "out" / case
            done = subprocess.run([mergekit, str(recipe), str(out), "--random-seed", "42",
                                   "--quiet", "--lora-merge-cache", str(root / "lora-cache")],
                                  env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{case}: mergekit failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            target = EXPECTED / case
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for f in out.iterdir():
                if f.suffix == ".safetensors" or f.name in ("config.json",
                                                            "model.safetensors.index.json"):
                    shutil.copy(f, target / f.name)
            method = text.split("merge_method:", 1)[1].split()[0].strip("'\"")
            kind = "random" if method.startswith(RANDOM) else "deterministic"
            (target / "case.json").write_text(json.dumps({"kind": kind, "method": method},
                                                         indent=1) + "\n")
            print(f"{case}: {kind} ({method})")


if __name__ == "__main__":
    main()

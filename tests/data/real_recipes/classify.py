#!/usr/bin/env python3
"""Which recipes of the corpus mergekit 0.1.5 accepts: ``schema.tsv``.

    python classify.py MERGEKIT_VENV_PYTHON [CONFIG ...]

For every config (default: all of ``configs/``), two questions, asked of mergekit 0.1.5
itself (in its own venv; never a dependency of mergesmith):

* ``schema``: does ``MergeConfiguration.model_validate(yaml.safe_load(text))`` accept it?
* ``merges``: does ``mergekit-yaml`` merge it on the tiny stand-ins of
  ``tests/real_recipes.py`` (exit 0)? This also catches what mergekit refuses after the
  schema: unknown merge methods, missing required parameters, impossible contracts.

A recipe counts as accepted by mergekit when both are true; the test runs ``check`` on
exactly those. Rows: ``file  schema  merges  error`` (error: mergekit's last line).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/

from real_recipes import CONFIGS, on_standins  # noqa: E402

SCHEMA = """
import sys, yaml
from mergekit.config import MergeConfiguration
try:
    MergeConfiguration.model_validate(yaml.safe_load(open(sys.argv[1]).read()))
except Exception as e:
    print(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    sys.exit(1)
"""


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:300].replace("\t", " ")


def classify(python: str, config: Path, root: Path) -> tuple[str, bool, bool, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0")
    done = subprocess.run([python, "-c", SCHEMA, str(config)], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        return config.name, False, False, last_line(done.stdout + done.stderr)
    try:
        text = on_standins(config.read_text(), root / "models")
    except Exception as e:  # not YAML this harness can map
        return config.name, True, False, f"stand-ins: {e}"
    recipe = root / f"{config.stem}.yml"
    recipe.write_text(text)
    mergekit_yaml = str(Path(python).with_name("mergekit-yaml"))
    done = subprocess.run([mergekit_yaml, str(recipe), str(root / "out" / config.stem),
                           "--random-seed", "42", "--quiet", "--lora-merge-cache",
                           str(root / "lora-cache")], env=env, capture_output=True, text=True)
    return config.name, True, done.returncode == 0, \
        "" if done.returncode == 0 else last_line(done.stderr)


def main() -> None:
    python = sys.argv[1]
    configs = [Path(a) for a in sys.argv[2:]] or sorted(CONFIGS.glob("*.yml"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for config in configs:  # stand-ins first, one thread (shared folders)
            try:
                on_standins(config.read_text(), root / "models")
            except Exception:
                pass
        with ThreadPoolExecutor(2) as pool:
            rows = list(pool.map(lambda c: classify(python, c, root), configs))
    lines = ["file\tschema\tmerges\terror"]
    lines += [f"{n}\t{str(s).lower()}\t{str(m).lower()}\t{e}" for n, s, m, e in rows]
    out = HERE / "schema.tsv" if not sys.argv[2:] else Path("/dev/stdout")
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

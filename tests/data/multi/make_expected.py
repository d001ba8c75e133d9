"""Regenerate the mergekit-multi 0.1.5 reference outputs in tests/data/multi/ (not used by
the tests). Run with the python of a venv holding mergekit 0.1.5 (see
tests/data/moe/make_expected.py for how that venv is made):

    /tmp/mkvenv/bin/python tests/data/multi/make_expected.py

It builds four tiny bfloat16 Llama models with tests/moe_inputs.py (``llama_base`` and the
fine-tunes ``llama_e0..e2``; the same seeds the tests rebuild them from) into a scratch
folder, writes each case's ``config.yml`` (a three-document mergekit-multi recipe: TIES →
SLERP with a gradient → task arithmetic with a filtered per-model weight), runs

    mergekit-multi config.yml --intermediate-dir stages --out-path out

in a working folder that holds ``inputs/<model>``, and stores per case: ``config.yml``,
``tensors.json`` (shape, dtype and SHA-256 of every tensor of the final model and of each
intermediate stage), and for the ``bf16`` case ``expected.safetensors`` (the final model's
values, compared within a tolerance: mergekit computes each stage in bfloat16).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/ (for moe_inputs)
import moe_inputs  # noqa: E402

MULTI = str(Path(sys.executable).with_name("mergekit-multi"))
MODELS = ["llama_base", "llama_e0", "llama_e1", "llama_e2"]


def recipe(dtype: str, out_dtype: str | None) -> str:
    """The three stages; every stage computes in ``dtype`` and writes ``out_dtype``."""
    dt = f"dtype: {dtype}\n" + (f"out_dtype: {out_dtype}\n" if out_dtype else "")
    return f"""\
name: tied
merge_method: ties
base_model: inputs/llama_base
models:
  - model: inputs/llama_e0
    parameters: {{weight: 0.6, density: 0.5}}
  - model: inputs/llama_e1
    parameters: {{weight: 0.4, density: 0.7}}
{dt}---
name: blended
merge_method: slerp
base_model: tied
models:
  - model: tied
  - model: inputs/llama_e2
parameters:
  t: [0, 0.5, 1]
{dt}---
merge_method: task_arithmetic
base_model: inputs/llama_base
models:
  - model: blended
    parameters:
      weight:
        - filter: mlp
          value: 0.8
        - filter: self_attn
          value: 1.2
        - value: 1.0
  - model: inputs/llama_e0
    parameters: {{weight: 0.3}}
{dt}"""


CASES = {
    # float32 arithmetic, each stage written in bfloat16: mergesmith's precision
    "f32": recipe("float32", "bfloat16"),
    # bfloat16 throughout: mergekit computes each stage in bfloat16
    "bf16": recipe("bfloat16", None),
}


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def table(folder: Path) -> dict:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                "sha256": digest(v)} for k, v in sorted(tensors.items())}


def main() -> None:
    scratch = Path(tempfile.mkdtemp())
    try:
        moe_inputs.write_all(scratch / "inputs", MODELS, torch.float32)
        for case, text in CASES.items():
            work = scratch / case
            work.mkdir()
            (work / "inputs").symlink_to(scratch / "inputs")
            (work / "config.yml").write_text(text)
            p = subprocess.run([MULTI, "config.yml", "--intermediate-dir", "stages",
                                "--out-path", "out", "--no-write-model-card"], cwd=work,
                               capture_output=True, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if p.returncode:
                raise SystemExit(f"{case}: mergekit-multi failed:\n{p.stdout}\n{p.stderr}")
            dest = HERE / case
            dest.mkdir(exist_ok=True)
            shutil.copy(work / "config.yml", dest / "config.yml")
            result = {"final": table(work / "out"),
                      **{n: table(work / "stages" / n) for n in ("tied", "blended")}}
            (dest / "tensors.json").write_text(json.dumps(result, indent=1) + "\n")
            if case == "bf16":
                final = {}
                for f in sorted((work / "out").glob("*.safetensors")):
                    final.update(load_file(str(f)))
                save_file(final, str(dest / "expected.safetensors"))
        import mergekit

        (HERE / "versions.json").write_text(json.dumps({
            "mergekit": getattr(mergekit, "__version__", "0.1.5"), "torch": torch.__version__,
            "python": sys.version.split()[0]}, indent=1) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

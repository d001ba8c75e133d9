"""Tiny models and recipes shared by the studio's tests."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import LLAMA, random_tensors, write_model

TEXT = ("the cat sat on the mat. a dog ran to the park with a red ball, and the cat "
        "watched it go. then it rained: 12 drops, 34 drops! who knows?\n") * 3


def build_models(root: Path) -> dict[str, Path]:
    """base, ft_a, ft_b (float32, 3 layers, a character tokenizer) under ``root/models``."""
    from test_evaluate import char_tokenizer

    base = random_tensors(LLAMA, 0)
    models = {"base": write_model(root / "models" / "base", base),
              "ft_a": write_model(root / "models" / "ft_a", random_tensors(LLAMA, 1, base,
                                                                           scale=0.05)),
              "ft_b": write_model(root / "models" / "ft_b", random_tensors(LLAMA, 2, base,
                                                                           scale=0.05))}
    tokenizer = char_tokenizer()
    for folder in models.values():
        tokenizer.save_pretrained(folder)
    (root / "eval.txt").write_text(TEXT)
    return models


def task_arithmetic(m: dict[str, Path], b: str = "ft_b") -> str:
    return (f"merge_method: task_arithmetic\nbase_model: {m['base']}\nmodels:\n"
            f"  - model: {m['ft_a']}\n    parameters: {{weight: 1.0}}\n"
            f"  - model: {m[b] if b in m else b}\n    parameters: {{weight: 0.3}}\n")


def slices(m: dict[str, Path]) -> str:
    return ("merge_method: passthrough\nslices:\n"
            f"  - sources: [{{model: {m['ft_a']}, layer_range: [0, 2]}}]\n"
            f"  - sources: [{{model: {m['ft_b']}, layer_range: [1, 3]}}]\n")


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}

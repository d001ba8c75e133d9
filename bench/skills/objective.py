"""The validation objective of ``bench/skills/search.py``: mean exact-match accuracy over
the four skills on the validation split (the split the grid in ``run.py`` chooses on)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from run import SKILLS, VALIDATION_SEED, accuracy  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

N_VAL = int(os.environ.get("SKILLS_N_VAL", "200"))


def validation(folder: str) -> float:
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return sum(accuracy(model, t, 5, 6, N_VAL, VALIDATION_SEED) for t in SKILLS) / len(SKILLS)

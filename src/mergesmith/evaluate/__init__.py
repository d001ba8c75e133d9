"""Evaluation of merged models: perplexity, KL divergence and top-1 agreement against the
models that went into the merge, and lm-evaluation-harness tasks.

* :mod:`.perplexity` — the math, on logit tensors;
* :mod:`.runner` — text → token windows, model loading, batching (``mergesmith eval``);
* :mod:`.lm_eval_tasks` — task scores through lm-eval (optional extra ``eval``);
* :mod:`.cache` — results cached by model fingerprint, data and settings;
* :mod:`.after_merge` — a recipe's ``evaluate:`` block and the model card section.
"""

from .cache import EvalCache, default_cache_dir, model_fingerprint
from .runner import EvalReport, Parent, Scores, evaluate

__all__ = ["EvalCache", "EvalReport", "Parent", "Scores", "default_cache_dir", "evaluate",
           "model_fingerprint"]

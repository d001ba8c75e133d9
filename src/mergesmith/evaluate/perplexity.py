"""The math of ``mergesmith eval`` on logits: functions of tensors, no models or files.

Shapes: ``logits`` are ``[positions, vocab]`` next-token logits, already shifted so that
row ``i`` predicts ``targets[i]``. Sums are returned (not means) so that batches can be
added up exactly; :class:`Totals` accumulates them in float64.

* NLL: ``-log softmax(logits)[target]``; perplexity is ``exp(mean NLL)``.
* KL(p ‖ q) = Σ_v p(v)·(log p(v) − log q(v)), per position, with p and q the softmax of
  the two models' logits. ``mergesmith eval`` reports KL(parent ‖ model): the parent is the
  reference, and the divergence grows when the merged model gives low probability to
  tokens the parent found likely (the "forward KL" of distillation). The reverse
  direction is reported too (``kl_reverse`` in ``--json``).
* top-1 agreement: positions where both argmaxes are the same token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 512
"""Positions per log-softmax: bounds the float32 temporaries to CHUNK × vocab."""


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` in float32 (the logits may be bfloat16)."""
    return torch.log_softmax(logits.float(), dim=-1)


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Σ over positions of −log p(target)."""
    total = 0.0
    for i in range(0, logits.shape[0], CHUNK):
        lp = log_probs(logits[i:i + CHUNK])
        total -= lp.gather(-1, targets[i:i + CHUNK, None].long()).double().sum().item()
    return total


def kl_sum(logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    """Σ over positions of KL(p ‖ q), p = softmax(logits_p), q = softmax(logits_q)."""
    total = 0.0
    for i in range(0, logits_p.shape[0], CHUNK):
        lp, lq = log_probs(logits_p[i:i + CHUNK]), log_probs(logits_q[i:i + CHUNK])
        # xlogy-style: terms with p = 0 are 0 (exp(-inf) * ... would be nan)
        total += torch.where(lp.isneginf(), 0.0, lp.exp() * (lp - lq)).double().sum().item()
    return total


def top1_matches(logits_a: torch.Tensor, logits_b: torch.Tensor) -> int:
    """Positions where both argmaxes are the same token."""
    return int((logits_a.argmax(-1) == logits_b.argmax(-1)).sum().item())


@dataclass
class Totals:
    """Running sums over the evaluated positions of one model (and one parent, if any)."""

    positions: int = 0
    nll: float = 0.0          # the model
    parent_nll: float = 0.0   # the parent, on the same targets
    kl: float = 0.0           # KL(parent ‖ model)
    kl_reverse: float = 0.0   # KL(model ‖ parent)
    top1: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor,
            parent_logits: torch.Tensor | None = None, shared: int | None = None) -> None:
        """Add positions: ``logits`` of the model; ``parent_logits`` of a parent.

        Each model's NLL uses its whole vocabulary. With ``shared``, KL and top-1 compare
        the first ``shared`` logits of each (both softmaxes renormalised over them)."""
        self.positions += int(targets.numel())
        self.nll += nll_sum(logits, targets)
        if parent_logits is not None:
            self.parent_nll += nll_sum(parent_logits, targets)
            if shared is not None:
                logits, parent_logits = logits[:, :shared], parent_logits[:, :shared]
            self.kl += kl_sum(parent_logits, logits)
            self.kl_reverse += kl_sum(logits, parent_logits)
            self.top1 += top1_matches(logits, parent_logits)


def perplexity(nll: float, positions: int) -> float:
    """``exp(mean NLL)``; NaN with no positions."""
    import math

    return math.exp(nll / positions) if positions else float("nan")

"""RegMean's closed form for one linear layer (Jin et al., 2023), shared by ``regmean``
and ``regmean_plusplus``.

For linear layers ``y = x Wᵢᵀ`` (weights ``[out, in]``) with input Gram matrices
``Gᵢ = Σ x xᵀ`` (``[in, in]``), the weight that minimises ``Σᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖²`` is
``W* = (Σᵢ Wᵢ Gᵢ)(Σᵢ Gᵢ)⁻¹``. The paper shrinks each Gram's off-diagonal entries by
``alpha`` (``α G + (1 − α) diag(G)``) for stability; per-model ``weights`` λᵢ scale each
model's Gram (λᵢ Gᵢ), so λᵢ = 1 for all models is the paper's method.
"""

from __future__ import annotations

from .._torch import torch


def regmean_solve(weights: list[torch.Tensor], grams: list[torch.Tensor], *,
                  alpha: float = 0.9, coefficients: list[float] | None = None,
                  ridge: float = 1e-6) -> torch.Tensor:
    """``W*`` in float64 (the caller rounds). Only when ``Σ Gᵢ`` is singular (Cholesky
    fails), a ridge ``ε I`` is added to every (scaled) Gram — ``ε`` = ``ridge`` × the mean
    diagonal of ``Σ Gᵢ``, grown tenfold until it factors — which moves ``W*`` towards the
    weighted average of the ``Wᵢ`` in the directions no calibration input reached (all
    Grams zero: exactly that average)."""
    if len(weights) != len(grams) or not weights:
        raise ValueError("regmean needs one Gram matrix per weight")
    coefficients = coefficients or [1.0] * len(weights)
    total = None
    rhs = None
    average = None
    for w, g, c in zip(weights, grams, coefficients):
        g = g.to(torch.float64)
        g = alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g))
        g = c * g
        total = g if total is None else total + g
        w = w.to(torch.float64)
        wg = w @ g
        rhs = wg if rhs is None else rhs + wg
        average = c * w if average is None else average + c * w
    assert total is not None and rhs is not None and average is not None
    scale = float(torch.diagonal(total).abs().mean()) or 1.0
    eye = torch.eye(total.shape[0], dtype=torch.float64, device=total.device)
    jitter = 0.0
    while True:  # ε I on each Gram: ε Σcᵢ I on the sum, ε Σ cᵢ Wᵢ on the right side
        factor, info = torch.linalg.cholesky_ex(total + jitter * scale * eye)
        if int(info) == 0:
            break
        jitter = ridge * sum(coefficients) if jitter == 0.0 else jitter * 10
        if jitter > 1e6:
            raise ValueError("regmean: the Gram matrices are not positive semi-definite")
    right = rhs + (jitter / sum(coefficients)) * scale * average if jitter else rhs
    # W* = right · total⁻¹  ⇔  total · W*ᵀ = rightᵀ  (total symmetric)
    return torch.cholesky_solve(right.T, factor).T

#!/usr/bin/env python3
"""How far the seeded randomized SVD lands from the exact one, by the shape of the spectrum.

The spectral methods take the randomized path by default where few directions are kept
(``randomized_svd`` unset). How close it comes depends on the spectrum: task vectors of real
fine-tunes decay (a few strong directions), the benchmark's synthetic fine-tunes are
Gaussian noise (a flat Marchenko–Pastur spectrum, where "the top 81 directions" are barely
defined: neighbouring singular values differ by a fraction of a percent). For one
2816 × 1024 matrix per spectrum, and the ranks CART (8 %) and Iso-CTS (per task) keep, it
prints the time of each path, the deviation of the rank-k approximations
``‖LRₖ(rand) − LRₖ(exact)‖ / ‖LRₖ(exact)‖`` and the share of the exact truncation's energy
the randomized one captures ``‖LRₖ(rand)‖² / ‖LRₖ(exact)‖²``.

    .venv/bin/python bench/svd_paths.py
"""

from __future__ import annotations

import time

import torch

from mergesmith.methods.linalg import randomized_svd, svd


def spectrum_matrix(kind: str, shape=(2816, 1024), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    if kind == "flat (Gaussian)":
        return torch.randn(m, n, generator=g) * 0.01
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    i = torch.arange(1, n + 1, dtype=torch.float32)
    s = {"power law 1/√i": i.rsqrt(), "power law 1/i": 1 / i,
         "exponential": torch.exp(-i / 50)}[kind]
    return (u * s) @ v.T


def main() -> None:
    print("| spectrum | k | exact s | randomized s | deviation | energy captured |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in ("flat (Gaussian)", "power law 1/√i", "power law 1/i", "exponential"):
        x = spectrum_matrix(kind)
        for k in (81, 68):
            start = time.perf_counter()
            u, s, vh = svd(x)
            exact = (u[:, :k] * s[:k]) @ vh[:k]
            t_exact = time.perf_counter() - start
            start = time.perf_counter()
            ru, rs, rvh = randomized_svd(x, k, torch.Generator().manual_seed(1))
            approx = (ru * rs) @ rvh
            t_rand = time.perf_counter() - start
            dev = float((approx - exact).norm() / exact.norm())
            energy = float(approx.norm() ** 2 / exact.norm() ** 2)
            print(f"| {kind} | {k} | {t_exact:.2f} | {t_rand:.2f} | {dev:.3g} | {energy:.4f} |")


if __name__ == "__main__":
    main()

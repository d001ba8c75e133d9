"""Matrix factorizations the spectral merge methods share: robust, deterministic SVDs.

Exact SVDs are restricted to the numerical rank (directions of zero singular value are
arbitrary and would make results depend on the LAPACK routine). The randomized variant
(Halko, Martinsson & Tropp 2011, arXiv:0909.4061) draws its test matrix from a generator
seeded by the tensor name, so a merge stays bit-reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._torch import torch
from .seeding import tensor_generator


def full_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD; retried in float64 when LAPACK does not converge (repeated or tiny
    singular values). A wide matrix is factored as its (tall) transpose: the same
    factors, in about half the time (LAPACK's divide and conquer on 2 cores: 1024 × 2816
    0.96 s, its transpose 0.55 s)."""
    if x.ndim == 2 and x.shape[0] < x.shape[1]:
        v, s, uh = full_svd(x.T)
        return uh.T, s, v.T
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
        return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype)


def numerical_rank(s: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> int:
    """Singular values above ``s₀·max(shape)·eps`` (at least 1)."""
    tol = float(s[0]) * max(shape) * torch.finfo(s.dtype).eps if s.numel() else 0.0
    return max(1, int((s > tol).sum()))


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD restricted to the numerical rank."""
    u, s, vh = full_svd(x)
    if s.numel() == 0:
        return u, s, vh
    r = numerical_rank(s, x.shape)
    return u[:, :r], s[:r], vh[:r]


OVERSAMPLE = 10
"""Fewest extra test vectors of the randomized SVD beyond the ``k`` directions wanted."""


POWER_STEPS = 2
"""QR-stabilised power steps of the randomized SVD (see :func:`oversampling`)."""


def oversampling(k: int) -> int:
    """Extra test vectors: as many as the directions wanted (at least ``OVERSAMPLE``).
    With ``k`` extra, the power steps separate direction ``k`` from ``2k`` instead of from
    ``k + 10``, so two steps do better than four did with ten extra vectors, in the same
    time: the rank-81 approximation of a 2816 × 1024 matrix with singular values ∝ 1/√i
    lands 6 % from the exact one instead of 13 %, with ∝ 1/i 0.1 % instead of 1.2 %
    (``bench/svd_paths.py``; 0.13 s either way, the exact SVD 0.6 s)."""
    return max(OVERSAMPLE, k)


def randomized_svd(x: torch.Tensor, k: int, generator: torch.Generator, *,
                   oversample: int | None = None, power_iterations: int = POWER_STEPS
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-``k`` SVD: a range finder with ``k + oversample`` Gaussian test
    vectors (default :func:`oversampling`) and ``power_iterations`` QR-stabilised power
    steps, then the exact SVD of the small projected matrix. Costs a few ``m×n×(k+p)``
    products instead of a full SVD; accurate when the spectrum decays (task vectors'
    usually does).

    The test matrix is drawn on ``generator``'s device (the CPU's for a merge: see
    :func:`top_svd`) and moved to ``x``'s, so a GPU takes the CPU's draws and its result
    differs from the CPU's by rounding alone."""
    m, n = x.shape
    q = min(k + (oversampling(k) if oversample is None else oversample), m, n)
    omega = torch.randn(n, q, generator=generator, device=generator.device,
                        dtype=x.dtype).to(x.device)
    basis = torch.linalg.qr(x @ omega).Q
    for _ in range(power_iterations):
        basis = torch.linalg.qr(x.T @ basis).Q
        basis = torch.linalg.qr(x @ basis).Q
    ub, s, vh = full_svd(basis.T @ x)
    return (basis @ ub)[:, :k], s[:k], vh[:k]


def randomized_pays(shape: tuple[int, ...], k: int) -> bool:
    """The randomized path can save work only when ``k`` is well below the full rank."""
    return 2 * (k + oversampling(k)) < min(shape)


AUTO_GAIN = 2.0
"""Unset ``randomized_svd``: the randomized path is taken when the cost model expects it
to be at least this many times faster than the exact SVD."""


def use_randomized(shape: tuple[int, ...], k: int, randomized: bool | None) -> bool:
    """Which path :func:`top_svd` takes: ``True``/``False`` force it (the randomized one
    only where it can save work); ``None`` (unset) asks the cost model ``check`` uses."""
    if randomized is False or len(shape) != 2 or not randomized_pays(shape, k):
        return False
    if randomized:
        return True
    m, n = shape
    return randomized_svd_work(m, n, k).seconds() * AUTO_GAIN <= svd_work(m, n).seconds()


def top_svd(x: torch.Tensor, k: int, *, randomized: bool | None = False, name: str = ""
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` singular triplets (fewer if the numerical rank is lower), exact or
    by the seeded randomized SVD (:func:`use_randomized`), its test matrix drawn on the CPU
    (``n × (k + p)``, small) whatever the device: the same directions on a GPU."""
    if use_randomized(tuple(x.shape), k, randomized):
        u, s, vh = randomized_svd(x, k, tensor_generator(0, f"svd\0{name}"))
        r = numerical_rank(s, x.shape) if s.numel() else 0
        return u[:, :r], s[:r], vh[:r]
    u, s, vh = svd(x)
    return u[:, :k], s[:k], vh[:k]


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal factor ``P·Qᵀ`` of ``x = P·Σ·Qᵀ`` (nearest matrix with orthonormal
    columns): decorrelates concatenated singular vectors. Computed as
    ``x·(xᵀx)^(-1/2)`` in float64 (an SVD of nearly orthonormal columns may not converge)."""
    x64 = x.double()
    values, vectors = torch.linalg.eigh(x64.T @ x64)
    tol = float(values.max()) * values.numel() * torch.finfo(torch.float64).eps
    inv_sqrt = torch.where(values > tol, values.clamp_min(tol).rsqrt(), torch.zeros_like(values))
    return (x64 @ ((vectors * inv_sqrt) @ vectors.T)).to(x.dtype)


WELL_CONDITIONED = 1e3
""":func:`psd_inverse` trusts a Cholesky factor whose smallest pivot exceeds this many times
the eigenvalue cut-off ``n·eps·max diag``: its inverse is then the pseudo-inverse to
float32 accuracy (condition numbers up to ~10⁹ in float64)."""


def psd_inverse(g: torch.Tensor) -> torch.Tensor:
    """``G⁺`` of a symmetric positive semi-definite matrix. A well-conditioned ``G`` is
    inverted through its Cholesky factor (an n = 2816 float64 matrix: 0.2 s against 4.5 s
    for an eigendecomposition); a singular or ill-conditioned one through ``eigh``,
    directions with eigenvalues below ``λmax·n·eps`` dropped (the minimum-norm solution)."""
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0 and g.numel():
        floor = float(torch.diagonal(g).max()) * g.shape[0] * torch.finfo(g.dtype).eps
        if float(torch.diagonal(factor).square().min()) > floor * WELL_CONDITIONED:
            return torch.cholesky_inverse(factor)
    values, vectors = torch.linalg.eigh(g)
    cutoff = values.abs().max() * g.shape[0] * torch.finfo(g.dtype).eps
    inverse = torch.where(values > cutoff, 1.0 / values, torch.zeros_like(values))
    return (vectors * inverse) @ vectors.T


# ---------------------------------------------------------------- cost model for `check`

FACTORIZATION_FLOPS = 40e9
"""SVD / eigh / QR throughput on the reference machine (float32, 2 cores; measured 25–50
GFLOP/s depending on the shape, 40 fits the benchmark models best)."""

PRODUCT_FLOPS = 150e9
"""Matrix-product throughput on the reference machine (float32, 2 cores, measured)."""



@dataclass(frozen=True)
class DenseWork:
    """Dense linear algebra one output tensor costs beyond streaming its inputs: floating
    point operations in factorizations (SVD, eigh, QR: slow, a few tens of GFLOP/s on two
    cores) and in matrix products (fast), and how many factorizations. Rough by design:
    ``check`` turns it into seconds so that an SVD-heavy recipe is not estimated like
    task arithmetic."""

    factorization_flops: float = 0.0
    product_flops: float = 0.0
    factorizations: int = 0

    def __add__(self, other: DenseWork) -> DenseWork:
        return DenseWork(self.factorization_flops + other.factorization_flops,
                         self.product_flops + other.product_flops,
                         self.factorizations + other.factorizations)

    def __mul__(self, times: int) -> DenseWork:
        return DenseWork(self.factorization_flops * times, self.product_flops * times,
                         self.factorizations * times)

    __rmul__ = __mul__

    def seconds(self) -> float:
        """Time on the reference machine (2 cores)."""
        return (self.factorization_flops / FACTORIZATION_FLOPS
                + self.product_flops / PRODUCT_FLOPS)


NO_WORK = DenseWork()


def product_work(m: int, k: int, n: int, *, float64: bool = False) -> DenseWork:
    """``(m×k)·(k×n)``; float64 counted twice (half the throughput)."""
    return DenseWork(product_flops=2.0 * m * k * n * (2 if float64 else 1))


def svd_work(m: int, n: int) -> DenseWork:
    """Thin SVD with vectors: ≈ 4·M·r² + 8·r³ (``M``, ``r`` the larger and smaller side)."""
    big, r = max(m, n), min(m, n)
    return DenseWork(4.0 * big * r * r + 8.0 * r ** 3, factorizations=1)


def eigh_work(n: int) -> DenseWork:
    """Symmetric eigendecomposition with vectors in float64 (≈ 4·n³ SVD-equivalent)."""
    return DenseWork(4.0 * n ** 3, factorizations=1)


def psd_inverse_work(n: int) -> DenseWork:
    """:func:`psd_inverse` of a well-conditioned ``n×n`` matrix: Cholesky and inverse
    (≈ n³ in float64)."""
    return DenseWork(2.0 * n ** 3, factorizations=1)


def polar_work(m: int, c: int) -> DenseWork:
    """:func:`polar` of an ``m×c`` matrix: Gram matrix, eigh, two products (float64)."""
    return (product_work(c, m, c, float64=True) + eigh_work(c)
            + product_work(c, c, c, float64=True) + product_work(m, c, c, float64=True))


def randomized_svd_work(m: int, n: int, k: int, power_iterations: int = POWER_STEPS
                        ) -> DenseWork:
    """:func:`randomized_svd`: ``2 + 2·power_iterations`` products with an ``n×q`` block,
    as many thin QRs, and one small exact SVD."""
    q = min(k + oversampling(k), m, n)
    steps = 2 + 2 * power_iterations
    qr = DenseWork(4.0 * max(m, n) * q * q, factorizations=1)
    return (product_work(m, n, q) * steps + qr * (steps - 1) + svd_work(q, n)
            + product_work(m, q, q))


def top_svd_work(m: int, n: int, k: int, randomized: bool | None = False) -> DenseWork:
    """What :func:`top_svd` costs with the same choice of path."""
    if use_randomized((m, n), k, randomized):
        return randomized_svd_work(m, n, k)
    return svd_work(m, n)

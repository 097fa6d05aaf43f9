"""Label-free statistics of a feature matrix ``X`` (N samples × D dimensions): pure functions.

What each number means for a user is in docs/analysis.md; the formulas:

- :func:`dimension_stats`: per-dimension mean and standard deviation, and the fraction of
  *dead* dimensions (standard deviation below ``dead_tol`` times the RMS standard deviation of
  all dimensions: a dimension that no longer varies carries nothing for a cosine kNN);
- :func:`correlation_matrix` and :func:`off_diagonal_energy`: the Pearson correlation between
  dimensions and the mean squared off-diagonal correlation, ``Σ_{i≠j} ρ_ij² / (D (D − 1))``
  (0 for decorrelated dimensions, 1 when every dimension repeats every other): the redundancy
  MetaMask (docs/algorithms.md §3.1) and Barlow Twins (§1.5) argue against;
- :func:`singular_spectrum` and :func:`effective_rank`: singular values of the centred matrix
  (the dimensional-collapse spectrum of Jing, Vincent, LeCun, Tian, ICLR 2022, arXiv:2110.09348,
  Fig. 2, which plots the covariance eigenvalues ``λ_k = σ_k² / N``) and its participation
  ratio ``(Σ λ_k)² / Σ λ_k²``: D for an isotropic cloud, k for a cloud spread evenly over a
  k-dimensional subspace;
- :func:`rankme`: RankMe (Garrido, Balestriero, Najman, LeCun, ICML 2023, arXiv:2210.02885,
  Eq. 1): ``exp(−Σ_k p_k log p_k)`` with ``p_k = σ_k / ‖σ‖₁ + ε`` over the singular values of
  the *uncentred* embedding matrix, ``ε = 1e-7``;
- :func:`alignment` and :func:`uniformity`: Wang & Isola (ICML 2020, arXiv:2005.10242, Sec. 4.1):
  ``E ‖ẑ₁ − ẑ₂‖^α`` over positive pairs (α = 2) and ``log E exp(−t ‖ẑ_i − ẑ_j‖²)`` over pairs of
  distinct samples (t = 2), on L2-normalised features.

All inputs are ``(N, D)`` tensors of any float dtype; the arithmetic is float64 where it is cheap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "dimension_stats",
    "correlation_matrix",
    "off_diagonal_energy",
    "redundant_pairs",
    "singular_spectrum",
    "effective_rank",
    "rankme",
    "explained_variance_rank",
    "alignment",
    "uniformity",
]

RANKME_EPS = 1e-7  # Garrido et al. 2023, Eq. 1 (float32)


def _matrix(x: torch.Tensor, what: str, min_rows: int = 1) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} needs features of shape (N, D); got {shape}: flatten them first")
    if x.shape[0] < min_rows or x.shape[1] < 1:
        raise ValueError(f"{what} needs at least {min_rows} samples and one dimension; got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{what} needs floating-point features; got {x.dtype}")
    return x


def dimension_stats(x: torch.Tensor, dead_tol: float = 1e-2) -> dict[str, torch.Tensor | float]:
    """``mean`` and ``std`` per dimension (population std), ``dead`` (bool per dimension:
    ``std < dead_tol · RMS(std)``) and ``dead_fraction``."""
    x = _matrix(x, "dimension_stats").double()
    if not dead_tol >= 0:
        raise ValueError(f"dead_tol must be >= 0, got {dead_tol}")
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    rms = std.square().mean().sqrt()
    dead = std <= dead_tol * rms if float(rms) > 0 else torch.ones_like(std, dtype=torch.bool)
    return {"mean": mean, "std": std, "dead": dead, "dead_fraction": float(dead.double().mean())}


def correlation_matrix(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pearson correlation ``(D, D)`` between dimensions (float64).  A constant dimension has
    no correlation: its row and column are 0, its diagonal entry too."""
    x = _matrix(x, "correlation_matrix", min_rows=2).double()
    xc = x - x.mean(0)
    std = xc.square().mean(0).sqrt()
    live = std > eps * max(1.0, float(std.max()))
    z = torch.where(live, xc / torch.where(live, std, torch.ones_like(std)), torch.zeros_like(xc))
    corr = z.T @ z / x.shape[0]
    return corr.clamp_(-1.0, 1.0)


def off_diagonal_energy(corr: torch.Tensor) -> float:
    """Mean squared off-diagonal entry of a correlation matrix, ``Σ_{i≠j} ρ_ij² / (D (D − 1))``."""
    if corr.dim() != 2 or corr.shape[0] != corr.shape[1]:
        raise ValueError(f"off_diagonal_energy needs a square (D, D) matrix; got {tuple(corr.shape)}")
    d = corr.shape[0]
    if d < 2:
        return 0.0
    sq = corr.double().square()
    return float((sq.sum() - sq.diagonal().sum()) / (d * (d - 1)))


def redundant_pairs(corr: torch.Tensor, threshold: float = 0.9) -> dict[str, float | int]:
    """Pairs ``i < j`` with ``|ρ_ij| ≥ threshold`` and the fraction of dimensions that have at
    least one such partner (a dimension another one nearly repeats)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    d = corr.shape[0]
    strong = corr.abs() >= threshold
    strong.fill_diagonal_(False)
    return {"threshold": float(threshold), "pairs": int(strong.triu(1).sum()),
            "fraction_with_partner": float(strong.any(1).double().mean()) if d else 0.0}


def singular_spectrum(x: torch.Tensor, center: bool = True) -> torch.Tensor:
    """Singular values (descending, float64) of ``x``, centred per dimension by default."""
    x = _matrix(x, "singular_spectrum").double()
    if center:
        x = x - x.mean(0)
    return torch.linalg.svdvals(x)


def effective_rank(singular_values: torch.Tensor) -> float:
    """Participation ratio of the covariance eigenvalues ``λ = σ²``: ``(Σ λ)² / Σ λ²``
    (0 for an all-zero spectrum)."""
    lam = singular_values.double().square()
    total = float(lam.sum())
    return total * total / float(lam.square().sum()) if total > 0 else 0.0


def rankme(x: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe of the uncentred embeddings ``x`` (Garrido et al. 2023, Eq. 1)."""
    s = singular_spectrum(x, center=False)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


def explained_variance_rank(singular_values: torch.Tensor, fraction: float = 0.99) -> int:
    """Smallest number of principal directions that hold ``fraction`` of the variance."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    lam = singular_values.double().square()
    total = float(lam.sum())
    if total <= 0:
        return 0
    cum = lam.cumsum(0) / total
    return int(torch.searchsorted(cum, torch.tensor(fraction - 1e-12, dtype=cum.dtype)).item()) + 1


def alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2.0) -> float:
    """``E ‖ẑ₁ − ẑ₂‖^α`` over positive pairs (row i of ``z1`` with row i of ``z2``), in [0, 2^α]."""
    z1, z2 = _matrix(z1, "alignment"), _matrix(z2, "alignment")
    if z1.shape != z2.shape:
        raise ValueError(f"alignment needs two views of the same shape; got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    d = (F.normalize(z1.double(), dim=1) - F.normalize(z2.double(), dim=1)).norm(dim=1)
    return float(d.pow(alpha).mean())


def uniformity(z: torch.Tensor, t: float = 2.0, chunk: int = 2048) -> float:
    """``log E_{i≠j} exp(−t ‖ẑ_i − ẑ_j‖²)`` over all pairs of distinct rows, in ``[−4t, 0]``
    (lower is more uniform); computed in blocks of ``chunk`` rows with a running log-sum-exp,
    using ``‖ẑ_i − ẑ_j‖² = 2 − 2 ẑ_iᵀẑ_j``."""
    z = _matrix(z, "uniformity", min_rows=2)
    if not t > 0:
        raise ValueError(f"t must be > 0, got {t}")
    zn = F.normalize(z.float(), dim=1)
    n = zn.shape[0]
    parts: list[torch.Tensor] = []
    for start in range(0, n, chunk):
        block = zn[start : start + chunk]
        sq = (2.0 - 2.0 * block @ zn.T).clamp_(min=0.0)
        logits = -t * sq
        rows = torch.arange(block.shape[0])
        logits[rows, rows + start] = -math.inf  # i == j is not a pair
        parts.append(torch.logsumexp(logits.flatten(), 0).double())
    return float(torch.logsumexp(torch.stack(parts), 0) - math.log(n * (n - 1)))

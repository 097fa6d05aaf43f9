"""VICReg: variance-invariance-covariance regularisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metassl.losses.distributed import full_precision, gather_with_grad


def _variance(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Hinge on the standard deviation of every dimension, target 1 (Bardes et al., 2022, Sec. 3.2)."""
    std = torch.sqrt(z.var(dim=0) + eps)  # unbiased variance, as in the paper
    return F.relu(1 - std).mean()


def _covariance(z: torch.Tensor) -> torch.Tensor:
    """Sum of squared off-diagonal covariances divided by D (Bardes et al., 2022, Sec. 3.2)."""
    n, d = z.shape
    zc = z - z.mean(dim=0)
    cov = zc.T @ zc / (n - 1)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d


@full_precision
def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    eps: float = 1e-4,
) -> torch.Tensor:
    """VICReg loss (Bardes et al., 2022, Sec. 3.2, total loss)::

        L = sim_weight * mean_{i,k} (z1_ik - z2_ik)^2
          + var_weight * (v(z1) + v(z2)) / 2
          + cov_weight * (c(z1) + c(z2))

    with ``v(z) = mean_k relu(1 - sqrt(Var(z_k) + eps))`` and
    ``c(z) = sum_{k != l} Cov(z)_kl^2 / D``.  The scaling follows the official code, with
    which the default weights 25/25/1 were tuned: the invariance term is a mean over the
    ``N x D`` entries and the variance term is averaged (not summed) over the two branches.

    Under DDP the embeddings are gathered with gradient and every rank returns the same
    value: the one-process loss on the global batch (all statistics are global).  The
    gather's backward sums the gradient over ranks and DDP's average then equals the
    one-process gradient.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"vicreg_loss expects two (n, D) tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    both = gather_with_grad(torch.stack([z1, z2], dim=1))  # (N, 2, D), one collective
    a, b = both[:, 0], both[:, 1]
    invariance = F.mse_loss(a, b)
    variance = (_variance(a, eps) + _variance(b, eps)) / 2
    covariance = _covariance(a) + _covariance(b)
    return sim_weight * invariance + var_weight * variance + cov_weight * covariance

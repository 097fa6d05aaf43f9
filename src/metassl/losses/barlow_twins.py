"""Barlow Twins redundancy-reduction loss."""

from __future__ import annotations

import torch

from metassl.losses.distributed import all_reduce_sum, full_precision, world_size


@full_precision
def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3, eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins loss (Zbontar et al., 2021, Eqs. 1-2).

    Each embedding dimension is standardised over the batch (mean 0, biased variance 1,
    ``eps`` added to the variance, as the ``BatchNorm1d(affine=False)`` of the official
    code), ``C = z1~^T z2~ / N`` is the cross-correlation matrix, and::

        L = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2

    Under DDP the batch statistics (sums) and ``C`` are all-reduced, so every rank returns
    the same value: the one-process loss on the global batch of ``N = n * world_size``
    samples.  The all-reduce's backward sums the gradient over ranks, and DDP's average of
    the parameter gradients then equals the one-process gradient.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"barlow_twins_loss expects two (n, D) tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    big_n = z1.shape[0] * world_size()
    z = torch.stack([z1, z2])  # (2, n, D): one collective per statistic for both branches
    mean = all_reduce_sum(z.sum(dim=1, keepdim=True)) / big_n
    centred = z - mean
    var = all_reduce_sum(centred.pow(2).sum(dim=1, keepdim=True)) / big_n
    zs = centred / torch.sqrt(var + eps)
    c = all_reduce_sum(zs[0].T @ zs[1]) / big_n  # (D, D)
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag

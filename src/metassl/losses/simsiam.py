"""SimSiam's negative cosine similarity with stop-gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metassl.losses.distributed import full_precision


@full_precision
def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam loss (Chen & He, 2021, Eq. 1 with the stop-gradient of Eq. 3):
    ``-cos(p_i, stopgrad(z_i))``, mean over i.

    The symmetrised loss of the paper is ``(simsiam_loss(p1, z2) + simsiam_loss(p2, z1)) / 2``.
    """
    if p.shape != z.shape or p.dim() != 2:
        raise ValueError(f"simsiam_loss expects two (n, D) tensors of equal shape, got {tuple(p.shape)} and {tuple(z.shape)}")
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()

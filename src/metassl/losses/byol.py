"""BYOL's normalised regression loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metassl.losses.distributed import full_precision


@full_precision
def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL regression loss (Grill et al., 2020, Eq. 2): ``2 - 2 cos(p_i, z_i)``, mean over i.

    ``p``: online predictions ``(n, D)``; ``z``: target projections ``(n, D)``, detached here
    (stop-gradient on the target branch).  Equal to ``||p/|p| - z/|z|||^2``.
    """
    if p.shape != z.shape or p.dim() != 2:
        raise ValueError(f"byol_loss expects two (n, D) tensors of equal shape, got {tuple(p.shape)} and {tuple(z.shape)}")
    cos = F.cosine_similarity(p, z.detach(), dim=1)
    return (2 - 2 * cos).mean()

"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metassl.losses.distributed import full_precision, gather_with_grad, rank


@full_precision
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR NT-Xent loss (Chen et al., 2020, Eq. 1), google-research form.

    ``z1``, ``z2``: ``(n, D)`` projections of two views of the same ``n`` images (row ``i``
    of each is a positive pair); they are L2-normalised here.  For every anchor the
    candidates are the other ``2N - 1`` embeddings of the (global) batch of ``N`` images:
    its positive and ``2N - 2`` negatives, with logits ``cos / temperature``::

        l(i, j) = -log exp(s_ij / t) / sum_{k != i} exp(s_ik / t)

    The loss is the mean of ``l`` over all anchors of both views, i.e. the symmetric
    average ``(L(z1 -> z2) + L(z2 -> z1)) / 2`` of the paper.

    Under DDP the other ranks' embeddings are gathered with gradient, and each rank returns
    the mean over its *local* ``2n`` anchors.  The mean of these values over ranks is the
    one-process loss on the global batch, and (because the gather's backward sums the
    gradients over ranks) the gradients that DDP averages equal the one-process gradients.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent expects two (n, D) tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    local = F.normalize(torch.cat([z1, z2], dim=0), dim=1)  # (2n, D): view-1 anchors, then view-2
    both = gather_with_grad(torch.stack([local[:n], local[n:]], dim=1))  # (N, 2, D), one collective
    big_n = both.shape[0]
    cands = torch.cat([both[:, 0], both[:, 1]], dim=0)  # (2N, D): all view-1, then all view-2

    logits = local @ cands.T / temperature  # (2n, 2N)
    g = rank() * n + torch.arange(n, device=z1.device)  # global index of each local image
    self_col = torch.cat([g, g + big_n])  # an anchor's own column
    pos_col = torch.cat([g + big_n, g])  # its other view
    rows = torch.arange(2 * n, device=z1.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, self_col] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    return F.cross_entropy(logits, pos_col)

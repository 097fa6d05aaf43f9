"""InfoNCE against a queue of negatives, as in MoCo (v1/v2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metassl.losses.distributed import full_precision


@full_precision
def moco_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo InfoNCE loss (He et al., 2020, Eq. 1; MoCo v2: Chen et al., 2020).

    ``q``: ``(n, D)`` queries, ``k``: ``(n, D)`` their positive keys (L2-normalised here;
    the keys are detached: the key encoder receives no gradient), ``queue``: ``(K, D)``
    negatives, already L2-normalised (it is not normalised again, and it is detached)::

        L = -mean_i log exp(q_i.k_i / t) / (exp(q_i.k_i / t) + sum_j exp(q_i.queue_j / t))

    The loss is a mean of per-query terms, so under DDP each rank's local mean already
    averages to the global loss (the queue holds the keys of all ranks).
    """
    if q.shape != k.shape or q.dim() != 2 or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(
            f"moco_infonce expects q, k of shape (n, D) and queue (K, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(queue.shape)}"
        )
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    queue = queue.detach().to(q.dtype)
    pos = (q * k).sum(dim=1, keepdim=True)  # (n, 1)
    neg = q @ queue.T  # (n, K)
    logits = torch.cat([pos, neg], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)

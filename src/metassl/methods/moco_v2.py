"""MoCo v2 (Chen et al., 2020, "Improved baselines"; MoCo: He et al., 2020)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metassl.losses import moco_infonce
from metassl.losses.distributed import broadcast_, gather_no_grad, rank, world_size
from metassl.methods.base import FeatureTransform, check_views, encode_views, register_method
from metassl.methods.momentum import MomentumMethod
from metassl.models.heads import ProjectionHead


@register_method("moco_v2")
class MoCoV2(MomentumMethod):
    """MoCo v2: a query encoder (backbone + 2-layer MLP head without BN, 2048 -> 128), a key
    encoder that is its momentum copy, and InfoNCE against a queue of past keys (Eq. 1).

    - The loss is symmetrised over the first two views,
      ``(L(q1, k2) + L(q2, k1)) / 2``, as in common CIFAR implementations (e.g. solo-learn's
      MoCo v2+); the paper uses one direction.  Further views are encoded, not in the loss.
    - The queue (a buffer, ``(queue_size, D)``, L2-normalised) receives one key per image per
      step: the keys of the first view, gathered from all ranks under DDP.  It is changed
      only in ``update_after_step``; a batch larger than the queue keeps its last keys, and a
      queue size that is not a multiple of the batch wraps around.
    - Key-encoder momentum: ``momentum`` (0.999 in the paper, constant); with
      ``final_momentum`` different from ``momentum`` it follows BYOL's cosine schedule.
    - ``shuffle_bn``: under DDP the key batch is shuffled across ranks before the key
      encoder and unshuffled after (the paper's Shuffling BN, Sec. 3.3).  In one process it
      has no effect.
    """

    augmentation = "simclr"

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        *,
        temperature: float = 0.2,
        queue_size: int = 65536,
        momentum: float = 0.999,
        final_momentum: float = 0.999,
        proj_hidden_dim: int = 2048,
        proj_output_dim: int = 128,
        shuffle_bn: bool = True,
    ) -> None:
        super().__init__(backbone, feat_dim)
        if queue_size < 1:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        self.temperature = temperature
        self.shuffle_bn = shuffle_bn
        self.projector = ProjectionHead(feat_dim, proj_hidden_dim, proj_output_dim, num_layers=2, hidden_bn=False)
        self.init_target(momentum, final_momentum)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_output_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    # -- target branch -------------------------------------------------------------------

    @torch.no_grad()
    def keys(self, x: torch.Tensor, feature_transform: FeatureTransform | None = None) -> torch.Tensor:
        """Key projections ``(n, D)`` of one view by the momentum encoder (not normalised)."""
        if not (self.shuffle_bn and world_size() > 1):
            return self.target_embed(x, feature_transform)
        x_all = gather_no_grad(x)  # (N, ...), equal local batches on every rank
        perm = broadcast_(torch.randperm(x_all.shape[0], device=x.device), src=0)
        mine = perm.view(world_size(), -1)[rank()]
        k_all = gather_no_grad(self.target_embed(x_all[mine], feature_transform))  # k_all[j] = key(x_all[perm[j]])
        k_all = k_all[torch.argsort(perm)]  # back to the original order
        return k_all.view(world_size(), -1, k_all.shape[1])[rank()]

    # -- protocol ------------------------------------------------------------------------
    def forward(self, views: list[torch.Tensor], feature_transform: FeatureTransform | None = None) -> dict[str, Any]:
        check_views(views, self.name)
        out: dict[str, Any] = encode_views(self, views, feature_transform, self.projector)
        out["z_target"] = [self.keys(x, feature_transform) for x in views]
        return out

    def loss(self, out: dict[str, Any]) -> torch.Tensor:
        """Reads the queue buffer, never changes it."""
        q, k = out["z"], out["z_target"]
        queue = self.queue
        return (
            moco_infonce(q[0], k[1], queue, self.temperature) + moco_infonce(q[1], k[0], queue, self.temperature)
        ) / 2

    @torch.no_grad()
    def update_after_step(self, out: dict[str, Any], progress: float) -> None:
        """EMA of the key encoder, then enqueue this step's keys (first view, all ranks)."""
        super().update_after_step(out, progress)
        self.enqueue(gather_no_grad(out["z_target"][0]))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write L2-normalised ``keys`` at the queue pointer (wrapping around), oldest first."""
        size = self.queue.shape[0]
        keys = F.normalize(keys.detach().to(self.queue.dtype), dim=1)[-size:]
        n = keys.shape[0]
        idx = (self.queue_ptr + torch.arange(n, device=self.queue.device)) % size
        self.queue.index_copy_(0, idx, keys)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

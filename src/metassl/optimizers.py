"""LARS (You, Gitman, Ginsburg, 2017, arXiv 1708.03888, Alg. 1): SGD with a layer-wise trust ratio.

A plain ``torch.optim.Optimizer`` with no dependency on the rest of the library, so that the
engine (which builds it) and the meta engine (whose virtual step replays it) can both use it.
"""

from __future__ import annotations

import torch

__all__ = ["LARS"]


class LARS(torch.optim.Optimizer):
    """SGD with layer-wise adaptive rate scaling (You et al., 2017, Alg. 1), as used by SimCLR/BYOL.

    The trust ratio ``eta * ||w|| / (||g|| + wd * ||w||)`` scales each parameter's update;
    groups with ``lars_exclude=True`` (biases, norm layers) get neither the trust ratio nor
    weight decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not group["lars_exclude"]:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                    d = d.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss



"""Differentiable collectives for losses that need the global batch.

Every helper is the identity (or a trivial answer) when ``torch.distributed`` is not
available or not initialised, so the losses run unchanged in one process.

Gradient convention
-------------------
The backward of each collective *sums* the incoming gradients over ranks, i.e. it returns
the true gradient of ``sum_r L_r`` (the sum of the per-rank losses) with respect to this
rank's inputs.  DDP then *averages* parameter gradients over ranks.  Hence a loss is exact
under DDP when every rank returns a value ``L_r`` whose mean over ranks is the loss of one
process on the global batch:

- a mean over *local* anchors of a per-sample term that sees the global batch (NT-Xent);
- the *global* loss itself, replicated on every rank (Barlow Twins, VICReg).

All ranks must pass tensors of the same shape (``DistributedSampler`` pads the dataset so
that every rank sees the same number of samples per step).
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "gather_with_grad",
    "gather_no_grad",
    "all_reduce_sum",
    "all_reduce_mean",
    "broadcast_",
    "full_precision",
]


def is_distributed() -> bool:
    """``torch.distributed`` is available, initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """Rank of this process (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` along dim 0 whose backward all-reduces (sums) the gradient and
    returns this rank's slice.

    New-style (``setup_context``) with a ``jvp`` and a differentiable backward, so that
    ``torch.func`` transforms (forward-over-reverse second-order meta-gradients) and double
    backward work under DDP: the tangent is gathered like the input, and the backward is
    itself built from the differentiable :class:`_AllReduceSum`.
    """

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _all_gather_cat(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.n = inputs[0].shape[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        start = dist.get_rank() * ctx.n
        return _AllReduceSum.apply(grad)[start : start + ctx.n]

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        return _all_gather_cat(tangent)


class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` whose backward (and jvp) is again ``all_reduce(SUM)``."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        y = x.contiguous().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        y = tangent.contiguous().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (``(n, ...)``) from all ranks along dim 0, rank order, keeping the
    gradient: the backward sums the gradient over ranks and returns this rank's slice.
    Identity when not distributed."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 without gradient (e.g. MoCo keys)."""
    if not is_distributed():
        return x.detach()
    return _all_gather_cat(x.detach())


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks. Identity when not distributed."""
    if not is_distributed():
        return x
    return _AllReduceSum.apply(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Differentiable mean over ranks. Identity when not distributed."""
    if not is_distributed():
        return x
    return _AllReduceSum.apply(x) / dist.get_world_size()


@torch.no_grad()
def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: overwrite ``x`` on every rank with the value of rank ``src``."""
    if is_distributed():
        dist.broadcast(x, src=src)
    return x


F = TypeVar("F", bound=Callable[..., torch.Tensor])


def full_precision(fn: F) -> F:
    """Run a loss outside autocast and with half-precision tensor arguments upcast to
    float32 (normalisation, batch statistics and exponentials are precision-sensitive).
    float32/float64 inputs are left as they are."""

    def up(a):
        if isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16):
            return a.float()
        return a

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]

"""The conditions of meta passes: frozen batch-norm statistics, precision, compiled modules run
eagerly, replayed backbone features, and the one all-reduce of meta-gradients across ranks."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from metassl.losses.distributed import is_distributed

__all__ = ["frozen_bn_stats", "full_precision_context", "meta_pass_context", "all_reduce_mean_", "replay_features"]


@contextlib.contextmanager
def frozen_bn_stats(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Batch norms in training mode use batch statistics but do not update their running
    statistics (nor ``num_batches_tracked``) inside the block."""
    changed: list[_BatchNorm] = []
    seen: set[int] = set()
    try:
        for root in modules:
            for m in root.modules():
                if isinstance(m, _BatchNorm) and id(m) not in seen and m.training and m.track_running_stats:
                    seen.add(id(m))
                    m.track_running_stats = False
                    changed.append(m)
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


@contextlib.contextmanager
def full_precision_context(device: torch.device) -> Iterator[None]:
    """Autocast disabled for ``device`` (and for CPU, where autocast may also be active)."""
    with contextlib.ExitStack() as stack:
        for dev in {device.type, "cpu"}:
            if dev in ("cpu", "cuda", "xpu", "mps", "hpu"):
                stack.enter_context(torch.autocast(device_type=dev, enabled=False))
        yield


@contextlib.contextmanager
def meta_pass_context(device: torch.device, modules: Iterable[nn.Module], full_precision: bool = True) -> Iterator[None]:
    """The conditions of every meta pass (module docstring): full precision unless asked
    otherwise, batch-norm statistics frozen, compiled modules eager, gradients enabled."""
    precision = full_precision_context(device) if full_precision else contextlib.nullcontext()
    with precision, frozen_bn_stats(modules), torch.compiler.set_stance("force_eager"), torch.enable_grad():
        yield


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """In place: average ``tensors`` over ranks with one flat all-reduce (no-op when not
    distributed or world size 1)."""
    if not tensors or not is_distributed():
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


@contextlib.contextmanager
def replay_features(backbone: nn.Module, views: list[torch.Tensor], features: list[torch.Tensor]) -> Iterator[dict[str, int]]:
    """Inside the block, ``backbone(view)`` returns the given features of that view (looked
    up by tensor identity) instead of running; any other call runs the backbone.  For meta
    passes whose backbone stays at its current weights: the real forward's features stand in
    (the yielded counts say how many calls were replayed and computed)."""
    table = {id(v): h for v, h in zip(views, features)}
    counts = {"replayed": 0, "computed": 0}
    had_own = "forward" in backbone.__dict__
    own = backbone.__dict__.get("forward")
    original = backbone.forward

    def forward(x, *args, **kwargs):
        h = table.get(id(x))
        if h is None or args or kwargs:
            counts["computed"] += 1
            return original(x, *args, **kwargs)
        counts["replayed"] += 1
        return h

    backbone.forward = forward
    try:
        yield counts
    finally:
        if had_own:
            backbone.forward = own
        else:
            del backbone.forward

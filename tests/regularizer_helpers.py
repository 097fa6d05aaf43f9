"""Shared by the bilevel regularizers' tests: a meta step must leave the training state as it found it."""

from __future__ import annotations

import torch


def training_state(method, reg, opt) -> dict:
    """Copies of every buffer (batch-norm statistics, a MoCo queue), parameter, gradient and SGD
    momentum buffer that a meta step could disturb."""
    return {"buffers": {n: b.clone() for n, b in list(method.named_buffers()) + list(reg.named_buffers())},
            "params": {n: p.detach().clone() for n, p in method.named_parameters()},
            "grads": {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None},
            "momentum": {id(p): s["momentum_buffer"].clone() for p, s in opt.state.items()}}


def assert_training_state_is(before: dict, method, reg, opt) -> None:
    """Every entry of :func:`training_state` is bit-identical to ``before``."""
    for n, b in list(method.named_buffers()) + list(reg.named_buffers()):
        assert torch.equal(b, before["buffers"][n]), n
    for n, p in method.named_parameters():
        assert torch.equal(p, before["params"][n]), n
        if n in before["grads"]:
            assert torch.equal(p.grad, before["grads"][n]), n
    for p, s in opt.state.items():
        assert torch.equal(s["momentum_buffer"], before["momentum"][id(p)])

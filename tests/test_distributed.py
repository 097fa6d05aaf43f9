"""Scale out: 2 processes x batch B/2 (gloo, CPU) train exactly like 1 process x batch B.

For EVERY registered base method (``metassl.methods.METHODS``) and EVERY registered
regularizer (``metassl.regularizers.REGULARIZERS``, discovered at import time, so a newly
registered one is covered without editing this file), two real training steps of
``metassl.engine.step.training_step`` are run

- under DDP: two processes (``init_process_group("gloo")``), each with half of the batch;
  the method + regularizer sit in a ``torch.nn.parallel.DistributedDataParallel`` wrapper
  whose forward runs the training step, and the backward goes through Lightning's own
  ``prepare_for_backward``, as the engine's ``SSLModule`` under ``strategy=ddp`` (manual
  optimization, ``find_unused_parameters=False``): DDP averages the gradients;
- in one process on the whole batch (the reference, computed in the pytest process).

Reference and batch norm: per-process batch-norm statistics legitimately differ from
full-batch statistics (SyncBatchNorm is GPU-only), so every batch norm of the reference
(backbone, heads, target networks, regularizer heads) normalises each rank's sub-batch
separately ("ghost batch"): a BN input whose length is a multiple of the global batch
``N`` is read as blocks of the global batch in rank order (one block per view when views
are concatenated), and rank ``r``'s BN batch is its slice of every block, exactly what
rank ``r`` feeds its own BN.

Randomness: a regularizer may draw random numbers during the step (masks, noise,
dropout).  In both runs the common torch samplers are routed to explicit generators with
the same seed per step (Lightning's ``seed_everything`` seeds every rank alike); in the
reference a draw whose leading dimension is a multiple of ``N`` is made per emulated rank
(rank ``r``'s rows from rank ``r``'s stream), so each sample gets the number it gets under
DDP.  Draws of any other shape must be the same on every rank.  (``torch.randperm`` over
the batch, or batch-shaped draws by functions not routed here, cannot be emulated: such a
regularizer needs a hook in this file.)

Checked after each of the 2 steps, against the reference, on both ranks:

- the loss and every named term (mean over ranks of the per-rank values: the loss
  convention of ``metassl.losses.distributed``);
- the gradient of every trainable parameter (encoder: after DDP's averaging) and of every
  meta-parameter of bilevel regularizers after ``meta_step`` (``StepContext.distributed``);

and after the 2 steps: every parameter (encoder, regularizer, meta, EMA targets) and every
buffer except batch-norm running statistics (e.g. the MoCo queue and its pointer after
``update_after_step`` enqueued the gathered global batch; queue size 14 < 2 x 10 keys so the
second step wraps around).  MoCo's shuffle-BN (on by default) is checked separately: the
keys under DDP equal the keys of the cross-rank shuffled sub-batches of the reference.

Bilevel regularizers run in every meta-gradient mode (an hparam whose default is one of
``metassl.meta.GRAD_MODES``), plus the variants in ``EXTRA_VARIANTS`` for known
hparams.  A stochastic, bilevel canary regularizer defined here checks the harness itself
(ghost BN, random-number emulation, meta-gradient averaging), and a "broken" canary that
skips the meta-gradient all-reduce must be *detected* (negative control).

Everything runs in float64 with a tiny conv backbone (8x8 images) and tiny heads, global
batch ``N = 10`` (5 per rank).  Tolerance: ``rtol = 1e-6, atol = 1e-9`` (float64: exact up
to summation order and the amplification of two optimizer steps); the finite-difference
meta-gradient is compared the same way (it is deterministic given its inputs).

Finally 2-process end-to-end runs of the CLI (``strategy=ddp``: Lightning's launcher
re-runs the command per rank; ``ddp_spawn``: child processes train, the launching process
evaluates and writes the run folder) must exit 0, print their result once and write one
``summary.json`` with ``world_size`` 2 and the steps taken.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
import traceback
import types
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import metassl.regularizers as _regularizers_pkg
from metassl.engine.optim import build_optimizer
from metassl.engine.step import training_step
from metassl.methods import METHODS, build_method, method_hparams
from metassl.models.feature_maps import FeatureMapForward
from metassl.regularizers.base import Regularizer, StepContext, build_regularizer, regularizer_hparams

WORLD = 2
N_LOCAL = 5  # per-rank batch; dims below avoid multiples of 5 so that only batch-shaped tensors look batch-shaped
N = WORLD * N_LOCAL
STEPS = 2
IMG = 8
FEAT = 12
RTOL, ATOL, SCALE_ATOL = 1e-6, 1e-9, 1e-8
SEED = 0
LR = 0.05  # encoder lr: the virtual step matters at these scales, and no case diverges in 2 steps
TIMEOUT = 240


# -- what is tested ------------------------------------------------------------------------------
def _registered_regularizers() -> dict[str, type[Regularizer]]:
    """Every regularizer module of ``metassl.regularizers`` imported, then the registry."""
    for info in pkgutil.iter_modules(_regularizers_pkg.__path__):
        importlib.import_module(f"metassl.regularizers.{info.name}")
    from metassl.regularizers.base import REGULARIZERS as base_registry

    return dict(getattr(_regularizers_pkg, "REGULARIZERS", base_registry))


REGULARIZERS = _registered_regularizers()

#: method hyper-parameters for tiny heads (applied where the method has the parameter)
METHOD_SMALL = {
    "proj_hidden_dim": 16,
    "proj_output_dim": 8,
    "pred_hidden_dim": 6,
    "queue_size": 14,
    "shuffle_bn": False,  # shuffle-BN is checked on its own (test_moco_shuffle_bn_keys)
    "momentum": 0.9,  # EMA targets move visibly in 2 steps
}

#: extra variants of known regularizers (applied only if the hparam exists)
EXTRA_VARIANTS: dict[str, list[dict[str, Any]]] = {
    "metamask": [
        {"order": "official"},
        {"order": "official", "grad_mode": "first_order"},
        {"order": "official", "grad_mode": "finite_difference"},
        {"virtual_params": "heads"},
        {"virtual_step": "sgd"},
    ],
    "metaug": [{"order": "official"}],
    "iclmsr": [{"order": "official"}, {"backbone_tangent": "jvp"}],
    "mrcl": [
        {"masked_views": "both"},
        {"mask_type": "block"},
        {"mask_type": "erase", "mask_ratio": 0.3},
        {"contrastive_input": "clean", "target_norm": "patch"},
        {"decoder": "linear"},
    ],
}


def _grad_modes() -> tuple[str, ...]:
    try:
        from metassl.meta import GRAD_MODES

        return tuple(GRAD_MODES)
    except ImportError:  # pragma: no cover - the meta engine is part of the package
        return ("first_order", "second_order", "finite_difference")


def _small_reg_hparams(name: str) -> dict[str, Any]:
    """Shrink every integer ``*dim*`` / ``*size*`` hyper-parameter larger than 16 to 16
    (projector widths, dictionary or bank sizes) and use a visible meta learning rate."""
    out: dict[str, Any] = {}
    for key, default in regularizer_hparams(name).items():
        if isinstance(default, bool) or not isinstance(default, int):
            continue
        if ("dim" in key or "size" in key) and default > 16:
            out[key] = 16
    if "meta_lr" in regularizer_hparams(name):
        out["meta_lr"] = 0.5
    if "rec_fraction" in regularizer_hparams(name):
        # MRCL reconstructs the first ceil(f * B_local) samples of each rank's batch: the same law as
        # one process, not the same samples, unless every sample is reconstructed
        out["rec_fraction"] = 1.0
    return out


def _reg_variants(name: str) -> list[dict[str, Any]]:
    hp = regularizer_hparams(name)
    variants: list[dict[str, Any]] = [{}]
    modes = _grad_modes()
    for key, default in hp.items():
        if isinstance(default, str) and default in modes:
            variants += [{key: m} for m in modes if m != default]
    for extra in EXTRA_VARIANTS.get(name, []):
        if all(k in hp for k in extra):
            variants.append(extra)
    return variants


def _variant_id(reg: str, variant: dict[str, Any]) -> str:
    return reg + "".join(f"[{k}={v}]" for k, v in sorted(variant.items()))


CANARIES = ("canary", "canary_broken")


def _configs() -> list[tuple[str, str, dict[str, Any]]]:
    """``(method, regularizer, hparam overrides)`` for every case."""
    cases = []
    for method in sorted(METHODS):
        for reg in sorted(REGULARIZERS):
            for variant in _reg_variants(reg):
                cases.append((method, reg, variant))
        cases.append((method, "canary", {}))
    cases.append(("simclr", "canary_broken", {}))
    return cases


CONFIGS = _configs()
CONFIG_IDS = [f"{m}+{_variant_id(r, v)}" for m, r, v in CONFIGS]


# -- the tiny model ----------------------------------------------------------------------------
class TinyConv(FeatureMapForward, nn.Module):
    """conv3x3(3->4)-BN-ReLU, conv3x3/2(4->FEAT)-BN-ReLU, global average pool: ``FEAT`` features.
    Has feature maps (``forward_features``: the ``(B, FEAT, 4, 4)`` map before the pool), so
    regularizers with ``needs_feature_maps`` (MRCL) run here too."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, FEAT, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(FEAT), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.pool(fmap).flatten(1)


class Canary(Regularizer):
    """A stochastic bilevel regularizer that checks the harness: dropout on the features
    and a learnt gate ``sigmoid(g)`` (meta-parameter) before the projectors, a noisy extra
    term on its own linear head (encoder parameters), and a first-order meta-gradient of
    the base loss after a virtual step mirroring the real one (``metassl.meta``).
    ``broken=True`` forgets to average the meta-gradient over ranks (must be detected)."""

    bilevel = True

    def __init__(self, broken: bool = False) -> None:
        super().__init__()
        self.broken = broken

    def setup(self, method) -> None:
        d = method.feat_dim
        self.gate = nn.Parameter(torch.linspace(-0.5, 0.5, d))
        self.head = nn.Linear(d, 3)

    def meta_parameters(self):
        return [self.gate]

    def _transform(self, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return F.dropout(h, 0.25, self.training) * torch.sigmoid(gate)

    def transform_features(self, h):
        return self._transform(h, self.gate)

    def extra_loss(self, out, ctx):
        f = torch.cat(out["f"][:2])
        noisy = f + 0.1 * torch.randn_like(f)
        return {"canary": 0.1 * self.head(noisy).pow(2).sum(1).mean()}

    def configure_meta_optimizer(self, total_steps):
        return torch.optim.SGD([self.gate], lr=0.5), None

    def before_encoder_step(self, ctx: StepContext) -> None:
        from torch.func import functional_call

        from metassl.meta import meta_gradient

        method = ctx.method
        trainable = {id(p) for p in method.trainable_parameters()}
        params = {n: p for n, p in method.named_parameters() if id(p) in trainable}

        def base(p, meta):
            out = functional_call(method, p, (ctx.views,), {"feature_transform": lambda h: self._transform(h, meta["gate"])}, strict=False)
            return method.loss(out)

        result = meta_gradient(
            params, {"gate": self.gate}, base, None,
            inner_grads={n: p.grad for n, p in params.items()}, optimizer=ctx.encoder_optimizer,
            mode="first_order", modules=[method, self], distributed=ctx.distributed and not self.broken,
        )
        ctx.cache["canary"] = result.grads["gate"]

    def meta_step(self, ctx: StepContext):
        self.gate.grad = ctx.cache.pop("canary").clone()
        return {}


def _build(method_name: str, reg_name: str, variant: dict[str, Any]):
    """Method + regularizer (float64, seeded), the encoder optimizer as the engine builds it,
    the meta optimizer."""
    torch.manual_seed(SEED)
    hp = {k: v for k, v in METHOD_SMALL.items() if k in method_hparams(method_name)}
    method = build_method(method_name, TinyConv(), FEAT, **hp)
    if reg_name in CANARIES:
        reg = Canary(broken=reg_name == "canary_broken")
        reg.setup(method)
    else:
        reg = build_regularizer(reg_name, method, **{**_small_reg_hparams(reg_name), **variant})
    container = nn.ModuleDict({"method": method, "regularizer": reg}).double().train()
    named = list(method.named_parameters()) + [
        (f"regularizer.{n}", p) for n, p in reg.named_parameters() if any(p is q for q in reg.encoder_parameters())
    ]
    opt_cfg = {"name": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "exclude_bias_and_norm": True, "lars_eta": 0.02}
    enc_opt = build_optimizer(opt_cfg, named, LR)
    meta_opt = None
    if reg.bilevel:
        meta_opt = reg.configure_meta_optimizer(10)[0]
    return container, enc_opt, meta_opt


def _batch(case: int, step: int):
    g = torch.Generator().manual_seed(1000 * case + step)
    views = [torch.randn(N, 3, IMG, IMG, generator=g, dtype=torch.float64) for _ in range(2)]
    views[1] = 0.6 * views[1] + 0.8 * views[0]  # correlated views
    labels = torch.randint(0, 3, (N,), generator=g)
    return views, labels


def _extras(case: int, step: int, reg: nn.Module) -> dict[str, torch.Tensor]:
    """The extra batch fields the regularizer lists in ``data_requirements``, for the global
    batch: ``"clean"`` (the un-augmented image) as one more random image per sample."""
    extras: dict[str, torch.Tensor] = {}
    if "clean" in getattr(reg, "data_requirements", ()):
        g = torch.Generator().manual_seed(1000 * case + step + 500)
        extras["clean"] = torch.randn(N, 3, IMG, IMG, generator=g, dtype=torch.float64)
    return extras


def _step_seed(case: int, step: int) -> int:
    return 7919 * case + 31 * step + 1


# -- random numbers: the same per sample in both runs -----------------------------------------------
class RankRNG:
    """Routes the common torch samplers to explicit generators (see module docstring).

    ``world=1`` (each DDP rank): every draw from one generator.  ``world>1`` (reference):
    a draw whose leading dim is a multiple of ``world * n_local`` is assembled from one
    draw per emulated rank (blocks of ``n_local`` rows, rank order within each block of
    the global batch); any other draw is made on every stream (kept in step) and rank 0's
    value returned."""

    def __init__(self, world: int, n_local: int, seed: int) -> None:
        self.world, self.n = world, n_local
        self.gens = [torch.Generator().manual_seed(seed) for _ in range(world)]

    def _rows(self, length: int, r: int) -> torch.Tensor:
        k = length // (self.world * self.n)
        return torch.cat([torch.arange(b * self.world * self.n + r * self.n, b * self.world * self.n + (r + 1) * self.n) for b in range(k)])

    def draw(self, shape, make):
        """``make(shape, generator, rows)`` -> tensor; ``rows`` selects the inputs of the
        rank's rows (``None``: all)."""
        shape = tuple(int(s) for s in shape)
        if self.world == 1:
            return make(shape, self.gens[0], None)
        if len(shape) >= 1 and shape[0] > 0 and shape[0] % (self.world * self.n) == 0:
            length, rest = shape[0], shape[1:]
            k = length // (self.world * self.n)
            parts = [make((length // self.world,) + rest, g, self._rows(length, r)) for r, g in enumerate(self.gens)]
            return torch.stack([p.reshape(k, self.n, *p.shape[1:]) for p in parts], 1).reshape(length, *parts[0].shape[1:])
        values = [make(shape, g, None) for g in self.gens]
        return values[0]

    @contextmanager
    def active(self):
        orig = {
            "rand": torch.rand, "randn": torch.randn, "randint": torch.randint, "rand_like": torch.rand_like,
            "randn_like": torch.randn_like, "bernoulli": torch.bernoulli, "normal": torch.normal,
            "multinomial": torch.multinomial, "randperm": torch.randperm, "dropout": F.dropout, "tdropout": torch.dropout,
            "uniform_": torch.Tensor.uniform_, "normal_": torch.Tensor.normal_, "bernoulli_": torch.Tensor.bernoulli_,
            "exponential_": torch.Tensor.exponential_,
        }
        rng = self

        def sizes(args):
            return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)

        def rand(*size, generator=None, **kw):
            if generator is not None or "out" in kw:
                return orig["rand"](*size, generator=generator, **kw)
            return rng.draw(sizes(size), lambda s, g, rows: orig["rand"](s, generator=g, **kw))

        def randn(*size, generator=None, **kw):
            if generator is not None or "out" in kw:
                return orig["randn"](*size, generator=generator, **kw)
            return rng.draw(sizes(size), lambda s, g, rows: orig["randn"](s, generator=g, **kw))

        def randint(*args, generator=None, **kw):
            if generator is not None or "out" in kw:
                return orig["randint"](*args, generator=generator, **kw)
            if "size" in kw:
                size = kw.pop("size")
                bounds = args
            else:
                bounds, size = args[:-1], args[-1]
            return rng.draw(size, lambda s, g, rows: orig["randint"](*bounds, s, generator=g, **kw))

        def like(fn):
            def wrapped(x, *, dtype=None, device=None, layout=None, requires_grad=False, memory_format=None, **kw):
                return fn(x.shape, dtype=dtype or x.dtype, device=device or x.device, requires_grad=requires_grad)

            return wrapped

        def bernoulli(input, *args, generator=None, **kw):
            if generator is not None or "out" in kw:
                return orig["bernoulli"](input, *args, generator=generator, **kw)
            p = args[0] if args else kw.pop("p", None)
            probs = input if p is None else torch.full_like(input, float(p))
            return rng.draw(input.shape, lambda s, g, rows: orig["bernoulli"](probs if rows is None else probs[rows], generator=g))

        def normal(*args, generator=None, **kw):
            if generator is not None or "out" in kw:
                return orig["normal"](*args, generator=generator, **kw)
            mean = kw.pop("mean", args[0] if args else 0.0)
            std = kw.pop("std", args[1] if len(args) > 1 else 1.0)
            if not isinstance(mean, torch.Tensor) and not isinstance(std, torch.Tensor):
                size = kw.pop("size", args[2] if len(args) > 2 else ())
                return mean + std * randn(size, **kw)
            m, s = torch.broadcast_tensors(torch.as_tensor(mean), torch.as_tensor(std))
            return rng.draw(
                m.shape,
                lambda sh, g, rows: orig["normal"](m if rows is None else m[rows], s if rows is None else s[rows], generator=g),
            )

        def multinomial(input, num_samples, replacement=False, *, generator=None, **kw):
            if generator is not None or "out" in kw or input.dim() != 2:
                return orig["multinomial"](input, num_samples, replacement, generator=generator, **kw)
            return rng.draw(
                (input.shape[0], num_samples),
                lambda s, g, rows: orig["multinomial"](input if rows is None else input[rows], num_samples, replacement, generator=g),
            )

        def randperm(n, *, generator=None, **kw):
            if generator is not None or "out" in kw:
                return orig["randperm"](n, generator=generator, **kw)
            return rng.draw((), lambda s, g, rows: orig["randperm"](n, generator=g, **kw))

        def inplace(name):
            def method(self, *args, generator=None, **kw):
                if generator is not None:
                    return orig[name](self, *args, generator=generator, **kw)
                value = rng.draw(
                    self.shape, lambda s, g, rows: orig[name](torch.empty(s, dtype=self.dtype, device=self.device), *args, generator=g, **kw)
                )
                with torch.no_grad():
                    return self.copy_(value)

            return method

        def dropout(input, p=0.5, training=True, inplace=False):
            if not training or p == 0:
                return input
            if p == 1:
                return input * 0
            keep = rng.draw(input.shape, lambda s, g, rows: orig["bernoulli_"](torch.empty(s, dtype=input.dtype), 1 - p, generator=g))
            out = input * keep / (1 - p)
            return input.copy_(out) if inplace else out

        torch.rand, torch.randn, torch.randint = rand, randn, randint
        torch.rand_like, torch.randn_like = like(rand), like(randn)
        torch.bernoulli, torch.normal, torch.multinomial, torch.randperm = bernoulli, normal, multinomial, randperm
        F.dropout, torch.dropout = dropout, dropout
        for name in ("uniform_", "normal_", "bernoulli_", "exponential_"):
            setattr(torch.Tensor, name, inplace(name))
        try:
            yield self
        finally:
            torch.rand, torch.randn, torch.randint = orig["rand"], orig["randn"], orig["randint"]
            torch.rand_like, torch.randn_like = orig["rand_like"], orig["randn_like"]
            torch.bernoulli, torch.normal = orig["bernoulli"], orig["normal"]
            torch.multinomial, torch.randperm = orig["multinomial"], orig["randperm"]
            F.dropout, torch.dropout = orig["dropout"], orig["tdropout"]
            for name in ("uniform_", "normal_", "bernoulli_", "exponential_"):
                setattr(torch.Tensor, name, orig[name])


# -- ghost batch norm for the reference --------------------------------------------------------
def _ghost_forward(self: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    length = x.shape[0]
    if not self.training or length % N != 0:
        return type(self).forward(self, x)
    k = length // N
    blocks = x.reshape(k, WORLD, N_LOCAL, *x.shape[1:])
    outs = [type(self).forward(self, blocks[:, r].reshape(k * N_LOCAL, *x.shape[1:])) for r in range(WORLD)]
    return torch.stack([o.reshape(k, N_LOCAL, *o.shape[1:]) for o in outs], 1).reshape(length, *outs[0].shape[1:])


def ghost_batch_norm_(module: nn.Module) -> int:
    """In place: every batch norm normalises each emulated rank's sub-batch separately
    (parameter names and objects unchanged). Returns how many were patched."""
    count = 0
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.forward = types.MethodType(_ghost_forward, m)
            count += 1
    return count


# -- recording --------------------------------------------------------------------------------
def _is_bn_stat(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")


def _grads(container: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in container.named_parameters() if p.grad is not None}


def _state(container: nn.Module) -> dict[str, torch.Tensor]:
    state = {f"param:{n}": p.detach().clone() for n, p in container.named_parameters()}
    state.update({f"buffer:{n}": b.detach().clone() for n, b in container.named_buffers() if not _is_bn_stat(n)})
    return state


def _scalars(logs: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items() if k == "loss" or k.startswith("loss_")}


# -- the DDP side ------------------------------------------------------------------------------------
class _StepModule(nn.Module):
    """What DDP wraps: its forward is one training step, like SSLModule.training_step."""

    def __init__(self, container: nn.ModuleDict) -> None:
        super().__init__()
        self.inner = container

    def forward(self, views, labels, enc_opt, meta_opt, step, backward, extras=None):
        logs = training_step(
            self.inner["method"], self.inner["regularizer"], views, labels, enc_opt, meta_opt, extras=extras,
            progress=step / 10, global_step=step, backward=backward, distributed=True,
        )
        # Lightning's _DDPForwardRedirection.on_after_inner_forward (manual optimization): the
        # backward already ran inside; DDP's post-forward must not arm the reducer again
        self.wrapper.require_backward_grad_sync = False
        return logs


def _run_ddp_case(case: int, method_name: str, reg_name: str, variant: dict[str, Any], rank: int) -> dict[str, Any]:
    from lightning.pytorch.overrides.distributed import prepare_for_backward
    from torch.nn.parallel import DistributedDataParallel

    container, enc_opt, meta_opt = _build(method_name, reg_name, variant)
    module = _StepModule(container)
    ddp = DistributedDataParallel(module, find_unused_parameters=False)
    object.__setattr__(module, "wrapper", ddp)  # not a submodule

    def backward(loss: torch.Tensor) -> None:  # Lightning: DDPStrategy.pre_backward, then loss.backward()
        prepare_for_backward(ddp, loss)
        loss.backward()

    record: dict[str, Any] = {"steps": []}
    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    for step in range(STEPS):
        views, labels = _batch(case, step)
        with RankRNG(1, N_LOCAL, _step_seed(case, step)).active():
            extras = {k: v[sl].contiguous() for k, v in _extras(case, step, container["regularizer"]).items()}
            logs = ddp([v[sl].contiguous() for v in views], labels[sl], enc_opt, meta_opt, step, backward, extras)
        ddp.require_backward_grad_sync = True  # on_after_outer_forward
        record["steps"].append({"scalars": _scalars(logs), "grads": _grads(container)})
    record["state"] = _state(container)
    return record


def _moco_shuffle_case(rank: int) -> dict[str, Any]:
    """Keys of one view with shuffle-BN under DDP, and the permutation that was used."""
    import metassl.methods.moco_v2 as moco_module

    torch.manual_seed(SEED)
    hp = {k: v for k, v in METHOD_SMALL.items() if k in method_hparams("moco_v2")}
    hp["shuffle_bn"] = True
    method = build_method("moco_v2", TinyConv(), FEAT, **hp).double().train()
    seen = {}
    original = moco_module.broadcast_

    def recording(x, src=0):
        out = original(x, src)
        seen["perm"] = out.clone()
        return out

    moco_module.broadcast_ = recording
    try:
        torch.manual_seed(123)
        views, _ = _batch(99, 0)
        keys = method.keys(views[0][rank * N_LOCAL : (rank + 1) * N_LOCAL])
    finally:
        moco_module.broadcast_ = original
    return {"keys": keys, "perm": seen.get("perm")}


def _worker(rank: int, init_file: str, out_dir: str, cases: list[tuple[int, str, str, dict[str, Any]]]) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    results: dict[Any, Any] = {}
    try:
        for case, method_name, reg_name, variant in cases:
            start = time.perf_counter()
            try:
                results[case] = _run_ddp_case(case, method_name, reg_name, variant, rank)
            except Exception:  # noqa: BLE001 - recorded, reported by the test of this case
                results[case] = {"error": traceback.format_exc()}
            results[case]["seconds"] = time.perf_counter() - start
            dist.barrier()  # a failure on one rank must not shift the other's collectives
        results["moco_shuffle"] = _moco_shuffle_case(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# -- the reference -------------------------------------------------------------------------------
def _run_reference(case: int, method_name: str, reg_name: str, variant: dict[str, Any]) -> dict[str, Any]:
    container, enc_opt, meta_opt = _build(method_name, reg_name, variant)
    assert ghost_batch_norm_(container) > 0
    record: dict[str, Any] = {"steps": []}
    for step in range(STEPS):
        views, labels = _batch(case, step)
        with RankRNG(WORLD, N_LOCAL, _step_seed(case, step)).active():
            logs = training_step(
                container["method"], container["regularizer"], views, labels, enc_opt, meta_opt,
                extras=_extras(case, step, container["regularizer"]), progress=step / 10, global_step=step, distributed=False,
            )
        record["steps"].append({"scalars": _scalars(logs), "grads": _grads(container)})
    record["state"] = _state(container)
    return record


@contextmanager
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture(scope="module")
def ddp_results():
    """One spawn for every case: the two ranks run while this process computes references."""
    cases = [(i, m, r, v) for i, (m, r, v) in enumerate(CONFIGS)]
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, os.path.join(tmp, "store"), tmp, cases)) for r in range(WORLD)]
        start = time.perf_counter()
        for p in procs:
            p.start()
        references: dict[int, Any] = {}
        torch.set_num_threads(1)
        try:
            with _float64():
                for i, m, r, v in cases:
                    try:
                        references[i] = _run_reference(i, m, r, v)
                    except Exception:  # noqa: BLE001
                        references[i] = {"error": traceback.format_exc()}
        finally:
            torch.set_num_threads(threads)
        for p in procs:
            p.join(timeout=max(1.0, TIMEOUT - (time.perf_counter() - start)))
        for p in procs:
            if p.is_alive():
                p.kill()
        codes = [p.exitcode for p in procs]
        assert codes == [0] * WORLD, f"DDP workers exited with {codes}"
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    yield {"ranks": ranks, "references": references}


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """``|a - e| <= RTOL |e| + ATOL + SCALE_ATOL * max|e|`` elementwise."""
    atol = ATOL + SCALE_ATOL * float(expected.abs().max()) if expected.numel() else ATOL
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def _compare(case: int, ddp_results) -> None:
    ref = ddp_results["references"][case]
    ranks = [r[case] for r in ddp_results["ranks"]]
    assert "error" not in ref, f"reference (1 process) failed:\n{ref['error']}"
    for name, value in ref["state"].items():
        assert torch.isfinite(value).all(), f"the 1-process reference diverged ({name} is not finite): lower LR"
    for r, res in enumerate(ranks):
        assert "error" not in res, f"rank {r} failed under DDP:\n{res['error']}"
    for step in range(STEPS):
        expected = ref["steps"][step]
        got = [res["steps"][step] for res in ranks]
        for key, value in expected["scalars"].items():
            mean = sum(g["scalars"][key] for g in got) / WORLD
            _close(torch.tensor(mean), torch.tensor(value), f"step {step}: {key} (mean over ranks)")
        for r, g in enumerate(got):
            assert set(g["grads"]) == set(expected["grads"]), f"step {step}, rank {r}: parameters with a gradient differ"
            for name, grad in expected["grads"].items():
                _close(g["grads"][name], grad, f"step {step}, rank {r}: gradient of {name}")
    for r, res in enumerate(ranks):
        assert set(res["state"]) == set(ref["state"])
        for name, value in ref["state"].items():
            _close(res["state"][name], value, f"after {STEPS} steps, rank {r}: {name}")


@pytest.mark.parametrize("case", [i for i, c in enumerate(CONFIGS) if c[1] != "canary_broken"], ids=[
    cid for cid, c in zip(CONFIG_IDS, CONFIGS) if c[1] != "canary_broken"
])
def test_two_processes_match_one(ddp_results, case):
    _compare(case, ddp_results)


def test_harness_detects_missing_meta_all_reduce(ddp_results):
    """Negative control: a regularizer that does not average its meta-gradient over ranks."""
    case = CONFIGS.index(("simclr", "canary_broken", {}))
    ranks = [r[case] for r in ddp_results["ranks"]]
    ref = ddp_results["references"][case]
    assert all("error" not in x for x in (*ranks, ref))
    expected = ref["steps"][0]["grads"]["regularizer.gate"]
    assert any(not torch.allclose(res["steps"][0]["grads"]["regularizer.gate"], expected, rtol=RTOL, atol=ATOL) for res in ranks)
    # ... while everything the encoder sees still matches at the first step
    for res in ranks:
        for name, grad in ref["steps"][0]["grads"].items():
            if name != "regularizer.gate":
                _close(res["steps"][0]["grads"][name], grad, f"step 0: gradient of {name}")


def test_every_registered_method_and_regularizer_is_covered():
    assert {m for m, _, _ in CONFIGS} == set(METHODS)
    assert set(REGULARIZERS) <= {r for _, r, _ in CONFIGS}
    assert "none" in REGULARIZERS


def test_ghost_batch_norm_matches_per_rank_batches():
    """The reference's BN: the same output as normalising each rank's rows separately."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3).double().train()
    x = torch.randn(2 * N, 3, dtype=torch.float64)  # two views of the global batch, concatenated
    plain = [nn.functional.batch_norm(torch.cat([x[b * N + r * N_LOCAL : b * N + (r + 1) * N_LOCAL] for b in range(2)]),
                                      None, None, training=True) for r in range(WORLD)]
    ghost_batch_norm_(bn)
    y = bn(x)
    for r in range(WORLD):
        rows = torch.cat([torch.arange(b * N + r * N_LOCAL, b * N + (r + 1) * N_LOCAL) for b in range(2)])
        torch.testing.assert_close(y[rows], plain[r])


def test_rank_rng_assembles_per_rank_streams():
    """A batch-shaped draw of the reference = the ranks' draws, interleaved by block."""
    with RankRNG(1, N_LOCAL, 5).active():
        local = torch.rand(2 * N_LOCAL, 3)  # one rank: two views' worth of rows
        scalar = torch.randn(4)
    with RankRNG(WORLD, N_LOCAL, 5).active():
        full = torch.rand(2 * N, 3)
        scalar_ref = torch.randn(4)
    for r in range(WORLD):
        rows = torch.cat([torch.arange(b * N + r * N_LOCAL, b * N + (r + 1) * N_LOCAL) for b in range(2)])
        torch.testing.assert_close(full[rows], local)  # same seed on every rank
    torch.testing.assert_close(scalar_ref, scalar)


def test_moco_shuffle_bn_keys(ddp_results):
    """Shuffle-BN: each rank's key encoder sees a cross-rank shuffled sub-batch; the keys come
    back to their images (and differ from unshuffled keys, so the shuffle is real)."""
    got = [r["moco_shuffle"] for r in ddp_results["ranks"]]
    perm = got[0]["perm"]
    assert perm is not None and torch.equal(perm, got[1]["perm"])
    assert not torch.equal(perm.view(WORLD, -1).sort(dim=1).values, torch.arange(N).view(WORLD, -1))
    with _float64():
        torch.manual_seed(SEED)
        hp = {k: v for k, v in METHOD_SMALL.items() if k in method_hparams("moco_v2")}
        method = build_method("moco_v2", TinyConv(), FEAT, **hp).double().train()
        views, _ = _batch(99, 0)
        x = views[0]
        with torch.no_grad():
            shuffled = torch.cat([method.target_embed(x[perm.view(WORLD, -1)[r]], None) for r in range(WORLD)])
            expected = shuffled[torch.argsort(perm)]
            unshuffled = torch.cat([method.target_embed(x[r * N_LOCAL : (r + 1) * N_LOCAL], None) for r in range(WORLD)])
    keys = torch.cat([g["keys"] for g in got])
    _close(keys, expected, "shuffle-BN keys")
    assert not torch.allclose(keys, unshuffled, rtol=RTOL, atol=ATOL)


# -- end to end: the CLI with 2 processes -------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_cli_two_process_ddp_smoke(tmp_path, strategy):
    """``metassl train trainer.devices=2 trainer.strategy=ddp|ddp_spawn`` on CPU (gloo).

    ``ddp`` is the strategy to use from the console script: Lightning's launcher re-runs the
    same command line for rank 1.  Under ``ddp_spawn`` the launching process's trainer never
    steps; the summary takes steps and epochs from rank 0's last checkpoint."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "metassl.cli", "train", "protocol=smoke", "trainer.accelerator=cpu",
        "trainer.devices=2", f"trainer.strategy={strategy}", f"output_dir={out}", "data.num_train=160",
        "data.num_test=60", "method.proj_hidden_dim=64", "method.proj_output_dim=32", "batch_size=16",
        "trainer.max_steps=3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("kNN top-1 on the") == 1, proc.stdout  # one rank finished the run
    summaries = list(out.rglob("summary.json"))
    assert summaries == [out / "summary.json"]
    summary = json.loads(summaries[0].read_text())
    assert summary["world_size"] == 2
    assert summary["steps"] == 3 and summary["batch_size"] == 16
    assert 0.0 <= summary["knn_top1"] <= 1.0
    assert (out / "checkpoints" / "last.ckpt").is_file()


def test_ddp_spawn_resumed_run_reports_the_time_of_the_whole_run(tmp_path):
    """Under ``ddp_spawn`` the checkpoint is loaded in the child processes, never in the launching one:
    the summary of a resumed run must still add the seconds trained before the checkpoint (read from
    it by the launching process), not report the last process's time alone."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "metassl.cli", "train", "protocol=smoke", "trainer.accelerator=cpu",
        "trainer.devices=2", "trainer.strategy=ddp_spawn", f"output_dir={out}", "data.num_train=160",
        "data.num_test=60", "method.proj_hidden_dim=64", "method.proj_output_dim=32", "batch_size=16",
        "trainer.max_steps=-1", "trainer.max_epochs=1", "resume=auto",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = out / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    first_steps = int(state["global_step"])
    before = 10_000.0  # stands for a long first process: larger than any time this test takes
    state["metassl"]["train_seconds"] = before
    torch.save(state, last)
    cmd[cmd.index("trainer.max_epochs=1")] = "trainer.max_epochs=2"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["epochs"], summary["steps"]) == (2, 2 * first_steps), summary
    assert before < summary["train_seconds"] < before + 300
    resumed = torch.load(last, map_location="cpu", weights_only=False)["metassl"]["train_seconds"]
    assert before < resumed <= summary["train_seconds"] + 1.0  # the checkpoint's own count agrees

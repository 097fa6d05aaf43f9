"""The metassl side: a configuration timed exactly as it trains, one call of
:func:`metassl.engine.step.training_step` per step with the engine's encoder optimizer (SGD over
:func:`metassl.engine.optim.build_optimizer`'s parameter groups), the regularizer's own meta
optimizer, and ``channels_last`` / ``torch.compile`` applied where the engine applies them."""

from __future__ import annotations

import argparse

import torch

from metassl.bench.cases import DEFAULT_OPTIMIZER, Case, Variant, make_views, param_bytes, preset, scaled_lr, seeded_backbone, timed_step

__all__ = ["build_metassl_case"]


def build_metassl_case(args: argparse.Namespace, method_name: str, reg_name: str, variant: Variant) -> Case:
    from metassl.engine.optim import build_optimizer
    from metassl.engine.step import training_step
    from metassl.methods import build_method
    from metassl.regularizers import build_regularizer

    backbone, feat_dim = seeded_backbone(args)
    method = build_method(method_name, backbone, feat_dim, **preset("method", method_name))
    reg = build_regularizer(reg_name, method, **preset("regularizer", reg_name))
    method.to(args.device).train()
    reg.to(args.device).train()
    if variant.channels_last:  # as SSLModule.on_fit_start
        method.to(memory_format=torch.channels_last)
    if variant.compile:  # as train() with trainer.compile=true
        method.backbone.compile()
    # the parameters the engine's encoder optimizer gets (SSLModule.configure_optimizers)
    named = list(method.named_trainable_parameters()) + [(f"regularizer.{n}", p) for n, p in reg.named_encoder_parameters()]
    enc_opt = build_optimizer(DEFAULT_OPTIMIZER, named, scaled_lr(args))
    meta_opt = reg.configure_meta_optimizer(1000)[0] if reg.bilevel else None
    views, labels = make_views(args, variant)
    # what the data pipeline adds for regularizers that ask for it (ICL-MSR: the un-augmented image)
    extras = {"clean": views[0].clone()} if "clean" in reg.data_requirements else None
    total = args.warmup + args.steps * args.repeats

    def body(i: int):
        return training_step(method, reg, views, labels, enc_opt, meta_opt, extras=extras, progress=i / total,
                             global_step=i)["loss"]

    return Case("metassl", method_name, reg_name, variant, step=timed_step(args, variant, body), param_bytes=param_bytes(method, reg))

"""The virtual-step meta-gradient engine shared by the bilevel regularizers (MetaMask,
MetAug, ICL-MSR): :func:`meta_gradient` with ``first_order``, exact ``second_order`` and
``finite_difference`` modes over ``torch.func.functional_call`` parameter dicts."""

from metassl.meta.engine import (
    GRAD_MODES,
    LossFn,
    MetaGradient,
    all_reduce_mean_,
    frozen_bn_stats,
    full_precision_context,
    inner_meta_grad,
    meta_gradient,
    meta_pass_context,
)
from metassl.meta.passes import replay_features
from metassl.meta.virtual_step import GradClip, ParamRule, SGDHyper, VirtualStep, apply_virtual_step, plan_virtual_step, step_vjp

__all__ = [
    "GRAD_MODES",
    "GradClip",
    "ParamRule",
    "LossFn",
    "MetaGradient",
    "SGDHyper",
    "VirtualStep",
    "all_reduce_mean_",
    "apply_virtual_step",
    "frozen_bn_stats",
    "full_precision_context",
    "inner_meta_grad",
    "meta_gradient",
    "meta_pass_context",
    "plan_virtual_step",
    "replay_features",
    "step_vjp",
]

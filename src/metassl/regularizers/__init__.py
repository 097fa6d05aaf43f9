"""Regularizers that plug into any base method, registered by name."""

from metassl.regularizers.base import (
    REGULARIZERS,
    Regularizer,
    StepContext,
    build_regularizer,
    register_regularizer,
    regularizer_hparams,
)

__all__ = ["REGULARIZERS", "Regularizer", "StepContext", "build_regularizer", "register_regularizer", "regularizer_hparams"]

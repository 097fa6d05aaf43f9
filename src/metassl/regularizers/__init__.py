"""Regularizers: plug-ins over any base method, registered by name in :data:`REGULARIZERS`.

Importing this package imports every regularizer module so that the registry is full.
"""

from metassl.regularizers.base import REGULARIZERS, Regularizer, StepContext, build_regularizer, register_regularizer, regularizer_hparams
from metassl.regularizers.metamask import MetaMask
from metassl.regularizers.mrcl import MRCL  # noqa: F401
from metassl.regularizers.iclmsr import ICLMSR  # noqa: F401
from metassl.regularizers.metaug import MetAug  # noqa: F401

__all__ = [
    "REGULARIZERS",
    "Regularizer",
    "StepContext",
    "build_regularizer",
    "register_regularizer",
    "regularizer_hparams",
    "MetaMask",
]

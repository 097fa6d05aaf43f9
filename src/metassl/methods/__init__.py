"""Base self-supervised methods, registered by name in :data:`METHODS`.

Importing this package imports every method module so that the registry is full.
"""

from metassl.methods.base import METHODS, Method, build_method, get_method_class, method_hparams, register_method
from metassl.methods.simclr import SimCLR
from metassl.methods.moco_v2 import MoCoV2
from metassl.methods.byol import BYOL
from metassl.methods.simsiam import SimSiam
from metassl.methods.barlow_twins import BarlowTwins
from metassl.methods.vicreg import VICReg

__all__ = [
    "METHODS",
    "Method",
    "build_method",
    "get_method_class",
    "method_hparams",
    "register_method",
    "SimCLR",
    "MoCoV2",
    "BYOL",
    "SimSiam",
    "BarlowTwins",
    "VICReg",
]

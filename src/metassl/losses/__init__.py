"""Pure loss functions of the base methods (tensors in, scalar out; DDP-aware).

Each function only reads its inputs; under ``torch.distributed`` it gathers or reduces
what it needs so that the result matches one process on the global batch (see
:mod:`metassl.losses.distributed` for the gradient convention).
"""

from metassl.losses.barlow_twins import barlow_twins_loss
from metassl.losses.byol import byol_loss
from metassl.losses.moco import moco_infonce
from metassl.losses.simclr import nt_xent
from metassl.losses.simsiam import simsiam_loss
from metassl.losses.unified import margin_injection_loss, unified_contrastive_loss
from metassl.losses.vicreg import vicreg_loss

__all__ = ["nt_xent", "moco_infonce", "byol_loss", "simsiam_loss", "barlow_twins_loss", "vicreg_loss", "unified_contrastive_loss", "margin_injection_loss"]

"""Contrastive losses, one per module: InfoNCE/NT-Xent, SGCL's multi-positive NCE, NPID, ramp,
pixel-level InfoNCE (dense branch)."""

from sgcl.losses.info_nce import info_nce, nt_xent
from sgcl.losses.multi_positive_nce import multi_positive_nce
from sgcl.losses.npid import npid_loss
from sgcl.losses.pixel_info_nce import pixel_info_nce
from sgcl.losses.ramp import sigmoid_rampup

__all__ = ["info_nce", "nt_xent", "multi_positive_nce", "npid_loss", "pixel_info_nce", "sigmoid_rampup"]

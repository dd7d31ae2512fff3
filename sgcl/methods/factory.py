"""``build_method``: a pretraining method by name (timm-style factory)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from sgcl.methods.base import PretrainMethod
from sgcl.methods.config import MethodConfig


def _registry() -> dict[str, Callable[[MethodConfig, nn.Module], PretrainMethod]]:
    from sgcl.methods.moco_v2 import MoCoV2
    from sgcl.methods.sgcl import SGCL
    from sgcl.methods.simclr import SimCLR

    return {"sgcl": SGCL, "moco_v2": MoCoV2, "simclr": SimCLR}


def available_methods() -> list[str]:
    return sorted(_registry())


def build_method(cfg: MethodConfig, backbone: nn.Module) -> PretrainMethod:
    """The method ``cfg.name`` around ``backbone`` (a timm model with ``num_classes=0``)."""
    registry = _registry()
    if cfg.name not in registry:
        raise ValueError(f"unknown method {cfg.name!r}; choose one of {sorted(registry)} (method.name)")
    method = registry[cfg.name](cfg, backbone)
    if cfg.dense.enabled:  # the dense pixel-level term, added to any global objective with a weight
        from sgcl.methods.dense import DenseMethod

        method = DenseMethod(method, cfg.dense)
    return method

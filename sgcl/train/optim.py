"""Optimisers by name (SGD, LARS, AdamW) with parameter groups that exclude biases and norm
weights from weight decay (and from LARS adaptation)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017) on top of SGD with momentum.

    For a group with ``lars=True``: ``g ← (g + wd·w) · η‖w‖ / (‖g‖ + wd‖w‖)`` (trust ratio 1 when
    either norm is 0), then momentum. Groups with ``lars=False`` (biases, norms) get plain SGD.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, eta, mom = group["weight_decay"], group["eta"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if wd:
                    g = g.add(p, alpha=wd)
                if group["lars"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm, torch.ones_like(w_norm))
                    g = g * trust
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = g.clone().detach()
                else:
                    buf.mul_(mom).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights and 1-d parameters (also ViT pos/cls tokens) get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name


def param_groups(model: nn.Module, weight_decay: float, exclude_bias_norm: bool = True) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if exclude_bias_norm and is_no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lars": True}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars": False})
    return groups


def build_optimizer(name: str, params: Iterable[dict], lr: float, weight_decay: float, momentum: float = 0.9,
                    betas: tuple[float, float] = (0.9, 0.999), lars_eta: float = 0.001) -> torch.optim.Optimizer:
    """``sgd`` | ``lars`` | ``adamw``; every group keeps its own ``weight_decay``."""
    params = list(params)
    if name == "sgd":
        groups = [{k: v for k, v in g.items() if k != "lars"} for g in params]
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=lars_eta)
    if name == "adamw":
        groups = [{k: v for k, v in g.items() if k != "lars"} for g in params]
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise ValueError(f"unknown optimiser {name!r}; choose sgd, lars or adamw")

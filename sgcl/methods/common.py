"""Pieces shared by the methods: projection head from the config, momentum key encoder,
per-step seeded generators (identical on every rank, so negatives and rank positions drawn
under DDP equal those of one process with the whole batch)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from sgcl.distributed import concat_all_gather, get_world_size, local_slice
from sgcl.methods.config import MethodConfig
from sgcl.models.heads import ProjectionHead


def num_features(backbone: nn.Module) -> int:
    n = getattr(backbone, "num_features", None)
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"backbone {type(backbone).__name__} has no positive integer `num_features`; use a timm model with num_classes=0")
    return n


def make_head(cfg: MethodConfig, in_dim: int) -> ProjectionHead:
    hidden = cfg.proj_hidden_dim or in_dim
    return ProjectionHead(in_dim, hidden, cfg.proj_dim, num_layers=cfg.proj_layers, batch_norm=cfg.proj_batch_norm)


def autocast_off(device: torch.device):
    """Context in which similarities and losses run in fp32 even inside the trainer's autocast
    (exp(s/0.07) and cosine differences of 1e-3 do not survive bf16/fp16)."""
    return torch.autocast(device_type=device.type, enabled=False)


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """CPU generator seeded from (seed, step, salt): the same draws on every rank."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) * 7919 + int(salt)) % (2**63 - 1))


class MomentumEncoder(nn.Module):
    """Frozen copy of backbone + head, updated as ``θ_k ← m θ_k + (1 − m) θ_q`` (MoCo)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, momentum: float):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.backbone = copy.deepcopy(backbone)
        self.head = copy.deepcopy(head)
        for p in self.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def reset(self, backbone: nn.Module, head: nn.Module) -> None:
        """Copy the query encoder's weights and buffers (start of training)."""
        self.backbone.load_state_dict(backbone.state_dict())
        self.head.load_state_dict(head.state_dict())

    @torch.no_grad()
    def update(self, backbone: nn.Module, head: nn.Module) -> None:
        m = self.momentum
        for mine, src in ((self.backbone, backbone), (self.head, head)):
            for pk, pq in zip(mine.parameters(), src.parameters()):
                pk.mul_(m).add_(pq.detach(), alpha=1.0 - m)
            for bk, bq in zip(mine.buffers(), src.buffers()):
                bk.copy_(bq)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, shuffle_bn: bool = False, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``(norm(g(f(x))), norm(f(x)))`` in fp32; with ``shuffle_bn`` under DDP the batch is
        permuted across ranks before the encoder and un-permuted after (MoCo's Shuffle-BN)."""
        if shuffle_bn and get_world_size() > 1:
            x_all = concat_all_gather(x)
            sl = local_slice(x.shape[0], x.device)
            perm = torch.randperm(x_all.shape[0], generator=generator).to(x.device)
            h = self.backbone(x_all[perm[sl]])
            k_all = concat_all_gather(torch.cat([self.head(h).float(), h.float()], 1))
            unshuffled = torch.empty_like(k_all)
            unshuffled[perm] = k_all
            kh = unshuffled[sl]
            d = kh.shape[1] - h.shape[1]
            k, h = kh[:, :d], kh[:, d:]
        else:
            h = self.backbone(x)
            k = self.head(h).float()
        return F.normalize(k, dim=1), F.normalize(h.float(), dim=1)

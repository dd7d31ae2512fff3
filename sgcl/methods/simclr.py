"""SimCLR: NT-Xent over both views of the whole (all-gathered) batch, temperature ``simclr.temperature``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgcl.distributed import gather_with_grad, local_slice
from sgcl.losses.info_nce import nt_xent
from sgcl.methods.base import PretrainMethod
from sgcl.methods.common import autocast_off, make_head, num_features
from sgcl.methods.config import MethodConfig
from sgcl.train.health import RecentRows


class SimCLR(PretrainMethod):
    num_views = 2

    def __init__(self, cfg: MethodConfig, backbone: nn.Module):
        super().__init__(backbone)
        self.cfg = cfg
        self.head = make_head(cfg, num_features(backbone))
        self.recent = RecentRows()

    def forward(self, batch: dict, epoch: float, step: int) -> dict[str, torch.Tensor]:
        x1, x2 = batch["views"][0], batch["views"][1]
        b = x1.shape[0]
        h = self.backbone(torch.cat([x1, x2]))
        z = F.normalize(self.head(h).float(), dim=1)
        if self.training:
            self.recent.add("embedding", z[:b])
            self.recent.add("backbone", h[:b])
        z1, z2 = z[:b], z[b:]
        a1, a2 = gather_with_grad(z1), gather_with_grad(z2)
        n = a1.shape[0]
        off = local_slice(b, z.device).start
        local = torch.arange(b, device=z.device) + off
        self_index = torch.cat([local, local + n])
        pos_index = torch.cat([local + n, local])
        with autocast_off(z.device):
            loss = nt_xent(z, torch.cat([a1, a2]), pos_index, self_index, self.cfg.simclr.temperature)
        with torch.no_grad():
            pos = (z1 * z2).sum(1).mean()
        return {"loss": loss, "loss_instance": loss.detach(), "pos_sim": pos}

    def representation_rows(self) -> dict[str, torch.Tensor]:
        return {name: rows for name in self.recent.names() if (rows := self.recent.get(name)) is not None}

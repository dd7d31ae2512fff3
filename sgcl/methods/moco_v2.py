"""MoCo v2 (methods.md §5.1): query encoder + momentum key encoder + FIFO queue, InfoNCE at τ.

The queue is all-gathered across ranks and enqueued after each optimiser step; the key encoder
is updated in ``on_after_step`` (equivalent to MoCo's update before the next key forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgcl.losses.info_nce import info_nce
from sgcl.memory.queue import FeatureQueue
from sgcl.methods.base import DatasetMeta, PretrainMethod
from sgcl.methods.common import MomentumEncoder, autocast_off, make_head, num_features, step_generator
from sgcl.methods.config import MethodConfig
from sgcl.train.health import RecentRows


class MoCoV2(PretrainMethod):
    num_views = 2

    def __init__(self, cfg: MethodConfig, backbone: nn.Module):
        super().__init__(backbone)
        self.cfg = cfg
        self.head = make_head(cfg, num_features(backbone))
        self.key_encoder = MomentumEncoder(backbone, self.head, cfg.moco.momentum)
        self.queue = FeatureQueue(cfg.moco.queue_size, cfg.proj_dim, seed=cfg.seed)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.recent = RecentRows()

    def on_train_start(self, meta: DatasetMeta) -> None:
        self.key_encoder.reset(self.backbone, self.head)
        # the queue is kept identical on all ranks by all-gathered enqueues: DDP need not re-broadcast it
        self._ddp_params_and_buffers_to_ignore = [n for n, _ in self.named_buffers() if n.startswith("queue.")]

    def forward(self, batch: dict, epoch: float, step: int) -> dict[str, torch.Tensor]:
        x_q, x_k = batch["views"][0], batch["views"][1]
        h = self.backbone(x_q)
        q = F.normalize(self.head(h).float(), dim=1)
        k, _ = self.key_encoder(x_k, shuffle_bn=self.cfg.moco.shuffle_bn, generator=step_generator(self.cfg.seed, step, 11))
        with autocast_off(q.device):
            loss = info_nce(q, k, self.queue.keys.detach(), self.cfg.tau_head)
        if self.training:
            self._pending.append((k.detach(), batch["index"].detach()))
            self.recent.add("embedding", q)
            self.recent.add("backbone", h)
        with torch.no_grad():
            pos = (q * k).sum(1).mean()
            neg = (q @ self.queue.keys[:1024].float().t()).mean()  # a sample of the queue: logging only
        return {"loss": loss, "loss_instance": loss.detach(), "pos_sim": pos, "neg_sim": neg}

    def representation_rows(self) -> dict[str, torch.Tensor]:
        rows = {"queue": self.queue.keys[self.queue.valid()]}
        for name in ("embedding", "backbone"):
            recent = self.recent.get(name)
            if recent is not None:
                rows[name] = recent
        return rows

    @torch.no_grad()
    def on_after_step(self, out: dict[str, torch.Tensor]) -> None:
        self.key_encoder.update(self.backbone, self.head)
        for k, idx in self._pending:
            self.queue.enqueue(k, idx.to(k.device))
        self._pending.clear()

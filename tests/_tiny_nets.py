"""Tiny backbones for method tests (imported by tests and by the torchrun worker).

``TinyGN`` uses GroupNorm, not BatchNorm: its output for a sample does not depend on the other
samples of the batch, so two processes with half a batch each compute exactly what one process
computes on the whole batch — the DDP-equivalence test then isolates the method's own gathers
(BatchNorm would differ by design unless SyncBN is used, which gloo on CPU supports poorly).
"""

from __future__ import annotations

import torch
from torch import nn


class TinyGN(nn.Module):
    """3 → 16 → 32 channels, two stride-2 convs, GroupNorm, global average pool; ``num_features`` 32."""

    num_features = 32

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def grid_dataset(n_slides: int = 2, side: int = 6):
    """``slide_of``, ``grid_of`` of ``n_slides`` full ``side``×``side`` grids (patch ids slide-major)."""
    cols, rows = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy")
    g = torch.stack([cols.reshape(-1), rows.reshape(-1)], 1)
    return torch.arange(n_slides).repeat_interleave(side * side), g.repeat(n_slides, 1)


def make_batch(index: torch.Tensor, slide_of, grid_of, num_views: int = 2, size: int = 16, local: int = 8, seed: int = 0) -> dict:
    """Deterministic images per patch index (so any split of a batch sees the same pixels)."""
    views, locs = [], []
    for v in range(num_views):
        imgs = []
        for i in index.tolist():
            g = torch.Generator().manual_seed(seed * 100_003 + i * 31 + v)
            imgs.append(torch.randn(3, size, size, generator=g))
        views.append(torch.stack(imgs))
    for c in range(4):
        for i in index.tolist():
            g = torch.Generator().manual_seed(seed * 100_003 + i * 31 + 17 + c)
            locs.append(torch.randn(3, local, local, generator=g))
    return {
        "views": views,
        "local": torch.stack(locs).reshape(4, len(index), 3, local, local).reshape(4 * len(index), 3, local, local),
        "index": index.clone(),
        "slide": slide_of[index],
        "grid": grid_of[index],
    }

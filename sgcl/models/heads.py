"""Projection heads (global MLP and per-pixel 1×1-conv head), one module for all heads."""

from __future__ import annotations

from torch import nn


class ProjectionHead(nn.Module):
    """MLP ``in -> hidden -> ... -> out`` with optional BatchNorm (SimCLR/MoCo v2/SwAV-style necks).

    ``num_layers=1`` is a linear projection; ``num_layers=2`` is SGCL's SwAVNeck (no BN).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, num_layers: int = 2, batch_norm: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class DenseProjectionHead(nn.Module):
    """Per-pixel projection: 1×1 conv ``in -> hidden -> out`` on a (B, C, H, W) feature map."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_dim, hidden_dim, 1), nn.BatchNorm2d(hidden_dim), nn.ReLU(inplace=True), nn.Conv2d(hidden_dim, out_dim, 1)
        )

    def forward(self, x):
        return self.net(x)

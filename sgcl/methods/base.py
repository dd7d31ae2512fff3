"""The interface between the trainer and a pretraining method.

Batch contract (a dict of tensors; the data pipeline produces it, the method consumes it):

| key        | shape                  | meaning                                                        |
|------------|------------------------|----------------------------------------------------------------|
| ``views``  | list of (B, 3, H, W)   | global views, ``views[0]`` always present, ``views[1]`` for two-view methods |
| ``local``  | (4B, 3, h, w)          | SGCL quadrant crops ordered [tl(B), tr(B), bl(B), br(B)] (optional) |
| ``geoms``  | list of (B, 8) float   | per global view, its geometry (see ``sgcl.transforms.base.ViewGeometry``) |
| ``entropy`` | list of (B, H, W) float | per global view, its IGU entropy map (only with ``dense.sampler: igu``; computed once per patch on the un-augmented pixels and rendered through the view's geometry) |
| ``index``  | (B,) int64             | global patch index in the dataset (0..N-1)                      |
| ``slide``  | (B,) int64             | slide index (0..S-1)                                           |
| ``grid``   | (B, 2) int64           | (column, row) on the slide's patch grid                        |

Lifecycle, called by the trainer: ``on_train_start(meta)`` once (after moving to the device and
before DDP wrap), ``on_epoch_start(epoch)`` (k-means, broadcast), ``forward(batch, epoch, step)``
(``epoch`` is fractional: the epoch index plus the fraction of it already done) -> dict with ``loss`` and every term as detached scalars for logging, ``on_after_step(out)``
(bank/queue updates, momentum encoder), ``extra_state()`` / ``load_extra_state(state)`` for
anything a resume must restore that is not a parameter or buffer, ``representation_rows()`` for
the training-health diagnostics (``sgcl.train.health``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class DatasetMeta:
    """What a method may know about the whole dataset (static, identical on every rank)."""

    num_patches: int
    num_slides: int
    slide_of: torch.Tensor   # (N,) int64 slide index of every patch
    grid_of: torch.Tensor    # (N, 2) int64 (column, row) of every patch
    neighbors: Any = None    # sgcl.data.neighbors.SpatialIndex (grid-radius neighbours, per slide)


class PretrainMethod(nn.Module):
    """Base class: owns the backbone (``self.backbone``, a timm model with ``num_classes=0``)."""

    num_views: int = 2       # global views the method needs per patch
    needs_local: bool = False  # SGCL quadrant multi-crop

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def on_train_start(self, meta: DatasetMeta) -> None:  # noqa: B027 - optional hook
        pass

    def on_epoch_start(self, epoch: int) -> None:  # noqa: B027
        pass

    def forward(self, batch: dict, epoch: float, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def on_after_step(self, out: dict[str, torch.Tensor]) -> None:  # noqa: B027
        pass

    def extra_state(self) -> dict:
        return {}

    def representation_rows(self) -> dict[str, torch.Tensor]:
        """Rows whose spread the trainer logs (``sgcl.train.health``): the bank or queue rows and
        recent backbone features, by name. Empty by default."""
        return {}

    def load_extra_state(self, state: dict) -> None:  # noqa: B027
        pass

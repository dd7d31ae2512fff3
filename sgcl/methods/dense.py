"""The dense pixel-level branch: an optional term added to any global objective with a weight.

``DenseBranch`` puts a per-pixel projection head (:class:`~sgcl.models.heads.DenseProjectionHead`)
on the backbone's feature map (``forward_features``) of two global views, finds the cells of
view B that see the same source pixels as view A's cells (from the two ``ViewGeometry`` rows,
:func:`sgcl.transforms.geometry.correspondence`), chooses anchor cells of view A among those with
a partner, and applies the pixel InfoNCE (:func:`sgcl.losses.pixel_info_nce.pixel_info_nce`).

Anchor samplers (``DenseConfig.sampler``), per image, over the cells with a valid partner:

- ``uniform``: uniform without replacement;
- ``arco_sg`` / ``arco_sag``: ARCO stratified (antithetic) group sampling, ``arco_mode``
  ``virtual`` (reference-code index strata) or ``spatial`` (g × g cells of the feature map);
- ``igu``: IGU-Aug, probability ∝ ``H^α`` (or ``1[H ≥ d]``) of the view image's entropy map,
  averaged over each feature cell (needs ``images_a``).

Repeated draws (SG/SAG sample with replacement) are merged, so an anchor is never its own negative.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sgcl.losses.pixel_info_nce import pixel_info_nce
from sgcl.methods.base import PretrainMethod
from sgcl.models.heads import DenseProjectionHead
from sgcl.sampling.info_guided import entropy_map, sampling_weights
from sgcl.sampling.stratified import stratified_group_sample
from sgcl.transforms.geometry import correspondence

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class DenseConfig:
    """Options of the dense branch (the ``dense:`` section of a pretraining config)."""

    enabled: bool = False
    weight: float = 1.0
    sampler: Literal["uniform", "arco_sg", "arco_sag", "igu"] = "uniform"
    arco_mode: Literal["virtual", "spatial"] = "spatial"
    groups: int = 4
    n_anchors: int = 64
    temperature: float = 0.2
    hidden_dim: int = 512
    out_dim: int = 128
    igu_method: Literal["rank_disk", "box_hist"] = "rank_disk"
    igu_grey: Literal["haematoxylin", "luminance"] = "haematoxylin"
    igu_alpha: float = 0.3
    igu_threshold: float | None = None
    igu_radius: int = 10
    igu_box: int = 64
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    seed: int = 0               # anchor draws are seeded from (seed, step): identical across ranks and resumes

    def __post_init__(self) -> None:
        if self.n_anchors < 2:
            raise ValueError(f"dense.n_anchors={self.n_anchors} must be >= 2 (anchors are each other's negatives)")
        if self.temperature <= 0:
            raise ValueError(f"dense.temperature={self.temperature} must be > 0 (typical 0.1-0.2)")
        if self.groups < 1:
            raise ValueError(f"dense.groups={self.groups} must be >= 1")


def as_feature_map(backbone: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) view of a timm ``forward_features`` output: NCHW CNN maps as is, NHWC
    (Swin-style) permuted, ViT tokens with their prefix (class/register) tokens dropped and folded
    to a square."""
    num = getattr(backbone, "num_features", None)
    if out.ndim == 3:
        prefix = int(getattr(backbone, "num_prefix_tokens", 0))
        tokens = out[:, prefix:]
        side = int(round(tokens.shape[1] ** 0.5))
        if side * side != tokens.shape[1]:
            raise ValueError(f"cannot fold {tokens.shape[1]} tokens into a square feature map")
        return tokens.transpose(1, 2).reshape(out.shape[0], out.shape[2], side, side)
    if out.ndim == 4 and num is not None and out.shape[1] != num and out.shape[-1] == num:
        return out.permute(0, 3, 1, 2)
    if out.ndim != 4:
        raise ValueError(f"forward_features returned shape {tuple(out.shape)}; the dense branch needs a spatial feature map")
    return out


def feature_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) feature map of a timm backbone for the images ``x``."""
    return as_feature_map(backbone, backbone.forward_features(x))


class DenseBranch(nn.Module):
    """Dense head + anchor sampler + pixel InfoNCE (see the module docstring)."""

    def __init__(self, in_dim: int, cfg: DenseConfig | None = None):
        super().__init__()
        self.cfg = cfg or DenseConfig()
        self.head = DenseProjectionHead(in_dim, self.cfg.hidden_dim, self.cfg.out_dim)
        self.generator: torch.Generator | None = None  # optional, for reproducible anchor draws

    # -- anchors ---------------------------------------------------------------------------
    def _entropy_cells(self, image: torch.Tensor, feat_hw: tuple[int, int]) -> torch.Tensor:
        c = self.cfg
        mean = torch.tensor(c.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(c.image_std, dtype=torch.float32)[:, None, None]
        rgb = ((image.detach().float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        ent = entropy_map(rgb.permute(1, 2, 0).numpy(), c.igu_method, c.igu_grey, c.igu_radius, c.igu_box)
        return F.adaptive_avg_pool2d(torch.from_numpy(ent)[None, None], feat_hw)[0, 0].reshape(-1)

    def choose_anchors(
        self, candidates: torch.Tensor, feat_hw: tuple[int, int], cell_entropy: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Subset of ``candidates`` (flat cell indices of view A, row-major) to use as anchors."""
        c, gen = self.cfg, self.generator
        M = candidates.numel()
        n = min(c.n_anchors, M)
        if M == 0:
            return candidates
        if c.sampler == "uniform":
            pick = torch.randperm(M, generator=gen)[:n]
        elif c.sampler in ("arco_sg", "arco_sag"):
            coords = torch.stack([candidates // feat_hw[1], candidates % feat_hw[1]], 1)
            pick = stratified_group_sample(
                M, n, c.groups, c.sampler == "arco_sag", c.arco_mode, coords if c.arco_mode == "spatial" else None, gen, extent=feat_hw
            )
            pick = torch.unique(pick)
        elif c.sampler == "igu":
            if cell_entropy is None:
                raise ValueError("dense.sampler='igu' needs the view images (images_a) to compute entropy maps")
            w = sampling_weights(cell_entropy[candidates].double(), c.igu_alpha, c.igu_threshold)
            pick = torch.multinomial(w, n, replacement=False, generator=gen)
        else:
            raise ValueError(f"unknown dense.sampler {c.sampler!r}; use uniform, arco_sg, arco_sag or igu")
        return candidates[pick]

    # -- loss -------------------------------------------------------------------------------
    def loss(
        self,
        feat_a: torch.Tensor,
        feat_b: torch.Tensor,
        geom_a: torch.Tensor,
        geom_b: torch.Tensor,
        images_a: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Weighted dense loss of two views' feature maps (B, C, h, w).

        Returns ``loss`` (weighted, with gradient), ``loss_dense`` (unweighted, detached) and
        ``dense_pairs`` (number of anchor pairs used, detached).
        """
        B, _, ha, wa = feat_a.shape
        hb, wb = feat_b.shape[-2:]
        _, idx_b, valid = correspondence(geom_a, geom_b, (ha, wa), (hb, wb))
        za_map = self.head(feat_a).flatten(2)  # (B, D, ha*wa)
        zb_map = self.head(feat_b).flatten(2)
        rows_a, rows_b = [], []
        for i in range(B):
            cand = valid[i].nonzero().flatten()
            ent = self._entropy_cells(images_a[i], (ha, wa)) if (self.cfg.sampler == "igu" and images_a is not None) else None
            anchors = self.choose_anchors(cand, (ha, wa), ent)
            if anchors.numel() == 0:
                continue
            dev = za_map.device
            rows_a.append(za_map[i, :, anchors.to(dev)].t())
            rows_b.append(zb_map[i, :, idx_b[i, anchors].to(dev)].t())
        pairs = sum(r.shape[0] for r in rows_a)
        if pairs < 2:  # keep the graph connected (DDP) with an exact zero
            raw = (za_map.sum() + zb_map.sum()) * 0.0
        else:
            raw = pixel_info_nce(torch.cat(rows_a), torch.cat(rows_b), self.cfg.temperature)
        return {
            "loss": raw * self.cfg.weight,
            "loss_dense": raw.detach(),
            "dense_pairs": torch.tensor(float(pairs), device=raw.device),
        }


class _FeatureTap:
    """Installed as ``backbone.forward_features``: records ``(input, feature map)`` while active,
    so the dense branch reuses the feature maps the global objective already computed. Holds the
    module itself, so a ``copy.deepcopy`` of the backbone gets a tap bound to the copy."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.active = False
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x, *args, **kwargs):
        out = type(self.module).forward_features(self.module, x, *args, **kwargs)
        if self.active:
            self.records.append((x, out))
        return out

    def start(self) -> None:
        self.records, self.active = [], True

    def stop(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rec, self.records, self.active = self.records, [], False
        return rec


def _find_rows(records: list[tuple[torch.Tensor, torch.Tensor]], view: torch.Tensor) -> torch.Tensor | None:
    """The feature rows computed for ``view`` (directly, or as a slice of a concatenated batch)."""
    b = view.shape[0]
    for x, out in records:
        if x.shape[1:] != view.shape[1:] or x.shape[0] % b or out.shape[0] != x.shape[0]:
            continue
        for k in range(x.shape[0] // b):
            part = x[k * b : (k + 1) * b]
            if (part.data_ptr() == view.data_ptr() and part.stride() == view.stride()) or torch.equal(part, view):
                return out[k * b : (k + 1) * b]
    return None


class DenseMethod(PretrainMethod):
    """Any pretraining method plus the dense branch: ``loss = base loss + weight · dense loss``.

    The base method runs unchanged; the feature maps of the two global views are taken from its
    own backbone passes (a tap on ``forward_features``) when it computed them with gradient, and
    computed here otherwise (e.g. MoCo's second view, which only the key encoder sees, or SGCL
    with one global view — the wrapper then asks the data pipeline for two views).
    """

    def __init__(self, base: PretrainMethod, cfg: DenseConfig):
        super().__init__(base.backbone)
        self.base = base
        self.num_views = max(2, int(base.num_views))
        self.needs_local = base.needs_local
        in_dim = getattr(base.backbone, "num_features", None)
        if not isinstance(in_dim, int):
            raise ValueError("the dense branch needs a timm backbone with an integer num_features")
        self.dense = DenseBranch(in_dim, cfg)
        self._tap = _FeatureTap(base.backbone)
        base.backbone.forward_features = self._tap  # instance attribute: timm's forward() calls it

    def on_train_start(self, meta) -> None:
        self.base.on_train_start(meta)

    def on_epoch_start(self, epoch: int) -> None:
        self.base.on_epoch_start(epoch)

    @torch.no_grad()
    def on_after_step(self, out: dict[str, torch.Tensor]) -> None:
        self.base.on_after_step(out)

    def extra_state(self) -> dict:
        return self.base.extra_state()

    def load_extra_state(self, state: dict) -> None:
        self.base.load_extra_state(state)

    def _view_features(self, records, view: torch.Tensor) -> torch.Tensor:
        rows = _find_rows(records, view)
        if rows is None:
            return feature_map(self.backbone, view)
        return as_feature_map(self.backbone, rows)

    def forward(self, batch: dict, epoch: int, step: int) -> dict[str, torch.Tensor]:
        views, geoms = batch["views"], batch.get("geoms")
        if len(views) < 2 or geoms is None or len(geoms) < 2:
            raise ValueError("the dense branch needs two global views and their geometries (batch['views'], batch['geoms'])")
        self._tap.start()
        try:
            out = dict(self.base(batch, epoch, step))
        finally:
            records = self._tap.stop()
        records = [(x, f) for x, f in records if f.requires_grad or not torch.is_grad_enabled()]
        fa = self._view_features(records, views[0])
        fb = self._view_features(records, views[1])
        if self.dense.generator is None:
            self.dense.generator = torch.Generator()
        self.dense.generator.manual_seed(int(self.dense.cfg.seed) * 1_000_003 + int(step) * 7919 + 17)
        d = self.dense.loss(fa, fb, geoms[0], geoms[1], images_a=views[0] if self.dense.cfg.sampler == "igu" else None)
        out["loss"] = out["loss"] + d["loss"].to(out["loss"].dtype)
        out["loss_dense"] = d["loss_dense"]
        out["dense_pairs"] = d["dense_pairs"]
        return out

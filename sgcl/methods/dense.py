"""The dense pixel-level branch: an optional term added to any global objective with a weight.

``DenseBranch`` puts a per-pixel projection head (:class:`~sgcl.models.heads.DenseProjectionHead`)
on the backbone's feature map (``forward_features``) of two global views, finds the cells of
view B that see the same source pixels as view A's cells (from the two ``ViewGeometry`` rows,
:func:`sgcl.transforms.geometry.correspondence`), chooses anchor cells of view A among those with
a partner, and applies the pixel InfoNCE (:func:`sgcl.losses.pixel_info_nce.pixel_info_nce`).

Candidates: the cells of view A with a partner in view B, one per B cell (when several A cells
fall in one B cell, e.g. B zoomed out, the one whose source point is nearest that B cell's centre),
so an anchor's negatives never include its own positive cell; the pixel InfoNCE also gets the
``(image, B cell)`` id of every pair and never uses rows with equal ids as each other's negatives.

Anchor samplers (``DenseConfig.sampler``), per image, all without replacement, so each returns
exactly ``min(n_anchors, candidates)`` distinct anchors (samplers compare at equal anchor counts):

- ``uniform``: uniform;
- ``arco_sg`` / ``arco_sag``: ARCO stratified (antithetic) group sampling
  (``stratified_group_sample(..., replacement=False)``), ``arco_mode`` ``virtual`` (reference-code
  index strata) or ``spatial`` (g × g cells of the feature map);
- ``igu``: IGU-Aug, probability ∝ ``H^α`` (or ``1[H ≥ d]``) of view A's entropy map averaged over
  each feature cell. The map comes with the batch (``batch["entropy"]``): the data pipeline
  computes it once per patch on the un-augmented pixels and renders it through each view's
  geometry (``build_info_guide``, ``sgcl.sampling.info_guided.InfoGuide``), where IGU-Aug's
  adaptive jitter also acts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sgcl.config import ConfigError, bounded, check_values
from sgcl.losses.pixel_info_nce import pixel_info_nce
from sgcl.methods.base import PretrainMethod
from sgcl.models.heads import DenseProjectionHead
from sgcl.sampling.info_guided import HE_CATEGORY_THRESHOLDS, AdaptiveJitter, InfoGuide, PatchEntropy, sampling_weights
from sgcl.sampling.stratified import stratified_group_sample
from sgcl.transforms.geometry import cell_centres, correspondence, view_to_source


@dataclass
class DenseConfig:
    """Options of the dense branch (the ``dense:`` section of a pretraining config)."""

    enabled: bool = False       # add the pixel-level InfoNCE between the two global views to the method's loss
    weight: float = bounded(1.0, ge=0)  # total loss = method loss + weight * dense loss
    sampler: Literal["uniform", "arco_sg", "arco_sag", "igu"] = "uniform"  # anchor cells per image, all without replacement: min(n_anchors, candidates) each
    arco_mode: Literal["virtual", "spatial"] = "spatial"  # ARCO strata: g x g cells of the feature map, or the reference code's virtual index grid
    groups: int = bounded(4, ge=1)  # ARCO g (g² strata)
    n_anchors: int = bounded(64, ge=2)  # anchor cells per image, among the cells both views see (one per cell of view B)
    temperature: float = bounded(0.2, gt=0)  # pixel InfoNCE temperature (typical 0.1-0.2)
    hidden_dim: int = bounded(512, ge=1)  # dense projection head (1x1 convs)
    out_dim: int = bounded(128, ge=1)
    igu_method: Literal["rank_disk", "box_hist"] = "rank_disk"  # IGU entropy map: disk of radius igu_radius (bits) or igu_box² box histogram (nats); computed once per patch in the loader
    igu_grey: Literal["haematoxylin", "luminance"] = "haematoxylin"  # grey channel of the entropy map
    igu_alpha: float = bounded(0.3, ge=0)  # anchor probability ∝ H^alpha of the cell's mean entropy
    igu_threshold: float | None = bounded(None, ge=0)  # set: probability ∝ 1[H >= threshold] instead of H^alpha
    igu_radius: int = bounded(10, ge=1)  # rank_disk: disk radius, px
    igu_box: int = bounded(64, ge=1)  # box_hist: box side, px
    igu_cache: int = bounded(1024, ge=0)  # entropy maps kept per loader worker (LRU, float16: ~100 KB per 224-px patch); 0 = no cache
    igu_adaptive_jitter: bool = True  # sampler igu: per-region brightness/contrast of IGU-Aug on the global views (CPU pipeline, aug.gpu=false); replaces aug.brightness/aug.contrast there
    igu_category_mode: Literal["absolute", "percentile"] = "absolute"  # entropy categories low/medium/high: fixed thresholds, or each patch's own percentiles
    igu_category_thresholds: tuple[float, float] | None = bounded(None, ge=0)  # absolute mode, in the map's units; None = the H&E default of igu_method/igu_grey (rank_disk+haematoxylin: 4.4, 5.4 bits)
    igu_category_percentiles: tuple[float, float] = bounded((30.0, 70.0), ge=0, le=100)  # percentile mode: per-patch percentiles of its entropy map
    igu_jitter_smooth: float = bounded(4.0, ge=0)  # Gaussian sigma (view px) smoothing the per-pixel factor maps: no hard seams between regions
    seed: int = bounded(0, ge=0)  # anchor draws are seeded from (seed, step): identical across ranks and resumes

    def __post_init__(self) -> None:
        check_values(self)  # also when built in code: ranges (n_anchors >= 2: anchors are each other's negatives) + validate()

    def validate(self) -> None:
        """igu_category_thresholds and igu_category_percentiles are increasing (low <= high)."""
        lo, hi = self.category_thresholds
        if not lo <= hi:
            raise ConfigError(f"igu_category_thresholds: {[lo, hi]} must be increasing (low <= high)",
                              key="igu_category_thresholds")
        plo, phi = self.igu_category_percentiles
        if not plo <= phi:
            raise ConfigError(f"igu_category_percentiles: {[plo, phi]} must be increasing (low <= high)",
                              key="igu_category_percentiles")

    @property
    def category_thresholds(self) -> tuple[float, float]:
        """The absolute IGU category thresholds in effect (``igu_category_thresholds`` or the H&E default)."""
        return tuple(self.igu_category_thresholds or HE_CATEGORY_THRESHOLDS[(self.igu_method, self.igu_grey)])


def build_info_guide(cfg: DenseConfig | None, gpu_aug: bool = False) -> InfoGuide | None:
    """The data pipeline's IGU-Aug guide for ``cfg``: ``None`` unless the dense branch samples with
    ``igu`` (no entropy map is computed otherwise); with the adaptive jitter on, the CPU pipeline only."""
    if cfg is None or not cfg.enabled or cfg.sampler != "igu":
        return None
    if cfg.igu_adaptive_jitter and gpu_aug:
        raise ConfigError("method.dense.igu_adaptive_jitter=true applies IGU-Aug's per-region brightness/contrast in the CPU "
                          "data pipeline and cannot run with aug.gpu=true: set aug.gpu=false, or method.dense.igu_adaptive_jitter=false "
                          "(IGU anchor sampling still works; brightness/contrast then come from aug.brightness/aug.contrast)")
    entropy = PatchEntropy(cfg.igu_method, cfg.igu_grey, cfg.igu_radius, cfg.igu_box, cfg.igu_cache)
    jitter = AdaptiveJitter() if cfg.igu_adaptive_jitter else None
    return InfoGuide(entropy, jitter, cfg.igu_category_mode, cfg.category_thresholds, tuple(cfg.igu_category_percentiles),
                     cfg.igu_jitter_smooth)


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


def match_cells(
    geom_a: torch.Tensor, geom_b: torch.Tensor, feat_hw_a: tuple[int, int], feat_hw_b: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every cell of view A (B, ha·wa): the B cell it falls in and whether it is valid
    (:func:`~sgcl.transforms.geometry.correspondence`), and the squared source-pixel distance from
    the A cell's source point to that B cell's centre."""
    _, idx_b, valid = correspondence(geom_a, geom_b, feat_hw_a, feat_hw_b)
    ga = geom_a.detach().cpu().reshape(-1, 8)
    gb = geom_b.detach().cpu().reshape(-1, 8)
    src_a = view_to_source(cell_centres(ga, feat_hw_a), ga)
    src_b = view_to_source(cell_centres(gb, feat_hw_b), gb)
    centre = src_b.gather(1, idx_b[..., None].expand(-1, -1, 2))
    return idx_b, valid, ((src_a - centre) ** 2).sum(-1)


def one_per_cell(candidates: torch.Tensor, cell: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """``candidates`` (ascending), keeping of those that share a ``cell`` the one of least ``dist``
    (ties: the lowest index) — deterministic."""
    order = candidates[torch.argsort(dist[candidates], stable=True)]
    order = order[torch.argsort(cell[order], stable=True)]
    keys = cell[order]
    first = torch.ones_like(keys, dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]
    return order[first].sort().values


class DenseBranch(nn.Module):
    """Dense head + anchor sampler + pixel InfoNCE (see the module docstring)."""

    def __init__(self, in_dim: int, cfg: DenseConfig | None = None):
        super().__init__()
        self.cfg = cfg or DenseConfig()
        self.head = DenseProjectionHead(in_dim, self.cfg.hidden_dim, self.cfg.out_dim)
        self.generator: torch.Generator | None = None  # optional, for reproducible anchor draws

    # -- anchors ---------------------------------------------------------------------------
    def choose_anchors(
        self, candidates: torch.Tensor, feat_hw: tuple[int, int], cell_entropy: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``min(n_anchors, M)`` distinct members of ``candidates`` (M flat cell indices of view A,
        row-major); ``cell_entropy`` (h·w,) the mean entropy of every cell (sampler ``igu``)."""
        c, gen = self.cfg, self.generator
        M = candidates.numel()
        n = min(c.n_anchors, M)
        if M == 0:
            return candidates
        if c.sampler == "uniform":
            pick = torch.randperm(M, generator=gen)[:n]
        elif c.sampler in ("arco_sg", "arco_sag"):
            coords = torch.stack([candidates // feat_hw[1], candidates % feat_hw[1]], 1) if c.arco_mode == "spatial" else None
            pick = stratified_group_sample(M, n, c.groups, c.sampler == "arco_sag", c.arco_mode, coords, gen, feat_hw, replacement=False)
        elif c.sampler == "igu":
            if cell_entropy is None:
                raise ValueError("dense.sampler='igu' needs the entropy of view A's cells (see DenseBranch.pairs)")
            w = sampling_weights(cell_entropy[candidates].double(), c.igu_alpha, c.igu_threshold)
            w = w + w.max() * 1e-9  # cells of weight 0 (igu_threshold) are drawn last, never short of n
            pick = torch.multinomial(w, n, replacement=False, generator=gen)
        else:
            raise ValueError(f"unknown dense.sampler {c.sampler!r}; use uniform, arco_sg, arco_sag or igu")
        return candidates[pick]

    def pairs(
        self,
        geom_a: torch.Tensor,
        geom_b: torch.Tensor,
        feat_hw_a: tuple[int, int],
        feat_hw_b: tuple[int, int],
        entropy_a: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Anchor pairs of a batch as (image, A cell, B cell) flat LongTensors: per image, the sampler's
        choice among the valid A cells kept one per B cell (:func:`one_per_cell`). ``entropy_a``
        (B, H, W): view A's entropy map, needed by sampler ``igu``."""
        if self.cfg.sampler == "igu" and entropy_a is None:
            raise ValueError("dense.sampler='igu' needs view A's entropy map (entropy_a, from batch['entropy']), which the data "
                             "pipeline computes once per patch: build the sample transform with "
                             "build_sample_transform(aug, ..., dense=cfg.method.dense) (the trainer does)")
        idx_b, valid, dist = match_cells(geom_a, geom_b, feat_hw_a, feat_hw_b)
        cell_entropy = None
        if self.cfg.sampler == "igu":
            cell_entropy = F.adaptive_avg_pool2d(entropy_a.detach().float()[:, None], feat_hw_a).flatten(1).cpu()
        img, a, b = [], [], []
        for i in range(idx_b.shape[0]):
            candidates = one_per_cell(valid[i].nonzero().flatten(), idx_b[i], dist[i])
            anchors = self.choose_anchors(candidates, feat_hw_a, None if cell_entropy is None else cell_entropy[i])
            img.append(torch.full_like(anchors, i))
            a.append(anchors)
            b.append(idx_b[i, anchors])
        return torch.cat(img), torch.cat(a), torch.cat(b)

    # -- loss -------------------------------------------------------------------------------
    def loss(
        self,
        feat_a: torch.Tensor,
        feat_b: torch.Tensor,
        geom_a: torch.Tensor,
        geom_b: torch.Tensor,
        entropy_a: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Weighted dense loss of two views' feature maps (B, C, h, w); ``entropy_a`` (B, H, W) view
        A's entropy map (sampler ``igu``).

        Returns ``loss`` (weighted, with gradient), ``loss_dense`` (unweighted, detached) and
        ``dense_pairs`` (number of anchor pairs used, detached).
        """
        hb, wb = feat_b.shape[-2:]
        img, a, b = self.pairs(geom_a, geom_b, tuple(feat_a.shape[-2:]), (hb, wb), entropy_a)
        za_map = self.head(feat_a).flatten(2)  # (B, D, ha*wa)
        zb_map = self.head(feat_b).flatten(2)
        if img.numel() < 2:  # keep the graph connected (DDP) with an exact zero
            raw = (za_map.sum() + zb_map.sum()) * 0.0
        else:
            img, a, b = img.to(za_map.device), a.to(za_map.device), b.to(za_map.device)
            raw = pixel_info_nce(za_map[img, :, a], zb_map[img, :, b], self.cfg.temperature, ids=img * (hb * wb) + b)
        return {
            "loss": raw * self.cfg.weight,
            "loss_dense": raw.detach(),
            "dense_pairs": torch.tensor(float(img.numel()), device=raw.device),
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

    def representation_rows(self) -> dict[str, torch.Tensor]:
        return self.base.representation_rows()

    def _view_features(self, records, view: torch.Tensor) -> torch.Tensor:
        rows = _find_rows(records, view)
        if rows is None:
            return feature_map(self.backbone, view)
        return as_feature_map(self.backbone, rows)

    def forward(self, batch: dict, epoch: float, step: int) -> dict[str, torch.Tensor]:
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
        entropy = batch.get("entropy")
        d = self.dense.loss(fa, fb, geoms[0], geoms[1], entropy_a=None if entropy is None else entropy[0])
        out["loss"] = out["loss"] + d["loss"].to(out["loss"].dtype)
        out["loss_dense"] = d["loss_dense"]
        out["dense_pairs"] = d["dense_pairs"]
        return out

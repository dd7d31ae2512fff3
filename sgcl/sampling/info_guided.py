"""IGU-Aug information-guided pixel sampling and adaptive jitter (methods.md §4).

Pipeline: RGB -> greyscale (haematoxylin channel by colour deconvolution, or luminance) ->
image information entropy (IIE) map -> sampling map ∝ ``H^α`` (or ``1[H ≥ d]``) -> anchor
pixels; each anchor is put in a category (low / medium / high information) whose brightness /
contrast jitter range is applied to its crop.

In the pretraining data pipeline (``InfoGuide``), the IIE map is computed once per patch from its
un-augmented pixels (``PatchEntropy``, bounded LRU cache) and rendered through each global view's
geometry with the view; with many anchors per view, the adaptive jitter is applied per region: one
(brightness, contrast) pair per category and view, applied pixel-wise by the view's category map.

Two IIE variants, with *different units* (the 3.5 / 4.5 thresholds only fit ``rank_disk``):

- ``rank_disk``: entropy in **bits** of the grey-level histogram in a disk of radius 10
  (``skimage.filters.rank.entropy``; pixels outside the image are not counted);
- ``box_hist``: entropy in **nats** of the 256-bin histogram in a ``k × k`` box (k = 64), from
  integral images (one pass per grey level present), clipped at the border likewise.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from sgcl.transforms.photometric import gaussian_blur

CATEGORY_NAMES = ("low", "medium", "high")
LOW, MEDIUM, HIGH = 0, 1, 2

#: Brightness / contrast factor ranges per category, the reference code's values (§4.3). The
#: reference applies the *high* ranges to low-information anchors (its else-branch); keep that
#: for parity or pass your own ``ranges``.
DEFAULT_JITTER_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "low": {"brightness": (0.562, 1.612), "contrast": (0.416, 1.817)},
    "medium": {"brightness": (0.505, 1.997), "contrast": (0.340, 2.329)},
    "high": {"brightness": (0.562, 1.612), "contrast": (0.416, 1.817)},
}

#: Category thresholds for H&E per (entropy method, grey channel), in the map's units: the 30th and
#: 70th percentiles of the pooled IIE maps of the 103 shared H&E patches at ~0.5 µm/px (NCT-CRC-HE,
#: CRC-VAL-HE-7K, Kather 2016), the position the reference's 3.5 / 4.5 bits have in its data
#: (methods.md §4.5). With them adipose, glass and debris fall in "low", stroma and muscle mostly in
#: "medium", tumour epithelium and lymphocytes mostly in "high".
HE_CATEGORY_THRESHOLDS: dict[tuple[str, str], tuple[float, float]] = {
    ("rank_disk", "haematoxylin"): (4.4, 5.4),
    ("rank_disk", "luminance"): (5.9, 6.6),
    ("box_hist", "haematoxylin"): (3.4, 4.0),
    ("box_hist", "luminance"): (4.5, 5.0),
}


# -- greyscale ----------------------------------------------------------------------------------
def haematoxylin_density(rgb: np.ndarray) -> np.ndarray:
    """The H channel of ``skimage.color.rgb2hed`` for uint8 RGB, via per-channel lookup tables
    (same numbers, ~10x faster: the log of each 8-bit level is precomputed)."""
    from skimage.color import hed_from_rgb

    if rgb.dtype != np.uint8:
        from skimage.color import rgb2hed

        return np.asarray(rgb2hed(rgb)[..., 0], np.float32)
    levels = np.maximum(np.arange(256, dtype=np.float64) / 255.0, 1e-6)
    log_level = np.log(levels) / np.log(1e-6)
    col = hed_from_rgb[:, 0]
    h = log_level[rgb[..., 0]] * col[0] + log_level[rgb[..., 1]] * col[1] + log_level[rgb[..., 2]] * col[2]
    return np.maximum(h, 0).astype(np.float32)


def to_grey(image: np.ndarray, mode: Literal["haematoxylin", "luminance"] = "haematoxylin", hed_max: float = 0.3) -> np.ndarray:
    """uint8 (H, W) greyscale of an RGB uint8 image (a 2-D image is returned as uint8 as is).

    ``haematoxylin``: the H channel of skimage's ``rgb2hed`` (Ruifrok–Johnston H&E-DAB
    deconvolution), clipped to ``[0, hed_max]`` (a fixed range, so entropies compare across
    images; 0.3 covers nuclei on typical H&E) and scaled to 0–255. ``luminance``: ITU-R 601.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        return image.astype(np.uint8) if image.dtype != np.uint8 else image
    if image.ndim != 3 or image.shape[-1] < 3:
        raise ValueError(f"expected an (H, W, 3) RGB or (H, W) grey image, got shape {image.shape}")
    rgb = image[..., :3]
    if mode == "luminance":
        grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    if mode == "haematoxylin":
        h = haematoxylin_density(rgb)
        return np.clip(np.rint(np.clip(h, 0, hed_max) / hed_max * 255), 0, 255).astype(np.uint8)
    raise ValueError(f"unknown greyscale mode {mode!r}; use 'haematoxylin' or 'luminance'")


# -- entropy maps -------------------------------------------------------------------------------
def entropy_rank_disk(grey: np.ndarray, radius: int = 10) -> np.ndarray:
    """Local entropy in bits over a disk of ``radius`` (float32 (H, W))."""
    from skimage.filters.rank import entropy
    from skimage.morphology import disk

    return entropy(np.ascontiguousarray(grey, dtype=np.uint8), disk(radius)).astype(np.float32)


def _box_sum(a: np.ndarray, k: int) -> np.ndarray:
    """Sum over the k × k box with rows ``[y − k//2, y − k//2 + k)`` (clipped), via an integral image."""
    H, W = a.shape
    ii = np.zeros((H + 1, W + 1), np.float64)
    np.cumsum(np.cumsum(a, 0, dtype=np.float64), 1, out=ii[1:, 1:])
    lo_y = np.clip(np.arange(H) - k // 2, 0, H)
    hi_y = np.clip(np.arange(H) - k // 2 + k, 0, H)
    lo_x = np.clip(np.arange(W) - k // 2, 0, W)
    hi_x = np.clip(np.arange(W) - k // 2 + k, 0, W)
    return ii[hi_y][:, hi_x] - ii[lo_y][:, hi_x] - ii[hi_y][:, lo_x] + ii[lo_y][:, lo_x]


def entropy_box_hist(grey: np.ndarray, k: int = 64) -> np.ndarray:
    """Local entropy in nats of the 256-bin histogram in a ``k × k`` box (float32 (H, W))."""
    grey = np.asarray(grey, dtype=np.uint8)
    area = _box_sum(np.ones(grey.shape, np.float64), k)
    out = np.zeros(grey.shape, np.float64)
    for level in np.unique(grey):
        p = _box_sum((grey == level).astype(np.float64), k) / area
        nz = p > 0
        out[nz] -= p[nz] * np.log(p[nz])
    return out.astype(np.float32)


def entropy_map(
    image: np.ndarray,
    method: Literal["rank_disk", "box_hist"] = "rank_disk",
    grey: Literal["haematoxylin", "luminance"] = "haematoxylin",
    radius: int = 10,
    box: int = 64,
) -> np.ndarray:
    """IIE map of an RGB (or grey) uint8 image: bits for ``rank_disk``, nats for ``box_hist``."""
    g = to_grey(image, grey)
    if method == "rank_disk":
        return entropy_rank_disk(g, radius)
    if method == "box_hist":
        return entropy_box_hist(g, box)
    raise ValueError(f"unknown entropy method {method!r}; use 'rank_disk' or 'box_hist'")


# -- sampling map and categories ---------------------------------------------------------------
def sampling_weights(entropy: np.ndarray | torch.Tensor, alpha: float = 0.3, threshold: float | None = None):
    """Unnormalised sampling weights: ``H^α``, or ``1[H ≥ threshold]`` when ``threshold`` is set.
    Falls back to uniform weights when every weight is zero (a blank image)."""
    lib = torch if isinstance(entropy, torch.Tensor) else np
    h = lib.clip(entropy, 0, None) if lib is np else entropy.clamp_min(0)
    w = (h >= threshold) * 1.0 if threshold is not None else h**alpha
    if float(w.sum()) <= 0:
        w = w * 0 + 1.0
    return w


def categorize(entropy, thresholds: tuple[float, float] = (3.5, 4.5)):
    """0 = low (H ≤ t₁), 1 = medium (t₁ < H < t₂), 2 = high (H ≥ t₂) — the code's boundaries."""
    lo, hi = thresholds
    lib = torch if isinstance(entropy, torch.Tensor) else np
    cat = lib.ones_like(entropy, dtype=lib.int64) if lib is torch else np.ones(np.shape(entropy), np.int64)
    cat[entropy <= lo] = LOW
    cat[entropy >= hi] = HIGH
    return cat


def thresholds_from_percentiles(entropy: np.ndarray, percentiles: tuple[float, float] = (30.0, 70.0)) -> tuple[float, float]:
    """Category thresholds for another stain/resolution: percentiles of an IIE distribution (the
    default 3.5/4.5 bits sit near the 30th/70th percentiles in the reference data)."""
    lo, hi = np.percentile(np.asarray(entropy, dtype=np.float64), percentiles)
    return float(lo), float(hi)


# -- adaptive jitter ----------------------------------------------------------------------------
@dataclass
class AdaptiveJitter:
    """Per-category brightness/contrast jitter (factor ranges, not ±amplitudes)."""

    ranges: dict[str, dict[str, tuple[float, float]]] = field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_JITTER_RANGES.items()})

    def factors(self, category: int, rng: np.random.Generator) -> tuple[float, float]:
        r = self.ranges[CATEGORY_NAMES[int(category)]]
        return float(rng.uniform(*r["brightness"])), float(rng.uniform(*r["contrast"]))

    def category_factors(self, rng: np.random.Generator) -> np.ndarray:
        """(3, 2) (brightness, contrast) factors, one pair per category (low, medium, high)."""
        return np.array([self.factors(k, rng) for k in (LOW, MEDIUM, HIGH)], dtype=np.float32)

    def __call__(self, image: np.ndarray, category: int, rng: np.random.Generator) -> np.ndarray:
        """Brightness × b, then contrast × c around the mean grey (torchvision semantics), uint8."""
        b, c = self.factors(category, rng)
        x = image.astype(np.float32) * b
        x = np.clip(x, 0, 255)
        mean = x[..., :3].mean() if x.ndim == 3 else x.mean()
        x = (x - mean) * c + mean
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# -- the data pipeline: entropy once per patch, rendered with each view ------------------------------
class PatchEntropy:
    """IIE map of a patch (float32 (H, W)), computed once and kept in a bounded LRU cache of
    ``cache_size`` maps (float16, ~100 KB per 224-px patch), keyed by the patch's pixels. Maps are
    always returned as the stored float16 values, so a view never depends on whether it hit the cache.
    Each DataLoader worker holds its own cache."""

    def __init__(self, method: Literal["rank_disk", "box_hist"] = "rank_disk",
                 grey: Literal["haematoxylin", "luminance"] = "haematoxylin", radius: int = 10, box: int = 64,
                 cache_size: int = 1024):
        self.method, self.grey, self.radius, self.box = method, grey, radius, box
        self.cache_size = max(0, int(cache_size))
        self.cache: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = np.ascontiguousarray(image)
        digest = hashlib.blake2b(f"{image.shape}{image.dtype}".encode(), digest_size=16)
        digest.update(image.data)
        key = digest.digest()
        hit = self.cache.get(key)
        if hit is None:
            hit = entropy_map(image, self.method, self.grey, self.radius, self.box).astype(np.float16)
            if self.cache_size:
                self.cache[key] = hit
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
        return hit.astype(np.float32)


class InfoGuide:
    """IGU-Aug's per-patch guide for the data pipeline (``ViewBuilder.guided_views`` renders it
    through each view's geometry).

    ``guide(image)``: the patch's IIE map (H, W); with ``jitter``, stacked with one-hot category
    weights (H, W, 4). Categories use absolute ``thresholds`` (map units) or, with
    ``category_mode="percentile"``, the patch's own ``percentiles`` of its map.
    ``factor_maps(guide_view, rng)``: per-pixel (brightness, contrast) factors of a view: one pair
    per category drawn from ``jitter``'s ranges, mixed by the view's category weights and smoothed
    by a Gaussian of ``smooth`` px (no hard seams between regions).
    """

    def __init__(self, entropy: PatchEntropy, jitter: AdaptiveJitter | None = None,
                 category_mode: Literal["absolute", "percentile"] = "absolute",
                 thresholds: tuple[float, float] = HE_CATEGORY_THRESHOLDS[("rank_disk", "haematoxylin")],
                 percentiles: tuple[float, float] = (30.0, 70.0), smooth: float = 4.0):
        if category_mode not in ("absolute", "percentile"):
            raise ValueError(f"unknown category mode {category_mode!r}; use 'absolute' or 'percentile'")
        self.entropy, self.jitter = entropy, jitter
        self.category_mode, self.thresholds, self.percentiles, self.smooth = category_mode, thresholds, percentiles, smooth

    def category_thresholds(self, entropy: np.ndarray) -> tuple[float, float]:
        if self.category_mode == "percentile":
            return thresholds_from_percentiles(entropy, self.percentiles)
        return self.thresholds

    def __call__(self, image: np.ndarray) -> np.ndarray:
        ent = self.entropy(image)
        if self.jitter is None:
            return ent
        onehot = np.eye(3, dtype=np.float32)[categorize(ent, self.category_thresholds(ent))]
        return np.concatenate([ent[..., None], onehot], -1)

    @staticmethod
    def entropy_of(guide_view: np.ndarray) -> np.ndarray:
        """The IIE map (h, w) of a rendered guide."""
        return np.ascontiguousarray(guide_view if guide_view.ndim == 2 else guide_view[..., 0])

    def factor_maps(self, guide_view: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(brightness, contrast) factor maps (h, w) of a view from its rendered guide."""
        if self.jitter is None or guide_view.ndim != 3:
            raise ValueError("InfoGuide.factor_maps needs a guide built with an AdaptiveJitter")
        maps = guide_view[..., 1:4] @ self.jitter.category_factors(rng)  # (h, w, 2)
        if self.smooth > 0:
            maps = gaussian_blur(np.ascontiguousarray(maps, dtype=np.float32), self.smooth)
        return maps[..., 0], maps[..., 1]


# -- the sampler ---------------------------------------------------------------------------------
@dataclass
class AnchorSample:
    ys: np.ndarray         # (n,) int row of each anchor
    xs: np.ndarray         # (n,) int column
    entropy: np.ndarray    # (n,) IIE at the anchor
    category: np.ndarray   # (n,) 0 low / 1 medium / 2 high


@dataclass
class InfoGuidedPixelSampler:
    """Anchor pixels ∝ ``H^α`` (or ``1[H ≥ threshold]``) with their information category."""

    method: Literal["rank_disk", "box_hist"] = "rank_disk"
    grey: Literal["haematoxylin", "luminance"] = "haematoxylin"
    alpha: float = 0.3
    threshold: float | None = None
    categories: tuple[float, float] = (3.5, 4.5)
    radius: int = 10
    box: int = 64

    def entropy(self, image: np.ndarray) -> np.ndarray:
        return entropy_map(image, self.method, self.grey, self.radius, self.box)

    def probabilities(self, entropy: np.ndarray) -> np.ndarray:
        w = sampling_weights(entropy, self.alpha, self.threshold).astype(np.float64)
        return w / w.sum()

    def sample(self, image: np.ndarray | None, n: int, rng: np.random.Generator, entropy: np.ndarray | None = None) -> AnchorSample:
        """``n`` anchors (with replacement) from ``image`` or a precomputed (cached) ``entropy`` map."""
        if entropy is None:
            if image is None:
                raise ValueError("InfoGuidedPixelSampler.sample needs an image or an entropy map")
            entropy = self.entropy(image)
        p = self.probabilities(entropy).ravel()
        flat = rng.choice(p.size, size=n, p=p)
        ys, xs = np.divmod(flat, entropy.shape[1])
        h = entropy[ys, xs]
        return AnchorSample(ys, xs, h, categorize(h, self.categories))


def crop_around(height: int, width: int, y: int, x: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left (y0, x0) of a random ``size × size`` crop inside the image that contains (y, x)
    (IGU-Aug's anchor crop, §4.5 step 5); the anchor sits at ``(y − y0, x − x0)`` in the crop."""
    if size > min(height, width):
        raise ValueError(f"crop of {size} px does not fit a {height}x{width} image")
    y0 = int(rng.integers(max(0, y - size + 1), min(y, height - size) + 1))
    x0 = int(rng.integers(max(0, x - size + 1), min(x, width - size) + 1))
    return y0, x0

"""Spatial retrieval: a label-free measure of how much a representation knows about tissue layout.

For every patch, take its ``k`` nearest neighbours in feature space (cosine similarity, itself
excluded) and count how many are its spatial neighbours on the slide (same slide, grid distance
<= ``radius`` cells). Spatially adjacent patches of a WSI usually show the same tissue, so a
representation that captures tissue type scores higher than one that does not. Pure functions
over tensors; no labels are needed or invented.
"""

from __future__ import annotations

import numpy as np
import torch


def spatial_neighbor_counts(slide: torch.Tensor, grid: torch.Tensor, radius: float) -> torch.Tensor:
    """Number of spatial neighbours (same slide, 0 < ||Δgrid|| <= radius) of every patch."""
    counts = torch.zeros(len(slide), dtype=torch.long)
    grid = grid.float()
    for s in torch.unique(slide):
        idx = torch.nonzero(slide == s).flatten()
        d = torch.cdist(grid[idx], grid[idx])
        counts[idx] = ((d > 0) & (d <= radius + 1e-6)).sum(1)
    return counts


def spatial_retrieval(
    features: torch.Tensor,
    slide: torch.Tensor,
    grid: torch.Tensor,
    k: int = 8,
    radius: float = 1.5,
    chunk: int = 4096,
) -> dict:
    """Spatial retrieval of ``features`` (N, D) for patches with ``slide`` (N,) and ``grid`` (N, 2).

    Returns ``precision`` (mean fraction of the k feature-space neighbours that are spatial
    neighbours), ``normalized`` (hits / min(k, #spatial neighbours), so 1.0 is attainable at
    borders), ``chance`` (expected precision of k random patches), and ``per_patch`` arrays.
    Patches without any spatial neighbour are excluded from the means.
    """
    n = len(features)
    if n < 2:
        raise ValueError("spatial retrieval needs at least 2 patches")
    k = min(k, n - 1)
    feats = torch.nn.functional.normalize(features.float(), dim=1)
    slide = torch.as_tensor(slide).long()
    grid = torch.as_tensor(grid).float()
    hits = torch.zeros(n, dtype=torch.long)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        sim = feats[start:stop] @ feats.T
        sim[torch.arange(stop - start), torch.arange(start, stop)] = -float("inf")
        nn_idx = sim.topk(k, dim=1).indices                       # (b, k)
        same = slide[nn_idx] == slide[start:stop, None]
        dist = (grid[nn_idx] - grid[start:stop, None]).norm(dim=-1)
        hits[start:stop] = (same & (dist <= radius + 1e-6)).sum(1)
    n_spatial = spatial_neighbor_counts(slide, grid, radius)
    valid = n_spatial > 0
    precision = hits.float() / k
    normalized = hits.float() / torch.clamp(torch.minimum(n_spatial, torch.tensor(k)), min=1).float()
    chance = n_spatial.float() / (n - 1)
    return {
        "k": k,
        "radius": radius,
        "n_patches": n,
        "n_evaluated": int(valid.sum()),
        "precision": float(precision[valid].mean()),
        "normalized": float(normalized[valid].mean()),
        "chance": float(chance[valid].mean()),
        "per_patch": {"hits": hits.numpy(), "n_spatial": n_spatial.numpy(), "valid": valid.numpy()},
    }


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))

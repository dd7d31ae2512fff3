"""k-means consistency for SGCL's inter-invariance (methods.md §1.6), with faiss.

``R`` runs × ``C`` clusters (seeds ``seed + r``, ``niter`` iterations) on the projection bank.
A candidate neighbour counts as a semantic positive only if it shares its anchor's cluster in
every run. The fit runs on rank 0 and the labels (and centroids) are **broadcast** to all
ranks — the reference left the other ranks with random labels (§1.13).

Scale: faiss is trained on at most ``max_points_per_centroid × C`` sampled rows; all N rows are
then assigned in chunks, so 50M rows never need a float32 copy at once.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from sgcl.distributed import broadcast_tensor, get_rank

log = logging.getLogger(__name__)


def effective_clusters(num_points: int, num_clusters: int, min_points_per_cluster: int = 4) -> int:
    """``num_clusters`` clipped so every cluster can hold ``min_points_per_cluster`` rows (≥ 1)."""
    return max(1, min(int(num_clusters), int(num_points) // max(1, min_points_per_cluster)))


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().cpu().numpy(), dtype=np.float32)


@torch.no_grad()
def assign_clusters(features: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Nearest centroid (L2) of every row: (N, D) × (C, D) → (N,) int64, in chunks."""
    c = centroids.float().to(features.device)
    half_norm = 0.5 * (c * c).sum(1)
    out = torch.empty(features.shape[0], dtype=torch.long, device=features.device)
    for s in range(0, features.shape[0], chunk):
        x = features[s : s + chunk].float()
        out[s : s + chunk] = (x @ c.t() - half_norm).argmax(1)
    return out


def fit_kmeans(
    features: torch.Tensor,
    num_clusters: int,
    runs: int = 3,
    niter: int = 20,
    seed: int = 1234,
    max_points_per_centroid: int = 256,
    chunk: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``runs`` k-means (faiss) on ``features`` (N, D); return labels (R, N) int64 and
    centroids (R, C, D) fp32, on ``features.device``. ``C`` is clipped by :func:`effective_clusters`."""
    import faiss

    n, d = features.shape
    c = effective_clusters(n, num_clusters)
    labels = torch.empty(runs, n, dtype=torch.long, device=features.device)
    cents = torch.empty(runs, c, d, dtype=torch.float32, device=features.device)
    for r in range(runs):
        rng = np.random.default_rng(seed + r)
        limit = max_points_per_centroid * c
        if n > limit:
            rows = torch.from_numpy(np.sort(rng.choice(n, size=limit, replace=False))).to(features.device)
            train = _as_numpy(features.index_select(0, rows))
        else:
            train = _as_numpy(features)
        km = faiss.Kmeans(d, c, niter=niter, seed=seed + r, verbose=False, max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
        km.train(train)
        cents[r] = torch.from_numpy(km.centroids.reshape(c, d)).to(features.device)
        labels[r] = assign_clusters(features, cents[r], chunk)
    return labels, cents


@torch.no_grad()
def fit_and_broadcast(
    features: torch.Tensor,
    labels_out: torch.Tensor,
    num_clusters: int,
    niter: int = 20,
    seed: int = 1234,
    centroids_out: torch.Tensor | None = None,
    src: int = 0,
) -> int:
    """Fit on rank ``src`` into ``labels_out`` (R, N) (and ``centroids_out`` (R, C, D)), then
    broadcast both in place to every rank. Returns the effective number of clusters."""
    runs = labels_out.shape[0]
    c = effective_clusters(features.shape[0], num_clusters)
    if get_rank() == src:
        labels, cents = fit_kmeans(features, num_clusters, runs=runs, niter=niter, seed=seed)
        labels_out.copy_(labels)
        if centroids_out is not None:
            centroids_out.zero_()
            centroids_out[:, :c].copy_(cents)
    broadcast_tensor(labels_out, src)
    if centroids_out is not None:
        broadcast_tensor(centroids_out, src)
    return c

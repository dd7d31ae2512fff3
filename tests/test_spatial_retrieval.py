"""Spatial retrieval on features with known structure."""

from __future__ import annotations

import numpy as np
import torch

from evaluation.spatial_retrieval import bootstrap_ci, spatial_neighbor_counts, spatial_retrieval


def _two_slides(h=6, w=7):
    gy, gx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    grid = np.stack([gx.ravel(), gy.ravel()], 1)
    grid = np.concatenate([grid, grid])
    slide = np.repeat([0, 1], h * w)
    return torch.as_tensor(slide), torch.as_tensor(grid)


def test_neighbor_counts_at_corners_edges_and_inside():
    slide, grid = _two_slides()
    counts = spatial_neighbor_counts(slide, grid, radius=1.5).numpy().reshape(2, 6, 7)
    assert counts[0, 0, 0] == 3 and counts[0, 0, 3] == 5 and counts[0, 3, 3] == 8
    assert (counts[0] == counts[1]).all()  # the second slide's patches never count as neighbours


def test_features_encoding_position_score_perfectly_and_random_ones_near_chance():
    slide, grid = _two_slides()
    # features whose cosine similarity falls with grid distance (periodic embedding, period >> grid),
    # plus a strong slide one-hot: the nearest neighbours in feature space are the spatial ones
    w = 0.3
    g = grid.float()
    pos = torch.cat([torch.cos(w * g), torch.sin(w * g), 10 * torch.nn.functional.one_hot(slide).float()], 1)
    res = spatial_retrieval(pos, slide, grid, k=3, radius=1.5)
    assert res["normalized"] == 1.0 and res["precision"] == 1.0
    rnd = spatial_retrieval(torch.randn(len(slide), 32, generator=torch.Generator().manual_seed(0)), slide, grid, k=3)
    assert rnd["precision"] < 0.35 and abs(rnd["precision"] - rnd["chance"]) < 0.1


def test_self_is_never_its_own_neighbour():
    slide, grid = _two_slides(2, 2)
    feats = torch.zeros(len(slide), 4)  # all identical: ties must not return the patch itself
    res = spatial_retrieval(feats + torch.arange(len(slide))[:, None] * 1e-3, slide, grid, k=1)
    assert res["per_patch"]["hits"].max() <= 1


def test_bootstrap_ci_contains_mean():
    v = np.random.default_rng(0).normal(0.5, 0.1, 200)
    lo, hi = bootstrap_ci(v)
    assert lo < v.mean() < hi and hi - lo < 0.05

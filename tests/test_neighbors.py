"""Spatial neighbours: brute-force agreement on irregular tissue, slide edges, no cross-slide sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sgcl.data.neighbors import SpatialIndex, grid_offsets

torch.set_num_threads(1)


def _brute(slide, grid, i, radius):
    d2 = ((grid - grid[i]) ** 2).sum(1)
    ok = (slide == slide[i]) & (d2 > 0) & (d2 < radius**2)
    return set(np.nonzero(ok)[0].tolist())


def _cohort(seed=0):
    """Three slides with irregular tissue (holes, separate islands), same grid extent."""
    rng = np.random.default_rng(seed)
    slides, grids = [], []
    for s in range(3):
        tissue = rng.random((12, 15)) < 0.6
        tissue[:, 7] = False           # a gap column splits the tissue into islands
        rows, cols = np.nonzero(tissue)
        grids.append(np.stack([cols, rows], 1))
        slides.append(np.full(len(rows), s))
    return np.concatenate(slides), np.concatenate(grids)


@pytest.mark.parametrize("radius,count", [(1.1, 4), (1.5, 8), (3, 24), (5, 68)])
def test_offsets_count_and_order(radius, count):
    off = grid_offsets(radius)
    assert off.shape == (count, 2)
    d2 = (off**2).sum(1)
    assert bool((d2 > 0).all()) and bool((d2 < radius**2).all())
    assert torch.equal(d2, d2.sort().values)  # nearest first


@pytest.mark.parametrize("radius", [1.1, 3, 5])
def test_neighbors_match_brute_force_on_irregular_tissue(radius):
    slide, grid = _cohort()
    index = SpatialIndex(torch.from_numpy(slide), torch.from_numpy(grid), radius=radius)
    query = torch.arange(len(slide))
    nb = index.neighbors(query)
    for i in range(len(slide)):
        got = set(nb.index[i][nb.mask[i]].tolist())
        expected = _brute(slide, grid, i, radius)
        if expected:
            assert got == expected, i
            assert not bool(nb.fallback[i])
        else:
            assert got == {i} and bool(nb.fallback[i])


def test_never_crosses_slides_with_identical_grids():
    cols, rows = np.meshgrid(np.arange(6), np.arange(6))
    g = np.stack([cols.ravel(), rows.ravel()], 1)
    slide = np.repeat([0, 1], len(g))
    grid = np.concatenate([g, g])
    index = SpatialIndex(torch.from_numpy(slide), torch.from_numpy(grid), radius=3)
    nb = index.neighbors(torch.arange(len(slide)))
    same = torch.from_numpy(slide)[nb.index] == torch.from_numpy(slide).unsqueeze(1)
    assert bool(same[nb.mask].all())


def test_slide_edges_and_corners_of_a_full_grid():
    cols, rows = np.meshgrid(np.arange(10), np.arange(10))
    grid = torch.from_numpy(np.stack([cols.ravel(), rows.ravel()], 1))
    index = SpatialIndex(torch.zeros(100, dtype=torch.long), grid, radius=3)
    at = {tuple(g): i for i, g in enumerate(grid.tolist())}
    nb = index.neighbors(torch.tensor([at[(5, 5)], at[(0, 0)], at[(5, 0)], at[(9, 9)], at[(0, 5)]]))
    assert nb.count().tolist() == [24, 8, 14, 8, 14]
    assert not bool(nb.fallback.any())


def test_isolated_patch_falls_back_to_itself_or_stays_empty():
    slide = torch.tensor([0, 0, 1])
    grid = torch.tensor([[0, 0], [1, 0], [0, 0]])
    index = SpatialIndex(slide, grid, radius=3)
    nb = index.neighbors(torch.tensor([2, 0]))
    assert nb.fallback.tolist() == [True, False]
    assert nb.index[0][nb.mask[0]].tolist() == [2]
    assert nb.count().tolist() == [0, 1]
    strict = index.neighbors(torch.tensor([2]), fallback_to_self=False)
    assert not bool(strict.mask.any())


def test_negative_grid_coordinates_and_lookup():
    slide = torch.tensor([0, 0, 0, 1])
    grid = torch.tensor([[-3, -2], [-2, -2], [10, 4], [-3, -2]])
    index = SpatialIndex(slide, grid, radius=1.1)
    nb = index.neighbors(torch.tensor([0]))
    assert nb.index[0][nb.mask[0]].tolist() == [1]
    found = index.lookup(torch.tensor([0, 1, 0, 0]), torch.tensor([[10, 4], [-3, -2], [11, 4], [-100, 50]]))
    assert found.tolist() == [2, 3, -1, -1]


def test_radius_per_call_overrides_default():
    cols, rows = np.meshgrid(np.arange(7), np.arange(7))
    grid = torch.from_numpy(np.stack([cols.ravel(), rows.ravel()], 1))
    index = SpatialIndex(torch.zeros(49, dtype=torch.long), grid, radius=3)
    centre = torch.tensor([24])
    assert index.neighbors(centre).count().item() == 24
    assert index.neighbors(centre, radius=1.1).count().item() == 4


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="share slide 0 grid cell"):
        SpatialIndex(torch.tensor([0, 0]), torch.tensor([[1, 1], [1, 1]]))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        SpatialIndex(torch.tensor([0, 0]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="at least one patch"):
        SpatialIndex(torch.zeros(0, dtype=torch.long), torch.zeros(0, 2, dtype=torch.long))


def test_index_memory_is_linear_and_build_is_fast():
    # 400 slides × 2,500 patches = 1M patches: two int64 per patch in the index, no N×N anything
    n_slides, side = 400, 50
    cols, rows = np.meshgrid(np.arange(side), np.arange(side))
    g = torch.from_numpy(np.stack([cols.ravel(), rows.ravel()], 1))
    grid = g.repeat(n_slides, 1)
    slide = torch.arange(n_slides).repeat_interleave(side * side)
    index = SpatialIndex(slide, grid, radius=3)
    assert index.sorted_keys.numel() == index.order.numel() == slide.numel()
    query = torch.randint(0, slide.numel(), (256,), generator=torch.Generator().manual_seed(0))
    nb = index.neighbors(query)
    assert nb.index.shape[0] == 256 and nb.index.shape[1] <= 24
    same = slide[nb.index] == slide[query].unsqueeze(1)
    assert bool(same[nb.mask].all())

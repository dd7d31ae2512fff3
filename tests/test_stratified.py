"""ARCO stratified group sampling: exact per-stratum counts, unbiasedness, variance, SAG reflections."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sgcl.sampling.stratified import stratified_group_draw, stratified_group_sample, uniform_sample


def _grid_coords(h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([ys.reshape(-1), xs.reshape(-1)], 1)


def test_virtual_sg_exact_counts_inside_blocks():
    M, n, g = 1024, 256, 4  # e = 32, blocks of 8 x 8, quota 16
    d = stratified_group_draw(M, n, g, generator=torch.Generator().manual_seed(0))
    assert d.kind == "grid"
    assert torch.bincount(d.stratum, minlength=16).tolist() == [16] * 16
    rows, cols = d.index // 32, d.index % 32
    assert torch.equal(rows // 8 * 4 + cols // 8, d.stratum)
    idx = stratified_group_sample(M, n, g, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (n,) and idx.dtype == torch.long and int(idx.max()) < M


def test_virtual_quota_formula_remainder_blocks_and_padding():
    # M = 1000: e = round(31.6) = 32, e^2 = 1024 > M; quota m = floor(200*1024/1000) // 16 = 12
    d = stratified_group_draw(1000, 200, 4, generator=torch.Generator().manual_seed(1))
    assert d.quota.tolist() == [12] * 16
    # M = 170: e = 13, block edge 3, the last row/column of blocks absorbs the remainder (4 wide)
    d = stratified_group_draw(170, 64, 4, generator=torch.Generator().manual_seed(2))
    rows, cols = d.index // 13, d.index % 13
    last = d.stratum == 15
    assert bool(((rows[last] >= 9) & (cols[last] >= 9)).all())
    for M, n in [(1000, 200), (170, 64), (50, 7), (3, 9)]:
        out = stratified_group_sample(M, n, 4, generator=torch.Generator().manual_seed(3))
        assert out.numel() == n and int(out.min()) >= 0 and int(out.max()) < M


def test_virtual_fallbacks():
    # g = 8, M = 40: e = 6 -> block edge 0 -> 1-D sampler: blocks of 16, n // 2 draws each
    d = stratified_group_draw(40, 10, 8, generator=torch.Generator().manual_seed(0))
    assert d.kind == "1d"
    assert torch.bincount(d.stratum).tolist() == [5, 5]
    assert bool((d.index // 16 == d.stratum).all())
    d = stratified_group_draw(40, 10, 8, antithetic=True, generator=torch.Generator().manual_seed(0))
    paired = d.partner >= 0
    k = d.stratum[paired]
    assert torch.equal(d.index[paired] + d.index[d.partner[paired]], (2 * k + 1) * 16 - 1)
    # M < 16 or M / 16 > n: plain uniform
    assert stratified_group_draw(10, 4, 8).kind == "uniform"
    assert stratified_group_draw(40, 2, 8).kind == "uniform"
    assert stratified_group_sample(10, 4, 8).numel() == 4


def test_virtual_sag_pairs_reflect_through_block_centre():
    e, g = 32, 4
    d = stratified_group_draw(e * e, 256, g, antithetic=True, generator=torch.Generator().manual_seed(4))
    assert torch.bincount(d.stratum, minlength=16).tolist() == [16] * 16
    assert bool((d.partner >= 0).all())
    u, v = d.index, d.index[d.partner]
    r0 = (u // e) // 8 * 8
    c0 = (u % e) // 8 * 8
    assert torch.equal(u // e + v // e, 2 * r0 + 7)   # row r -> r0 + r1 - 1 - r
    assert torch.equal(u % e + v % e, 2 * c0 + 7)
    assert torch.equal(d.stratum, d.stratum[d.partner])


def test_spatial_exact_proportional_counts_within_cells():
    coords = _grid_coords(30, 30)  # cells of 7.5 px: unequal cell sizes 8/7
    keep = torch.rand(900, generator=torch.Generator().manual_seed(0)) < 0.7  # a ragged candidate set
    c = coords[keep]
    M, n = c.shape[0], 101
    d = stratified_group_draw(M, n, 4, mode="spatial", coords=c, extent=(30, 30), generator=torch.Generator().manual_seed(5))
    assert int(d.quota.sum()) == n and d.index.numel() == n
    cell = torch.div(c, 7.5, rounding_mode="floor").long()
    sid = cell[:, 0] * 4 + cell[:, 1]
    counts = torch.bincount(sid, minlength=16).double()
    exact = counts * n / M
    assert bool(((d.quota >= torch.floor(exact)) & (d.quota <= torch.ceil(exact))).all())
    assert torch.equal(torch.bincount(d.stratum, minlength=16), d.quota)
    assert torch.equal(sid[d.index], d.stratum)


def test_spatial_sag_pairs_reflect_through_cell_centre():
    coords = _grid_coords(32, 32)
    d = stratified_group_draw(1024, 128, 4, antithetic=True, mode="spatial", coords=coords, extent=(32, 32), generator=torch.Generator().manual_seed(6))
    paired = d.partner >= 0
    assert int(paired.sum()) == 128
    a, b = coords[d.index[paired]], coords[d.index[d.partner[paired]]]
    lo = a // 8 * 8
    assert torch.equal(a + b, 2 * lo + 7)
    # batched coords (b, y, x): strata never mix images
    bc = torch.cat([torch.cat([torch.full((1024, 1), k), coords], 1) for k in range(2)])
    d = stratified_group_draw(2048, 64, 4, mode="spatial", coords=bc, generator=torch.Generator().manual_seed(7))
    assert torch.equal(bc[d.index, 0], d.stratum // 16)


def _estimates(sampler, f: torch.Tensor, draws: int) -> np.ndarray:
    return np.array([float(f[sampler(torch.Generator().manual_seed(s))].mean()) for s in range(draws)])


@pytest.mark.parametrize("mode", ["virtual", "spatial"])
def test_sg_unbiased_and_no_worse_than_uniform_sag_better_on_monotone(mode):
    e, n, draws = 32, 64, 400
    coords = _grid_coords(e, e)
    y, x = coords[:, 0].double() / e, coords[:, 1].double() / e
    smooth = torch.sin(2 * math.pi * x) * torch.cos(math.pi * y) + 0.5 * x * y
    monotone = x + 2 * y
    kw = dict(mode=mode, coords=coords if mode == "spatial" else None, extent=(e, e))

    def sg(gen):
        return stratified_group_sample(e * e, n, 4, generator=gen, **kw)

    def sag(gen):
        return stratified_group_sample(e * e, n, 4, antithetic=True, generator=gen, **kw)

    def uni(gen):
        return uniform_sample(e * e, n, gen)

    est_sg, est_uni = _estimates(sg, smooth, draws), _estimates(uni, smooth, draws)
    true = float(smooth.mean())
    se = est_uni.std() / math.sqrt(draws)
    assert abs(est_sg.mean() - true) < 3 * se  # unbiased (uniform's standard error as the yardstick)
    assert est_sg.var() <= est_uni.var()
    var_sg_mono = _estimates(sg, monotone, draws).var()
    var_sag_mono = _estimates(sag, monotone, draws).var()
    assert var_sag_mono < var_sg_mono
    # inclusion frequency of every stratum is proportional to its size (here: equal)
    counts = torch.zeros(16)
    for s in range(50):
        idx = sg(torch.Generator().manual_seed(1000 + s))
        counts += torch.bincount((coords[idx, 0] // 8) * 4 + coords[idx, 1] // 8, minlength=16)
    assert torch.equal(counts, torch.full((16,), 50.0 * n / 16))


def test_bad_arguments():
    with pytest.raises(ValueError, match="coords"):
        stratified_group_sample(10, 4, mode="spatial")
    with pytest.raises(ValueError, match="mode"):
        stratified_group_sample(10, 4, mode="grid")
    with pytest.raises(ValueError, match="candidate"):
        stratified_group_sample(0, 4)

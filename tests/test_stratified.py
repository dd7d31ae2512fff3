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


# -- without replacement (the dense branch's mode): exactly min(n, M) distinct anchors ------------------
def _no_rep(M, n, antithetic, mode, coords=None, extent=None, seed=0):
    kw = dict(mode=mode, coords=coords, extent=extent, replacement=False)
    d = stratified_group_draw(M, n, 4, antithetic, generator=torch.Generator().manual_seed(seed), **kw)
    idx = stratified_group_sample(M, n, 4, antithetic, generator=torch.Generator().manual_seed(seed), **kw)
    return d, idx


@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize("mode", ["virtual", "spatial"])
def test_without_replacement_gives_min_n_m_distinct_candidates(mode, antithetic):
    rng = np.random.default_rng(0)
    for M, n in [(49, 32), (40, 32), (40, 64), (1000, 200), (170, 64), (12, 5), (3, 9), (37, 37), (900, 16)]:
        side = int(math.ceil(math.sqrt(M)))
        coords = _grid_coords(side, side)[torch.from_numpy(np.sort(rng.permutation(side * side)[:M]))]
        d, idx = _no_rep(M, n, antithetic, mode, coords if mode == "spatial" else None, (side, side))
        assert idx.numel() == min(n, M) and idx.unique().numel() == idx.numel(), (M, n)
        assert int(idx.min()) >= 0 and int(idx.max()) < M
        assert d.index.unique().numel() == d.index.numel() and bool((d.index < M).all())


def test_without_replacement_virtual_quota_per_block_capped_at_its_candidates():
    # M = 1000, n = 900: e = 32, blocks of 8 x 8, quota m = floor(900*1024/1000) // 16 = 57; indices
    # 1000..1023 (row 31, columns 8..31) do not exist, so blocks 13, 14, 15 hold 56 candidates only
    d, idx = _no_rep(1000, 900, False, "virtual")
    assert d.kind == "grid" and d.quota.tolist() == [57] * 13 + [56] * 3
    assert torch.equal(torch.bincount(d.stratum, minlength=16), d.quota)
    rows, cols = d.index // 32, d.index % 32
    assert torch.equal(rows // 8 * 4 + cols // 8, d.stratum)
    assert bool(torch.isin(idx, d.index).all())  # 909 stratified draws, shuffled and cut to 900
    d, idx = _no_rep(1000, 200, False, "virtual")  # 16 x 12 = 192 stratified draws, topped up to 200
    assert d.quota.tolist() == [12] * 16 and bool(torch.isin(d.index, idx).all())
    # a quota as large as a block: every candidate of the block is taken, once
    d, _ = _no_rep(64, 64, False, "virtual")  # e = 8, blocks of 2 x 2, quota 4
    assert torch.equal(torch.sort(d.index).values, torch.arange(64))


def test_without_replacement_spatial_quota_proportional_and_within_cells():
    coords = _grid_coords(30, 30)
    keep = torch.rand(900, generator=torch.Generator().manual_seed(0)) < 0.7
    c = coords[keep]
    M = c.shape[0]
    for n in (101, M, M + 50):
        d, idx = _no_rep(M, n, True, "spatial", c, (30, 30), seed=5)
        cell = torch.div(c, 7.5, rounding_mode="floor").long()
        sid = cell[:, 0] * 4 + cell[:, 1]
        counts = torch.bincount(sid, minlength=16)
        exact = counts.double() * min(n, M) / M
        assert bool(((d.quota >= torch.floor(exact)) & (d.quota <= torch.ceil(exact)) & (d.quota <= counts)).all())
        assert torch.equal(torch.bincount(d.stratum, minlength=16), d.quota) and torch.equal(sid[d.index], d.stratum)
        assert torch.equal(torch.sort(d.index).values, torch.sort(idx).values)  # quotas sum to min(n, M): no top-up


@pytest.mark.parametrize("mode", ["virtual", "spatial"])
def test_without_replacement_sag_pairs_nearest_unused_to_the_reflection(mode):
    e = 32
    coords = _grid_coords(e, e)
    for n, seed in [(128, 6), (900, 7), (1024, 8)]:
        d, _ = _no_rep(e * e, n, True, mode, coords, (e, e), seed)
        paired = d.partner >= 0
        assert torch.equal(d.partner[d.partner[paired]], paired.nonzero().flatten())  # pairing is mutual
        assert torch.equal(d.stratum[paired], d.stratum[d.partner[paired]])
        u, v = coords[d.index[paired]].double(), coords[d.index[d.partner[paired]]].double()
        lo = torch.div(u, 8, rounding_mode="floor") * 8
        target = 2 * lo + 7 - u  # point reflection through the centre of the 8 x 8 block/cell
        gap = (v - target).norm(dim=1)
        # the partner is the nearest unused candidate: no candidate left undrawn in the stratum is closer
        undrawn = torch.ones(e * e, dtype=torch.bool)
        undrawn[d.index] = False
        for i in range(u.shape[0]):
            same = undrawn & (torch.div(coords, 8, rounding_mode="floor") == lo[i].long() // 8).all(1)
            if bool(same.any()):
                assert float(gap[i]) <= float((coords[same].double() - target[i]).norm(dim=1).min()) + 1e-9
        if n == 128:  # few draws: nearly every reflection is still unused, so it is the exact partner
            assert float((gap == 0).double().mean()) > 0.9
        if n == e * e:
            assert torch.equal(torch.sort(d.index).values, torch.arange(e * e))


@pytest.mark.parametrize("mode", ["virtual", "spatial"])
def test_without_replacement_stays_unbiased_and_sag_beats_sg_on_monotone(mode):
    e, n, draws = 16, 32, 300
    coords = _grid_coords(e, e)
    monotone = coords[:, 1].double() + 2 * coords[:, 0].double()
    kw = dict(mode=mode, coords=coords if mode == "spatial" else None, extent=(e, e), replacement=False)
    sg = _estimates(lambda gen: stratified_group_sample(e * e, n, 4, generator=gen, **kw), monotone, draws)
    sag = _estimates(lambda gen: stratified_group_sample(e * e, n, 4, True, generator=gen, **kw), monotone, draws)
    uni = _estimates(lambda gen: torch.randperm(e * e, generator=gen)[:n], monotone, draws)
    se = uni.std() / math.sqrt(draws)
    assert abs(sg.mean() - float(monotone.mean())) < 4 * se and abs(sag.mean() - float(monotone.mean())) < 4 * se
    assert sag.var() < sg.var() <= uni.var()

"""Bounded SGCL candidates (``method.sgcl.candidates = indexed``, issue 12) against the exhaustive path.

- with a pool covering every k-means group (and ``nei_k`` ≥ N, so the global kNN cut does not
  bind) the indexed path chooses exactly the exhaustive positives and negatives;
- with a smaller ``nei_k`` the exhaustive positives are a subset of the indexed ones;
- sampled groups are uniform over their members (chi-square); pooled semi-hard mining draws
  from the same similarity-quantile band as exhaustive mining;
- the index follows the k-means labels (refit, resume), not the bank rows' features;
- bounded sampling keeps the statistics: pooled semi-hard positions drawn with replacement keep
  the exhaustive quantiles, ``npid_sample`` weighted draws keep the mean NPID loss and gradient,
  and ``npid_sample = num_negatives`` is the reference again; ``candidates: auto`` switches at
  ``AUTO_INDEXED_ROWS``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from _tiny_nets import make_batch
from sgcl.memory.cluster_index import ClusterIndex
from sgcl.losses.npid import npid_loss
from sgcl.mining import mine_negatives
from test_loss_gradients import twin_bank
from test_methods import small_cfg, started

torch.set_num_threads(1)


def sets(method, idx, step=3):
    batch = make_batch(idx, *method._test_grid, 1, seed=2)
    with torch.no_grad():
        h = method.backbone(batch["views"][0])
        q, hb = F.normalize(method.head(h), dim=1), F.normalize(h, dim=1)
    pos_i, pos_m, neg_i, neg_m, _ = method.positive_negative_sets(q, hb, idx, step)
    pos = [set(pos_i[r][pos_m[r]].tolist()) for r in range(len(idx))]
    neg = [set(neg_i[r][neg_m[r]].tolist()) for r in range(len(idx))]
    return pos, neg


def build(candidates: str, nei_k: int, pool: int = 1024):
    cfg = small_cfg(candidates=candidates, candidate_pool=pool, nei_k=nei_k, kmeans_runs=2, radius=1.5, mining="semi_hard")
    method, slide_of, grid_of = started(cfg)
    method._test_grid = (slide_of, grid_of)
    twin_bank(method, len(slide_of))
    method.bank_b.weight.copy_(F.normalize(torch.randn(method.bank_b.weight.shape, generator=torch.Generator().manual_seed(3)), dim=1))
    method.on_epoch_start(0)
    return method


IDX = torch.tensor([0, 7, 14, 40, 57, 71])


def test_cluster_index_groups_rows_by_signature():
    labels = torch.tensor([[0, 1, 0, 2, 1, 0], [3, 3, 3, 1, 3, 4]])
    ix = ClusterIndex(labels)
    assert ix.members(0) == [0, 2] and ix.members(1) == [1, 4] and ix.members(3) == [3] and ix.members(5) == [5]
    idx, mask = ix.sample(torch.tensor([0, 3, 4]), pool=8, generator=torch.Generator().manual_seed(0))
    assert [sorted(idx[r][mask[r]].tolist()) for r in range(3)] == [[0, 2], [3], [1, 4]]


def test_indexed_equals_exhaustive_when_the_pool_covers_every_group():
    exact, indexed = build("exact", nei_k=72), build("indexed", nei_k=72, pool=72)
    assert torch.equal(exact.clusters, indexed.clusters)
    pe, ne = sets(exact, IDX)
    pi, ni = sets(indexed, IDX)
    assert pe == pi and ne == ni
    assert sum(map(len, pe)) > 6 * 4  # semantic positives exist beyond the spatial ones


def test_exhaustive_positives_are_a_subset_of_indexed_ones():
    exact, indexed = build("exact", nei_k=10), build("indexed", nei_k=10, pool=72)
    pe, _ = sets(exact, IDX)
    pi, _ = sets(indexed, IDX)
    assert all(a <= b for a, b in zip(pe, pi))


def test_sampled_members_are_uniform_over_the_group():
    labels = torch.zeros(1, 200, dtype=torch.long)
    labels[0, 50:] = 1                                   # group 0: rows 0..49
    ix = ClusterIndex(labels)
    owners = torch.zeros(4000, dtype=torch.long)
    idx, mask = ix.sample(owners, pool=10, generator=torch.Generator().manual_seed(1))
    picked = idx[mask]
    assert int(picked.max()) < 50
    assert (mask.sum(1) <= 10).all() and float(mask.sum(1).float().mean()) > 9.0  # E = 50·(1 − 0.98¹⁰) ≈ 9.15
    freq = torch.bincount(picked, minlength=50).double()
    assert chisquare(freq.numpy()).pvalue > 1e-3


def _mining_case(n: int = 20000):
    """4 random queries, ``n`` random keys, each key's rank fraction per query, no owner to exclude."""
    gen = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(n, 16, generator=gen), dim=1)
    query = F.normalize(torch.randn(4, 16, generator=gen), dim=1)
    rank = torch.argsort(torch.argsort(query @ keys.t(), dim=1, descending=True), dim=1).double() / n
    return keys, query, rank, torch.full((4, 1), -1)


def test_pooled_semi_hard_mining_draws_the_same_quantile_band():
    k = 32
    keys, query, rank, exclude = _mining_case()
    q_full, q_pool = [], []
    for seed in range(30):
        for pool, out in ((0, q_full), (8000, q_pool)):
            i, m = mine_negatives(query, keys, exclude, k, "semi_hard", 0.2, generator=torch.Generator().manual_seed(seed), pool=pool)
            out.append(rank.gather(1, i)[m])
    a, b = torch.cat(q_full), torch.cat(q_pool)
    assert float(a.mean()) == pytest.approx(0.05, rel=0.1)          # Beta(5, 15) mean × frac
    assert float(b.mean()) == pytest.approx(float(a.mean()), rel=0.1)
    qs = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(torch.quantile(a, qs), torch.quantile(b, qs), rtol=0.15)


def test_index_follows_refits_and_resume_not_bank_updates():
    method = build("indexed", nei_k=16, pool=8)
    ix = method.cluster_index()
    method(make_batch(IDX, *method._test_grid, 1), 1, 0)["loss"].backward()
    method.on_after_step({})                               # bank rows move, labels do not
    assert method.cluster_index() is ix
    state = {k: v.clone() for k, v in method.state_dict().items()}
    method.bank.weight.copy_(F.normalize(torch.randn(method.bank.weight.shape), dim=1))
    method.on_epoch_start(1)                               # refit: new labels, new index
    assert method.cluster_index() is not ix
    assert torch.equal(method.cluster_index().group, ClusterIndex(method.clusters).group)
    method.load_state_dict(state)                          # resume: labels of the checkpoint
    assert torch.equal(method.cluster_index().group, ix.group)


# ------------------------------------------------------- bounded sampling: same statistics (issue 12)
def test_pooled_mining_with_replacement_keeps_the_exhaustive_quantiles_when_k_exceeds_the_band():
    """A small pool's band (⌈0.2·2,000⌉ = 400 positions) is shorter than k = 512: positions drawn
    with replacement keep the Beta(5, 15) quantiles of exhaustive mining; without replacement the
    whole band is taken and the chosen negatives are easier (the test can fail)."""
    k = 512
    keys, query, rank, exclude = _mining_case()
    full, pooled, flat = [], [], []
    for seed in range(20):
        for out, kw in ((full, {}), (pooled, {"pool": 2000, "replacement": True}), (flat, {"pool": 2000})):
            i, m = mine_negatives(query, keys, exclude, k, "semi_hard", 0.2, generator=torch.Generator().manual_seed(seed), **kw)
            out.append(rank.gather(1, i)[m])
    a, b, c = torch.cat(full), torch.cat(pooled), torch.cat(flat)
    assert b.numel() == 20 * 4 * k                                       # k draws per anchor, repeats kept
    assert float(a.mean()) == pytest.approx(0.05, rel=0.1)
    assert float(b.mean()) == pytest.approx(float(a.mean()), rel=0.1)
    qs = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(torch.quantile(a, qs), torch.quantile(b, qs), rtol=0.15)
    assert float(c.mean()) > 1.5 * float(a.mean())                     # the band taken whole: not the Beta shape


def test_sampled_npid_negatives_match_the_full_draw_in_expectation():
    """K' = 128 uniform draws weighted by K/K' = 8 against K = 1,024 (``sgcl.npid_sample``): same
    mean loss and mean gradient over many steps; unweighted they would not match."""
    gen = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(4000, 16, generator=gen), dim=1)
    q0 = F.normalize(torch.randn(8, 16, generator=gen), dim=1)
    pos = F.normalize(q0 + 0.5 * torch.randn(8, 16, generator=gen), dim=1)

    def mean_loss_grad(k: int, weight: float, draws: int = 200):
        losses, grads = [], []
        for seed in range(draws):
            q = q0.clone().requires_grad_(True)
            neg = bank[torch.randint(0, 4000, (k,), generator=torch.Generator().manual_seed(seed))]
            loss = npid_loss(q, pos, neg, 0.2, weight)
            loss.backward()
            losses.append(float(loss.detach()))
            grads.append(q.grad.clone())
        return sum(losses) / draws, torch.stack(grads).mean(0)

    full_l, full_g = mean_loss_grad(1024, 1.0)
    samp_l, samp_g = mean_loss_grad(128, 8.0)
    unw_l, _ = mean_loss_grad(128, 1.0)
    assert samp_l == pytest.approx(full_l, rel=0.01)
    assert float(F.cosine_similarity(samp_g.flatten(), full_g.flatten(), dim=0)) > 0.99
    assert float((samp_g - full_g).norm() / full_g.norm()) < 0.05
    assert full_l - unw_l > 1.5                                        # unweighted: log 8 ≈ 2 nats lower


def test_indexed_with_every_npid_negative_matches_exact_self_and_inner_terms():
    """``npid_sample = num_negatives`` switches the NPID terms of indexed mode back to the reference
    draws (the same rows, gathered in sorted order): same values as ``exact``."""
    vals = {}
    for mode in ("exact", "indexed"):
        cfg = small_cfg(candidates=mode, npid_sample=32, intra_term=False, inter_term=False)
        method, slide_of, grid_of = started(cfg)
        out = method(make_batch(IDX, slide_of, grid_of, 1, seed=2), 1, 5)
        vals[mode] = (float(out["loss_single"]), float(out["loss_mcrop"]))
    assert vals["indexed"] == pytest.approx(vals["exact"], rel=1e-6)
    cfg = small_cfg(candidates="indexed", npid_sample=8, intra_term=False, inter_term=False)
    method, slide_of, grid_of = started(cfg)
    assert method.npid_sample == 8
    out = method(make_batch(IDX, slide_of, grid_of, 1, seed=2), 1, 5)
    assert float(out["loss_single"]) != pytest.approx(vals["exact"][0], rel=1e-6)   # 8 draws weighted by 4: another estimate


def test_pooled_negatives_are_scored_like_gathered_rows():
    """Indexed mode scores pooled negatives with one (B, pool) product: ``L_sp`` equals the loss
    over the returned index sets with their rows gathered one by one."""
    from sgcl.losses.multi_positive_nce import multi_positive_nce

    method = build("indexed", nei_k=16, pool=8)
    method.cfg.sgcl.mining_pool = 40                                   # < N = 72: the pooled path
    method.cfg.sgcl.rampup_epochs = 0.0
    batch = make_batch(IDX, *method._test_grid, 1, seed=2)
    out = method(batch, 1, 3)
    with torch.no_grad():
        h = method.backbone(batch["views"][0])
        q, hb = F.normalize(method.head(h), dim=1), F.normalize(h, dim=1)
    pos_i, pos_m, neg_i, neg_m, _ = method.positive_negative_sets(q, hb, IDX, 3)
    assert set(neg_i[neg_m].tolist()) and neg_i.shape[1] == 16         # k draws (with replacement)
    rows = lambda i: method.bank.weight[i]  # noqa: E731
    expected = multi_positive_nce(torch.einsum("bd,bkd->bk", q, rows(pos_i)), pos_m, torch.einsum("bd,bkd->bk", q, rows(neg_i)),
                                  neg_m, method.cfg.T_spatial, method.cfg.sgcl.denominator, 72)
    assert float(out["loss_spatial_raw"]) == pytest.approx(float(expected), rel=1e-5)


def test_candidates_auto_is_indexed_from_the_threshold_on(monkeypatch):
    import sgcl.methods.config as config_mod

    assert small_cfg().sgcl.candidates == "auto"
    for threshold, expected in ((72, True), (73, False)):
        monkeypatch.setattr(config_mod, "AUTO_INDEXED_ROWS", threshold)
        method, _, _ = started(small_cfg())                            # 72 patches
        assert method.indexed is expected
    with pytest.raises(ValueError, match="npid_sample"):
        started(small_cfg(npid_sample=-1))

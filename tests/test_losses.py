"""Losses, memory bank/queue, mining and k-means on small hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sgcl.clustering import assign_clusters, effective_clusters, fit_kmeans
from sgcl.losses import info_nce, multi_positive_nce, npid_loss, nt_xent, sigmoid_rampup
from sgcl.memory import FeatureQueue, MemoryBank
from sgcl.memory.bank import chunked_topk
from sgcl.mining import beta_rank_weights, mine_negatives, sample_rank_positions

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- ramp
@pytest.mark.parametrize("epoch,expected", [(0, 0.0067), (2, 0.041), (4, 0.165), (6, 0.449), (8, 0.819), (10, 1.0), (25, 1.0)])
def test_ramp_matches_methods_table(epoch, expected):
    assert sigmoid_rampup(epoch, 10) == pytest.approx(expected, abs=6e-4)


def test_ramp_without_length_is_one_and_monotone():
    assert sigmoid_rampup(0, 0) == 1.0
    values = [sigmoid_rampup(e / 2, 10) for e in range(25)]
    assert all(b >= a for a, b in zip(values, values[1:]))


# ------------------------------------------------------------------------ InfoNCE
def test_info_nce_hand_computed():
    q = torch.tensor([[1.0, 0.0]])
    k_pos = torch.tensor([[1.0, 0.0]])
    k_neg = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # logits / 0.5 = [2, 0, -2]
    expected = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    assert float(info_nce(q, k_pos, k_neg, 0.5)) == pytest.approx(expected, rel=1e-6)
    # a masked negative leaves the denominator
    per_row = k_neg.unsqueeze(0)
    masked = info_nce(q, k_pos, per_row, 0.5, neg_mask=torch.tensor([[True, False]]))
    assert float(masked) == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-6)


def test_nt_xent_matches_explicit_sum():
    torch.manual_seed(0)
    z1, z2 = F.normalize(torch.randn(3, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
    z = torch.cat([z1, z2])
    tau = 0.3
    loss = nt_xent(z, z, torch.tensor([3, 4, 5, 0, 1, 2]), torch.arange(6), tau)
    total = 0.0
    for i in range(6):
        j = (i + 3) % 6
        den = sum(math.exp(float(z[i] @ z[m]) / tau) for m in range(6) if m != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / den)
    assert float(loss) == pytest.approx(total / 6, rel=1e-5)


def test_npid_loss_does_not_backprop_into_the_bank():
    q = F.normalize(torch.randn(2, 3), dim=1).requires_grad_()
    pos = F.normalize(torch.randn(2, 3), dim=1).requires_grad_()
    neg = F.normalize(torch.randn(5, 3), dim=1).requires_grad_()
    loss = npid_loss(q, pos, neg, 0.2)
    loss.backward()
    assert q.grad is not None and pos.grad is None and neg.grad is None
    assert float(loss.detach()) == pytest.approx(float(info_nce(q, pos, neg, 0.2).detach()))


# --------------------------------------------------------------- multi-positive NCE
def _mp_expected(pos, neg, T, const, eps=1e-7):
    sp = sum(math.exp(s / T) for s in pos)
    sn = sum(math.exp(s / T) for s in neg)
    return -math.log(sp / (sp + const + sn) + eps)


def test_multi_positive_faithful_and_clean_hand_computed():
    pos_sim = torch.tensor([[0.5, 0.2, 0.9]])          # last slot is padding (masked)
    pos_mask = torch.tensor([[True, True, False]])
    neg_sim = torch.tensor([[0.1, 0.3]])
    neg_mask = torch.tensor([[True, True]])
    T, N = 0.1, 10
    faithful = multi_positive_nce(pos_sim, pos_mask, neg_sim, neg_mask, T, "faithful", N)
    clean = multi_positive_nce(pos_sim, pos_mask, neg_sim, neg_mask, T, "clean", N)
    assert float(faithful) == pytest.approx(_mp_expected([0.5, 0.2], [0.1, 0.3], T, N - 2), rel=1e-5)
    assert float(clean) == pytest.approx(_mp_expected([0.5, 0.2], [0.1, 0.3], T, 0), rel=1e-5)
    assert float(faithful) > float(clean)


def test_multi_positive_reference_constant_is_not_negligible():
    # methods.md §1.13: N = 681,486, T = 0.07, one positive at s = 0.95 -> the constant matters
    pos = torch.tensor([[0.95]])
    loss_f = multi_positive_nce(pos, torch.tensor([[True]]), torch.zeros(1, 0), None, 0.07, "faithful", 681_486)
    loss_c = multi_positive_nce(pos, torch.tensor([[True]]), torch.zeros(1, 0), None, 0.07, "clean", 681_486)
    assert float(loss_c) == pytest.approx(0.0, abs=1e-6)
    expected = _mp_expected([0.95], [], 0.07, 681_485)
    assert float(loss_f) == pytest.approx(expected, rel=1e-5) and expected > 0.5


def test_multi_positive_gradient_share_is_adaptive():
    # d L / d s_j  ∝  exp(s_j / T) / S⁺  (clean mode, no negatives): similar positives weigh more
    s = torch.tensor([[0.8, 0.4, 0.1]], requires_grad=True)
    T = 0.2
    loss = multi_positive_nce(s, torch.ones(1, 3, dtype=torch.bool), torch.tensor([[0.0]]), None, T, "clean", 0, eps=0.0)
    loss.backward()
    g = -s.grad[0]
    w = torch.exp(s.detach()[0] / T)
    w = w / w.sum()
    sp, sn = torch.exp(s.detach()[0] / T).sum(), math.exp(0.0)
    scale = (1 / T) * (1 - sp / (sp + sn))
    assert torch.allclose(g, w * scale, rtol=1e-5)


def test_multi_positive_is_stable_in_half_inputs():
    pos = torch.ones(4, 2, dtype=torch.float16)
    loss = multi_positive_nce(pos, torch.ones(4, 2, dtype=torch.bool), -torch.ones(4, 3, dtype=torch.float16), None, 0.07, "faithful", 1000)
    assert torch.isfinite(loss)


def test_multi_positive_rejects_unknown_mode():
    with pytest.raises(ValueError, match="faithful"):
        multi_positive_nce(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 0), None, 0.1, "exact", 1)


# ------------------------------------------------------------------ memory bank/queue
def test_bank_momentum_update_formula_and_fp16():
    for dtype in ("float32", "float16"):
        bank = MemoryBank(6, 4, momentum=0.5, dtype=dtype, seed=3)
        assert torch.allclose(bank.weight.float().norm(dim=1), torch.ones(6), atol=1e-3)
        old = bank.weight[[1, 4]].float().clone()
        new = torch.tensor([[2.0, 0, 0, 0], [0, 0, 3.0, 0]])
        bank.update(torch.tensor([1, 4]), new)
        expected = F.normalize(0.5 * old + 0.5 * F.normalize(new, dim=1), dim=1)
        assert torch.allclose(bank.weight[[1, 4]].float(), expected, atol=2e-3 if dtype == "float16" else 1e-6)
        assert bank.weight.dtype == (torch.float16 if dtype == "float16" else torch.float32)
    assert MemoryBank(6, 4, seed=3).weight.equal(MemoryBank(6, 4, seed=3).weight)


def test_bank_chunked_similarity_and_topk_equal_dense():
    torch.manual_seed(1)
    bank = MemoryBank(50, 8, seed=0)
    q = F.normalize(torch.randn(3, 8), dim=1)
    dense = q @ bank.weight.t()
    chunked = torch.cat([s for _, s in bank.similarity(q, chunk=7)], 1)
    assert torch.allclose(dense, chunked, atol=1e-6)
    exclude = torch.tensor([[dense[0].argmax().item(), -1], [-1, -1], [5, 6]])
    v, i = chunked_topk(q, bank.weight, 10, chunk=7, exclude=exclude)
    ref = dense.clone()
    ref[0, exclude[0, 0]] = float("-inf")
    ref[2, 5] = ref[2, 6] = float("-inf")
    rv, ri = ref.topk(10, dim=1)
    assert torch.equal(i, ri) and torch.allclose(v, rv)


def test_queue_fifo_wraps_and_keeps_indices():
    queue = FeatureQueue(5, 2, extras={"slide": ((), torch.long)})
    assert not queue.valid().any()
    keys = F.normalize(torch.randn(3, 2), dim=1)
    queue.enqueue(keys, torch.tensor([10, 11, 12]), slide=torch.tensor([0, 0, 1]))
    queue.enqueue(keys, torch.tensor([13, 14, 15]), slide=torch.tensor([2, 2, 2]))
    assert queue.index.tolist() == [15, 11, 12, 13, 14]
    assert queue.extra("slide").tolist() == [2, 0, 1, 2, 2]
    assert int(queue.ptr) == 1
    with pytest.raises(ValueError, match="slide"):
        queue.enqueue(keys, torch.tensor([1, 2, 3]))


# ------------------------------------------------------------------------- mining
def test_beta_rank_weights_follow_beta_5_15():
    w = beta_rank_weights(1000, 5, 15)
    pos = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    assert float(w.sum()) == pytest.approx(1.0)
    assert float((w * pos).sum()) == pytest.approx(0.25, abs=1e-3)        # Beta(5,15) mean
    assert float(w[:10].sum()) < 1e-4                                        # hardest 1 % almost never
    gen = torch.Generator().manual_seed(0)
    p = sample_rank_positions(1000, 200, "semi_hard", 5, 15, gen)
    assert p.unique().numel() == 200 and int(p.min()) >= 0 and int(p.max()) < 1000
    assert 180 < float(p.float().mean()) < 330


def test_rank_positions_for_huge_banks_are_distinct_and_beta_shaped():
    gen = torch.Generator().manual_seed(0)
    p = sample_rank_positions(50_000_000, 4096, "semi_hard", 5, 15, gen)
    assert p.numel() == 4096 and p.unique().numel() == 4096
    assert float(p.double().mean() / 50_000_000) == pytest.approx(0.25, abs=0.02)


def _mining_case():
    torch.manual_seed(0)
    keys = F.normalize(torch.randn(200, 16), dim=1)
    query = keys[[3, 50]] + 0.01
    exclude = torch.tensor([[3, 7, 8, -1], [50, 51, -1, -1]])
    return F.normalize(query, dim=1), keys, exclude


@pytest.mark.parametrize("mode", ["semi_hard", "hardest", "uniform"])
def test_negatives_exclude_self_and_positives(mode):
    query, keys, exclude = _mining_case()
    idx, mask = mine_negatives(query, keys, exclude, 30, mode, generator=torch.Generator().manual_seed(1), chunk=64)
    for row in range(2):
        chosen = set(idx[row][mask[row]].tolist())
        assert chosen and not chosen & set(exclude[row].tolist())
    if mode == "hardest":  # exactly the 30 most similar non-excluded keys
        sims = query @ keys.t()
        for row in range(2):
            s = sims[row].clone()
            s[exclude[row][exclude[row] >= 0]] = float("-inf")
            assert set(idx[row].tolist()) == set(s.topk(30).indices.tolist())
    if mode == "semi_hard":  # picked inside the top 20 % by similarity, skipping the very hardest
        sims = query @ keys.t()
        for row in range(2):
            s = sims[row].clone()
            s[exclude[row][exclude[row] >= 0]] = float("-inf")
            top = s.topk(40).indices.tolist()
            assert set(idx[row].tolist()) <= set(top)


def test_mining_respects_valid_mask():
    query, keys, exclude = _mining_case()
    valid = torch.zeros(200, dtype=torch.bool)
    valid[100:] = True
    idx, mask = mine_negatives(query, keys, exclude, 50, "hardest", valid=valid)
    assert bool((idx[mask] >= 100).all())


# ------------------------------------------------------------------------ k-means
def test_effective_clusters_clipped_for_small_n():
    assert effective_clusters(681_486, 1000) == 1000
    assert effective_clusters(40, 1000) == 10
    assert effective_clusters(2, 1000) == 1


def test_kmeans_recovers_separated_blobs_and_is_seeded():
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:3] * 5
    x = torch.from_numpy(np.concatenate([c + 0.05 * rng.standard_normal((30, 8)) for c in centres]).astype(np.float32))
    labels, cents = fit_kmeans(x, 3, runs=2, niter=20, seed=1234)
    assert labels.shape == (2, 90) and cents.shape == (2, 3, 8)
    truth = np.repeat(np.arange(3), 30)
    for r in range(2):
        lab = labels[r].numpy()
        assert len({tuple(lab[truth == t]) for t in range(3)}) == 3           # one label per blob
        assert all(len(set(lab[truth == t])) == 1 for t in range(3))
        assert torch.equal(assign_clusters(x, cents[r]), labels[r])
    again, _ = fit_kmeans(x, 3, runs=2, niter=20, seed=1234)
    assert torch.equal(labels, again)


@pytest.mark.parametrize("mode", ["semi_hard", "hardest"])
def test_mining_within_a_random_pool_still_excludes_and_stays_in_range(mode):
    query, keys, exclude = _mining_case()
    idx, mask = mine_negatives(query, keys, exclude, 10, mode, generator=torch.Generator().manual_seed(2), pool=80)
    assert idx.shape[1] <= 10 and bool(mask.any())
    for row in range(2):
        chosen = set(idx[row][mask[row]].tolist())
        assert chosen and not chosen & set(exclude[row].tolist())
        assert all(0 <= c < 200 for c in chosen)
    # hardest within the pool = the 10 most similar non-excluded keys among the pooled rows
    if mode == "hardest":
        rows = torch.randint(0, 200, (80,), generator=torch.Generator().manual_seed(2)).unique()
        sims = query @ keys.t()
        for row in range(2):
            cand = [r for r in rows.tolist() if r not in set(exclude[row].tolist())]
            best = sorted(cand, key=lambda r: -float(sims[row, r]))[:10]
            assert set(idx[row].tolist()) == set(best)


def test_faithful_constant_turns_lsp_into_pure_attraction_and_rewards_collapse():
    """A property of the reference's constant C = N − |P| (docs/sgcl_method.md, "Projection
    collapse"): at N = 4,371 patches, T = 0.07 and cosines ≈ 0 the mined negatives get ~1.4 % of the
    positives' gradient, so L_sp only pulls queries towards their positives; and moving *every*
    similarity to 1 lowers the faithful loss by ~4 nats, while the clean loss (C = 0) is the same at
    both points and pushes negatives as hard as it pulls positives."""
    n_pos, n_neg, T, N = 16, 64, 0.07, 4371
    grads = {}
    for mode in ("faithful", "clean"):
        pos = torch.zeros(1, n_pos, requires_grad=True)
        neg = torch.zeros(1, n_neg, requires_grad=True)
        multi_positive_nce(pos, torch.ones(1, n_pos, dtype=torch.bool), neg, None, T, mode, N).backward()
        grads[mode] = (float(pos.grad.sum()), float(neg.grad.sum()))
    pull, push = grads["faithful"]
    assert pull < 0 < push < 0.02 * -pull
    pull, push = grads["clean"]
    assert push == pytest.approx(-pull, rel=1e-5)  # 64/80 each way at equal similarities

    def loss(sim: float, mode: str) -> float:
        return float(multi_positive_nce(torch.full((1, n_pos), sim), torch.ones(1, n_pos, dtype=torch.bool),
                                        torch.full((1, n_neg), sim), None, T, mode, N))

    assert loss(1.0, "faithful") < loss(0.0, "faithful") - 3.5            # collapse lowers it by ~4 nats
    assert loss(1.0, "clean") == pytest.approx(loss(0.0, "clean"), rel=1e-4)  # not rewarded
    assert loss(1.0, "clean") == pytest.approx(math.log((n_pos + n_neg) / n_pos), rel=1e-4)

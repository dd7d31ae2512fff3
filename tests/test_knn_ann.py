"""Approximate kNN (faiss IVF / HNSW) against exact search on features of REAL patches: views of the
shared labelled images (osteosarcoma, CRC-VAL-HE-7K, Kather 2016 samples; 16-px crops at 1/4 scale,
random position, flip and turn) through a seeded random-init ResNet-18, standardised per dimension
(random-init features share one dominant direction: mean cosine 0.91 before, 0.01 after)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.knn import real_features
from evaluation.knn import knn_classify, l2_normalize, plan_index, search_ann, search_faiss
from tests.conftest import shared_path

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def feats():
    x, y = real_features(shared_path(), 16_000)
    x = (x - x[:2048].mean(0)) / (x[:2048].std(0) + 1e-6)
    return torch.from_numpy(x[:15_000]), torch.from_numpy(y[:15_000]), torch.from_numpy(x[15_000:])


def tie_aware_recall(bank, queries, ann, exact, k):
    """Share of the ANN neighbours at least as similar as the exact k-th neighbour (ties count)."""
    b, q = l2_normalize(bank), l2_normalize(queries)
    kth = torch.einsum("qd,qd->q", q, b[exact[:, k - 1]])
    sims = torch.einsum("qd,qkd->qk", q, b[ann[:, :k]])
    return float((sims >= kth[:, None] - 1e-6).float().mean())


def test_auto_flips_at_the_threshold_and_rules():
    assert plan_index(1000, 20, exact_max=1000)["index"] == "exact"
    p = plan_index(1001, 20, exact_max=1000)
    assert p["index"] == "ivf" and p["requested"] == "auto" and p["nlist"] == 8 and p["nprobe"] == 8
    p = plan_index(1_000_000, 200)
    assert (p["nlist"], p["nprobe"], p["train_size"]) == (256, 32, 16_384)
    assert plan_index(10, 20, "ivf", nlist=4, nprobe=2)["nprobe"] == 2
    assert plan_index(5000, 20, "hnsw")["ef_search"] == 256
    with pytest.raises(ValueError, match="unknown kNN index"):
        plan_index(10, 1, "lsh")


def test_ivf_recall_and_predictions_match_exact(feats):
    bank, labels, queries = feats
    b, q = l2_normalize(bank), l2_normalize(queries)
    k = 20
    plan = plan_index(len(bank), k, exact_max=10_000)
    assert plan["index"] == "ivf" and plan["nlist"] == 32 and plan["nprobe"] == 16 and plan["train_size"] == 2048
    ann, exact = search_ann(b, q, k, plan), search_faiss(b, q, k)
    assert tie_aware_recall(bank, queries, ann, exact, k) >= 0.99
    a = knn_classify(bank, labels, queries, ks=[10, 20], index=plan)
    e = knn_classify(bank, labels, queries, ks=[10, 20], index="exact")
    for kk in (10, 20):
        assert (a[kk]["pred"] == e[kk]["pred"]).float().mean() >= 0.99, kk
    # seeded: the same plan gives the same neighbours
    assert torch.equal(search_ann(b, q[:200], k, plan), ann[:200])


def test_hnsw_recall_and_exact_path_unchanged(feats):
    bank, labels, queries = feats
    b, q = l2_normalize(bank[:5000]), l2_normalize(queries[:300])
    plan = plan_index(5000, 20, "hnsw")
    assert tie_aware_recall(bank[:5000], queries[:300], search_ann(b, q, 20, plan), search_faiss(b, q, 20), 20) >= 0.99  # HNSW defaults (M 48, efConstruction 200): 0.995 here; M 32, efC 80 gave 0.982
    # auto below the threshold is the exact path, bit for bit
    auto = knn_classify(bank[:5000], labels[:5000], queries[:300], ks=[20])
    exact = knn_classify(bank[:5000], labels[:5000], queries[:300], ks=[20], index="exact")
    assert torch.equal(auto[20]["proba"], exact[20]["proba"])


def test_short_ivf_lists_fall_back_to_exact():
    x = torch.randn(400, 8)
    plan = plan_index(400, 50, "ivf", nlist=10, nprobe=1)
    nn = search_ann(l2_normalize(x), l2_normalize(x[:20]), 50, plan)
    assert (nn >= 0).all() and nn.shape == (20, 50)

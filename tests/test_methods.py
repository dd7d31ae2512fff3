"""Methods behind ``build_method``: positive/negative sets, switchable terms, bank updates, resume."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from _tiny_nets import TinyGN, grid_dataset, make_batch
from sgcl.config import ConfigError, load_config
from sgcl.methods import MethodConfig, available_methods, build_method
from sgcl.methods.base import DatasetMeta
from sgcl.methods.moco_v2 import MoCoV2
from sgcl.methods.sgcl import SGCL, union_sets
from sgcl.methods.simclr import SimCLR

torch.set_num_threads(1)


def small_cfg(name: str = "sgcl", **sgcl) -> MethodConfig:
    cfg = MethodConfig(name=name, proj_dim=16)
    cfg.moco.queue_size = 48
    cfg.sgcl.num_negatives = 32
    cfg.sgcl.nei_k = 16
    cfg.sgcl.kmeans_clusters = 6
    for k, v in sgcl.items():
        setattr(cfg.sgcl, k, v)
    return cfg


def started(cfg: MethodConfig, n_slides: int = 2, side: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    slide_of, grid_of = grid_dataset(n_slides, side)
    method = build_method(cfg, TinyGN())
    method.on_train_start(DatasetMeta(len(slide_of), n_slides, slide_of, grid_of))
    return method, slide_of, grid_of


def run_step(method, batch, epoch, step, opt=None):
    out = method(batch, epoch, step)
    out["loss"].backward()
    if opt is not None:
        opt.step()
        opt.zero_grad()
    method.on_after_step(out)
    return out


# ------------------------------------------------------------------------ factory
def test_factory_by_name_and_unknown_name():
    assert available_methods() == ["moco_v2", "sgcl", "simclr"]
    assert isinstance(build_method(small_cfg("moco_v2"), TinyGN()), MoCoV2)
    assert isinstance(build_method(small_cfg("simclr"), TinyGN()), SimCLR)
    sg = build_method(small_cfg("sgcl"), TinyGN())
    assert isinstance(sg, SGCL) and sg.num_views == 1 and sg.needs_local
    assert build_method(small_cfg("sgcl", bank="queue"), TinyGN()).num_views == 2
    bad = small_cfg()
    bad.name = "byol"
    with pytest.raises(ValueError, match="unknown method 'byol'"):
        build_method(bad, TinyGN())
    with pytest.raises(ValueError, match="at least one"):
        build_method(small_cfg(self_term=False, intra_term=False, inter_term=False, inner_term=False), TinyGN())


def test_method_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "method.yaml"
    path.write_text("name: sgcl\nsgcl:\n  radius: 1.1\n  mining: hardest\n  bank: queue\nmoco:\n  queue_size: 1024\n")
    cfg = load_config(MethodConfig, path, ["sgcl.denominator=clean", "tau_head=0.1"])
    assert (cfg.sgcl.radius, cfg.sgcl.mining, cfg.sgcl.bank, cfg.sgcl.denominator) == (1.1, "hardest", "queue", "clean")
    assert cfg.moco.queue_size == 1024 and cfg.tau_head == 0.1 and cfg.T_spatial == 0.07
    with pytest.raises(ConfigError, match="sgcl.radiuss"):
        load_config(MethodConfig, path, ["sgcl.radiuss=3"])
    with pytest.raises(ConfigError, match="sgcl.mining"):
        load_config(MethodConfig, path, ["sgcl.mining=hardest_ever"])


# --------------------------------------------------------------- SGCL: sets
def test_intra_positives_are_the_grid_neighbours_in_the_same_slide():
    method, slide_of, grid_of = started(small_cfg(inter_term=False, inner_term=False, self_term=False))
    idx = torch.tensor([0, 14, 35, 36, 50])
    q = F.normalize(torch.randn(5, 16), dim=1)
    pos, pm, neg, nm, diag = method.positive_negative_sets(q, torch.randn(5, 32), idx, step=0)
    for r, i in enumerate(idx.tolist()):
        got = set(pos[r][pm[r]].tolist())
        d2 = ((grid_of - grid_of[i]) ** 2).sum(1)
        expected = set(torch.nonzero((slide_of == slide_of[i]) & (d2 > 0) & (d2 < 9)).flatten().tolist())
        assert got == expected and i not in got
        negs = set(neg[r][nm[r]].tolist())
        assert negs and not negs & (got | {i})
    assert float(diag["fallback_frac"]) == 0.0


def test_inter_positives_cross_slides_but_never_contain_the_anchor():
    method, slide_of, grid_of = started(small_cfg(inner_term=False, radius=1.5, aux_num=2))
    n = len(slide_of)
    # patch j of slide 1 is the semantic twin of patch j of slide 0; neighbours look like the anchor
    base = F.normalize(torch.randn(36, 16), dim=1)
    rows = torch.cat([base, base + 0.01 * torch.randn(36, 16)])
    method.bank.weight.copy_(F.normalize(rows, dim=1))
    method.on_epoch_start(0)
    assert int(method.clustered_epoch) == 0
    idx = torch.arange(0, n, 5)
    q = method.bank.rows(idx)
    pos, pm, neg, nm, diag = method.positive_negative_sets(q, F.normalize(torch.randn(len(idx), 32), dim=1), idx, step=3)
    crossed = 0
    for r, i in enumerate(idx.tolist()):
        got = set(pos[r][pm[r]].tolist())
        assert i not in got                         # the anchor never re-enters its own positive set
        twin = (i + 36) % n
        crossed += twin in got
        negs = set(neg[r][nm[r]].tolist())
        assert not negs & (got | {i})               # negatives exclude self and every positive
    assert crossed >= len(idx) // 2                 # semantic positives come from the other slide
    assert float(diag["pos_semantic"]) > 0


def test_empty_neighbourhood_falls_back_to_the_anchor_itself():
    cfg = small_cfg(inter_term=False, inner_term=False)
    torch.manual_seed(0)
    slide_of = torch.tensor([0, 0, 0, 1])           # slide 1 has a single patch
    grid_of = torch.tensor([[0, 0], [1, 0], [2, 0], [0, 0]])
    method = build_method(cfg, TinyGN())
    method.on_train_start(DatasetMeta(4, 2, slide_of, grid_of))
    pos, pm, _, _, diag = method.positive_negative_sets(F.normalize(torch.randn(2, 16), dim=1), torch.randn(2, 32), torch.tensor([3, 1]), 0)
    assert pos[0][pm[0]].tolist() == [3]
    assert set(pos[1][pm[1]].tolist()) == {0, 2}
    assert float(diag["fallback_frac"]) == 0.5


def test_union_sets_deduplicates():
    idx = torch.tensor([[5, 3, 5, 9], [1, 1, 1, 1]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    u, m = union_sets(idx, mask)
    assert sorted(u[0][m[0]].tolist()) == [3, 5] and u[1][m[1]].tolist() == [1]


# ------------------------------------------------------- SGCL: terms and updates
@pytest.mark.parametrize("bank", ["memory", "queue"])
def test_every_term_is_switchable_and_summed(bank):
    terms = {"self_term": "loss_single", "intra_term": None, "inter_term": None, "inner_term": "loss_mcrop"}
    full_keys = None
    for off in [None, *terms]:
        cfg = small_cfg(bank=bank)
        if off:
            setattr(cfg.sgcl, off, False)
        method, slide_of, grid_of = started(cfg)
        method.on_epoch_start(0)
        out = method(make_batch(torch.arange(0, 72, 9), slide_of, grid_of, method.num_views), epoch=4, step=0)
        parts = sum(float(out.get(k, 0.0)) for k in ("loss_single", "loss_spatial", "loss_mcrop"))
        assert float(out["loss"].detach()) == pytest.approx(parts, rel=1e-5)
        assert torch.isfinite(out["loss"])
        if off is None:
            full_keys = set(out)
            assert float(out["loss_spatial"]) == pytest.approx(float(out["ramp_weight"]) * float(out["loss_spatial_raw"]), rel=1e-5)
            assert float(out["ramp_weight"]) == pytest.approx(0.165, abs=1e-3)
        elif terms[off]:
            assert terms[off] not in out and terms[off] in full_keys


def test_bank_rows_follow_the_momentum_update_after_the_step():
    method, slide_of, grid_of = started(small_cfg())
    idx = torch.tensor([2, 40, 41])
    old = method.bank.weight[idx].clone()
    old_tr = method.local_banks[1].weight[idx].clone()
    method.eval()  # no pending update from an eval forward
    method(make_batch(idx, slide_of, grid_of, 1), 0, 0)
    method.on_after_step({})
    assert torch.equal(method.bank.weight[idx], old)
    method.train()
    batch = make_batch(idx, slide_of, grid_of, 1)
    out = method(batch, 0, 0)
    with torch.no_grad():
        q = F.normalize(method.head(method.backbone(batch["views"][0])), dim=1)
        u_tr = F.normalize(method.head(method.backbone(batch["local"][3:6])), dim=1)
    method.on_after_step(out)
    assert torch.allclose(method.bank.weight[idx], F.normalize(0.5 * old + 0.5 * q, dim=1), atol=1e-5)
    assert torch.allclose(method.local_banks[1].weight[idx], F.normalize(0.5 * old_tr + 0.5 * u_tr, dim=1), atol=1e-5)


def test_queue_mode_finds_spatial_positives_in_the_queue():
    method, slide_of, grid_of = started(small_cfg(bank="queue", inter_term=False, inner_term=False, radius=1.5))
    first = torch.tensor([7, 8, 13, 43])            # neighbours of 14 (slide 0), and 43 = slide 1 cell (1, 1)
    run_step(method, make_batch(first, slide_of, grid_of, 2), 0, 0)
    assert sorted(method.queue.index[method.queue.valid()].tolist()) == sorted(first.tolist())
    idx = torch.tensor([14, 71])  # 71 = slide 1 cell (5, 5): nothing queued near it
    with torch.no_grad():
        q = F.normalize(torch.randn(2, 16), dim=1)
        k = F.normalize(torch.randn(2, 16), dim=1)
        valid = method.queue.valid()
        cand_i = torch.cat([idx, method.queue.index[valid]])
        cand_s = slide_of[cand_i]
        cand_g = grid_of[cand_i]
        cand_k = torch.cat([k, method.queue.keys[valid]])
        mask, fallback, diag = method._positives_queue(q, k, idx, slide_of[idx], grid_of[idx], cand_k, cand_i, cand_s, cand_g)
    assert set(cand_i[mask[0]].tolist()) == {7, 8, 13}      # 14's neighbours at radius 1.5 that were queued
    assert not bool(mask[1].any()) and fallback.tolist() == [False, True]
    assert bool((cand_s[mask[0]] == 0).all())


def test_queue_mode_clusters_come_from_the_queue():
    method, slide_of, grid_of = started(small_cfg(bank="queue"))
    for step in range(3):
        run_step(method, make_batch(torch.arange(step * 16, step * 16 + 16), slide_of, grid_of, 2), 0, step)
    method.on_epoch_start(1)
    assert int(method.clustered_epoch) == 1
    assert torch.isfinite(method.centroids).all() and method.centroids.abs().sum() > 0
    out = method(make_batch(torch.arange(8), slide_of, grid_of, 2), 1, 3)
    assert torch.isfinite(out["loss"]) and "pos_semantic" in out


def test_clusters_are_not_refitted_when_resuming_inside_an_epoch():
    method, *_ = started(small_cfg())
    method.on_epoch_start(0)
    labels = method.clusters.clone()
    method.bank.weight.copy_(F.normalize(torch.randn_like(method.bank.weight), dim=1))
    method.on_epoch_start(0)
    assert torch.equal(method.clusters, labels)
    method.on_epoch_start(1)
    assert not torch.equal(method.clusters, labels)


# --------------------------------------------------------------- resume / misc
@pytest.mark.parametrize("name,bank", [("sgcl", "memory"), ("sgcl", "queue"), ("moco_v2", None), ("simclr", None)])
def test_state_dict_resume_gives_the_same_next_loss(name, bank):
    cfg = small_cfg(name, **({"bank": bank} if bank else {}))
    method, slide_of, grid_of = started(cfg)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    nv = method.num_views
    batches = [make_batch(torch.arange(s * 8, s * 8 + 8) % 72, slide_of, grid_of, nv, seed=s) for s in range(4)]
    method.on_epoch_start(0)
    for s in range(2):
        run_step(method, batches[s], 0, s, opt)
    state = copy.deepcopy(method.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    extra = method.extra_state()
    expected = [float(run_step(method, batches[s], 0, s, opt)["loss"].detach()) for s in (2, 3)]

    resumed, _, _ = started(cfg, seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(state)
    resumed.load_extra_state(extra)
    opt2 = torch.optim.SGD([p for p in resumed.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    opt2.load_state_dict(opt_state)
    resumed.on_epoch_start(0)  # same epoch: must not re-cluster
    got = [float(run_step(resumed, batches[s], 0, s, opt2)["loss"].detach()) for s in (2, 3)]
    assert got == pytest.approx(expected, rel=1e-5)


def test_resume_with_a_different_dataset_size_is_a_clear_error():
    method, *_ = started(small_cfg())
    other, *_ = started(small_cfg(), n_slides=3)
    with pytest.raises(ValueError, match="same HDF5 files"):
        other.load_extra_state(method.extra_state())


@pytest.mark.parametrize("bank", ["memory", "queue"])
def test_sgcl_under_bf16_autocast_and_fp16_banks(bank):
    method, slide_of, grid_of = started(small_cfg(bank=bank, bank_dtype="float16"))
    method.on_epoch_start(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(make_batch(torch.arange(8), slide_of, grid_of, method.num_views), 2, 0)
    out["loss"].backward()
    method.on_after_step(out)
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in method.parameters() if p.grad is not None)


def test_clear_errors_for_missing_inputs():
    cfg = small_cfg()
    method = build_method(cfg, TinyGN())
    slide_of, grid_of = grid_dataset()
    batch = make_batch(torch.arange(4), slide_of, grid_of, 1)
    with pytest.raises(RuntimeError, match="on_train_start"):
        method(batch, 0, 0)
    method.on_train_start(DatasetMeta(72, 2, slide_of, grid_of))
    del batch["local"]
    with pytest.raises(ValueError, match="inner_term"):
        method(batch, 0, 0)


@pytest.mark.parametrize("name", ["sgcl", "simclr"])  # (MoCo's queue fills with this very batch's keys)
def test_a_few_steps_on_a_fixed_batch_lower_the_loss(name):
    cfg = small_cfg(name, rampup_epochs=0.0)
    method, slide_of, grid_of = started(cfg)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.2, momentum=0.9)
    batch = make_batch(torch.arange(0, 72, 4), slide_of, grid_of, method.num_views)
    method.on_epoch_start(0)
    losses = [float(run_step(method, batch, 5, s, opt)["loss"].detach()) for s in range(12)]
    assert min(losses[-3:]) < losses[0]


@pytest.mark.parametrize("bank", ["memory", "queue"])
def test_memory_estimate_matches_the_allocated_buffers(bank):
    from sgcl.memory.estimate import SPATIAL_INDEX_BYTES_PER_PATCH, estimate_memory

    cfg = small_cfg(bank=bank)
    method, slide_of, _ = started(cfg, n_slides=3, side=8)
    parts = estimate_memory(cfg, len(slide_of), TinyGN.num_features)
    state = {
        "bank": ["bank."], "backbone_bank": ["bank_b."], "quadrant_banks": ["local_banks."], "cluster_labels": ["clusters"],
        "queue": ["queue.keys", "queue.index", "queue.x_slide", "queue.x_grid", "queue.ptr"],
        "queue_backbone_features": ["queue.x_feat"], "centroids": ["centroids"],
    }
    buffers = dict(method.named_buffers())
    for part, prefixes in state.items():
        actual = sum(t.numel() * t.element_size() for n, t in buffers.items() if any(n.startswith(p) for p in prefixes))
        if part in parts:
            assert abs(actual - parts[part]) <= 16, (part, actual, parts[part])  # (the queue pointer: 8 bytes)
        else:
            assert actual == 0, part
    assert parts["spatial_index"] == SPATIAL_INDEX_BYTES_PER_PATCH * len(slide_of)
    idx = method.spatial
    assert sum(t.numel() * t.element_size() for t in (idx.slide_of, idx.grid_of, idx.sorted_keys, idx.order)) == parts["spatial_index"]

"""Every loss term of every method sends its gradient where the paper says (issue 9).

A term that is computed and logged but sends no gradient passes every test of sums, shapes,
finiteness and "the loss goes down" (the other terms satisfy those on their own): SGCL's
spatial/semantic term once shipped under ``@torch.no_grad()``. So, for each term *alone*:

- the loss requires grad and the backbone's first convolution gets a non-zero gradient;
- its value equals an independent brute-force computation over the whole bank (or queue);
- its gradient with respect to the query equals central finite differences;
- a few optimiser steps on real H&E patches lower its own value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _tiny_nets import TinyGN, make_batch
from conftest import shared_path
from sgcl.methods import MethodConfig, build_method
from sgcl.methods.base import DatasetMeta
from test_methods import small_cfg, started as start

torch.set_num_threads(1)

SGCL_TERMS = {"self_term": "loss_single", "intra_term": "loss_spatial_raw", "inter_term": "loss_spatial_raw",
              "inner_term": "loss_mcrop"}


def only(term: str, bank: str = "memory", **extra) -> MethodConfig:
    """An SGCL config (test_methods' small sizes) with a single term switched on and no ramp."""
    return small_cfg(**{"bank": bank, "rampup_epochs": 0.0, **{t: t == term for t in SGCL_TERMS}, **extra})


def twin_bank(method, n: int) -> None:
    """Bank rows where patch j of slide 1 is the semantic twin of patch j of slide 0 (so k-means
    groups them and the inter term has real cross-slide positives)."""
    gen = torch.Generator().manual_seed(5)
    base = F.normalize(torch.randn(n // 2, method.cfg.proj_dim, generator=gen), dim=1)
    method.bank.weight.copy_(F.normalize(torch.cat([base, base + 0.01 * torch.randn(base.shape, generator=gen)]), dim=1))


def first_conv_grad(method) -> torch.Tensor:
    g = method.backbone.net[0].weight.grad
    return torch.zeros(()) if g is None else g.abs().sum()


def fill_queue(method, slide_of, grid_of, steps: int = 3) -> None:
    """Run a few training steps so the queue holds real keys, then fit the queue's k-means."""
    for step in range(steps):
        idx = torch.arange(step * 16, step * 16 + 16) % len(slide_of)
        out = method(make_batch(idx, slide_of, grid_of, 2, seed=step), 0, step)
        out["loss"].backward()
        method.on_after_step(out)
    method.zero_grad(set_to_none=True)
    method.on_epoch_start(1)


# ------------------------------------------------------------------- a term alone has a gradient
@pytest.mark.parametrize("bank", ["memory", "queue"])
@pytest.mark.parametrize("term", list(SGCL_TERMS))
def test_each_sgcl_term_alone_sends_gradient_into_the_backbone(term, bank):
    method, slide_of, grid_of = start(only(term, bank))
    if bank == "memory":
        twin_bank(method, len(slide_of))
        method.on_epoch_start(0)
    else:
        fill_queue(method, slide_of, grid_of)
    out = method(make_batch(torch.arange(0, 72, 5), slide_of, grid_of, method.num_views, seed=9), 1, 7)
    assert out["loss"].requires_grad, f"{term} alone ({bank}) gives a loss without gradient"
    assert SGCL_TERMS[term] in out
    if term == "inter_term":  # the semantic path was exercised, not just the fallback to the anchor itself
        assert float(out["pos_semantic"]) > 0
        assert float(out["fallback_frac"]) < 1.0 if bank == "memory" else True
    out["loss"].backward()
    assert float(first_conv_grad(method)) > 0, f"{term} alone ({bank}): no gradient reaches the backbone"
    assert all(p.grad is None for p in (method.key_encoder.parameters() if method.key_encoder is not None else []))


@pytest.mark.parametrize("term", list(SGCL_TERMS))
def test_each_sgcl_term_alone_sends_gradient_into_the_backbone_with_indexed_candidates(term):
    """The same with the bounded candidates of issue 12 (member lists + pooled mining)."""
    method, slide_of, grid_of = start(only(term, candidates="indexed", candidate_pool=8, mining_pool=40))
    twin_bank(method, len(slide_of))
    method.on_epoch_start(0)
    out = method(make_batch(torch.arange(0, 72, 5), slide_of, grid_of, 1, seed=9), 1, 7)
    assert out["loss"].requires_grad and SGCL_TERMS[term] in out
    if term == "inter_term":
        assert float(out["pos_semantic"]) > 0
    out["loss"].backward()
    assert float(first_conv_grad(method)) > 0, f"{term} alone (indexed): no gradient reaches the backbone"


@pytest.mark.parametrize("name", ["moco_v2", "simclr"])
def test_baseline_losses_send_gradient_into_the_backbone(name):
    cfg = MethodConfig(name=name, proj_dim=16, proj_hidden_dim=32)
    cfg.moco.queue_size = 48
    method, slide_of, grid_of = start(cfg)
    out = method(make_batch(torch.arange(8), slide_of, grid_of, 2), 0, 0)
    assert out["loss"].requires_grad
    out["loss"].backward()
    assert float(first_conv_grad(method)) > 0


def test_spatial_term_changes_the_gradient_of_the_full_loss():
    """The full SGCL loss's gradient differs with and without the spatial term (it is live)."""
    grads = []
    for intra in (True, False):
        cfg = only("self_term", intra_term=intra)
        method, slide_of, grid_of = start(cfg)
        out = method(make_batch(torch.arange(0, 72, 5), slide_of, grid_of, 1), 1, 0)
        out["loss"].backward()
        grads.append(method.backbone.net[0].weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


# ------------------------------------------------------------- values equal a brute force
def _encode(method, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The query and normalised backbone feature of view 0, recomputed outside the method
    (TinyGN uses GroupNorm, so a sample's output does not depend on its batch)."""
    with torch.no_grad():
        h = method.backbone(batch["views"][0])
        return F.normalize(method.head(h), dim=1), F.normalize(h, dim=1)


def _brute_force_lsp(q, pos_rows, neg_rows, T, const):
    total = 0.0
    for i in range(q.shape[0]):
        sp = sum(math.exp(float(q[i] @ v) / T) for v in pos_rows[i])
        sn = sum(math.exp(float(q[i] @ v) / T) for v in neg_rows[i])
        total += -math.log(sp / (sp + const[i] + sn) + 1e-7)
    return total / q.shape[0]


@pytest.mark.parametrize("candidates", ["exact", "indexed"])
@pytest.mark.parametrize("denominator", ["faithful", "clean"])
@pytest.mark.parametrize("nei_k", [72, 10])
def test_memory_lsp_equals_brute_force_over_the_whole_bank(nei_k, denominator, candidates):
    """Intra + inter term (memory bank, hardest mining) against sets rebuilt by hand from the
    definitions of methods.md §1.5–1.7: spatial positives, one aux anchor, the top-``nei_k``
    candidates of anchor and aux agreeing in every k-means run, negatives = the ``nei_k``
    nearest non-positives in backbone space. ``indexed`` (pool covering every group): the
    top-``nei_k`` *among the rows agreeing in every run* (no global kNN cut first)."""
    cfg = only("intra_term", inter_term=True, aux_num=1, nei_k=nei_k, mining="hardest", denominator=denominator,
               radius=1.5, kmeans_runs=2, candidates=candidates, candidate_pool=72)
    cfg.T_spatial = 0.2
    method, slide_of, grid_of = start(cfg)
    n = len(slide_of)
    twin_bank(method, n)
    method.bank_b.weight.copy_(F.normalize(torch.randn(method.bank_b.weight.shape, generator=torch.Generator().manual_seed(3)), dim=1))
    method.on_epoch_start(0)
    idx = torch.tensor([0, 7, 14, 40, 57, 71])
    batch = make_batch(idx, slide_of, grid_of, 1, seed=2)
    out = method(batch, 1, 3)
    q, hb = _encode(method, batch)
    V, Vb, C = method.bank.weight, method.bank_b.weight, method.clusters

    def topk_excluding(query, rows, k, excluded):
        order = torch.argsort(rows @ query, descending=True).tolist()
        return [j for j in order if j not in excluded][:k]

    pos_rows, neg_rows, const = [], [], []
    for r, i in enumerate(idx.tolist()):
        spatial = [j for j in range(n) if slide_of[j] == slide_of[i] and 0 < float(((grid_of[j] - grid_of[i]) ** 2).sum()) < 1.5**2]
        aux = max(spatial, key=lambda j: float(q[r] @ V[j]))
        same = lambda a, b: bool((C[:, a] == C[:, b]).all())  # noqa: E731
        if candidates == "exact":
            semantic = {j for j in topk_excluding(q[r], V, nei_k, {i}) if same(j, i)}
            semantic |= {j for j in topk_excluding(V[aux], V, nei_k, {aux}) if same(j, aux)}
        else:
            group = lambda a: {j for j in range(n) if not same(j, a)}  # noqa: E731 - rows outside a's group
            semantic = set(topk_excluding(q[r], V, nei_k, {i} | group(i)))
            semantic |= set(topk_excluding(V[aux], V, nei_k, {aux, i} | group(aux)))
        positives = (set(spatial) | semantic) - {i}
        negatives = topk_excluding(hb[r], Vb, nei_k, positives | {i})
        pos_rows.append(V[sorted(positives)])
        neg_rows.append(V[negatives])
        const.append(n - len(positives) if denominator == "faithful" else 0)
    expected = _brute_force_lsp(q, pos_rows, neg_rows, cfg.T_spatial, const)
    assert float(out["loss_spatial_raw"]) == pytest.approx(expected, rel=1e-4)
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-4)  # the only term, ramp weight 1


def test_queue_lsp_equals_brute_force_over_batch_and_queue():
    """Queue mode, intra term: positives are the queued or in-batch keys of grid neighbours of
    the same slide (the anchor's own key when there is none); negatives the nei_k nearest
    other candidates in backbone space."""
    cfg = only("intra_term", "queue", radius=1.5, mining="hardest", nei_k=12)
    cfg.T_spatial = 0.2
    method, slide_of, grid_of = start(cfg)
    fill_queue(method, slide_of, grid_of, steps=2)
    idx = torch.tensor([1, 9, 20, 44, 70])
    batch = make_batch(idx, slide_of, grid_of, 2, seed=4)
    valid = method.queue.valid()
    cand_i = torch.cat([idx, method.queue.index[valid]])
    cand_kf = method.queue.keys[valid].float()
    cand_ff = method.queue.extra("feat")[valid].float()
    out = method(batch, 1, 5)
    q, hb = _encode(method, batch)
    with torch.no_grad():
        k, hk = method.key_encoder(batch["views"][1])
    keys = torch.cat([k, cand_kf])
    feats = torch.cat([hk, cand_ff])
    m = keys.shape[0]
    pos_rows, neg_rows = [], []
    for r, i in enumerate(idx.tolist()):
        pos = [c for c in range(m) if int(cand_i[c]) != i and slide_of[cand_i[c]] == slide_of[i]
               and 0 < float(((grid_of[cand_i[c]] - grid_of[i]) ** 2).sum()) < 1.5**2]
        rows = keys[pos] if pos else k[r : r + 1]
        excluded = set(pos) | {c for c in range(m) if int(cand_i[c]) == i}
        order = [c for c in torch.argsort(feats @ hb[r], descending=True).tolist() if c not in excluded][: cfg.sgcl.nei_k]
        pos_rows.append(rows)
        neg_rows.append(keys[order])
    const = [m - len(p) for p in pos_rows]
    expected = _brute_force_lsp(q, pos_rows, neg_rows, cfg.T_spatial, const)
    assert float(out["loss_spatial_raw"]) == pytest.approx(expected, rel=1e-4)


def test_moco_and_simclr_values_equal_brute_force():
    cfg = MethodConfig(name="moco_v2", proj_dim=16, proj_hidden_dim=32)
    cfg.moco.queue_size = 20
    method, slide_of, grid_of = start(cfg)
    batch = make_batch(torch.arange(6), slide_of, grid_of, 2)
    queue = method.queue.keys.clone()
    out = method(batch, 0, 0)
    q, _ = _encode(method, batch)
    with torch.no_grad():
        k, _ = method.key_encoder(batch["views"][1])
    tau = cfg.tau_head
    expected = np.mean([-math.log(math.exp(float(q[i] @ k[i]) / tau)
                                  / (math.exp(float(q[i] @ k[i]) / tau) + sum(math.exp(float(q[i] @ v) / tau) for v in queue)))
                        for i in range(6)])
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-5)

    cfg = MethodConfig(name="simclr", proj_dim=16, proj_hidden_dim=32)
    method, slide_of, grid_of = start(cfg)
    batch = make_batch(torch.arange(5), slide_of, grid_of, 2)
    out = method(batch, 0, 0)
    with torch.no_grad():
        z = F.normalize(method.head(method.backbone(torch.cat(batch["views"]))), dim=1)
    t, b = cfg.simclr.temperature, 5
    terms = []
    for a in range(2 * b):
        p = (a + b) % (2 * b)
        den = sum(math.exp(float(z[a] @ z[c]) / t) for c in range(2 * b) if c != a)
        terms.append(-math.log(math.exp(float(z[a] @ z[p]) / t) / den))
    assert float(out["loss"].detach()) == pytest.approx(np.mean(terms), rel=1e-5)


# -------------------------------------------------------------------- finite differences
@pytest.mark.parametrize("bank", ["memory", "queue"])
def test_spatial_gradient_wrt_the_query_matches_finite_differences(bank):
    """∂L_sp/∂q by autograd through the method equals central differences (sets held by the
    method's own no-grad construction, which small perturbations do not change)."""
    cfg = only("intra_term", bank, inter_term=True, radius=1.5, mining="hardest", nei_k=12)
    cfg.T_spatial = 0.2
    method, slide_of, grid_of = start(cfg)
    if bank == "memory":
        twin_bank(method, len(slide_of))
        method.on_epoch_start(0)
    else:
        fill_queue(method, slide_of, grid_of)
    idx = torch.tensor([3, 15, 50])
    batch = make_batch(idx, slide_of, grid_of, method.num_views, seed=1)
    q0, hb = _encode(method, batch)
    q0 = q0.double()

    def loss_at(q: torch.Tensor) -> torch.Tensor:
        method._encode = lambda _batch: (q.float(), hb, None)  # noqa: E731 - the query is the variable
        return method(batch, 1, 2)["loss"]

    q = q0.clone().float().requires_grad_(True)
    loss_at(q).backward()
    grad = q.grad.double()
    assert float(grad.abs().sum()) > 0
    eps = 1e-3
    for r, c in [(0, 0), (0, 5), (1, 3), (2, 15), (2, 8)]:
        plus, minus = q0.clone(), q0.clone()
        plus[r, c] += eps
        minus[r, c] -= eps
        with torch.no_grad():
            fd = (float(loss_at(plus.float())) - float(loss_at(minus.float()))) / (2 * eps)
        assert fd == pytest.approx(float(grad[r, c]), rel=3e-2, abs=2e-3), (r, c)
    del method._encode


# ------------------------------------------------- each term alone lowers its own value
def real_patches(n_tiles: int = 4, side: int = 4):
    """Real H&E: NCT-CRC tiles, each cut into a ``side``×``side`` grid of patches (one "slide"
    per tile), as uint8 (N, P, P, 3) with slide index and grid cell."""
    import tifffile

    tiles = sorted(shared_path("patches", "nct-crc-he-samples").glob("*.tif"))[:n_tiles]
    imgs, slides, grids = [], [], []
    for s, path in enumerate(tiles):
        a = tifffile.imread(path)[..., :3]
        p = a.shape[0] // side
        for r in range(side):
            for c in range(side):
                imgs.append(a[r * p : (r + 1) * p, c * p : (c + 1) * p])
                slides.append(s)
                grids.append((c, r))
    return np.stack(imgs), torch.tensor(slides), torch.tensor(grids)


def real_batch(imgs: np.ndarray, index: torch.Tensor, size: int = 32) -> dict:
    """Fixed views of real patches: view 0 = the patch, view 1 = its flipped centre crop,
    ``local`` = its four quadrants (the batch contract of sgcl/methods/base.py)."""
    import cv2

    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    def tensor(img, s):
        t = torch.from_numpy(cv2.resize(np.ascontiguousarray(img), (s, s), interpolation=cv2.INTER_AREA)).permute(2, 0, 1)
        return (t.float() / 255 - mean) / std

    v0, v1, loc = [], [], [[], [], [], []]
    for i in index.tolist():
        a = imgs[i]
        p, h = a.shape[0], a.shape[0] // 2
        v0.append(tensor(a, size))
        v1.append(tensor(a[p // 8 : p - p // 8, p // 8 : p - p // 8, :][:, ::-1], size))
        for c, (y, x) in enumerate([(0, 0), (0, h), (h, 0), (h, h)]):
            loc[c].append(tensor(a[y : y + h, x : x + h], size // 2))
    return {"views": [torch.stack(v0), torch.stack(v1)], "local": torch.stack([t for q in loc for t in q]),
            "index": index.clone(), "slide": torch.zeros(len(index), dtype=torch.long), "grid": torch.zeros(len(index), 2, dtype=torch.long)}


def train_on_real_patches(cfg: MethodConfig, key: str, steps: int = 20) -> list[float]:
    """SGD on 64 real patches in 4 interleaved batches of 16 (batch ``s`` = patches ``i ≡ s mod 4``,
    so a queue of 32 keys never holds the current batch's own keys); returns the mean of
    ``out[key]`` over each cycle of 4 steps."""
    imgs, slide_of, grid_of = real_patches()
    torch.manual_seed(0)
    method = build_method(cfg, TinyGN())
    method.on_train_start(DatasetMeta(len(slide_of), 4, slide_of, grid_of))
    batches = []
    for s in range(4):
        index = torch.arange(s, len(slide_of), 4)
        b = real_batch(imgs, index)
        b["slide"], b["grid"] = slide_of[index], grid_of[index]
        batches.append(b)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    values = []
    for step in range(steps):
        epoch = step // 4
        method.on_epoch_start(epoch)  # re-cluster once per cycle (inter term)
        out = method(batches[step % 4], epoch + 1, step)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_after_step(out)
        values.append(float(out[key]))
    return [float(np.mean(values[i : i + 4])) for i in range(0, steps, 4)]


@pytest.mark.parametrize("bank", ["memory", "queue"])
@pytest.mark.parametrize("term", list(SGCL_TERMS))
def test_each_sgcl_term_alone_lowers_its_own_value_on_real_patches(term, bank):
    # nei_k = 4 of the top ⌈0.2·48⌉ ranks: semi-hard (with nei_k ≥ 0.2·N every top rank is taken,
    # i.e. the hardest same-tissue negatives, and the spatial term has little to learn here)
    cfg = only(term, bank, radius=1.5, nei_k=4, kmeans_clusters=4)
    cfg.moco.queue_size = 32
    cycles = train_on_real_patches(cfg, SGCL_TERMS[term])
    # InfoNCE against a queue: its first cycle still has the random initial keys as (easy)
    # negatives, so the value is compared from the first cycle with a queue of real keys
    first = 1 if bank == "queue" and term in ("self_term", "inner_term") else 0
    assert cycles[-1] < cycles[first] - 0.05, (term, bank, cycles)


@pytest.mark.parametrize("name", ["moco_v2", "simclr"])
def test_baseline_loss_lowers_its_own_value_on_real_patches(name):
    cfg = MethodConfig(name=name, proj_dim=16, proj_hidden_dim=32)
    cfg.moco.queue_size = 32
    cycles = train_on_real_patches(cfg, "loss_instance")
    first = 1 if name == "moco_v2" else 0  # (see above: the queue's random initial keys)
    assert cycles[-1] < cycles[first] - 0.05, (name, cycles)

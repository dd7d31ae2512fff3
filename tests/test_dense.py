"""Dense branch: pixel correspondence between views (coordinate-pattern images), pixel InfoNCE,
anchor samplers and a few optimisation steps of a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sgcl.losses.pixel_info_nce import pixel_info_nce
from sgcl.methods.dense import DenseBranch, DenseConfig, feature_map
from sgcl.transforms.base import ViewGeometry
from sgcl.transforms.geometry import cell_centres, correspondence, render_view, source_to_view, view_to_source
from sgcl.transforms.scale_aware import SmallWindowCrop

SRC = 128


def _pattern() -> np.ndarray:
    """Every pixel holds its own source coordinate (x + 0.5, y + 0.5) — pixel centres."""
    ys, xs = np.mgrid[0:SRC, 0:SRC].astype(np.float32)
    return np.stack([xs + 0.5, ys + 0.5], -1)


def _pooled(view: np.ndarray, stride: int) -> torch.Tensor:
    """A 'feature map' of stride ``stride``: the mean pattern value of each cell, (h·w, 2)."""
    t = torch.from_numpy(np.ascontiguousarray(view)).permute(2, 0, 1)[None].double()
    return F.avg_pool2d(t, stride)[0].flatten(1).t()


def _random_views(rng: np.random.Generator, resolution: str, stride: int):
    crop = SmallWindowCrop(rho=float(rng.choice([1.0, 0.5, 0.25])), size=96, resolution=resolution,
                           placement=str(rng.choice(["random", "proximity"])))
    geoms = []
    for box in crop.sample_pair(SRC, SRC, rng):
        side = int(box.w) // stride * stride  # feature cells tile the view exactly
        out = crop.out_size or side
        geoms.append(ViewGeometry(box.x0, box.y0, side, side, out, out, bool(rng.random() < 0.5), int(rng.integers(4))))
    return geoms


@pytest.mark.parametrize("resolution", ["native", "zoom"])
def test_feature_cells_map_to_the_same_source_location_in_both_views(resolution):
    pattern, stride, rng = _pattern(), 8, np.random.default_rng(0)
    checked = 0
    for _ in range(40):
        ga, gb = _random_views(rng, resolution, stride)
        va, vb = render_view(pattern, ga), render_view(pattern, gb)
        fa, fb = _pooled(va, stride), _pooled(vb, stride)
        ha, wa = va.shape[0] // stride, va.shape[1] // stride
        hb, wb = vb.shape[0] // stride, vb.shape[1] // stride
        ta, tb = torch.tensor(ga.to_array())[None], torch.tensor(gb.to_array())[None]
        # view A: every cell's content is the source point the geometry says it is
        src_a = view_to_source(cell_centres(ta, (ha, wa)), ta)[0]
        assert torch.allclose(src_a, fa, atol=0.6)
        idx_a, idx_b, valid = correspondence(ta, tb, (ha, wa), (hb, wb))
        # view B: the matched cell sees the same source point (within half a B cell, in source px)
        half_b = 0.5 * stride * gb.w / gb.out_w + 0.6
        v = valid[0]
        diff = (fb[idx_b[0, v]] - fa[idx_a[0, v]]).abs()
        assert bool((diff <= half_b).all()), (ga, gb, float(diff.max()))
        # validity = the A cell's source point lies inside B's box (away from the border by 1 px)
        inside = (src_a[:, 0] > gb.x0 + 1) & (src_a[:, 0] < gb.x0 + gb.w - 1) & (src_a[:, 1] > gb.y0 + 1) & (src_a[:, 1] < gb.y0 + gb.h - 1)
        outside = (src_a[:, 0] < gb.x0 - 1) | (src_a[:, 0] > gb.x0 + gb.w + 1) | (src_a[:, 1] < gb.y0 - 1) | (src_a[:, 1] > gb.y0 + gb.h + 1)
        assert bool(v[inside].all()) and not bool(v[outside].any())
        checked += int(v.sum())
    assert checked > 500


def test_correspondence_known_cases_and_batching():
    g = ViewGeometry(16, 8, 64, 64, 32, 32, False, 0)
    t = torch.tensor(np.stack([g.to_array()] * 3))
    idx_a, idx_b, valid = correspondence(t, t, (4, 4), (4, 4))
    assert bool(valid.all()) and torch.equal(idx_a, idx_b)
    flipped = torch.tensor(ViewGeometry(16, 8, 64, 64, 32, 32, True, 0).to_array())[None]
    _, idx_b, _ = correspondence(t[:1], flipped, (4, 4), (4, 4))
    assert torch.equal(idx_b[0] % 4, 3 - idx_a[0] % 4) and torch.equal(idx_b[0] // 4, idx_a[0] // 4)
    rot = torch.tensor(ViewGeometry(16, 8, 64, 64, 32, 32, False, 1).to_array())[None]  # 90° CCW
    _, idx_b, _ = correspondence(t[:1], rot, (4, 4), (4, 4))
    r, c = idx_a[0] // 4, idx_a[0] % 4
    assert torch.equal(idx_b[0], (3 - c) * 4 + r)
    far = torch.tensor(ViewGeometry(100, 100, 20, 20, 20, 20).to_array())[None]
    assert not bool(correspondence(t[:1], far, (4, 4), (4, 4))[2].any())
    pts = torch.rand(2, 10, 2, dtype=torch.float64) * 32
    geo = torch.tensor(np.stack([ViewGeometry(5, 7, 40, 30, 32, 24, True, k).to_array() for k in (1, 3)]))
    assert torch.allclose(source_to_view(view_to_source(pts, geo), geo), pts)


def test_pixel_info_nce_values():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(32, 16), dim=1)
    aligned = pixel_info_nce(z, z.clone(), temperature=0.1)
    random = pixel_info_nce(z, F.normalize(torch.randn(32, 16), dim=1), temperature=0.1)
    assert aligned < 0.5 < random
    same = torch.ones(8, 4)  # all embeddings equal: chance level log(2N - 1)
    assert float(pixel_info_nce(same, same, 0.2)) == pytest.approx(math.log(15), rel=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        pixel_info_nce(z[:1], z[:1])
    with pytest.raises(ValueError, match="equal shape"):
        pixel_info_nce(z, z[:, :8])


class TinyNet(nn.Module):
    """Stride-4 conv net with a timm-like ``forward_features``."""

    num_features = 32

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1))

    def forward_features(self, x):
        return self.body(x)


def _textured_batch(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    imgs = []
    for _ in range(n):
        noise = rng.random((SRC // 8, SRC // 8, 3)).astype(np.float32)
        img = np.kron(noise, np.ones((8, 8, 1), np.float32))  # blocky texture: locally distinctive
        imgs.append((img * 255).astype(np.uint8))
    return imgs


def _views(imgs, rng, out=32):
    crop = SmallWindowCrop(rho=0.5, size=96, resolution="zoom", placement="proximity")
    crop.size = out * 2
    views, geoms = ([], []), ([], [])
    for img in imgs:
        for k, box in enumerate(crop.sample_pair(SRC, SRC, rng)):
            g = ViewGeometry(box.x0, box.y0, box.w, box.h, out, out, bool(rng.random() < 0.5), int(rng.integers(4)))
            v = render_view(img, g).astype(np.float32) / 255.0
            views[k].append(torch.from_numpy((v - 0.45) / 0.25).permute(2, 0, 1))
            geoms[k].append(torch.from_numpy(g.to_array()))
    return [torch.stack(v) for v in views], [torch.stack(g) for g in geoms]


def test_dense_loss_decreases_when_training_a_tiny_model():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    (xa, xb), (ga, gb) = _views(_textured_batch(rng, 4), rng)
    net = TinyNet()
    branch = DenseBranch(32, DenseConfig(enabled=True, n_anchors=24, temperature=0.2, hidden_dim=64, out_dim=32))
    opt = torch.optim.Adam(list(net.parameters()) + list(branch.parameters()), lr=3e-3)
    losses = []
    for _ in range(25):
        out = branch.loss(feature_map(net, xa), feature_map(net, xb), ga, gb)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss_dense"]))
        assert float(out["dense_pairs"]) > 40
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])


def _ramp_entropy(n: int, side: int) -> torch.Tensor:
    """(n, side, side) entropy maps rising from left to right (stand-in for batch['entropy'])."""
    return torch.linspace(0.5, 6.0, side).expand(n, side, side).clone()


@pytest.mark.parametrize(
    "sampler,mode", [("uniform", "spatial"), ("arco_sg", "virtual"), ("arco_sg", "spatial"), ("arco_sag", "virtual"), ("arco_sag", "spatial"), ("igu", "spatial")]
)
def test_every_anchor_sampler_yields_valid_pairs(sampler, mode):
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    (xa, xb), (ga, gb) = _views(_textured_batch(rng, 2), rng)
    cfg = DenseConfig(enabled=True, sampler=sampler, arco_mode=mode, n_anchors=16, weight=0.5, hidden_dim=32, out_dim=16)
    branch = DenseBranch(32, cfg)
    net = TinyNet()
    fa, fb = feature_map(net, xa), feature_map(net, xb)
    entropy = _ramp_entropy(2, xa.shape[-1])
    out = branch.loss(fa, fb, ga, gb, entropy_a=entropy)
    assert 2 <= float(out["dense_pairs"]) <= 32
    assert float(out["loss"].detach()) == pytest.approx(0.5 * float(out["loss_dense"]))
    out["loss"].backward()
    assert net.body[0].weight.grad is not None
    _, idx_b, valid = correspondence(ga, gb, fa.shape[-2:], fb.shape[-2:])
    img, a, b = branch.pairs(ga, gb, tuple(fa.shape[-2:]), tuple(fb.shape[-2:]), entropy)
    assert bool(valid[img, a].all()) and torch.equal(idx_b[img, a], b)
    for i in range(2):  # distinct anchors, distinct B cells, exactly min(n_anchors, #B cells seen) of them
        seen = idx_b[i, valid[i]].unique().numel()
        assert a[img == i].unique().numel() == b[img == i].unique().numel() == (img == i).sum() == min(16, seen)


def test_igu_without_entropy_is_a_clear_error_and_disjoint_views_give_zero():
    net = TinyNet()
    x = torch.randn(1, 3, 32, 32)
    g = torch.tensor(ViewGeometry(0, 0, 32, 32, 32, 32).to_array())[None]
    with pytest.raises(ValueError, match=r"entropy map .*batch\['entropy'\].*build_sample_transform"):
        DenseBranch(32, DenseConfig(sampler="igu")).loss(feature_map(net, x), feature_map(net, x), g, g)
    far = torch.tensor(ViewGeometry(90, 90, 32, 32, 32, 32).to_array())[None]
    out = DenseBranch(32, DenseConfig()).loss(feature_map(net, x), feature_map(net, x), g, far)
    assert float(out["loss"].detach()) == 0.0 and float(out["dense_pairs"]) == 0
    out["loss"].backward()  # still connected to the graph (DDP) with an exact zero
    with pytest.raises(ValueError, match="n_anchors"):
        DenseConfig(n_anchors=1)


# -- one anchor per B cell; pair ids never negatives of each other -------------------------------------
def brute_force_pixel_nce(za: torch.Tensor, zb: torch.Tensor, ids: list, temperature: float) -> float:
    """Symmetric InfoNCE by explicit loops: row r of [za; zb] has its partner as positive and as
    negatives every other row whose pair id differs from r's."""
    z = [v / v.norm() for v in torch.cat([za, zb]).double()]
    n = za.shape[0]
    total = 0.0
    for r in range(2 * n):
        pos = r + n if r < n else r - n
        num = math.exp(float(z[r] @ z[pos]) / temperature)
        den = num + sum(math.exp(float(z[r] @ z[s]) / temperature) for s in range(2 * n)
                        if s not in (r, pos) and ids[s % n] != ids[r % n])
        total -= math.log(num / den)
    return total / (2 * n)


def test_pixel_info_nce_pair_ids_mask_shared_cells_and_default_is_unchanged():
    torch.manual_seed(3)
    za, zb = torch.randn(9, 6), torch.randn(9, 6)
    zb[4] = zb[1]  # two anchors see the same B cell: identical B rows
    ids = [0, 1, 2, 3, 1, 4, 5, 6, 7]
    got = float(pixel_info_nce(za, zb, 0.2, ids=torch.tensor(ids)))
    assert got == pytest.approx(brute_force_pixel_nce(za, zb, ids, 0.2), rel=1e-5)
    plain = float(pixel_info_nce(za, zb, 0.2))
    assert plain == pytest.approx(brute_force_pixel_nce(za, zb, list(range(9)), 0.2), rel=1e-5)
    assert plain == pytest.approx(float(pixel_info_nce(za, zb, 0.2, ids=torch.arange(9))), rel=1e-6)
    with pytest.raises(ValueError, match="ids"):
        pixel_info_nce(za, zb, ids=torch.arange(4))


def _expected_anchors(ga: ViewGeometry, gb: ViewGeometry, cells: int) -> dict[int, int]:
    """Brute force for axis-aligned views (B may be flipped): {B cell: A cell} keeping, per B cell,
    the A cell whose source point is nearest that B cell's centre (ties: lowest A index)."""
    best: dict[int, tuple[float, int]] = {}
    sa, sb = ga.w / cells, gb.w / cells  # source px per feature cell
    for r in range(cells):
        for c in range(cells):
            x, y = ga.x0 + (c + 0.5) * sa, ga.y0 + (r + 0.5) * sa
            cb, rb = math.floor((x - gb.x0) / sb), math.floor((y - gb.y0) / sb)
            if not (0 <= cb < cells and 0 <= rb < cells):
                continue
            d = (x - (gb.x0 + (cb + 0.5) * sb)) ** 2 + (y - (gb.y0 + (rb + 0.5) * sb)) ** 2
            key = rb * cells + (cells - 1 - cb if gb.hflip else cb)
            if key not in best or d < best[key][0]:
                best[key] = (d, r * cells + c)
    return {k: v for k, (_, v) in best.items()}


@pytest.mark.parametrize("sampler", ["uniform", "arco_sg", "arco_sag", "igu"])
def test_zoomed_out_view_b_keeps_one_anchor_per_b_cell_and_the_loss_matches_brute_force(sampler):
    torch.manual_seed(0)
    # A: a 64-px window; B: the whole 128-px patch at the same output size (zoomed out 2x), so every
    # B cell of the overlap sees 4 A cells. 8 x 8 feature maps on both.
    ga = [ViewGeometry(30, 27, 64, 64, 64, 64), ViewGeometry(11, 50, 64, 64, 64, 64)]
    gb = [ViewGeometry(0, 0, 128, 128, 64, 64, True), ViewGeometry(3, 5, 120, 120, 64, 64)]
    ta = torch.tensor(np.stack([g.to_array() for g in ga]))
    tb = torch.tensor(np.stack([g.to_array() for g in gb]))
    fa, fb = torch.randn(2, 16, 8, 8, requires_grad=True), torch.randn(2, 16, 8, 8, requires_grad=True)
    cfg = DenseConfig(enabled=True, sampler=sampler, n_anchors=64, hidden_dim=32, out_dim=8, temperature=0.2)
    branch = DenseBranch(16, cfg)
    img, a, b = branch.pairs(ta, tb, (8, 8), (8, 8), _ramp_entropy(2, 64))
    _, idx_b, valid = correspondence(ta, tb, (8, 8), (8, 8))
    for i in range(2):
        expected = _expected_anchors(ga[i], gb[i], 8)
        assert int(valid[i].sum()) >= 2 * len(expected) >= 2 * 16  # 2-4 A cells share each B cell
        assert dict(zip(b[img == i].tolist(), a[img == i].tolist())) == expected
    # no anchor's negatives include its own positive cell: every (image, B cell) is used once
    assert torch.unique(img * 64 + b).numel() == img.numel()
    out = branch.loss(fa, fb, ta, tb, entropy_a=_ramp_entropy(2, 64))
    za, zb = branch.head(fa).flatten(2), branch.head(fb).flatten(2)
    rows_a = torch.stack([za[i, :, j] for i, j in zip(img.tolist(), a.tolist())])
    rows_b = torch.stack([zb[i, :, j] for i, j in zip(img.tolist(), b.tolist())])
    ids = [(i, j) for i, j in zip(img.tolist(), b.tolist())]
    assert float(out["loss_dense"]) == pytest.approx(brute_force_pixel_nce(rows_a.detach(), rows_b.detach(), ids, 0.2), rel=1e-5)
    assert float(out["dense_pairs"]) == img.numel()


def test_feature_map_of_timm_cnn_and_vit():
    from sgcl.models.backbone import create_backbone

    cnn = create_backbone("resnet18")
    assert feature_map(cnn, torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)
    vit = create_backbone("vit_tiny_patch16_224", img_size=64)
    assert feature_map(vit, torch.randn(1, 3, 64, 64)).shape == (1, 192, 4, 4)

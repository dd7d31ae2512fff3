"""Training health: representation spread against brute force, collapse verdicts, and the
trainer logging them (``sgcl/train/health.py``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sgcl.train.health import RecentRows, hard_negative_note, representation_spread, verdict

torch.set_num_threads(1)


def test_spread_matches_brute_force_and_separates_spread_from_collapse():
    gen = torch.Generator().manual_seed(0)
    spread_rows = torch.randn(600, 32, generator=gen)
    s = representation_spread(spread_rows)
    x = F.normalize(spread_rows, dim=1).double()
    pairs = [float(x[i] @ x[j]) for i in range(0, 600, 7) for j in range(600) if i != j]
    g = x @ x.t()
    assert s["mean_cos"] == pytest.approx(float((g.sum() - 600) / (600 * 599)), abs=1e-6)
    assert abs(s["mean_cos"]) < 0.02 and abs(np.mean(pairs)) < 0.02
    assert s["dim_std"] == pytest.approx(1.0, abs=0.05)
    lam = torch.linalg.svdvals(x - x.mean(0)) ** 2
    p = lam / lam.sum()
    assert s["eff_rank"] == pytest.approx(math.exp(-float((p * p.log()).sum())), rel=1e-4)
    assert s["eff_rank"] > 28 and verdict(s) is None

    # every row near one direction: collapse
    centre = torch.randn(32, generator=gen)
    collapsed = representation_spread(centre + 0.05 * torch.randn(600, 32, generator=gen))
    assert collapsed["mean_cos"] > 0.95 and collapsed["dim_std"] < 0.3
    assert verdict(collapsed).startswith("collapsed")

    # spread over only two directions: dimensional collapse with a low mean cosine
    basis = torch.randn(2, 32, generator=gen)
    flat = representation_spread(torch.randn(600, 2, generator=gen) @ basis)
    assert flat["mean_cos"] < 0.5 and flat["eff_rank"] < 2.05
    assert verdict(flat).startswith("dimensional collapse")

    with pytest.raises(ValueError, match="at least 2"):
        representation_spread(torch.randn(1, 4))


def test_hard_negative_note_tells_near_duplicate_negatives_from_collapse():
    assert "not collapse" in hard_negative_note(0.96, 0.95, 0.3)
    assert hard_negative_note(0.96, 0.95, 0.95) is None   # that one is collapse (verdict says so)
    assert hard_negative_note(0.6, 0.2, 0.1) is None


def test_recent_rows_is_a_ring_buffer():
    r = RecentRows(capacity=5)
    r.add("x", torch.arange(3).unsqueeze(1))
    assert r.get("x").flatten().tolist() == [0, 1, 2]
    r.add("x", torch.arange(3, 7).unsqueeze(1))
    assert sorted(r.get("x").flatten().tolist()) == [2, 3, 4, 5, 6]
    big = torch.tensor([[30_000_001]])  # integer rows keep their dtype (patch indices beyond float32's 2^24)
    r.add("x", big)
    assert 30_000_001 in r.get("x").flatten().tolist()
    assert r.get("missing") is None


def test_trainer_logs_health_and_writes_health_json(tmp_path):
    from conftest import REPO, shared_path
    from preprocessing.config import TileConfig
    from preprocessing.slide_tiler import tile_slide
    from sgcl.config import load_config
    from sgcl.train.config import PretrainConfig
    from sgcl.train.trainer import Trainer

    cfg_t = TileConfig()
    cfg_t.patch.target_mpp, cfg_t.patch.patch_size = 1.0, 64
    tile_slide(shared_path("wsi", "cmu-1-small-region.svs"), tmp_path / "cmu1.h5", cfg_t)
    for name in ("sgcl", "moco_v2"):
        out = tmp_path / name
        cfg = load_config(PretrainConfig, REPO / "configs" / "pretrain" / "tiny_cpu.yaml", [
            f"data.files=[{tmp_path / 'cmu1.h5'}]", f"train.out_dir={out}", "train.progress=false", f"method.name={name}",
            "data.batch_size=16", "train.max_steps=3", "train.health_every=2", "train.log_every=100", "train.export=false"])
        Trainer(cfg).fit()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        logged = {r["step"]: r for r in rows}
        assert set(logged) == {1, 2, 3}                      # health steps (2, and the last) are logged
        bank = "bank" if name == "sgcl" else "queue"
        for key in (f"health/{bank}_mean_cos", f"health/{bank}_eff_rank", "health/backbone_dim_std"):
            assert key in logged[2] and math.isfinite(logged[2][key]), key
        health = json.loads((out / "health.json").read_text())
        assert health["step"] == 3 and {bank, "embedding", "backbone"} <= set(health["rows"])
        assert health["rows"]["backbone"]["n"] >= 32

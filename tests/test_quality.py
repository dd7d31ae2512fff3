"""``benchmarks/quality.py --quick`` end to end: real tiles, pretraining, every evaluation, the
seed-mean bootstrap and its paired differences (a pipeline check; the figures are in docs/quality.md)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import REPO, shared_path

sys.path.insert(0, str(REPO / "benchmarks"))


def test_seed_mean_bootstrap_resamples_whole_units_for_every_seed():
    from quality import seed_mean_bootstrap

    y = np.array([0, 0, 1, 1, 0, 1])
    units = np.array(["a", "a", "b", "b", "c", "c"])
    perfect, wrong = y.copy(), 1 - y
    rng = np.random.default_rng(0)
    reps = seed_mean_bootstrap(y, [perfect, perfect], units, 2, 50, rng)
    assert np.allclose(reps, 1.0)
    reps = seed_mean_bootstrap(y, [perfect, wrong], units, 2, 50, rng)  # seed mean of 1 and 0
    assert np.allclose(reps, 0.5)
    draws = np.array([[0, 0, 0]])  # unit "a" three times: only class 0, right in seed 1 only
    assert seed_mean_bootstrap(y, [perfect, wrong], units, 2, 1, rng, draws)[0] == pytest.approx(0.5)


def test_quick_benchmark_end_to_end(tmp_path):
    shared_path("patches", "crc-val-he-7k-sample")
    shared_path("seg", "nuinsseg-human-spleen")
    from quality import main

    out = tmp_path / "q"
    assert main(["--quick", "--out", str(out), "--parallel", "1"]) == 0
    result = json.loads((out / "quality.json").read_text())
    rows = result["aggregate"]["rows"]
    assert set(rows) == {"random_init", "sgcl"} and result["quick"]
    for metric in ("mean/knn", "mean/linear", "crc7k/knn", "kather2016/linear", "osteosarcoma/knn",
                   "nuinsseg_dice/0.1", "nuinsseg_dice/1"):
        s = rows["sgcl"][metric]
        assert 0.0 <= s["low"] <= s["high"] <= 1.0 and len(s["seeds"]) == 1, metric
    diff = result["aggregate"]["differences"]["sgcl - random_init"]["mean/knn"]
    assert diff["value"] == pytest.approx(rows["sgcl"]["mean/knn"]["mean"] - rows["random_init"]["mean/knn"]["mean"])
    health = result["pretraining"]["sgcl_s0"]["health"]
    assert {"bank", "backbone"} <= set(health)
    for name in ("quality.csv", "quality.md", "quality.png"):
        assert (out / name).stat().st_size > 0
    # a second run reuses every pretraining and evaluation (resume)
    before = (out / "eval" / "sgcl_s0.json").stat().st_mtime
    assert main(["--quick", "--out", str(out), "--parallel", "1"]) == 0
    assert (out / "eval" / "sgcl_s0.json").stat().st_mtime == before


def test_difference_pairs_cover_references_and_sgcl_variants():
    from quality import difference_pairs

    pairs = difference_pairs(["random_init", "moco_v2", "sgcl", "sgcl_no_intra", "sgcl_scale_rho4"])
    assert ("moco_v2", "random_init") in pairs and ("random_init", "moco_v2") not in pairs
    assert {("sgcl_no_intra", "sgcl"), ("sgcl_scale_rho4", "sgcl"), ("sgcl", "moco_v2")} <= set(pairs)
    assert not any(ref == "sgcl" and r in ("moco_v2", "random_init", "sgcl") for r, ref in pairs)
    assert difference_pairs(["moco_v2", "sgcl_no_intra"]) == [("sgcl_no_intra", "moco_v2")]

"""End-to-end smoke test of the reproduction study (benchmarks/study.py --quick) on the real shared data."""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import numpy as np
import pytest

from tests.conftest import REPO, shared_path


def _load_study():
    spec = importlib.util.spec_from_file_location("study", REPO / "benchmarks" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_group_bootstrap_resamples_whole_groups():
    study = _load_study()
    groups = np.repeat(np.arange(6), 5)
    assert study.group_bootstrap_accuracy(np.ones(30, bool), groups, 200, 0) == (1.0, 1.0)
    # groups 0-2 all right, 3-5 all wrong: accuracy 0.5, and the CI must be wide (6 independent units, not 30)
    correct = groups < 3
    lo, hi = study.group_bootstrap_accuracy(correct, groups, 2000, 0)
    assert lo <= 0.5 <= hi and hi - lo > 0.5


@pytest.mark.timeout(120)
def test_quick_study_end_to_end(tmp_path):
    for part in (("wsi", "cmu-1-small-region.svs"), ("wsi", "tcga-cr-7395-01a-01-ts1.svs"),
                 ("patches", "nct-crc-he-samples"), ("images",)):
        shared_path(*part)
    study = _load_study()
    real = list(study.ENCODERS)
    # one broken setting must be reported, not stop the others (exit code 1, the rest written)
    study.ENCODERS["broken"] = ["method.name=no_such_method"]
    out = tmp_path / "study"
    assert study.main(["--quick", "--threads", "1", "--out", str(out), "--encoders", ",".join([*real[:2], "broken", *real[2:]])]) == 1

    result = json.loads((out / "study.json").read_text())
    assert list(result["failed"]) == ["broken"] and "no_such_method" in result["failed"]["broken"]
    assert "| broken | FAILED" in (out / "study.md").read_text()
    del study.ENCODERS["broken"]
    rows = result["encoders"]
    assert sorted(rows) == sorted(study.ENCODERS)  # every encoder of the study
    for name, row in rows.items():
        for metric in study.METRICS:
            m = row["metrics"][metric]
            assert all(math.isfinite(m[key]) for key in ("value", "low", "high")), (name, metric, m)
            assert 0.0 <= m["low"] <= m["high"] <= 1.0 and 0.0 <= m["value"] <= 1.0, (name, metric, m)
    # the TCGA slide has no mpp: the value used and the reason are in the output
    assert result["data"]["tcga_assumed_mpp"] == 1.0 and "no mpp" in result["data"]["tcga_mpp_reason"]
    assert set(result["data"]["patches_per_slide"]) == {"cmu-1-small-region", "tcga-cr-7395-01a-01-ts1"}
    assert result["data"]["nct_crops"] == 9 * 4 * study.QUICK["crops"]

    # random init is not trained: different weights, and different metrics, from every trained row
    ref = rows["random_init"]
    assert ref["pretrain_s"] == 0.0
    for name, row in rows.items():
        if name == "random_init":
            continue
        assert row["weights_sha256"] != ref["weights_sha256"], name
        assert row["encoder"].endswith("export"), row["encoder"]
        assert row["pretrain_s"] > 0, name  # the trainer's logged time (kept when a run is reused)
        assert any(row["metrics"][m]["value"] != ref["metrics"][m]["value"] for m in study.METRICS), name

    with open(out / "study.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["encoder"] for r in table] == list(study.ENCODERS)
    assert all(r[f"{m}_ci_low"] and r[f"{m}_ci_high"] for r in table for m in study.METRICS)
    assert (out / "study.png").stat().st_size > 10_000
    md = (out / "study.md").read_text()
    assert all(f"| {name} |" in md for name in study.ENCODERS)

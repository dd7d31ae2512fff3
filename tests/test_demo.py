"""`sgcl demo` end to end on the shipped demo slide, with a tiny budget (the real demo trains longer)."""

from __future__ import annotations

import json

import h5py
import torch

from sgcl.demo import DemoConfig, run_demo


def test_demo_pipeline_on_shipped_slide(tmp_path, demo_slide):
    torch.set_num_threads(1)
    cfg = DemoConfig(slide=str(demo_slide), out_dir=str(tmp_path / "demo"), pretrain_config="configs/pretrain/tiny_cpu.yaml",
                     methods=["sgcl"], epochs=1, patch_size=128)
    results = run_demo(cfg, log=lambda *_: None)
    out = tmp_path / "demo"
    # every stage left its product
    assert (out / "tiles" / "index.html").is_file() and (out / "tiles" / "manifest.csv").is_file()
    assert (out / "pretrain" / "sgcl" / "export" / "backbone.safetensors").is_file()
    for name in ("random_init", "sgcl"):
        with h5py.File(out / "features" / name / "h5_files" / "CMU-1-Small-Region.h5", "r") as f:
            assert f["features"].shape[0] == results["n_patches"] > 50
        assert torch.load(out / "features" / name / "pt_files" / "CMU-1-Small-Region.pt", weights_only=True).shape[0] == results["n_patches"]
    # label-free evaluation with CIs for both encoders, and the report links what it shows
    saved = json.loads((out / "results.json").read_text())
    for name in ("random_init", "sgcl"):
        r = saved["encoders"][name]
        assert 0 <= r["precision_ci95"][0] <= r["precision"] <= r["precision_ci95"][1] <= 1
        assert 0 < r["chance"] < r["precision"] + 0.5
    assert saved["encoders"]["sgcl"]["precision"] != saved["encoders"]["random_init"]["precision"]
    page = (out / "report.html").read_text()
    for link in ("tiles/index.html", "training_curves.png", "spatial_retrieval.png", "feature_maps.png"):
        assert link in page and (out / link).is_file()
    # the report ends with a heatmap of the slide, its score named, its files linked
    heat = saved["heatmap"]
    assert heat["score"] == ("spatial_retrieval" if "skipped" in saved["labelled"] else "p_tumour")
    for key in ("heatmap", "gallery", "topk_geojson", "scores_h5"):
        assert heat[key] in page and (out / heat[key]).is_file()
    assert page.rindex("<h2>") == page.index("<h2>Heatmap</h2>")
    with h5py.File(out / heat["scores_h5"], "r") as f:
        s = f[f"scores/{heat['score']}"][:]
        assert len(s) == results["n_patches"] and 0 <= float(s[s == s].min()) <= float(s[s == s].max()) <= 1
    # the labelled check: every encoder scored on the shared labelled set (or a stated skip without it)
    lab = saved["labelled"]
    if "skipped" in lab:
        assert "Skipped" in page
    else:
        assert "labelled_check.png" in page and (out / "labelled_check.png").is_file()
        for name in ("random_init", "sgcl"):
            knn = lab[name]["knn"]
            assert 0 <= knn["low"] <= knn["value"] <= knn["high"] <= 1
        assert lab["items"] == 70 and len(lab["classes"]) == 7

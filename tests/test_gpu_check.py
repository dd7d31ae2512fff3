"""benchmarks/gpu_check.py --device cpu --quick: every step of the prepared GPU check runs on the CPU
(tiny sizes, gloo instead of NCCL, faiss-cpu), the JSON holds every section with sane numbers, and a
failing step is recorded as failed while the others still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "benchmarks" / "gpu_check.py"
SECTIONS = ["data", "loader", "model", "e2e_moco", "e2e_sgcl", "ddp", "extract", "knn"]


def source_file(folder: Path) -> Path:
    """12 small H&E-coloured patches on a 4 x 3 grid (the driver repeats them into its data)."""
    from preprocessing.h5format import write_patch_file

    rng = np.random.default_rng(0)
    base = np.array([200, 120, 170], dtype=np.float32)
    imgs = np.clip(base + rng.normal(0, 30, (12, 64, 64, 3)), 0, 255).astype(np.uint8)
    grid = np.stack(np.meshgrid(np.arange(4), np.arange(3), indexing="xy"), -1).reshape(-1, 2)
    return write_patch_file(folder / "src.h5", imgs, grid * 64, grid, codec="jpeg")


def run_driver(tmp: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(DRIVER), "--device", "cpu", "--quick", "--out", str(out), "--work", str(tmp / "work"),
           "--source", str(source_file(tmp)), "--budget-s", "540", *extra]  # a loaded 2-core machine
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    files = list(out.glob("gpu_check_*_quick.json"))
    assert len(files) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert files[0].with_suffix(".md").is_file()
    return proc, json.loads(files[0].read_text())


@pytest.mark.timeout(600)
def test_quick_run_records_every_section(tmp_path):
    proc, rep = run_driver(tmp_path)
    steps = rep["steps"]
    assert list(steps) == SECTIONS
    bad = {k: (v["status"], v.get("error"), v.get("log_tail", "")[-800:]) for k, v in steps.items() if v["status"] != "ok"}
    assert not bad, bad
    assert proc.returncode == 0
    for rec in steps.values():
        assert 0 < rec["wall_s"] <= rec["timeout_s"] + 5
    assert steps["data"]["patches"] == rep["settings"]["patches"] and steps["data"]["source_origin"] == "bundled"
    for key in ("sgcl_patches_per_s", "moco_v2_patches_per_s"):
        assert steps["loader"][key] > 0
    assert steps["model"]["sgcl_img_per_s"] > 0 and steps["model"]["moco_v2_img_per_s"] > 0
    for m in ("e2e_moco", "e2e_sgcl"):
        assert steps[m]["img_per_s"] > 0 and np.isfinite(steps[m]["last_loss"])
        assert steps[m]["steps_timed"][1] > steps[m]["steps_timed"][0]
    ddp = steps["ddp"]
    assert ddp["torchrun_pretrain"]["steps"] == rep["settings"]["ddp_steps"]
    w = ddp["ddp_method_step"]
    assert w["backend"] == "gloo" and w["world_size"] == 1 and w["allreduce_ok"] and w["losses_finite"]
    assert steps["extract"]["extract_patches_per_s"] > 0 and steps["extract"]["forward_only_patches_per_s"] > 0
    knn = steps["knn"]
    assert knn["faiss_gpu"] == "faiss-gpu not available" and knn["faiss_cpu_s"] > 0
    assert knn["torch_overlap_with_faiss_cpu"] > 0.99
    v = rep["verdict"]
    for m in ("moco_v2", "sgcl"):
        assert v[m]["e2e_img_per_s"] > 0 and v[m]["limit"].split(" ")[0] in {"gpu", "loader", "neither"}
    assert v["target"]["applies"] is False and v["target"]["sgcl_img_per_s"] == 1500


@pytest.mark.timeout(300)
def test_failed_step_is_recorded_and_the_others_run(tmp_path):
    proc, rep = run_driver(tmp_path, "--steps", "data,loader,knn,model", "--fail", "data,model")
    steps = rep["steps"]
    assert steps["data"]["status"] == "failed" and "injected failure" in steps["data"]["error"]
    assert steps["model"]["status"] == "failed" and "injected failure" in steps["model"]["error"]
    assert steps["loader"]["status"] == "skipped"  # needs the data
    assert steps["knn"]["status"] == "ok" and steps["knn"]["faiss_cpu_s"] > 0
    assert proc.returncode == 1
    assert "failed" in (tmp_path / "out" / f"gpu_check_{rep['date']}_quick.md").read_text()


@pytest.mark.timeout(120)
def test_hung_step_times_out_and_is_recorded(tmp_path):
    proc, rep = run_driver(tmp_path, "--steps", "data,loader", "--hang", "data", "--cap-s", "6")
    data = rep["steps"]["data"]
    assert data["status"] == "timeout" and data["timeout_s"] == 6 and data["wall_s"] < 30
    assert rep["steps"]["loader"]["status"] == "skipped"
    assert proc.returncode == 1

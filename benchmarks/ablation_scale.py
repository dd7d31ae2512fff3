"""Which crop setting / anchor sampler helps a small-structure task? Brief pretraining per setting,
then segmentation fine-tuning on the derived-label nuclei task; a table of test Dice per setting.

    python benchmarks/ablation_scale.py --out runs/ablation_scale                 # CPU-sized defaults
    python benchmarks/ablation_scale.py --steps 2000 --backbone resnet18 --size 224 --seg-epochs 50 --device cuda
    python benchmarks/ablation_scale.py --settings baseline,scale_rho4_zoom,dense_arco_sag

Every setting pretrains the same backbone from the same seed on the same tiles (the demo slide,
or ``--h5-dir``) for ``--steps`` optimiser steps through ``sgcl pretrain`` (MoCo v2 by default,
``--method``). ``sgcl eval seg`` then fine-tunes each export on the nuclei task (built once with
``sgcl eval seg build-nuclei``) at ``--label-fraction``. A random-init encoder is the reference row.
Results: ``<out>/ablation.json``, ``ablation.csv`` and a markdown table on stdout. Runs already
done (their ``results.json`` exists) are reused, so an interrupted ablation resumes.

Brief pretraining on one slide measures the *pipeline*, not the method. Read small Dice
differences as noise unless ``--steps`` is in the thousands and several ``--seeds`` agree.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEG_CLI = [sys.executable, "-m", "evaluation.segmentation.cli"]  # = `sgcl eval seg` (callable without evaluation.cli)

#: setting name -> pretraining overrides on top of the common ones
SETTINGS: dict[str, list[str]] = {
    "baseline": ["aug.crop=rrc"],
    "scale_rho2_zoom": ["aug.crop=small_window", "aug.small_window.rho=0.5", "aug.small_window.resolution=zoom"],
    "scale_rho4_zoom": ["aug.crop=small_window", "aug.small_window.rho=0.25", "aug.small_window.resolution=zoom"],
    "scale_rho8_zoom": ["aug.crop=small_window", "aug.small_window.rho=0.125", "aug.small_window.resolution=zoom"],
    "scale_rho4_native": ["aug.crop=small_window", "aug.small_window.rho=0.25", "aug.small_window.resolution=native"],
    "scale_rho4_random": ["aug.crop=small_window", "aug.small_window.rho=0.25", "aug.small_window.resolution=zoom",
                          "aug.small_window.placement=random"],
    "dense_uniform": ["method.dense.enabled=true", "method.dense.sampler=uniform"],
    "dense_arco_sg": ["method.dense.enabled=true", "method.dense.sampler=arco_sg"],
    "dense_arco_sag": ["method.dense.enabled=true", "method.dense.sampler=arco_sag"],
    "dense_arco_sg_virtual": ["method.dense.enabled=true", "method.dense.sampler=arco_sg", "method.dense.arco_mode=virtual"],
    "dense_igu": ["method.dense.enabled=true", "method.dense.sampler=igu"],
}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")


def tile_demo(out: Path, patch_size: int) -> Path:
    """Tiles of the demo slide at 0.5 µm/px (reused when present)."""
    h5 = out / "tiles" / "demo.h5"
    if not h5.is_file():
        from preprocessing.config import TileConfig
        from preprocessing.slide_tiler import tile_slide

        cfg = TileConfig()
        cfg.patch.target_mpp, cfg.patch.patch_size = 0.5, patch_size
        h5.parent.mkdir(parents=True, exist_ok=True)
        tile_slide(REPO / "data" / "demo" / "CMU-1-Small-Region.svs", h5, cfg)
    return h5.parent


def pretrain(name: str, args, h5_dir: Path, seed: int) -> Path:
    run = args.out / "pretrain" / f"{name}_s{seed}"
    export = run / "export"
    if (export / "backbone.json").is_file():
        return export
    common = common_overrides(args, h5_dir, run, seed)
    _run([sys.executable, "-m", "sgcl.cli", "pretrain", *common, *SETTINGS[name]], run / "pretrain.log")
    return export


def common_overrides(args, h5_dir: Path, run: Path, seed: int) -> list[str]:
    """Pretraining overrides shared by every setting (same backbone, budget and seed); also used by study.py."""
    return [
        f"data.h5_dir={h5_dir}", f"data.batch_size={args.batch}", f"data.workers={args.workers}", "data.pin_memory=false",
        f"model.backbone={args.backbone}", "model.channels_last=false", f"method.name={args.method}",
        f"aug.global_size={args.size}", f"aug.local_size={max(16, args.size * 96 // 224)}",
        "method.dense.n_anchors=32", f"method.moco.queue_size={args.queue}", "method.sgcl.num_negatives=256",
        "method.sgcl.nei_k=64", "method.sgcl.kmeans_clusters=8", f"train.max_steps={args.steps}", "train.epochs=1000",
        f"train.seed={seed}", f"train.device={args.device}", "train.progress=false", f"train.out_dir={run}",
        f"optim.lr={args.lr}",
    ]


def finetune(name: str, encoder: str, args, task: Path, seed: int) -> dict:
    run = args.out / "seg" / f"{name}_s{seed}"
    res = run / "results.json"
    if not res.is_file():
        cmd = [*SEG_CLI, "--encoder", encoder, "--data", str(task), "--out", str(run),
               "--label-fraction", str(args.label_fraction), "--epochs", str(args.seg_epochs), "--device", args.device,
               "--seed", str(seed), "--quiet", f"train.steps_per_epoch={args.seg_steps}", f"train.patch_size={args.seg_patch}",
               "train.num_workers=0"]
        _run(cmd, run / "seg.log")
    r = json.loads(res.read_text())
    return {"test_mean_dice": r["test"]["mean_dice"], "test_mean_iou": r["test"]["mean_iou"],
            "best_val_mean_dice": r["best_val_mean_dice"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/ablation_scale"))
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {list(SETTINGS)}")
    p.add_argument("--h5-dir", type=Path, default=None, help="pretraining tiles (default: the demo slide, tiled here)")
    p.add_argument("--method", default="moco_v2")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=112, help="L, the global crop side")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--queue", type=int, default=1024)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--steps", type=int, default=40, help="pretraining optimiser steps per setting")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seeds", default="0", help="comma-separated seeds (pretraining and fine-tuning)")
    p.add_argument("--task", type=Path, default=None, help="nuclei task folder (default <out>/nuclei_task, built once)")
    p.add_argument("--label-fraction", type=float, default=0.1)
    p.add_argument("--seg-epochs", type=int, default=3)
    p.add_argument("--seg-steps", type=int, default=20, help="fine-tuning steps per epoch")
    p.add_argument("--seg-patch", type=int, default=96)
    p.add_argument("--no-random-init", action="store_true", help="skip the random-init reference row")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        print(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    sys.path.insert(0, str(REPO))
    h5_dir = args.h5_dir or tile_demo(args.out, 224)
    task = args.task or args.out / "nuclei_task"
    if not (task / "task.json").is_file():
        _run([*SEG_CLI, "build-nuclei", "--out", str(task)], args.out / "build_nuclei.log")
    rows = []
    todo = ([] if args.no_random_init else [("random_init", None)]) + [(n, n) for n in names]
    for label, setting in todo:
        for seed in seeds:
            t0 = time.perf_counter()
            encoder = args.backbone if setting is None else str(pretrain(setting, args, h5_dir, seed))
            t1 = time.perf_counter()
            scores = finetune(label, encoder, args, task, seed)
            row = {"setting": label, "seed": seed, **scores, "pretrain_s": round(t1 - t0, 1),
                   "finetune_s": round(time.perf_counter() - t1, 1)}
            rows.append(row)
            print(f"  {label:<22} seed {seed}  test Dice {scores['test_mean_dice']:.4f}  (val {scores['best_val_mean_dice']:.4f})",
                  flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    with open(args.out / "ablation.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print("\n| setting | seeds | test Dice (mean) | best val Dice (mean) |\n|---|---|---|---|")
    for label, _ in todo:
        mine = [r for r in rows if r["setting"] == label]
        td = sum(r["test_mean_dice"] for r in mine) / len(mine)
        vd = sum(r["best_val_mean_dice"] for r in mine) / len(mine)
        print(f"| {label} | {len(mine)} | {td:.4f} | {vd:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the pretraining method learn what the paper says? Every method at the same budget on real
unlabelled patches, several seeds, scored on real labelled data (issue 9).

    python benchmarks/quality.py --out runs/quality_quick --quick            # pipeline check (CI, ~1 min)
    python benchmarks/quality.py --out runs/quality --budget gpu --steps 200 --device cuda --parallel 5 --eval-parallel 8
    python benchmarks/quality.py --out runs/quality --budget gpu_long --device cuda --parallel 5 --eval-parallel 8
    python benchmarks/quality.py --out runs/quality --budget cpu --no-seg    # ~40 min per SGCL run on 2 CPU cores

Budgets (:data:`BUDGETS`): ``quick`` (CI), ``cpu`` (batch 64, 150 steps), ``gpu`` (batch 128; the
figures of docs/quality.md used ``--steps 200``), ``gpu_long`` (2,000 steps, K ≪ N, the reference
learning rate: the next run docs/quality.md asks for). ``benchmarks/quality_gpu.sh`` runs it on a lent
GPU machine without network or ``../shared``.

1. **Pretraining data** (real, unlabelled, ``../shared/data``): both shared slides, the 60
   osteosarcoma images tiled as small slides, and the other shared H&E images, tiled by the tiling
   stage at ``--mpp`` µm/px into ``--patch-size`` px patches (``--tiles DIR`` reuses a tiled folder).
2. **Pretraining**: every row of :data:`ROWS` (the paper's SGCL and its ablations, the baselines,
   scale-aware windows, the dense branch) × every seed, with the same backbone, views, batch and
   number of optimiser steps; ``--parallel`` runs at once (subprocesses of ``sgcl pretrain``).
   Random init is the same backbone untouched, seeded like the others.
3. **Evaluation** (``benchmarks/quality_eval.py``): kNN and linear-probe balanced accuracy on three
   labelled sets with group-aware folds (tile / source slide / patient), hyper-parameters chosen
   inside the training folds; NuInsSeg nucleus Dice after U-Net fine-tuning with 10 % and 100 % of
   the training images; the spread of the held-out features (mean cosine, effective rank) and the
   end-of-run training health of every pretraining run.
4. **Aggregation**: per row and metric the mean ± std over seeds and a 95 % bootstrap CI of the
   seed mean (groups resampled once per replicate for all seeds); paired differences of every row
   against MoCo v2 and random init, and of every SGCL variant against SGCL, on the same resamples.

Outputs in ``--out``: ``quality.json`` (everything), ``quality.csv`` (one line per row × metric),
``quality.md`` (the tables), ``quality.png`` (error bars). Finished pretraining runs and evaluations
are reused, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SHARED = REPO.parent / "shared" / "data"

_SGCL = ["method.name=sgcl"]
_SCALE = ["aug.crop=small_window", "aug.small_window.rho=0.25", "aug.small_window.resolution=zoom",
          "aug.small_window.placement=proximity"]
_DENSE = ["method.dense.enabled=true"]

#: row name -> pretraining overrides on top of the common budget (None: random init, not trained)
ROWS: dict[str, list[str] | None] = {
    "random_init": None,
    "moco_v2": ["method.name=moco_v2"],
    "simclr": ["method.name=simclr"],
    "sgcl": _SGCL,
    "sgcl_no_self": [*_SGCL, "method.sgcl.self_term=false"],
    "sgcl_no_intra": [*_SGCL, "method.sgcl.intra_term=false"],
    "sgcl_no_inter": [*_SGCL, "method.sgcl.inter_term=false"],
    "sgcl_no_inner": [*_SGCL, "method.sgcl.inner_term=false"],
    "sgcl_queue": [*_SGCL, "method.sgcl.bank=queue"],
    "sgcl_clean": [*_SGCL, "method.sgcl.denominator=clean"],
    # investigation rows (docs/quality.md, "Why does SGCL's projection collapse?")
    "sgcl_npid_only": [*_SGCL, "method.sgcl.intra_term=false", "method.sgcl.inter_term=false", "method.sgcl.inner_term=false"],
    "sgcl_queue_no_inter": [*_SGCL, "method.sgcl.bank=queue", "method.sgcl.inter_term=false"],
    "sgcl_npid_only_k400": [*_SGCL, "method.sgcl.intra_term=false", "method.sgcl.inter_term=false",
                            "method.sgcl.inner_term=false", "method.sgcl.num_negatives=400"],
    "sgcl_k400": [*_SGCL, "method.sgcl.num_negatives=400"],
    "sgcl_scale_rho4": [*_SGCL, *_SCALE],
    "sgcl_dense_uniform": [*_SGCL, *_DENSE, "method.dense.sampler=uniform"],
    "sgcl_dense_arco_sag": [*_SGCL, *_DENSE, "method.dense.sampler=arco_sag"],
    "sgcl_dense_igu": [*_SGCL, *_DENSE, "method.dense.sampler=igu"],
}
REFERENCES = ("moco_v2", "random_init")
VARIANT_REFERENCE = "sgcl"  # every SGCL variant (ablation, scale, dense, queue) is also paired with SGCL itself
CLASSIFICATION = ("crc7k", "kather2016", "osteosarcoma")
SEG_FRACTIONS = (0.1, 1.0)


@dataclass(frozen=True)
class Budget:
    """What every trained row gets (same for all rows of one benchmark)."""

    backbone: str = "resnet18"
    size: int = 96            # global view side (local quadrant crops: size // 2)
    batch: int = 64
    steps: int = 1500
    lr: float = 0.06          # SGD at a global batch of 256 (linear scaling)
    queue: int = 4096         # MoCo queue / SGCL NPID negatives
    nei_k: int = 64           # SGCL candidates and mined negatives per anchor
    clusters: int = 100       # SGCL k-means clusters per run
    ramp_frac: float = 0.1    # SGCL ramp over this fraction of the run (the reference: 10 of 100 epochs)
    key_momentum: float = 0.99  # MoCo key encoder (0.999 suits ~10^5+ steps; at a few thousand the keys stay random-init)
    dense_anchors: int = 6    # anchors per image on the 3x3 map of a 96-px view
    precision: str = "fp32"
    workers: int = 1
    seg: str = "cpu"          # segmentation budget name (SEG_BUDGETS)


BUDGETS = {
    "quick": Budget(backbone="resnet18", size=48, batch=16, steps=4, queue=64, nei_k=8, clusters=4, dense_anchors=2,
                    workers=0, seg="quick"),
    "cpu": Budget(batch=64, steps=150, workers=1),
    # the budget of docs/quality.md's figures (run with --steps 200)
    "gpu": Budget(batch=128, steps=240, lr=0.06, queue=4096, precision="bf16", workers=2, seg="gpu"),
    # the next run docs/quality.md asks for: 10x the steps, K << N, the reference learning rate
    "gpu_long": Budget(batch=128, steps=2000, lr=0.03, queue=1024, precision="bf16", workers=2, seg="gpu"),
}
SEG_BUDGETS = {  # quality_eval.segmentation_scores budgets (keys of its DEFAULT_SEG_BUDGET)
    "quick": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 2, "patch_size": 64, "overlap": 0.0},
    "cpu": {},  # quality_eval.DEFAULT_SEG_BUDGET
    "gpu": {"threads": 2},  # the CPU budget's fine-tuning, on the GPU (several evaluations share the CPU cores)
}


def log(msg: str) -> None:
    print(f"[quality] {msg}", flush=True)


# -- data ---------------------------------------------------------------------------------------------------

def tile_pretraining_data(shared: Path, out: Path, mpp: float, patch_size: int, quick: bool, jpeg_quality: int = 90) -> Path:
    """Tile the shared unlabelled H&E with the tiling stage; returns the folder of .h5 files (reused)."""
    from preprocessing.cohort import run_cohort
    from preprocessing.config import TileConfig
    from sgcl.config import load_config

    tiles = out / "tiles"
    groups = [  # (inputs, assumed µm/px where the header has none, why)
        ([shared / "wsi" / "cmu-1-small-region.svs"], None, "mpp 0.499 in the header"),
        ([shared / "wsi" / "tcga-cr-7395-01a-01-ts1.svs"], 1.0, "no mpp in the header; nuclei sizes suggest ~1 µm/px"),
        ([shared / "patches" / "osteosarcoma-sample"], 1.0, "10x, ~1 µm/px (data README)"),
        ([shared / "images" / n for n in ("he-tiatoolbox-stain-target.png", "he-stardist-histo.jpg", "he-wsidicom-tile.png")],
         0.5, "H&E images without a stated µm/px: a 20x-like 0.5 µm/px is assumed"),
    ]
    if quick:
        groups = groups[:1]
    for inputs, assume, _why in groups:
        missing = [p for p in inputs if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{missing[0]} is missing; the quality benchmark needs ../shared/data (see its README.md)")
        overrides = [f"inputs={json.dumps([str(p) for p in inputs])}", f"out_dir={json.dumps(str(tiles))}",
                     f"patch.target_mpp={mpp}", f"patch.patch_size={patch_size}", "output.qc=false", "recursive=true",
                     f"output.jpeg_quality={jpeg_quality}"]
        if assume is not None:
            overrides.append(f"assume_mpp={assume}")
        run_cohort(load_config(TileConfig, None, overrides), progress=False, log=lambda m: None)
    files = sorted((tiles / "patches").glob("*.h5"))
    if not files:
        raise RuntimeError(f"tiling produced no patch file in {tiles / 'patches'}; see {tiles / 'manifest.csv'}")
    return tiles / "patches"


def count_patches(h5_dir: Path) -> int:
    import h5py

    total = 0
    for f in sorted(h5_dir.glob("*.h5")):
        with h5py.File(f, "r") as h:
            total += int(h["coords"].shape[0])
    return total


# -- pretraining ----------------------------------------------------------------------------------------------

def common_overrides(b: Budget, h5_dir: Path, run: Path, seed: int, n_patches: int, device: str) -> list[str]:
    """The budget every trained row shares (SGCL's sizes scaled from the reference to this N)."""
    steps_per_epoch = max(1, n_patches // b.batch)
    ramp_epochs = max(0.05, b.ramp_frac * b.steps / steps_per_epoch)
    return [
        f"data.h5_dir={h5_dir}", f"data.batch_size={b.batch}", f"data.workers={b.workers}", "data.pin_memory=false",
        f"model.backbone={b.backbone}", f"aug.global_size={b.size}", f"aug.local_size={max(16, b.size // 2)}",
        "method.proj_hidden_dim=512", "method.proj_dim=128",
        f"method.moco.queue_size={b.queue}", f"method.moco.momentum={b.key_momentum}", f"method.sgcl.num_negatives={b.queue}", f"method.sgcl.nei_k={b.nei_k}",
        f"method.sgcl.kmeans_clusters={b.clusters}", f"method.sgcl.rampup_epochs={ramp_epochs:.4f}",
        f"method.dense.n_anchors={b.dense_anchors}", "method.dense.igu_cache=8192",  # every patch's entropy map stays cached
        "optim.name=sgd", f"optim.lr={b.lr}", "optim.warmup_epochs=0", f"train.max_steps={b.steps}",
        "train.epochs=100000", f"train.seed={seed}", f"train.device={device}", f"train.precision={b.precision}",
        "train.progress=false", "train.log_every=25", f"train.health_every={max(10, b.steps // 20)}",
        f"train.ckpt_every={max(100, b.steps // 4)}", f"train.out_dir={run}",
    ]


def pretrain_job(row: str, seed: int, overrides: list[str], run: Path, threads: int) -> dict:
    """One ``sgcl pretrain`` subprocess (reused when its export exists). Returns timing and health."""
    export = run / "export"
    t0 = time.perf_counter()
    recorded = run / "overrides.txt"
    if recorded.is_file() and recorded.read_text() != "\n".join(overrides) + "\n":
        raise RuntimeError(f"{run} holds a run with other settings ({recorded}); pass another --out or delete {run}")
    if not (export / "backbone.json").is_file():
        run.mkdir(parents=True, exist_ok=True)
        recorded.write_text("\n".join(overrides) + "\n")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(run / "pretrain.log", "w") as fh:
            proc = subprocess.run([sys.executable, "-m", "sgcl.cli", "pretrain", *overrides], cwd=REPO, env=env,
                                  stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not (export / "backbone.json").is_file():
            tail = (run / "pretrain.log").read_text()[-1500:]
            raise RuntimeError(f"pretraining {row} seed {seed} failed (exit {proc.returncode}); {run / 'pretrain.log'}:\n{tail}")
    health = json.loads((run / "health.json").read_text()) if (run / "health.json").is_file() else {}
    return {"row": row, "seed": seed, "export": str(export), "seconds": round(time.perf_counter() - t0, 1),
            "health": health.get("rows", {}), "last_metrics": _last_metrics(run)}


def health_summary(per_seed: list[dict]) -> str:
    """One line per row: for each set of rows the trainer measured (bank/queue/embedding, backbone),
    the seed-mean spread at the end and how many seeds were flagged (sgcl.train.health.verdict)."""
    parts = []
    for name in sorted({n for h in per_seed for n in h}):
        got = [h[name] for h in per_seed if name in h]
        flagged = [g["verdict"].split(":")[0] for g in got if g.get("verdict")]
        text = (f"{name}: mean cos {np.mean([g['mean_cos'] for g in got]):.2f}, "
                f"eff. rank {np.mean([g['eff_rank'] for g in got]):.1f}")
        if flagged:
            text += f" — {max(set(flagged), key=flagged.count)} in {len(flagged)}/{len(got)} seeds"
        parts.append(text)
    return "; ".join(parts)


def _last_metrics(run: Path) -> dict:
    from sgcl.train.logging import read_metric_rows

    return (read_metric_rows(run) or [{}])[-1]


def random_init_export(out: Path, backbone: str, seed: int) -> str:
    """The backbone at its seeded timm initialisation, exported like a trained one (same loader path)."""
    import torch

    from sgcl.models.backbone import create_backbone, export_backbone

    export = out / "pretrain" / f"random_init_s{seed}" / "export"
    if not (export / "backbone.json").is_file():
        torch.manual_seed(seed)
        export_backbone(create_backbone(backbone), backbone, export, {"random_init": True, "seed": seed})
    return str(export)


# -- evaluation -----------------------------------------------------------------------------------------------

_TASKS: dict[tuple, dict] = {}


def evaluate_job(row: str, seed: int, spec: str, out: str, shared: str, mpp: float, quick: bool, seg_root: str | None,
                 seg_budget: dict, device: str, threads: int, n_boot: int, pretrain_device: str = "") -> dict:
    """Classification and segmentation scores of one encoder (a process-pool task; cached in JSON)."""
    import torch

    torch.set_num_threads(max(1, threads))
    from quality_eval import classification_scores, embed_tasks, load_classification_tasks, segmentation_scores

    from sgcl.train.health import representation_spread

    dest = Path(out) / "eval" / f"{row}_s{seed}.json"
    if dest.is_file():
        return json.loads(dest.read_text())
    key = (shared, mpp, quick)
    if key not in _TASKS:  # loaded once per evaluation process
        _TASKS[key] = load_classification_tasks(Path(shared), mpp=mpp, quick=quick)
    tasks = _TASKS[key]
    feats, info = embed_tasks(spec, tasks, device=device)
    result: dict = {"row": row, "seed": seed, "encoder": spec, "pretrain_device": pretrain_device, "embed": info,
                    "classification": {}, "spread": {}, "segmentation": {}}
    for name, task in tasks.items():
        # fixed evaluation seed (folds, inner folds, bootstrap): the seed spread is the pretraining's alone
        scores = classification_scores(feats[name], task, seed=0, n_boot=n_boot)
        result["classification"][name] = scores
        result["spread"][name] = representation_spread(torch.as_tensor(feats[name]))
    if seg_root:
        for frac in SEG_FRACTIONS:
            run = Path(out) / "seg" / f"{row}_s{seed}_f{frac:g}"
            result["segmentation"][f"{frac:g}"] = segmentation_scores(spec, Path(seg_root), frac, seed, run,
                                                                      {**seg_budget, "device": device}, n_boot=n_boot)
    from sgcl.utils.atomic import atomic_write_json

    atomic_write_json(dest, result)
    return result


# -- aggregation ----------------------------------------------------------------------------------------------

def _balanced_accuracy(y: np.ndarray, pred: np.ndarray, classes: int) -> float:
    recalls = [float((pred[y == c] == c).mean()) for c in range(classes) if (y == c).any()]
    return float(np.mean(recalls)) if recalls else float("nan")


def seed_mean_bootstrap(y: np.ndarray, preds: list[np.ndarray], units: np.ndarray, classes: int, n_boot: int,
                        rng: np.random.Generator, draws: np.ndarray | None = None) -> np.ndarray:
    """Bootstrap replicates of the seed-mean balanced accuracy: whole units resampled once per
    replicate and shared by every seed (``draws`` (n_boot, n_units) of unit positions may be given,
    so two rows are compared on the same resamples)."""
    uniq = np.unique(units)
    members = [np.flatnonzero(units == u) for u in uniq]
    if draws is None:
        draws = rng.integers(0, len(uniq), (n_boot, len(uniq)))
    out = np.empty(len(draws))
    for b, pick in enumerate(draws):
        idx = np.concatenate([members[p] for p in pick])
        out[b] = np.mean([_balanced_accuracy(y[idx], p[idx], classes) for p in preds])
    return out


def aggregate(evals: dict[str, dict[int, dict]], tasks_meta: dict, n_boot: int, seed: int = 0) -> dict:
    """Per row: every metric's seed values, mean ± std, and the CI of the seed mean; paired
    differences against the references on shared resamples."""
    rng = np.random.default_rng(seed)
    rows = list(evals)
    summary: dict[str, dict] = {r: {} for r in rows}
    replicates: dict[tuple[str, str], np.ndarray] = {}
    for task, meta in tasks_meta.items():
        y, units, classes = meta["labels"], meta["units"], meta["classes"]
        scored = meta["scored"]
        n_units = len(np.unique(units[scored]))
        draws = rng.integers(0, n_units, (n_boot, n_units))
        for probe in ("knn", "linear"):
            metric = f"{task}/{probe}"
            for r in rows:
                preds = [np.asarray(e["classification"][task][probe]["oof_pred"]) for e in evals[r].values()]
                values = [e["classification"][task][probe]["balanced_accuracy"]["value"] for e in evals[r].values()]
                reps = seed_mean_bootstrap(y[scored], [p[scored] for p in preds], units[scored], classes, n_boot, rng, draws)
                replicates[(r, metric)] = reps
                summary[r][metric] = _stats(values, reps)
    for probe in ("knn", "linear"):  # the headline: mean over the labelled sets
        metric = f"mean/{probe}"
        for r in rows:
            per_seed = np.mean([[e["classification"][t][probe]["balanced_accuracy"]["value"] for t in tasks_meta]
                                for e in evals[r].values()], axis=1)
            reps = np.mean([replicates[(r, f"{t}/{probe}")] for t in tasks_meta], axis=0)
            replicates[(r, metric)] = reps
            summary[r][metric] = _stats(per_seed.tolist(), reps)
    for frac in SEG_FRACTIONS:
        metric = f"nuinsseg_dice/{frac:g}"
        for r in rows:
            segs = [e["segmentation"].get(f"{frac:g}") for e in evals[r].values()]
            if not all(segs):
                continue
            per_image = np.array([[s["per_image"][k] if s["per_image"][k] is not None else np.nan for k in sorted(s["per_image"])]
                                  for s in segs])
            draws = rng.integers(0, per_image.shape[1], (n_boot, per_image.shape[1]))
            reps = np.nanmean(np.nanmean(per_image[:, draws], axis=2), axis=0)
            replicates[(r, metric)] = reps
            summary[r][metric] = _stats([s["dice_per_image"]["value"] for s in segs], reps)
    diffs: dict[str, dict] = {}
    for r, ref in difference_pairs(rows):
        for metric in summary[r]:
            if (ref, metric) in replicates and metric in summary[ref]:
                d = replicates[(r, metric)] - replicates[(ref, metric)]
                diffs.setdefault(f"{r} - {ref}", {})[metric] = {
                    "value": summary[r][metric]["mean"] - summary[ref][metric]["mean"],
                    "low": float(np.quantile(d, 0.025)), "high": float(np.quantile(d, 0.975)),
                    "p_le_0": float((d <= 0).mean())}
    return {"rows": summary, "differences": diffs}


def difference_pairs(rows: list[str]) -> list[tuple[str, str]]:
    """(row, reference) pairs to compare: every row against each of :data:`REFERENCES` present (once per
    pair of references), and every SGCL variant against SGCL (what each term or option costs)."""
    pairs = [(r, ref) for ref in REFERENCES if ref in rows for r in rows
             if r != ref and not (r in REFERENCES and REFERENCES.index(r) > REFERENCES.index(ref))]
    if VARIANT_REFERENCE in rows:
        pairs += [(r, VARIANT_REFERENCE) for r in rows if r.startswith(VARIANT_REFERENCE + "_")]
    return pairs


def _stats(values: list[float], reps: np.ndarray) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "seeds": v.tolist(),
            "low": float(np.quantile(reps, 0.025)), "high": float(np.quantile(reps, 0.975))}


# -- outputs --------------------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    rows = result["aggregate"]["rows"]
    metrics = [m for m in ("mean/knn", "mean/linear", *(f"{t}/knn" for t in CLASSIFICATION), "nuinsseg_dice/0.1",
                           "nuinsseg_dice/1") if any(m in rows[r] for r in rows)]
    head = "| row | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics)
    lines = [head]
    for r, stats in rows.items():
        cells = [f"{stats[m]['mean']:.3f} ± {stats[m]['std']:.3f} [{stats[m]['low']:.3f}, {stats[m]['high']:.3f}]"
                 if m in stats else "" for m in metrics]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines.append("\nmean ± std over seeds [95 % bootstrap CI of the seed mean]. Balanced accuracy for "
                 "classification, foreground Dice (mean over test images) for NuInsSeg at 10 % / 100 % labels.")
    diffs = result["aggregate"]["differences"]
    if diffs:
        lines.append("\n| difference | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics))
        for name, d in diffs.items():
            cells = [f"{d[m]['value']:+.3f} [{d[m]['low']:+.3f}, {d[m]['high']:+.3f}]" if m in d else "" for m in metrics]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("\n| row | pretrained on | " + " | ".join(f"{t} features: mean cos / eff. rank" for t in CLASSIFICATION)
                 + " | training health at the end |\n|---|---|" + "---|" * (len(CLASSIFICATION) + 1))
    for r, info in result["spread"].items():
        cells = [f"{info[t]['mean_cos']:.2f} / {info[t]['eff_rank']:.1f}" for t in CLASSIFICATION]
        lines.append(f"| {r} | {', '.join(info.get('device', []))} | " + " | ".join(cells) + f" | {info.get('training', '')} |")
    return "\n".join(lines)


def plot(result: dict, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluation.reports import save_figure

    rows = result["aggregate"]["rows"]
    names = list(rows)
    metrics = [m for m in ("mean/knn", "mean/linear", "nuinsseg_dice/0.1", "nuinsseg_dice/1") if any(m in rows[r] for r in names)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.3 * len(metrics), 0.38 * len(names) + 1.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        have = [n for n in names if m in rows[n]]
        mean = np.array([rows[n][m]["mean"] for n in have])
        std = np.array([rows[n][m]["std"] for n in have])
        colours = ["#999999" if n == "random_init" else "#1f77b4" if not n.startswith("sgcl") else "#2ca02c" for n in have]
        ax.barh(have, mean, xerr=std, color=colours, capsize=3)
        for i, n in enumerate(have):
            ax.plot(rows[n][m]["seeds"], [i] * len(rows[n][m]["seeds"]), "k.", ms=4)
        lo = min(float(np.min(mean - std)), min(min(rows[n][m]["seeds"]) for n in have))
        ax.set_xlim(max(0.0, lo - 0.05), min(1.0, float(np.max(mean + std)) + 0.03))
        ax.set_title({"mean/knn": "kNN balanced acc. (mean of 3 sets)", "mean/linear": "linear balanced acc. (mean of 3 sets)",
                      "nuinsseg_dice/0.1": "NuInsSeg Dice, 10 % labels", "nuinsseg_dice/1": "NuInsSeg Dice, 100 % labels"}[m],
                     fontsize=10)
        ax.invert_yaxis()
    fig.suptitle(f"{result['title']} — bars: mean ± std over seeds, dots: seeds", fontsize=10)
    fig.tight_layout()
    save_figure(fig, dest)


def write_outputs(out: Path, result: dict) -> None:
    from evaluation.reports import write_csv
    from sgcl.utils.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(out / "quality.json", result)
    csv_rows = []
    for r, stats in result["aggregate"]["rows"].items():
        for m, s in stats.items():
            csv_rows.append({"row": r, "metric": m, "mean": s["mean"], "std": s["std"], "ci_low": s["low"],
                             "ci_high": s["high"], "seeds": " ".join(f"{v:.4f}" for v in s["seeds"])})
    write_csv(out / "quality.csv", csv_rows)
    atomic_write_text(out / "quality.md", f"# {result['title']}\n\n{markdown(result)}\n")
    plot(result, out / "quality.png")


# -- run ---------------------------------------------------------------------------------------------------------

def _pretrain_info(out: Path, row: str, seed: int) -> dict:
    """Health and last logged metrics of a finished pretraining run, read from its folder."""
    run = out / "pretrain" / f"{row}_s{seed}"
    health = json.loads((run / "health.json").read_text()) if (run / "health.json").is_file() else {}
    return {"health": health.get("rows", {}), "last_metrics": _last_metrics(run)}


def run_jobs(args, b: Budget, out: Path) -> tuple[dict, float]:
    """Pretrain every (row, seed) (``--parallel`` subprocesses) and evaluate each encoder as soon
    as it exists (``--eval-parallel`` processes); results land in ``out/eval``. Returns failures."""
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor

    from quality_eval import build_seg_task

    h5_dir = args.tiles.resolve() if args.tiles else tile_pretraining_data(args.shared, out, args.mpp, args.patch_size,
                                                                           args.quick, args.jpeg_quality)
    n_patches = count_patches(h5_dir)
    log(f"pretraining data: {n_patches} patches in {len(list(h5_dir.glob('*.h5')))} files ({h5_dir})")
    if args.no_seg:
        seg_root = None
    else:
        seg_root = str(args.seg_task.resolve() if args.seg_task else build_seg_task(args.shared, out / "nuinsseg", mpp=args.seg_mpp))
    eval_device = "cuda" if args.device.startswith("cuda") else "cpu"
    failed: dict[str, str] = {}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.parallel) as pre_pool, \
            ProcessPoolExecutor(max_workers=args.eval_parallel or args.parallel,
                                mp_context=multiprocessing.get_context("spawn")) as eval_pool:
        pending = {}

        def submit_eval(r: str, s: int, spec: str) -> None:
            fut = eval_pool.submit(evaluate_job, r, s, spec, str(out), str(args.shared), args.mpp, args.quick, seg_root,
                                   SEG_BUDGETS[b.seg], eval_device, args.threads, args.n_boot, args.device)
            pending[fut] = ("eval", r, s)

        for r in args.rows:
            for s in args.seeds:
                if ROWS[r] is None:
                    submit_eval(r, s, random_init_export(out, b.backbone, s))
                else:
                    run_dir = out / "pretrain" / f"{r}_s{s}"
                    overrides = [*common_overrides(b, h5_dir, run_dir, s, n_patches, args.device), *ROWS[r]]
                    pending[pre_pool.submit(pretrain_job, r, s, overrides, run_dir, args.threads)] = ("pretrain", r, s)
        while pending:
            done = next(as_completed(list(pending)))
            kind, r, s = pending.pop(done)
            try:
                res = done.result()
            except Exception as exc:  # one failed run is reported, the others go on
                failed[f"{r}_s{s}"] = f"{kind}: {exc}"
                log(f"FAILED {kind} of {r} seed {s}: {str(exc)[:300]}")
                continue
            if kind == "pretrain":
                log(f"pretrained {r} seed {s} in {res['seconds']:.0f} s")
                submit_eval(r, s, res["export"])
            else:
                knn = np.mean([res["classification"][t]["knn"]["balanced_accuracy"]["value"] for t in CLASSIFICATION])
                log(f"evaluated {r} seed {s}: mean kNN balanced accuracy {knn:.3f}")
    return failed, time.perf_counter() - t0


def run(args) -> dict:
    import torch

    from quality_eval import load_classification_tasks

    t_all = time.perf_counter()
    b: Budget = BUDGETS[args.budget]
    b = dataclasses.replace(b, **{k: v for k, v in (("steps", args.steps), ("precision", args.precision),
                                                    ("workers", args.workers)) if v is not None})
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log(f"budget {args.budget}: {b}")
    failed, jobs_s = ({}, 0.0) if args.aggregate_only else run_jobs(args, b, out)

    # every result comes from the files in out/eval, so runs made elsewhere can be merged in
    evals: dict[str, dict[int, dict]] = {}
    missing = {}
    for r in args.rows:
        paths = {s: out / "eval" / f"{r}_s{s}.json" for s in args.seeds}
        absent = [s for s, p in paths.items() if not p.is_file()]
        if absent:
            missing[r] = absent
            continue
        evals[r] = {s: json.loads(p.read_text()) for s, p in paths.items()}
    if not evals:
        raise RuntimeError(f"no row has an evaluation for every seed in {out / 'eval'}; failures: {failed}")
    if missing:
        log(f"rows without every seed's evaluation, left out: {missing}")

    tasks = load_classification_tasks(args.shared, mpp=args.mpp, quick=args.quick)
    tasks_meta = {}
    first = next(iter(evals.values()))[args.seeds[0]]
    for name, task in tasks.items():
        c = first["classification"][name]
        units = task.groups if c["ci_unit"] == "group" else task.image_ids
        scored = np.asarray(c["scored"], bool)
        tasks_meta[name] = {"labels": task.labels, "units": units, "classes": task.num_classes, "scored": scored,
                            "ci_unit": c["ci_unit"], "meta": task.meta}
    agg = aggregate(evals, tasks_meta, args.n_boot)
    pre = {(r, s): _pretrain_info(out, r, s) for r in evals for s in args.seeds if ROWS[r] is not None}
    spread = {}
    for r, per_seed in evals.items():
        spread[r] = {t: {k: float(np.mean([e["spread"][t][k] for e in per_seed.values()])) for k in ("mean_cos", "eff_rank")}
                     for t in CLASSIFICATION}
        spread[r]["training"] = health_summary([pre[(r, s)]["health"] for s in args.seeds]) if ROWS[r] else ""
        spread[r]["device"] = sorted({e.get("pretrain_device", "?") for e in per_seed.values()})
    result = {
        "title": f"sgcl quality benchmark ({args.budget} budget{', QUICK pipeline check' if args.quick else ''})",
        "quick": bool(args.quick), "budget": dataclasses.asdict(b), "seg_budget": SEG_BUDGETS[b.seg],
        "rows_overrides": {r: ROWS[r] for r in evals}, "seeds": args.seeds, "torch": torch.__version__,
        "data": {"mpp": args.mpp, "patch_size": args.patch_size,
                 "classification": {t: {k: v for k, v in m["meta"].items()} | {"ci_unit": m["ci_unit"]}
                                    for t, m in tasks_meta.items()}},
        "aggregate": agg, "spread": spread, "failed": failed, "missing_rows": missing,
        "pretraining": {f"{r}_s{s}": p for (r, s), p in pre.items()},
        "timing_s": {"jobs": round(jobs_s, 1), "total": round(time.perf_counter() - t_all, 1)},
    }
    write_outputs(out, result)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    p.add_argument("--quick", action="store_true", help="tiny budget, 2 rows, 1 seed, subsets: a pipeline check (CI)")
    p.add_argument("--budget", choices=sorted(BUDGETS), default=None, help="default: cpu (quick with --quick)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per run (overrides the budget's)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="overrides the budget's (bf16 is slow on most CPUs)")
    p.add_argument("--workers", type=int, default=None, help="loader workers per pretraining run (overrides the budget's)")
    p.add_argument("--rows", default=None, help=f"comma-separated subset of {list(ROWS)} (default: all)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; quick: 0)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--parallel", type=int, default=2, help="pretraining runs / evaluations at once")
    p.add_argument("--eval-parallel", type=int, default=None, help="evaluations at once (default: --parallel)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder (default ../shared/data)")
    p.add_argument("--tiles", type=Path, default=None, help="reuse a folder of tiled .h5 files")
    p.add_argument("--seg-task", type=Path, default=None, help="reuse a NuInsSeg task folder built by quality_eval.build_seg_task")
    p.add_argument("--mpp", type=float, default=1.0, help="µm/px of the pretraining patches and classification sets")
    p.add_argument("--patch-size", type=int, default=96)
    p.add_argument("--jpeg-quality", type=int, default=90, help="of the tiled patches")
    p.add_argument("--seg-mpp", type=float, default=0.5, help="µm/px of the NuInsSeg images")
    p.add_argument("--no-seg", action="store_true", help="skip the segmentation fine-tuning")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--aggregate-only", action="store_true",
                   help="no pretraining or evaluation: aggregate the rows whose out/eval/<row>_s<seed>.json all exist")
    args = p.parse_args(argv)
    args.budget = args.budget or ("quick" if args.quick else "cpu")
    default_rows = ["random_init", "sgcl"] if args.quick else list(ROWS)
    args.rows = [r.strip() for r in args.rows.split(",")] if args.rows else default_rows
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
    args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0] if args.quick else [0, 1, 2])
    if args.quick:
        args.n_boot = min(args.n_boot, 100)
    args.out = args.out.resolve()
    args.shared = args.shared.resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.shared.is_dir():
        print(f"quality: {args.shared} is missing; this benchmark needs ../shared/data beside the repo (or --shared)", file=sys.stderr)
        return 2
    result = run(args)
    print(f"\n# {result['title']}\n\n{markdown(result)}\n")
    print(f"Total {result['timing_s']['total']:.0f} s. Outputs: {args.out}/quality.json, quality.csv, quality.md, quality.png")
    if result["failed"]:
        print(f"quality: {len(result['failed'])} run(s) failed: {sorted(result['failed'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

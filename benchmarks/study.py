"""A small real reproduction study on the CPU: which pretraining method gives the better encoder,
at the SAME backbone and compute budget (steps, batch, image size, seed)?

    python benchmarks/study.py --out runs/study                # full run (≤ 25 min on 2 CPU cores)
    python benchmarks/study.py --out runs/study_quick --quick  # smoke run (tiny settings, ~25 s)

Data (all real, from ``../shared/data``):

- pretraining tiles: both real slides, tiled by the tiling stage (``preprocessing.cohort.run_cohort``):
  CMU-1-Small-Region (mpp 0.499 in its header) and the TCGA frozen section (no mpp in its header:
  ``--tcga-mpp``, default 1.0 µm/px; see ``TCGA_MPP_REASON``), both at ``--target-mpp``;
- labels for kNN / linear probe: the 9 NCT-CRC-HE tiles (one per tissue class). Each 224-px tile is cut
  into 4 quadrants; ``--crops`` random crops are drawn inside each quadrant, and the quadrants are the
  groups of a 4-fold group-aware split (test = one quadrant of every tile, validation = the next, train =
  the other two), so no pixel is on both sides. 9 tiles are far too few for an accuracy claim;
- segmentation: the derived-label nuclei task (``evaluation.segmentation.build_nuclei_task``: labels are
  derived by colour deconvolution + thresholding, not drawn by a pathologist).

Encoders (``ENCODERS``): random init (no training), MoCo v2, SimCLR, SGCL, SGCL + scale-aware crops
(ρ = 1/4, proximity), SGCL + dense branch with each anchor sampler (uniform, arco_sg, arco_sag, igu).
The pretraining overrides are ``benchmarks/ablation_scale.py``'s (``common_overrides`` + ``SETTINGS``).

Metrics, each with a 95 % CI: spatial retrieval precision@k on the slide tiles (bootstrap over
patches), kNN and linear-probe accuracy on the NCT crops (out-of-fold predictions, bootstrap over the
36 tile quadrants), nuclei Dice (bootstrap over test images). Outputs in ``--out``: ``study.json``,
``study.csv``, ``study.png``, ``study.md`` (the markdown table, also printed). Finished pretraining runs
(their export exists) are reused, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from ablation_scale import SETTINGS, common_overrides  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
CMU_SLIDE = SHARED / "wsi" / "cmu-1-small-region.svs"
TCGA_SLIDE = SHARED / "wsi" / "tcga-cr-7395-01a-01-ts1.svs"
NCT_DIR = SHARED / "patches" / "nct-crc-he-samples"
TCGA_MPP_REASON = (
    "the TCGA file's header has no mpp and no objective power; its nuclei measure about half as many pixels "
    "across as those of CMU-1-Small-Region (0.499 µm/px), so about 1.0 µm/px (a 10x-equivalent scan or a "
    "2x-downsampled 20x one). This is an estimate, not a calibration."
)

#: encoder name -> pretraining overrides (None: random init, not trained)
ENCODERS: dict[str, list[str] | None] = {
    "random_init": None,
    "moco_v2": ["method.name=moco_v2", *SETTINGS["baseline"]],
    "simclr": ["method.name=simclr", *SETTINGS["baseline"]],
    "sgcl": ["method.name=sgcl", *SETTINGS["baseline"]],
    "sgcl_scale_rho4": ["method.name=sgcl", *SETTINGS["scale_rho4_zoom"], "aug.small_window.placement=proximity"],
    "sgcl_dense_uniform": ["method.name=sgcl", *SETTINGS["dense_uniform"]],
    "sgcl_dense_arco_sg": ["method.name=sgcl", *SETTINGS["dense_arco_sg"]],
    "sgcl_dense_arco_sag": ["method.name=sgcl", *SETTINGS["dense_arco_sag"]],
    "sgcl_dense_igu": ["method.name=sgcl", *SETTINGS["dense_igu"]],
}
METRICS = ("spatial_precision", "knn_accuracy", "linear_accuracy", "seg_dice")
NCT_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")

FULL = dict(backbone="resnet18", size=96, patch_size=96, batch=32, steps=60, lr=0.03, queue=1024,
            crops=6, crop_size=80, seg_epochs=2, seg_steps=12, seg_patch=96, seg_overlap=0.5, slide_regions=2,
            n_boot=1000)
QUICK = dict(backbone="test_resnet", size=48, patch_size=96, batch=8, steps=2, lr=0.03, queue=64,
             crops=2, crop_size=64, seg_epochs=1, seg_steps=1, seg_patch=64, seg_overlap=0.0, slide_regions=0,
             n_boot=200)


def log(msg: str) -> None:
    print(msg, flush=True)


# -- data -----------------------------------------------------------------------------------------------

def tile_slides(args) -> Path:
    """Tile both real slides with the tiling stage; returns the folder of per-slide HDF5 files."""
    from preprocessing.cohort import run_cohort
    from preprocessing.config import TileConfig
    from sgcl.config import load_config

    out = args.out / "tiles"
    cfg = load_config(TileConfig, None, [
        f"inputs=[{json.dumps(str(CMU_SLIDE))}, {json.dumps(str(TCGA_SLIDE))}]", f"out_dir={json.dumps(str(out))}",
        f"assume_mpp={args.tcga_mpp}", f"patch.target_mpp={args.target_mpp}", f"patch.patch_size={args.patch_size}",
        "output.qc=false",
    ])
    summary = run_cohort(cfg, progress=False, log=lambda m: None)
    files = sorted((out / "patches").glob("*.h5"))
    if len(files) != 2:
        raise RuntimeError(f"tiling produced {len(files)} of 2 slide files ({summary}); see {out / 'manifest.csv'}")
    return out / "patches"


class SlidePatches:
    """All patches of the tiled slides, in order, with slide index and grid (for spatial retrieval)."""

    def __init__(self, h5_dir: Path):
        from preprocessing.h5format import PatchFile

        self.files = [PatchFile(p) for p in sorted(h5_dir.glob("*.h5"))]
        self.index = [(f, i) for f in self.files for i in range(len(f))]
        self.slide = np.concatenate([np.full(len(f), s, np.int64) for s, f in enumerate(self.files)])
        self.grid = np.concatenate([f.grid().astype(np.int64) for f in self.files])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        f, j = self.index[i]
        return f.read(j)


def nct_crops(crops: int, crop_size: int, seed: int) -> dict:
    """Random crops inside each quadrant of the 9 NCT-CRC tiles: images, labels, groups (tile*4+quadrant)."""
    import tifffile

    paths = sorted(NCT_DIR.glob("*.tif"))
    if len(paths) != len(NCT_CLASSES):
        raise FileNotFoundError(f"expected {len(NCT_CLASSES)} NCT-CRC tiles in {NCT_DIR}, found {len(paths)}")
    rng = np.random.default_rng(seed)
    images, labels, groups, quadrant = [], [], [], []
    for t, path in enumerate(paths):
        img = tifffile.imread(path)[..., :3]
        cls = NCT_CLASSES.index(path.name.split("-")[0])
        h, w = img.shape[:2]
        qh, qw = h // 2, w // 2
        c = min(crop_size, qh, qw)
        for q in range(4):
            y0, x0 = (q // 2) * qh, (q % 2) * qw
            for _ in range(crops):
                y, x = y0 + rng.integers(0, qh - c + 1), x0 + rng.integers(0, qw - c + 1)
                images.append(np.ascontiguousarray(img[y:y + c, x:x + c]))
                labels.append(cls); groups.append(t * 4 + q); quadrant.append(q)
    return {"images": images, "labels": np.array(labels), "groups": np.array(groups), "quadrant": np.array(quadrant)}


# -- pretraining -----------------------------------------------------------------------------------------

def logged_train_seconds(run: Path) -> float | None:
    """The training wall time the trainer logged (``elapsed_s`` of the last row of ``metrics.jsonl``), so
    a reused run reports the time it took when it was trained."""
    from sgcl.train.logging import read_metric_rows

    seconds = [row["elapsed_s"] for row in read_metric_rows(run) if "elapsed_s" in row]
    return seconds[-1] if seconds else None


def pretrain(name: str, args, h5_dir: Path, n_patches: int) -> str:
    """Train ``name`` in-process with the shared budget; returns its export folder (reused when present)."""
    from sgcl.config import load_config
    from sgcl.train.config import PretrainConfig
    from sgcl.train.trainer import Trainer

    run = args.out / "pretrain" / name
    export = run / "export"
    if (export / "backbone.json").is_file():
        return str(export)
    epochs_equiv = args.steps * args.batch / max(1, n_patches)
    overrides = [*common_overrides(args, h5_dir, run, args.seed), *ENCODERS[name],
                 f"method.sgcl.rampup_epochs={max(0.05, epochs_equiv / 3):.3f}", "train.log_every=5",
                 f"train.ckpt_every={args.steps}"]
    cfg = load_config(PretrainConfig, None, overrides)
    trainer = Trainer(cfg)
    trainer.setup()
    ok = False
    try:
        trainer.fit()  # exports to <run>/export at the end (train.export defaults to true)
        ok = True
    finally:
        trainer.close(ok)
    if not (export / "backbone.json").is_file():
        raise RuntimeError(f"pretraining {name} finished without an export in {export}")
    return str(export)


# -- metrics -----------------------------------------------------------------------------------------------

def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    a = (1 - level) / 2
    return float(np.quantile(samples, a)), float(np.quantile(samples, 1 - a))


def group_bootstrap_accuracy(correct: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95 % CI of accuracy, resampling whole groups (crops of one tile quadrant are not independent)."""
    uniq = np.unique(groups)
    hits = np.array([correct[groups == g].sum() for g in uniq], np.float64)
    sizes = np.array([(groups == g).sum() for g in uniq], np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(uniq), (n_boot, len(uniq)))
    return percentile_ci(hits[idx].sum(1) / sizes[idx].sum(1))


def spatial_metric(feats: np.ndarray, patches: SlidePatches, args) -> dict:
    import torch

    from evaluation.spatial_retrieval import bootstrap_ci, spatial_retrieval

    r = spatial_retrieval(torch.as_tensor(feats), torch.as_tensor(patches.slide), torch.as_tensor(patches.grid),
                          k=args.k, radius=1.5)
    pp = r.pop("per_patch")
    prec = pp["hits"][pp["valid"]] / r["k"]
    lo, hi = bootstrap_ci(prec, n_boot=args.n_boot, seed=args.seed)
    return {"value": r["precision"], "low": lo, "high": hi, "chance": r["chance"], "k": r["k"],
            "n": r["n_evaluated"]}


def probe_metrics(feats: np.ndarray, nct: dict, args) -> dict:
    """kNN and linear probe, 4-fold by quadrant: out-of-fold predictions for every crop."""
    import torch

    from evaluation.knn import knn_classify
    from evaluation.linear import linear_probe

    y, q = nct["labels"], nct["quadrant"]
    x = torch.as_tensor(feats)
    knn_pred = np.full(len(y), -1)
    lin_pred = np.full(len(y), -1)
    for fold in range(4):
        te, va = q == fold, q == (fold + 1) % 4
        tr = ~(te | va)
        bank = tr | va  # kNN has no hyper-parameter to tune: train + validation form the bank
        k = min(args.knn_k, int(bank.sum()))
        knn_pred[te] = knn_classify(x[bank], torch.as_tensor(y[bank]), x[te], num_classes=len(NCT_CLASSES),
                                    ks=(k,), backend="torch")[k]["pred"].numpy()
        res = linear_probe(x[tr], torch.as_tensor(y[tr]), x[va], torch.as_tensor(y[va]), x[te], torch.as_tensor(y[te]),
                           num_classes=len(NCT_CLASSES), l2_grid=(1e-4, 1e-2, 1.0), max_iter=200)
        lin_pred[te] = res["pred"].numpy()
    out = {}
    for name, pred in (("knn_accuracy", knn_pred), ("linear_accuracy", lin_pred)):
        correct = pred == y
        lo, hi = group_bootstrap_accuracy(correct, nct["groups"], args.n_boot, args.seed)
        out[name] = {"value": float(correct.mean()), "low": lo, "high": hi, "chance": 1 / len(NCT_CLASSES),
                     "n": int(len(y)), "groups": int(len(np.unique(nct["groups"])))}
    return out


def seg_metric(name: str, encoder: str, task_root: Path, args) -> dict:
    from evaluation.segmentation.train import finetune

    run = args.out / "seg" / name
    res_path = run / "results.json"
    if res_path.is_file():
        r = json.loads(res_path.read_text())
    else:
        r = finetune(encoder, task_root, run, [
            f"train.epochs={args.seg_epochs}", f"train.steps_per_epoch={args.seg_steps}",
            f"train.patch_size={args.seg_patch}", "train.batch_size=8", "train.num_workers=0", "train.threads=0",
            f"train.seed={args.seed}", "device=cpu", "infer.save_png=0", "infer.batch_size=16",
            f"infer.overlap={args.seg_overlap}",
        ])
    per = np.array([p["mean_dice"] for p in r["test"]["per_image"] if p["mean_dice"] is not None], np.float64)
    rng = np.random.default_rng(args.seed)
    lo, hi = percentile_ci(per[rng.integers(0, len(per), (args.n_boot, len(per)))].mean(1)) if len(per) else (np.nan, np.nan)
    # value = mean of the per-image Dice, the quantity the bootstrap resamples; the pooled Dice (confusion
    # summed over the test images, what `sgcl eval seg` reports) is kept beside it
    return {"value": float(per.mean()) if len(per) else float("nan"), "low": lo, "high": hi, "n": int(len(per)),
            "pooled_dice": float(r["test"]["mean_dice"])}


# -- run -----------------------------------------------------------------------------------------------------

def evaluate_encoder(name: str, args, h5_dir: Path, patches: SlidePatches, nct: dict, task) -> dict:
    """Pretrain ``name`` (unless random init), then compute every metric; returns the encoder's row."""
    from evaluation.embedding import embed_dataset, load_encoder

    if ENCODERS[name] is None:
        spec, train_s = args.backbone, 0.0
    else:
        log(f"== pretraining {name} ({args.steps} steps, batch {args.batch}, {args.size} px, {args.backbone})")
        spec = pretrain(name, args, h5_dir, len(patches))
        train_s = logged_train_seconds(args.out / "pretrain" / name)
    t = [time.perf_counter()]
    enc = load_encoder(spec, input_size=args.size)
    slide_feats = embed_dataset(enc, patches, batch_size=64, num_workers=0, device="cpu", precision="fp32")
    nct_feats = embed_dataset(enc, nct["images"], batch_size=64, num_workers=0, device="cpu", precision="fp32")
    t.append(time.perf_counter())
    metrics = {"spatial_precision": spatial_metric(slide_feats, patches, args), **probe_metrics(nct_feats, nct, args)}
    t.append(time.perf_counter())
    metrics["seg_dice"] = seg_metric(name, spec, task.root, args)
    t.append(time.perf_counter())
    row = {"encoder": spec, "weights_sha256": enc.info.get("sha256"), "metrics": metrics,
           "pretrain_s": None if train_s is None else round(train_s, 1), "embed_s": round(t[1] - t[0], 1),
           "probe_s": round(t[2] - t[1], 1), "seg_s": round(t[3] - t[2], 1)}
    log("   " + "  ".join(f"{m} {metrics[m]['value']:.3f} [{metrics[m]['low']:.3f}, {metrics[m]['high']:.3f}]"
                          for m in METRICS))
    return row


def run_study(args) -> dict:
    import torch

    from evaluation.segmentation.nuclei_task import build_nuclei_task

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    t_tile = time.perf_counter()
    log(f"== tiling both slides at {args.target_mpp} µm/px, {args.patch_size} px (TCGA mpp assumed {args.tcga_mpp})")
    h5_dir = tile_slides(args)
    patches = SlidePatches(h5_dir)
    per_slide = {f.slide_id: len(f) for f in patches.files}
    log(f"   {len(patches)} patches {per_slide}")
    nct = nct_crops(args.crops, args.crop_size, args.seed)
    tile_s = time.perf_counter() - t_tile
    log(f"== nuclei task (derived labels; {args.slide_regions} CMU-1 regions + the shared H&E images)")
    task = build_nuclei_task(args.out / "nuclei_task", slide=CMU_SLIDE, slide_regions=args.slide_regions,
                             slide_region_size=512)
    task_s = time.perf_counter() - t_tile - tile_s
    rows: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for name in args.encoders:
        try:
            rows[name] = evaluate_encoder(name, args, h5_dir, patches, nct, task)
        except Exception as exc:  # one failing encoder must not lose the others' results
            failed[name] = f"{type(exc).__name__}: {exc}"
            log(f"   FAILED {name}: {failed[name]} (see {args.out / 'pretrain' / name})")
    if not rows:
        raise RuntimeError(f"every encoder failed: {failed}")
    result = {
        "title": "sgcl reproduction study — small-scale CPU study (2 slides, 9 labelled tiles, derived nuclei labels)",
        "budget": {k: getattr(args, k) for k in ("backbone", "size", "batch", "steps", "lr", "seed")},
        "data": {"slides": {"cmu-1-small-region": str(CMU_SLIDE), "tcga-cr-7395": str(TCGA_SLIDE)},
                 "patches_per_slide": per_slide, "target_mpp": args.target_mpp, "patch_size": args.patch_size,
                 "tcga_assumed_mpp": args.tcga_mpp, "tcga_mpp_reason": TCGA_MPP_REASON,
                 "nct_tiles": len(NCT_CLASSES), "nct_crops": int(len(nct["labels"])),
                 "nct_split": "4 folds by tile quadrant (test q, validation q+1, train the rest); no pixel on both sides",
                 "nuclei_task": task.meta.get("counts", task.meta) if getattr(task, "meta", None) else str(task.root)},
        "caveats": ["One seed, brief CPU pretraining: differences between trained rows are mostly noise.",
                    "9 NCT-CRC tiles (one per class) are far too few for an accuracy claim; crops of one tile are "
                    "correlated, so CIs resample whole tile quadrants.",
                    "Nuclei Dice uses derived labels (colour deconvolution + thresholding), not expert annotation.",
                    f"TCGA slide mpp assumed {args.tcga_mpp} µm/px: {TCGA_MPP_REASON}"],
        "quick": bool(args.quick),
        "encoders": rows,
        "failed": failed,
        "tiling_s": round(tile_s, 1), "nuclei_task_s": round(task_s, 1),
        "total_s": round(time.perf_counter() - t_all, 1),
    }
    write_outputs(args.out, result)
    return result


def markdown_table(result: dict) -> str:
    head = ("| encoder | spatial retrieval P@k | kNN accuracy | linear-probe accuracy | nuclei Dice | pretrain s |\n"
            "|---|---|---|---|---|---|")
    lines = [head]
    for name, row in result["encoders"].items():
        cells = [f"{row['metrics'][m]['value']:.3f} [{row['metrics'][m]['low']:.3f}, {row['metrics'][m]['high']:.3f}]"
                 for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'–' if row['pretrain_s'] is None else format(row['pretrain_s'], '.1f')} |")
    for name, err in result.get("failed", {}).items():
        lines.append(f"| {name} | FAILED: {err[:80]} | | | | |")
    first = next(iter(result["encoders"].values()))["metrics"]
    lines.append(f"\nChance: spatial retrieval {first['spatial_precision']['chance']:.3f} (k = "
                 f"{first['spatial_precision']['k']}), kNN/linear {1 / len(NCT_CLASSES):.3f}. 95 % bootstrap CIs.")
    return "\n".join(lines)


def write_outputs(out: Path, result: dict) -> None:
    from sgcl.utils.atomic import atomic_path, atomic_write_json, atomic_write_text

    atomic_write_json(out / "study.json", result)
    with atomic_path(out / "study.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["encoder", *[f"{m}{s}" for m in METRICS for s in ("", "_ci_low", "_ci_high")], "pretrain_s"])
            for name, row in result["encoders"].items():
                w.writerow([name, *[f"{row['metrics'][m][s]:.4f}" for m in METRICS for s in ("value", "low", "high")],
                            row["pretrain_s"]])
    table = markdown_table(result)
    quick = " [QUICK smoke run: a pipeline check, not a result]" if result["quick"] else ""
    atomic_write_text(out / "study.md", f"# {result['title']}{quick}\n\n{table}\n")
    _plot(out / "study.png", result)


def _plot(dest: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sgcl.utils.atomic import atomic_path

    names = list(result["encoders"])
    titles = {"spatial_precision": "spatial retrieval P@k", "knn_accuracy": "kNN accuracy (NCT crops)",
              "linear_accuracy": "linear probe accuracy (NCT crops)", "seg_dice": "nuclei Dice (derived labels)"}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 4.2))
    for ax, m in zip(axes, METRICS):
        v = np.array([result["encoders"][n]["metrics"][m]["value"] for n in names])
        lo = np.array([result["encoders"][n]["metrics"][m]["low"] for n in names])
        hi = np.array([result["encoders"][n]["metrics"][m]["high"] for n in names])
        colours = ["#999999" if n == "random_init" else "#1f77b4" if "sgcl" not in n else "#2ca02c" for n in names]
        ax.barh(names, v, xerr=np.vstack([np.maximum(v - lo, 0), np.maximum(hi - v, 0)]), color=colours, capsize=3)
        chance = result["encoders"][names[0]]["metrics"][m].get("chance")
        if chance is not None:
            ax.axvline(chance, color="k", ls="--", lw=1)
        ax.set_title(titles[m], fontsize=10)
        ax.invert_yaxis()
    fig.suptitle(result["title"] + (" [QUICK smoke run]" if result["quick"] else ""), fontsize=10)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/study"))
    p.add_argument("--quick", action="store_true", help="tiny smoke-run settings (a pipeline check, not a result)")
    p.add_argument("--encoders", default=",".join(ENCODERS), help=f"comma-separated subset of {list(ENCODERS)}")
    p.add_argument("--tcga-mpp", type=float, default=1.0, help="µm/px assumed for the TCGA slide (its header has none)")
    p.add_argument("--target-mpp", type=float, default=1.0, help="µm/px of the tiles of both slides")
    for key, val in FULL.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(val), default=None,
                       help=f"default {val} (quick: {QUICK[key]})")
    p.add_argument("--k", type=int, default=8, help="neighbours for spatial retrieval")
    p.add_argument("--knn-k", type=int, default=10, help="neighbours for kNN classification")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the shared 2-core machine thrashes with 2)")
    args = p.parse_args(argv)
    for key, val in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    args.encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    unknown = [e for e in args.encoders if e not in ENCODERS]
    if unknown:
        p.error(f"unknown encoder(s) {unknown}; choose from {list(ENCODERS)}")
    args.out = args.out.resolve()
    # fields read by ablation_scale.common_overrides
    args.method, args.workers, args.device = "moco_v2", 0, "cpu"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = [p for p in (CMU_SLIDE, TCGA_SLIDE, NCT_DIR) if not p.exists()]
    if missing:
        print(f"study: shared data missing: {[str(m) for m in missing]}; see ../shared/data/README.md", file=sys.stderr)
        return 2
    result = run_study(args)
    print(f"\n# {result['title']}{' [QUICK smoke run]' if args.quick else ''}\n")
    print(markdown_table(result))
    print(f"\nTotal {result['total_s']:.0f} s. Outputs: {args.out}/study.json, study.csv, study.png, study.md")
    if result["failed"]:
        print(f"study: {len(result['failed'])} encoder(s) failed: {sorted(result['failed'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``sgcl demo``: the whole pipeline on the demo slide shipped in the repo, in minutes on a CPU.

tile the slide -> pretrain SGCL and MoCo v2 with the same small budget -> export MIL features for
SGCL, MoCo v2 and the same backbone at random initialisation -> label-free evaluation (spatial
retrieval with bootstrap CIs, feature maps on the slide) -> one HTML report linking everything.

The demo slide has no labels, and the demo invents none: it reports spatial retrieval (for each
patch, the fraction of its k nearest feature-space neighbours that are its spatial neighbours).
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sgcl.config import add_config_arguments, config_from_args, to_dict
from sgcl.utils.atomic import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


@dataclass
class DemoConfig:
    slide: str = "data/demo/CMU-1-Small-Region.svs"  # the slide to run on (default: the shipped CC0 demo slide)
    out_dir: str = "demo_out"
    target_mpp: float = 0.5               # µm/px of the patches
    patch_size: int = 96                  # patch side in pixels (small, so the demo slide yields ~230 patches)
    pretrain_config: str = "configs/pretrain/demo_cpu.yaml"  # paths relative to the cwd, else to the repo
    methods: list[str] = field(default_factory=lambda: ["sgcl", "moco_v2"])  # trained with the same budget
    epochs: int = 60                      # pretraining epochs per method (~4 min for both on 2 CPU cores)
    device: str = "auto"                  # auto: a GPU when present, else the CPU
    knn_k: int = 8                        # neighbours for spatial retrieval
    radius: float = 1.5                   # grid cells that count as spatial neighbours (8-neighbourhood)
    seed: int = 0


def _resolve(path: str) -> str:
    """A path as given, or relative to the repo when it does not exist from the working directory."""
    p = Path(path)
    return str(p if p.exists() or p.is_absolute() else REPO / p)


def _step(name: str, log) -> float:
    log(f"\n== {name}")
    return time.perf_counter()


def run_demo(cfg: DemoConfig, log=print) -> dict:
    """Run every stage; return the results dict also written to ``<out>/results.json``."""
    import torch

    from evaluation.extract import ExtractConfig, run_extract
    from evaluation.spatial_retrieval import bootstrap_ci, spatial_retrieval
    from preprocessing.cohort import run_cohort
    from preprocessing.config import TileConfig
    from sgcl.config import load_config
    from sgcl.train.config import PretrainConfig
    from sgcl.train.trainer import Trainer

    cfg = dataclasses.replace(cfg, slide=_resolve(cfg.slide), pretrain_config=_resolve(cfg.pretrain_config))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. tiling ------------------------------------------------------------------------------------
    t0 = _step(f"1/4 tiling {cfg.slide}", log)
    tile_cfg = load_config(TileConfig, None, [
        f"inputs=[{json.dumps(str(cfg.slide))}]", f"out_dir={json.dumps(str(out / 'tiles'))}",
        f"patch.target_mpp={cfg.target_mpp}", f"patch.patch_size={cfg.patch_size}",
    ])
    summary = run_cohort(tile_cfg)
    if summary.count("failed"):
        raise RuntimeError(f"tiling failed; see {out / 'tiles' / 'manifest.csv'}")
    h5_dir = out / "tiles" / "patches"
    timings["tiling_s"] = time.perf_counter() - t0

    # 2. pretraining ---------------------------------------------------------------------------------
    exports: dict[str, Path] = {}
    curves: dict[str, list[tuple[int, float]]] = {}
    for name in cfg.methods:
        t0 = _step(f"2/4 pretraining {name} ({cfg.epochs} epochs)", log)
        run_dir = out / "pretrain" / name
        pcfg = load_config(PretrainConfig, cfg.pretrain_config, [
            f"data.h5_dir={json.dumps(str(h5_dir))}", f"train.out_dir={json.dumps(str(run_dir))}",
            f"method.name={name}", f"train.epochs={cfg.epochs}", f"train.device={cfg.device}",
            f"train.seed={cfg.seed}",
        ])
        trainer = Trainer(pcfg)
        trainer.setup()
        try:
            trainer.fit()  # exports the backbone to <run_dir>/export at the end
            exports[name] = run_dir / "export"
        finally:
            trainer.close()
        curves[name] = _loss_curve(run_dir / "metrics.csv")
        timings[f"pretrain_{name}_s"] = time.perf_counter() - t0

    # 3. feature export ------------------------------------------------------------------------------
    encoders = {"random_init": pcfg.model.backbone, **{k: str(v) for k, v in exports.items()}}
    feats: dict[str, dict] = {}
    for name, spec in encoders.items():
        t0 = _step(f"3/4 feature export: {name}", log)
        ecfg = load_config(ExtractConfig, None, [
            f"inputs=[{json.dumps(str(h5_dir))}]", f"out_dir={json.dumps(str(out / 'features' / name))}",
            f"encoder={json.dumps(spec)}", f"input_size={cfg.patch_size}", "num_workers=0", "batch_size=32",
            f"device={cfg.device}",
        ])
        result = run_extract(ecfg)
        if result["failed"]:
            raise RuntimeError(f"feature export failed for {name}; see {out / 'features' / name / 'manifest.csv'}")
        feats[name] = _load_features(out / "features" / name / "h5_files")
        timings[f"extract_{name}_s"] = time.perf_counter() - t0

    # 4. label-free evaluation -------------------------------------------------------------------------
    t0 = _step("4/4 evaluation: spatial retrieval", log)
    results: dict = {"config": to_dict(cfg), "encoders": {}}
    for name, f in feats.items():
        r = spatial_retrieval(torch.as_tensor(f["features"]), torch.as_tensor(f["slide"]), torch.as_tensor(f["grid"]),
                              k=cfg.knn_k, radius=cfg.radius)
        pp = r.pop("per_patch")
        valid = pp["valid"]
        prec = pp["hits"][valid] / r["k"]
        lo, hi = bootstrap_ci(prec, seed=cfg.seed)
        results["encoders"][name] = {**r, "precision_ci95": [lo, hi], "encoder": encoders[name]}
        log(f"  {name:<12} spatial retrieval precision@{r['k']} = {r['precision']:.3f} "
            f"[{lo:.3f}, {hi:.3f}]  (chance {r['chance']:.3f})")
    plots = _plots(out, curves, results, feats)
    timings["evaluation_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all
    results["timings"] = timings
    results["n_patches"] = int(len(next(iter(feats.values()))["features"]))
    atomic_write_json(out / "results.json", results)
    report = _report(out, results, plots)
    log(f"\nDone in {timings['total_s']:.0f} s. Open {report} in a browser.")
    return results


def _loss_curve(csv_path: Path) -> list[tuple[int, float]]:
    import pandas as pd

    if not csv_path.is_file():
        return []
    df = pd.read_csv(csv_path)
    if "loss" not in df or "step" not in df:
        return []
    return list(zip(df["step"].astype(int).tolist(), df["loss"].astype(float).tolist()))


def _load_features(folder: Path) -> dict:
    import h5py

    feats, slides, grids = [], [], []
    for i, path in enumerate(sorted(folder.glob("*.h5"))):
        with h5py.File(path, "r") as f:
            feats.append(f["features"][:].astype(np.float32))
            grids.append(f["grid"][:].astype(np.int64))
            slides.append(np.full(len(feats[-1]), i, np.int64))
    if not feats:
        raise RuntimeError(f"no feature files in {folder}")
    return {"features": np.concatenate(feats), "grid": np.concatenate(grids), "slide": np.concatenate(slides)}


def _plots(out: Path, curves: dict, results: dict, feats: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evaluation.reports import save_figure

    plots = {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, pts in curves.items():
        if pts:
            steps, losses = zip(*pts)
            ax.plot(steps, losses, label=name)
    ax.set_xlabel("step"); ax.set_ylabel("training loss"); ax.set_title("Pretraining loss"); ax.legend()
    plots["loss_curves"] = save_figure(fig, out / "loss_curves.png").name

    names = list(results["encoders"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    vals = [results["encoders"][n]["precision"] for n in names]
    err = np.array([[v - results["encoders"][n]["precision_ci95"][0], results["encoders"][n]["precision_ci95"][1] - v]
                    for n, v in zip(names, vals)]).T
    ax.bar(names, vals, yerr=err, capsize=4, color=["#999999", "#1f77b4", "#ff7f0e", "#2ca02c"][: len(names)])
    ax.axhline(results["encoders"][names[0]]["chance"], color="k", ls="--", lw=1, label="chance")
    ax.set_ylabel(f"spatial retrieval precision@{results['encoders'][names[0]]['k']}")
    ax.set_title("Spatial retrieval (95% bootstrap CI)"); ax.legend()
    plots["spatial_retrieval"] = save_figure(fig, out / "spatial_retrieval.png").name

    # features on the slide: first 3 principal components as RGB at each patch's grid cell
    fig, axes = plt.subplots(1, len(feats), figsize=(3.2 * len(feats), 4))
    for ax, (name, f) in zip(np.atleast_1d(axes), feats.items()):
        x = f["features"] - f["features"].mean(0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        pcs = x @ vt[:3].T
        pcs = (pcs - pcs.min(0)) / np.maximum(np.ptp(pcs, 0), 1e-8)
        g = f["grid"] - f["grid"].min(0)
        canvas = np.ones((g[:, 1].max() + 1, g[:, 0].max() + 1, 3))
        canvas[g[:, 1], g[:, 0]] = pcs
        ax.imshow(canvas, interpolation="nearest"); ax.set_title(name); ax.axis("off")
    fig.suptitle("Feature PCA (RGB) on the patch grid")
    plots["feature_maps"] = save_figure(fig, out / "feature_maps.png").name
    return plots


def _report(out: Path, results: dict, plots: dict[str, str]) -> Path:
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{r['precision']:.3f}</td><td>[{r['precision_ci95'][0]:.3f}, "
        f"{r['precision_ci95'][1]:.3f}]</td><td>{r['normalized']:.3f}</td><td>{r['chance']:.3f}</td></tr>"
        for n, r in results["encoders"].items()
    )
    t = results["timings"]
    timing_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f}</td></tr>" for k, v in t.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>sgcl demo report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px}}img{{max-width:100%}}</style></head><body>
<h1>sgcl demo report</h1>
<p>Slide: <code>{html.escape(results['config']['slide'])}</code> — {results['n_patches']} patches of
{results['config']['patch_size']} px at {results['config']['target_mpp']} µm/px.
<a href="tiles/index.html">Tiling QC page</a> · <a href="results.json">results.json</a> ·
MIL features: <code>features/&lt;encoder&gt;/h5_files</code>, <code>pt_files</code>.</p>
<h2>Pretraining</h2><img src="{plots['loss_curves']}">
<h2>Spatial retrieval (label-free)</h2>
<p>For each patch, the fraction of its {results['config']['knn_k']} nearest neighbours in feature space that are
its spatial neighbours on the slide (grid distance ≤ {results['config']['radius']}). The demo slide carries no labels,
so no classification accuracy is reported. A tiny budget on one small slide: read it as a pipeline check and a
direction, not a benchmark.</p>
<table><tr><th>encoder</th><th>precision@k</th><th>95% CI</th><th>normalised</th><th>chance</th></tr>{rows}</table>
<img src="{plots['spatial_retrieval']}"><img src="{plots['feature_maps']}">
<h2>Timings (s)</h2><table>{timing_rows}</table></body></html>"""
    dest = out / "report.html"
    atomic_write_text(dest, page)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sgcl demo", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--out", dest="out_dir", default=None, help="output folder (default demo_out)")
    parser.add_argument("--slide", default=None, help="slide to run on (default: the shipped demo slide)")
    parser.add_argument("--epochs", type=int, default=None, help="pretraining epochs per method")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    cfg = config_from_args(DemoConfig, args, {"out_dir": "out_dir", "slide": "slide", "epochs": "epochs", "device": "device"})
    if not Path(_resolve(cfg.slide)).is_file():
        print(f"sgcl demo: slide {cfg.slide} not found; pass --slide PATH", file=sys.stderr)
        return 2
    run_demo(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())

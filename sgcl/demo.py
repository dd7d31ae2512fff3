"""``sgcl demo``: the whole pipeline on the demo slide shipped in the repo, in minutes on a CPU.

tile the slide -> pretrain SGCL and MoCo v2 with the same small budget -> export MIL features for
SGCL, MoCo v2 and the same backbone at random initialisation -> label-free evaluation (spatial
retrieval with bootstrap CIs, feature maps on the slide) -> one HTML report linking everything.

The demo slide has no labels, and the demo invents none: it reports spatial retrieval (for each
patch, the fraction of its k nearest feature-space neighbours that are its spatial neighbours). When
a labelled patch set is at hand (default: the CRC-VAL-HE-7K sample of ``../shared/data``; any
``<class>/*.jpg`` folder), the report adds a labelled check: cross-validated kNN and linear-probe
balanced accuracy of every encoder (``evaluation.crossval``). The report ends with a heatmap of the
slide (``evaluation.heatmap_cli.heatmap_slide``): with the labelled set, each patch's probability of tumour
(TUM) under a linear probe fitted on the labelled set; without it, each patch's spatial-retrieval precision.

Examples::

    sgcl demo --out demo_out
    # a quicker run on the CPU, without the labelled check
    sgcl demo --out demo_quick --epochs 5 --device cpu labelled_dir=""
    sgcl demo --slide /data/slides/case01.svs --out demo_case01 methods=[sgcl]
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

from sgcl.cli import examples_epilog
from sgcl.config import add_config_arguments, bounded, config_from_args, print_config, to_dict
from sgcl.train.logging import read_metric_rows
from sgcl.utils.atomic import atomic_write_json, atomic_write_text, ensure_writable_dir

REPO = Path(__file__).resolve().parents[1]


@dataclass
class DemoConfig:
    slide: str = "data/demo/CMU-1-Small-Region.svs"  # the slide to run on (default: the shipped CC0 demo slide)
    out_dir: str = "demo_out"
    target_mpp: float = bounded(0.5, gt=0)  # µm/px of the patches
    patch_size: int = bounded(96, ge=1)  # patch side in pixels (small, so the demo slide yields ~230 patches)
    pretrain_config: str = "configs/pretrain/demo_cpu.yaml"  # paths relative to the cwd, else to the repo
    methods: list[str] = field(default_factory=lambda: ["sgcl", "moco_v2"])  # trained with the same budget
    epochs: int = bounded(60, ge=1)  # pretraining epochs per method (~4 min for both on 2 CPU cores)
    device: str = "auto"                  # auto: a GPU when present, else the CPU
    knn_k: int = bounded(8, ge=1)  # neighbours for spatial retrieval
    radius: float = bounded(1.5, gt=0)  # grid cells that count as spatial neighbours (8-neighbourhood)
    labelled_dir: str = "../shared/data/patches/crc-val-he-7k-sample"  # <class>/* images for the labelled check ("" = skip)
    labelled_mpp: float = bounded(0.5, gt=0)  # µm/px of those images (resized to target_mpp)
    seed: int = bounded(0, ge=0)


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
    out = ensure_writable_dir(cfg.out_dir)
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
        curves[name] = {"rows": read_metric_rows(run_dir),
                        "negatives": pcfg.method.moco.queue_size if name == "moco_v2" else pcfg.method.sgcl.num_negatives}
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

    # 4. evaluation -----------------------------------------------------------------------------------------
    t0 = _step("4/4 evaluation: spatial retrieval and the labelled check", log)
    results: dict = {"config": to_dict(cfg), "encoders": {}}
    per_patch: dict[str, np.ndarray] = {}
    for name, f in feats.items():
        r = spatial_retrieval(torch.as_tensor(f["features"]), torch.as_tensor(f["slide"]), torch.as_tensor(f["grid"]),
                              k=cfg.knn_k, radius=cfg.radius)
        pp = r.pop("per_patch")
        valid = pp["valid"]
        prec = pp["hits"][valid] / r["k"]
        per_patch[name] = np.where(np.asarray(valid), np.asarray(pp["hits"], np.float64) / r["k"], np.nan)
        lo, hi = bootstrap_ci(prec, seed=cfg.seed)
        results["encoders"][name] = {**r, "precision_ci95": [lo, hi], "encoder": encoders[name]}
        log(f"  {name:<12} spatial retrieval precision@{r['k']} = {r['precision']:.3f} "
            f"[{lo:.3f}, {hi:.3f}]  (chance {r['chance']:.3f})")
    probe_name = next((m for m in cfg.methods if m in encoders), "random_init")
    probe_data: dict = {}
    results["labelled"] = _labelled_check(cfg, encoders, log, probe_name, probe_data)
    plots = _plots(out, curves, results, feats)
    timings["evaluation_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results["heatmap"] = _heatmap(cfg, out, probe_name, probe_data, per_patch, h5_dir, log)
    timings["heatmap_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all
    results["timings"] = timings
    results["n_patches"] = int(len(next(iter(feats.values()))["features"]))
    atomic_write_json(out / "results.json", results)
    report = _report(out, results, plots)
    log(f"\nDone in {timings['total_s']:.0f} s. Open {report} in a browser.")
    return results


def _labelled_check(cfg: DemoConfig, encoders: dict[str, str], log, probe_name: str = "", probe_data: dict | None = None) -> dict:
    """Cross-validated kNN and linear-probe balanced accuracy of every encoder on a labelled patch set
    (split by tile: the sample's file names carry no patient id). Skipped, with the reason, when the
    set is absent. ``probe_data`` receives ``probe_name``'s labelled features, labels, classes and the
    median L2 its cross-validation chose (for the heatmap's probe)."""
    import cv2

    from evaluation.crossval import crossval_scores
    from evaluation.embedding import embed_dataset, load_encoder
    from evaluation.labels import from_class_folders, read_image

    folder = Path(_resolve(cfg.labelled_dir)) if cfg.labelled_dir else None
    if folder is None or not folder.is_dir():
        why = f"no labelled set at {cfg.labelled_dir!r} (pass labelled_dir=<folder of class folders>)"
        log(f"  labelled check skipped: {why}")
        return {"skipped": why}
    lset = from_class_folders(folder)
    scale = cfg.labelled_mpp / cfg.target_mpp
    images = []
    for item in lset.items:
        img = read_image(item[1])
        if abs(scale - 1) > 1e-3:
            img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        images.append(img)
    labels, names = lset.label_indices(), lset.classes
    tiles = [Path(item[1]).name for item in lset.items]
    out: dict = {"set": str(folder), "items": len(images), "classes": names, "split": "5 folds of tiles (no patient id)"}
    for name, spec in encoders.items():
        enc = load_encoder(spec, input_size=max(images[0].shape[:2]))
        feats = embed_dataset(enc, images, batch_size=32, num_workers=0, device=cfg.device, precision="fp32")
        r = crossval_scores(feats, labels, tiles, names, name=folder.name, seed=cfg.seed, n_boot=500)
        out[name] = {probe: r[probe]["balanced_accuracy"] for probe in ("knn", "linear")}
        if name == probe_name and probe_data is not None:
            probe_data.update(features=feats, labels=labels, classes=list(names),
                              l2=float(np.median(r["linear"]["chosen"])))
        out["chance"] = r["chance"]
        log(f"  {name:<12} labelled check ({folder.name}): kNN balanced accuracy {out[name]['knn']['value']:.3f}, "
            f"linear {out[name]['linear']['value']:.3f} (chance {r['chance']:.3f})")
    return out


def _heatmap(cfg: DemoConfig, out: Path, encoder: str, probe_data: dict, per_patch: dict, h5_dir: Path, log) -> dict:
    """The slide's heatmap: P(tumour) of a linear probe fitted on the labelled set (all of it, at the L2 its
    cross-validation chose) when that set has a TUM class, else each patch's spatial-retrieval precision."""
    import h5py

    from evaluation.heatmap_cli import HeatmapConfig, heatmap_slide

    feat_file = next(iter(sorted((out / "features" / encoder / "h5_files").glob("*.h5"))))
    with h5py.File(feat_file, "r") as f:
        features, coords = f["features"][:].astype(np.float32), f["coords"][:]
        sid = str(f.attrs.get("slide_id") or feat_file.stem)
        size0 = float(f["coords"].attrs["patch_size_level0"])
    if "TUM" in probe_data.get("classes", []):
        from evaluation.linear import fit_logistic

        classes = probe_data["classes"]
        probe = fit_logistic(probe_data["features"], probe_data["labels"], len(classes), probe_data["l2"])
        score = probe.predict_proba(features)[:, classes.index("TUM")].numpy()
        name, vmin, vmax = "p_tumour", 0.0, 1.0
        what = (f"the probability of tumour (TUM) that a linear probe on {encoder} features gives each patch; the "
                f"probe is fitted on all {len(probe_data['labels'])} labelled tiles ({len(classes)} classes, L2 "
                f"{probe_data['l2']:g} as chosen by the cross-validation above). The labelled tiles are colorectal "
                "(CRC) tissue and this slide is not, so read it as what the probe sees, not a diagnosis")
    else:
        score = per_patch[encoder]
        name, vmin, vmax = "spatial_retrieval", 0.0, 1.0
        what = (f"each patch's spatial-retrieval precision under {encoder} features: the fraction of its "
                f"{cfg.knn_k} nearest feature-space neighbours that are its spatial neighbours (no labelled set, "
                "so no probe; white patches have too few spatial neighbours to score)")
    hcfg = HeatmapConfig(normalize="raw", vmin=vmin, vmax=vmax, cmap="coolwarm", alpha=0.55, max_size=1024,
                         topk=10, gallery=6, gallery_tile=96, progress=False)
    row = heatmap_slide(Path(cfg.slide), sid, coords, size0, {name: score}, hcfg, out / "heatmap",
                        h5_dir / f"{sid}.h5", {"encoder": encoder})
    log(f"  heatmap of {name} ({encoder}) -> {out / 'heatmap' / row['heatmap']}")
    return {"score": name, "encoder": encoder, "what": what,
            **{k: f"heatmap/{row[k]}" for k in ("heatmap", "gallery", "topk_geojson", "scores_h5")}}


def _heatmap_html(heat: dict) -> str:
    return (f"<h2>Heatmap</h2><p>Colour: {html.escape(heat['what'])}. Drawn with <code>sgcl heatmap</code>'s "
            f"renderer (coolwarm, 0 blue to 1 red). The 10 highest patches for QuPath: "
            f"<a href='{heat['topk_geojson']}'>{html.escape(heat['topk_geojson'])}</a>; per-patch scores: "
            f"<a href='{heat['scores_h5']}'>{html.escape(heat['scores_h5'])}</a>.</p>"
            f"<img src='{heat['heatmap']}'><p>Highest (top row) and lowest (bottom row) patches:</p>"
            f"<img src='{heat['gallery']}'>")


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

    plots = {"training_curves": _training_curves(out, curves)}
    if "skipped" not in results["labelled"]:
        plots["labelled_check"] = _labelled_plot(out, results["labelled"])

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


#: InfoNCE-type terms whose chance level is ln(1 + negatives): (method, logged key, label)
INSTANCE_TERMS = [("moco_v2", "loss", "MoCo v2 InfoNCE"), ("sgcl", "loss_single", "SGCL self (NPID)"),
                  ("sgcl", "loss_mcrop", "SGCL quadrants (NPID)")]


def _training_curves(out: Path, curves: dict) -> str:
    """Left: each instance term over its chance level ln(1 + K) (below 1 = the encoder tells patches
    apart). Middle: SGCL's spatial term. Right: the spread of the bank/queue rows and backbone
    features (mean cosine of random pairs; → 1 is collapse)."""
    import math

    import matplotlib.pyplot as plt

    from evaluation.reports import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for method, key, label in INSTANCE_TERMS:
        rows = [r for r in curves.get(method, {}).get("rows", []) if key in r]
        if rows:
            chance = math.log(1 + curves[method]["negatives"])
            axes[0].plot([r["step"] for r in rows], [r[key] / chance for r in rows], label=label)
    axes[0].axhline(1.0, color="k", ls="--", lw=1)
    axes[0].set_title("instance terms / chance level ln(1+K)"); axes[0].set_xlabel("step"); axes[0].legend(fontsize=8)
    rows = [r for r in curves.get("sgcl", {}).get("rows", []) if "loss_spatial_raw" in r]
    if rows:
        axes[1].plot([r["step"] for r in rows], [r["loss_spatial_raw"] for r in rows], label="L_sp (unweighted)")
        axes[1].plot([r["step"] for r in rows], [r["ramp_weight"] * max(r["loss_spatial_raw"] for r in rows) for r in rows],
                     ":", label="ramp weight (scaled)")
        axes[1].legend(fontsize=8)
    axes[1].set_title("SGCL spatial/semantic term"); axes[1].set_xlabel("step")
    for method, style in (("sgcl", "-"), ("moco_v2", "--")):
        for r_name in ("bank", "queue", "embedding", "backbone"):
            rows = [r for r in curves.get(method, {}).get("rows", []) if f"health/{r_name}_mean_cos" in r]
            if rows:
                axes[2].plot([r["step"] for r in rows], [r[f"health/{r_name}_mean_cos"] for r in rows], style,
                             label=f"{method} {r_name}")
    axes[2].set_ylim(0, 1.02); axes[2].set_title("spread: mean cosine of random pairs (1 = collapse)")
    axes[2].set_xlabel("step"); axes[2].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out / "training_curves.png").name


def _labelled_plot(out: Path, lab: dict) -> str:
    import matplotlib.pyplot as plt

    from evaluation.reports import save_figure

    names = [k for k in lab if isinstance(lab[k], dict) and "knn" in lab[k]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(names))
    for i, (probe, colour) in enumerate((("knn", "#1f77b4"), ("linear", "#ff7f0e"))):
        v = np.array([lab[n][probe]["value"] for n in names])
        err = np.array([[v[j] - lab[n][probe]["low"], lab[n][probe]["high"] - v[j]] for j, n in enumerate(names)]).T
        ax.bar(x + (i - 0.5) * 0.38, v, 0.38, yerr=np.maximum(err, 0), capsize=3, color=colour, label=probe)
    ax.axhline(lab["chance"], color="k", ls="--", lw=1, label="chance")
    ax.set_xticks(x, names); ax.set_ylabel("balanced accuracy"); ax.legend(fontsize=8)
    ax.set_title(f"Labelled check: {Path(lab['set']).name} (95% CI)")
    return save_figure(fig, out / "labelled_check.png").name


def _labelled_html(lab: dict, plots: dict[str, str]) -> str:
    if "skipped" in lab:
        return f"<h2>Labelled check</h2><p>Skipped: {html.escape(lab['skipped'])}.</p>"
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td>" + "".join(
            f"<td>{lab[n][p]['value']:.3f} [{lab[n][p]['low']:.3f}, {lab[n][p]['high']:.3f}]</td>" for p in ("knn", "linear"))
        + "</tr>" for n in lab if isinstance(lab[n], dict) and "knn" in lab[n])
    return (f"<h2>Labelled check</h2><p>{lab['items']} labelled tiles of <code>{html.escape(lab['set'])}</code> "
            f"({len(lab['classes'])} classes), embedded by each encoder and scored by cross-validated kNN and linear "
            f"probe ({html.escape(lab['split'])}; hyper-parameters chosen inside the training folds). Chance "
            f"{lab['chance']:.3f}. One seed and a few minutes of CPU pretraining: a direction, not a benchmark.</p>"
            f"<table><tr><th>encoder</th><th>kNN balanced accuracy [95% CI]</th><th>linear probe</th></tr>{rows}</table>"
            f"<img src=\"{plots['labelled_check']}\">")


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
<h2>Pretraining</h2>
<p>The total training loss is not the curve to watch. Every instance term (MoCo v2's InfoNCE, SGCL's NPID self
and quadrant terms) starts <em>below</em> its chance level ln(1 + K): the queue or memory bank starts as random
vectors, which are easy negatives. It rises to chance while the queue/bank fills with features of real patches,
which an untrained encoder maps close together, and only then falls as the encoder learns to tell patches apart.
SGCL's total is the sum of three such terms plus the ramped spatial term, so it is about three times MoCo's and
steps up as the ramp weight grows and the bank is refreshed each epoch. The left panel puts each term over its
chance level; the right panel shows the spread of the bank/queue rows and of the backbone features: a mean cosine
of random pairs near 1 is a collapse (the trainer also warns in its log and writes <code>health.json</code>).</p>
<img src="{plots['training_curves']}">
{_labelled_html(results['labelled'], plots)}
<h2>Spatial retrieval (label-free)</h2>
<p>For each patch, the fraction of its {results['config']['knn_k']} nearest neighbours in feature space that are
its spatial neighbours on the slide (grid distance ≤ {results['config']['radius']}). A tiny budget on one small
slide: read it as a pipeline check and a direction, not a benchmark (docs/quality.md has the measured
comparison).</p>
<table><tr><th>encoder</th><th>precision@k</th><th>95% CI</th><th>normalised</th><th>chance</th></tr>{rows}</table>
<img src="{plots['spatial_retrieval']}"><img src="{plots['feature_maps']}">
<h2>Timings (s)</h2><table>{timing_rows}</table>
{_heatmap_html(results['heatmap'])}</body></html>"""
    dest = out / "report.html"
    atomic_write_text(dest, page)
    return dest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgcl demo", description=__doc__.splitlines()[0], epilog=examples_epilog(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, example="knn_k=16")
    parser.add_argument("--out", dest="out_dir", default=None, help="output folder (default demo_out)")
    parser.add_argument("--slide", default=None, help="slide to run on (default: the shipped demo slide)")
    parser.add_argument("--epochs", type=int, default=None, help="pretraining epochs per method")
    parser.add_argument("--device", default=None, help="auto | cpu | cuda")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(DemoConfig, args, {"out_dir": "out_dir", "slide": "slide", "epochs": "epochs", "device": "device"})
    if args.print_config:
        print_config(cfg)
        return 0
    if not Path(_resolve(cfg.slide)).is_file():
        print(f"sgcl demo: slide {cfg.slide} not found; pass --slide PATH", file=sys.stderr)
        return 2
    from sgcl.utils.threads import configure_threads, release_threads

    # every stage runs in this process with 0 loader workers; the tiling child gets the cores too
    print(configure_threads(workers=0).describe())
    try:
        run_demo(cfg)
    finally:
        release_threads()
    return 0


if __name__ == "__main__":
    sys.exit(main())

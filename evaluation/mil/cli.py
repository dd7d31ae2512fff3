"""``sgcl eval mil``: slide-level MIL with patient-level cross-validation on per-slide feature bags.

Examples::

    sgcl eval mil --features outputs/features --labels slides.csv --out outputs/eval/mil
    sgcl eval mil --config configs/eval/mil.yaml model.name=clam_sb cv.folds=10
    sgcl eval mil --features job/20x_256px_0px_overlap/features_uni_v1 --labels slides.csv --model mean
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from sgcl import __version__
from sgcl.cli import examples_epilog
from sgcl.config import ConfigError, add_config_arguments, bounded, config_from_args, print_config, to_dict
from sgcl.utils.atomic import atomic_path, atomic_write_json, ensure_writable_dir


@dataclass
class MilDataConfig:
    features: Optional[str] = None         # features folder: h5_files/+pt_files/ (ours, CLAM), features_<enc>/ (TRIDENT)
    labels: Optional[str] = None           # CSV: slide_id,label[,patient][,split]
    slide_column: str = "slide_id"
    label_column: str = "label"
    patient_column: str = "patient"        # absent column: each slide is its own patient
    split_column: str = "split"            # present column (train/val/test): used instead of cross-validation
    prefer: Literal["h5", "pt"] = "h5"     # file read when a slide has both
    max_patches_per_bag: Optional[int] = bounded(None, ge=1)  # training only: random patches per bag per epoch (None = all)
    num_workers: int = bounded(0, ge=0)  # bag reader processes


@dataclass
class MilModelConfig:
    name: Literal["mean", "abmil", "clam_sb"] = "abmil"
    hidden_dim: int = bounded(256, ge=1)  # instance embedding size
    attention_dim: int = bounded(128, ge=1)  # gated attention size (abmil, clam_sb)
    dropout: float = bounded(0.25, ge=0, lt=1)
    k_sample: int = bounded(8, ge=1)  # clam_sb: top-k / bottom-k attended instances for the instance loss
    bag_weight: float = bounded(0.7, ge=0, le=1)  # clam_sb: loss = bag_weight·bag CE + (1 − bag_weight)·instance loss
    inst_loss: Literal["ce", "svm"] = "ce"  # clam_sb: instance loss, cross-entropy or smoothed binary SVM
    subtyping: bool = True                 # clam_sb: top-k of a bag are also negatives for the other classes


@dataclass
class MilTrainConfig:
    epochs: int = bounded(50, ge=1)
    lr: float = bounded(2e-4, gt=0)
    weight_decay: float = bounded(1e-4, ge=0)  # AdamW
    min_lr_ratio: float = bounded(0.01, ge=0, le=1)  # cosine schedule floor, as a fraction of lr
    patience: int = bounded(10, ge=1)  # early stopping: epochs without a lower validation loss
    min_epochs: int = bounded(5, ge=0)  # no early stop before this epoch
    class_weights: bool = True             # inverse-frequency class weights in the bag loss
    device: str = "auto"


@dataclass
class MilCVConfig:
    folds: int = bounded(5, ge=2)  # patient-level stratified folds (leave-one-patient-out when fewer patients)
    val_fraction: float = bounded(0.2, ge=0, lt=1)  # share of each training part's patients for validation (0 = none)


@dataclass
class MilReportConfig:
    bootstrap: int = bounded(1000, ge=0)  # patient-bootstrap resamples for 95% CIs (0 = off)
    plots: bool = True


@dataclass
class MilConfig:
    out_dir: str = "outputs/eval/mil"
    seed: int = bounded(0, ge=0)  # folds, initialisation, patch sampling, bootstrap
    progress: bool = True
    data: MilDataConfig = field(default_factory=MilDataConfig)
    model: MilModelConfig = field(default_factory=MilModelConfig)
    train: MilTrainConfig = field(default_factory=MilTrainConfig)
    cv: MilCVConfig = field(default_factory=MilCVConfig)
    report: MilReportConfig = field(default_factory=MilReportConfig)


FLAG_MAP = {"out": "out_dir", "features": "data.features", "labels": "data.labels", "model": "model.name"}


def model_kwargs(m: MilModelConfig) -> dict:
    return {"hidden_dim": m.hidden_dim, "attention_dim": m.attention_dim, "dropout": m.dropout,
            "k_sample": m.k_sample, "subtyping": m.subtyping, "inst_loss": m.inst_loss}


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def run_mil(cfg: MilConfig) -> dict:
    """Cross-validate one MIL model; writes everything to ``cfg.out_dir`` and returns ``results.json``'s dict."""
    from evaluation.mil.data import load_cohort
    from evaluation.mil.folds import check_patient_disjoint, patient_folds
    from evaluation.mil.report import metrics_with_ci, prediction_rows, write_report
    from evaluation.mil.train import TrainOptions, predict, train_fold
    from evaluation.reports import write_csv, write_results

    t0 = time.perf_counter()
    d = cfg.data
    if not d.features or not d.labels:
        raise ConfigError("sgcl eval mil needs --features FEATS_DIR and --labels slides.csv "
                          "(data.features=, data.labels=)")
    if cfg.cv.folds < 2:
        raise ConfigError(f"cv.folds: {cfg.cv.folds} — use at least 2 folds (or a split column in the CSV)")
    if not 0.0 <= cfg.cv.val_fraction < 1.0:
        raise ConfigError(f"cv.val_fraction: {cfg.cv.val_fraction} — use a value in [0, 1)")
    cohort = load_cohort(d.labels, d.features, d.label_column, d.slide_column, d.patient_column, d.split_column,
                         d.prefer)
    if cohort.ignored_empty:
        from sgcl.utils.empty_slides import ignored_empty_note

        print(f"sgcl eval mil: {ignored_empty_note(cohort.ignored_empty)}", file=sys.stderr)
    folds = patient_folds(cohort.labels, cohort.patients, cfg.cv.folds, cfg.cv.val_fraction, cfg.seed, cohort.splits)
    check_patient_disjoint(folds, cohort.patients)
    out = ensure_writable_dir(cfg.out_dir)
    c = len(cohort.classes)
    device = _device(cfg.train.device)
    kwargs = model_kwargs(cfg.model)
    atomic_write_json(out / "config.json", {
        "classes": cohort.classes, "feature_dim": cohort.feature_dim, "model": {"name": cfg.model.name, "kwargs": kwargs},
        "folds": [f.fold for f in folds], "scheme": folds[0].scheme, "sgcl_version": __version__, "config": to_dict(cfg),
        "ignored_empty_slides": cohort.ignored_empty, "fold_slides": {str(f.fold): {s: [cohort.slides[i] for i in getattr(f, s)] for s in ("train", "val", "test")}
                        for f in folds}})
    t = cfg.train
    opt = TrainOptions(cfg.model.name, kwargs, t.epochs, t.lr, t.weight_decay, t.min_lr_ratio, t.patience, t.min_epochs,
                       t.class_weights, cfg.model.bag_weight, d.max_patches_per_bag, d.num_workers, device, cfg.seed,
                       cfg.progress)
    per_fold, pooled_rows, ys, probas, fold_of, pats = [], [], [], [], [], []
    from evaluation.mil.models import build_model

    for f in folds:
        if len(f.train) == 0 or len(f.test) == 0:
            raise ValueError(f"fold {f.fold}: empty {'training' if len(f.train) == 0 else 'test'} split; "
                             "check the split column of " + str(d.labels))
        tf = time.perf_counter()
        state, history, best_epoch = train_fold(cohort, f, opt)
        fdir = out / f"fold_{f.fold}"
        fdir.mkdir(exist_ok=True)
        with atomic_path(fdir / "model.pt") as tmp:
            torch.save(state, tmp)
        write_csv(fdir / "history.csv", history)
        model = build_model(cfg.model.name, cohort.feature_dim, c, **kwargs).to(device)
        model.load_state_dict(state)
        proba, _ = predict(model, cohort, f.test, torch.device(device), workers=d.num_workers)
        rows = prediction_rows(cohort, f.test, proba, f.fold, "test")
        if len(f.val):
            vproba, _ = predict(model, cohort, f.val, torch.device(device), workers=d.num_workers)
            rows += prediction_rows(cohort, f.val, vproba, f.fold, "val")
        write_csv(fdir / "predictions.csv", rows)
        y = cohort.labels[f.test]
        fp = [cohort.patients[i] for i in f.test]
        per_fold.append({"fold": f.fold, "metrics": metrics_with_ci(y, proba, c, fp, cfg.report.bootstrap, cfg.seed),
                         "best_epoch": best_epoch, "epochs_run": len(history),
                         "n": {"train": int(len(f.train)), "val": int(len(f.val)), "test": int(len(f.test))},
                         "test_patients": sorted(set(fp)), "val_patients": sorted({cohort.patients[i] for i in f.val}),
                         "seconds": round(time.perf_counter() - tf, 3)})
        pooled_rows += rows[: len(f.test)]
        ys.append(y)
        probas.append(proba)
        fold_of.append(np.full(len(y), f.fold))
        pats += fp
    y, proba = np.concatenate(ys), np.concatenate(probas)
    pooled = {"fold": "pooled", "metrics": metrics_with_ci(y, proba, c, pats, cfg.report.bootstrap, cfg.seed),
              "y": y, "proba": proba, "folds": np.concatenate(fold_of), "rows": pooled_rows}
    files = write_report(out, cohort, per_fold, pooled, cfg.report.plots)
    counts = np.bincount(cohort.labels, minlength=c)
    results = {
        "protocol": "mil", "sgcl_version": __version__, "model": cfg.model.name, "classes": cohort.classes,
        "n": {"slides": len(cohort.slides), "patients": len(set(cohort.patients)),
              "per_class": {k: int(v) for k, v in zip(cohort.classes, counts)}},
        "feature_dim": cohort.feature_dim, "features": str(d.features), "labels": str(d.labels),
        "folds": {"scheme": folds[0].scheme, "n_folds": len(folds), "unit": "patient",
                  "inner": "validation patients per fold for early stopping (val_fraction)"
                  if folds[0].scheme != "given (split column)" else "the split column's val rows"},
        "pooled": pooled["metrics"], "per_fold": per_fold, "confusion_matrix": pooled["confusion_matrix"],
        "ci": f"percentile bootstrap over patients, {cfg.report.bootstrap} resamples, 95%",
        "files": {**files, "config": str(out / "config.json"),
                  "models": [str(out / f"fold_{f.fold}" / "model.pt") for f in folds]},
        "config": to_dict(cfg), "device": device, "seconds": round(time.perf_counter() - t0, 3),
    }
    write_results(out, results)
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgcl eval mil", description=__doc__.split("\n\n")[0],
                                epilog=examples_epilog(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", help="features folder of `sgcl extract`, CLAM or TRIDENT (data.features=)")
    p.add_argument("--labels", help="CSV slide_id,label[,patient][,split] (data.labels=)")
    p.add_argument("--out", help="output folder (out_dir=)")
    p.add_argument("--model", choices=["mean", "abmil", "clam_sb"], help="MIL model (model.name=)")
    add_config_arguments(p, example="model.name=abmil")
    return p


def _headline(r: dict) -> str:
    m = r["pooled"]
    return ", ".join(f"{k} {m[k]['value']:.3f}" for k in ("auroc_ovr", "balanced_accuracy", "f1_macro") if k in m)


def main(argv: list[str] | None = None) -> int:
    from evaluation.extract import parse_args
    from evaluation.mil.data import MilDataError

    args = parse_args(build_parser(), argv)
    try:
        cfg = config_from_args(MilConfig, args, FLAG_MAP)
        if args.print_config:
            print_config(cfg)
            return 0
        from sgcl.utils.threads import configure_threads, resolve_workers

        cfg.data.num_workers = resolve_workers(cfg.data.num_workers, "data.num_workers")
        configure_threads(workers=cfg.data.num_workers)
        results = run_mil(cfg)
    except (ConfigError, MilDataError, ValueError, FileNotFoundError) as exc:
        print(f"sgcl eval mil: error: {exc}", file=sys.stderr)
        return 2
    print(f"sgcl eval mil: {results['model']}, {results['folds']['n_folds']} folds by patient, pooled {_headline(results)} "
          f"-> {Path(cfg.out_dir) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

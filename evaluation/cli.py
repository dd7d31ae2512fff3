"""``sgcl eval knn|linear|fewshot|seg|mil``: thin wrappers over the pure evaluation functions.

Each protocol reads a labelled set (class folders, a CSV, HDF5 patches + labels CSV, or a features
file computed earlier), embeds it with the encoder (cached), splits it group-aware when the data
has no splits, runs the protocol and writes ``results.json``, CSV tables and PNG plots to
``out_dir``. ``seg`` is dispatched to ``evaluation.segmentation.cli``, ``mil`` (slide-level MIL on
feature bags, docs/mil.md) to ``evaluation.mil.cli``.

Examples::

    sgcl eval knn --config configs/eval/knn.yaml data.root=/data/NCT-CRC-HE-100K encoder.spec=outputs/export
    sgcl eval knn --config configs/eval/knn.yaml encoder.spec=uni encoder.weights=/models/UNI knn.temperature=0.1
    sgcl eval linear data.kind=csv data.csv=labels.csv encoder.spec=resnet50 out_dir=outputs/eval/linear
    sgcl eval linear --config configs/eval/linear.yaml --encoder runs/sgcl/export --data-root /data/nct-crc linear.max_iter=1000
    sgcl eval fewshot data.kind=features data.features=outputs/eval/features.pt fewshot.shots=[1,4,16]
    sgcl eval fewshot --config configs/eval/fewshot.yaml --encoder resnet50 --data-root /data/nct-crc fewshot.l2=0.1
"""

from __future__ import annotations

import argparse
import importlib
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
from sgcl.utils.atomic import ensure_writable_dir

PROTOCOLS = ("knn", "linear", "fewshot", "seg", "mil")
OVERRIDE_EXAMPLES = {"knn": "knn.temperature=0.1", "linear": "linear.max_iter=1000", "fewshot": "fewshot.l2=0.1"}


@dataclass
class DataConfig:
    kind: Literal["folders", "csv", "h5", "features"] = "folders"
    root: Optional[str] = None             # folders: root/<class>/*.png
    csv: Optional[str] = None              # csv: path,label[,split][,group]; h5: slide_id,index|x,y,label
    h5: list[str] = field(default_factory=list)  # h5: patch files or folders
    features: Optional[str] = None         # features: a FeatureSet file (.pt/.npz) from features.cache
    test_features: Optional[str] = None    # optional separate test FeatureSet (then `features` is train/val)
    split: list[float] = bounded(default_factory=lambda: [0.6, 0.2, 0.2], ge=0)  # train/val/test, used when no splits given (normalised to sum 1)
    seed: int = bounded(0, ge=0)

    def validate(self) -> None:
        """split is three fractions (train, val, test) with a positive sum."""
        if len(self.split) != 3 or sum(self.split) <= 0:
            raise ConfigError(f"split: {self.split} must be three fractions (train, val, test) with a positive sum", key="split")


@dataclass
class EncoderConfig:
    spec: str = "resnet50"                 # export folder / weights file / registry encoder (uni, ...) / timm model name
    weights: Optional[str] = None          # a registry encoder's weights: file, folder or HF cache folder (docs/encoders.md)
    model_name: Optional[str] = None
    input_size: Optional[int] = bounded(None, ge=1)
    batch_size: int = bounded(64, ge=1)
    num_workers: Optional[int] = bounded(None, ge=0)  # loader workers; unset: min(8, allowed cores - 1) (docs/threads.md)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    cache: Optional[str] = None            # features cache (.pt/.npz); default <out_dir>/features.pt


@dataclass
class KnnConfig:
    ks: list[int] = bounded(default_factory=lambda: [10, 20, 100, 200], ge=1)  # neighbours; a k above the bank size is clipped to it, with a warning
    temperature: float = bounded(0.07, gt=0)
    backend: Literal["faiss", "torch"] = "faiss"   # exact search: faiss | torch (same predictions)
    batch_size: int = bounded(4096, ge=1)  # queries per search batch
    index: Literal["auto", "exact", "ivf", "hnsw"] = "auto"  # auto: exact up to exact_max bank items, else ivf
    exact_max: int = bounded(200_000, ge=0)  # index=auto: exact search up to this many bank items
    nlist: Optional[int] = bounded(None, ge=1)  # ivf lists; None = power of two nearest sqrt(N)/4
    nprobe: Optional[int] = bounded(None, ge=1)  # ivf lists searched; None = max(16, nlist // 8)
    scan: Literal["float32", "int8"] = "float32"  # ivf list scan: float32, or int8 residual codes + exact re-rank
    rerank: int = bounded(8, ge=1)  # ivf int8 scan: candidates re-scored exactly per query = rerank * k
    hnsw_m: Optional[int] = bounded(None, ge=2)  # hnsw graph degree; None = 48
    ef_search: Optional[int] = bounded(None, ge=1)  # hnsw search breadth; None = max(256, 4 k)
    seed: int = bounded(0, ge=0)  # ivf k-means training sample and init

    def validate(self) -> None:
        """ks is not empty (a k above the bank size is clipped to it at run time, with a warning in results.json)."""
        if not self.ks:
            raise ConfigError("ks: give at least one k, e.g. [10, 20]", key="ks")


@dataclass
class LinearConfig:
    l2_grid: list[float] = bounded(default_factory=lambda: [float(x) for x in np.logspace(-6, 2, 9)], ge=0)  # L2 strengths swept on val
    normalize: Literal["none", "standard", "l2"] = "standard"
    max_iter: int = bounded(500, ge=1)

    def validate(self) -> None:
        """l2_grid is not empty."""
        if not self.l2_grid:
            raise ConfigError("l2_grid: give at least one L2 strength, e.g. [1e-4, 1e-2]", key="l2_grid")


@dataclass
class FewshotConfig:
    shots: list[int] = bounded(default_factory=lambda: [1, 2, 4, 8, 16], ge=1)  # labelled items per class
    seeds: list[int] = bounded(default_factory=lambda: [0, 1, 2, 3, 4], ge=0)
    l2: float = bounded(0.01, ge=0)
    normalize: Literal["none", "standard", "l2"] = "standard"

    def validate(self) -> None:
        """shots and seeds are not empty."""
        for name in ("shots", "seeds"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: give at least one value", key=name)


@dataclass
class ReportConfig:
    bootstrap: int = bounded(1000, ge=0)  # resamples for 95% CIs (0 = off)
    plots: bool = True
    map: Literal["pca", "tsne", "none"] = "pca"


@dataclass
class EvalConfig:
    out_dir: str = "outputs/eval"
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


FLAG_MAP = {"out": "out_dir", "encoder": "encoder.spec", "weights": "encoder.weights", "data_root": "data.root", "features": "data.features"}


def load_feature_set(cfg: EvalConfig):
    """The FeatureSet to evaluate (computed and cached, or loaded), with splits assigned."""
    from evaluation.features import FeatureSet, compute_features, load_features
    from evaluation.labels import LabelsError, load_labelled

    d = cfg.data
    if d.kind == "features":
        if not d.features:
            raise LabelsError("data.kind=features needs data.features=<features .pt/.npz>")
        fs = load_features(d.features)
    else:
        from evaluation.embedding import load_encoder

        lset = load_labelled(d.kind, d.root, d.csv, d.h5)
        e = cfg.encoder
        encoder = load_encoder(e.spec, e.model_name, e.input_size, e.weights)
        cache = e.cache or str(Path(cfg.out_dir) / "features.pt")
        fs = compute_features(lset, encoder, e.batch_size, e.num_workers, e.device, e.precision, cache, cfg.progress)
    if d.test_features:
        test = load_features(d.test_features)
        if test.features.shape[1] != fs.features.shape[1]:
            raise LabelsError(f"feature dimensions differ: {d.features} has D={fs.features.shape[1]} but "
                              f"{d.test_features} has D={test.features.shape[1]}; compute both with the same encoder")
        classes = sorted(set(fs.classes) | set(test.classes))
        remap = lambda s: torch.tensor([classes.index(s.classes[i]) for i in s.labels.tolist()], dtype=torch.long)
        frac = list(d.split[:2]) + [0.0]
        fs.classes, fs.labels = classes, remap(fs)
        fs.ensure_splits(frac, d.seed)
        n_tr = fs.features.shape[0]
        fs = FeatureSet(torch.cat([fs.features, test.features]), torch.cat([fs.labels, remap(test)]), classes,
                        list(fs.splits) + ["test"] * len(test.labels),
                        (fs.groups or [f"train#{i}" for i in range(n_tr)]) + (test.groups or [f"test#{i}" for i in range(len(test.labels))]),
                        (fs.slides + test.slides) if fs.slides and test.slides else None, fs.meta)
    else:
        fs.ensure_splits(d.split, d.seed)
    return fs


def _require(fs, names: tuple[str, ...], protocol: str) -> None:
    from evaluation.labels import LabelsError

    for name in names:
        if not any(s == name for s in fs.splits):
            raise LabelsError(f"the {name} split is empty; {protocol} needs {', '.join(names)} items "
                              f"(set data.split fractions or the CSV's split column)")


def _metrics_with_ci(cfg: EvalConfig, y, pred, proba, num_classes: int) -> dict:
    from evaluation.metrics import bootstrap_ci, classification_metrics

    if cfg.report.bootstrap > 0:
        return bootstrap_ci(y, pred, num_classes, proba, n_boot=cfg.report.bootstrap, seed=cfg.data.seed)
    return {k: {"value": v} for k, v in classification_metrics(y, pred, num_classes, proba).items()}


def run_protocol(protocol: str, cfg: EvalConfig) -> dict:
    """Run one protocol end to end; returns the results dict also written to ``results.json``."""
    from evaluation import reports

    t0 = time.perf_counter()
    out = ensure_writable_dir(cfg.out_dir)  # before features are computed
    fs = load_feature_set(cfg)
    c = fs.num_classes
    counts = {s: int(sum(1 for x in fs.splits if x == s)) for s in ("train", "val", "test")}
    results: dict = {"protocol": protocol, "sgcl_version": __version__, "classes": fs.classes, "n": counts,
                     "feature_dim": int(fs.features.shape[1]), "encoder": fs.meta, "config": to_dict(cfg)}
    files: dict[str, str] = {}
    rows: list[dict] = []
    test_idx = fs.indices("test")
    if protocol == "knn":
        from evaluation.knn import knn_classify, plan_index

        _require(fs, ("train", "test"), "kNN")
        bank_x, bank_y = fs.split(("train", "val"))
        test_x, test_y = fs.split("test")
        kc = cfg.knn
        clipped = sorted({k for k in kc.ks if k > len(bank_x)})
        if clipped:  # the vote of k > bank size uses the whole bank: say so once, and in results.json
            note = (f"knn.ks {clipped} exceed the bank of {len(bank_x)} train+val items: clipped to k={len(bank_x)} "
                    f"(their results equal k={len(bank_x)}'s)")
            print(f"sgcl eval knn: warning: {note}", file=sys.stderr)
            results.setdefault("warnings", []).append(note)
        plan = plan_index(len(bank_x), min(max(kc.ks), len(bank_x)), kc.index, kc.exact_max, kc.nlist, kc.nprobe,
                          hnsw_m=kc.hnsw_m, ef_search=kc.ef_search, seed=kc.seed, scan=kc.scan, rerank=kc.rerank)
        results["knn_index"] = plan
        res = knn_classify(bank_x, bank_y, test_x, c, kc.ks, kc.temperature, kc.backend, kc.batch_size, index=plan)
        results["knn"] = {}
        for k, r in res.items():
            m = _metrics_with_ci(cfg, test_y, r["pred"], r["proba"], c)
            results["knn"][str(k)] = m
            rows += [{"protocol": "knn", "k": k, "metric": name, **v} for name, v in m.items()]
        main_k = 20 if 20 in res else sorted(res)[0]
        pred = res[main_k]["pred"]
        files.update(reports.classification_report(out, f"knn_k{main_k}", test_y, pred, fs.classes, results, cfg.report.plots))
    elif protocol == "linear":
        from evaluation.linear import linear_probe

        _require(fs, ("train", "val", "test"), "the linear probe")
        (tx, ty), (vx, vy), (sx, sy) = fs.split("train"), fs.split("val"), fs.split("test")
        r = linear_probe(tx, ty, vx, vy, sx, sy, c, cfg.linear.l2_grid, cfg.linear.normalize, cfg.linear.max_iter)
        m = _metrics_with_ci(cfg, sy, r["pred"], r["proba"], c)
        results["linear"] = {"l2": r["l2"], "sweep": r["sweep"], "metrics": m}
        rows += [{"protocol": "linear", "l2": r["l2"], "metric": name, **v} for name, v in m.items()]
        reports.write_csv(out / "linear_sweep.csv", r["sweep"])
        files.update(reports.classification_report(out, "linear", sy, r["pred"], fs.classes, results, cfg.report.plots))
    elif protocol == "fewshot":
        from evaluation.linear import few_shot

        _require(fs, ("train", "test"), "few-shot")
        tx, ty = fs.split(("train", "val"))
        sx, sy = fs.split("test")
        r = few_shot(tx, ty, sx, sy, c, cfg.fewshot.shots, cfg.fewshot.seeds, cfg.fewshot.l2, cfg.fewshot.normalize)
        results["fewshot"] = {str(k): v for k, v in r["summary"].items()}
        reports.write_csv(out / "fewshot_runs.csv", r["runs"])
        rows += [{"protocol": "fewshot", "shots": k, "metric": name, **v} for k, s in r["summary"].items() for name, v in s.items()]
    else:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    files["metrics_csv"] = str(reports.write_csv(out / f"{protocol}_metrics.csv", rows))
    if cfg.report.plots and cfg.report.map != "none":
        names = [fs.classes[i] for i in fs.labels.tolist()]
        files.update(reports.feature_maps(out, fs.features, names, fs.slides, cfg.report.map))
    results["files"] = files
    results["seconds"] = round(time.perf_counter() - t0, 3)
    results["n_test_items"] = int(len(test_idx))
    reports.write_results(out, results)
    return results


def build_parser(protocol: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"sgcl eval {protocol}", description=__doc__.split("\n\n")[0],
                                epilog=examples_epilog(__doc__, lambda line: line.startswith(f"sgcl eval {protocol} ")),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (out_dir=)")
    p.add_argument("--encoder", help="export folder, weights file, foundation encoder name (`sgcl extract --encoder "
                   "list`) or timm model name (encoder.spec=)")
    p.add_argument("--weights", help="weights of a named foundation encoder: file, folder or HF cache folder (encoder.weights=)")
    p.add_argument("--data-root", dest="data_root", help="class-folder root (data.root=)")
    p.add_argument("--features", help="a features file to evaluate (data.features=; set data.kind=features)")
    add_config_arguments(p, example=OVERRIDE_EXAMPLES[protocol])
    return p


def _usage() -> str:
    return ("usage: sgcl eval {knn|linear|fewshot|seg|mil} [--config FILE] [key=value ...]\n"
            "  knn      weighted kNN (faiss), k in {10,20,100,200}, T=0.07\n"
            "  linear   logistic-regression probe with an L2 sweep on the validation split\n"
            "  fewshot  k labelled items per class, several seeds, mean ± std\n"
            "  seg      segmentation fine-tuning and sliding-window inference\n"
            "  mil      slide-level MIL (mean, ABMIL, CLAM-SB) on feature bags, folds by patient\n\n"
            "Run `sgcl eval <protocol> --help` for its options and examples, e.g.\n"
            "  sgcl eval knn --config configs/eval/knn.yaml --encoder runs/sgcl/export --data-root /data/nct-crc")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    protocol, rest = argv[0], argv[1:]
    if protocol == "seg":
        try:
            seg = importlib.import_module("evaluation.segmentation.cli")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("evaluation.segmentation"):
                print("sgcl eval seg: segmentation (evaluation/segmentation) is not part of this installation", file=sys.stderr)
                return 2
            raise
        return int(seg.main(rest) or 0)
    if protocol == "mil":
        from evaluation.mil.cli import main as mil_main

        return int(mil_main(rest) or 0)
    if protocol not in PROTOCOLS:
        print(f"sgcl eval: unknown protocol {protocol!r}\n{_usage()}", file=sys.stderr)
        return 2
    from evaluation.extract import parse_args

    args = parse_args(build_parser(protocol), rest)
    from evaluation.labels import LabelsError

    try:
        cfg = config_from_args(EvalConfig, args, FLAG_MAP)
        if args.features and cfg.data.kind != "features":
            cfg.data.kind = "features"
        if args.print_config:
            print_config(cfg)
            return 0
        from sgcl.utils.threads import configure_threads, release_threads, resolve_workers

        embeds = cfg.data.kind != "features"
        if embeds:
            cfg.encoder.num_workers = resolve_workers(cfg.encoder.num_workers, "encoder.num_workers")
        configure_threads(workers=cfg.encoder.num_workers if embeds else 0)
        try:
            results = run_protocol(protocol, cfg)
        finally:
            release_threads()
    except (ConfigError, LabelsError, ValueError, FileNotFoundError) as exc:
        print(f"sgcl eval {protocol}: error: {exc}", file=sys.stderr)
        return 2
    print(f"sgcl eval {protocol}: {_headline(results)} -> {Path(cfg.out_dir) / 'results.json'}")
    return 0


def _headline(results: dict) -> str:
    p = results["protocol"]
    if p == "knn":
        k = "20" if "20" in results["knn"] else sorted(results["knn"])[0]
        m = results["knn"][k]
        return f"k={k} accuracy {m['accuracy']['value']:.4f}, balanced accuracy {m['balanced_accuracy']['value']:.4f}"
    if p == "linear":
        m = results["linear"]["metrics"]
        return f"l2={results['linear']['l2']:g} accuracy {m['accuracy']['value']:.4f}, balanced accuracy {m['balanced_accuracy']['value']:.4f}"
    s = results["fewshot"]
    return ", ".join(f"{k}-shot bacc {v['balanced_accuracy']['mean']:.3f}±{v['balanced_accuracy']['std']:.3f}" for k, v in s.items())


if __name__ == "__main__":
    sys.exit(main())

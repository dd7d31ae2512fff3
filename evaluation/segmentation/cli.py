"""``sgcl eval seg``: segmentation fine-tuning, prediction, and the derived nuclei task.

Examples::

    sgcl eval seg --encoder runs/pretrain/export --data seg_data/ --label-fraction 0.1 --out runs/seg/ours_10pct
    sgcl eval seg --encoder resnet18 --data seg_data/ --frozen --out runs/seg/r18_frozen
    sgcl eval seg --config configs/eval/seg.yaml --data data/nuclei_task train.epochs=20 model.frozen=true
    sgcl eval seg predict --checkpoint runs/seg/ours_10pct --image big.png --out preds/
    sgcl eval seg predict --checkpoint runs/seg/ours_10pct --slide slide.svs --region 0,0,4096,4096 --mpp 0.5 --out preds/
    sgcl eval seg build-nuclei --out data/nuclei_task
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from sgcl.cli import examples_epilog
from sgcl.config import ConfigError, add_config_arguments, arg_in_range, config_from_args, print_config
from sgcl.utils.atomic import atomic_write_json, ensure_writable_dir

from .config import SegConfig

TRAIN_FLAGS = {"encoder": "model.encoder", "data": "data", "frozen": "model.frozen", "label_fraction": "train.label_fraction",
               "out": "out", "epochs": "train.epochs", "device": "device", "seed": "train.seed"}


def _examples(command: str) -> str:
    """The docstring's examples of one sub-command (train: ``sgcl eval seg`` without a sub-command)."""
    def keep(line: str) -> bool:
        words = line.split()
        sub = words[3] if len(words) > 3 and words[3] in ("predict", "build-nuclei") else "train"
        return sub == command

    return examples_epilog(__doc__, keep)


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgcl eval seg", description="Fine-tune an encoder + U-Net decoder for segmentation; "
                                "evaluate Dice/IoU by sliding-window inference. Sub-commands: predict, build-nuclei.",
                                epilog=_examples("train"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", help="export folder of `sgcl pretrain`, a checkpoint, or a timm model name")
    p.add_argument("--data", help="folder with images/ + masks/ (or train/ val/ test/), or a CSV image,mask[,split]")
    p.add_argument("--frozen", action="store_true", default=None, help="train the decoder only")
    p.add_argument("--label-fraction", type=float, help="share of training images used (e.g. 0.01, 0.1, 1)")
    p.add_argument("--out", help="run folder (results.json, results.csv, metrics, best.pt, predictions/)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--seed", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_arguments(p, example="train.epochs=20")
    return p


def _predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgcl eval seg predict", description="Predict masks with a fine-tuned model "
                                "(sliding windows); saves mask and overlay PNGs.",
                                epilog=_examples("predict"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder of `sgcl eval seg` or its best.pt")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", help="image file(s) of any size")
    src.add_argument("--slide", help="a whole-slide image")
    p.add_argument("--region", help="level-0 box x0,y0,w,h of --slide (default: the whole slide)")
    p.add_argument("--mpp", type=arg_in_range(float, gt=0), help="µm/px to predict at (default: the checkpoint's training µm/px)")
    p.add_argument("--slide-mpp", type=arg_in_range(float, gt=0), help="slide resolution when its header has none")
    p.add_argument("--out", default="seg_predictions")
    p.add_argument("--window", type=arg_in_range(int, ge=1), help="window side (default: the training patch size)")
    p.add_argument("--overlap", type=arg_in_range(float, ge=0, lt=1), default=0.5, help="share of a window overlapping its neighbour, in [0, 1)")
    p.add_argument("--weighting", choices=["gaussian", "uniform"], default="gaussian")
    p.add_argument("--batch-size", type=arg_in_range(int, ge=1), default=8)
    p.add_argument("--tile-size", type=arg_in_range(int, ge=1), default=2048, help="slide regions are processed in tiles of this many px")
    p.add_argument("--device", default="auto")
    return p


def _nuclei_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgcl eval seg build-nuclei", description="Build the derived-label nuclei task "
                                "(colour deconvolution + Otsu + watershed on real H&E; not expert annotation).",
                                epilog=_examples("build-nuclei"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--images", nargs="*", help="H&E images (default ../shared/data/images/he-*)")
    p.add_argument("--slide", help="slide to add tissue regions from (default: the demo slide); 'none' to skip")
    p.add_argument("--slide-regions", type=arg_in_range(int, ge=0), default=3)
    p.add_argument("--tile-size", type=arg_in_range(int, ge=1), default=256)
    p.add_argument("--overwrite", action="store_true")
    return p


def run_train(argv: Sequence[str]) -> int:
    args = _train_parser().parse_args(argv)
    cfg = config_from_args(SegConfig, args, TRAIN_FLAGS)
    if args.print_config:
        print_config(cfg)
        return 0
    if not cfg.data:
        raise ConfigError("no data: pass --data <folder or CSV> (or data=... in the config)")
    from sgcl.utils.threads import configure_threads, resolve_workers

    cfg.train.num_workers = resolve_workers(cfg.train.num_workers, "train.num_workers")
    configure_threads(workers=cfg.train.num_workers, requested=cfg.train.threads or None)
    from .train import train_segmentation  # torch + timm: only when there is work to do

    results = train_segmentation(cfg, progress=not args.quiet)
    test = results["test"]
    print(f"test mean Dice {test['mean_dice']:.4f}  mean IoU {test['mean_iou']:.4f}  "
          f"({results['test_images']} images; best epoch {results['best_epoch']}) -> {Path(cfg.out) / 'results.json'}")
    return 0


def run_predict(argv: Sequence[str]) -> int:
    import numpy as np

    from .data import read_image
    from .overlays import overlay, save_mask_png, save_png
    from .sliding_window import predict_slide_region, sliding_window_predict
    from .train import load_checkpoint, probability_fn, resolve_device

    args = _predict_parser().parse_args(argv)
    from sgcl.utils.threads import configure_threads

    configure_threads(workers=0)
    device = resolve_device(args.device)
    model, spec = load_checkpoint(args.checkpoint, device)
    fn = probability_fn(model)
    window = args.window or int(spec["patch_size"])
    out = ensure_writable_dir(args.out)
    records = []
    failed = 0
    if args.image:
        for path in args.image:
            try:
                image = read_image(path)
            except ValueError as exc:  # one unreadable image never stops the others
                print(f"error: {exc}", file=sys.stderr)
                records.append({"image": str(path), "error": str(exc)})
                failed += 1
                continue
            probs = sliding_window_predict(fn, image, window, args.overlap, args.weighting, args.batch_size, device, progress=True)
            mask = probs.argmax(0).astype(np.uint8)
            stem = Path(path).stem
            save_mask_png(mask, out / f"{stem}_mask.png")
            save_png(overlay(image, mask), out / f"{stem}_overlay.png")
            records.append({"image": str(path), "mask": f"{stem}_mask.png", "shape": list(mask.shape),
                            "class_fractions": _fractions(mask, spec["num_classes"])})
    else:
        mpp = args.mpp or spec.get("mpp")
        if not mpp:
            raise ConfigError("the checkpoint does not record the training µm/px: pass --mpp (e.g. --mpp 0.5)")
        from .slide_source import open_region_source

        if args.region:
            try:
                x0, y0, w, h = (int(v) for v in args.region.split(","))
            except ValueError:
                raise ConfigError(f"--region {args.region!r} must be x0,y0,w,h in level-0 pixels") from None
        else:
            with open_region_source(args.slide, args.slide_mpp) as src:
                (w, h), x0, y0 = src.level_dims0, 0, 0
        pred = predict_slide_region(fn, args.slide, x0, y0, w, h, mpp, window, args.overlap, args.weighting,
                                    args.batch_size, args.tile_size, args.slide_mpp, device)
        stem = f"{Path(args.slide).stem}_x{x0}_y{y0}_w{w}_h{h}"
        save_mask_png(pred.mask, out / f"{stem}_mask.png")
        save_png(overlay(pred.image, pred.mask), out / f"{stem}_overlay.png")
        records.append({"slide": str(args.slide), "region": list(pred.region), "mpp": pred.mpp, "level": pred.level,
                        "scale": pred.scale, "mask": f"{stem}_mask.png", "shape": list(pred.mask.shape),
                        "class_fractions": _fractions(pred.mask, spec["num_classes"]), **pred.info})
    atomic_write_json(out / "predictions.json", {"checkpoint": str(args.checkpoint), "model": spec, "window": window,
                                                 "overlap": args.overlap, "weighting": args.weighting, "items": records})
    print(f"{len(records) - failed} prediction(s) -> {out}" + (f"; {failed} failed (see predictions.json)" if failed else ""))
    return 1 if failed else 0


def _fractions(mask, num_classes: int) -> list[float]:
    import numpy as np

    counts = np.bincount(mask.reshape(-1), minlength=num_classes)[:num_classes]
    return [round(float(c) / mask.size, 6) for c in counts]


def run_build_nuclei(argv: Sequence[str]) -> int:
    from .nuclei_task import DEFAULT_SLIDE, build_nuclei_task

    args = _nuclei_parser().parse_args(argv)
    slide = None if (args.slide or "").lower() == "none" else (args.slide or DEFAULT_SLIDE)
    task = build_nuclei_task(args.out, images=args.images or None, slide=slide, slide_regions=args.slide_regions,
                             tile_size=args.tile_size, overwrite=args.overwrite)
    print(f"nuclei task (derived labels) -> {task.root}: tiles {task.meta['tiles']}")
    return 0


PARSERS = {"train": _train_parser, "predict": _predict_parser, "build-nuclei": _nuclei_parser}


def build_parser(command: str = "train") -> argparse.ArgumentParser:
    """The parser of ``sgcl eval seg [predict|build-nuclei]`` (``train``: no sub-command)."""
    return PARSERS[command]()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"predict": run_predict, "build-nuclei": run_build_nuclei, "train": run_train}
    command = commands.get(argv[0]) if argv else None
    try:
        if command is not None:
            return command(argv[1:])
        return run_train(argv)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

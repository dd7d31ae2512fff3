"""``sgcl pretrain``: self-supervised pretraining on a folder of per-slide HDF5 patch files.

Re-running the same command resumes from ``<out>/checkpoints/last.pt``; ``--resume PATH`` picks a
checkpoint. ``model.backbone`` is a timm name or a foundation encoder of the registry
(``sgcl extract --encoder list``); ``--init-weights`` (``model.init_weights``) starts from its published
weights (a file, a folder or a Hugging Face cache folder; nothing is downloaded).

The result is ``<out>/export/backbone.safetensors`` + ``backbone.json`` (for a timm backbone loadable with
``timm.create_model(name, num_classes=0, checkpoint_path=...)``; ``sgcl extract --encoder <out>/export``
loads either kind) and ``<out>/config.json``.

Examples::

    sgcl pretrain --config configs/pretrain/sgcl_r50.yaml --h5-dir tiles/patches --out runs/sgcl_r50
    # a minute on a laptop CPU, with a lower learning rate; --print-config shows the resolved config
    sgcl pretrain --config configs/pretrain/tiny_cpu.yaml --h5-dir tiles/patches --out runs/tiny optim.lr=0.01
    sgcl pretrain --config configs/pretrain/moco_v2_r50.yaml method.moco.queue_size=16384 --print-config
    # start from a foundation encoder's weights (docs/encoders.md)
    sgcl pretrain --config configs/pretrain/sgcl_r50.yaml model.backbone=phikon --init-weights /models/phikon \\
        --h5-dir tiles/patches --out runs/sgcl_phikon
    # 4 GPUs on one node (torchrun sets RANK/WORLD_SIZE)
    torchrun --nproc_per_node 4 -m sgcl.cli pretrain --config configs/pretrain/sgcl_r50.yaml --h5-dir tiles/patches \\
        --out runs/sgcl_r50
"""

from __future__ import annotations

import argparse
import sys

from sgcl.cli import examples_epilog
from sgcl.config import ConfigError, add_config_arguments, config_from_args, print_config

FLAGS = {
    "h5_dir": "data.h5_dir",
    "slide_dir": "data.slide_dirs",
    "out": "train.out_dir",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "batch_size": "data.batch_size",
    "workers": "data.workers",
    "resume": "train.resume",
    "device": "train.device",
    "precision": "train.precision",
    "seed": "train.seed",
    "init_weights": "model.init_weights",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgcl pretrain", description=__doc__.split("Examples::", 1)[0].rstrip(),
                                epilog=examples_epilog(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, example="optim.lr=0.01")
    p.add_argument("--h5-dir", dest="h5_dir", help="folder of .h5 patch files (data.h5_dir)")
    p.add_argument("--slide-dir", dest="slide_dir", action="append", metavar="DIR",
                   help="folder with the slides of coordinates-only files (sgcl tile --no-pixels), repeatable "
                        "(data.slide_dirs; default: each file's source_path attr)")
    p.add_argument("--out", help="output folder (train.out_dir)")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="train.max_steps")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="per-process batch (data.batch_size)")
    p.add_argument("--workers", type=int, help="loader workers per process (data.workers; default min(8, cores per rank - 1))")
    p.add_argument("--resume", help="checkpoint to resume from (default: <out>/checkpoints/last.pt if present)")
    p.add_argument("--device", help="auto | cpu | cuda (train.device)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="train.precision")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--init-weights", dest="init_weights",
                   help="start the backbone from these weights (model.init_weights; see docs/encoders.md)")
    return p


def _log_rank0(msg: str) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":
        print(f"[sgcl pretrain] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sgcl.train.config import PretrainConfig

    try:
        cfg = config_from_args(PretrainConfig, args, FLAGS)
    except ConfigError as exc:
        print(f"sgcl pretrain: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print_config(cfg)
        return 0
    from sgcl.utils.threads import configure_threads, release_threads, resolve_workers

    try:  # before the heavy imports: a bad knob fails fast
        cfg.data.workers = resolve_workers(cfg.data.workers, "data.workers")
        configure_threads(workers=cfg.data.workers, log=_log_rank0)
    except ConfigError as exc:
        print(f"sgcl pretrain: {exc}", file=sys.stderr)
        return 2
    from sgcl.data.dataset import DatasetError
    from sgcl.models.backbone import BackboneError
    from sgcl.train.checkpoint import CheckpointError
    from sgcl.train.trainer import NonFiniteLossError, Trainer

    from sgcl.utils.atomic import ensure_writable_dir

    ensure_writable_dir(cfg.train.out_dir)  # a read-only or full output folder: one line from `sgcl`, before any work
    ok = False
    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.setup()
        trainer.fit()
        ok = True
    except (DatasetError, CheckpointError, BackboneError, ConfigError, ValueError) as exc:
        print(f"sgcl pretrain: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"sgcl pretrain: {exc}", file=sys.stderr)
        return 3
    finally:
        if trainer is not None:
            trainer.close(ok)
        release_threads()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tuning loop: AdamW + cosine schedule over patches, validation by sliding-window inference
each epoch, metrics JSON/CSV per epoch, best checkpoint saved atomically, resumable from ``last.pt``.

``train_segmentation(cfg) -> results`` is the whole protocol; :func:`evaluate_pairs` and
:func:`cosine_lr` are pure helpers reused by the CLI and by other studies.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sgcl.config import to_dict
from sgcl.utils.atomic import atomic_path, atomic_write_json, atomic_write_text, ensure_writable_dir
from sgcl.utils.threads import worker_init_fn

from .config import SegConfig
from .data import PatchDataset, SegPair, check_pairs, discover_splits, infer_num_classes, load_pair, select_fraction
from .losses import DiceCELoss
from .metrics import confusion_matrix, dice_iou
from .model import SegmentationModel, build_segmentation_model
from .overlays import comparison_panel, save_mask_png, save_png
from .sliding_window import sliding_window_predict

BEST, LAST = "best.pt", "last.pt"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cosine_lr(step: int, total: int, warmup: int = 0) -> float:
    """Multiplier of the base LR: linear warm-up, then cosine from 1 to 0 over the remaining steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def probability_fn(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model_fn`` for sliding-window inference: softmax probabilities (bfloat16 autocast on a GPU)."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            return model(x).float().softmax(1)

    return fn


@torch.no_grad()
def evaluate_pairs(model: SegmentationModel, pairs: Sequence[SegPair], num_classes: int, window: int,
                   overlap: float = 0.5, weighting: str = "gaussian", batch_size: int = 8,
                   device: torch.device | str = "cpu", exclude_background: bool = True,
                   class_names: Sequence[str] | None = None, png_dir: Path | None = None, max_png: int = 0,
                   progress: bool = False) -> dict:
    """Dice/IoU over whole images predicted by sliding windows (confusion summed over images), plus
    the per-image mean Dice. Saves mask + panel PNGs for the first ``max_png`` images."""
    was_training = model.training
    model.eval()
    fn = probability_fn(model)
    total = np.zeros((num_classes, num_classes), np.int64)
    per_image = []
    for i, pair in enumerate(tqdm(pairs, desc="evaluate", unit="img", disable=not progress, leave=False)):
        image, target = load_pair(pair)
        probs = sliding_window_predict(fn, image, window, overlap, weighting, batch_size, device)
        pred = probs.argmax(0).astype(np.uint8)
        cm = confusion_matrix(pred, target, num_classes)
        total += cm
        scores = dice_iou(cm, exclude_background, class_names)
        per_image.append({"image": pair.name, "mean_dice": scores["mean_dice"], "mean_iou": scores["mean_iou"]})
        if png_dir is not None and i < max_png:
            save_mask_png(pred, png_dir / f"{pair.name}_mask.png")
            save_png(comparison_panel(image, pred, target), png_dir / f"{pair.name}_panel.png")
    model.train(was_training)
    result = dice_iou(total, exclude_background, class_names)
    vals = [r["mean_dice"] for r in per_image if r["mean_dice"] is not None]
    result["per_image"] = per_image
    result["mean_dice_per_image"] = float(np.mean(vals)) if vals else None
    result["images"] = len(pairs)
    return result


def _save_checkpoint(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _write_history(out: Path, history: list[dict]) -> None:
    atomic_write_json(out / "metrics.json", history)
    buf = io.StringIO()
    keys = list(history[0]) if history else []
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(out / "metrics.csv", buf.getvalue())


def model_spec(cfg: SegConfig, info: dict, num_classes: int, class_names: list[str]) -> dict:
    """What a checkpoint needs to rebuild its model (JSON-safe, loadable with weights_only=True)."""
    return {"model_name": info["model_name"], "encoder_spec": cfg.model.encoder, "encoder_sha256": info.get("sha256"),
            "num_classes": num_classes, "class_names": class_names, "frozen": cfg.model.frozen,
            "decoder_channels": cfg.model.decoder_channels, "out_indices": cfg.model.out_indices,
            "patch_size": cfg.train.patch_size, "mpp": cfg.mpp}


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[SegmentationModel, dict]:
    """Rebuild a fine-tuned model from ``best.pt`` (or a run folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / BEST
    if not path.is_file():
        raise FileNotFoundError(f"segmentation checkpoint {path} does not exist; pass the run folder of `sgcl eval seg`")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or "spec" not in payload or "state_dict" not in payload:
        raise ValueError(f"{path} is not a checkpoint written by `sgcl eval seg` (no spec/state_dict)")
    spec = payload["spec"]
    model, _ = build_segmentation_model(spec["model_name"], spec["num_classes"], frozen=spec["frozen"],
                                        decoder_channels=spec["decoder_channels"], out_indices=spec["out_indices"])
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval(), spec


def train_segmentation(cfg: SegConfig, progress: bool = True) -> dict:
    """Fine-tune, validate every epoch, test the best checkpoint; write the run folder ``cfg.out``:
    ``metrics.{json,csv}``, ``best.pt``, ``last.pt``, ``results.json``, ``results.csv``, ``predictions/``."""
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.epochs < 1 or t.steps_per_epoch < 1 or t.batch_size < 1:
        raise ValueError("train.epochs, train.steps_per_epoch and train.batch_size must be >= 1")
    out = ensure_writable_dir(cfg.out)
    device = resolve_device(cfg.device)
    splits = discover_splits(cfg.data, cfg.val_fraction, cfg.test_fraction, seed=t.seed)
    check_pairs(splits["train"] + splits["val"] + splits["test"])
    train_pairs = select_fraction(splits["train"], t.label_fraction, seed=t.seed)
    val_pairs = splits["val"] or train_pairs
    num_classes = cfg.model.num_classes or infer_num_classes(splits["train"] + splits["val"])
    class_names = ["background"] + [f"class_{i}" for i in range(1, num_classes)]
    window = cfg.infer.window or t.patch_size

    torch.manual_seed(t.seed)
    model, info = build_segmentation_model(cfg.model.encoder, num_classes, cfg.model.frozen,
                                           cfg.model.decoder_channels, cfg.model.out_indices)
    model.to(device)
    spec = model_spec(cfg, info, num_classes, class_names)
    groups = [{"params": [p for p in model.decoder.parameters()], "lr": t.lr}]
    if not cfg.model.frozen:
        groups.append({"params": [p for p in model.encoder.parameters()], "lr": t.encoder_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=t.weight_decay)
    total_steps = t.epochs * t.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, total_steps, t.warmup_steps))
    loss_fn = DiceCELoss(t.dice_weight, t.ce_weight, t.exclude_background)
    dataset = PatchDataset(train_pairs, t.patch_size, t.steps_per_epoch * t.batch_size, t.fg_fraction, t.augment, t.seed)

    config_dict = to_dict(cfg)
    start_epoch, history, best = 0, [], -1.0
    if (out / LAST).is_file():  # resume an interrupted run with the same config
        state = torch.load(out / LAST, map_location="cpu", weights_only=True)
        if state.get("config") == json.loads(json.dumps(config_dict)):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, history, best = int(state["epoch"]), list(state["history"]), float(state["best"])
        else:
            raise ValueError(f"{out} holds a run with another config; pass another --out or delete {out / LAST}")
    atomic_write_json(out / "config.json", config_dict)

    for epoch in range(start_epoch, t.epochs):
        t0 = time.perf_counter()
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=t.batch_size, shuffle=False, drop_last=True,
                            num_workers=t.num_workers, persistent_workers=False, pin_memory=device.type == "cuda",
                            worker_init_fn=worker_init_fn if t.num_workers > 0 else None)
        model.train()
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{t.epochs}", unit="step", disable=not progress, leave=False)
        for images, masks in bar:
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            loss = loss_fn(model(images), masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        val = evaluate_pairs(model, val_pairs, num_classes, window, cfg.infer.overlap, cfg.infer.weighting,
                             cfg.infer.batch_size, device, t.exclude_background, class_names)
        score = val["mean_dice"] if val["mean_dice"] is not None else 0.0
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"],
               "val_mean_dice": val["mean_dice"], "val_mean_iou": val["mean_iou"],
               "seconds": round(time.perf_counter() - t0, 3)}
        history.append(row)
        _write_history(out, history)
        if score > best:
            best = score
            _save_checkpoint(out / BEST, {"state_dict": model.state_dict(), "spec": spec, "epoch": epoch + 1,
                                          "val_mean_dice": score})
        _save_checkpoint(out / LAST, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                      "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": history,
                                      "best": best, "config": config_dict})
        if progress:
            tqdm.write(f"epoch {epoch + 1}: loss {row['train_loss']:.4f}  val Dice {score:.4f}")

    best_model, _ = load_checkpoint(out / BEST, device)
    test_pairs = splits["test"] or val_pairs
    test = evaluate_pairs(best_model, test_pairs, num_classes, window, cfg.infer.overlap, cfg.infer.weighting,
                          cfg.infer.batch_size, device, t.exclude_background, class_names,
                          png_dir=out / "predictions", max_png=cfg.infer.save_png, progress=progress)
    best_row = max(history, key=lambda r: r["val_mean_dice"] or 0.0)
    results = {
        "task": "segmentation", "encoder": info, "frozen": cfg.model.frozen, "label_fraction": t.label_fraction,
        "train_images": len(train_pairs), "val_images": len(splits["val"]), "test_images": len(splits["test"]),
        "test_split": "test" if splits["test"] else "val", "num_classes": num_classes, "class_names": class_names,
        "best_epoch": best_row["epoch"], "best_val_mean_dice": best_row["val_mean_dice"],
        "test": test, "seed": t.seed, "config": config_dict,
    }
    atomic_write_json(out / "results.json", results)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["class", "dice", "iou"])
    for name in class_names:
        writer.writerow([name, test["dice"][name], test["iou"][name]])
    writer.writerow(["mean" + ("_no_background" if t.exclude_background else ""), test["mean_dice"], test["mean_iou"]])
    atomic_write_text(out / "results.csv", buf.getvalue())
    _plot_history(out, history)
    return results


def _plot_history(out: Path, history: list[dict]) -> None:
    """Training loss and validation Dice per epoch as ``curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    ax[0].plot(epochs, [r["train_loss"] for r in history], marker="o")
    ax[0].set(xlabel="epoch", ylabel="train loss (Dice + CE)")
    ax[1].plot(epochs, [r["val_mean_dice"] or 0 for r in history], marker="o", color="tab:green")
    ax[1].set(xlabel="epoch", ylabel="val mean Dice", ylim=(0, 1))
    fig.tight_layout()
    with atomic_path(out / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def finetune(encoder: str, data: str | Path, out: str | Path, overrides: Sequence[str] = (),
             config: str | Path | None = None, progress: bool = False) -> dict:
    """One call for studies: ``finetune("runs/pretrain/export", task.root, "runs/seg/x", ["train.label_fraction=0.1"])``
    = ``sgcl eval seg --encoder ... --data ... --out ...`` with dotted overrides; returns ``results.json``'s content."""
    from sgcl.config import load_config

    cfg = load_config(SegConfig, config, [f"model.encoder={encoder}", f"data={data}", f"out={out}", *overrides])
    return train_segmentation(cfg, progress=progress)

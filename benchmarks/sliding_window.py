"""Sliding-window inference throughput (pixels/s) against the model's pure forward pass.

In one run, on the same model and the same windows:
1. ``forward``: the windows of a size×size image, pre-cut into batches, through the model (softmax) only;
2. ``stitched``: ``sliding_window_predict`` over the in-memory image (cutting, Gaussian weighting,
   accumulation, normalisation included);
3. ``slide region``: ``predict_slide_region`` over a size×size region of a pyramidal TIFF read
   through the tiling stage's readers, in bounded tiles with context margins (reading, stitching).
The image/slide is DERIVED: a mosaic of the real CMU-1-Small-Region slide (CC0), written at run
time to a temporary pyramidal TIFF (mpp 0.499) and deleted afterwards.

    python benchmarks/sliding_window.py [--size 2048] [--window 256] [--repeats 3] [--encoder test_resnet] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evaluation.segmentation.model import build_segmentation_model  # noqa: E402
from evaluation.segmentation.sliding_window import (_pad, _to_chw_float, predict_slide_region,  # noqa: E402
                                                     sliding_window_predict, window_grid)
from preprocessing.pyramid_writer import write_pyramidal_tiff  # noqa: E402
from preprocessing.readers import open_slide  # noqa: E402

DEMO = REPO / "data" / "demo" / "CMU-1-Small-Region.svs"


def mosaic(size: int) -> np.ndarray:
    """size×size RGB made by tiling (with mirroring) the real demo slide's level 0."""
    with open_slide(DEMO) as reader:
        base = reader.read_region(0, 0, 0, *reader.dimensions)
    reps_y, reps_x = -(-size // base.shape[0]), -(-size // base.shape[1])
    rows = [np.concatenate([base if (i + j) % 2 == 0 else base[:, ::-1] for j in range(reps_x)], 1) for i in range(reps_y)]
    return np.ascontiguousarray(np.concatenate(rows, 0)[:size, :size])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=None, help="image side; default 4096 on a GPU, 2048 on a CPU")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--encoder", default="test_resnet")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tile-size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the fastest of each is reported")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.size = args.size or (4096 if device.type == "cuda" else 2048)
    torch.manual_seed(0)
    model, info = build_segmentation_model(args.encoder, num_classes=2)
    model.to(device).eval()

    def fn(x: torch.Tensor) -> torch.Tensor:
        return model(x).float().softmax(1)

    image = mosaic(args.size)
    pixels = args.size * args.size
    grid = window_grid(args.size, args.size, args.window, args.overlap)
    print(f"image {args.size}×{args.size} (derived mosaic of CMU-1-Small-Region), window {args.window}, "
          f"overlap {args.overlap}, {len(grid.boxes)} windows, encoder {args.encoder}, device {device}, "
          f"torch threads {torch.get_num_threads()}")

    with torch.inference_mode():  # warm-up
        fn(torch.rand(args.batch_size, 3, args.window, args.window, device=device))
        sync(device)
        # the baseline's input: the same windows, pre-cut into batches
        padded = _pad(_to_chw_float(image), grid.pad, "reflect")
        batches = [torch.stack([padded[:, y:y + args.window, x:x + args.window] for y, x in grid.boxes[i:i + args.batch_size]])
                   for i in range(0, len(grid.boxes), args.batch_size)]
        del padded
        if device.type == "cuda":
            batches = [b.to(device) for b in batches]

    def run_forward() -> None:
        with torch.inference_mode():
            for b in batches:
                fn(b)

    def run_stitched() -> None:
        probs = sliding_window_predict(fn, image, args.window, args.overlap, "gaussian", args.batch_size, device)
        assert probs.shape == (2, args.size, args.size)

    def run_stitch_only() -> None:  # the stitching machinery alone: a model that costs nothing
        sliding_window_predict(lambda x: x[:, :2], image, args.window, args.overlap, "gaussian", args.batch_size, device)

    info: dict = {}

    def run_region() -> None:
        pred = predict_slide_region(fn, slide, 0, 0, args.size, args.size, mpp=0.499, window=args.window,
                                    overlap=args.overlap, batch_size=args.batch_size, tile_size=args.tile_size,
                                    device=device, progress=False)
        info.update(pred.info)

    times: dict[str, list[float]] = {"forward": [], "stitched": [], "region": [], "stitch_only": []}
    with tempfile.TemporaryDirectory() as tmp:
        slide = Path(tmp) / "mosaic.tiff"
        write_pyramidal_tiff(slide, image, mpp=0.499)
        for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
            for name, run in (("forward", run_forward), ("stitched", run_stitched), ("region", run_region),
                              ("stitch_only", run_stitch_only)):
                sync(device)
                t0 = time.perf_counter()
                run()
                sync(device)
                times[name].append(time.perf_counter() - t0)
    t_forward, t_stitched, t_region, t_stitch = (min(times[k]) for k in ("forward", "stitched", "region", "stitch_only"))
    tiles, region_windows = info["tiles"], info["windows"]

    figures = {
        "size": args.size, "window": args.window, "overlap": args.overlap, "windows": len(grid.boxes),
        "encoder": args.encoder, "device": str(device), "threads": torch.get_num_threads(),
        "forward_px_per_s": pixels / t_forward, "stitched_px_per_s": pixels / t_stitched,
        "region_px_per_s": pixels / t_region, "stitched_vs_forward": t_forward / t_stitched,
        "region_vs_forward": t_forward / t_region,
        "stitch_only_seconds": t_stitch, "stitch_overhead_vs_forward": t_stitch / t_forward, "region_tiles": tiles, "region_windows": region_windows,
        "seconds_each_repeat": times, "repeats": args.repeats,
    }
    print(f"forward only      : {figures['forward_px_per_s'] / 1e6:8.3f} Mpx/s  ({t_forward:.1f} s)")
    print(f"stitched (memory) : {figures['stitched_px_per_s'] / 1e6:8.3f} Mpx/s  ({t_stitched:.1f} s)  "
          f"= {figures['stitched_vs_forward']:.2f}× forward")
    print(f"slide region      : {figures['region_px_per_s'] / 1e6:8.3f} Mpx/s  ({t_region:.1f} s, {tiles} tiles, {region_windows} windows)  "
          f"= {figures['region_vs_forward']:.2f}× forward")
    print(f"stitching alone   : {t_stitch:.2f} s (zero-cost model) = {100 * t_stitch / t_forward:.1f} % of the forward time")
    print(f"(output pixels per second, fastest of {args.repeats} interleaved repeats; "
          "the 50 %-overlap windows cover each pixel ~4 times in every variant)")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ABMIL training from bags streamed off disk (``sgcl eval mil``'s loader) against a plain PyTorch loop
holding every bag in memory: time per epoch and peak RSS, each in a fresh process, same model, same
number of steps (one bag per step), same optimiser and schedule.

    python benchmarks/mil.py --bags 200 --patches 5000 --dim 1024 --dtype float16 --out docs/benchmarks/mil.json
    # the full size of the issue (20 GB of float32 features on disk, > 20 GB RAM for the in-memory loop):
    python benchmarks/mil.py --bags 1000 --patches 5000 --dim 1024 --dtype float32 --workdir /scratch/mil_bench

The bags are random features written as ``h5_files/<slide>.h5`` (``features`` (N, D), ~1 MiB row chunks,
like ``sgcl extract``) in ``--workdir`` (default: a temporary folder, deleted afterwards unless ``--keep``).
The streamed run reads one bag per step through :class:`evaluation.mil.data.BagDataset` and
:func:`evaluation.mil.train.train_fold`; the in-memory baseline first reads every bag into a list of
float32 tensors, then trains the same ABMIL with the same optimiser for the same steps.
Freshly written files are in the page cache, so the streamed numbers do not include cold disk reads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def write_bags(folder: Path, bags: int, patches: int, dim: int, dtype: str, seed: int = 0) -> float:
    """Random bags (half with a shifted cluster of 50 instances), one h5 per slide; returns GB written."""
    import h5py

    rng = np.random.default_rng(seed)
    (folder / "h5_files").mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,label,patient"]
    rows_per_chunk = max(1, (1 << 20) // (dim * np.dtype(dtype).itemsize))
    for b in range(bags):
        x = rng.standard_normal((patches, dim), dtype=np.float32)
        if b % 2:
            x[:50, :8] += 3.0
        with h5py.File(folder / "h5_files" / f"s{b:05d}.h5", "w") as f:
            f.create_dataset("features", data=x.astype(dtype), chunks=(min(patches, rows_per_chunk), dim))
        rows.append(f"s{b:05d},{'ab'[b % 2]},p{b}")
    (folder / "slides.csv").write_text("\n".join(rows) + "\n")
    return bags * patches * dim * np.dtype(dtype).itemsize / 1e9


def child(mode: str, workdir: Path, epochs: int, threads: int, workers: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from evaluation.mil.data import load_cohort, read_bag
    from evaluation.mil.folds import Fold
    from evaluation.mil.models import build_model
    from evaluation.mil.train import TrainOptions, class_weights, cosine_lambda, train_fold

    base = rss_mb()
    cohort = load_cohort(workdir / "slides.csv", workdir)
    idx = np.arange(len(cohort.slides))
    opt = TrainOptions("abmil", {"hidden_dim": 256, "attention_dim": 128, "dropout": 0.25}, epochs=epochs, lr=2e-4,
                       num_workers=workers, device="cpu", seed=0)
    out = {"mode": mode, "rss_after_imports_mb": round(base, 1)}
    if mode == "streamed":
        t0 = time.perf_counter()
        _, history, _ = train_fold(cohort, Fold(0, idx, idx[:0], idx[:0], "all"), opt)
        out["load_s"] = 0.0
        out["epoch_s"] = [h["seconds"] for h in history]
        out["total_s"] = round(time.perf_counter() - t0, 3)
    else:
        import torch.nn.functional as F

        t0 = time.perf_counter()
        bags = [read_bag(p) for p in cohort.paths]  # everything in RAM, float32
        labels = torch.as_tensor(cohort.labels)
        out["load_s"] = round(time.perf_counter() - t0, 3)
        out["rss_after_load_mb"] = round(rss_mb(), 1)
        torch.manual_seed(0)
        model = build_model("abmil", cohort.feature_dim, 2, **opt.model_kwargs)
        weight = class_weights(cohort.labels, 2)
        optim = torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, cosine_lambda(epochs * len(bags), opt.min_lr_ratio))
        g = torch.Generator().manual_seed(0)
        out["epoch_s"] = []
        for _ in range(epochs):
            te = time.perf_counter()
            model.train()
            for i in torch.randperm(len(bags), generator=g).tolist():
                logits = model(bags[i])["logits"]
                loss = F.cross_entropy(logits[None], labels[i:i + 1], weight=weight)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                sched.step()
            out["epoch_s"].append(round(time.perf_counter() - te, 3))
        out["total_s"] = round(time.perf_counter() - t0, 3)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["mean_epoch_s"] = round(float(np.mean(out["epoch_s"])), 3)
    out["steady_epoch_s"] = round(float(np.mean(out["epoch_s"][1:] or out["epoch_s"])), 3)  # first epoch: warm-up
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bags", type=int, default=200)
    p.add_argument("--patches", type=int, default=5000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=0, help="bag reader processes of the streamed run")
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--modes", default="streamed,memory",
                   help="runs to make; `streamed` alone at sizes whose in-memory copy would not fit this machine's RAM")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "mil.json"))
    p.add_argument("--_child", choices=["streamed", "memory"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        print(json.dumps(child(a._child, Path(a.workdir), a.epochs, a.threads, a.workers)))
        return 0
    work = Path(a.workdir or tempfile.mkdtemp(prefix="mil_bench_"))
    try:
        t0 = time.perf_counter()
        gb = write_bags(work, a.bags, a.patches, a.dim, a.dtype)
        write_s = time.perf_counter() - t0
        print(f"wrote {a.bags} bags × {a.patches} × {a.dim} {a.dtype} = {gb:.2f} GB in {write_s:.0f} s to {work}", flush=True)
        runs = {}
        modes = [m.strip() for m in a.modes.split(",") if m.strip()]
        if not modes or set(modes) - {"streamed", "memory"}:
            print(f"--modes: choose from streamed, memory (got {a.modes!r})", file=sys.stderr)
            return 2
        for mode in modes:
            cmd = [sys.executable, __file__, "--_child", mode, "--workdir", str(work), "--epochs", str(a.epochs),
                   "--threads", str(a.threads), "--workers", str(a.workers)]
            env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode:
                print(res.stderr, file=sys.stderr)
                return 1
            runs[mode] = json.loads(res.stdout.strip().splitlines()[-1])
            r = runs[mode]
            print(f"{mode:>8}: load {r['load_s']:.1f} s, epochs {r['epoch_s']} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        ratios = {}
        if len(runs) == 2:
            s, m = runs["streamed"], runs["memory"]
            ratios = {"epoch_time_streamed_over_memory": round(s["steady_epoch_s"] / m["steady_epoch_s"], 3),
                      "peak_rss_memory_over_streamed": round(m["peak_rss_mb"] / s["peak_rss_mb"], 2),
                      "total_time_streamed_over_memory_incl_load": round(s["total_s"] / m["total_s"], 3)}
            print(json.dumps(ratios))
        result = {"what": "ABMIL (gated attention, hidden 256, attention 128) training, one bag per step, CPU",
                  "size": {"bags": a.bags, "patches_per_bag": a.patches, "dim": a.dim, "dtype_on_disk": a.dtype,
                           "gb_on_disk": round(gb, 3), "epochs": a.epochs, "threads": a.threads,
                           "loader_workers": a.workers},
                  "full_size_command": "python benchmarks/mil.py --bags 1000 --patches 5000 --dim 1024 --dtype float32",
                  "note": "files freshly written, so in the page cache: no cold disk reads in the streamed numbers; "
                          "memory baseline holds every bag as float32",
                  "runs": runs, "ratios": ratios, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                             "load_average": os.getloadavg()},
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        from sgcl.utils.atomic import atomic_write_json

        atomic_write_json(a.out, result)
        print(f"-> {a.out}")
    finally:
        if not a.keep and not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""torchrun worker of benchmarks/gpu_check.py's ddp step (not run on its own).

``torchrun --standalone --nproc-per-node N benchmarks/_gpu_check_ddp.py --device cuda --out R.json``:
joins an explicit process group (NCCL on CUDA, gloo on the CPU: the trainer itself makes none at
world size 1), wraps the real SGCL method (memory bank, on the given backbone) in
DistributedDataParallel and runs a few optimiser steps on synthetic batches, timing the last half;
also checks one all_reduce. Rank 0 writes the result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from sgcl.methods.config import build_method  # noqa: E402
from sgcl.models.backbone import create_backbone  # noqa: E402
from train_step import method_config, synthetic_meta  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--bank-rows", type=int, default=8192)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    cuda = a.device.startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
        torch.backends.cudnn.benchmark = True
    dist.init_process_group(backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    x = torch.full((4,), float(rank + 1), device=device)
    dist.all_reduce(x)
    allreduce_ok = bool(torch.allclose(x.cpu(), torch.full((4,), world * (world + 1) / 2)))

    ns = argparse.Namespace(bank_rows=a.bank_rows, kmeans_clusters=100 if cuda else 4, queue=4096)
    torch.manual_seed(0)
    method = build_method(method_config("sgcl", {}, ns), create_backbone(a.backbone)).to(device)
    if cuda:
        method.to(memory_format=torch.channels_last)
    method.on_train_start(synthetic_meta(a.bank_rows))
    method.on_epoch_start(0)
    # the trainer's wrapping (sgcl/train/trainer.py): no buffer broadcast, the local device
    model = torch.nn.parallel.DistributedDataParallel(method, broadcast_buffers=False, device_ids=[local] if cuda else None)
    opt = torch.optim.SGD([q for q in method.parameters() if q.requires_grad], lr=1e-3, momentum=0.9)
    amp = torch.bfloat16 if a.precision == "bf16" else None
    b = a.batch

    def batch():
        out = {"views": [torch.randn(b, 3, a.size, a.size, device=device)],
               "local": torch.randn(4 * b, 3, a.local_size, a.local_size, device=device),
               "index": torch.randperm(a.bank_rows)[:b].to(device),
               "slide": torch.zeros(b, dtype=torch.long, device=device), "grid": torch.zeros(b, 2, dtype=torch.long, device=device)}
        return out

    losses, times = [], []
    for step in range(a.steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(batch(), 0, step)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.on_after_step(out)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(float(out["loss"].detach()))
    timed = times[len(times) // 2:]
    res = {"backend": backend, "world_size": world, "allreduce_ok": allreduce_ok, "steps": a.steps,
           "losses_finite": all(v == v and abs(v) != float("inf") for v in losses), "last_loss": losses[-1],
           "img_per_s_synthetic": round(b * world * len(timed) / sum(timed), 1)}
    if rank == 0:
        Path(a.out).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()
    return 0 if allreduce_ok and res["losses_finite"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""torchrun worker for tests/test_ddp_equivalence.py (not a test module itself).

Usage: ``torchrun --standalone --nproc_per_node 2 tests/_ddp_worker.py OUT.pt``. Every rank trains
each method for 3 steps on its half of a fixed global batch under DDP (gloo, CPU); then rank 0
repeats the same 3 steps in one process on the whole batch and saves both traces to ``OUT.pt``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tiny_nets import TinyGN, grid_dataset, make_batch  # noqa: E402

import sgcl.clustering  # noqa: E402
from sgcl.distributed import all_reduce_mean, concat_all_gather, gather_with_grad, get_rank, get_world_size, local_slice  # noqa: E402
from sgcl.methods import MethodConfig, build_method  # noqa: E402
from sgcl.methods.base import DatasetMeta  # noqa: E402

GLOBAL_BATCH = 16
STEPS = [(0, 0), (0, 1), (1, 2)]  # (epoch, step): epoch 1 re-clusters on the updated bank/queue


def configs() -> dict[str, MethodConfig]:
    out = {}
    for key, name, bank in [("moco_v2", "moco_v2", None), ("simclr", "simclr", None), ("sgcl_memory", "sgcl", "memory"), ("sgcl_queue", "sgcl", "queue")]:
        cfg = MethodConfig(name=name, proj_dim=16)
        cfg.moco.queue_size = 40
        cfg.moco.momentum = 0.9
        cfg.sgcl.num_negatives = 24
        cfg.sgcl.nei_k = 12
        cfg.sgcl.kmeans_clusters = 5
        cfg.sgcl.rampup_epochs = 2.0
        if bank:
            cfg.sgcl.bank = bank
        out[key] = cfg
    return out


def global_index(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randperm(72, generator=g)[:GLOBAL_BATCH]


def trace(cfg: MethodConfig) -> dict:
    world, rank = get_world_size(), get_rank()
    slide_of, grid_of = grid_dataset(2, 6)
    torch.manual_seed(0)
    method = build_method(cfg, TinyGN())
    method.on_train_start(DatasetMeta(72, 2, slide_of, grid_of))
    model = DDP(method) if world > 1 else method  # default broadcast_buffers: banks are excluded by the method
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    names = [n for n, p in method.named_parameters() if p.requires_grad]
    rec: dict = {"loss": [], "terms": [], "grads": [], "clusters": []}
    for epoch, step in STEPS:
        if step == 0 or epoch != STEPS[step - 1][0]:
            method.on_epoch_start(epoch)
            lab = getattr(method, "clusters", None)
            if lab is None:
                lab = getattr(method, "centroids", None)
            if lab is not None:
                rec["clusters"].append(lab.detach().clone())
        idx = global_index(step)
        per = GLOBAL_BATCH // world
        idx = idx[rank * per : (rank + 1) * per]
        batch = make_batch(idx, slide_of, grid_of, method.num_views, seed=step)
        out = model(batch, epoch, step)
        out["loss"].backward()
        rec["loss"].append(float(all_reduce_mean(out["loss"].detach())))
        rec["terms"].append({k: float(all_reduce_mean(v.detach().float())) for k, v in out.items() if k.startswith("loss")})
        rec["grads"].append({n: p.grad.detach().clone() for n, p in method.named_parameters() if p.requires_grad and p.grad is not None})
        assert set(rec["grads"][-1]) == set(names)
        opt.step()
        opt.zero_grad()
        method.on_after_step(out)
    return rec


def uneven_gathers() -> dict:
    """Rank 0 holds 3 rows, rank 1 holds 5: gathers pad/trim, and the backward sums over ranks."""
    rank = get_rank()
    n = 3 if rank == 0 else 5
    x = (torch.arange(n, dtype=torch.float64) + 10 * rank).unsqueeze(1).requires_grad_()
    g = gather_with_grad(x)
    w = torch.arange(1, g.shape[0] + 1, dtype=torch.float64).unsqueeze(1)
    (g * w).sum().backward()  # every rank computes the same loss over the gathered rows
    sl = local_slice(n)
    return {"gathered": g.detach().flatten().tolist(), "nograd": concat_all_gather(x).flatten().tolist(),
            "grad": x.grad.flatten().tolist(), "slice": [sl.start, sl.stop]}


def main() -> None:
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    if rank != 0:  # only rank 0 may fit k-means; the others must receive the labels by broadcast
        def _refuse(*args, **kwargs):
            raise RuntimeError("k-means must run on rank 0 only")
        sgcl.clustering.fit_kmeans = _refuse
    uneven = [None] * dist.get_world_size()
    dist.all_gather_object(uneven, uneven_gathers())
    ddp: dict = {"uneven": uneven}
    for key, cfg in configs().items():
        rec = trace(cfg)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [c.double().sum().item() if c.is_floating_point() else int((c.long() * torch.arange(1, c.shape[-1] + 1)).sum()) for c in rec["clusters"]])
        rec["clusters_per_rank"] = gathered
        ddp[key] = rec
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        single = {key: trace(cfg) for key, cfg in configs().items()}
        torch.save({"ddp": ddp, "single": single}, out_path)


if __name__ == "__main__":
    main()

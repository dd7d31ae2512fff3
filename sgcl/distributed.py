"""Rank/world helpers that also work without an initialised process group (single process).

Gathers come in two kinds:

- :func:`concat_all_gather` — no gradient (keys, bank updates, indices); ranks may hold
  different batch sizes (the tensors are padded to the largest and trimmed again).
- :func:`gather_with_grad` — the gathered tensor keeps the autograd graph of the *local* slice.
  Its backward sums the incoming gradients over all ranks (``all_reduce``) before returning the
  local slice, so that "each rank computes the loss of its own anchors against the gathered
  keys, DDP averages" gives exactly the gradient of one process with the whole batch.
"""

from __future__ import annotations


from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order), without gradient."""
    if not is_distributed():
        return x.detach()
    x = x.detach().contiguous()
    sizes = _gather_sizes(x.shape[0], x.device)
    top = max(sizes)
    if top != x.shape[0]:
        pad = x.new_zeros((top - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad])
    out = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(out, x)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        ctx.sizes = _gather_sizes(x.shape[0], x.device)
        ctx.rank = get_rank()
        top = max(ctx.sizes)
        padded = torch.cat([x, x.new_zeros((top - x.shape[0], *x.shape[1:]))]) if top != x.shape[0] else x
        out = [torch.empty_like(padded) for _ in ctx.sizes]
        dist.all_gather(out, padded)
        return torch.cat([o[:n] for o, n in zip(out, ctx.sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 keeping the gradient of the local slice (see module docstring)."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def local_slice(n_local: int, device: torch.device | None = None) -> slice:
    """Rows of this rank inside a :func:`concat_all_gather` of tensors with ``n_local`` rows."""
    if not is_distributed():
        return slice(0, n_local)
    sizes = _gather_sizes(n_local, device or torch.device("cpu"))
    start = sum(sizes[: get_rank()])
    return slice(start, start + n_local)


def broadcast_tensor(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast of ``x`` from ``src`` (no-op in a single process); returns ``x``."""
    if is_distributed():
        dist.broadcast(x, src)
    return x


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Broadcast a picklable object from ``src`` to every rank."""
    if not is_distributed():
        return obj
    holder = [obj if get_rank() == src else None]
    dist.broadcast_object_list(holder, src)
    return holder[0]


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a (detached) tensor over ranks, for logging."""
    if not is_distributed():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / get_world_size()


__all__ = [
    "is_distributed", "get_rank", "get_world_size", "is_main_process", "barrier", "concat_all_gather",
    "gather_with_grad", "local_slice", "broadcast_tensor", "broadcast_object", "all_reduce_mean",
]

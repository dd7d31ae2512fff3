"""NPID memory bank: one unit-norm row per patch, momentum-updated (methods.md §1.2, §1.9).

``V_i ← norm(m·V_i + (1−m)·norm(new_i))`` after each step (updates all-gathered across ranks).
Rows are a registered buffer (so they live in the ``state_dict`` and resume exactly), stored in
fp32 or fp16 (half the memory; similarities are always accumulated in fp32). Similarities to
the whole bank are computed in chunks of ``chunk`` rows so a B×N matrix never has to exist at once.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sgcl.distributed import concat_all_gather

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"bank dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


class MemoryBank(nn.Module):
    """``num_rows`` × ``dim`` unit-norm rows initialised from a seeded Gaussian (identical on all ranks)."""

    def __init__(self, num_rows: int, dim: int, momentum: float = 0.5, dtype: str | torch.dtype = "float32", seed: int = 0,
                 device: torch.device | str | None = None):
        super().__init__()
        if num_rows <= 0 or dim <= 0:
            raise ValueError(f"a memory bank needs num_rows > 0 and dim > 0, got {num_rows}×{dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"bank momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        dtype = resolve_dtype(dtype)
        gen = torch.Generator().manual_seed(int(seed))
        # allocated on its device directly and filled in 1M-row blocks: no N-row host copy at 50M rows;
        # the values depend only on the seed (same on every rank and every device)
        weight = torch.empty(num_rows, dim, dtype=dtype, device=device)
        step = 1 << 20
        for s in range(0, num_rows, step):
            e = min(s + step, num_rows)
            weight[s:e] = F.normalize(torch.randn(e - s, dim, generator=gen), dim=1).to(weight.device, dtype)
        self.register_buffer("weight", weight)

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """fp32 rows at ``index`` (any shape); result has shape ``(*index.shape, D)``."""
        flat = self.weight.index_select(0, index.reshape(-1).to(self.weight.device))
        return flat.float().reshape(*index.shape, self.dim)

    def chunks(self, chunk: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, rows)`` blocks of at most ``chunk`` rows (all rows if ``chunk <= 0``)."""
        n = self.num_rows
        size = n if chunk <= 0 else chunk
        for s in range(0, n, size):
            yield s, self.weight[s : s + size]

    def similarity(self, q: torch.Tensor, chunk: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, q @ rows.T)`` in fp32 for each chunk of the bank (no grad)."""
        q = q.detach().float()
        for s, rows in self.chunks(chunk):
            yield s, q @ rows.float().t()

    @torch.no_grad()
    def update(self, index: torch.Tensor, features: torch.Tensor, gather: bool = True) -> None:
        """Momentum update of rows ``index`` with ``features`` (normalised here). With ``gather``
        the (index, features) of every rank are all-gathered first, so all ranks stay identical."""
        if gather:
            index = concat_all_gather(index)
            features = concat_all_gather(features)
        index = index.to(self.weight.device).long()
        new = F.normalize(features.detach().float().to(self.weight.device), dim=1)
        old = self.weight.index_select(0, index).float()
        mixed = F.normalize(self.momentum * old + (1.0 - self.momentum) * new, dim=1)
        self.weight.index_copy_(0, index, mixed.to(self.weight.dtype))

    def extra_repr(self) -> str:
        return f"rows={self.num_rows}, dim={self.dim}, momentum={self.momentum}, dtype={self.weight.dtype}"


@torch.no_grad()
def chunked_topk(
    q: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    chunk: int = 0,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of ``q @ keys.T`` per row, scanning ``keys`` in chunks (running merge).

    ``exclude`` (B, E) int64, −1 padded: indices set to −inf for that row. Returns fp32
    similarities (B, k') and int64 indices (B, k'), sorted in decreasing order, k' = min(k, N).
    Excluded or missing entries come back as −inf similarity.
    """
    n = keys.shape[0]
    k = min(int(k), n)
    size = n if chunk <= 0 else int(chunk)
    q = q.detach().float()
    half_ok = q.is_cuda and keys.dtype in (torch.float16, torch.bfloat16)
    q_half = q.to(keys.dtype) if half_ok else None
    best_v: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for s in range(0, n, size):
        block = keys[s : s + size]
        # fp16/bf16 banks on the GPU: multiply in their own precision (ranking only), no fp32 copy
        sims = (q_half @ block.t()).float() if half_ok else q @ block.float().t()
        if exclude is not None and exclude.numel():
            hit = (exclude >= s) & (exclude < s + block.shape[0])
            r, c = hit.nonzero(as_tuple=True)
            sims[r, exclude[r, c] - s] = float("-inf")
        # top-k inside the chunk first, then merge two short lists (no B×chunk index tensor)
        v, i = sims.topk(min(k, sims.shape[1]), dim=1)
        i = i + s
        if best_v is not None:
            merged = torch.cat([best_v, v], dim=1)
            v, pos = merged.topk(min(k, merged.shape[1]), dim=1)
            i = torch.cat([best_i, i], dim=1).gather(1, pos)
        best_v, best_i = v, i
    assert best_v is not None and best_i is not None
    return best_v, best_i

"""MoCo FIFO queue of keys that also stores each key's patch index (and optional extra fields).

Storing the index lets SGCL look up spatial/semantic positives inside a queue: a key whose
patch is a grid neighbour of the anchor is a positive, whatever rank or step enqueued it.
Empty slots have index −1 (mask them with :meth:`valid`). Everything is a registered buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sgcl.distributed import concat_all_gather
from sgcl.memory.bank import resolve_dtype


class FeatureQueue(nn.Module):
    """``size`` keys of dimension ``dim`` (unit norm) + ``index`` (−1 = empty) + ``extras``.

    ``extras`` maps a field name to ``(trailing_shape, dtype)``, e.g.
    ``{"slide": ((), torch.long), "grid": ((2,), torch.long), "feat": ((512,), "float16")}``.
    The keys start as seeded random unit vectors (as in MoCo) but are marked empty.
    """

    def __init__(self, size: int, dim: int, dtype: str | torch.dtype = "float32", extras: dict | None = None, seed: int = 0):
        super().__init__()
        if size <= 0:
            raise ValueError(f"queue size must be > 0, got {size}")
        gen = torch.Generator().manual_seed(int(seed))
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=gen), dim=1).to(resolve_dtype(dtype)))
        self.register_buffer("index", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self._extras: list[str] = []
        for name, (shape, dt) in (extras or {}).items():
            dt = resolve_dtype(dt) if isinstance(dt, str) else dt
            self.register_buffer(f"x_{name}", torch.zeros((size, *tuple(shape)), dtype=dt))
            self._extras.append(name)

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def valid(self) -> torch.Tensor:
        return self.index >= 0

    def extra(self, name: str) -> torch.Tensor:
        return getattr(self, f"x_{name}")

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, index: torch.Tensor, gather: bool = True, **extras: torch.Tensor) -> None:
        """Write ``keys`` (+ ``index`` and every extra field) at the pointer, wrapping around;
        with ``gather`` the entries of all ranks are all-gathered first (rank order)."""
        missing = set(self._extras) - set(extras)
        if missing:
            raise ValueError(f"enqueue is missing extra fields {sorted(missing)}")
        if gather:
            keys = concat_all_gather(keys)
            index = concat_all_gather(index)
            extras = {k: concat_all_gather(v) for k, v in extras.items()}
        n = keys.shape[0]
        if n > self.size:  # keep the newest `size` entries
            keys, index = keys[-self.size :], index[-self.size :]
            extras = {k: v[-self.size :] for k, v in extras.items()}
            n = self.size
        slots = (int(self.ptr) + torch.arange(n, device=self.keys.device)) % self.size
        self.keys.index_copy_(0, slots, keys.detach().to(self.keys.dtype))
        self.index.index_copy_(0, slots, index.detach().long().to(self.index.device))
        for name in self._extras:
            buf = self.extra(name)
            buf.index_copy_(0, slots, extras[name].detach().to(buf.device, buf.dtype))
        self.ptr.fill_((int(self.ptr) + n) % self.size)

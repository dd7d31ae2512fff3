"""A distributed sampler that resumes exactly mid-epoch.

Each epoch draws one permutation of ``0..N-1`` from ``(seed, epoch)`` (identical on every rank),
pads it to a multiple of ``num_replicas`` (or drops the tail with ``drop_last``) and gives rank ``r``
the slice ``perm[r::num_replicas]``. The trainer calls ``advance(k)`` after consuming ``k`` samples;
``state_dict()`` stores (epoch, position) and iteration after ``load_state_dict`` starts at that
position, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True):
        if num_samples <= 0:
            raise ValueError("the dataset is empty")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        self.n = int(num_samples)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # samples of this rank's epoch slice already consumed
        if drop_last:
            self.per_rank = self.n // self.num_replicas
        else:
            self.per_rank = math.ceil(self.n / self.num_replicas)
        if self.per_rank == 0:
            raise ValueError(f"{self.n} samples cannot be split over {self.num_replicas} ranks")

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's whole slice of ``epoch`` (without the resume offset)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        total = self.per_rank * self.num_replicas
        if total > self.n:  # pad by wrapping around
            perm = perm + perm[: total - self.n]
        else:
            perm = perm[:total]
        return perm[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices(self.epoch)[self.position:])

    def __len__(self) -> int:
        return self.per_rank - self.position

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (unless it is the epoch a resume restored)."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.position = 0

    def advance(self, k: int) -> None:
        self.position = min(self.per_rank, self.position + int(k))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_samples": self.n,
                "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_samples"]) != self.n:
            raise ValueError(f"the checkpoint's sampler covered {state['num_samples']} patches but the dataset has {self.n}; "
                             "resume with the same data.h5_dir/data.files")
        self.epoch = int(state["epoch"])
        position = int(state["position"])
        if int(state.get("num_replicas", self.num_replicas)) != self.num_replicas:
            # a different world size: keep the global progress, re-sliced
            position = position * int(state["num_replicas"]) // self.num_replicas
        self.position = min(position, self.per_rank)
        self.seed = int(state.get("seed", self.seed))

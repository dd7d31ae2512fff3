"""Per-cluster member lists of the memory bank, for SGCL's bounded (``indexed``) candidates.

Built from the k-means labels ``(R, N)`` once per refit: rows are grouped by their *signature*
(their cluster in every run), so the semantic candidates of an anchor — bank rows agreeing with
it in all R runs (methods.md §1.6 step 3) — are one contiguous slice of ``order``. Only labels
enter the index: bank rows may change features between refits (similarities are always taken
on the current rows), and membership changes only when the labels do.
"""

from __future__ import annotations

import torch


class ClusterIndex:
    """Rows grouped by k-means signature: ``order[start[g] : start[g] + count[g]]`` are group ``g``."""

    def __init__(self, labels: torch.Tensor):
        labels = labels.reshape(labels.shape[0], -1)
        _, group = torch.unique(labels.t(), dim=0, return_inverse=True)  # (N,) signature id per row
        self.group = group
        self.order = torch.argsort(group, stable=True)
        self.count = torch.bincount(group)
        self.start = torch.cumsum(self.count, 0) - self.count

    @property
    def num_groups(self) -> int:
        return self.count.numel()

    def members(self, owner: torch.Tensor) -> list[int]:
        """All rows sharing ``owner``'s signature (a Python list; for tests and diagnostics)."""
        g = int(self.group[int(owner)])
        s = int(self.start[g])
        return self.order[s : s + int(self.count[g])].tolist()

    @torch.no_grad()
    def sample(self, owners: torch.Tensor, pool: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """At most ``pool`` members of each owner's group: ``(index (Q, P), mask (Q, P))``.

        Groups of at most ``pool`` rows come back whole; larger groups are sampled uniformly
        (``pool`` draws with replacement, duplicates masked out), so every member has the same
        chance and the cost is O(Q·pool) whatever N and the group sizes.
        """
        owners = owners.to(self.group.device)
        g = self.group[owners]
        cnt, st = self.count[g], self.start[g]
        p = max(1, min(int(pool), int(cnt.max())))
        ar = torch.arange(p, device=owners.device).expand(owners.shape[0], p)
        draw = (torch.rand(owners.shape[0], p, generator=generator).to(owners.device) * cnt.unsqueeze(1)).long()
        whole = (cnt <= p).unsqueeze(1)
        pos = torch.where(whole, ar, draw).clamp_max(cnt.unsqueeze(1) - 1)  # a whole group's padding slots repeat its last row
        mask = torch.where(whole, ar < cnt.unsqueeze(1), torch.ones_like(whole.expand_as(ar)))
        idx = self.order[st.unsqueeze(1) + pos]
        # drop repeated draws: sort each row and keep the first of equal indices
        idx, perm = idx.sort(dim=1, stable=True)  # a whole group's real member precedes its masked copies
        mask = mask.gather(1, perm)
        dup = torch.zeros_like(mask)
        dup[:, 1:] = idx[:, 1:] == idx[:, :-1]
        return idx, mask & ~dup

"""SGCL — Spatial Guided Contrastive Learning (methods.md §1), with the reference bugs fixed.

``L = λ_s·L_single + λ_sp·w(e)·L_sp + λ_i·L_mcrop`` where

- ``L_single`` (self-invariance): NPID against the memory bank (``bank: memory``) or InfoNCE
  against the momentum key + queue (``bank: queue``), at ``τ_h``;
- ``L_sp`` (intra + inter invariance): multi-positive NCE at ``T_spatial`` over
  ``P_i = P^sp_i ∪ P^se_i`` against semi-hard mined negatives (``sgcl.losses.multi_positive_nce``);
- ``L_mcrop`` (inner invariance): each quadrant crop against its own position bank
  (memory mode) or against the patch's global key (queue mode, [ours]).

Two scales:

- ``bank: memory`` (the reference, §1.12): banks of N rows (projection, backbone, 4 quadrants),
  k-means over the bank. With ``candidates: exact`` the per-step cost grows with N; ``indexed``
  (and ``auto`` from 1M rows on) bounds it: semantic candidates from k-means member lists, mining in
  a pool of rows, a weighted sample of the NPID negatives (docs/sgcl_method.md).
- ``bank: queue`` (for 50M patches): momentum encoder + queue of K keys that stores each key's
  patch index, slide and grid cell, so spatial positives are the queued (and in-batch) keys of
  grid neighbours; k-means centroids are fitted on the queue and keys are assigned on the fly.

Fixes of §1.13: clusters are fitted on rank 0 and broadcast; an empty spatial neighbourhood
falls back to the anchor itself (no random aux anchor); the anchor never re-enters its own
semantic positive set; negatives exclude self and every positive.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from sgcl.clustering import assign_clusters, effective_clusters, fit_and_broadcast
from sgcl.data.neighbors import SpatialIndex
from sgcl.distributed import concat_all_gather
from sgcl.losses.info_nce import info_nce
from sgcl.losses.multi_positive_nce import multi_positive_nce
from sgcl.losses.npid import npid_loss
from sgcl.losses.ramp import sigmoid_rampup
from sgcl.memory.bank import MemoryBank, chunked_topk
from sgcl.memory.cluster_index import ClusterIndex
from sgcl.memory.queue import FeatureQueue
from sgcl.methods.base import DatasetMeta, PretrainMethod
from sgcl.methods.common import MomentumEncoder, autocast_off, make_head, num_features, step_generator
from sgcl.methods.config import INDEXED_MINING_POOL, INDEXED_NPID_SAMPLE, MethodConfig, uses_indexed
from sgcl.mining import mine_in_pool, mine_negatives
from sgcl.train.health import RecentRows

log = logging.getLogger(__name__)

QUADRANTS = ("tl", "tr", "bl", "br")


def union_sets(index: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deduplicate each row of a padded index set: returns sorted (index, mask) with every
    index kept once; masked slots hold a valid filler index (the row's first entry or 0)."""
    x = torch.where(mask, index, torch.full_like(index, -1))
    x, _ = x.sort(dim=1)
    keep = x >= 0
    keep[:, 1:] &= x[:, 1:] != x[:, :-1]
    filler = torch.where(keep.any(1), x.masked_fill(~keep, -1).max(1).values, torch.zeros_like(x[:, 0]))
    return torch.where(keep, x, filler.unsqueeze(1).expand_as(x)), keep


class SGCL(PretrainMethod):
    """SGCL on an NPID memory bank (``sgcl.bank = memory``) or a momentum encoder + queue (``queue``)."""

    def __init__(self, cfg: MethodConfig, backbone: nn.Module):
        super().__init__(backbone)
        self.cfg = cfg
        s = cfg.sgcl
        if not (s.self_term or s.intra_term or s.inter_term or s.inner_term):
            raise ValueError("SGCL needs at least one of sgcl.self_term/intra_term/inter_term/inner_term")
        if s.aux_num < 0 or s.nei_k <= 0 or s.num_negatives <= 0:
            raise ValueError("sgcl.aux_num must be >= 0 and sgcl.nei_k, sgcl.num_negatives > 0")
        if s.candidates not in ("exact", "indexed", "auto") or s.candidate_pool <= 0 or s.npid_sample < 0:
            raise ValueError("sgcl.candidates must be 'exact', 'indexed' or 'auto', sgcl.candidate_pool > 0 and sgcl.npid_sample >= 0")
        self.feat_dim = num_features(backbone)
        self.head = make_head(cfg, self.feat_dim)
        self.queue_mode = s.bank == "queue"
        self.num_views = 2 if self.queue_mode else 1
        self.needs_local = s.inner_term
        self.key_encoder = MomentumEncoder(backbone, self.head, cfg.moco.momentum) if self.queue_mode else None
        self.spatial: SpatialIndex | None = None
        self.num_patches = 0
        self._pending: list[dict[str, torch.Tensor]] = []
        self.recent = RecentRows()  # recent patch indices and backbone features (health diagnostics)
        self._cluster_index: ClusterIndex | None = None   # indexed candidates: built from self.clusters
        self._cluster_index_key: tuple | None = None
        self._neg_pool: tuple[torch.Tensor, torch.Tensor] | None = None   # (pool rows, mined positions) of the last pooled mining
        self.register_buffer("clustered_epoch", torch.tensor(-1, dtype=torch.long))

    # ------------------------------------------------------------------ setup
    @property
    def uses_spatial_loss(self) -> bool:
        return self.cfg.sgcl.intra_term or self.cfg.sgcl.inter_term

    @property
    def ranks_by_backbone(self) -> bool:
        s = self.cfg.sgcl
        return self.uses_spatial_loss and s.mining != "uniform" and s.backbone_bank

    def on_train_start(self, meta: DatasetMeta) -> None:
        """Build the spatial index and the banks/queues for ``meta.num_patches`` patches.
        Call before ``load_state_dict`` when resuming (the banks are buffers created here)."""
        s, cfg = self.cfg.sgcl, self.cfg
        device = next(self.parameters()).device
        n = int(meta.num_patches)
        if n <= 0:
            raise ValueError("SGCL needs a dataset with at least one patch")
        self.num_patches = n
        if self.uses_spatial_loss:
            index = meta.neighbors
            if index is None or not isinstance(index, SpatialIndex):
                index = SpatialIndex(meta.slide_of, meta.grid_of, radius=s.radius)
            self.spatial = index.to(device)
        if self.queue_mode:
            assert self.key_encoder is not None
            self.key_encoder.reset(self.backbone, self.head)
            extras: dict = {"slide": ((), torch.long), "grid": ((2,), torch.long)}
            if self.ranks_by_backbone:
                extras["feat"] = ((self.feat_dim,), s.bank_dtype)
            self.queue = FeatureQueue(cfg.moco.queue_size, cfg.proj_dim, dtype=s.bank_dtype, extras=extras, seed=cfg.seed).to(device)
            if s.inter_term:
                c = effective_clusters(cfg.moco.queue_size, s.kmeans_clusters)
                self.register_buffer("centroids", torch.zeros(s.kmeans_runs, c, cfg.proj_dim, device=device))
                self.register_buffer("has_centroids", torch.tensor(False, device=device))
        else:
            self.bank = MemoryBank(n, cfg.proj_dim, s.bank_momentum, s.bank_dtype, seed=cfg.seed, device=device)
            if self.ranks_by_backbone:
                self.bank_b = MemoryBank(n, self.feat_dim, s.bank_momentum, s.bank_dtype, seed=cfg.seed + 1, device=device)
            if s.inner_term:
                self.local_banks = nn.ModuleList(
                    MemoryBank(n, cfg.proj_dim, s.bank_momentum, s.bank_dtype, seed=cfg.seed + 2 + c, device=device) for c in range(4)
                )
            if s.inter_term:
                c = effective_clusters(n, s.kmeans_clusters)
                gen = torch.Generator().manual_seed(cfg.seed + 7)
                self.register_buffer("clusters", torch.randint(0, c, (s.kmeans_runs, n), generator=gen, dtype=torch.int32).to(device))
        self._log_memory(n)
        # Banks, queues and labels are kept identical on every rank by all-gathered updates and
        # broadcasts; DDP must not re-broadcast them from rank 0 at every forward (GBs at scale).
        self._ddp_params_and_buffers_to_ignore = [
            name for name, _ in self.named_buffers() if name.split(".")[0] in ("bank", "bank_b", "local_banks", "queue", "clusters", "centroids", "has_centroids", "clustered_epoch")
        ]

    def _log_memory(self, n: int) -> None:
        from sgcl.memory.estimate import estimate_memory, human, persistent_bytes

        parts = estimate_memory(self.cfg, n, self.feat_dim)
        total = persistent_bytes(parts)
        log.info("SGCL (%s mode) state for %d patches: %s (%s)", self.cfg.sgcl.bank, n, human(total),
                 ", ".join(f"{k} {human(v)}" for k, v in parts.items()))
        if not self.queue_mode and total > 16 * 2**30:
            log.warning(
                "SGCL memory-bank state is %s for %d patches; consider method.sgcl.bank=queue (constant memory), "
                "method.sgcl.bank_dtype=float16 or method.sgcl.mining_pool=1000000 (see docs/memory.md)", human(total), n,
            )

    def on_epoch_start(self, epoch: int) -> None:
        """Re-cluster (rank 0, broadcast) once per epoch; skipped when resuming inside an epoch
        that was already clustered (the labels are in the state_dict)."""
        s = self.cfg.sgcl
        if not s.inter_term or int(self.clustered_epoch) == int(epoch):
            return
        if self.queue_mode:
            valid = self.queue.valid()
            n_valid = int(valid.sum())
            if n_valid < max(4, s.kmeans_clusters // 10):  # queue still (nearly) empty: no clusters this epoch
                self.clustered_epoch.fill_(int(epoch))      # decided for this epoch (a resume must agree)
                return
            keys = self.queue.keys[valid].float()
            c = fit_and_broadcast_centroids(keys, self.centroids, s.kmeans_clusters, s.kmeans_iters, s.kmeans_seed)
            self.has_centroids.fill_(True)
            log.info("epoch %d: k-means on %d queued keys, %d clusters × %d runs", epoch, n_valid, c, s.kmeans_runs)
        else:
            c = fit_and_broadcast(self.bank.weight, self.clusters, s.kmeans_clusters, s.kmeans_iters, s.kmeans_seed)
            log.info("epoch %d: k-means on the %d-row bank, %d clusters × %d runs", epoch, self.bank.num_rows, c, s.kmeans_runs)
        self.clustered_epoch.fill_(int(epoch))

    def extra_state(self) -> dict:
        """What the buffers were built for; checked on resume (the buffers themselves are in the state_dict)."""
        return {"num_patches": self.num_patches, "bank": self.cfg.sgcl.bank, "proj_dim": self.cfg.proj_dim}

    def load_extra_state(self, state: dict) -> None:
        if not state:
            return
        if self.num_patches and int(state.get("num_patches", self.num_patches)) != self.num_patches:
            raise ValueError(
                f"the checkpoint's SGCL banks hold {state['num_patches']} patches but the dataset has {self.num_patches}: "
                "resume with the same HDF5 files (same order), or start a new run"
            )
        if state.get("bank", self.cfg.sgcl.bank) != self.cfg.sgcl.bank:
            raise ValueError(f"the checkpoint used sgcl.bank={state['bank']!r}, this run sgcl.bank={self.cfg.sgcl.bank!r}")

    # ---------------------------------------------------------------- forward
    def forward(self, batch: dict, epoch: float, step: int) -> dict[str, torch.Tensor]:
        if self.num_patches == 0:
            raise RuntimeError("SGCL.on_train_start(meta) must be called before the first forward")
        if self.queue_mode:
            return self._forward_queue(batch, epoch, step)
        return self._forward_memory(batch, epoch, step)

    def _encode(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        h = self.backbone(batch["views"][0])
        q = F.normalize(self.head(h).float(), dim=1)
        hb = F.normalize(h.float(), dim=1)
        u = None
        if self.cfg.sgcl.inner_term:
            local = batch.get("local")
            if local is None:
                raise ValueError("sgcl.inner_term needs the quadrant crops in batch['local'] (4B, 3, h, w); enable the multi-crop views or set method.sgcl.inner_term=false")
            if local.shape[0] != 4 * q.shape[0]:
                raise ValueError(f"batch['local'] must hold 4 quadrant crops per patch: got {local.shape[0]} rows for a batch of {q.shape[0]}")
            u = F.normalize(self.head(self.backbone(local)).float(), dim=1)
        return q, hb, u

    def _forward_memory(self, batch: dict, epoch: float, step: int) -> dict[str, torch.Tensor]:
        s, cfg = self.cfg.sgcl, self.cfg
        idx = batch["index"].to(self.bank.weight.device).long()
        q, hb, u = self._encode(batch)
        with autocast_off(q.device):
            n = self.bank.num_rows
            out: dict[str, torch.Tensor] = {}
            loss = q.new_zeros(())
            if s.self_term:
                k_draw = self.npid_sample
                neg = self._npid_draws(n, k_draw, step_generator(cfg.seed, step, 1), q.device)
                l_single = npid_loss(q, self.bank.rows(idx), self.bank.rows(neg), cfg.tau_head, s.num_negatives / k_draw)
                loss = loss + s.lambda_single * l_single
                out["loss_single"] = l_single.detach()
            if self.uses_spatial_loss:
                pos_idx, pos_mask, neg_idx, neg_mask, diag = self.positive_negative_sets(q, hb, idx, step)
                pos_sim = torch.einsum("bd,bkd->bk", q, self.bank.rows(pos_idx))
                neg_sim = self._negative_sims(q, neg_idx)
                loss = loss + self._spatial_term(pos_sim, pos_mask, neg_sim, neg_mask, n, epoch, out)
                out.update(diag)
            if s.inner_term:
                assert u is not None
                # K/4 rows of each position bank, shared by the 4 quadrants; one (4B, K) product (the
                # mean over 4B rows is the mean of the 4 per-quadrant means: equal batch sizes)
                per, per_draw = max(1, s.num_negatives // 4), max(1, self.npid_sample // 4)
                gen = step_generator(cfg.seed, step, 3)
                negs = torch.cat([bank.rows(self._npid_draws(n, per_draw, gen, q.device)) for bank in self.local_banks])
                own = torch.cat([bank.rows(idx) for bank in self.local_banks])
                l_m = npid_loss(u, own, negs, cfg.tau_head, per / per_draw)
                loss = loss + s.lambda_inner * l_m
                out["loss_mcrop"] = l_m.detach()
            if self.training:
                self._pending.append({"index": idx.detach(), "q": q.detach(), "hb": hb.detach(), "u": None if u is None else u.detach()})
                self.recent.add("index", idx.unsqueeze(1))
                self.recent.add("embedding", q)
                self.recent.add("backbone", hb)
            out["loss"] = loss
        return out

    def _spatial_term(self, pos_sim: torch.Tensor, pos_mask: torch.Tensor, neg_sim: torch.Tensor,
                      neg_mask: torch.Tensor, n: int, epoch: float, out: dict) -> torch.Tensor:
        """λ·w(e)·L_sp (the multi-positive loss over spatial + semantic positives), logging its parts in ``out``.

        The gradient flows into the query through ``pos_sim`` and ``neg_sim`` (the sets themselves
        are built and mined under ``no_grad``; bank rows, queued keys and the key encoder's output
        carry none)."""
        s, cfg = self.cfg.sgcl, self.cfg
        l_sp = multi_positive_nce(pos_sim, pos_mask, neg_sim, neg_mask, cfg.T_spatial, s.denominator, n)
        w = sigmoid_rampup(epoch, s.rampup_epochs)
        out["loss_spatial"] = (w * l_sp).detach()
        out["loss_spatial_raw"] = l_sp.detach()
        out["ramp_weight"] = torch.tensor(w)
        out["neg_sim"] = _masked_mean(neg_sim.detach(), neg_mask)
        out["pos_sim"] = _masked_mean(pos_sim.detach(), pos_mask)
        return s.lambda_spatial * w * l_sp

    def positive_negative_sets(self, q: torch.Tensor, hb: torch.Tensor, idx: torch.Tensor, step: int):
        """Memory mode: padded positive set ``P_i`` and mined negatives ``H_i`` of each anchor.

        Returns ``(pos_idx, pos_mask, neg_idx, neg_mask, diagnostics)``; all indices are global
        patch indices. Negatives never contain the anchor or any of its positives.
        """
        s, cfg = self.cfg.sgcl, self.cfg
        pos_idx, pos_mask, diag = self._positives_memory(q, idx, step)
        exclude = torch.cat([idx.unsqueeze(1), torch.where(pos_mask, pos_idx, torch.full_like(pos_idx, -1))], 1)
        if self.ranks_by_backbone:
            rank_q, rank_keys = hb, self.bank_b.weight
        else:
            rank_q, rank_keys = q, self.bank.weight
        pool = s.mining_pool
        if self.indexed and pool <= 0:
            pool = INDEXED_MINING_POOL
        gen = step_generator(cfg.seed, step, 2)
        self._neg_pool = None
        if self.indexed and 0 < pool < rank_keys.shape[0] and s.mining != "uniform":
            # bounded pool shared by the batch (the draws of mine_negatives(pool=...)); Beta rank
            # positions with replacement keep their shape in a short band. The pool rows are kept
            # so that the loss scores the negatives with one (B, pool) product, not a (B, k, D) gather.
            rows, local, neg_mask = mine_in_pool(rank_q, rank_keys, exclude, s.nei_k, s.mining, s.mining_frac,
                                                 s.beta_a, s.beta_b, gen, chunk=s.sim_chunk, pool=pool, replacement=True)
            self._neg_pool = (rows, local)
            return pos_idx, pos_mask, rows[local], neg_mask, diag
        neg_idx, neg_mask = mine_negatives(
            rank_q, rank_keys, exclude, s.nei_k, s.mining, s.mining_frac, s.beta_a, s.beta_b,
            generator=gen, chunk=s.sim_chunk, pool=pool,
        )
        return pos_idx, pos_mask, neg_idx, neg_mask, diag

    @torch.no_grad()
    def _positives_memory(self, q: torch.Tensor, idx: torch.Tensor, step: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``P_i = P^sp_i ∪ P^se_i`` as a padded (B, K) index set + mask (memory mode)."""
        s = self.cfg.sgcl
        assert self.spatial is not None
        nb = self.spatial.neighbors(idx, s.radius)
        true_nb = nb.mask & ~nb.fallback.unsqueeze(1)
        parts_i, parts_m = [], []
        diag = {"pos_spatial": true_nb.sum(1).float().mean(), "fallback_frac": nb.fallback.float().mean()}
        if s.intra_term:
            parts_i.append(nb.index)
            parts_m.append(nb.mask)  # fallback rows: the anchor itself
        n_se = torch.zeros(idx.shape[0], device=idx.device)
        if s.inter_term:
            clusters = self.clusters
            b = idx.shape[0]
            k = min(s.nei_k, self.bank.num_rows)
            queries, owners, anchors = [q], [idx], [idx]
            excl = [torch.stack([idx, torch.full_like(idx, -1)], 1)]   # the anchor's own row is excluded
            row_ok = [torch.ones_like(idx, dtype=torch.bool)]
            a = 0
            if s.aux_num > 0 and bool(true_nb.any()):
                # aux anchors: the neighbours most similar to q under exp(s/T) (= largest s), bank rows
                a = min(s.aux_num, nb.index.shape[1])
                sim_nb = torch.einsum("bd,bkd->bk", q, self.bank.rows(nb.index)).masked_fill(~true_nb, float("-inf"))
                top_v, top_p = sim_nb.topk(a, dim=1)
                aux = nb.index.gather(1, top_p).reshape(-1)            # (B·a,), b-major
                queries.append(self.bank.rows(aux))
                owners.append(aux)
                anchors.append(idx.repeat_interleave(a))
                excl.append(torch.stack([aux, idx.repeat_interleave(a)], 1))
                row_ok.append(torch.isfinite(top_v).reshape(-1))       # slots with a real neighbour
            own = torch.cat(owners)
            if self.indexed:   # bounded: members of the owner's k-means group, top-k among them
                cand, ok = self._indexed_candidates(torch.cat(queries), own, torch.cat(anchors), k, step)
                kk = cand.shape[1]
            else:              # one scan of the bank for the anchors and all their aux anchors
                cand_v, cand = chunked_topk(torch.cat(queries), self.bank.weight, k, chunk=s.sim_chunk, exclude=torch.cat(excl))
                ok = (clusters[:, cand] == clusters[:, own].unsqueeze(2)).all(0)   # same cluster in every run
                ok &= torch.isfinite(cand_v)
                kk = k
            ok &= torch.cat(row_ok).unsqueeze(1)
            ok &= cand != torch.cat(anchors).unsqueeze(1)                      # the anchor never re-enters
            se_i = [cand[:b], cand[b:].reshape(b, a * kk)]
            se_m = [ok[:b], ok[b:].reshape(b, a * kk)]
            se_idx, se_mask = union_sets(torch.cat(se_i, 1), torch.cat(se_m, 1))
            n_se = se_mask.sum(1).float()
            parts_i.append(se_idx)
            parts_m.append(se_mask)
        pos_idx, pos_mask = union_sets(torch.cat(parts_i, 1), torch.cat(parts_m, 1))
        empty = ~pos_mask.any(1)
        if bool(empty.any()):  # no positive at all: the anchor itself
            pos_idx[empty, 0] = idx[empty]
            pos_mask[empty, 0] = True
        diag["pos_semantic"] = n_se.mean()
        diag["pos_total"] = pos_mask.sum(1).float().mean()
        return pos_idx, pos_mask, diag

    @property
    def indexed(self) -> bool:
        """Bounded per-step cost (``candidates: indexed``, or ``auto`` from ``AUTO_INDEXED_ROWS`` rows on)."""
        return uses_indexed(self.cfg.sgcl, self.num_patches)

    @property
    def npid_sample(self) -> int:
        """NPID negatives drawn per step by the self and inner terms (≤ ``num_negatives``)."""
        s = self.cfg.sgcl
        k = s.npid_sample if s.npid_sample > 0 else (INDEXED_NPID_SAMPLE if self.indexed else s.num_negatives)
        return min(k, s.num_negatives)

    def _npid_draws(self, n: int, k: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
        """``k`` uniform bank rows for an NPID term. Indexed mode gathers them in increasing order
        (the loss sums over them, so the order does not matter; sorted gathers are cache-friendly)."""
        draws = torch.randint(0, n, (k,), generator=gen)
        return (draws.sort().values if self.indexed else draws).to(device)

    def _negative_sims(self, q: torch.Tensor, neg_idx: torch.Tensor) -> torch.Tensor:
        """``q_b · V[neg_idx[b, k]]`` (B, k), with grad through ``q``. After pooled mining, one
        (B, pool) product with the pool's rows, gathered at the mined positions; otherwise a
        (B, k, D) gather of the mined rows (the reference path)."""
        pooled, self._neg_pool = self._neg_pool, None
        if pooled is None:
            return torch.einsum("bd,bkd->bk", q, self.bank.rows(neg_idx))
        rows, local = pooled
        return (q @ self.bank.rows(rows).t()).gather(1, local)

    def cluster_index(self) -> ClusterIndex:
        """The member lists of the current k-means labels, rebuilt whenever the labels change
        (refit, broadcast or ``load_state_dict`` all write ``clusters`` in place, bumping its version)."""
        key = (self.clusters.data_ptr(), self.clusters._version)
        if self._cluster_index is None or self._cluster_index_key != key:
            self._cluster_index = ClusterIndex(self.clusters)
            self._cluster_index_key = key
        return self._cluster_index

    @torch.no_grad()
    def _indexed_candidates(self, queries: torch.Tensor, owners: torch.Tensor, anchors: torch.Tensor, k: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Semantic candidates of each owner without a bank scan: at most ``candidate_pool`` members
        of its k-means group (all of them if the group is smaller), the owner and the anchor excluded,
        ranked by similarity to the owner's query, top ``k`` kept. Returns ``(index (Q, k'), mask (Q, k'))``."""
        s = self.cfg.sgcl
        cand, ok = self.cluster_index().sample(owners, s.candidate_pool, step_generator(self.cfg.seed, step, 5))
        ok = ok & (cand != owners.unsqueeze(1)) & (cand != anchors.unsqueeze(1))
        if cand.shape[1] > k:
            sim = torch.einsum("qd,qkd->qk", queries.float(), self.bank.rows(cand)).masked_fill(~ok, float("-inf"))
            top_v, top_p = sim.topk(k, dim=1)
            cand, ok = cand.gather(1, top_p), torch.isfinite(top_v)
        return cand, ok

    # ----------------------------------------------------------- queue mode
    def _forward_queue(self, batch: dict, epoch: float, step: int) -> dict[str, torch.Tensor]:
        s, cfg = self.cfg.sgcl, self.cfg
        assert self.key_encoder is not None
        if len(batch["views"]) < 2:
            raise ValueError("SGCL with sgcl.bank=queue needs two global views per patch (batch['views'][1])")
        idx = batch["index"].long().to(self.queue.keys.device)
        q, hb, u = self._encode(batch)
        k, hk = self.key_encoder(batch["views"][1], shuffle_bn=cfg.moco.shuffle_bn, generator=step_generator(cfg.seed, step, 11))
        with autocast_off(q.device):
            out: dict[str, torch.Tensor] = {}
            loss = q.new_zeros(())
            queue_keys = self.queue.keys.detach()
            if s.self_term:
                l_single = info_nce(q, k, queue_keys, cfg.tau_head)
                loss = loss + s.lambda_single * l_single
                out["loss_single"] = l_single.detach()
            slide = self.spatial.slide_of[idx] if self.spatial is not None else batch["slide"].long().to(idx.device)
            grid = self.spatial.grid_of[idx] if self.spatial is not None else batch["grid"].long().to(idx.device)
            if self.uses_spatial_loss:
                # candidates: keys of the whole (gathered) batch, then the filled queue slots
                valid = self.queue.valid()
                cand_k = torch.cat([concat_all_gather(k), queue_keys[valid].float()])
                cand_i = torch.cat([concat_all_gather(idx), self.queue.index[valid]])
                cand_s = torch.cat([concat_all_gather(slide), self.queue.extra("slide")[valid]])
                cand_g = torch.cat([concat_all_gather(grid), self.queue.extra("grid")[valid]])
                sim = q @ cand_k.t()                                              # (B, M), grad through q
                pos_mask, fallback, diag = self._positives_queue(q, k, idx, slide, grid, cand_k, cand_i, cand_s, cand_g, sim=sim.detach())
                pos_sim = torch.cat([sim, (q * k).sum(1, keepdim=True)], 1)        # last column: own key (fallback)
                pos_m = torch.cat([pos_mask, fallback.unsqueeze(1)], 1)
                m = cand_k.shape[0]
                ar = torch.arange(m, device=q.device).expand(q.shape[0], -1)
                exclude = torch.where(pos_mask | (cand_i.unsqueeze(0) == idx.unsqueeze(1)), ar, torch.full_like(ar, -1))
                if self.ranks_by_backbone:
                    cand_f = torch.cat([concat_all_gather(hk), self.queue.extra("feat")[valid].float()])
                    rank_q = hb
                else:
                    cand_f, rank_q = cand_k, q
                neg_idx, neg_mask = mine_negatives(
                    rank_q, cand_f, exclude, s.nei_k, s.mining, s.mining_frac, s.beta_a, s.beta_b,
                    generator=step_generator(cfg.seed, step, 2), chunk=s.sim_chunk,
                )
                neg_sim = sim.gather(1, neg_idx)
                loss = loss + self._spatial_term(pos_sim, pos_m, neg_sim, neg_mask, m, epoch, out)
                out.update(diag)
            if s.inner_term:
                assert u is not None
                l_m = info_nce(u, k.repeat(4, 1), queue_keys, cfg.tau_head)  # quadrant c of patch i ↔ key of patch i
                loss = loss + s.lambda_inner * l_m
                out["loss_mcrop"] = l_m.detach()
            if self.training:
                self._pending.append({"index": idx, "k": k, "hk": hk, "slide": slide, "grid": grid})
                self.recent.add("embedding", q)
                self.recent.add("backbone", hb)
            out["loss"] = loss
        return out

    @torch.no_grad()
    def _positives_queue(self, q, k, idx, slide, grid, cand_k, cand_i, cand_s, cand_g, sim=None):
        """Dense (B, M) positive mask over the M = batch + queue candidates (M ≤ queue size + batch,
        never N), and the rows that fall back to the anchor's own key. ``sim``: ``q @ cand_k.T`` if known."""
        s = self.cfg.sgcl
        if sim is None:
            sim = q @ cand_k.t()
        not_self = cand_i.unsqueeze(0) != idx.unsqueeze(1)
        d2 = ((cand_g.unsqueeze(0) - grid.unsqueeze(1)).float() ** 2).sum(-1)
        sp = (cand_s.unsqueeze(0) == slide.unsqueeze(1)) & (d2 > 0) & (d2 < s.radius**2) & not_self
        mask = sp.clone() if s.intra_term else torch.zeros_like(sp)
        n_se = torch.zeros(idx.shape[0], device=idx.device)
        if s.inter_term and bool(self.has_centroids):
            lab_c = torch.stack([assign_clusters(cand_k, c) for c in self.centroids])   # (R, M)
            lab_q = torch.stack([assign_clusters(k, c) for c in self.centroids])        # (R, B) anchor = own key
            kk = min(s.nei_k, cand_k.shape[0])
            top_v, top_i = sim.masked_fill(~not_self, float("-inf")).topk(kk, dim=1)
            se = torch.zeros_like(sp)
            ok = (lab_c[:, top_i] == lab_q.unsqueeze(2)).all(0) & torch.isfinite(top_v)
            se.scatter_(1, top_i, ok)
            if s.aux_num > 0:
                sim_sp = sim.masked_fill(~sp, float("-inf"))
                a = min(s.aux_num, sim_sp.shape[1])
                av, ai = sim_sp.topk(a, dim=1)                                          # (B, a)
                for j in range(a):
                    has = torch.isfinite(av[:, j])
                    aux = ai[:, j]
                    sim_a = (cand_k[aux] @ cand_k.t()).masked_fill(~not_self, float("-inf"))
                    sim_a.scatter_(1, aux.unsqueeze(1), float("-inf"))
                    tv, ti = sim_a.topk(kk, dim=1)
                    ok_a = (lab_c[:, ti] == lab_c[:, aux].unsqueeze(2)).all(0) & torch.isfinite(tv) & has.unsqueeze(1)
                    se.scatter_(1, ti, ok_a | se.gather(1, ti))
            se &= not_self
            n_se = se.sum(1).float()
            mask |= se
        fallback = ~mask.any(1)
        diag = {
            "pos_spatial": sp.sum(1).float().mean(),
            "pos_semantic": n_se.mean(),
            "pos_total": (mask.sum(1) + fallback).float().mean(),
            "fallback_frac": fallback.float().mean(),
        }
        return mask, fallback, diag

    def representation_rows(self) -> dict[str, torch.Tensor]:
        """Queue mode: the filled queue slots; memory mode: the bank rows of recently visited
        patches (what the losses compare with; early on they still hold part of their random
        initialisation); plus the recent queries (``embedding``) and backbone features."""
        rows: dict[str, torch.Tensor] = {}
        if self.queue_mode:
            rows["queue"] = self.queue.keys[self.queue.valid()]
        else:
            seen = self.recent.get("index")
            if seen is not None:
                rows["bank"] = self.bank.rows(torch.unique(seen.long().flatten()))
        for name in ("embedding", "backbone"):
            recent = self.recent.get(name)
            if recent is not None:
                rows[name] = recent
        return rows

    # ------------------------------------------------------------ after step
    @torch.no_grad()
    def on_after_step(self, out: dict[str, torch.Tensor]) -> None:
        if self.queue_mode:
            assert self.key_encoder is not None
            self.key_encoder.update(self.backbone, self.head)
            for p in self._pending:
                extras = {"slide": p["slide"], "grid": p["grid"]}
                if self.ranks_by_backbone:
                    extras["feat"] = p["hk"]
                self.queue.enqueue(p["k"], p["index"], **extras)
        else:
            for p in self._pending:
                idx = concat_all_gather(p["index"])
                self.bank.update(idx, concat_all_gather(p["q"]), gather=False)
                if self.ranks_by_backbone:
                    self.bank_b.update(idx, concat_all_gather(p["hb"]), gather=False)
                if p["u"] is not None:
                    b = p["index"].shape[0]
                    for c, bank in enumerate(self.local_banks):
                        bank.update(idx, concat_all_gather(p["u"][c * b : (c + 1) * b]), gather=False)
        self._pending.clear()


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.float().mean() if x.numel() else x.new_zeros(())
    m = mask.float()
    return (x.float() * m).sum() / m.sum().clamp_min(1)


@torch.no_grad()
def fit_and_broadcast_centroids(keys: torch.Tensor, centroids_out: torch.Tensor, num_clusters: int, niter: int, seed: int) -> int:
    """Queue mode: k-means on the queued keys (rank 0), centroids broadcast in place."""
    runs, c_max, _ = centroids_out.shape
    labels = torch.empty(runs, keys.shape[0], dtype=torch.long, device=keys.device)
    c = fit_and_broadcast(keys, labels, min(num_clusters, c_max), niter, seed, centroids_out=centroids_out)
    if c < c_max:  # unused centroid slots must never win an assignment (far away, finite)
        centroids_out[:, c:] = 0.0
        centroids_out[:, c:, 0] = 1e4
    return c

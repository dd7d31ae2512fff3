"""Approximate inner-product neighbour search for large kNN banks: the index plan and the IVF / HNSW searches.

IVF (the ``auto`` choice above ``exact_max``): faiss spherical k-means on a seeded sample gives
``nlist`` centroids; every bank vector goes to its nearest centroid (one chunked matrix product);
each query probes its ``nprobe`` nearest lists. The list scan is batched by list: ONE matrix product of
the list's vectors with every query probing it. ``scan="float32"`` scans the vectors themselves.
``scan="int8"`` stores each vector's residual to its centroid as int8 codes (divided by the list's
per-dimension range, then scaled per vector, so near-duplicates keep their small differences); the
query side (query * range) is split into two int8 planes (hi + lo / 254, ~15 bits), the products run
in int8 (``torch._int_mm``: 4-5x the fp32 rate on a CPU with VNNI), and the ``rerank * k`` best
candidates of each query are re-scored with the exact fp32 inner products, which give the final
neighbours. HNSW: faiss ``IndexHNSWFlat``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

IndexKind = Literal["auto", "exact", "ivf", "hnsw"]
ScanKind = Literal["int8", "float32"]
DEFAULT_EXACT_MAX = 200_000   # banks up to this size are searched exactly under index="auto"
TRAIN_PER_LIST = 64           # IVF k-means sample: this many points per list (faiss needs >= 39)
DEFAULT_RERANK = 8            # int8 scan: candidates re-scored exactly per query = rerank * k
KMEANS_ITERS = 20
_CHUNK = 8192                 # bank rows per step of the assignment pass (stays in cache)


def _pow2(x: float) -> int:
    return 1 << max(0, int(round(np.log2(max(x, 1.0)))))


def plan_index(n: int, k: int, index: IndexKind = "auto", exact_max: int = DEFAULT_EXACT_MAX,
               nlist: int | None = None, nprobe: int | None = None, train_per_list: int = TRAIN_PER_LIST,
               hnsw_m: int | None = None, ef_search: int | None = None, seed: int = 0,
               scan: ScanKind = "float32", rerank: int = DEFAULT_RERANK) -> dict:
    """The search index for a bank of ``n`` vectors and ``k`` neighbours, as a JSON-ready dict.

    Rules (``None`` = the rule; any value overrides it):

    - ``auto``: ``exact`` when ``n <= exact_max``, else ``ivf``;
    - ``ivf``: ``nlist`` = the power of two nearest ``sqrt(n) / 4`` (at most ``n // 39``, so k-means
      has 39 points per list; 1M -> 256); ``nprobe`` = ``max(16, nlist // 8)`` (1M: 32 of 256 lists);
      spherical k-means (20 iterations) on a seeded sample of ``min(n, train_per_list * nlist)`` bank
      vectors; ``scan`` float32 (default: at 1M x 512 on a 2-core CPU the int8 scan, with ``rerank * k``
      candidates re-scored exactly, reached the same recall but was slower, docs/benchmarks.md) or int8;
    - ``hnsw``: ``M`` = 48, ``efConstruction`` = 200, ``efSearch`` = ``max(256, 4 k)``.
    """
    if index not in ("auto", "exact", "ivf", "hnsw"):
        raise ValueError(f"unknown kNN index {index!r}; choose auto, exact, ivf or hnsw")
    if scan not in ("int8", "float32"):
        raise ValueError(f"unknown IVF scan {scan!r}; choose int8 or float32")
    kind = ("exact" if n <= exact_max else "ivf") if index == "auto" else index
    plan: dict = {"index": kind, "requested": index, "n": int(n), "exact_max": int(exact_max)}
    if kind == "ivf":
        nl = int(nlist) if nlist else min(_pow2(np.sqrt(n) / 4), max(1, n // 39))
        plan.update(nlist=nl, nprobe=min(nl, int(nprobe) if nprobe else max(16, nl // 8)),
                    train_size=int(min(n, train_per_list * nl)), seed=int(seed), scan=scan)
        if scan == "int8":
            plan["rerank"] = int(max(1, rerank))
    elif kind == "hnsw":
        plan.update(M=int(hnsw_m or 48), ef_construction=200, ef_search=int(ef_search or max(256, 4 * k)))
    return plan


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for int8 matrices: int32 through ``torch._int_mm``, else the same integers in float32
    (exact: |sums| <= 512 * 127^2 < 2^24 for D <= 1024)."""
    if hasattr(torch, "_int_mm"):
        try:
            return torch._int_mm(a, b)
        except RuntimeError:
            pass
    return a.float() @ b.float()


def _topk_rows(s: torch.Tensor, k: int, block: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-``k`` of ``s``, the same as ``s.topk(k, 1)`` up to ties: the top ``k`` entries lie in
    the ``k`` blocks of ``block`` columns with the largest maxima, so only those are sorted."""
    m, width = s.shape
    if width <= 4 * k * block or width % block:
        return s.topk(min(k, width), dim=1)
    blocks = s.view(m, width // block, block).amax(2).topk(k, dim=1).indices
    cols = (blocks[:, :, None] * block + torch.arange(block)).reshape(m, -1)
    v, j = s.gather(1, cols).topk(k, dim=1)
    return v, cols.gather(1, j)


class IvfIndex:
    """Inverted lists over a bank (see the module docstring), built on construction; searched by
    :meth:`candidates` (scan order), then :func:`rerank` for the int8 scan."""

    def __init__(self, bank: torch.Tensor, plan: dict) -> None:
        n, d = bank.shape
        self.plan, self.nlist = plan, plan["nlist"]
        rng = np.random.default_rng(plan["seed"])
        sample = torch.from_numpy(np.sort(rng.choice(n, plan["train_size"], replace=False)))
        self.centroids = self._kmeans(bank[sample], plan)
        assign = torch.empty(n, dtype=torch.int64)
        spread = torch.zeros(self.nlist, d)       # per list, per dimension: max |residual|
        ct = self.centroids.T.contiguous()
        for s in range(0, n, _CHUNK):
            x = bank[s:s + _CHUNK]
            a = (x @ ct).argmax(1)
            assign[s:s + _CHUNK] = a
            if plan["scan"] == "int8":
                spread.scatter_reduce_(0, a[:, None].expand(-1, d), (x - self.centroids[a]).abs_(), "amax")
        self.order = torch.argsort(assign, stable=True)
        self.bounds = torch.searchsorted(assign[self.order], torch.arange(self.nlist + 1)).tolist()
        if plan["scan"] == "int8":
            self.spread = spread.clamp_min(1e-12)          # residual = code * item_scale * spread
            self.item_scale = torch.empty(n)
            self.lists = torch.empty(n, d, dtype=torch.int8)
            for lst in range(self.nlist):
                lo, hi = self.bounds[lst], self.bounds[lst + 1]
                if hi > lo:
                    r = (bank[self.order[lo:hi]] - self.centroids[lst]).div_(self.spread[lst])
                    a = r.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127.0
                    self.lists[lo:hi] = r.div_(a).round_().clamp_(-127, 127).to(torch.int8)
                    self.item_scale[lo:hi] = a[:, 0]
        else:
            self.lists = bank[self.order]

    @staticmethod
    def _kmeans(sample: torch.Tensor, plan: dict) -> torch.Tensor:
        import faiss

        km = faiss.Kmeans(sample.shape[1], plan["nlist"], niter=KMEANS_ITERS, spherical=True, seed=plan["seed"],
                          max_points_per_centroid=1 << 30)
        km.train(np.ascontiguousarray(sample.numpy(), dtype=np.float32))
        return torch.from_numpy(km.centroids)

    def candidates(self, queries: torch.Tensor, kc: int) -> torch.Tensor:
        """The ``kc`` best bank indices per query over its ``nprobe`` lists by the scan's scores (int8:
        approximate; float32: exact inner products), ``(Q, kc)``; -1 where the lists hold fewer."""
        nq, nprobe = queries.shape[0], self.plan["nprobe"]
        cscore = queries @ self.centroids.T
        probes = cscore.topk(nprobe, dim=1).indices.numpy().ravel()
        qidx, slot = np.repeat(np.arange(nq), nprobe), np.tile(np.arange(nprobe), nq)
        by_list = np.argsort(probes, kind="stable")
        qb = np.searchsorted(probes[by_list], np.arange(self.nlist + 1))
        cand_s = torch.full((nq, nprobe * kc), -float("inf"))
        cand_i = torch.full((nq, nprobe * kc), -1, dtype=torch.int64)
        int8 = self.plan["scan"] == "int8"
        for lst in range(self.nlist):
            sel, lo, hi = by_list[qb[lst]:qb[lst + 1]], self.bounds[lst], self.bounds[lst + 1]
            if len(sel) == 0 or hi == lo:
                continue
            qq, sl = torch.from_numpy(qidx[sel]), torch.from_numpy(slot[sel])
            if int8:   # q . (c + code * a * spread) = q . c + a * ((q * spread) . code)
                u = queries[qq] * self.spread[lst]
                unit = u.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127.0
                hi8 = u.div_(unit).round()        # q * spread in two int8 planes: hi8 + lo8 / 254
                lo8 = (u - hi8).mul_(254.0).round_()
                p = _int_mm(torch.cat([hi8, lo8]).to(torch.int8), self.lists[lo:hi].T).float()
                s = p[:len(qq)].add_(p[len(qq):], alpha=1 / 254.0).mul_(self.item_scale[lo:hi])
                v, j = _topk_rows(s, min(kc, hi - lo))
                v = v * unit + cscore[qq, lst][:, None]
            else:
                v, j = _topk_rows(queries[qq] @ self.lists[lo:hi].T, min(kc, hi - lo))
            cols = sl[:, None] * kc + torch.arange(v.shape[1])[None]
            cand_s[qq[:, None], cols] = v
            cand_i[qq[:, None], cols] = j + lo
        pos = cand_i.gather(1, torch.topk(cand_s, kc, dim=1).indices)
        return torch.where(pos >= 0, self.order[pos.clamp(min=0)], torch.full_like(pos, -1))


def rerank(bank: torch.Tensor, queries: torch.Tensor, cand: torch.Tensor, k: int,
           batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` candidates of highest exact inner product per query, ``(scores, indices)`` each
    ``(Q, k)`` in descending score; a candidate -1 (none) scores -inf and stays -1."""
    k = min(k, cand.shape[1])
    scores = torch.empty(cand.shape[0], k)
    out = torch.empty(cand.shape[0], k, dtype=torch.int64)
    for s in range(0, cand.shape[0], batch_size):
        c = cand[s:s + batch_size]
        sims = torch.einsum("qd,qkd->qk", queries[s:s + batch_size], bank[c.clamp(min=0)])
        sims.masked_fill_(c < 0, -float("inf"))
        v, j = sims.topk(k, dim=1)
        scores[s:s + batch_size], out[s:s + batch_size] = v, c.gather(1, j)
    return scores, out


def _hnsw_index(xb: np.ndarray, plan: dict):
    import faiss

    index = faiss.IndexHNSWFlat(xb.shape[1], plan["M"], faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = plan["ef_construction"]
    index.hnsw.efSearch = plan["ef_search"]
    index.add(xb)
    return index


def search_ann(bank: torch.Tensor, queries: torch.Tensor, k: int, plan: dict, batch_size: int = 4096) -> torch.Tensor:
    """Top-``k`` inner-product neighbours from the approximate index of ``plan`` (:func:`plan_index`);
    a query with fewer than ``k`` neighbours found (probed IVF lists too short) is searched exactly."""
    from evaluation.knn import _check, search_faiss

    _check(bank, queries)
    k = min(k, bank.shape[0])
    xb = bank.detach().cpu().float().contiguous()
    xq = queries.detach().cpu().float().contiguous()
    if plan["index"] == "ivf":
        ivf = IvfIndex(xb, {"scan": "float32", **plan})
        if ivf.plan["scan"] == "int8":
            nn = rerank(xb, xq, ivf.candidates(xq, ivf.plan.get("rerank", DEFAULT_RERANK) * k), k)[1]
        else:
            nn = ivf.candidates(xq, k)
    elif plan["index"] == "hnsw":
        index = _hnsw_index(xb.numpy(), plan)
        out = []
        for start in range(0, xq.shape[0], batch_size):
            _, idx = index.search(xq[start:start + batch_size].numpy(), k)
            out.append(torch.from_numpy(idx.astype(np.int64)))
        nn = torch.cat(out) if out else torch.zeros((0, k), dtype=torch.int64)
    else:
        raise ValueError(f"not an approximate index: {plan['index']!r}")
    short = (nn < 0).any(1).nonzero().flatten()
    if len(short):
        nn[short] = search_faiss(bank, queries[short], k, batch_size)
    return nn

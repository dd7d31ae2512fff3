"""Weighted kNN classification (DINO protocol) as pure functions over feature tensors.

Features are L2-normalised; the neighbours of a query are the ``k`` bank items of highest cosine
similarity; each votes for its class with weight ``exp(sim / T)``; the prediction is the class with
the largest summed weight. Two search backends give the same predictions:

- ``faiss``: an inner-product index (``IndexFlatIP``) searched in query batches, so a bank of
  millions of vectors works in bounded extra memory;
- ``torch``: chunked ``mm`` + ``topk`` (no dependency beyond torch; runs on a GPU tensor as is).

Above a bank size (``exact_max``) the search can be approximate (``index="auto"`` chooses), in
:mod:`evaluation.ann`: an IVF index (faiss k-means lists, scanned list by list in float32, or in int8
residual codes with the best ``rerank * k`` candidates re-scored exactly) or faiss ``IndexHNSWFlat``,
both on inner product. :func:`plan_index` gives the index kind and its parameters from the bank size by documented
rules (each overridable); the plan is a plain dict for results files. The vote is the same for every
index; queries an approximate index returns fewer than ``k`` neighbours for are searched exactly.

Both return the neighbour indices only; the vote is computed by one shared function from the
neighbour indices (canonically ordered) and similarities recomputed the same way, so the two
backends agree exactly whenever they find the same neighbour sets.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.ann import DEFAULT_EXACT_MAX, IndexKind, plan_index, search_ann  # noqa: F401 (re-exported)

Backend = Literal["faiss", "torch"]
DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(torch.as_tensor(x).float(), dim=1)


def _check(bank: torch.Tensor, queries: torch.Tensor) -> None:
    if bank.ndim != 2 or queries.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D); got bank {tuple(bank.shape)} and queries {tuple(queries.shape)}")
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(
            f"feature dimensions differ: the bank (train) has D={bank.shape[1]} but the queries have D={queries.shape[1]}; "
            "compute both with the same encoder"
        )
    if bank.shape[0] == 0:
        raise ValueError("the kNN bank (train split) is empty")


def search_torch(bank: torch.Tensor, queries: torch.Tensor, k: int, max_elements: int = 50_000_000) -> torch.Tensor:
    """Top-``k`` inner-product neighbours of each query, ``(Q, k)`` int64, in query chunks whose
    similarity matrix stays below ``max_elements`` entries."""
    _check(bank, queries)
    k = min(k, bank.shape[0])
    chunk = max(1, max_elements // max(1, bank.shape[0]))
    out = []
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start:start + chunk] @ bank.T
        out.append(sims.topk(k, dim=1).indices)
    return torch.cat(out) if out else torch.zeros((0, k), dtype=torch.int64)


def search_faiss(bank: torch.Tensor, queries: torch.Tensor, k: int, batch_size: int = 4096) -> torch.Tensor:
    """Top-``k`` inner-product neighbours with a faiss ``IndexFlatIP`` (CPU; GPU index if available)."""
    import faiss

    _check(bank, queries)
    k = min(k, bank.shape[0])
    xb = np.ascontiguousarray(bank.detach().cpu().numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(xb.shape[1])
    if bank.is_cuda and hasattr(faiss, "StandardGpuResources"):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), bank.device.index or 0, index)
    index.add(xb)
    xq_all = queries.detach().cpu().numpy()
    out = []
    for start in range(0, xq_all.shape[0], batch_size):
        xq = np.ascontiguousarray(xq_all[start:start + batch_size], dtype=np.float32)
        _, idx = index.search(xq, k)
        out.append(torch.from_numpy(idx.astype(np.int64)))
    return torch.cat(out) if out else torch.zeros((0, k), dtype=torch.int64)


def weighted_vote(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, neighbours: torch.Tensor,
                  k: int, num_classes: int, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """Class scores ``(Q, C)`` from the first ``k`` neighbours: sum of ``exp(sim/T)`` per class, normalised
    to sum 1 (usable as probabilities for AUROC). Neighbours are re-sorted (similarity descending, then
    index ascending) so the result does not depend on the search backend's tie order."""
    neighbours = neighbours.to(bank.device)
    sims = torch.einsum("qd,qkd->qk", queries, bank[neighbours])
    # canonical order: by similarity (desc), ties by index (asc)
    order = torch.argsort(neighbours, dim=1, stable=True)
    neighbours, sims = neighbours.gather(1, order), sims.gather(1, order)
    order = torch.argsort(-sims, dim=1, stable=True)
    neighbours, sims = neighbours.gather(1, order)[:, :k], sims.gather(1, order)[:, :k]
    weights = (sims / temperature).exp()
    labels = bank_labels.to(bank.device)[neighbours]
    scores = torch.zeros(queries.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    scores.scatter_add_(1, labels, weights)
    return scores / scores.sum(1, keepdim=True).clamp_min(1e-30)


def knn_classify(train_features, train_labels, test_features, num_classes: int | None = None,
                 ks: Sequence[int] = DEFAULT_KS, temperature: float = DEFAULT_TEMPERATURE,
                 backend: Backend = "faiss", batch_size: int = 4096,
                 index: IndexKind | dict = "auto") -> dict[int, dict[str, torch.Tensor]]:
    """Weighted kNN for each ``k`` in ``ks``: ``{k: {"pred": (Q,), "proba": (Q, C)}}``.

    The neighbour search runs once for ``max(ks)``; smaller ``k`` use the leading neighbours.
    ``index``: a kind (planned with :func:`plan_index`'s default rules) or a plan from it; an
    ``exact`` plan uses ``backend``, an approximate one faiss.
    """
    bank = l2_normalize(train_features)
    queries = l2_normalize(test_features)
    labels = torch.as_tensor(train_labels).long()
    if labels.shape[0] != bank.shape[0]:
        raise ValueError(f"{bank.shape[0]} train features but {labels.shape[0]} train labels")
    _check(bank, queries)
    num_classes = int(num_classes if num_classes is not None else int(labels.max()) + 1)
    kmax = min(max(ks), bank.shape[0])
    plan = index if isinstance(index, dict) else plan_index(bank.shape[0], kmax, index)
    if plan["index"] != "exact":
        neighbours = search_ann(bank, queries, kmax, plan, batch_size=batch_size)
    elif backend == "faiss":
        neighbours = search_faiss(bank, queries, kmax, batch_size=batch_size)
    elif backend == "torch":
        neighbours = search_torch(bank, queries, kmax)
    else:
        raise ValueError(f"unknown kNN backend {backend!r}; choose 'faiss' or 'torch'")
    out: dict[int, dict[str, torch.Tensor]] = {}
    for k in ks:
        probas = []
        for start in range(0, queries.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            probas.append(weighted_vote(bank, labels, queries[sl], neighbours[sl], min(k, kmax), num_classes, temperature))
        proba = torch.cat(probas) if probas else torch.zeros(0, num_classes)
        out[int(k)] = {"pred": proba.argmax(1), "proba": proba}
    return out

"""MIL models over one bag of instance features ``x`` (N, D): every model returns a dict with
``logits`` (C,) for the bag, ``attention`` (N,) raw (pre-softmax) attention scores and ``h`` (N, H)
instance embeddings, and :meth:`instance_logits` gives the bag classifier applied to each instance.

- ``mean``: an MLP on the mean feature (baseline; per patch: the MLP on that patch, uniform attention).
- ``abmil``: gated attention pooling (Ilse, Tomczak & Welling, ICML 2018): ``a_i = w·(tanh(V h_i) ⊙
  σ(U h_i))``, ``z = Σ softmax(a)_i h_i``, a linear classifier on ``z``.
- ``clam_sb``: the same single-branch gated attention plus one binary instance classifier per class,
  trained with an instance clustering loss: the ``k`` most attended instances of a bag are
  pseudo-positives and the ``k`` least attended pseudo-negatives for the bag's class; with
  ``subtyping`` the most attended are also pseudo-negatives for every other class (the idea of CLAM,
  Lu et al., Nat. Biomed. Eng. 2021; this is an independent implementation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("mean", "abmil", "clam_sb")


def _embed(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))


class MeanPoolMIL(nn.Module):
    """MLP(mean of the bag's features)."""

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.25, **_):
        super().__init__()
        self.encoder = _embed(in_dim, hidden_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encoder(x.mean(0, keepdim=True))[0]
        return {"logits": self.classifier(z), "attention": x.new_zeros(x.shape[0]), "h": x}

    def instance_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))


class GatedAttention(nn.Module):
    """Raw gated-attention scores ``w·(tanh(V h) ⊙ sigmoid(U h))`` of (N, H) embeddings → (N,)."""

    def __init__(self, hidden_dim: int, attention_dim: int, dropout: float):
        super().__init__()
        self.v = nn.Linear(hidden_dim, attention_dim)
        self.u = nn.Linear(hidden_dim, attention_dim)
        self.w = nn.Linear(attention_dim, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(self.drop(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))))[:, 0]


class ABMIL(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int = 256, attention_dim: int = 128,
                 dropout: float = 0.25, **_):
        super().__init__()
        self.encoder = _embed(in_dim, hidden_dim, dropout)
        self.attention = GatedAttention(hidden_dim, attention_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.encoder(x)
        a = self.attention(h)
        z = torch.softmax(a, 0) @ h
        return {"logits": self.classifier(z), "attention": a, "h": h}

    def instance_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(x))


def smooth_hinge(logits: torch.Tensor, target: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Smoothed binary SVM loss of two-logit scores: ``tau·softplus((1 − margin)/tau)`` with margin
    ``logit[target] − logit[other]`` (→ the hinge ``max(0, 1 − margin)`` as tau → 0)."""
    own = logits.gather(1, target[:, None])[:, 0]
    other = logits.gather(1, (1 - target)[:, None])[:, 0]
    return (tau * F.softplus((1.0 - (own - other)) / tau)).mean()


class CLAMSB(ABMIL):
    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int = 256, attention_dim: int = 128,
                 dropout: float = 0.25, k_sample: int = 8, subtyping: bool = True,
                 inst_loss: str = "ce", **_):
        super().__init__(in_dim, num_classes, hidden_dim, attention_dim, dropout)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden_dim, 2) for _ in range(num_classes))
        self.k_sample, self.subtyping, self.inst_loss = int(k_sample), bool(subtyping), inst_loss

    def instance_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C): each class's instance classifier's probability that the instance is of that class."""
        h = self.encoder(x)
        return torch.stack([torch.softmax(c(h), 1)[:, 1] for c in self.instance_classifiers], 1)

    def instance_loss(self, out: dict[str, torch.Tensor], label: int) -> torch.Tensor:
        """Instance clustering loss of one bag (module doc); 0 for a bag of a single instance."""
        a, h = out["attention"], out["h"]
        n = a.shape[0]
        k = min(self.k_sample, n // 2)
        if k < 1:
            return a.new_zeros(())
        top = torch.topk(a, k).indices
        bottom = torch.topk(-a, k).indices
        loss_fn = smooth_hinge if self.inst_loss == "svm" else F.cross_entropy
        losses = []
        for c, clf in enumerate(self.instance_classifiers):
            if c == label:
                idx = torch.cat([top, bottom])
                target = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)]).to(a.device)
            elif self.subtyping:
                idx, target = top, torch.zeros(k, dtype=torch.long, device=a.device)
            else:
                continue
            losses.append(loss_fn(clf(h[idx]), target))
        return torch.stack(losses).mean()


def build_model(name: str, in_dim: int, num_classes: int, **kwargs) -> nn.Module:
    """A MIL model by name (:data:`MODELS`); extra keyword arguments a model does not use are ignored."""
    if name == "mean":
        return MeanPoolMIL(in_dim, num_classes, **kwargs)
    if name == "abmil":
        return ABMIL(in_dim, num_classes, **kwargs)
    if name == "clam_sb":
        return CLAMSB(in_dim, num_classes, **kwargs)
    raise ValueError(f"unknown MIL model {name!r}; use one of {', '.join(MODELS)}")

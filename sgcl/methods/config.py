"""``MethodConfig``: which pretraining method, its heads, temperatures and every SGCL switch.

YAML section ``method:`` of a pretraining config (see ``configs/pretrain/``). Defaults follow the
runnable SGCL reference (methods.md §1.10) and MoCo v2 / SimCLR (§5.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sgcl.config import ConfigError, bounded
from sgcl.methods.dense import DenseConfig

# sgcl.candidates=indexed (bounded per-step cost, docs/sgcl_method.md), where the knob is 0:
INDEXED_MINING_POOL = 16384   # rows ranked per step for semi-hard mining (sgcl.mining_pool)
INDEXED_NPID_SAMPLE = 16384   # NPID negatives scored per step by the self and inner terms (sgcl.npid_sample)
AUTO_INDEXED_ROWS = 1_000_000  # sgcl.candidates=auto: indexed from this many bank rows on, exact below


@dataclass
class SGCLConfig:
    """SGCL terms and their knobs (methods.md §1.4–§1.10). Every term can be switched off."""

    self_term: bool = True        # instance term L_single (NPID against the bank / InfoNCE against the key)
    intra_term: bool = True       # spatial positives in the same slide
    inter_term: bool = True       # semantic positives: aux anchor + bank neighbours agreeing in all k-means runs
    inner_term: bool = True       # quadrant (spatial-guided multi-crop) term L_mcrop
    radius: float = bounded(3.0, gt=0)  # grid cells: 0 < ‖Δgrid‖₂ < radius (3 → 5×5 window minus centre)
    aux_num: int = bounded(1, ge=0)  # auxiliary anchors per query (most similar spatial neighbours)
    nei_k: int = bounded(4096, ge=1)  # candidate neighbours per anchor AND mined negatives per anchor
    num_negatives: int = bounded(65536, ge=1)  # NPID negatives of the self/inner terms (shared by the batch)
    kmeans_runs: int = bounded(3, ge=1)
    kmeans_clusters: int = bounded(1000, ge=1)  # clipped when N is small (at least 4 rows per cluster)
    kmeans_iters: int = bounded(20, ge=1)
    kmeans_seed: int = bounded(1234, ge=0)  # run r uses seed + r
    mining: Literal["semi_hard", "hardest", "uniform"] = "semi_hard"
    mining_frac: float = bounded(0.2, gt=0, le=1)  # semi-hard: rank positions over the top ⌈frac·N⌉
    mining_pool: int = bounded(0, ge=0)  # rank within this many random bank rows per step (0 = all N, as the reference)
    # memory bank only: ``exact`` scans the whole bank every step for the semantic candidates (the
    # reference, cost ∝ N); ``indexed`` takes them from per-cluster member lists rebuilt at each
    # k-means refit (at most ``candidate_pool`` members per anchor, uniformly sampled), mines within
    # ``mining_pool`` rows (16,384 if 0; Beta rank positions drawn with replacement) and scores
    # ``npid_sample`` NPID negatives (16,384 if 0): per-step cost bounded in N. ``auto``: indexed
    # from 1,000,000 bank rows on, exact below (docs/sgcl_method.md)
    candidates: Literal["exact", "indexed", "auto"] = "auto"
    candidate_pool: int = bounded(1024, ge=1)  # indexed: members of the anchor's k-means group considered per anchor
    # self/inner NPID terms: score this many of the num_negatives uniform draws, each weighted by
    # num_negatives / npid_sample (same expected denominator); 0 = all of them (exact) or 16,384 (indexed)
    npid_sample: int = bounded(0, ge=0)
    beta_a: float = bounded(5.0, gt=0)  # Beta(a, b) shape of the semi-hard rank positions
    beta_b: float = bounded(15.0, gt=0)
    denominator: Literal["faithful", "clean"] = "faithful"  # C_i = N − |P_i| (reference) or 0
    rampup_epochs: float = bounded(10.0, ge=0)  # w(e) = exp(−5(1 − min(e,R)/R)²)
    bank_momentum: float = bounded(0.5, ge=0, le=1)  # NPID bank row update: m·old + (1 − m)·new
    bank: Literal["memory", "queue"] = "memory"  # NPID bank of N rows, or momentum encoder + queue
    bank_dtype: Literal["float32", "float16"] = "float32"
    backbone_bank: bool = True    # N×F backbone bank for semi-hard/hardest ranking (else projection bank ranks)
    sim_chunk: int = bounded(262144, ge=0)  # rows per chunk of bank similarity (0 = whole bank at once)
    lambda_single: float = bounded(1.0, ge=0)
    lambda_spatial: float = bounded(1.0, ge=0)  # multiplies w(e)·L_sp
    lambda_inner: float = bounded(1.0, ge=0)


@dataclass
class MoCoConfig:
    """MoCo v2 (and SGCL's queue mode): momentum key encoder + FIFO queue."""

    queue_size: int = bounded(65536, ge=1)
    momentum: float = bounded(0.999, ge=0, le=1)  # key encoder EMA
    # Shuffle-BN: under DDP the key encoder sees a batch permuted across ranks, so BatchNorm
    # statistics cannot leak which samples are positives. With SyncBN (or no BN) it is unneeded.
    shuffle_bn: bool = True


@dataclass
class SimCLRConfig:
    temperature: float = bounded(0.1, gt=0)


@dataclass
class MethodConfig:
    name: Literal["sgcl", "moco_v2", "simclr"] = "sgcl"
    proj_hidden_dim: int = bounded(0, ge=0)  # 0 = backbone.num_features (SGCL SwAVNeck 512→512→128; MoCo v2 2048→2048→128)
    proj_dim: int = bounded(128, ge=1)
    proj_layers: int = bounded(2, ge=1)  # 1 = linear projection
    proj_batch_norm: bool = False  # SimCLR's head uses BN; MoCo v2 / SGCL do not
    tau_head: float = bounded(0.2, gt=0)  # instance/queue temperature (SGCL τ_h, MoCo v2 τ)
    T_spatial: float = bounded(0.07, gt=0)  # SGCL multi-positive loss temperature (separate from τ_h)
    seed: int = bounded(0, ge=0)  # bank/queue initialisation and per-step negative draws
    sgcl: SGCLConfig = field(default_factory=SGCLConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)  # optional pixel-level term (sgcl.methods.dense)

    def validate(self) -> None:
        """name=sgcl needs at least one of sgcl.self_term, intra_term, inter_term, inner_term."""
        s = self.sgcl
        if self.name == "sgcl" and not (s.self_term or s.intra_term or s.inter_term or s.inner_term):
            raise ConfigError("sgcl: method sgcl needs at least one of sgcl.self_term, intra_term, inter_term, "
                              "inner_term set to true", key="sgcl")


def uses_indexed(s: SGCLConfig, num_rows: int) -> bool:
    """Whether a run over ``num_rows`` patches takes SGCL's bounded memory-bank path:
    ``candidates: indexed``, or ``auto`` with at least ``AUTO_INDEXED_ROWS`` rows (never in queue mode)."""
    return s.bank == "memory" and (s.candidates == "indexed" or (s.candidates == "auto" and num_rows >= AUTO_INDEXED_ROWS))


def build_method(cfg: MethodConfig, backbone):  # noqa: ANN001 - re-exported factory
    """Factory by name; see :mod:`sgcl.methods.factory` (imported lazily: no import cycle)."""
    from sgcl.methods.factory import build_method as _build

    return _build(cfg, backbone)

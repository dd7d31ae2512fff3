"""Per-patch scores of a saved ``sgcl eval mil`` model, for heatmaps.

``model_dir`` is the ``--out`` folder: ``config.json`` (classes, feature size, model name and
settings) and ``fold_<k>/model.pt`` (plain state_dicts, ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch


def load_mil_config(model_dir: str | Path) -> dict:
    """``config.json`` of a MIL run: ``classes``, ``feature_dim``, ``model`` (``name``, ``kwargs``),
    ``folds``, ``config`` (the full run config) and the slides of each fold."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the --out folder of `sgcl eval mil`")
    return json.loads(path.read_text())


def load_mil_models(model_dir: str | Path, fold: int | None = None) -> tuple[dict, list[torch.nn.Module]]:
    """(config, [model in eval mode on the CPU, one per fold or the given fold]); cached per run folder
    and fold while its ``config.json`` is unchanged (heatmaps call :func:`patch_scores` once per slide)."""
    path = Path(model_dir).resolve() / "config.json"
    stamp = path.stat().st_mtime_ns if path.is_file() else None
    return _load_models(str(path.parent), fold, stamp)


@functools.lru_cache(maxsize=8)
def _load_models(model_dir: str, fold: int | None, stamp: int | None) -> tuple[dict, list[torch.nn.Module]]:
    from evaluation.mil.models import build_model

    cfg = load_mil_config(model_dir)
    folds = cfg["folds"] if fold is None else [int(fold)]
    models = []
    for f in folds:
        path = Path(model_dir) / f"fold_{f}" / "model.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (folds of this run: {cfg['folds']})")
        m = build_model(cfg["model"]["name"], int(cfg["feature_dim"]), len(cfg["classes"]), **cfg["model"]["kwargs"])
        m.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        models.append(m.eval())
    return cfg, models


@torch.no_grad()
def patch_scores(model_dir: str | Path, features: np.ndarray, fold: int | None = None) -> dict[str, np.ndarray]:
    """Per-patch scores of one slide's (N, D) features, averaged over the folds' models (or one ``fold``):

    - ``attention`` (N,): the attention softmax-normalised over the slide (sums to 1; uniform for ``mean``);
    - ``logits_<class>`` (N,): the bag classifier applied to each patch's embedding (``mean``: to each patch);
    - ``instance_<class>`` (N,): ``clam_sb`` only, the class's instance-classifier probability;
    - ``bag_proba_<class>`` (1,): the slide's predicted class probability.
    All float32."""
    cfg, models = load_mil_models(model_dir, fold)
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    if x.ndim != 2 or x.shape[1] != int(cfg["feature_dim"]):
        raise ValueError(f"features must be (N, {cfg['feature_dim']}) for the model in {model_dir}, got {tuple(x.shape)}")
    classes = cfg["classes"]
    acc: dict[str, torch.Tensor] = {}

    def add(key: str, value: torch.Tensor) -> None:
        acc[key] = acc.get(key, 0) + value.float() / len(models)

    for m in models:
        out = m(x)
        add("attention", torch.softmax(out["attention"], 0))
        inst = m.instance_logits(x)
        probs = torch.softmax(out["logits"], 0)
        for i, c in enumerate(classes):
            add(f"logits_{c}", inst[:, i])
            add(f"bag_proba_{c}", probs[i:i + 1])
        if hasattr(m, "instance_probs"):
            ip = m.instance_probs(x)
            for i, c in enumerate(classes):
                add(f"instance_{c}", ip[:, i])
    return {k: v.numpy().astype(np.float32) for k, v in acc.items()}

"""timm backbones by name, and the export format that ``timm.create_model`` loads directly.

Export layout (``<dir>/``):
- ``backbone.safetensors``: the backbone's ``state_dict`` (no classifier), loadable with
  ``timm.create_model(name, num_classes=0, checkpoint_path=".../backbone.safetensors")``;
- ``backbone.json``: ``{"model_name", "num_features", "sha256", "sgcl_version", "config"}``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from torch import nn

from sgcl import __version__
from sgcl.utils.atomic import atomic_path, atomic_write_json

WEIGHTS_NAME = "backbone.safetensors"
META_NAME = "backbone.json"


class BackboneError(ValueError):
    """An unknown model name or an unreadable exported backbone."""


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """A timm model without classifier (``num_classes=0``): ``forward`` returns pooled features
    of size ``model.num_features``; ``forward_features`` the feature map. Never downloads weights."""
    kwargs.setdefault("pretrained", False)
    if kwargs["pretrained"]:
        raise BackboneError("pretrained weights would be downloaded; pass a local checkpoint instead")
    try:
        return timm.create_model(name, num_classes=0, **kwargs)
    except RuntimeError as exc:  # timm raises RuntimeError('Unknown model ...')
        raise BackboneError(f"{exc}. List names with `python -c \"import timm; print(timm.list_models())\"`") from None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_backbone(model: nn.Module, model_name: str, out_dir: str | Path, config: Mapping[str, Any] | None = None) -> Path:
    """Write ``backbone.safetensors`` + ``backbone.json`` atomically; return the weights path."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    dest = out_dir / WEIGHTS_NAME
    with atomic_path(dest) as tmp:
        save_file(state, str(tmp), metadata={"model_name": model_name, "format": "pt"})
    meta = {
        "model_name": model_name,
        "num_features": int(getattr(model, "num_features", 0)),
        "sha256": file_sha256(dest),
        "sgcl_version": __version__,
        "config": dict(config or {}),
    }
    atomic_write_json(out_dir / META_NAME, meta)
    return dest


def load_backbone(spec: str | Path, model_name: str | None = None) -> tuple[nn.Module, dict]:
    """Load an encoder from ``spec``: an export folder, a ``.safetensors``/``.pth`` file, or a timm
    model name (random init). Returns ``(model, info)`` with ``info`` = name, num_features, sha256."""
    path = Path(spec)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if path.suffix in (".safetensors", ".pth", ".pt", ".bin") or path.exists():
        if not path.is_file():
            raise BackboneError(f"checkpoint {path} does not exist; pass an export folder of `sgcl pretrain` or a timm model name")
        meta_path = path.with_name(META_NAME)
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        name = model_name or meta.get("model_name")
        if not name:
            raise BackboneError(f"{path}: no {META_NAME} beside it names the architecture; pass model_name=<timm name>")
        model = create_backbone(name)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise BackboneError(f"{path}: weights do not fit {name} (missing {list(missing)[:5]} ...)")
        info = {"model_name": name, "num_features": int(model.num_features), "weights": str(path),
                "sha256": meta.get("sha256") or file_sha256(path), "unexpected_keys": list(unexpected)}
        return model, info
    model = create_backbone(str(spec))
    return model, {"model_name": str(spec), "num_features": int(model.num_features), "weights": None, "sha256": None}

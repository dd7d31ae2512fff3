"""timm backbones by name, and the export format that ``timm.create_model`` loads directly.

Export layout (``<dir>/``):
- ``backbone.safetensors``: the backbone's ``state_dict`` (no classifier), loadable with
  ``timm.create_model(name, num_classes=0, checkpoint_path=".../backbone.safetensors")``;
- ``backbone.json``: ``{"model_name", "num_features", "sha256", "sgcl_version", "config"}``.

A name of the foundation-encoder registry (:mod:`sgcl.models.encoders`, e.g. ``uni``) works wherever a
timm name does: ``create_backbone("uni")`` builds its architecture, ``load_backbone("uni", weights=...)``
loads its published checkpoint, and an export of a backbone built that way names it in ``backbone.json``.

A spec that names a file or folder (it has a ``/``, starts with ``~`` or ``.``, or ends in a weights
suffix) and does not exist is a :class:`BackboneError` "no such file or folder" naming what was expected,
raised before timm or the Hugging Face hub code sees the name: nothing is ever downloaded.
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
from sgcl.utils.atomic import atomic_path, atomic_write_json, ensure_free_space

WEIGHTS_NAME = "backbone.safetensors"
META_NAME = "backbone.json"
WEIGHT_SUFFIXES = (".bin", ".pth", ".pt", ".safetensors")
HUB_PREFIXES = ("hf-hub:", "hf_hub:")
EXPORT_EXPECTED = (f"an export folder of `sgcl pretrain` with files: {WEIGHTS_NAME}, {META_NAME}; or a weights file "
                   f"({', '.join(WEIGHT_SUFFIXES)}) with model_name=<timm name>")


class BackboneError(ValueError):
    """An unknown model name or an unreadable exported backbone."""


def no_such_path(path: str | Path, expected: str) -> str:
    """The message for a missing encoder / weights path: the path, then what should be there."""
    return f"no such file or folder: {path} (expected {expected})"


def looks_like_path(spec: str) -> bool:
    """True when ``spec`` names a file or folder rather than a model: it holds a folder separator, starts
    with ``~`` or ``.``, or ends in a weights suffix (timm and registry names do none of these)."""
    return "/" in spec or "\\" in spec or spec.startswith(("~", ".")) or spec.endswith(WEIGHT_SUFFIXES)


def check_local_spec(spec: str | Path) -> None:
    """Refuse, before timm sees it, a hub name (which would download) and a file/folder path that does not exist."""
    text = str(spec)
    if text.startswith(HUB_PREFIXES):
        raise BackboneError(f"{text}: models are never fetched from the Hugging Face hub here (nothing is downloaded); "
                            "download it once on a machine with network and pass its local folder or weights file")
    local = text.removeprefix("local-dir:")  # timm's prefix for a local model folder
    if (local != text or looks_like_path(text)) and not Path(local).expanduser().exists():
        raise BackboneError(no_such_path(local, EXPORT_EXPECTED + "; or a registry encoder name "
                                         "(`sgcl extract --encoder list`) or a timm model name"))


def create_backbone(name: str, **kwargs: Any) -> nn.Module:
    """A timm model without classifier (``num_classes=0``), or a registry encoder's architecture:
    ``forward`` returns pooled features of size ``model.num_features``; ``forward_features`` the
    feature map. Random init; never downloads weights."""
    kwargs.setdefault("pretrained", False)
    if kwargs["pretrained"]:
        raise BackboneError("pretrained weights would be downloaded; pass a local checkpoint instead")
    from sgcl.models.encoders import build_model, get_entry, is_registered

    if is_registered(name):
        kwargs.pop("pretrained")
        return build_model(get_entry(name), **kwargs)
    check_local_spec(name)
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


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save``d state dict (``weights_only=True``;
    a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is unwrapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refused (not plain tensors) or not a torch file
        raise BackboneError(f"{path}: not a plain state dict that torch.load(weights_only=True) can read "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); re-save it with "
                            "torch.save(model.state_dict(), path) or as .safetensors") from None
    while isinstance(state, dict):
        inner = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


def pooling_of(model: nn.Module) -> str:
    """The pooling rule of a timm model (``token``, ``avg``, ...; empty when it has none)."""
    pool = getattr(model, "global_pool", "")
    return str(getattr(pool, "pool_type", pool) or "")


def export_backbone(model: nn.Module, model_name: str, out_dir: str | Path, config: Mapping[str, Any] | None = None) -> Path:
    """Write ``backbone.safetensors`` + ``backbone.json`` atomically; return the weights path."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    dest = out_dir / WEIGHTS_NAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    ensure_free_space(dest.parent, sum(v.numel() * v.element_size() for v in state.values()))
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


def load_backbone(spec: str | Path, model_name: str | None = None, weights: str | Path | None = None) -> tuple[nn.Module, dict]:
    """Load an encoder from ``spec``: an export folder, a ``.safetensors``/``.pth`` file, a registry
    encoder name (``uni``, ...; its published ``weights``: a file, a folder or a Hugging Face cache
    folder; default caches when None), or a timm model name (random init, or ``weights`` in timm keys).
    Returns ``(model, info)`` with ``info`` = model_name, num_features, sha256, pooling (+ registry fields)."""
    from sgcl.models.encoders import entry_info, get_entry, is_registered, load_named_encoder

    if is_registered(str(spec)):
        return load_named_encoder(str(spec), weights)
    check_local_spec(spec)
    if weights is not None:
        if Path(spec).exists() or model_name:
            raise BackboneError(f"weights={weights} goes with a registry encoder or a timm model name, not with "
                                f"{spec}; pass the checkpoint as the encoder and its architecture as model_name")
        return load_backbone(weights, model_name=str(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if path.suffix in WEIGHT_SUFFIXES or path.exists():
        if not path.is_file():
            raise BackboneError(no_such_path(path, EXPORT_EXPECTED))
        meta_path = path.with_name(META_NAME)
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        name = model_name or meta.get("model_name")
        if not name:
            raise BackboneError(f"{path}: no {META_NAME} beside it names the architecture; pass model_name=<timm name>")
        model = create_backbone(name)
        state = read_state_dict(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise BackboneError(f"{path}: weights do not fit {name} (missing {list(missing)[:5]} ...)")
        info = {"model_name": name, "num_features": int(model.num_features), "weights": str(path),
                "sha256": meta.get("sha256") or file_sha256(path), "unexpected_keys": list(unexpected),
                "pooling": pooling_of(model)}
        if is_registered(name):  # an export of a backbone built from a registry entry
            info.update(entry_info(get_entry(name)))
        return model, info
    model = create_backbone(str(spec))
    return model, {"model_name": str(spec), "num_features": int(model.num_features), "weights": None, "sha256": None,
                   "pooling": pooling_of(model)}

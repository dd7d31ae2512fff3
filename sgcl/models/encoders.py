"""Named pathology foundation encoders, built from local weights only (nothing is downloaded).

One :class:`EncoderEntry` per model says how to build it (a timm architecture with the kwargs of its
model card), how to preprocess its input (side, mean/std, interpolation), how to pool its tokens,
and how its published checkpoint names the weights (``layout``), so that
``sgcl extract --encoder uni --weights /models/UNI`` computes the model card's embedding.

Weights come from a file (``.bin``/``.pth``/``.pt``/``.safetensors``) or a folder: the folder itself,
a Hugging Face cache folder of the model (``models--org--name/snapshots/<hash>/``), or a hub cache
holding one. Without a path the default caches are searched ($HF_HUB_CACHE or $HF_HOME/hub, and
$TORCH_HOME/hub/checkpoints, each defaulting under ~/.cache). A missing file is an
:class:`EncoderWeightsError` naming the expected file(s) and every folder looked in.

Pooling rules: ``cls`` (class token after the final norm), ``cls+mean`` (class token ⊕ mean of the
patch tokens, register tokens excluded; Virchow), ``attn_pool`` (CONCH's contrastive attentional
pooler + its LayerNorm, before the 512×512 ``proj_contrast``), ``avg`` (global average pool of a
CNN map). Layouts: ``timm``, ``hf_vit`` (transformers ``ViTModel``), ``hf_dinov2`` (transformers
``Dinov2Model``), ``conch`` (the CoCa checkpoint, ``visual.trunk.``/``visual.attn_pool_contrast.``),
``torchvision_resnet``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from timm.layers import SwiGLUPacked
from torch import nn

from sgcl.models.backbone import WEIGHT_SUFFIXES, BackboneError, file_sha256, no_such_path, read_state_dict

POOLINGS = ("cls", "cls+mean", "attn_pool", "avg")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))


class EncoderWeightsError(BackboneError):
    """Weights of a named encoder that are missing or do not fit its architecture."""


@dataclass(frozen=True)
class EncoderEntry:
    name: str
    arch: str                                   # timm architecture name
    kwargs: Mapping[str, Any]                   # timm.create_model kwargs of the model card
    dim: int                                    # output dimension after pooling
    input_size: int                             # square input side (px)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: str                                # one of POOLINGS
    layout: str                                 # key layout of the published checkpoint (LAYOUTS)
    files: tuple[str, ...]                      # published weight file names, preferred first
    hf_repo: str = ""                           # where the weights are published (for messages and cache folders)
    interpolation: str = "bicubic"              # resize mode of the preprocessing
    pool_kwargs: Mapping[str, Any] = field(default_factory=dict)  # attn_pool: {"dim", "heads"}
    truncate_after: str | None = None           # CNN: drop the stages after this one (timm feature_info module)
    trident_name: str = ""                      # TRIDENT's name (``--patch_encoder``; its ``features_<name>/`` folder)

    def with_kwargs(self, dim: int | None = None, **kwargs: Any) -> "EncoderEntry":
        """The same entry with timm kwargs overridden (e.g. a tiny depth/width for tests); ``img_size``
        also sets ``input_size``; ``pool_dim``/``pool_heads`` override the attention pooler."""
        pool = dict(self.pool_kwargs)
        for key in ("dim", "heads"):
            if f"pool_{key}" in kwargs:
                pool[key] = kwargs.pop(f"pool_{key}")
        size = kwargs.get("img_size", self.input_size)
        return dataclasses.replace(self, kwargs={**self.kwargs, **kwargs}, dim=self.dim if dim is None else dim,
                                   input_size=int(size), pool_kwargs=pool)

    @property
    def cache_folder(self) -> str:
        """Folder name of the model in a Hugging Face hub cache."""
        return "models--" + self.hf_repo.replace("/", "--") if self.hf_repo else ""


# Kwargs follow each model card's timm.create_model call (TRIDENT loads the same kwargs strictly).
# Unverifiable here (no network): exact preprocessing of each card (we resize the whole patch to
# input_size, never centre-crop) and the interpolation mode of phikon/h-optimus-0/resnet50_trunc.
_ENTRIES = (
    # UNI: ViT-L/16, DINOv2-trained, LayerScale; `pytorch_model.bin` in timm keys.
    EncoderEntry("uni", "vit_large_patch16_224",
                 {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
                 1024, 224, *IMAGENET, "cls", "timm", ("pytorch_model.bin",), "MahmoodLab/UNI"),
    # UNI2-h: ViT-H/14-like (embed 1536, depth 24, 24 heads), SwiGLU, 8 registers, no pos-embed on prefix tokens.
    EncoderEntry("uni2-h", "vit_giant_patch14_224",
                 {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                  "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "mlp_layer": SwiGLUPacked,
                  "act_layer": nn.SiLU, "reg_tokens": 8, "dynamic_img_size": True},
                 1536, 224, *IMAGENET, "cls", "timm", ("pytorch_model.bin",), "MahmoodLab/UNI2-h"),
    # CONCH v1 vision tower: ViT-B/16 trunk at 448 px + the contrastive attentional pooler (1 query,
    # 8 heads, 768 -> 512) and its LayerNorm: the 512-d embedding CLAM/TRIDENT export as conch_v1
    # (encode_image(proj_contrast=False, normalize=False)). The text tower and the caption pooler are dropped.
    EncoderEntry("conch_v1", "vit_base_patch16_224",
                 {"img_size": 448, "patch_size": 16, "dynamic_img_size": True},
                 512, 448, *OPENAI_CLIP, "attn_pool", "conch", ("pytorch_model.bin",), "MahmoodLab/CONCH",
                 pool_kwargs={"dim": 512, "heads": 8}),
    # Virchow2: ViT-H/14, SwiGLU (mlp_ratio 5.3375), 4 registers; embedding = class token ⊕ mean patch tokens.
    EncoderEntry("virchow2", "vit_huge_patch14_224",
                 {"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375,
                  "mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU, "dynamic_img_size": True},
                 2560, 224, *IMAGENET, "cls+mean", "timm", ("pytorch_model.bin", "model.safetensors"), "paige-ai/Virchow2"),
    # Phikon: iBOT ViT-B/16 published as a transformers ViTModel (LayerNorm eps 1e-12); class token of last_hidden_state.
    EncoderEntry("phikon", "vit_base_patch16_224",
                 {"img_size": 224, "norm_layer": partial(nn.LayerNorm, eps=1e-12)},
                 768, 224, *IMAGENET, "cls", "hf_vit", ("pytorch_model.bin", "model.safetensors"), "owkin/phikon",
                 interpolation="bilinear"),
    # Phikon-v2: DINOv2 ViT-L/16 published as a transformers Dinov2Model (LayerScale, plain GELU MLP, eps 1e-6).
    EncoderEntry("phikon-v2", "vit_large_patch16_224",
                 {"img_size": 224, "init_values": 1e-5},
                 1024, 224, *IMAGENET, "cls", "hf_dinov2", ("model.safetensors", "pytorch_model.bin"), "owkin/phikon-v2"),
    # Prov-GigaPath tile encoder: DINOv2 ViT-g (SwiGLU) but with 16-px patches at 224 px.
    EncoderEntry("prov-gigapath", "vit_giant_patch14_dinov2",
                 {"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                  "init_values": 1e-5, "mlp_ratio": 5.33334, "dynamic_img_size": True},
                 1536, 224, *IMAGENET, "cls", "timm", ("pytorch_model.bin",), "prov-gigapath/prov-gigapath"),
    # H-optimus-0: DINOv2 ViT-g/14 with 4 registers, its own mean/std.
    EncoderEntry("h-optimus-0", "vit_giant_patch14_reg4_dinov2",
                 {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
                 1536, 224, *HOPTIMUS, "cls", "timm", ("pytorch_model.bin", "model.safetensors"), "bioptimus/H-optimus-0",
                 interpolation="bilinear"),
    # CLAM's resnet50_trunc: torchvision ImageNet ResNet-50 up to layer3, adaptive average pool (1024-d).
    EncoderEntry("resnet50_trunc", "resnet50", {}, 1024, 224, *IMAGENET, "avg", "torchvision_resnet",
                 ("resnet50-19c8e357.pth", "resnet50-0676ba61.pth", "model.safetensors", "pytorch_model.bin"),
                 "timm/resnet50.tv_in1k", interpolation="bilinear", truncate_after="layer3"),
)
_TRIDENT_NAMES = {"uni": "uni_v1", "uni2-h": "uni_v2", "conch_v1": "conch_v1", "virchow2": "virchow2",
                  "phikon": "phikon", "phikon-v2": "phikon_v2", "prov-gigapath": "gigapath",
                  "h-optimus-0": "hoptimus0", "resnet50_trunc": "resnet50"}
_ENTRIES = tuple(dataclasses.replace(e, trident_name=_TRIDENT_NAMES[e.name]) for e in _ENTRIES)
ENCODERS: dict[str, EncoderEntry] = {e.name: e for e in _ENTRIES}
# TRIDENT's and CLAM's names (`--patch_encoder uni_v1`, `--model_name uni_v1`) select the same entries.
# TRIDENT's `resnet50` is not an alias: here it stays timm's full ResNet-50 (use resnet50_trunc).
ALIASES: dict[str, str] = {e.trident_name: e.name for e in _ENTRIES
                           if e.trident_name not in ENCODERS and e.trident_name != "resnet50"}


# -- models -----------------------------------------------------------------------------------------
class ClassMeanPool(nn.Module):
    """Head of a ViT built with ``global_pool=''``: class token ⊕ mean of the patch tokens."""

    def __init__(self, num_prefix_tokens: int):
        super().__init__()
        self.num_prefix_tokens = int(num_prefix_tokens)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens:].mean(1)], dim=-1)


class QueryAttentionPool(nn.Module):
    """One learned query attending over LayerNorm'ed tokens (CoCa/CONCH attentional pooler, 1 query)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, dim) * 0.02)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.ln_k(tokens)
        q = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(q, kv, kv, need_weights=False)[0][:, 0]


class AttentionPoolEncoder(nn.Module):
    """A timm ViT trunk pooled by :class:`QueryAttentionPool` + LayerNorm (module names as in CONCH's ``visual``)."""

    def __init__(self, trunk: nn.Module, dim: int, heads: int):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = QueryAttentionPool(dim, int(trunk.embed_dim), heads)
        self.ln_contrast = nn.LayerNorm(dim)
        self.num_features = int(dim)
        self.num_prefix_tokens = int(trunk.num_prefix_tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.forward_features(x)))


def build_model(entry: EncoderEntry, **overrides: Any) -> nn.Module:
    """The entry's architecture with random init: ``forward`` returns the pooled (B, entry.dim)
    embedding, ``forward_features`` the tokens / feature map. Never downloads."""
    import timm

    if entry.pooling not in POOLINGS:
        raise BackboneError(f"encoder {entry.name}: unknown pooling {entry.pooling!r}; choose one of {POOLINGS}")
    kwargs = {**entry.kwargs, **overrides}
    global_pool = {"cls": "token", "cls+mean": "", "attn_pool": "token", "avg": "avg"}[entry.pooling]
    model = timm.create_model(entry.arch, pretrained=False, num_classes=0, global_pool=global_pool, **kwargs)
    if entry.pooling == "cls+mean":
        model.head = ClassMeanPool(model.num_prefix_tokens)
        model.num_features = 2 * int(model.embed_dim)
    elif entry.pooling == "attn_pool":
        model = AttentionPoolEncoder(model, int(entry.pool_kwargs["dim"]), int(entry.pool_kwargs["heads"]))
    if entry.truncate_after:
        stages = [f["module"] for f in model.feature_info]
        keep = stages.index(entry.truncate_after)
        for later in stages[keep + 1:]:
            model.set_submodule(later, nn.Identity())
        model.num_features = int(model.feature_info[keep]["num_chs"])
    if int(model.num_features) != entry.dim:
        raise BackboneError(f"encoder {entry.name}: the built model gives {model.num_features}-d features but the "
                            f"registry says {entry.dim}; fix the entry in sgcl/models/encoders.py")
    return model


# -- key layouts --------------------------------------------------------------------------------------
_HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
_HF_VIT_BLOCK = {"layernorm_before": "norm1", "attention.output.dense": "attn.proj", "layernorm_after": "norm2",
                 "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
_HF_DINOV2_BLOCK = {"norm1": "norm1", "attention.output.dense": "attn.proj", "layer_scale1": "ls1", "norm2": "norm2",
                    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "layer_scale2": "ls2"}
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_HF_DROP = ("pooler.", "classifier.", "embeddings.mask_token")


def _hf_to_timm(state: Mapping[str, torch.Tensor], block_map: Mapping[str, str], prefixes: tuple[str, ...]) -> dict:
    """transformers ViT-family keys -> timm VisionTransformer keys (q, k, v fused into qkv)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key.startswith(_HF_DROP):
            continue
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        m = _HF_LAYER.match(key)
        if m is None:
            out[key] = value  # unknown: reported as an unexpected key by the loader
            continue
        i, module, param = int(m.group(1)), m.group(2), m.group(3)
        if module.startswith("attention.attention."):
            qkv.setdefault((i, param), {})[module.rsplit(".", 1)[1]] = value
        elif module in block_map:
            out[f"blocks.{i}.{block_map[module]}.{'gamma' if param == 'lambda1' else param}"] = value
        else:
            out[key] = value
    for (i, param), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
        else:
            out.update({f"encoder.layer.{i}.attention.attention.{n}.{param}": v for n, v in parts.items()})
    return out


def timm_layout(state: Mapping[str, torch.Tensor]) -> dict:
    """timm checkpoints (UNI, Virchow2, GigaPath, H-optimus): as is, without a classifier head."""
    return {k: v for k, v in state.items() if k not in ("head.weight", "head.bias")}


def hf_vit_layout(state: Mapping[str, torch.Tensor]) -> dict:
    """transformers ``ViTModel`` / ``ViTFor*`` (Phikon): ``[vit.]embeddings...``, ``encoder.layer.N...``."""
    return _hf_to_timm(state, _HF_VIT_BLOCK, ("vit.",))


def hf_dinov2_layout(state: Mapping[str, torch.Tensor]) -> dict:
    """transformers ``Dinov2Model`` (Phikon-v2): like ViT plus LayerScale ``layer_scale{1,2}.lambda1``."""
    return _hf_to_timm(state, _HF_DINOV2_BLOCK, ("dinov2.",))


def conch_layout(state: Mapping[str, torch.Tensor]) -> dict:
    """CONCH's CoCa checkpoint: keep ``visual.trunk.``, ``visual.attn_pool_contrast.``, ``visual.ln_contrast.``
    (the names of :class:`AttentionPoolEncoder`); the text tower, caption pooler and projection are dropped."""
    keep = ("trunk.", "attn_pool_contrast.", "ln_contrast.")
    return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.") and k[len("visual."):].startswith(keep)}


def torchvision_resnet_layout(state: Mapping[str, torch.Tensor]) -> dict:
    """torchvision ResNet keys equal timm's; layer4 and fc are not part of the truncated model."""
    return {k: v for k, v in state.items() if not k.startswith(("layer4.", "fc."))}


LAYOUTS: dict[str, Callable[[Mapping[str, torch.Tensor]], dict]] = {
    "timm": timm_layout, "hf_vit": hf_vit_layout, "hf_dinov2": hf_dinov2_layout, "conch": conch_layout,
    "torchvision_resnet": torchvision_resnet_layout,
}


def _fit_pos_embed(model: nn.Module, state: dict) -> list[str]:
    """Resample absolute position embeddings stored for another grid (as timm's checkpoint filter does)."""
    from timm.layers import resample_abs_pos_embed

    notes = []
    own = model.state_dict()
    for key in [k for k in state if k.endswith("pos_embed") and k in own and state[k].shape != own[k].shape]:
        owner = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
        prefix = 0 if getattr(owner, "no_embed_class", False) else int(getattr(owner, "num_prefix_tokens", 1))
        old = tuple(state[key].shape)
        state[key] = resample_abs_pos_embed(state[key], new_size=list(owner.patch_embed.grid_size),
                                            num_prefix_tokens=prefix, verbose=False)
        notes.append(f"{key} resampled {old} -> {tuple(state[key].shape)}")
    return notes


def load_state_into(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> dict:
    """Load converted weights strictly: every parameter covered (``num_batches_tracked`` of old
    checkpoints excepted), nothing left over (the layouts drop what the model does not use).
    Returns ``{"unexpected_keys": [], "notes"}``."""
    state = dict(state)
    notes = _fit_pos_embed(model, state)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:400]
        raise EncoderWeightsError(f"{path}: the weights do not fit {what}: {detail}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    problems = ([f"{len(missing)} weights are missing (e.g. {missing[:4]})"] if missing else []) + \
               ([f"{len(unexpected)} are not in the model (e.g. {list(unexpected)[:4]})"] if unexpected else [])
    if problems:
        raise EncoderWeightsError(f"{path}: not a checkpoint of {what}: {'; '.join(problems)}; pass the file "
                                  "published for it")
    return {"unexpected_keys": [], "notes": notes}


# -- weights files ------------------------------------------------------------------------------------
def default_search_roots() -> list[Path]:
    """The Hugging Face hub cache and torch hub checkpoint folders, as their libraries resolve them."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    hf_home = Path(os.environ.get("HF_HOME") or cache / "huggingface")
    torch_home = Path(os.environ.get("TORCH_HOME") or cache / "torch")
    roots = [Path(os.environ.get("HF_HUB_CACHE") or hf_home / "hub"), torch_home / "hub" / "checkpoints"]
    return list(dict.fromkeys(roots))


def _snapshots(folder: Path) -> list[Path]:
    """``folder/snapshots/*`` of a hub cache folder: the one ``refs/main`` names first, then newest first."""
    snap = folder / "snapshots"
    if not snap.is_dir():
        return []
    ref = folder / "refs" / "main"
    pinned = ref.read_text().strip() if ref.is_file() else ""
    dirs = [d for d in snap.iterdir() if d.is_dir()]
    return sorted(dirs, key=lambda d: (d.name != pinned, -d.stat().st_mtime))


def _search_dirs(root: Path, entry: EncoderEntry) -> list[Path]:
    dirs = [root, *_snapshots(root)]
    if entry.cache_folder:
        dirs += _snapshots(root / entry.cache_folder)
    return dirs


def find_weights(entry: EncoderEntry, weights: str | Path | None = None) -> Path:
    """The weights file of ``entry``: ``weights`` itself when it is a file, else the first published
    file name found in the folder / its hub-cache snapshots (or the default caches when None)."""
    expected = ", ".join(entry.files)
    source = f" (published at huggingface.co/{entry.hf_repo})" if entry.hf_repo else ""
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_file():
            if path.suffix not in WEIGHT_SUFFIXES:
                raise EncoderWeightsError(f"{path}: not a weights file; expected {' / '.join(WEIGHT_SUFFIXES)} "
                                          f"(for {entry.name}: {expected})")
            return path
        if not path.exists():
            published = f", published at huggingface.co/{entry.hf_repo}" if entry.hf_repo else ""
            raise EncoderWeightsError(f"{entry.name}: " + no_such_path(path, f"{entry.name} weights, files: {expected}"
                                                                       f"{published}; pass the file or its folder"))
        roots = [path]
    else:
        roots = default_search_roots()
    looked: list[str] = []
    for root in roots:
        for folder in _search_dirs(root, entry):
            for name in entry.files:
                if (folder / name).is_file():
                    return folder / name
        looked.append(f"{root}" + (f" (and {entry.cache_folder}/snapshots/*)" if entry.cache_folder else ""))
    hint = f"`huggingface-cli download {entry.hf_repo}` " if entry.hf_repo else ""
    raise EncoderWeightsError(
        f"{entry.name}: no weights found; expected {expected}{source}. Looked in: {'; '.join(looked)}. "
        f"Fetch them once on a machine with network ({hint}or a browser), copy them here and pass "
        f"--weights <file or folder> (nothing is downloaded)")


def load_weights(model: nn.Module, entry: EncoderEntry, weights: str | Path | None) -> dict:
    """Find, convert (``entry.layout``) and load ``entry``'s published weights into ``model``;
    returns ``{"weights", "sha256", "unexpected_keys", "notes"}``."""
    path = find_weights(entry, weights)
    state = LAYOUTS[entry.layout](read_state_dict(path))
    result = load_state_into(model, state, path, f"{entry.name} ({entry.layout} layout of {entry.hf_repo or entry.arch})")
    return {"weights": str(path), "sha256": file_sha256(path), **result}


def load_named_encoder(name: str, weights: str | Path | None = None) -> tuple[nn.Module, dict]:
    """``(model, info)`` of registry encoder ``name`` with its weights; ``info`` as
    :func:`sgcl.models.backbone.load_backbone` plus ``encoder``, ``architecture``, ``pooling``."""
    entry = get_entry(name)
    path = find_weights(entry, weights)  # a missing file fails before the (large) model is built
    model = build_model(entry)
    loaded = load_weights(model, entry, path)
    return model, {"model_name": entry.name, **entry_info(entry), "num_features": entry.dim, **loaded}


def entry_info(entry: EncoderEntry) -> dict:
    return {"encoder": entry.name, "architecture": entry.arch, "pooling": entry.pooling}


def canonical_name(name: str) -> str:
    """A registry name for ``name`` (TRIDENT/CLAM aliases such as ``uni_v1`` resolved); other names unchanged."""
    return ALIASES.get(str(name), str(name))


def is_registered(name: str) -> bool:
    return canonical_name(name) in ENCODERS


def trident_folder_name(model_name: str) -> str:
    """The ``<encoder>`` of TRIDENT's ``features_<encoder>/`` for an encoder: TRIDENT's own name for a
    registry encoder (``uni`` -> ``uni_v1``), else the model name."""
    entry = ENCODERS.get(canonical_name(model_name))
    return entry.trident_name if entry is not None else str(model_name)


def get_entry(name: str) -> EncoderEntry:
    name = canonical_name(name)
    if name not in ENCODERS:
        raise BackboneError(f"unknown encoder {name!r}; registered: {', '.join(ENCODERS)} (`sgcl extract --encoder list`)")
    return ENCODERS[name]


def format_table() -> str:
    """The registry as a text table (``sgcl extract --encoder list``)."""
    header = ("name", "TRIDENT name", "architecture", "dim", "input", "pooling", "expected weights (Hugging Face repo: file)")
    rows = [(e.name, e.trident_name, e.arch, str(e.dim), str(e.input_size), e.pooling,
             f"{e.hf_repo}: {' | '.join(e.files)}") for e in ENCODERS.values()]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in (header, *rows)]
    return "\n".join(lines)


def init_backbone(model: nn.Module, name: str, weights: str | Path) -> dict:
    """Start weights for pretraining (``model.init_weights``): a registry encoder's published
    checkpoint (converted from its layout), or for a timm backbone a timm-layout file / an
    ``sgcl pretrain`` export folder. Returns ``{"weights", "sha256", "unexpected_keys", "notes"}``."""
    from sgcl.models.backbone import WEIGHTS_NAME

    if name in ENCODERS:
        return load_weights(model, ENCODERS[name], weights)
    path = Path(weights).expanduser()
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise EncoderWeightsError("model.init_weights: " + no_such_path(
            path, f"a weights file in timm keys or an export folder of `sgcl pretrain` with files: {WEIGHTS_NAME}"))
    result = load_state_into(model, timm_layout(read_state_dict(path)), path, name)
    return {"weights": str(path), "sha256": file_sha256(path), **result}

"""Encoder (ours or any timm model, ``features_only``) + U-Net-style decoder to full resolution.

The encoder is a timm ``features_only`` model whose weights come from ``load_backbone(spec)``
(an ``sgcl pretrain`` export folder, a checkpoint file, or a timm name = random init), copied by
matching parameter names (``features_only`` wrappers rename ``stages.1`` to ``stages_1`` or prefix
``model.``). The decoder upsamples from the deepest map, concatenating each shallower map (skip
connections), then reaches full resolution with a last block that also sees the input image, as
small structures (nuclei) need full-resolution detail.

The model takes images in [0, 1] (B, 3, H, W) and normalises them itself (ImageNet mean/std by
default), so inference code never needs to know the encoder's normalisation. H and W need not be
multiples of the encoder's stride.
"""

from __future__ import annotations

import re
from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from sgcl.models.backbone import BackboneError, load_backbone

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _canonical(key: str) -> str:
    """Name of a parameter independent of timm's features_only renaming."""
    key = re.sub(r"^model\.", "", key)
    return key.replace("_", ".")


def load_matching_weights(target: nn.Module, source_state: dict[str, torch.Tensor], what: str = "encoder") -> int:
    """Copy ``source_state`` into ``target`` by canonical name; every target tensor must be found
    with the same shape. Returns the number of tensors copied."""
    by_name = {_canonical(k): v for k, v in source_state.items()}
    state = target.state_dict()
    missing, bad_shape = [], []
    for key, value in state.items():
        src = by_name.get(_canonical(key))
        if src is None:
            missing.append(key)
        elif src.shape != value.shape:
            bad_shape.append(f"{key} {tuple(src.shape)} vs {tuple(value.shape)}")
        else:
            state[key] = src
    if missing or bad_shape:
        raise BackboneError(f"{what}: pretrained weights do not fit the features_only model "
                            f"(missing {missing[:5]}, shape mismatch {bad_shape[:5]})")
    target.load_state_dict(state)
    return len(state)


def create_encoder(spec: str, out_indices: Sequence[int] | None = None) -> tuple[nn.Module, dict]:
    """A timm ``features_only`` encoder with the weights of ``spec`` (export dir / file / timm name)."""
    backbone, info = load_backbone(spec)
    kwargs = {"features_only": True, "pretrained": False}
    if out_indices is not None:
        kwargs["out_indices"] = tuple(out_indices)
    try:
        try:  # ViT-style encoders: accept any multiple of the patch size
            encoder = timm.create_model(info["model_name"], dynamic_img_size=True, **kwargs)
        except TypeError:
            encoder = timm.create_model(info["model_name"], **kwargs)
    except (RuntimeError, ValueError, AttributeError, TypeError) as exc:
        raise BackboneError(f"{info['model_name']}: timm cannot build it with features_only=True ({exc})") from None
    if info.get("weights"):
        info["tensors_loaded"] = load_matching_weights(encoder, backbone.state_dict(), what=str(spec))
    del backbone
    return encoder, info


class ConvBlock(nn.Sequential):
    """(Conv3×3 → GroupNorm → ReLU) × 2; GroupNorm is robust to the small batches of fine-tuning."""

    def __init__(self, cin: int, cout: int):
        groups = 8 if cout % 8 == 0 else 1
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True),
        )


class UNetDecoder(nn.Module):
    """Upsample-and-concatenate decoder over a feature pyramid, ending at the input resolution."""

    def __init__(self, encoder_channels: Sequence[int], num_classes: int, decoder_channels: Sequence[int] | None = None,
                 image_channels: int = 3, full_res_channels: int = 16):
        super().__init__()
        enc = list(encoder_channels)
        n = len(enc)
        if decoder_channels is None:
            decoder_channels = [max(16, min(256, c)) for c in enc[:-1]]
        dec = list(decoder_channels)
        if len(dec) != n - 1:
            raise ValueError(f"decoder_channels needs {n - 1} values (one per skip level), got {len(dec)}")
        self.blocks = nn.ModuleList()
        cin = enc[-1]
        for i in range(n - 2, -1, -1):  # deepest skip first
            self.blocks.append(ConvBlock(cin + enc[i], dec[i]))
            cin = dec[i]
        self.full_res = ConvBlock(cin + image_channels, full_res_channels)
        self.head = nn.Conv2d(full_res_channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, reversed(features[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        x = F.interpolate(x, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.full_res(torch.cat([x, image], 1)))


class SegmentationModel(nn.Module):
    """Encoder + U-Net decoder. ``forward(images in [0, 1]) -> logits (B, num_classes, H, W)``."""

    def __init__(self, encoder: nn.Module, num_classes: int, frozen: bool = False,
                 decoder_channels: Sequence[int] | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + foreground), got {num_classes}")
        self.encoder = encoder
        self.num_classes = num_classes
        self.frozen = frozen
        channels = encoder.feature_info.channels()
        self.decoder = UNetDecoder(channels, num_classes, decoder_channels)
        self.input_multiple = int(max(encoder.feature_info.reduction()))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        if frozen:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> "SegmentationModel":
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # frozen encoder: BatchNorm statistics stay fixed too
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        h, w = x.shape[-2:]
        m = self.input_multiple  # pad to a multiple of the encoder's stride, crop the logits back
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        if self.frozen:
            with torch.no_grad():
                feats = self.encoder(x)
        else:
            feats = self.encoder(x)
        return self.decoder(list(feats), x)[..., :h, :w]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def build_segmentation_model(encoder: str, num_classes: int, frozen: bool = False,
                             decoder_channels: Sequence[int] | None = None,
                             out_indices: Sequence[int] | None = None) -> tuple[SegmentationModel, dict]:
    """Factory by name: ``encoder`` is an export folder, a checkpoint file or a timm model name."""
    enc, info = create_encoder(encoder, out_indices)
    model = SegmentationModel(enc, num_classes, frozen=frozen, decoder_channels=decoder_channels)
    info = dict(info, encoder_spec=str(encoder), feature_channels=enc.feature_info.channels(),
                feature_reductions=enc.feature_info.reduction())
    return model, info

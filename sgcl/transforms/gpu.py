"""Photometric augmentation of whole uint8 batches on the training device (GPU for throughput; works
on CPU tensors too). The loader then only decodes and crops (``aug.gpu=true``), and the colour work
runs as a few batched tensor ops instead of per-image OpenCV calls in the workers.

Same augmentations as ``photometric.py`` (HED stain jitter, brightness, contrast, saturation, hue,
greyscale, blur, ImageNet normalisation); hue is rotated in YIQ space, a linear, batched stand-in
for the HSV shift.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sgcl.transforms.photometric import HED_FROM_RGB, RGB_FROM_HED, PhotometricParams
from sgcl.transforms.views import IMAGENET_MEAN, IMAGENET_STD

_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_GREY = torch.tensor([0.299, 0.587, 0.114])


def _uniform(b: int, lo: float, hi: float, gen: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(b, generator=gen, device="cpu").to(device) * (hi - lo) + lo


def _bernoulli(b: int, p: float, gen: torch.Generator | None, device) -> torch.Tensor:
    return (torch.rand(b, generator=gen, device="cpu") < p).to(device)


class GPUPhotometric:
    """``(B, 3, H, W) uint8 -> (B, 3, H, W) float32`` jittered and normalised; random draws from ``gen``."""

    def __init__(self, params: PhotometricParams | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.p = params or PhotometricParams()
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        p, dev = self.p, x.device
        b = x.shape[0]
        img = x.float().div_(255.0)
        grey_w = _GREY.to(dev).view(1, 3, 1, 1)
        out = img
        if p.hed_sigma > 0:
            out = self._hed(out, _bernoulli(b, p.p_hed, gen, dev), _uniform(b * 3, 1 - p.hed_sigma, 1 + p.hed_sigma, gen, dev).view(b, 3),
                            _uniform(b * 3, -p.hed_sigma, p.hed_sigma, gen, dev).view(b, 3))
        jit = _bernoulli(b, p.p_jitter, gen, dev).view(b, 1, 1, 1)
        if p.brightness > 0:
            f = _uniform(b, max(0, 1 - p.brightness), 1 + p.brightness, gen, dev).view(b, 1, 1, 1)
            out = torch.where(jit, out * f, out).clamp_(0, 1)
        if p.contrast > 0:
            f = _uniform(b, max(0, 1 - p.contrast), 1 + p.contrast, gen, dev).view(b, 1, 1, 1)
            mean = (out * grey_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
            out = torch.where(jit, (out - mean) * f + mean, out).clamp_(0, 1)
        if p.saturation > 0:
            f = _uniform(b, max(0, 1 - p.saturation), 1 + p.saturation, gen, dev).view(b, 1, 1, 1)
            g = (out * grey_w).sum(1, keepdim=True)
            out = torch.where(jit, (out - g) * f + g, out).clamp_(0, 1)
        if p.hue > 0:
            theta = _uniform(b, -p.hue, p.hue, gen, dev) * 2 * math.pi
            c, s = torch.cos(theta), torch.sin(theta)
            rot = torch.zeros(b, 3, 3, device=dev)
            rot[:, 0, 0] = 1
            rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
            yiq = _RGB2YIQ.to(dev)
            m = torch.linalg.inv(yiq) @ rot @ yiq  # (b, 3, 3)
            hued = torch.einsum("bij,bjhw->bihw", m, out)
            out = torch.where(jit, hued, out).clamp_(0, 1)
        greyed = _bernoulli(b, p.p_grey, gen, dev).view(b, 1, 1, 1)
        out = torch.where(greyed, (out * grey_w).sum(1, keepdim=True).expand_as(out), out)
        if p.p_blur > 0:
            out = self._blur(out, _bernoulli(b, p.p_blur, gen, dev), _uniform(b, *p.blur_sigma, gen, dev))
        return (out - self.mean.to(dev)) / self.std.to(dev)

    @staticmethod
    def _hed(x: torch.Tensor, mask: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Per-sample HED stain jitter on [0, 1] images (see ``photometric.hed_jitter``)."""
        hfr = torch.as_tensor(HED_FROM_RGB, dtype=torch.float32, device=x.device)
        rfh = torch.as_tensor(RGB_FROM_HED, dtype=torch.float32, device=x.device)
        m = torch.einsum("ij,bj,jk->bik", hfr, alpha, rfh)     # (b, 3, 3): od' = od·m + β·R
        off = beta @ rfh                                        # (b, 3)
        od = -torch.log(torch.clamp(x * 255.0, min=1.0) / 255.0)
        od2 = torch.einsum("bihw,bik->bkhw", od, m) + off[:, :, None, None]
        y = torch.exp(-od2).clamp_(0, 1)
        return torch.where(mask.view(-1, 1, 1, 1), y, x)

    @staticmethod
    def _blur(x: torch.Tensor, mask: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample separable Gaussian blur (grouped convolution), applied where ``mask``."""
        b, c, h, w = x.shape
        radius = int(math.ceil(3 * float(sigma.max())))
        radius = max(1, min(radius, (min(h, w) - 1) // 2))
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
        k = k / k.sum(1, keepdim=True)                         # (b, 2r+1)
        k = k.repeat_interleave(c, 0)                          # (b*c, 2r+1)
        y = x.reshape(1, b * c, h, w)
        y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
        y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
        y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
        y = y.view(b, c, h, w)
        return torch.where(mask.view(b, 1, 1, 1), y, x)

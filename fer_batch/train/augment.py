"""Batch augmentation with cheap tensor ops (no per-image Python work, no decoding).

One ``affine_grid``/``grid_sample`` does the random resized crop, rotation, translation and
horizontal flip together, and produces the network's input side directly; with every jitter at
zero it reproduces exactly the card's centre crop (``preprocess.prepare``), so training and
inference see the same framing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from fer_batch.preprocess import PreprocessSpec


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of each augmentation (0 disables it).

    ``scale``: zoom jitter (+-fraction of the crop side); ``translate``: shift as a fraction of
    the crop side; ``rotate``: degrees; ``brightness``/``contrast``: +- relative jitter;
    ``erase``: probability of one random erased rectangle (2-20 % of the area);
    ``mixup``/``cutmix``: probability per batch (soft targets).
    Stronger augmentation generalises better (other datasets, video crops) but needs more
    epochs to fit.
    """

    flip: float = 0.5
    scale: float = 0.15
    translate: float = 0.08
    rotate: float = 12.0
    brightness: float = 0.25
    contrast: float = 0.25
    erase: float = 0.3
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_alpha: float = 0.4

    def to_dict(self) -> dict:
        return asdict(self)


def _u(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def geometric(x: torch.Tensor, spec: PreprocessSpec, cfg: AugmentConfig | None, gen: torch.Generator | None) -> torch.Tensor:
    """(B, C, size, size) float in [0, 1] -> (B, C, S, S) with S = spec.input_size."""
    b = x.shape[0]
    s_out = spec.input_size
    base = s_out / x.shape[-1]
    if cfg is None or gen is None:
        if s_out == x.shape[-1]:
            return x
        o = (x.shape[-1] - s_out) // 2
        if (x.shape[-1] - s_out) % 2 == 0:
            return x[..., o : o + s_out, o : o + s_out]
        zoom = torch.ones(b)
        ang = torch.zeros(b)
        tx = ty = torch.zeros(b)
        flip = torch.ones(b)
    else:
        zoom = 1.0 + _u(gen, b, -cfg.scale, cfg.scale)
        ang = _u(gen, b, -cfg.rotate, cfg.rotate) * (math.pi / 180)
        tx = _u(gen, b, -cfg.translate, cfg.translate) * 2 * base
        ty = _u(gen, b, -cfg.translate, cfg.translate) * 2 * base
        flip = torch.where(torch.rand(b, generator=gen) < cfg.flip, -1.0, 1.0)
    c, s = torch.cos(ang) * zoom * base, torch.sin(ang) * zoom * base
    theta = torch.stack([torch.stack([c * flip, -s, tx], 1), torch.stack([s * flip, c, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), [b, x.shape[1], s_out, s_out], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def photometric(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    if cfg.contrast > 0:
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * (1 + _u(gen, b, -cfg.contrast, cfg.contrast)).view(b, 1, 1, 1) + m
    if cfg.brightness > 0:
        x = x * (1 + _u(gen, b, -cfg.brightness, cfg.brightness)).view(b, 1, 1, 1)
    return x.clamp_(0.0, 1.0)


def erase(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Random erasing: one rectangle per chosen image, filled with uniform noise."""
    b, _, h, w = x.shape
    on = torch.rand(b, generator=gen) < p
    if not on.any():
        return x
    area = _u(gen, b, 0.02, 0.2) * h * w
    ratio = torch.exp(_u(gen, b, math.log(0.3), math.log(3.3)))
    eh = (area * ratio).sqrt().clamp(1, h)
    ew = (area / ratio).sqrt().clamp(1, w)
    y0 = torch.rand(b, generator=gen) * (h - eh)
    x0 = torch.rand(b, generator=gen) * (w - ew)
    yy = torch.arange(h).view(1, h, 1)
    xx = torch.arange(w).view(1, 1, w)
    mask = (yy >= y0.view(b, 1, 1)) & (yy < (y0 + eh).view(b, 1, 1)) & (xx >= x0.view(b, 1, 1)) & (xx < (x0 + ew).view(b, 1, 1))
    mask &= on.view(b, 1, 1)
    noise = torch.rand(x.shape, generator=gen)
    return torch.where(mask.unsqueeze(1), noise, x)


def normalize(x: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def train_batch(u8: torch.Tensor, spec: PreprocessSpec, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """(B, C, size, size) uint8 -> augmented, normalised (B, C, S, S) float32."""
    x = u8.float().div_(255.0)
    x = geometric(x, spec, cfg, gen)
    x = photometric(x, cfg, gen)
    if cfg.erase > 0:
        x = erase(x, cfg.erase, gen)
    return normalize(x, spec)


def mix(x: torch.Tensor, y_soft: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix on a batch (each with its probability); targets mixed accordingly."""
    r = float(torch.rand(1, generator=gen))
    if r >= cfg.mixup + cfg.cutmix:
        return x, y_soft
    lam = float(torch.distributions.Beta(cfg.mix_alpha, cfg.mix_alpha).sample())
    perm = torch.randperm(x.shape[0], generator=gen)
    if r < cfg.mixup:
        return lam * x + (1 - lam) * x[perm], lam * y_soft + (1 - lam) * y_soft[perm]
    h, w = x.shape[-2:]
    ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(h, (1,), generator=gen)), int(torch.randint(w, (1,), generator=gen))
    y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return x, lam * y_soft + (1 - lam) * y_soft[perm]

"""The one card-driven preprocessing shared by training, evaluation and the video pipeline.

A model card's ``preprocess`` section says how a face crop becomes the network tensor::

    preprocess:
      size: 48            # the face crop is resized to size x size (the FER2013 framing)
      crop: 40            # optional centre crop after resizing (the network input side)
      colour: gray        # gray | rgb
      mean: [0.5]         # per channel, after scaling pixels to [0, 1]
      std: [0.5]
      tta: false          # horizontal-flip test-time augmentation by default
      align_template:     # where the 5 landmarks sit in the size x size crop
        size: 48
        points: [[x, y] x 5]   # left eye, right eye, nose, left / right mouth corner

``prepare`` turns crops into the tensor; ``align_crop`` makes the crop from a full frame and
5 detected landmarks with a similarity transform onto the template (so that pipeline crops
look like the crops the model was trained on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from fer_batch.errors import ModelError

# A generic template used only when a card has none: the 5 landmarks of InsightFace's
# ArcFace 112x112 template scaled to 48 px (tighter framing than FER2013; cards should carry
# their own measured template).
_ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]], np.float32
)


@dataclass(frozen=True)
class PreprocessSpec:
    """Preprocessing parameters read from a card (see module docstring)."""

    size: int = 48
    crop: int | None = None
    colour: str = "gray"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    tta: bool = False
    template: np.ndarray | None = None  # (5, 2) float32 in size x size coordinates
    template_size: int | None = None

    @property
    def channels(self) -> int:
        return 1 if self.colour == "gray" else 3

    @property
    def input_size(self) -> int:
        return self.crop or self.size

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, where: str = "card") -> "PreprocessSpec":
        d = dict(d or {})
        try:
            colour = str(d.get("colour", "gray"))
            if colour not in ("gray", "rgb", "bgr"):
                raise ValueError(f"colour {colour!r} is not gray|rgb|bgr")
            nch = 1 if colour == "gray" else 3
            mean = tuple(float(v) for v in np.broadcast_to(np.asarray(d.get("mean", 0.5), float), (nch,)))
            std = tuple(float(v) for v in np.broadcast_to(np.asarray(d.get("std", 0.5), float), (nch,)))
            size = int(d.get("size", 48))
            crop = d.get("crop")
            crop = int(crop) if crop else None
            if crop is not None and not 0 < crop <= size:
                raise ValueError(f"crop {crop} must be in (0, size={size}]")
            tpl, tsize = None, None
            if d.get("align_template"):
                t = d["align_template"]
                tpl = np.asarray(t["points"], np.float32).reshape(5, 2)
                tsize = int(t.get("size", size))
            if min(std) <= 0:
                raise ValueError("std must be > 0")
        except (TypeError, ValueError, KeyError) as e:
            raise ModelError(f"{where}: invalid preprocess section: {e}") from e
        return cls(size, crop, colour, mean, std, bool(d.get("tta", False)), tpl, tsize)

    @classmethod
    def from_card(cls, card) -> "PreprocessSpec":
        return cls.from_dict(card.preprocess, where=str(card.card_path or card.name))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"size": self.size, "colour": self.colour, "mean": list(self.mean), "std": list(self.std), "tta": self.tta}
        if self.crop:
            out["crop"] = self.crop
        if self.template is not None:
            out["align_template"] = {"size": self.template_size or self.size, "points": [[round(float(v), 3) for v in pt] for pt in self.template]}
        return out

    def template_points(self) -> tuple[np.ndarray, int]:
        """The 5-point template scaled to the crop side ``size`` (the crop ``prepare`` expects)."""
        if self.template is not None:
            return self.template * (self.size / float(self.template_size or self.size)), self.size
        return _ARCFACE_112 * (self.size / 112.0), self.size


def to_colour(crops: np.ndarray, colour: str) -> np.ndarray:
    """(N, H, W, C) uint8 BGR/gray -> (N, H, W, 1 or 3) in the model's colour order."""
    if crops.ndim == 3:
        crops = crops[..., None]
    c = crops.shape[-1]
    if colour == "gray":
        if c == 1:
            return crops
        # ITU-R 601 luma, as cv2.cvtColor(BGR2GRAY)
        g = crops[..., 0] * 0.114 + crops[..., 1] * 0.587 + crops[..., 2] * 0.299
        return np.clip(np.rint(g), 0, 255).astype(np.uint8)[..., None]
    if c == 1:
        crops = np.repeat(crops, 3, axis=-1)
    return crops[..., ::-1] if colour == "rgb" else crops


def prepare(crops: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Face crops -> network input.

    Args:
        crops: (N, H, W, 3) uint8 BGR or (N, H, W[, 1]) uint8 gray face crops in the FER framing
            (as made by ``align_crop`` or as stored in FER2013).
        spec: the card's preprocessing.

    Returns:
        (N, C, S, S) float32 with S = ``spec.input_size``.
    """
    crops = np.asarray(crops)
    if crops.ndim == 3 and crops.shape[-1] not in (1, 3):
        crops = crops[..., None]
    if crops.ndim != 4 or crops.dtype != np.uint8:
        raise ValueError(f"prepare: expected (N, H, W, C) uint8 crops, got {crops.shape} {crops.dtype}")
    x = to_colour(crops, spec.colour)
    n, h, w, c = x.shape
    if (h, w) != (spec.size, spec.size):
        interp = cv2.INTER_AREA if min(h, w) > spec.size else cv2.INTER_LINEAR
        x = np.stack([cv2.resize(im, (spec.size, spec.size), interpolation=interp).reshape(spec.size, spec.size, c) for im in x]) if n else x.reshape(0, spec.size, spec.size, c)
    if spec.crop and spec.crop != spec.size:
        o = (spec.size - spec.crop) // 2
        x = x[:, o : o + spec.crop, o : o + spec.crop]
    x = x.astype(np.float32) * (1.0 / 255.0)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))




def _umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Closed-form least-squares similarity (Umeyama 1991), 2x3."""
    src = src.astype(np.float64)
    dst = dst.astype(np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sgn = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sgn[1, 1] = -1
    r = u @ sgn @ vt
    var = (s**2).sum() / len(src)
    scale = (sig * np.diag(sgn)).sum() / var if var > 0 else 1.0
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]]).astype(np.float32)


def align_crop(image_bgr: np.ndarray, kps: np.ndarray, spec_or_card) -> np.ndarray:
    """Aligned face crops for the classifier.

    Args:
        image_bgr: (H, W, 3) uint8 frame.
        kps: (N, 5, 2) landmarks (InsightFace order) in frame pixels.
        spec_or_card: a ``PreprocessSpec`` or a ``ModelCard``.

    Returns:
        (N, S, S, 3) uint8 BGR crops with S = ``preprocess.size``; the landmarks land on
        the card's template by a least-squares similarity transform (no shear, so faces are
        not distorted).
    """
    spec = spec_or_card if isinstance(spec_or_card, PreprocessSpec) else PreprocessSpec.from_card(spec_or_card)
    tpl, side = spec.template_points()
    kps = np.asarray(kps, np.float32).reshape(-1, 5, 2)
    out = np.empty((len(kps), side, side, 3), np.uint8)
    for i, k in enumerate(kps):
        m = _umeyama(k, tpl)
        scale = float(np.hypot(m[0, 0], m[0, 1]))
        # Shrinking a large face: warp at up to 4x the output side, then area-average down
        # (bilinear warping alone would alias, unlike the camera-like downscale of FER2013).
        f = int(min(4, max(1, np.floor(1.0 / max(scale, 1e-6)))))
        mf = m * np.float32(f)
        big = cv2.warpAffine(image_bgr, mf, (side * f, side * f), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        out[i] = cv2.resize(big, (side, side), interpolation=cv2.INTER_AREA) if f > 1 else big
    return out

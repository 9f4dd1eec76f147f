"""Image-processing attacks applied to de-identified images D (paper, section 4.9, Table 8).

Each attack maps a uint8 batch ``(B, 3, H, W)`` to a uint8 batch of the same shape (what an
adversary would do to a published 8-bit image before running face recognition):

=================  ==================================================================
``median5``        median filter, 5 x 5 window (PIL ``MedianFilter(5)``)
``gauss5``         Gaussian blur, 5 x 5 kernel, sigma 2 (reflect-101 borders, as OpenCV)
``jpeg10``         JPEG encode / decode at quality 10 (Pillow, 4:2:0)
``bits3``          bit-depth reduction to 3 bits per channel (feature squeezing)
``webp50``         WebP encode / decode at quality 50 (Pillow)
``resize0.5``      0.5x downscale (antialiased bilinear) then upscale (bilinear)
=================  ==================================================================

The first four are the paper's; WebP and resizing are added.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from ..errors import ConfigError

Attack = Callable[[torch.Tensor], torch.Tensor]


def _check(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ConfigError(f"attacks take uint8 (B, 3, H, W) batches, got {x.dtype} {tuple(x.shape)}")


def _per_image(x: torch.Tensor, fn: Callable[[Image.Image], Image.Image]) -> torch.Tensor:
    _check(x)
    out = torch.empty_like(x)
    arr = x.permute(0, 2, 3, 1).numpy()
    for i in range(len(arr)):
        res = np.asarray(fn(Image.fromarray(np.ascontiguousarray(arr[i]))).convert("RGB"))
        out[i] = torch.from_numpy(res.copy()).permute(2, 0, 1)
    return out


def _codec(fmt: str, **kw: object) -> Callable[[Image.Image], Image.Image]:
    def run(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        buf.seek(0)
        out = Image.open(buf)
        out.load()
        return out

    return run


def median_blur(x: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Median filter with a ``k x k`` window."""
    return _per_image(x, lambda im: im.filter(ImageFilter.MedianFilter(k)))


def gaussian_kernel(k: int, sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of length ``k``."""
    t = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    w = torch.exp(-(t**2) / (2 * sigma**2))
    return (w / w.sum()).float()


def gaussian_blur_float(x: torch.Tensor, sigma: float, k: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of a float batch ``(B, C, H, W)``, reflect-101 borders.

    ``k`` defaults to ``2 * ceil(3 sigma) + 1``; it is clipped so the padding fits the image.
    """
    k = int(k or 2 * int(np.ceil(3 * sigma)) + 1)
    pad = min(k // 2, x.shape[-1] - 1, x.shape[-2] - 1)
    k = 2 * pad + 1
    w = gaussian_kernel(k, sigma).to(x)
    c = x.shape[1]
    y = F.pad(x, (pad, pad, 0, 0), mode="reflect")
    y = F.conv2d(y, w.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    y = F.pad(y, (0, 0, pad, pad), mode="reflect")
    return F.conv2d(y, w.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp_(0, 255).to(torch.uint8)


def gaussian_blur(x: torch.Tensor, k: int = 5, sigma: float = 2.0) -> torch.Tensor:
    """Gaussian blur, ``k x k`` kernel with standard deviation ``sigma``."""
    _check(x)
    return _to_uint8(gaussian_blur_float(x.float(), sigma, k))


def jpeg(x: torch.Tensor, quality: int = 10) -> torch.Tensor:
    """JPEG round trip at ``quality``."""
    return _per_image(x, _codec("JPEG", quality=int(quality)))


def webp(x: torch.Tensor, quality: int = 50) -> torch.Tensor:
    """WebP (lossy) round trip at ``quality``."""
    return _per_image(x, _codec("WEBP", quality=int(quality)))


def bit_depth(x: torch.Tensor, bits: int = 3) -> torch.Tensor:
    """Keep ``bits`` bits per channel: ``round(x (2^b - 1)) / (2^b - 1)`` on the [0, 1] scale."""
    _check(x)
    levels = 2**bits - 1
    return _to_uint8(torch.round(x.float() / 255.0 * levels) / levels * 255.0)


def resize(x: torch.Tensor, factor: float = 0.5) -> torch.Tensor:
    """Downscale by ``factor`` (antialiased bilinear), upscale back (bilinear)."""
    _check(x)
    h, w = x.shape[-2:]
    small = F.interpolate(x.float(), size=(max(1, round(h * factor)), max(1, round(w * factor))), mode="bilinear", antialias=True, align_corners=False)
    return _to_uint8(F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False))


ATTACKS: dict[str, Attack] = {
    "median5": median_blur,
    "gauss5": gaussian_blur,
    "jpeg10": jpeg,
    "bits3": bit_depth,
    "webp50": webp,
    "resize0.5": resize,
}

ATTACK_LABELS = {
    "median5": "Median blur (k=5)",
    "gauss5": "Gaussian blur (k=5, σ=2)",
    "jpeg10": "JPEG (q=10)",
    "bits3": "Bit depth (3 bits)",
    "webp50": "WebP (q=50)",
    "resize0.5": "Resize (0.5×)",
}


def get_attacks(names: str | list[str] | None = None) -> dict[str, Attack]:
    """Attacks by name (comma list or list; None or ``"all"``: all of them, in table order)."""
    if names is None or names == "all":
        return dict(ATTACKS)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise ConfigError(f"unknown attack(s) {unknown}; choose from {', '.join(ATTACKS)}")
    return {n: ATTACKS[n] for n in names}

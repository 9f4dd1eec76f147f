"""Differentiable views of D fed to EN, for transfer to unseen recognisers (all off by default).

Each function maps ``(B, C, S, S)`` to ``(B, C, S, S)`` (any C: the mid loss views D and C stacked),
draws its randomness from a given ``torch.Generator`` and keeps gradients flowing to the input.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from featdeid.errors import ConfigError

# JPEG luminance quantisation table (ITU-T T.81, Annex K), quality 50.
_JPEG_Q50 = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float32,
)


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """Random views of D between HN and EN. ``*_p`` is the per-sample probability."""

    crop_jitter: bool = False
    crop_scale: float = 0.08
    crop_shift: float = 0.04
    blur: bool = False
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.3, 1.5)
    jpeg: bool = False
    jpeg_p: float = 0.5
    jpeg_quality: tuple[int, int] = (30, 90)
    paste_mask: bool = False  # train on C + mask * (D - C), exactly what paste-back produces
    ghost_skip: float = 0.0  # skip erosion tau of the ghost EN (training/ghost.py); 0 = off
    skip_grad: float = 1.0  # skip-gradient gamma of the ghost EN; 1 = off
    linbp_from: float = 1.0  # activations from this fraction of the EN on are linear in backward; 1 = off
    linbp_mix: float = 1.0  # share of the identity in those activations' backward (1 = fully linear)

    def __post_init__(self) -> None:
        object.__setattr__(self, "blur_sigma", tuple(float(v) for v in self.blur_sigma))
        object.__setattr__(self, "jpeg_quality", tuple(int(v) for v in self.jpeg_quality))
        lo, hi = self.blur_sigma
        qlo, qhi = self.jpeg_quality
        if not (0 < lo <= hi and 1 <= qlo <= qhi <= 100 and 0 <= self.blur_p <= 1 and 0 <= self.jpeg_p <= 1):
            raise ConfigError("transfer: need 0 < blur_sigma[0] <= [1], 1 <= jpeg_quality[0] <= [1] <= 100, p in [0, 1]")
        if not (0 <= self.crop_scale < 1 and 0 <= self.crop_shift < 0.5):
            raise ConfigError("transfer: need 0 <= crop_scale < 1 and 0 <= crop_shift < 0.5")
        if not (0 <= self.ghost_skip < 1 and 0 < self.skip_grad <= 1 and 0 <= self.linbp_from <= 1 and 0 < self.linbp_mix <= 1):
            raise ConfigError(
                "transfer: need 0 <= ghost_skip < 1, 0 < skip_grad <= 1, 0 <= linbp_from <= 1 and 0 < linbp_mix <= 1"
            )

    @property
    def ghost(self) -> bool:
        """Whether the EN itself is varied (``training/ghost.py``), not only its view of D."""
        return self.ghost_skip > 0 or self.skip_grad != 1.0 or self.linbp_from < 1.0

    @property
    def enabled(self) -> bool:
        return self.crop_jitter or self.blur or self.jpeg


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def crop_jitter(x: torch.Tensor, scale: float, shift: float, gen: torch.Generator) -> torch.Tensor:
    """Random zoom by ``1 +- scale`` and shift by ``+- shift`` (in frame units) per sample."""
    b = x.shape[0]
    s = _uniform(b, 1 - scale, 1 + scale, gen)
    t = _uniform(2 * b, -2 * shift, 2 * shift, gen).view(b, 2)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = s
    theta[:, :, 2] = t
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with standard deviation ``sigma`` pixels (reflect padding)."""
    radius = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    k = (k / k.sum()).to(x.device, x.dtype)
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _dct_matrix(n: int = 8) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float32)
    m = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


def jpeg_like(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG-like quantisation: 8x8 block DCT per channel, rounding to the quality's steps, inverse DCT.

    ``quality`` ``(B,)`` in [1, 100] scales the T.81 luminance table as libjpeg does (no YCbCr or
    chroma subsampling). The rounding passes gradients straight through. Needs sides divisible by 8.
    """
    b, c, h, w = x.shape
    if h % 8 or w % 8:
        raise ValueError(f"jpeg_like needs sides divisible by 8, got {h}x{w}")
    q = quality.float().clamp(1, 100)
    factor = torch.where(q < 50, 50.0 / q, 2.0 - q / 50.0)
    table = ((_JPEG_Q50[None] * factor.view(b, 1, 1)).round().clamp_min(1.0) / 255.0).to(x.device, x.dtype)
    table = table.view(b, 1, 1, 1, 8, 8)
    d = _dct_matrix().to(x.device, x.dtype)
    blocks = (x - 0.5).reshape(b, c, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5)
    coef = d @ blocks @ d.T
    coef = coef + (torch.round(coef / table) * table - coef).detach()
    out = d.T @ coef @ d
    return out.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w) + 0.5


def en_view(x: torch.Tensor, cfg: TransferConfig, gen: torch.Generator) -> torch.Tensor:
    """Apply the enabled transfer augmentations to D ``(B, C, S, S)`` before EN (per channel alike)."""
    b = x.shape[0]
    if cfg.crop_jitter:
        x = crop_jitter(x, cfg.crop_scale, cfg.crop_shift, gen)
    if cfg.blur:
        sigma = float(_uniform(1, *cfg.blur_sigma, gen))
        mask = (torch.rand(b, generator=gen) < cfg.blur_p).to(x.device).view(b, 1, 1, 1)
        x = torch.where(mask, gaussian_blur(x, sigma), x)
    if cfg.jpeg:
        quality = _uniform(b, *cfg.jpeg_quality, gen)
        mask = (torch.rand(b, generator=gen) < cfg.jpeg_p).to(x.device).view(b, 1, 1, 1)
        x = torch.where(mask, jpeg_like(x, quality), x)
    return x

"""The hiding network (paper, section 3.1): a U-Net with residual encoder blocks.

Input: the cover C ``(B, 3, S, S)`` in [0, 1] concatenated on channels with the identity feature
tiled to ``(B, 3, S, S)`` (:func:`tile_feature`), i.e. ``(B, 6, S, S)``. Output: D ``(B, 3, S, S)``.
The last convolution starts at zero and its output is added to C, so an untrained network is the
identity map and training only has to learn the change; this is the same function class as a
U-Net that outputs D directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig, tiling_shape
from .errors import ConfigError, ModelNotFoundError
from .weights import load_safetensors, save_safetensors

IDENTITY_BANK_KEY = "identity_bank"


def tile_feature(feature: torch.Tensor, image_size: int) -> torch.Tensor:
    """Tile identity features to image planes (paper: 1 x 512 -> 2 x 256 -> 256 x 256 -> 3 x 256 x 256).

    Args:
        feature: ``(B, D)``.
        image_size: S.
    Returns:
        ``(B, 3, S, S)``.
    """
    b, d = feature.shape
    rows, cols, reps = tiling_shape(d, image_size)
    plane = feature.reshape(b, rows, cols)
    if cols < image_size:
        plane = plane.repeat(1, 1, image_size // cols)
    plane = plane.repeat(1, reps, 1)
    return plane.unsqueeze(1).expand(b, 3, image_size, image_size)


def unsharp(residual: torch.Tensor, amount: float, sigma: float) -> torch.Tensor:
    """Unsharp mask ``r + amount * (r - G_sigma * r)`` per channel, reflect-padded, computed in float32.

    Args:
        residual: ``(B, C, H, W)``.
        amount: 0 returns ``residual`` unchanged.
        sigma: Gaussian standard deviation in pixels.
    Returns:
        ``(B, C, H, W)`` in ``residual``'s dtype.
    """
    if amount == 0:
        return residual
    radius = max(1, int(round(3 * sigma)))
    if radius >= min(residual.shape[-2:]):
        raise ValueError(f"sharpen_sigma {sigma} is too large for a {tuple(residual.shape[-2:])} frame")
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    weights = (g / g.sum()).tolist()
    r = residual.float()
    h, w = r.shape[-2:]
    padded = F.pad(r, (radius,) * 4, mode="reflect")
    # separable blur as sums of shifted views: faster on CPU than a depthwise convolution in any memory layout
    blur = sum(k * padded[..., :, i : i + w] for i, k in enumerate(weights))
    blur = sum(k * blur[..., i : i + h, :] for i, k in enumerate(weights))
    return (r + amount * (r - blur)).to(residual.dtype)


def scale_chroma(residual: torch.Tensor, chroma: float) -> torch.Tensor:
    """Scale the colour part of a change: ``m + chroma * (r - m)``, m the per-pixel mean over channels.

    Args:
        residual: ``(B, C, H, W)``.
        chroma: 1 returns ``residual`` unchanged; 0 gives every channel the mean (a grey change).
    Returns:
        ``(B, C, H, W)`` in ``residual``'s dtype.
    """
    if chroma == 1:
        return residual
    r = residual.float()
    mean = r.mean(1, keepdim=True)
    return (mean + chroma * (r - mean)).to(residual.dtype)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels)


class ResBlock(nn.Module):
    """Pre-activation residual block (ResNet basic block with GroupNorm)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(channels, groups),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels, 3, padding=1),
            _norm(channels, groups),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Down(nn.Module):
    """Encoder level: strided convolution (halves the size) followed by residual blocks."""

    def __init__(self, cin: int, cout: int, res_blocks: int, groups: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(cin, cout, 4, stride=2, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(cout, groups) for _ in range(res_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.down(x))


class Up(nn.Module):
    """Decoder level: bilinear upsampling, concatenation with the skip, two convolutions."""

    def __init__(self, cin: int, cskip: int, cout: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin + cskip, cout, 3, padding=1),
            _norm(cout, groups),
            nn.LeakyReLU(0.2),
            nn.Conv2d(cout, cout, 3, padding=1),
            _norm(cout, groups),
            nn.LeakyReLU(0.2),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.body(torch.cat([x, skip], dim=1))


class StrengthHead(nn.Module):
    """How hard a face is to de-identify, read from the U-Net's bottleneck: a linear map of its
    per-channel mean and standard deviation to a standardised score z in [-3, 3] (0 = typical).

    Fitted by ridge regression to the training recogniser's cos(C, D) on training covers
    (``training/fit_strength_head.py``); starts at zero, i.e. the same strength for every face.
    """

    LIMIT = 3.0

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(2 * channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    @staticmethod
    def statistics(bottleneck: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, 2C)``: per-channel mean and standard deviation, in float32."""
        x = bottleneck.float()
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> z ``(B,)``."""
        with torch.autocast(bottleneck.device.type, enabled=False):  # a reading of the whole face: float32
            z = F.linear(self.statistics(bottleneck), self.linear.weight.float(), self.linear.bias.float())
        return z[:, 0].clamp(-self.LIMIT, self.LIMIT)


class HidingNetwork(nn.Module):
    """U-Net hiding network ``D = HN(C, tile(e))``; sizes come from a :class:`ModelConfig`.

    The model also carries the identity bank (``(N, D)`` features of fake faces) as a buffer,
    so one ``model.safetensors`` holds everything needed to de-identify.
    """

    def __init__(self, config: ModelConfig, identity_bank: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        ch = [config.base_channels * m for m in config.channel_mults]
        g = config.groups
        self.stem = nn.Sequential(nn.Conv2d(6, ch[0], 3, padding=1), ResBlock(ch[0], g))
        self.downs = nn.ModuleList(
            Down(cin, cout, config.res_blocks, g) for cin, cout in zip([ch[0], *ch[:-1]], ch)
        )
        self.mid = ResBlock(ch[-1], g)
        skips = [ch[0], *ch[:-1]]
        outs = [*ch[:-1]][::-1] + [ch[0]]
        self.ups = nn.ModuleList()
        cin = ch[-1]
        for cskip, cout in zip(skips[::-1], outs):
            self.ups.append(Up(cin, cskip, cout, g))
            cin = cout
        self.head = nn.Conv2d(cin, 3, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.strength_head = StrengthHead(ch[-1]) if config.adaptive_strength > 0 else None
        bank = identity_bank if identity_bank is not None else torch.zeros(0, config.feature_dim)
        self.register_buffer(IDENTITY_BANK_KEY, bank.float().contiguous(), persistent=True)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def residual(self, cover: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """The change ``D - C`` before clamping. ``cover`` ``(B, 3, S, S)``, ``feature`` ``(B, D)``.

        With ``config.flip_average`` it is the mean of the U-Net's change for C and for C mirrored
        left-right (mirrored back): two passes of B (faster on CPU than one of 2B), the mirror in C's
        memory format. With ``config.sharpen`` the change is then sharpened (:func:`unsharp`), its colour
        part scaled by ``config.chroma`` (:func:`scale_chroma`), and with
        ``config.adaptive_strength`` γ each face's change is scaled by ``exp(γ z)``, z the
        :class:`StrengthHead`'s reading of the bottleneck (with the mirror average, the mean of the two
        passes' maps).
        """
        s = self.config.image_size
        if cover.shape[-2:] != (s, s) or cover.shape[1] != 3:
            raise ValueError(f"cover must be (B, 3, {s}, {s}), got {tuple(cover.shape)}")
        if feature.shape != (cover.shape[0], self.config.feature_dim):
            raise ValueError(f"feature must be (B, {self.config.feature_dim}), got {tuple(feature.shape)}")
        bottlenecks: list[torch.Tensor] | None = [] if self.strength_head is not None else None
        if self.config.flip_average:
            mirror = cover.flip(-1)
            if cover.is_contiguous(memory_format=torch.channels_last):
                mirror = mirror.contiguous(memory_format=torch.channels_last)
            change = 0.5 * (self.unet(cover, feature, bottlenecks) + self.unet(mirror, feature, bottlenecks).flip(-1))
        else:
            change = self.unet(cover, feature, bottlenecks)
        change = scale_chroma(unsharp(change, self.config.sharpen, self.config.sharpen_sigma), self.config.chroma)
        if bottlenecks:
            z = self.strength_head(sum(b.float() for b in bottlenecks) / len(bottlenecks))
            change = (change.float() * torch.exp(self.config.adaptive_strength * z)[:, None, None, None]).to(change.dtype)
        return change

    def network_state(self) -> dict[str, torch.Tensor]:
        """The state dict without a strength head: the U-Net and the identity bank, which training and
        export carry between configs (a head is fitted to one exported model, after training)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("strength_head.")}

    def unet(self, cover: torch.Tensor, feature: torch.Tensor, bottlenecks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The U-Net's own change for ``cover`` ``(B, 3, S, S)`` and ``feature`` ``(B, D)``, unaveraged;
        its bottleneck ``(B, C, S/2^L, S/2^L)`` is appended to ``bottlenecks`` when one is given."""
        x = torch.cat([cover, tile_feature(feature.to(cover.dtype), self.config.image_size)], dim=1)
        x = self.stem(x)
        skips = []
        for down in self.downs:
            skips.append(x)
            x = down(x)
        x = self.mid(x)
        if bottlenecks is not None:
            bottlenecks.append(x)
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip)
        return self.head(x)

    def forward(self, cover: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """De-identified ``D`` ``(B, 3, S, S)`` in [0, 1]."""
        return (cover + self.residual(cover, feature)).clamp(0, 1)

    def save_pretrained(self, folder: str | Path, half: bool = False, card: str | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ ``README.md`` when ``card`` is given)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder / "config.json")
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        if half:
            state = {k: (v.half() if v.is_floating_point() and k != IDENTITY_BANK_KEY else v) for k, v in state.items()}
        save_safetensors(state, folder / "model.safetensors", metadata={"format": "pt", "featdeid": "1"})
        if card is not None:
            (folder / "README.md").write_text(card)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> HidingNetwork:
        """Load a model folder written by :meth:`save_pretrained` (safetensors only)."""
        folder = Path(folder)
        cfg_path, w_path = folder / "config.json", folder / "model.safetensors"
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise ModelNotFoundError(f"{p} not found: a featdeid model folder has config.json and model.safetensors")
        config = ModelConfig.load(cfg_path)
        state = load_safetensors(w_path)
        bank = state.get(IDENTITY_BANK_KEY)
        model = cls(config, identity_bank=bank)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # a tensor of the wrong shape for this config
            raise ConfigError(f"{w_path} does not match {cfg_path}: {str(e).splitlines()[-1].strip()}") from e
        if missing or unexpected:
            raise ConfigError(
                f"{w_path} does not match {cfg_path}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        model.eval()
        return model

    def describe(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return json.dumps({**self.config.to_dict(), "parameters": n, "identities": int(self.identity_bank.shape[0])})

"""Model configuration that travels with the weights (``config.json``), validated on load."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .errors import ConfigError

FORMAT_VERSION = 1
# ModelConfig fields that post-process the network's change at inference; like ``recogniser`` and
# ``default_strength`` they shape no weights
RESHAPING_FIELDS = ("flip_average", "sharpen", "sharpen_sigma", "chroma")


def tiling_shape(feature_dim: int, image_size: int) -> tuple[int, int, int]:
    """How a ``feature_dim`` vector tiles an ``image_size`` square: ``(rows, cols, repeats)``.

    The paper's rule (D = 512, S = 256): reshape to ``2 x 256``, repeat 128 times down the height.
    Generalised:

    - ``D % S == 0``: ``D / S`` rows of length S; needs ``S % (D / S) == 0``; repeated ``S / rows`` times.
    - ``S % D == 0``: one row of length D tiled ``S / D`` times across, repeated S times down.

    Any other pair is refused.
    """
    d, s = int(feature_dim), int(image_size)
    if d <= 0 or s <= 0:
        raise ConfigError(f"feature_dim and image_size must be positive, got {d}, {s}")
    if d % s == 0 and s % (d // s) == 0:
        rows = d // s
        return rows, s, s // rows
    if s % d == 0:
        return 1, d, s
    raise ConfigError(
        f"feature_dim={d} cannot tile image_size={s}: need D % S == 0 with S % (D/S) == 0, or S % D == 0"
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and provenance of a hiding network.

    ``channel_mults`` sets the U-Net depth (one encoder level each, each level halves the size).
    ``flip_average``: the residual is the mean of the network's residual for C and for C's mirror
    image (mirrored back), which keeps the part of the change that other recognisers also read.
    ``sharpen``: unsharp-mask amount applied to the residual (``r + sharpen * (r - blur(r))``, a
    Gaussian of ``sharpen_sigma`` pixels of the model's frame); 0 leaves the network's change as is.
    ``chroma``: scale of the change's colour part (its difference from the per-pixel mean over R, G, B),
    after sharpening; 1 leaves it, 0 makes the change grey (brightness only).
    ``adaptive_strength``: γ of the per-face strength: each face's change is scaled by ``exp(γ z)``,
    z in [-3, 3] the strength head's standardised reading of how hard the face is to de-identify
    (``training/fit_strength_head.py``); 0: one strength for every face, and no head.
    """

    image_size: int = 256
    feature_dim: int = 512
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 4, 8, 8)
    res_blocks: int = 1
    groups: int = 8
    frame: str = "arcface112@0.6875+(0.15625,0.1875)"
    recogniser: str = ""
    default_strength: float = 1.0
    flip_average: bool = False
    sharpen: float = 0.0
    sharpen_sigma: float = 1.0
    chroma: float = 1.0
    adaptive_strength: float = 0.0
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        ints = ("image_size", "feature_dim", "base_channels", "res_blocks", "groups", "version")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        mults = self.channel_mults
        if not isinstance(mults, tuple) or not mults or not all(isinstance(m, int) and m > 0 for m in mults):
            raise ConfigError(f"channel_mults must be a non-empty tuple of positive integers, got {mults!r}")
        if not 16 <= self.image_size <= 2048:
            raise ConfigError(f"image_size must be in [16, 2048], got {self.image_size}")
        if self.image_size % (2 ** len(mults)) != 0:
            raise ConfigError(f"image_size {self.image_size} must be divisible by 2**{len(mults)} (U-Net depth)")
        if not 1 <= self.base_channels <= 512 or self.res_blocks < 0 or self.groups < 1:
            raise ConfigError("base_channels must be in [1, 512], res_blocks >= 0, groups >= 1")
        for m in mults:
            if (self.base_channels * m) % self.groups:
                raise ConfigError(f"channels {self.base_channels * m} not divisible by groups={self.groups}")
        if self.version > FORMAT_VERSION:
            raise ConfigError(f"config version {self.version} is newer than this featdeid ({FORMAT_VERSION})")
        for name in ("frame", "recogniser"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not self.frame.startswith("arcface112@"):
            raise ConfigError(f"unknown face frame {self.frame!r}; this featdeid knows 'arcface112@...'")
        if not isinstance(self.flip_average, bool):
            raise ConfigError(f"flip_average must be true or false, got {self.flip_average!r}")
        for name, lo, hi in (("sharpen", 0.0, 8.0), ("sharpen_sigma", 0.25, 8.0), ("chroma", 0.0, 4.0),
                             ("adaptive_strength", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ConfigError(f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}")
        strength = self.default_strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 4:
            raise ConfigError(f"default_strength must be a number in [0, 4], got {self.default_strength!r}")
        tiling_shape(self.feature_dim, self.image_size)

    def reshapings(self) -> dict[str, Any]:
        """The fields of :data:`RESHAPING_FIELDS` and their values."""
        return {f: getattr(self, f) for f in RESHAPING_FIELDS}

    def fits_weights_of(self, other: ModelConfig) -> bool:
        """Whether the U-Net weights trained under ``other`` load into this config: all fields equal but
        the reshapings, ``recogniser``, ``default_strength`` and ``adaptive_strength`` (its head is fitted
        after training)."""
        own = {**self.reshapings(), "recogniser": self.recogniser, "default_strength": self.default_strength,
               "adaptive_strength": self.adaptive_strength}
        return dataclasses.replace(other, **own) == self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        return {"model_type": "featdeid-hiding-network", **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError("config must be a JSON object")
        data = dict(data)
        kind = data.pop("model_type", "featdeid-hiding-network")
        if kind != "featdeid-hiding-network":
            raise ConfigError(f"not a featdeid model config (model_type={kind!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        if "channel_mults" in data:
            if not isinstance(data["channel_mults"], (list, tuple)):
                raise ConfigError("channel_mults must be a list of integers")
            data["channel_mults"] = tuple(data["channel_mults"])
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from e
        return cls.from_dict(data)


PAPER = ModelConfig()
SMALL_CPU = ModelConfig(image_size=128, base_channels=16, channel_mults=(1, 2, 4, 8), groups=8)

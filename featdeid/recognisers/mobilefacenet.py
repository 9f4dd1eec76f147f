"""MobileFaceNet (Chen et al., 2018) in the layout of the ``Xiaoccer/MobileFaceNet_Pytorch`` checkpoints.

Input is the 112 x 96 SphereFace crop (ArcFace-112 box ``(8, 0, 104, 112)``), RGB,
``(255 x - 127.5) / 128``; output 128-d. The checkpoint is read with ``torch.load(weights_only=True)``
(torch's restricted unpickler: tensors and plain containers only) and loaded with ``strict=True``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelNotFoundError, UnsafeWeightsError
from .base import SPHEREFACE_BOX, TorchRecogniser

# (expansion t, output channels c, repeats n, first stride s)
BOTTLENECK_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)


class ConvBlock(nn.Module):
    """Bias-free conv + BatchNorm (+ PReLU unless ``linear``)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        k: int | tuple[int, int],
        s: int = 1,
        p: int = 0,
        groups: int = 1,
        linear: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.prelu = None if linear else nn.PReLU(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return x if self.prelu is None else self.prelu(x)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise (stride ``s``), 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.PReLU(hidden),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.PReLU(hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileFaceNet(nn.Module):
    """The network: ``(B, 3, 112, 96)`` normalised RGB -> ``(B, embedding)`` raw features."""

    def __init__(self, embedding: int = 128) -> None:
        super().__init__()
        self.conv1 = ConvBlock(3, 64, 3, 2, 1)
        self.dw_conv1 = ConvBlock(64, 64, 3, 1, 1, groups=64)
        blocks: list[nn.Module] = []
        cin = 64
        for t, c, n, s in BOTTLENECK_SETTINGS:
            for i in range(n):
                blocks.append(Bottleneck(cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.conv2 = ConvBlock(cin, 512, 1)
        self.linear7 = ConvBlock(512, 512, (7, 6), groups=512, linear=True)
        self.linear1 = ConvBlock(512, embedding, 1, linear=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.blocks(self.dw_conv1(self.conv1(x))))
        return self.linear1(self.linear7(x)).flatten(1)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict of a repo checkpoint (``{'epoch', 'net_state_dict'}``) or of a bare state dict.

    Uses ``torch.load(weights_only=True)``; anything needing arbitrary unpickling is refused with
    :class:`UnsafeWeightsError`.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"MobileFaceNet checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise UnsafeWeightsError(f"{path} is not a plain tensor checkpoint (weights_only load failed): {e}") from e
    state = ckpt.get("net_state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} holds no MobileFaceNet state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


class MobileFaceNetRecogniser(TorchRecogniser):
    """MobileFaceNet as a frozen, differentiable recogniser.

    Args:
        path: the checkpoint (e.g. the repo's ``068.ckpt``).
        flip: also embed the horizontally flipped crop and concatenate the two raw features before
            L2 normalisation (the repo's LFW evaluation convention): ``dim`` 256. Default on, as
            for evaluation; ``flip=False`` gives the plain 128-d feature.

    ``embed(frames)``: ``(B, 3, S, S)`` in ``[0, 1]`` -> ``(B, dim)`` unit vectors.
    """

    box112 = SPHEREFACE_BOX
    input_hw = (112, 96)
    mean = 127.5
    std = 128.0

    def __init__(self, path: str | os.PathLike[str], flip: bool = True) -> None:
        super().__init__()
        state = load_checkpoint(path)
        embedding = state["linear1.conv.weight"].shape[0] if "linear1.conv.weight" in state else 128
        self.net = MobileFaceNet(embedding)
        try:
            self.net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ConfigError(f"{path} does not match the MobileFaceNet layout: {e}") from e
        self.flip = bool(flip)
        self.dim = embedding * (2 if self.flip else 1)
        self.name = "mobilefacenet" + ("+flip" if self.flip else "")
        self.freeze()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features ``(B, dim)`` of a normalised crop ``(B, 3, 112, 96)``."""
        if not self.flip:
            return self.net(x)
        both = self.net(torch.cat([x, x.flip(-1)]))
        return torch.cat(both.chunk(2), dim=1)

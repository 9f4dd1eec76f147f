"""The recogniser protocol and the shared torch base class.

A recogniser maps canonical frames ``(B, 3, S, S)`` (float RGB in ``[0, 1]``, any S) to
L2-normalised embeddings ``(B, dim)``. Each one names its input window as a box in ArcFace-112
pixel coordinates plus an input size and a normalisation, and reads that window with
:func:`featdeid.faces.frame.crop_window`, so every recogniser sees the same alignment.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidImageError
from ..faces.frame import crop_window

ARCFACE_BOX: tuple[float, float, float, float] = (0.0, 0.0, 112.0, 112.0)
SPHEREFACE_BOX: tuple[float, float, float, float] = (8.0, 0.0, 104.0, 112.0)


@runtime_checkable
class Recogniser(Protocol):
    """Anything with ``name``, ``dim``, ``differentiable`` and ``embed(frames) -> (B, dim)``."""

    name: str
    dim: int
    differentiable: bool

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """Embed canonical frames ``(B, 3, S, S)`` in ``[0, 1]`` as unit vectors ``(B, dim)``."""
        ...


def check_frames(frames: torch.Tensor) -> None:
    """Raise :class:`InvalidImageError` unless ``frames`` is a float ``(B, 3, S, S)`` tensor."""
    if not isinstance(frames, torch.Tensor):
        raise InvalidImageError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
    if frames.dim() != 4 or frames.shape[1] != 3 or frames.shape[2] != frames.shape[3] or frames.shape[0] == 0:
        raise InvalidImageError(f"frames must be (B, 3, S, S) with B >= 1, got {tuple(frames.shape)}")
    if not frames.is_floating_point():
        raise InvalidImageError(f"frames must be float in [0, 1], got {frames.dtype}")


class TorchRecogniser(nn.Module):
    """Base of the torch-backed recognisers: frozen, eval mode, differentiable w.r.t. the frames.

    Subclasses set ``name``, ``dim``, ``box112``, ``input_hw``, ``mean`` and ``std`` (network input
    is ``(255 x - mean) / std``) and implement :meth:`features` on the normalised crop.
    """

    name: str = "torch"
    dim: int = 0
    differentiable: bool = True
    box112: tuple[float, float, float, float] = ARCFACE_BOX
    input_hw: tuple[int, int] = (112, 112)
    mean: float = 127.5
    std: float = 128.0

    def freeze(self) -> TorchRecogniser:
        """Stop parameter gradients, flush subnormal weights to zero, switch to eval mode; returns ``self``.

        Exported graphs with folded BatchNorm can hold subnormal floats (|w| < 1.2e-38), which make
        CPU convolutions several times slower; zeroing them changes no output measurably.
        """
        with torch.no_grad():
            for t in [*self.parameters(), *self.buffers()]:
                if t.is_floating_point():
                    t.masked_fill_(t.abs() < torch.finfo(t.dtype).tiny, 0.0)
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> TorchRecogniser:
        """Recognisers stay in eval mode (BatchNorm statistics are frozen); ``mode`` is ignored."""
        return super().train(False)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """Crop the input window and normalise: ``(B, 3, S, S)`` -> ``(B, 3, h, w)``."""
        check_frames(frames)
        crop = crop_window(frames.float(), self.box112, self.input_hw)
        return (crop * 255.0 - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) features ``(B, dim)`` of a preprocessed crop ``(B, 3, h, w)``."""
        raise NotImplementedError

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """Unit embeddings ``(B, dim)`` of canonical frames ``(B, 3, S, S)`` in ``[0, 1]``."""
        return F.normalize(self.features(self.preprocess(frames)).flatten(1), dim=1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`embed`."""
        return self.embed(frames)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, box112={self.box112}, input_hw={self.input_hw}"

"""CenterFace: an anchor-free CNN face detector with 5 landmarks, in plain torch (the default detector).

The network is CenterFace (Xu et al., 2019, arXiv:1911.03599; MIT): a MobileNetV2 backbone, an
upsampling neck to stride 4, and four heads (face-centre heatmap, box scale, centre offset,
landmarks). Its weights ship in the package (``weights/centerface.safetensors``, origin and licence in
``weights/SOURCE.md``), so detection needs no network and nothing beyond torch.

Input is RGB in [0, 255] (no normalisation), any size: the image is zero-padded to a multiple of 32.
On CPUs with native bfloat16 (AVX-512 BF16 / AMX) the network runs under bfloat16 autocast, about
twice as fast; the decoded boxes and scores are computed in float32.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision

from ..errors import UnsafeWeightsError
from .detect import Face, order_landmarks

WEIGHTS = Path(__file__).with_name("weights") / "centerface.safetensors"

# MobileNetV2 inverted residual settings (expansion t, channels c, repeats n, first stride s)
_MBV2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
_TAPS = (3, 6, 13, 17)  # block indices whose outputs feed the neck: strides 4, 8, 16, 32


def _conv(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = cin * t
        layers = [] if t == 1 else [_conv(cin, hidden)]
        layers += [_conv(hidden, hidden, 3, stride, groups=hidden), _conv(hidden, cout, relu=False)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class _Up(nn.Module):
    """2x transposed convolution + batch norm + ReLU, plus a 1x1 lateral branch from the backbone."""

    def __init__(self, lateral: int, width: int = 24) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(width, width, 2, 2, bias=False)
        self.bn = nn.BatchNorm2d(width, eps=1e-3)
        self.lateral = _conv(lateral, width)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.up(x))) + self.lateral(skip)


class CenterFaceNet(nn.Module):
    """``(B, 3, H, W)`` RGB [0, 255], H and W multiples of 32 -> heatmap, scale, offset, landmarks at stride 4."""

    def __init__(self) -> None:
        super().__init__()
        blocks: list[nn.Module] = [_conv(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in _MBV2:
            for i in range(n):
                blocks.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.backbone = nn.ModuleList(blocks)
        self.top = _conv(320, 24)
        self.ups = nn.ModuleList([_Up(96), _Up(32), _Up(24)])
        self.head = _conv(24, 24, 3)
        self.heatmap = nn.Conv2d(24, 1, 1)
        self.scale = nn.Conv2d(24, 2, 1)
        self.offset = nn.Conv2d(24, 2, 1)
        self.landmarks = nn.Conv2d(24, 10, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        taps = []
        for i, block in enumerate(self.backbone):
            x = block(x)
            if i in _TAPS:
                taps.append(x)
        y = self.top(taps[3])
        for up, skip in zip(self.ups, (taps[2], taps[1], taps[0])):
            y = up(y, skip)
        y = self.head(y)
        return torch.sigmoid(self.heatmap(y)), self.scale(y), self.offset(y), self.landmarks(y)


def load_network(path: str | Path = WEIGHTS) -> CenterFaceNet:
    """The CenterFace network with its packaged (or given) safetensors weights, in eval mode, float32."""
    from ..weights import load_safetensors

    state = load_safetensors(path)
    net = CenterFaceNet()
    try:
        net.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise UnsafeWeightsError(f"{path} does not hold CenterFace weights: {str(e).splitlines()[0]}") from None
    return net.eval()


def decode(
    heatmap: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, landmarks: torch.Tensor, threshold: float, nms: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's network outputs (``(C, h, w)`` each) -> boxes ``(N, 4)``, landmarks ``(N, 5, 2)``, scores ``(N,)``."""
    ys, xs = torch.nonzero(heatmap[0] > threshold, as_tuple=True)
    score = heatmap[0, ys, xs]
    h = torch.exp(scale[0, ys, xs]) * 4
    w = torch.exp(scale[1, ys, xs]) * 4
    cx = (xs + offset[1, ys, xs] + 0.5) * 4
    cy = (ys + offset[0, ys, xs] + 0.5) * 4
    x0, y0 = cx - w / 2, cy - h / 2
    boxes = torch.stack([x0, y0, x0 + w, y0 + h], 1)
    lm = landmarks[:, ys, xs].T.reshape(-1, 5, 2)  # (dy, dx) pairs relative to the box, in box units
    pts = torch.stack([x0[:, None] + lm[..., 1] * w[:, None], y0[:, None] + lm[..., 0] * h[:, None]], -1)
    keep = torchvision.ops.nms(boxes, score, nms)
    return boxes[keep].numpy().astype(np.float64), pts[keep].numpy().astype(np.float64), score[keep].numpy().astype(np.float64)


def _native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (then autocast is faster, not slower)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class CenterFaceDetector:
    """CenterFace on one image: ``detect(rgb) -> [Face]`` (boxes, 5 landmarks, scores), packaged weights.

    Args:
        threshold: heatmap score above which a face is kept; low by default (recall first: a spurious
            patch on a non-face costs little, a missed face leaves a person recognisable). The default
            and :attr:`thorough_threshold` are the lowest with at most 0.1 false positives per photo on
            the validation mosaics of ``featdeid bench detect --set validation``.
        nms: IoU above which the lower-scoring of two boxes is dropped.
        weights: a safetensors file to use instead of the packaged one.
    """

    name = "centerface"
    confident = 0.5  # scores below this are flagged as low-confidence in reports
    thorough_threshold = 0.2  # thorough mode's extra passes find more spurious patches: a higher bar
    refine_landmarks = True  # the search replaces its landmarks by MTCNN ONet's (see faces.passes)
    version = "2"  # what the search returns (weights, thresholds, ONet verification and landmarks): keys caches

    def __init__(self, threshold: float = 0.1, nms: float = 0.3, weights: str | Path = WEIGHTS) -> None:
        self.threshold = float(threshold)
        self.nms = float(nms)
        self.net = load_network(weights).to(memory_format=torch.channels_last)
        self.bf16 = _native_bf16()
        self._lock = threading.Lock()

    def raw(self, rgb: np.ndarray, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes, landmarks and scores on an ``(H, W, 3)`` uint8 array, before any face ordering."""
        h, w = rgb.shape[:2]
        ph, pw = -h % 32, -w % 32
        x = torch.from_numpy(np.array(rgb, dtype=np.uint8, copy=True)).permute(2, 0, 1).float()[None]
        x = torch.nn.functional.pad(x, (0, pw, 0, ph)).contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with self._lock, torch.inference_mode(), autocast:
            out = [o[0].float().contiguous() for o in self.net(x)]
        return decode(*out, self.threshold if threshold is None else threshold, self.nms)

    def detect(self, rgb: np.ndarray) -> list[Face]:
        boxes, pts, scores = self.raw(rgb)
        return [Face(b, order_landmarks(p), float(s)) for b, p, s in zip(boxes, pts, scores)]

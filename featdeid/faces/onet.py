"""MTCNN's ONet (the landmark stage of MTCNN, Zhang et al. 2016) in plain torch: 5 landmarks per face box.

An independent landmark reference for benchmarks, not part of the de-identification path. The weights
are facenet-pytorch 2.6.0's ``onet.pt`` (MIT), converted by ``tools/convert_onet.py`` to float16
safetensors (``weights/mtcnn_onet.safetensors``, origin and licence in ``weights/SOURCE.md``).
Preprocessing and decoding follow facenet-pytorch's ``detect_face`` third stage, except that a box
reaching outside the image is zero-padded (as in the original MTCNN), not clipped and stretched.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, InvalidImageError, UnsafeWeightsError
from .detect import order_landmarks

WEIGHTS = Path(__file__).with_name("weights") / "mtcnn_onet.safetensors"
SIZE = 48  # ONet's input side
MAX_SIDE_RATIO = 4.0  # a squared box may be at most this many times the image's longer side


class ONet(nn.Module):
    """``(B, 3, 48, 48)`` normalised RGB -> box regression ``(B, 4)``, landmarks ``(B, 10)``, face probability ``(B, 2)``.

    Layer for layer facenet-pytorch's ``ONet`` (same state-dict keys), including the ``(0, 3, 2, 1)``
    permute before ``dense5`` that makes the flattening match the original Caffe weights.
    Landmarks are 5 x coordinates then 5 y coordinates, as fractions of the squared box.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


def load_onet(path: str | Path = WEIGHTS) -> ONet:
    """ONet with the packaged (or given) safetensors weights, in eval mode, float32."""
    from ..weights import load_safetensors

    state, net = load_safetensors(path), ONet()
    ref = net.state_dict()
    bad = sorted(set(ref) ^ set(state)) or [k for k in ref if state[k].shape != ref[k].shape]
    if bad:
        raise UnsafeWeightsError(f"{path} does not hold MTCNN ONet weights: missing, unexpected or misshapen {bad[:4]}")
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.eval()


_NET: ONet | None = None
_LOCK = threading.Lock()


def _default_net() -> ONet:
    global _NET
    with _LOCK:
        if _NET is None:
            _NET = load_onet()
        return _NET


def rerec(boxes: np.ndarray) -> np.ndarray:
    """MTCNN's squaring: a square of side ``max(w, h)`` on the box's centre (``w = x1 - x0``, no +1)."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    x0, y0 = boxes[:, 0] + w * 0.5 - side * 0.5, boxes[:, 1] + h * 0.5 - side * 0.5
    return np.stack([x0, y0, x0 + side, y0 + side], 1)


def _crops(img: torch.Tensor, squares: np.ndarray) -> torch.Tensor:
    """48x48 area-resampled crops of ``(3, H, W)`` float [0, 255] pixels, zero outside the image.

    The crop covers 0-based pixels ``floor(x0) - 1 .. floor(x1) - 1``: facenet-pytorch's ``pad`` (which
    truncates, the same inside the image), unclipped and translation-consistent beyond the left/top edges.
    """
    (_, h, w), out = img.shape, []
    for x0, y0, x1, y1 in np.floor(squares).astype(np.int64) - [1, 1, 0, 0]:
        crop = img.new_zeros((3, y1 - y0, x1 - x0))
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if ix1 > ix0 and iy1 > iy0:
            crop[:, iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = img[:, iy0:iy1, ix0:ix1]
        out.append(F.interpolate(crop[None], size=(SIZE, SIZE), mode="area"))
    return torch.cat(out)


def _forward(rgb: np.ndarray, squares: np.ndarray, net: ONet | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONet's outputs for the squared boxes of an ``(H, W, 3)`` uint8 array."""
    net = _default_net() if net is None else net
    param = next(net.parameters())
    img = torch.tensor(rgb).permute(2, 0, 1).float()
    with torch.inference_mode():
        x = (_crops(img, squares) - 127.5) * 0.0078125
        return net(x.to(param.device, param.dtype))


def onet_face_probability(rgb: np.ndarray, boxes: np.ndarray, net: ONet | None = None) -> np.ndarray:
    """ONet's probability that each box of an ``(H, W, 3)`` uint8 RGB array holds an upright face, ``(N,)``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros(0)
    return _forward(rgb, rerec(boxes), net)[2][:, 1].double().cpu().numpy()


def onet_landmarks(rgb: np.ndarray, boxes: np.ndarray, net: ONet | None = None) -> np.ndarray:
    """ONet's 5 landmarks for each face box of an ``(H, W, 3)`` uint8 RGB array.

    Args:
        rgb: the image.
        boxes: ``(N, 4)`` boxes ``x0, y0, x1, y1`` in pixels (any detector's).
        net: an ONet to use instead of the packaged one (built once, cached).

    Returns:
        ``(N, 5, 2)`` float64 landmarks in image pixels: eye, eye, nose tip, mouth corner, mouth corner,
        eyes and mouth corners in image left-to-right order.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidImageError(f"onet_landmarks needs an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.isfinite(boxes).all():
        raise ConfigError(f"boxes must be a finite (N, 4) array of x0, y0, x1, y1, got shape {boxes.shape}")
    if len(boxes) == 0:
        return np.zeros((0, 5, 2))
    if ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
        raise ConfigError("every box needs x1 > x0 and y1 > y0")
    squares = rerec(boxes)
    if (squares[:, 2] - squares[:, 0]).max() > MAX_SIDE_RATIO * max(rgb.shape[:2]):
        raise ConfigError(f"a box is more than {MAX_SIDE_RATIO:g} times the image's size")
    lm = _forward(rgb, squares, net)[1].double().cpu().numpy()
    side = squares[:, 2:] - squares[:, :2] + 1  # facenet-pytorch's w_i, h_i
    xs = side[:, :1] * lm[:, :5] + squares[:, :1] - 1
    ys = side[:, 1:] * lm[:, 5:] + squares[:, 1:2] - 1
    return np.stack([order_landmarks(p) for p in np.stack([xs, ys], -1)])

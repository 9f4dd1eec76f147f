"""Faces of a photo as canonical frames: the one place that detects and aligns for every consumer."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import images
from . import frame
from .detect import Detector, Face, detect_faces, faces_from_user

def as_uint8(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 copy of a uint8 / uint16 / float [0, 1] array (for detectors)."""
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    if rgb.dtype == np.uint16:
        return np.ascontiguousarray((rgb >> 8).astype(np.uint8))
    return np.ascontiguousarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def extract_faces(rgb: np.ndarray, faces: list[Face], size: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Aligned frames of ``faces`` from an ``(H, W, 3)`` array.

    Returns:
        frames ``(N, 3, size, size)`` float in [0, 1] and the image -> frame matrices.
    """
    peak = images.peak(rgb.dtype)
    mats, frames = [], []
    for f in faces:
        m = frame.alignment_matrix(f.landmarks, size)
        mats.append(m)
        box = frame.frame_bbox(m, size, rgb.shape[:2])
        if box is None:
            frames.append(torch.zeros(1, 3, size, size))
            continue
        x0, y0, x1, y1 = box
        region = torch.from_numpy(np.ascontiguousarray(rgb[y0:y1, x0:x1]).astype(np.float32) / peak).permute(2, 0, 1)
        frames.append(frame.extract(region, frame.shift(m, x0, y0), size))
    if not frames:
        return torch.zeros(0, 3, size, size), []
    return torch.cat(frames), mats


def find_faces(rgb: np.ndarray, detector: str | Detector = "auto", faces: Any = None, max_side: int = 1280, thorough: bool = False) -> list[Face]:
    """Detected faces, or the user's faces normalised (then no detector runs; boxes without landmarks
    get them from ``detector``)."""
    rgb8 = as_uint8(rgb)
    return detect_faces(rgb8, detector, max_side, thorough) if faces is None else faces_from_user(faces, rgb8, detector)


def align(image: Any, size: int = 256, detector: str | Detector = "auto", faces: Any = None, largest: bool = False) -> tuple[torch.Tensor, list[Face]]:
    """Every face of ``image`` (PIL, array or path) as canonical frames ``(N, 3, size, size)``.

    With ``largest=True`` only the largest face is returned.
    """
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = images.open_image(image)
    work = images.from_array(image) if isinstance(image, np.ndarray) else images.from_pil(image)
    found = find_faces(work.rgb, detector, faces)
    if largest and found:
        found = [max(found, key=lambda f: f.size)]
    frames, _ = extract_faces(work.rgb, found, size)
    return frames, found

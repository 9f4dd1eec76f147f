"""Paste a de-identified face back: inverse warp of the change D - C under a feathered mask.

Only pixels where the mask is positive are written, so everything outside the face is
bit-identical to the input.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from .. import images
from . import frame

# Face ellipse in frame units: centre and radii (covers brows to chin, cheek to cheek).
MASK_CENTRE = (0.5, 0.56)
MASK_RADII = (0.31, 0.37)
MASK_FEATHER = 0.25  # fraction of the radius over which the mask falls from 1 to 0


@functools.lru_cache(maxsize=16)
def face_mask(size: int) -> torch.Tensor:
    """Feathered elliptical face mask of the canonical frame, ``(1, 1, size, size)`` in [0, 1]."""
    c = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    y, x = torch.meshgrid(c, c, indexing="ij")
    rho = torch.sqrt(((x - MASK_CENTRE[0]) / MASK_RADII[0]) ** 2 + ((y - MASK_CENTRE[1]) / MASK_RADII[1]) ** 2)
    t = ((1.0 - rho) / MASK_FEATHER).clamp(0, 1)
    return (t * t * (3 - 2 * t)).float()[None, None]


def apply_mask(cover: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``C + mask * (D - C)`` on frames ``(B, 3, S, S)``: what paste-back will produce (differentiable)."""
    return cover + face_mask(cover.shape[-1]).to(cover) * (out - cover)


def _to_image(stack: torch.Tensor, m: np.ndarray, size: int, hw: tuple[int, int]) -> tuple[tuple[int, int, int, int], torch.Tensor] | None:
    """Warp frame-space planes ``(1, C, s, s)`` onto the image box the frame covers.

    The planes are first resized (anti-aliased) to the face's native resolution, so a large face gets
    a smooth change and a small one no aliasing. Returns the box and ``(C, box_h, box_w)``, or None.
    """
    box = frame.frame_bbox(m, size, hw)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    native = int(round(size / frame.frame_scale(m)))
    res_size = min(max(native, 8), 2048)
    if res_size != stack.shape[-1]:
        stack = F.interpolate(stack, size=(res_size, res_size), mode="bilinear", antialias=True, align_corners=False)
    region_to_frame = frame.shift(frame.rescale(m, res_size / size), x0, y0)
    return box, frame.warp(stack, frame.invert_affine(region_to_frame), (y1 - y0, x1 - x0), padding_mode="zeros")[0]


def paste(
    image: np.ndarray,
    residual: torch.Tensor,
    m: np.ndarray,
    size: int,
    scale: float = 1.0,
) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """Add a frame-space change into ``image`` in place.

    Args:
        image: ``(H, W, 3)`` uint8, uint16 or float (range [0, 1]) array, modified in place
            (a view such as ``rgba[..., :3]`` works).
        residual: ``(1, 3, s, s)`` change ``D - C`` at the model's frame size.
        m: image -> frame matrix for a ``size`` frame.
        scale: strength multiplier.
    Returns:
        the image box that was touched and the boolean mask of written pixels in it, or None.
    """
    s = residual.shape[-1]
    found = _to_image(torch.cat([residual.float() * scale, face_mask(s)], dim=1), m, size, image.shape[:2])
    if found is None:
        return None
    box, warped = found
    x0, y0, x1, y1 = box
    delta = warped[:3].permute(1, 2, 0).numpy()
    alpha = warped[3].numpy()
    inside = alpha > 1e-4
    if not inside.any():
        return None
    region = image[y0:y1, x0:x1]
    peak = images.peak(image.dtype)
    changed = np.clip(region.astype(np.float32) / peak + delta * alpha[..., None], 0.0, 1.0)
    if np.issubdtype(image.dtype, np.integer):
        changed = np.round(changed * peak)
    else:
        changed = changed * peak
    region[inside] = changed[inside].astype(image.dtype)
    return box, inside


def face_region(m: np.ndarray, size: int, hw: tuple[int, int]) -> np.ndarray:
    """Boolean ``(H, W)`` image mask of the pixels paste-back writes for a face (same warp as :func:`paste`)."""
    out = np.zeros(hw, dtype=bool)
    found = _to_image(face_mask(size), m, size, hw)
    if found is not None:
        (x0, y0, x1, y1), alpha = found
        out[y0:y1, x0:x1] = alpha[0].numpy() > 1e-4
    return out

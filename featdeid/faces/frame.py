"""The canonical face frame: one 5-point template, similarity alignment and differentiable sub-windows.

The frame is an S x S crop. Its landmark template is the ArcFace 112 x 112 template
(eye centres, nose tip, mouth corners; image left to right) scaled by ``ARCFACE_SCALE`` and
shifted by ``ARCFACE_OFFSET``, both in units of S::

    ArcFace window inside the frame: x in [0.15625, 0.84375] S, y in [0.1875, 0.875] S
    (176 x 176 px at S = 256, leaving 48 px above the ArcFace box for forehead and hair,
    40 px left and right, 32 px below for the chin: the whole face and some hair, like the
    paper's 256 x 256 CelebA / LFW crops).

Every recogniser names its input crop as a box in ArcFace-112 pixel coordinates
(ArcFace itself: ``(0, 0, 112, 112)``; the 112 x 96 SphereFace crop: ``(8, 0, 104, 112)``) and
is fed through :func:`crop_window`, a differentiable ``affine_grid`` / ``grid_sample`` warp, so
training, evaluation and inference share one alignment.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ARCFACE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ARCFACE_SCALE = 0.6875
ARCFACE_OFFSET = (0.15625, 0.1875)


def template(size: int) -> np.ndarray:
    """Canonical landmarks in pixel coordinates of an ``size x size`` frame. Shape ``(5, 2)``."""
    unit = ARCFACE_112 / 112.0 * ARCFACE_SCALE + np.asarray(ARCFACE_OFFSET)
    return unit * size


def arcface_box_in_frame() -> tuple[float, float, float, float]:
    """The ArcFace 112 window ``(x0, y0, x1, y1)`` in units of the frame size."""
    x0, y0 = ARCFACE_OFFSET
    return (x0, y0, x0 + ARCFACE_SCALE, y0 + ARCFACE_SCALE)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama, no reflection) mapping ``src`` points onto ``dst``.

    Args:
        src: ``(N, 2)`` points, N >= 2.
        dst: ``(N, 2)`` points.
    Returns:
        ``(2, 3)`` matrix M with ``dst ~ M @ [x, y, 1]``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need matching (N, 2) point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    if var_s < 1e-12:
        raise ValueError("landmarks are degenerate (all points coincide)")
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1
    rot = u @ sign @ vt
    scale = (sig * np.diag(sign)).sum() / var_s
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a ``(2, 3)`` affine matrix."""
    full = np.vstack([m, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def alignment_matrix(landmarks: np.ndarray, size: int) -> np.ndarray:
    """``(2, 3)`` similarity mapping image pixel coordinates to frame pixel coordinates."""
    return similarity_transform(np.asarray(landmarks, dtype=np.float64), template(size))


def frame_scale(m: np.ndarray) -> float:
    """Scale factor of a similarity matrix (frame pixels per image pixel)."""
    return float(np.sqrt(abs(np.linalg.det(m[:, :2]))))


def _pixel_theta(src_to_dst: np.ndarray, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Theta for ``affine_grid`` (align_corners=False) that samples the source for each dest pixel."""
    dst_to_src = np.vstack([invert_affine(src_to_dst), [0, 0, 1]])
    hs, ws = src_hw
    hd, wd = dst_hw
    # normalised dest -> dest pixel (pixel centres at integer + 0.5 convention handled by -0.5)
    n2p_d = np.array([[wd / 2, 0, wd / 2 - 0.5], [0, hd / 2, hd / 2 - 0.5], [0, 0, 1]])
    p2n_s = np.linalg.inv(np.array([[ws / 2, 0, ws / 2 - 0.5], [0, hs / 2, hs / 2 - 0.5], [0, 0, 1]]))
    theta = p2n_s @ dst_to_src @ n2p_d
    return torch.from_numpy(theta[:2]).float()


def warp(
    image: torch.Tensor,
    src_to_dst: np.ndarray,
    out_hw: tuple[int, int],
    mode: str = "bilinear",
    padding_mode: str = "border",
) -> torch.Tensor:
    """Warp ``image`` ``(C, H, W)`` or ``(1, C, H, W)`` with a pixel-coordinate affine.

    Returns ``(1, C, out_h, out_w)`` float, differentiable with respect to ``image``.
    """
    if image.dim() == 3:
        image = image.unsqueeze(0)
    theta = _pixel_theta(src_to_dst, image.shape[-2:], out_hw).to(image.device, image.dtype)
    grid = F.affine_grid(theta.unsqueeze(0), [1, image.shape[1], *out_hw], align_corners=False)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


def crop_window(
    frames: torch.Tensor,
    box112: tuple[float, float, float, float],
    out_hw: tuple[int, int],
    mode: str = "bilinear",
) -> torch.Tensor:
    """Differentiably crop a recogniser window from canonical frames.

    Args:
        frames: ``(B, C, S, S)`` canonical frames.
        box112: the window ``(x0, y0, x1, y1)`` in ArcFace-112 pixel coordinates.
        out_hw: recogniser input size ``(h, w)``.
    Returns:
        ``(B, C, h, w)``.
    """
    b, c = frames.shape[:2]
    x0, y0, x1, y1 = (np.asarray(box112, dtype=np.float64) / 112.0 * ARCFACE_SCALE)
    x0, x1 = x0 + ARCFACE_OFFSET[0], x1 + ARCFACE_OFFSET[0]
    y0, y1 = y0 + ARCFACE_OFFSET[1], y1 + ARCFACE_OFFSET[1]
    # box in frame units [0, 1] -> normalised [-1, 1]
    theta = torch.tensor(
        [[x1 - x0, 0.0, x0 + x1 - 1.0], [0.0, y1 - y0, y0 + y1 - 1.0]],
        dtype=frames.dtype,
        device=frames.device,
    )
    h, w = out_hw
    src_px = (y1 - y0) * frames.shape[-2]
    if src_px > 1.5 * h:  # downsampling: low-pass first so the crop does not alias
        factor = float(h / src_px)
        frames = F.interpolate(frames, scale_factor=factor * 1.5, mode="bilinear", antialias=True, align_corners=False)
    grid = F.affine_grid(theta.expand(b, 2, 3), [b, c, h, w], align_corners=False)
    return F.grid_sample(frames, grid, mode=mode, padding_mode="border", align_corners=False)


def frame_bbox(m: np.ndarray, size: int, hw: tuple[int, int], pad: int = 2) -> tuple[int, int, int, int] | None:
    """Integer image box ``(x0, y0, x1, y1)`` covering the frame ``m`` maps to, clipped; None if empty."""
    inv = invert_affine(m)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64)
    pts = corners @ inv.T
    x0, y0 = np.floor(pts.min(0)).astype(int) - pad
    x1, y1 = np.ceil(pts.max(0)).astype(int) + pad
    h, w = hw
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        return None
    return int(x0), int(y0), int(x1), int(y1)


def shift(m: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """The same mapping for an image cropped at ``(dx, dy)``."""
    out = m.copy()
    out[:, 2] += m[:, :2] @ np.array([dx, dy], dtype=np.float64)
    return out


def rescale(m: np.ndarray, factor: float) -> np.ndarray:
    """The same mapping into a frame ``factor`` times larger."""
    return m * factor


def extract(region: torch.Tensor, m: np.ndarray, size: int, out_size: int | None = None) -> torch.Tensor:
    """Align a face into the canonical frame with anti-aliasing.

    Args:
        region: ``(3, h, w)`` float image (or crop of it) the matrix ``m`` refers to.
        m: image -> frame matrix for a ``size`` frame.
        out_size: frame size to return (default ``size``).
    Returns:
        ``(1, 3, out, out)``. Large faces are warped at their native resolution, then resized down.
    """
    out_size = out_size or size
    native = int(round(size / frame_scale(m)))
    work = min(max(native, out_size), 4 * out_size)
    face = warp(region, rescale(m, work / size), (work, work))
    if work != out_size:
        face = F.interpolate(face, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
    return face

"""A crowd for tests: one face of a photo tiled into a grid, with the landmarks of every copy."""

from __future__ import annotations

import numpy as np


def face_mosaic(arr: np.ndarray, face, n_faces: int, cols: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """``n_faces`` copies of ``face`` (a detected :class:`Face` of ``arr``) in rows of ``cols`` tiles.

    Returns the mosaic ``(H, W, 3)``, the landmarks of the copies ``(n_faces, 5, 2)`` and the tile
    size ``(th, tw)``: copy ``i`` sits in tile row ``i // cols``, column ``i % cols``.
    """
    x0, y0, x1, y1 = (int(v) for v in face.box)
    pad = (x1 - x0) // 2
    cx, cy = max(0, x0 - pad), max(0, y0 - pad)
    tile = arr[cy : y1 + pad, cx : x1 + pad]
    th, tw = tile.shape[:2]
    rows = -(-n_faces // cols)
    mosaic = np.ascontiguousarray(np.tile(tile, (rows, cols, 1)))
    lms = np.stack([face.landmarks - [cx, cy] + [c * tw, r * th] for r in range(rows) for c in range(cols)])[:n_faces]
    return mosaic, lms, (th, tw)

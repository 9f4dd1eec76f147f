"""insightface SCRFD (``FaceAnalysis`` detection module; optional backend, models fetched by insightface)."""

from __future__ import annotations

import os
import threading

import numpy as np

from ..errors import BackendUnavailableError
from .detect import Face, order_landmarks


def models_present(model: str = "buffalo_l") -> bool:
    """Whether insightface's model pack is already on disk (so no download is needed)."""
    root = os.path.expanduser(os.environ.get("INSIGHTFACE_HOME", "~/.insightface"))
    return os.path.isdir(os.path.join(root, "models", model))


class InsightFaceDetector:
    """SCRFD through ``insightface.app.FaceAnalysis``."""

    name = "insightface"

    def __init__(self, model: str = "buffalo_l", det_size: int = 640) -> None:
        try:
            from insightface.app import FaceAnalysis
        except ImportError as e:
            raise BackendUnavailableError("the insightface detector needs `pip install featdeid[insightface]`") from e
        try:
            self._app = FaceAnalysis(name=model, allowed_modules=["detection"], providers=["CPUExecutionProvider"])
            self._app.prepare(ctx_id=-1, det_size=(det_size, det_size))
        except Exception as e:  # insightface raises plain exceptions when its model download fails
            raise BackendUnavailableError(
                f"insightface could not load or download its detector '{model}' ({type(e).__name__}: {e}); "
                "on an offline machine use detector='centerface'"
            ) from e
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[Face]:
        with self._lock:
            found = self._app.get(np.ascontiguousarray(rgb[..., ::-1]))
        return [Face(np.asarray(f.bbox, np.float64), order_landmarks(f.kps), float(f.det_score)) for f in found]

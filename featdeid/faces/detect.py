"""Face detection: boxes, 5 landmarks (eye centres, nose tip, mouth corners; image left to right), scores.

Backends (``get_detector(name)``), one file each, one protocol (``detect(rgb) -> [Face]``):

- ``"centerface"`` (:mod:`.centerface`): the packaged CNN detector; offline, nothing beyond torch.
- ``"insightface"`` (:mod:`.scrfd`): SCRFD through insightface (its models are fetched on first use).
- ``"dlib"`` (:mod:`.dlib_hog`): HOG + 68-point landmarks, ``pip install featdeid[dlib]``.
- ``"auto"``: insightface where it is installed and its models are present, else CenterFace.

How a photo is searched (downscale, tiles, test-time passes, NMS) is :mod:`.passes`. User-given
faces (for pipelines that already detect) go through :func:`faces_from_user`.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Protocol, Sequence

import numpy as np

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": [round(float(v), 2) for v in self.box],
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
            "score": round(float(self.score), 4),
        }


def box_area(b: np.ndarray) -> float:
    """Area of a box ``x0, y0, x1, y1`` (0 for an empty one)."""
    return max(float(b[2] - b[0]), 0.0) * max(float(b[3] - b[1]), 0.0)


def box_intersection(a: np.ndarray, b: np.ndarray) -> float:
    """Area shared by two boxes."""
    return max(0.0, float(min(a[2], b[2]) - max(a[0], b[0]))) * max(0.0, float(min(a[3], b[3]) - max(a[1], b[1])))


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boxes (0 when both are empty)."""
    inter = box_intersection(a, b)
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


class Detector(Protocol):
    name: str

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Faces in an ``(H, W, 3)`` uint8 RGB array."""


def order_landmarks(pts: np.ndarray) -> np.ndarray:
    """Put eyes and mouth corners in image left-to-right order."""
    pts = np.asarray(pts, dtype=np.float64).copy()
    if pts[0, 0] > pts[1, 0]:
        pts[[0, 1]] = pts[[1, 0]]
    if pts[3, 0] > pts[4, 0]:
        pts[[3, 4]] = pts[[4, 3]]
    return pts


_NAMES = ("auto", "centerface", "dlib", "insightface")
_CACHE: dict[str, Detector] = {}
_CACHE_LOCK = threading.Lock()


def _make(name: str) -> Detector:
    if name == "centerface":
        from .centerface import CenterFaceDetector

        return CenterFaceDetector()
    if name == "dlib":
        from .dlib_hog import DlibDetector

        return DlibDetector()
    from .scrfd import InsightFaceDetector, models_present

    if name == "auto" and not models_present():
        return _make("centerface")
    return InsightFaceDetector()


def get_detector(name: str | Detector = "auto") -> Detector:
    """A detector by name (cached), or the given detector object unchanged.

    ``"auto"`` is insightface's SCRFD where its models are already on disk, else the packaged
    CenterFace (offline, nothing beyond torch).
    """
    if not isinstance(name, str):
        if not hasattr(name, "detect"):
            raise ConfigError("a detector must be a name or an object with .detect(rgb) -> list[Face]")
        return name
    if name not in _NAMES:
        raise ConfigError(f"unknown detector {name!r}; choose one of {', '.join(_NAMES)}")
    with _CACHE_LOCK:
        if name not in _CACHE:
            try:
                _CACHE[name] = _make(name)
            except BackendUnavailableError:
                if name != "auto":
                    raise
                _CACHE[name] = _make("centerface")
        return _CACHE[name]


def available_detectors() -> list[str]:
    """Detector names usable here: the packaged CenterFace, and the optional backends whose packages are installed."""
    names = ["centerface"]
    for mod, name in (("insightface", "insightface"), ("dlib", "dlib")):
        try:
            __import__(mod)
            names.append(name)
        except ImportError:
            pass
    return names


def detect_faces(
    rgb: np.ndarray, detector: str | Detector = "auto", max_side: int = 1280, thorough: bool = False
) -> list[Face]:
    """Every face of an ``(H, W, 3)`` uint8 array.

    How the photo is searched (downscaled copy, tiles for large photos, ``thorough`` test-time passes,
    NMS, ONet's second opinion and landmarks) is :func:`.passes.search`.

    Returns:
        faces ordered left to right, then top to bottom (a stable order for identity assignment).
    """
    from . import passes

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidImageError(f"detect_faces needs an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    det = get_detector(detector)
    faces = passes.search(det, rgb, max_side, thorough)
    return sorted(faces, key=lambda f: (round(float(f.box[0] + f.box[2]) / 2), float(f.box[1])))


MAX_COORD = 1e7  # pixels; landmarks further out than this are nonsense, not a face off the edge


def _check_landmarks(i: int, lm: np.ndarray) -> None:
    """Refuse landmarks no similarity transform can use (they would fail deep in linear algebra)."""
    if np.abs(lm).max() > MAX_COORD:
        raise ConfigError(f"face {i}: landmark coordinates beyond +-{MAX_COORD:g} px")
    if float(np.ptp(lm, axis=0).max()) < 1e-3:
        raise ConfigError(f"face {i}: the five landmarks coincide (degenerate face)")


def landmarks_in_box(det: Detector, rgb: np.ndarray, box: np.ndarray) -> np.ndarray | None:
    """5 landmarks of the face in ``box``: the detector's own predictor where it has one (dlib), else the
    detection best overlapping ``box`` on a crop around it (None if the detector finds no face there)."""
    if hasattr(det, "landmarks"):
        return det.landmarks(rgb, box)
    from .passes import merge, onet_refined

    h, w = rgb.shape[:2]
    pad = 0.5 * max(box[2] - box[0], box[3] - box[1])
    x0, y0 = int(max(0, box[0] - pad)), int(max(0, box[1] - pad))
    x1, y1 = int(min(w, box[2] + pad)), int(min(h, box[3] + pad))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    off = np.array([x0, y0], dtype=np.float64)
    best, best_iou = None, 0.1
    for f in merge(det.detect(np.ascontiguousarray(rgb[y0:y1, x0:x1]))):
        b = f.box + np.tile(off, 2)
        iou = box_iou(b, box)
        if iou > best_iou:
            best, best_iou = Face(b, f.landmarks + off, f.score), iou
    if best is not None and getattr(det, "refine_landmarks", False):
        best = onet_refined(rgb, best)
    return None if best is None else best.landmarks


def faces_from_user(faces: Any, rgb: np.ndarray | None = None, landmarker: str | Detector = "auto") -> list[Face]:
    """Normalise user-given faces.

    Accepts a list of :class:`Face`, an ``(N, 5, 2)`` landmark array, or a list of dicts with
    ``landmarks`` (``(5, 2)``) and/or ``box`` (``(4,)`` x0, y0, x1, y1). Boxes without landmarks get
    landmarks from ``landmarker`` on ``rgb`` (:func:`landmarks_in_box`).
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
            lm = order_landmarks(lm)
        if box is not None:
            box = np.asarray(box, dtype=np.float64)
            if box.shape != (4,) or not np.isfinite(box).all() or box[2] <= box[0] or box[3] <= box[1] or np.abs(box).max() > MAX_COORD:
                raise ConfigError(f"face {i}: box must be (x0, y0, x1, y1) with x1 > x0, y1 > y0")
        if lm is None:
            if rgb is None:
                raise ConfigError(f"face {i}: a box without landmarks needs the image")
            lm = landmarks_in_box(get_detector(landmarker), rgb, box)
            if lm is None:
                raise ConfigError(f"face {i}: no face found in the box {box.round(1).tolist()} to place landmarks; give its landmarks")
        if box is None:
            lo, hi = lm.min(0), lm.max(0)
            pad = 0.6 * (hi - lo).max()
            box = np.array([lo[0] - pad, lo[1] - pad, hi[0] + pad, hi[1] + pad])
        out.append(Face(box, lm, float(f.get("score", 1.0))))
    return out

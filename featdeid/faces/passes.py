"""How a photo is searched for faces: downscaled and tiled passes, test-time passes, merging by NMS,
a second opinion on weak detections, and landmarks re-estimated on upright crops.

Every pass runs the same detector on a transformed copy of the photo and maps its faces back to the
photo's pixel coordinates; :func:`merge` keeps one face per location.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .detect import Detector, Face, box_area, box_intersection

THOROUGH_ANGLES = (-90.0, -45.0, 45.0, 90.0)  # degrees; rotated copies searched in thorough mode
UPSCALE = 2.0  # thorough mode also searches a copy this much larger (tiled), for small faces
TILE_SCALE = 0.6  # photos that must shrink more than this are also searched in tiles at this scale
TILT_REFINE = 20.0  # degrees of roll above which landmarks are re-estimated on an upright crop
VERIFY_MIN_PROB = 0.5  # a detection below its detector's confident level is kept when ONet's face probability reaches this


def merge(faces: list[Face], iou: float = 0.3, contain: float = 0.6) -> list[Face]:
    """Non-maximum suppression: the highest-scoring face wins over any face whose box overlaps it by
    more than ``iou`` (intersection over union) or lies mostly inside it (``contain``: intersection over
    the smaller box), as a face cut by a tile border does."""
    kept: list[Face] = []
    for f in sorted(faces, key=lambda f: -f.score):
        area = box_area(f.box)
        for k in kept:
            inter = box_intersection(f.box, k.box)
            other = box_area(k.box)
            if inter / max(area + other - inter, 1e-9) > iou or inter / max(min(area, other), 1e-9) > contain:
                break
        else:
            kept.append(f)
    return kept


def resized(rgb: np.ndarray, factor: float) -> np.ndarray:
    """``rgb`` scaled by ``factor`` (area-averaging when shrinking, bilinear when enlarging)."""
    h, w = rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0 if factor < 1 else None))


def _mapped(face: Face, m: np.ndarray) -> Face:
    """``face`` under the 2x3 affine ``m`` (a similarity): landmarks mapped, box re-centred with its size
    scaled (not the bounding box of a rotated box, which would inflate it)."""
    lm = face.landmarks @ m[:, :2].T + m[:, 2]
    scale = math.hypot(m[0, 0], m[1, 0])
    c = np.array([(face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2]) @ m[:, :2].T + m[:, 2]
    half = np.array([face.box[2] - face.box[0], face.box[3] - face.box[1]]) * scale / 2
    return Face(np.concatenate([c - half, c + half]), lm, face.score)


def tiled(det: Detector, rgb: np.ndarray, tile: int, overlap: int) -> list[Face]:
    """Faces in overlapping ``tile`` x ``tile`` windows (a face smaller than ``overlap`` lies whole in one)."""
    h, w = rgb.shape[:2]
    step = max(tile - overlap, 1)
    ys = list(range(0, max(h - tile, 0) + 1, step)) or [0]
    xs = list(range(0, max(w - tile, 0) + 1, step)) or [0]
    if ys[-1] + tile < h:
        ys.append(h - tile)
    if xs[-1] + tile < w:
        xs.append(w - tile)
    out = []
    for y in ys:
        for x in xs:
            shift = np.array([[1.0, 0, x], [0, 1.0, y]])
            out += [_mapped(f, shift) for f in det.detect(np.ascontiguousarray(rgb[y : y + tile, x : x + tile]))]
    return out


def scaled_pass(det: Detector, rgb: np.ndarray, factor: float, max_side: int) -> list[Face]:
    """Faces of ``rgb`` resized by ``factor``, tiled when the copy is larger than ``max_side``."""
    work = rgb if factor == 1 else resized(rgb, factor)
    faces = det.detect(work) if max(work.shape[:2]) <= max_side else tiled(det, work, max_side, max_side // 4)
    back = np.array([[1 / factor, 0, 0], [0, 1 / factor, 0]])
    return [_mapped(f, back) for f in faces] if factor != 1 else faces


def mirrored_pass(det: Detector, rgb: np.ndarray) -> list[Face]:
    """Faces of the horizontally mirrored copy (the subject's left and right swapped back)."""
    w = rgb.shape[1]
    out = []
    for f in det.detect(np.ascontiguousarray(rgb[:, ::-1])):
        lm = f.landmarks.copy()
        lm[:, 0] = w - lm[:, 0]
        out.append(Face(np.array([w - f.box[2], f.box[1], w - f.box[0], f.box[3]]), lm[[1, 0, 2, 4, 3]], f.score))
    return out


def rotated(
    rgb: np.ndarray, angle: float, centre: tuple[float, float] | None = None, size: tuple[int, int] | None = None, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """``rgb`` rotated by ``angle`` degrees about ``centre`` onto a canvas of ``size`` (default: the whole
    rotated photo), one canvas pixel per ``scale`` photo pixels; returns the copy and the 2x3 matrix
    from its pixels to ``rgb``'s."""
    h, w = rgb.shape[:2]
    a = math.radians(angle)
    cos, sin = math.cos(a), math.sin(a)
    if size is None:
        size = (int(math.ceil(abs(w * cos) + abs(h * sin))), int(math.ceil(abs(w * sin) + abs(h * cos))))
    cx, cy = centre if centre is not None else (w / 2, h / 2)
    # output pixel p maps to input R(-angle) (p - out_centre) + centre; image y points down
    rot = scale * np.array([[cos, -sin], [sin, cos]])
    out_c = np.array([size[0] / 2, size[1] / 2])
    m = np.hstack([rot, (np.array([cx, cy]) - rot @ out_c)[:, None]])
    img = Image.fromarray(rgb).transform(size, Image.Transform.AFFINE, tuple(m.ravel()), Image.Resampling.BILINEAR, fillcolor=(127, 127, 127))
    return np.asarray(img), m


def rotated_pass(det: Detector, rgb: np.ndarray, angle: float) -> list[Face]:
    """Faces of a rotated copy, mapped back (landmark order kept from the upright copy)."""
    work, m = rotated(rgb, angle)
    return [_mapped(f, m) for f in det.detect(work)]


def roll(face: Face) -> float:
    """In-plane rotation of a face in degrees (angle of the line from its first eye to its second)."""
    d = face.landmarks[1] - face.landmarks[0]
    return math.degrees(math.atan2(d[1], d[0]))


def upright_landmarks(det: Detector, rgb: np.ndarray, face: Face) -> Face:
    """``face`` with landmarks re-estimated on a crop rotated so that the face is upright.

    A detector's landmarks are most accurate on upright faces; the crop is centred on the face, 2.2x
    its size, rotated by the face's roll, and the detection nearest its centre replaces the landmarks.
    """
    size = max(face.size, 8.0) * 2.2
    side = int(round(min(max(size, 96), 512)))
    centre = face.landmarks.mean(0)
    work, m = rotated(rgb, roll(face), (float(centre[0]), float(centre[1])), (side, side), size / side)
    found = det.detect(work)
    if not found:
        return face
    mid = np.array([side / 2, side / 2])
    best = min(found, key=lambda f: float(np.linalg.norm(f.landmarks.mean(0) - mid)))
    if np.linalg.norm(best.landmarks.mean(0) - mid) > 0.25 * face.size:
        return face
    lm = best.landmarks @ m[:, :2].T + m[:, 2]
    return Face(face.box, lm, max(face.score, best.score))


def upright_crop(rgb: np.ndarray, face: Face, side: int = 96) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ``side`` x ``side`` crop, twice the face's size, rotated so that the face is upright; the face's
    box in it; and the 2x3 matrix from its pixels to ``rgb``'s."""
    centre = (face.box[:2] + face.box[2:]) / 2
    work, m = rotated(rgb, roll(face), (float(centre[0]), float(centre[1])), (side, side), 2 * max(face.size, 4.0) / side)
    return work, np.array([[side / 4, side / 4, 3 * side / 4, 3 * side / 4]]), m


def onet_refined(rgb: np.ndarray, face: Face) -> Face:
    """``face`` with the 5 landmarks of MTCNN's ONet, estimated on an upright crop of its box and mapped back."""
    from .onet import onet_landmarks

    work, box, m = upright_crop(rgb, face)
    return Face(face.box, onet_landmarks(work, box)[0] @ m[:, :2].T + m[:, 2], face.score)


def verified(det: Detector, rgb: np.ndarray, faces: list[Face]) -> list[Face]:
    """``faces`` without those scoring below ``det.confident`` that MTCNN's ONet, shown each upright, does
    not take for a face (detectors without a ``confident`` level are trusted as they are)."""
    below = getattr(det, "confident", None)
    if below is None or VERIFY_MIN_PROB <= 0:
        return faces
    from .onet import onet_face_probability

    out = []
    for f in faces:
        if f.score >= below or onet_face_probability(*upright_crop(rgb, f)[:2])[0] >= VERIFY_MIN_PROB:
            out.append(f)
    return out


def search(det: Detector, rgb: np.ndarray, max_side: int, thorough: bool = False) -> list[Face]:
    """All faces of ``rgb``, merged by :func:`merge`.

    A pass over the whole photo downscaled to ``max_side``; when that shrinks it by more than
    :data:`TILE_SCALE` (a 20 px face would fall below the ~12 px the detector sees), also overlapping
    ``max_side`` tiles of the photo at :data:`TILE_SCALE`. ``thorough`` adds mirrored, upscaled (tiled)
    and rotated copies of the downscaled photo. Detections scoring below the detector's ``confident``
    level are kept only if MTCNN's ONet, shown them upright, agrees they are faces; tilted faces are re-detected on an
    upright crop; detectors with ``refine_landmarks`` (CenterFace) take ONet's landmarks.
    """
    h, w = rgb.shape[:2]
    factor = min(1.0, max_side / max(h, w))
    faces = scaled_pass(det, rgb, factor, max_side)
    if factor < TILE_SCALE:
        faces += scaled_pass(det, rgb, TILE_SCALE, max_side)
    tilted: set[int] = set()  # faces found on a rotated copy: their landmarks are re-estimated upright
    if thorough:
        small = rgb if factor == 1 else resized(rgb, factor)
        back = np.array([[1 / factor, 0, 0], [0, 1 / factor, 0]])

        def to_photo(found: list[Face]) -> list[Face]:
            return [_mapped(f, back) for f in found] if factor < 1 else found

        faces += to_photo(mirrored_pass(det, small) + scaled_pass(det, small, UPSCALE, max_side))
        for angle in THOROUGH_ANGLES:
            found = to_photo(rotated_pass(det, small, angle))
            tilted.update(id(f) for f in found)
            faces += found
        bar = getattr(det, "thorough_threshold", None)
        if bar is not None:
            faces = [f for f in faces if f.score >= bar]
    faces = verified(det, rgb, merge(faces))
    faces = [upright_landmarks(det, rgb, f) if id(f) in tilted or abs(roll(f)) > TILT_REFINE else f for f in faces]
    return [onet_refined(rgb, f) for f in faces] if getattr(det, "refine_landmarks", False) else faces

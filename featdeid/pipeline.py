"""The de-identification pipeline: detect -> align -> hide a fake identity -> paste back.

Every front end (``deidentify``, ``transform``, ``DeIdentify``, the CLI, the Space, the
integrations, the evaluation harness) goes through :class:`Deidentifier`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from . import identity as ident
from . import images
from .errors import ConfigError, InvalidImageError
from .faces.align import extract_faces, find_faces
from .faces.detect import Detector, Face, get_detector
from .faces.paste import paste
from .model import HidingNetwork


@dataclasses.dataclass
class FaceResult:
    """What happened to one face; ``low_confidence``: the detector's score is below its confident level
    (the face is still de-identified unless it is below ``min_score``)."""

    face: Face
    status: str  # "changed", "too_small", "below_min_score", "unchanged" (strength 0)
    identity: int = -1  # bank index, -1 for a user-given feature or a skipped face
    low_confidence: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {**self.face.to_dict(), "size": round(self.face.size, 1), "status": self.status, "identity": self.identity,
                "low_confidence": self.low_confidence}


@dataclasses.dataclass
class Report:
    """Per-image report: faces found, changed and skipped."""

    faces: list[FaceResult]
    seed: int

    @property
    def changed(self) -> int:
        return sum(f.status == "changed" for f in self.faces)

    @property
    def skipped(self) -> int:
        """Faces left unchanged because they are too small or below ``min_score``."""
        return sum(f.status in ("too_small", "below_min_score") for f in self.faces)

    @property
    def low_confidence(self) -> int:
        return sum(f.low_confidence for f in self.faces)

    def to_dict(self) -> dict[str, Any]:
        return {"faces": len(self.faces), "changed": self.changed, "skipped": self.skipped, "low_confidence": self.low_confidence,
                "seed": self.seed, "details": [f.to_dict() for f in self.faces]}


class Deidentifier:
    """Reusable de-identifier: holds the model and the detector.

    Args:
        model: a :class:`HidingNetwork` (set to eval mode and channels_last in place), a model folder /
            Hub repo id, or None for the default model.
        detector: ``"auto"`` (insightface's SCRFD where its models are on disk, else the packaged CenterFace),
            ``"centerface"``, ``"dlib"``, ``"insightface"`` or an object with ``.detect(rgb)``.
        min_face_size: faces smaller than this (pixels, larger box side) are skipped and reported.
        min_score: detections scoring below this are left unchanged and reported (default: every
            detection is de-identified; those below the detector's confident level are flagged).
        thorough: search hard photos harder (mirrored, upscaled and rotated passes; several times slower).
        detect_max_side: detection runs on a copy downscaled to this longer side (larger photos are
            also searched in tiles).
        batch_size: faces per network call.
        precision: ``"fp32"`` or ``"bf16"`` (autocast; about 2-3x faster on CPUs with bf16 support,
            changed pixels differ from fp32 by about 2 grey levels on average).
    """

    def __init__(
        self,
        model: HidingNetwork | str | os.PathLike | None = None,
        detector: str | Detector = "auto",
        min_face_size: int = 20,
        detect_max_side: int = 1280,
        batch_size: int = 16,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
        min_score: float | None = None,
        thorough: bool = False,
    ) -> None:
        if not isinstance(model, HidingNetwork):
            from .loading import load

            model = load(model, device=device)
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        if min_face_size < 1 or detect_max_side < 64 or batch_size < 1:
            raise ConfigError("min_face_size >= 1, detect_max_side >= 64 and batch_size >= 1 are required")
        if min_score is not None and not (isinstance(min_score, (int, float)) and np.isfinite(min_score)):
            raise ConfigError(f"min_score must be a number or None, got {min_score!r}")
        self.min_score = None if min_score is None else float(min_score)
        self.thorough = bool(thorough)
        self.model = model.eval().to(device, memory_format=torch.channels_last)
        self.detector = detector
        self.min_face_size = min_face_size
        self.detect_max_side = detect_max_side
        self.batch_size = batch_size
        self.precision = precision
        self.device = torch.device(device)

    @property
    def default_strength(self) -> float:
        return float(self.model.config.default_strength)

    def hide(self, covers: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Batched ``D - C`` for aligned frames ``(B, 3, S, S)`` and features ``(B, D)``."""
        out = []
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16" else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            for i in range(0, len(covers), self.batch_size):
                c = covers[i : i + self.batch_size].to(self.device, memory_format=torch.channels_last)
                e = features[i : i + self.batch_size].to(self.device)
                out.append((self.model(c, e).float() - c.float()).cpu())
        return torch.cat(out) if out else covers.new_zeros((0, *covers.shape[1:]))

    def _status(self, face: Face) -> str:
        if face.size < self.min_face_size:
            return "too_small"
        if self.min_score is not None and face.score < self.min_score:
            return "below_min_score"
        return "changed"

    def _features(self, identity: Any, n: int, seed: int) -> tuple[torch.Tensor, list[int]]:
        bank = self.model.identity_bank
        if identity is None:
            idx = ident.choose(bank.shape[0], n, seed)
            return bank[torch.as_tensor(idx, dtype=torch.long)].float(), [int(i) for i in idx]
        try:
            arr = np.asarray(identity.detach().float().cpu() if isinstance(identity, torch.Tensor) else identity, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"identity must be a feature vector (D,) or (N, D) of numbers: {e}") from None
        dim = self.model.feature_dim
        if arr.ndim > 2:
            raise ConfigError(f"identity must be (D,) or (N, D), got shape {arr.shape}")
        if arr.ndim == 2:
            if arr.shape[0] < n:
                raise ConfigError(f"identity has {arr.shape[0]} features for {n} faces")
            return torch.stack([ident.as_feature(a, dim) for a in arr[:n]]), [-1] * n
        feat = ident.as_feature(arr, dim)
        return feat.expand(n, dim).clone(), [-1] * n

    def process(
        self,
        rgb: np.ndarray,
        strength: float | None = None,
        seed: int | None = None,
        identity: Any = None,
        faces: Any = None,
    ) -> tuple[np.ndarray | None, Report]:
        """De-identify an upright ``(H, W, 3)`` array in place.

        Returns the boolean mask of changed pixels (None if nothing changed) and the report.
        """
        if strength is None:
            strength = self.default_strength
        try:
            strength = float(strength)
        except (TypeError, ValueError):
            raise ConfigError(f"strength must be a finite number >= 0, got {strength!r}") from None
        if not np.isfinite(strength) or strength < 0:
            raise ConfigError(f"strength must be a finite number >= 0, got {strength}")
        if seed is None:
            seed = ident.content_seed(rgb)
        elif not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        seed = int(seed)
        found = find_faces(rgb, self.detector, faces, self.detect_max_side, self.thorough)
        confident = float(getattr(get_detector(self.detector), "confident", 0.5)) if faces is None else -np.inf
        results = [FaceResult(f, self._status(f), low_confidence=f.score < confident) for f in found]
        todo = [r for r in results if r.status == "changed"]
        if not todo:
            return None, Report(results, int(seed))
        s = self.model.image_size
        feats, ids = self._features(identity, len(todo), int(seed))
        for r, i in zip(todo, ids):
            r.identity = i
        if strength == 0:
            for r in todo:
                r.status = "unchanged"
            return None, Report(results, int(seed))
        covers, mats = extract_faces(rgb, [r.face for r in todo], s)
        residuals = self.hide(covers, feats)
        touched = np.zeros(rgb.shape[:2], dtype=bool)
        for r, m, res in zip(todo, mats, residuals):
            done = paste(rgb, res[None], m, s, strength)
            if done is None:
                r.status = "unchanged"
                continue
            (x0, y0, x1, y1), inside = done
            touched[y0:y1, x0:x1] |= inside
        return touched, Report(results, int(seed))

    def __call__(
        self,
        image: Any,
        strength: float | None = None,
        seed: int | None = None,
        identity: Any = None,
        faces: Any = None,
        keep_metadata: bool = False,
        return_report: bool = False,
    ) -> Any:
        """De-identify ``image`` and return the same type (see :func:`featdeid.deidentify`)."""
        kw = dict(strength=strength, seed=seed, identity=identity, faces=faces)
        if isinstance(image, (str, os.PathLike)):
            image = images.open_image(image)
        if isinstance(image, Image.Image):
            work = images.from_pil(image, keep_metadata=keep_metadata)
            touched, report = self.process(work.rgb, **kw)
            out = work.restore(work.rgb, touched)
        elif isinstance(image, np.ndarray):
            work = images.from_array(image)
            touched, report = self.process(work.rgb, **kw)
            out = work.restore(work.rgb, touched)
        elif isinstance(image, torch.Tensor):
            works, restore = images.from_tensor_image(image)
            outs, reports = [], []
            for w in works:
                touched, rep = self.process(w.rgb, **kw)
                outs.append(w.restore(w.rgb, touched))
                reports.append(rep)
            out = restore(outs)
            report = reports if image.dim() == 4 else reports[0]
        else:
            raise InvalidImageError(f"unsupported image type {type(image).__name__}; pass PIL, numpy, torch or a path")
        return (out, report) if return_report else out


_DEFAULTS: dict[tuple, Deidentifier] = {}
_DEFAULTS_LOCK = threading.Lock()


def get_deidentifier(model: Any = None, detector: Any = "auto", **kw: Any) -> Deidentifier:
    """A cached :class:`Deidentifier` for a model and detector (models are loaded once)."""
    if isinstance(model, Deidentifier):
        return model
    key = (id(model) if isinstance(model, HidingNetwork) else str(model), id(detector) if not isinstance(detector, str) else detector, tuple(sorted(kw.items())))
    with _DEFAULTS_LOCK:
        if key not in _DEFAULTS:
            _DEFAULTS[key] = Deidentifier(model, detector=detector, **kw)
        return _DEFAULTS[key]


def deidentify(
    image: Any,
    strength: float | None = None,
    seed: int | None = None,
    *,
    model: Any = None,
    detector: str | Detector = "auto",
    identity: Any = None,
    faces: Sequence[Any] | np.ndarray | None = None,
    keep_metadata: bool = False,
    return_report: bool = False,
    min_face_size: int = 20,
    min_score: float | None = None,
    thorough: bool = False,
) -> Any:
    """De-identify every face in ``image``; returns the same type, size and mode.

    Args:
        image: PIL image (any still mode; EXIF orientation honoured), ``(H, W[, C])`` uint8 / uint16 /
            float array, float tensor ``(C, H, W)`` or ``(B, C, H, W)`` in [0, 1], or a file path
            (returns PIL).
        strength: 0 = unchanged, 1 = the model's output, > 1 allowed; default from the model config.
        seed: picks fake identities; None derives it from the pixels (same photo, same result).
        model: a :class:`HidingNetwork`, folder, Hub repo id or a :class:`Deidentifier`; None = default.
        detector: ``"auto"``, ``"centerface"``, ``"dlib"``, ``"insightface"`` or a detector object.
        identity: your own fake identity feature ``(D,)`` (all faces) or ``(N, D)`` (one per face).
        faces: known faces (list of :class:`Face`, ``(N, 5, 2)`` landmarks, or dicts with box/landmarks);
            skips detection.
        keep_metadata: keep EXIF/XMP etc. on PIL outputs (default: only colour profile and orientation).
        return_report: also return a :class:`Report` (faces found, changed, skipped; per-face scores and
            low-confidence flags).
        min_face_size, min_score, thorough: see :class:`Deidentifier`.
    """
    runner = get_deidentifier(model, detector, min_face_size=min_face_size, min_score=min_score, thorough=thorough)
    return runner(image, strength, seed, identity=identity, faces=faces, keep_metadata=keep_metadata, return_report=return_report)

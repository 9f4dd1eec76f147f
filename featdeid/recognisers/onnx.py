"""ONNX face recognisers converted to torch with ``onnx2torch`` (differentiable, frozen).

Any local ArcFace-style ONNX model (``(B, 3, 112, 112)`` in, ``(B, D)`` out) works. Graphs exported
with a fixed batch of 1 are made batch-dynamic before conversion (:func:`make_batch_dynamic`).
insightface model-zoo packs (``buffalo_l`` ...) are read from ``~/.insightface/models/<name>/``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BackendUnavailableError, ConfigError, ModelNotFoundError
from .base import ARCFACE_BOX, TorchRecogniser

INSIGHTFACE_RECOGNITION_FILES = {
    "buffalo_l": "w600k_r50.onnx",
    "buffalo_m": "w600k_r50.onnx",
    "buffalo_s": "w600k_mbf.onnx",
    "buffalo_sc": "w600k_mbf.onnx",
    "antelopev2": "glintr100.onnx",
}


def _import_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnx2torch
    except ImportError as e:
        raise BackendUnavailableError(
            f"ONNX recognisers need the 'onnx' and 'onnx2torch' packages ({e.name} is missing): "
            "pip install 'featdeid[onnx]'"
        ) from e
    return onnx, onnx2torch


def _batch_dependent(graph: Any) -> set[str]:
    """Names of tensors computed (transitively) from the graph inputs that are not initializers."""
    inits = {i.name for i in graph.initializer}
    live = {i.name for i in graph.input if i.name not in inits}
    for node in graph.node:  # ONNX nodes are topologically sorted
        if any(name in live for name in node.input):
            live.update(node.output)
    return live


def make_batch_dynamic(model: Any) -> Any:
    """Make the batch dimension of an ONNX model dynamic, in place; returns the model.

    Sets dim 0 of every graph input and output to the symbol ``"batch"``, drops stale
    ``value_info`` shapes, and rewrites constant ``Reshape`` targets applied to batch-carrying
    tensors whose first entry is a fixed batch (``1``) to ``0`` ("copy the input's batch").
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    for value in [*(i for i in graph.input if i.name not in inits), *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    del graph.value_info[:]
    live = _batch_dependent(graph)
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[0] not in live:
            continue
        shape_name = node.input[1]
        if shape_name in inits:
            tensor = inits[shape_name]
        elif shape_name in constants:
            tensor = next(a.t for a in constants[shape_name].attribute if a.name == "value")
        else:
            continue
        shape = numpy_helper.to_array(tensor).copy()
        if shape.ndim == 1 and len(shape) and shape[0] == 1:
            shape[0] = 0
            tensor.CopyFrom(numpy_helper.from_array(shape.astype(np.int64), tensor.name))
    return model


def _mxnet_normalised(model: Any) -> bool:
    """insightface's rule: a Sub and a Mul among the first 8 nodes mean the graph normalises itself."""
    names = [n.name for n in model.graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return has_sub and has_mul


class OnnxRecogniser(TorchRecogniser):
    """A local ONNX face model run as a frozen torch module (``onnx2torch``).

    Args:
        path: the ``.onnx`` file; input ``(B, 3, h, w)`` RGB, output ``(B, D)``.
        mean, std: network input is ``(255 x - mean) / std`` (default ``(x * 255 - 127) / 128``,
            the faceplugin EN convention; insightface ArcFace uses ``127.5 / 127.5``).
        box112: the input window in ArcFace-112 coordinates (default the whole ArcFace crop).
        name: a label for reports (default the file stem).

    ``embed(frames)``: ``(B, 3, S, S)`` in ``[0, 1]`` -> ``(B, D)`` unit vectors, differentiable.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        mean: float = 127.0,
        std: float = 128.0,
        box112: tuple[float, float, float, float] = ARCFACE_BOX,
        name: str | None = None,
    ) -> None:
        super().__init__()
        onnx, onnx2torch = _import_onnx()
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"ONNX model not found: {path}")
        try:
            proto = onnx.load(str(path))
        except Exception as e:  # onnx raises DecodeError / ValueError / OSError variants
            raise ConfigError(f"{path} is not a readable ONNX model: {e}") from e
        inits = {i.name for i in proto.graph.initializer}
        inputs = [i for i in proto.graph.input if i.name not in inits]
        if len(inputs) != 1 or len(proto.graph.output) != 1:
            n_out = len(proto.graph.output)
            raise ConfigError(f"{path}: expected one input and one output, got {len(inputs)} and {n_out}")
        in_dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
        out_dims = [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
        if len(in_dims) != 4 or in_dims[1] != 3 or not in_dims[2] or not in_dims[3]:
            raise ConfigError(f"{path}: input must be (B, 3, h, w) with fixed h, w, got {in_dims}")
        self.source_path = path
        self.self_normalising = _mxnet_normalised(proto)
        self.name = name or path.stem
        self.input_hw = (int(in_dims[2]), int(in_dims[3]))
        self.box112 = tuple(float(v) for v in box112)
        self.mean, self.std = (0.0, 1.0) if self.self_normalising else (float(mean), float(std))
        self.net = onnx2torch.convert(make_batch_dynamic(proto))
        if len(out_dims) >= 2 and out_dims[1]:
            self.dim = int(out_dims[1])
        else:
            with torch.no_grad():
                self.dim = int(self.net(torch.zeros(1, 3, *self.input_hw)).flatten(1).shape[1])
        self.freeze()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw network output ``(B, D)`` for a normalised crop ``(B, 3, h, w)``."""
        return self.net(x)


def insightface_model_path(pack: str, root: str | os.PathLike[str] | None = None) -> Path:
    """The ArcFace ``.onnx`` of an insightface model pack, downloading it with insightface if absent.

    Looks in ``<root>/models/<pack>/`` (root defaults to ``~/.insightface``) for the pack's
    recognition model (``buffalo_l`` -> ``w600k_r50.onnx``; unknown packs: the one ``.onnx`` file
    with a 112 x 112 input). Raises :class:`BackendUnavailableError` when the pack is absent and
    insightface is missing or cannot download it (e.g. offline).
    """
    if not pack or "/" in pack or "\\" in pack or pack.startswith("."):
        raise ConfigError(f"not an insightface model pack name: {pack!r}")
    root = Path(root if root is not None else "~/.insightface").expanduser()
    folder = root / "models" / pack
    if not folder.is_dir():
        try:
            from insightface.utils.storage import ensure_available
        except ImportError as e:
            raise BackendUnavailableError(
                f"insightface model pack {pack!r} is not in {folder} and insightface is not installed to "
                "download it: pip install 'featdeid[insightface]', or copy the pack there"
            ) from e
        try:
            folder = Path(ensure_available("models", pack, root=str(root)))
        except Exception as e:  # network, HTTP and archive errors all mean the same thing here
            raise BackendUnavailableError(
                f"insightface could not download model pack {pack!r} into {folder} ({type(e).__name__}: {e}); "
                "on an offline machine copy the pack there by hand"
            ) from e
    known = INSIGHTFACE_RECOGNITION_FILES.get(pack)
    if known and (folder / known).is_file():
        return folder / known
    candidates = [p for p in sorted(folder.glob("*.onnx")) if _input_hw(p) == (112, 112)]
    if len(candidates) != 1:
        raise ModelNotFoundError(
            f"cannot find one ArcFace recognition model (112 x 112 input) in {folder}; "
            f"found {[p.name for p in candidates]}"
        )
    return candidates[0]


def _input_hw(path: Path) -> tuple[int, int] | None:
    onnx, _ = _import_onnx()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    inits = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name not in inits:
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            return (dims[2], dims[3]) if len(dims) == 4 else None
    return None


def insightface_recogniser(pack: str = "buffalo_l", root: str | os.PathLike[str] | None = None) -> OnnxRecogniser:
    """The ArcFace model of an insightface pack: ``(x * 255 - 127.5) / 127.5``, RGB, 112 x 112."""
    path = insightface_model_path(pack, root)
    return OnnxRecogniser(path, mean=127.5, std=127.5, name=f"insightface:{pack}")

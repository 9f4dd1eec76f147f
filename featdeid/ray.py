"""Ray Data: de-identify an image column with ``Dataset.map_batches``.

    import featdeid.ray
    ds = ray.data.read_images("photos/", mode="RGB")
    ds = ds.map_batches(featdeid.ray.DeIdentifyBatch, fn_constructor_kwargs={"strength": 1.0},
                        batch_size=16, concurrency=2)

:class:`DeIdentifyBatch` is a class-based callable: Ray builds it once per actor, so the model and
the detector are loaded once per actor, not per batch. It takes numpy batches (Ray's default
``batch_format="numpy"``): the image column is either one ``(B, H, W, C)`` array (all images the
same size) or, for images of different sizes, an object array / list of ``(H, W, C)`` arrays;
pandas batches work too. Every image goes through :class:`featdeid.Deidentifier` and comes back
with the same dtype and shape; ``num_faces`` (faces de-identified per row) is added. This module
does not import ``ray``; install it with ``pip install 'featdeid[ray]'``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = ["DeIdentifyBatch"]


class DeIdentifyBatch:
    """``map_batches`` callable: de-identify ``column`` and add ``count_column``.

    Args:
        model: model folder or Hub repo id; default ``FEATDEID_MODEL``, else the packaged model.
        column: the image column (uint8 / uint16 / float arrays, ``(H, W)`` or ``(H, W, C)``).
        strength, seed: as in :func:`featdeid.deidentify` (seed None: derived from each image).
        detector: ``"auto"``, ``"centerface"``, ``"dlib"`` or ``"insightface"``.
        count_column: name of the added column of faces de-identified per row (None: not added).
        min_face_size: smaller faces are left unchanged (and not counted).
        device: ``"cpu"`` or e.g. ``"cuda"`` (ask Ray for ``num_gpus`` too).
        torch_threads: intra-op threads per actor (default: torch's choice).
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        column: str = "image",
        strength: float | None = None,
        seed: int | None = None,
        detector: str = "auto",
        count_column: str | None = "num_faces",
        min_face_size: int = 20,
        device: str = "cpu",
        torch_threads: int | None = None,
    ) -> None:
        from .pipeline import Deidentifier

        if torch_threads:
            import torch

            torch.set_num_threads(int(torch_threads))
        if not isinstance(column, str) or not column:
            raise ConfigError("column must be the name of the image column")
        model = model if model is not None else (os.environ.get("FEATDEID_MODEL") or None)
        self.runner = Deidentifier(model, detector=detector, min_face_size=min_face_size, device=device)
        self.column = column
        self.strength = strength
        self.seed = seed
        self.count_column = count_column

    def _one(self, image: Any) -> tuple[Any, int]:
        if image is None:
            return None, 0
        out, report = self.runner(np.asarray(image), self.strength, self.seed, return_report=True)
        return out, report.changed

    def __call__(self, batch: Any) -> Any:
        try:
            import pandas as pd
        except ImportError:  # pragma: no cover - Ray Data always has pandas
            pd = None
        if pd is not None and isinstance(batch, pd.DataFrame):
            out = batch.copy()
            results = [self._one(v) for v in batch[self.column]]
            out[self.column] = [r[0] for r in results]
            if self.count_column:
                out[self.count_column] = np.asarray([r[1] for r in results], dtype=np.int64)
            return out
        if not isinstance(batch, dict):
            raise ConfigError(f"expected a numpy (dict) or pandas batch, got {type(batch).__name__}; "
                              "use map_batches(..., batch_format='numpy')")
        if self.column not in batch:
            raise ConfigError(f"column {self.column!r} not in the batch (columns: {', '.join(batch)})")
        images = batch[self.column]
        if isinstance(images, np.ndarray) and images.dtype != object:
            if images.ndim not in (3, 4):
                raise ConfigError(f"column {self.column!r}: expected (B, H, W[, C]) images, got shape {images.shape}")
            result = np.empty_like(images)
            counts = []
            for i, img in enumerate(images):
                result[i], n = self._one(img)
                counts.append(n)
        else:  # images of different sizes: object array or list of arrays
            results = [self._one(img) for img in images]
            counts = [n for _, n in results]
            if isinstance(images, np.ndarray):
                result = np.empty(len(results), dtype=object)
                for i, (img, _) in enumerate(results):
                    result[i] = img
            else:
                result = [img for img, _ in results]
        out = dict(batch)
        out[self.column] = result
        if self.count_column:
            out[self.count_column] = np.asarray(counts, dtype=np.int64)
        return out

    def __repr__(self) -> str:
        return f"DeIdentifyBatch(column={self.column!r}, strength={self.strength}, seed={self.seed})"

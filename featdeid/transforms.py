"""Front ends for data pipelines: Hugging Face ``datasets.map`` and torchvision v2 transforms."""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError
from .pipeline import get_deidentifier


class DatasetTransform:
    """A picklable callable for ``Dataset.map`` (batched or not, ``num_proc`` > 1 too).

    Replaces each image in ``columns`` by its de-identified version and adds ``<count_column>``
    (faces changed per row; one column per image column when there are several).
    The model is loaded lazily once per process.
    """

    def __init__(
        self,
        column: str | None = "image",
        columns: list[str] | None = None,
        strength: float | None = None,
        seed: int | None = None,
        model: Any = None,
        detector: str = "auto",
        count_column: str | None = "num_faces",
        min_face_size: int = 20,
    ) -> None:
        cols = list(columns) if columns else ([column] if column else [])
        if not cols or not all(isinstance(c, str) and c for c in cols):
            raise ConfigError("give the image column name(s)")
        self.columns = cols
        self.strength = strength
        self.seed = seed
        self.model = model
        self.detector = detector
        self.count_column = count_column
        self.min_face_size = min_face_size

    def _count_name(self, col: str) -> str | None:
        if not self.count_column:
            return None
        return self.count_column if len(self.columns) == 1 else f"{col}_{self.count_column}"

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        runner = get_deidentifier(self.model, self.detector, min_face_size=self.min_face_size)
        out = dict(batch)
        for col in self.columns:
            if col not in batch:
                raise ConfigError(f"column {col!r} not in the dataset (columns: {', '.join(batch)})")
            value = batch[col]
            batched = isinstance(value, list)
            items = value if batched else [value]
            results, counts = [], []
            for item in items:
                if item is None:
                    results.append(None)
                    counts.append(0)
                    continue
                img, report = runner(item, self.strength, self.seed, return_report=True)
                results.append(img)
                counts.append(report.changed)
            out[col] = results if batched else results[0]
            name = self._count_name(col)
            if name:
                out[name] = counts if batched else counts[0]
        return out


def transform_for(column: str = "image", **kwargs: Any) -> DatasetTransform:
    """A ``Dataset.map`` function for another column or options, e.g. ``transform_for("photo", strength=1.2)``."""
    return DatasetTransform(column=column, **kwargs)


def transform(batch: dict[str, Any]) -> dict[str, Any]:
    """``dataset.map(featdeid.transform, batched=True)``: de-identify the ``image`` column with defaults."""
    return DatasetTransform()(batch)


class DeIdentify(torch.nn.Module):
    """torchvision-v2-compatible transform: PIL image, ``(C, H, W)`` / ``(B, C, H, W)`` tensor (float or uint8)."""

    def __init__(self, strength: float | None = None, seed: int | None = None, model: Any = None, detector: str = "auto", min_face_size: int = 20) -> None:
        super().__init__()
        self.strength = strength
        self.seed = seed
        self.model = model
        self.detector = detector
        self.min_face_size = min_face_size

    def forward(self, inp: Any) -> Any:
        runner = get_deidentifier(self.model, self.detector, min_face_size=self.min_face_size)
        if isinstance(inp, torch.Tensor) and type(inp) is not torch.Tensor:
            out = runner(inp.as_subclass(torch.Tensor), self.strength, self.seed)
            return out.as_subclass(type(inp))
        return runner(inp, self.strength, self.seed)

    def extra_repr(self) -> str:
        return f"strength={self.strength}, seed={self.seed}, detector={self.detector!r}"

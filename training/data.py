"""Training data: cover images C and embedding images E, aligned once into the canonical frame.

Sources are image folders (any layout, searched recursively: CelebA ``img_align_celeba``, GFSG2,
the offline assets) or Hugging Face datasets (``hf_imagefolder``: ``load_dataset("imagefolder",
data_dir=...)``; ``hf_disk``: ``load_from_disk``; ``hf_hub``: a Hub dataset name). Every face is
detected (largest face), aligned with its 5 landmarks into the ``S x S`` canonical frame and cached
as one uint8 ``.npy`` array ``(N, S, S, 3)`` keyed by the source's content hash, the size, the
detector and the frame. Unreadable files, non-images and images without a face are skipped and
counted in an :class:`AlignReport`. E can also be ``noise`` (standard-normal images, as the paper)
or ``object`` (any images, centre-cropped and resized to the frame, no alignment).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

from featdeid.errors import ConfigError
from featdeid.faces.frame import alignment_matrix, frame_scale, template, warp

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"})
SOURCE_KINDS = ("folder", "hf_imagefolder", "hf_disk", "hf_hub")
EMBED_MODES = ("face", "noise", "object")
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """Where images come from. ``limit`` keeps the first N items (sorted paths / dataset order)."""

    path: str
    kind: str = "folder"
    split: str = "train"
    image_column: str = "image"
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ConfigError(f"unknown data source kind {self.kind!r}; valid: {', '.join(SOURCE_KINDS)}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ConfigError(f"limit must be a positive integer, got {self.limit!r}")


@dataclasses.dataclass
class AlignReport:
    """What happened to each item of a source: used, or skipped with a reason."""

    source: str
    total: int = 0
    used: int = 0
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, key: str) -> None:
        self.skipped.setdefault(reason, []).append(key)

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self) -> str:
        parts = ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in sorted(self.skipped.items()))
        return f"{self.source}: {self.used} of {self.total} images used" + (f"; skipped {parts}" if parts else "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


Loader = Callable[[], Image.Image]


def _open_file(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


def _open_bytes(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def _folder_items(spec: SourceSpec) -> tuple[list[tuple[str, Loader | None]], str]:
    root = Path(spec.path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data folder not found: {root}")
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if spec.limit is not None:
        files = files[: spec.limit]
    digest = hashlib.sha256()
    items: list[tuple[str, Loader | None]] = []
    for p in files:
        rel = p.relative_to(root).as_posix()
        digest.update(rel.encode() + b"\0")
        if p.suffix.lower() in IMAGE_EXTS:
            digest.update(p.read_bytes())
            items.append((rel, lambda p=p: _open_file(p)))
        else:
            items.append((rel, None))
    return items, digest.hexdigest()


def _hf_items(spec: SourceSpec) -> tuple[list[tuple[str, Loader | None]], str]:
    try:
        import datasets
    except ImportError as e:
        raise ConfigError("Hugging Face data sources need `pip install datasets`") from e
    if spec.kind == "hf_imagefolder":
        if not Path(spec.path).expanduser().is_dir():
            raise ConfigError(f"data folder not found: {spec.path}")
        ds = datasets.load_dataset("imagefolder", data_dir=str(Path(spec.path).expanduser()), split=spec.split)
    elif spec.kind == "hf_disk":
        if not Path(spec.path).expanduser().exists():
            raise ConfigError(f"saved dataset not found: {spec.path}")
        ds = datasets.load_from_disk(str(Path(spec.path).expanduser()))
        if isinstance(ds, datasets.DatasetDict):
            if spec.split not in ds:
                raise ConfigError(f"{spec.path} has no split {spec.split!r}; splits: {', '.join(ds)}")
            ds = ds[spec.split]
    else:
        ds = datasets.load_dataset(spec.path, split=spec.split)
    if spec.image_column not in ds.column_names:
        raise ConfigError(f"{spec.path} has no column {spec.image_column!r}; columns: {', '.join(ds.column_names)}")
    if spec.limit is not None:
        ds = ds.select(range(min(spec.limit, len(ds))))
    if isinstance(ds.features[spec.image_column], datasets.Image):
        ds = ds.cast_column(spec.image_column, datasets.Image(decode=False))
    column = ds[spec.image_column]

    def loader(value: Any) -> Loader:
        def load() -> Image.Image:
            if isinstance(value, Image.Image):
                return value.convert("RGB")
            if isinstance(value, dict) and value.get("bytes"):
                return _open_bytes(value["bytes"])
            if isinstance(value, dict) and value.get("path"):
                return _open_file(Path(value["path"]))
            raise ValueError(f"not an image value: {type(value).__name__}")

        return load

    items: list[tuple[str, Loader | None]] = [(str(i), loader(v)) for i, v in enumerate(column)]
    digest = hashlib.sha256(f"{spec.kind}\0{spec.path}\0{spec.split}\0{ds._fingerprint}\0{len(ds)}".encode())
    return items, digest.hexdigest()


def list_source(spec: SourceSpec) -> tuple[list[tuple[str, Loader | None]], str]:
    """Items ``(key, loader or None for a non-image file)`` and the source's content hash."""
    return _folder_items(spec) if spec.kind == "folder" else _hf_items(spec)


def _largest_face(detector: Any, rgb: np.ndarray) -> np.ndarray | None:
    """Landmarks ``(5, 2)`` of the largest face; retries on an edge-padded copy (tight crops)."""
    faces = detector.detect(rgb)
    offset = 0
    if not faces:
        offset = max(rgb.shape[:2]) // 4
        padded = np.pad(rgb, ((offset, offset), (offset, offset), (0, 0)), mode="edge")
        faces = detector.detect(padded)
    if not faces:
        return None
    best = max(faces, key=lambda f: float((f.box[2] - f.box[0]) * (f.box[3] - f.box[1])))
    return np.asarray(best.landmarks, dtype=np.float64) - offset


def align_face(image: Image.Image, landmarks: np.ndarray, size: int) -> np.ndarray:
    """Warp a face into the canonical ``size x size`` frame; ``(size, size, 3)`` uint8.

    Large faces are first downscaled with an antialiasing filter so the bilinear warp does not alias.
    """
    m = alignment_matrix(landmarks, size)
    scale = frame_scale(m)
    if scale < 0.8:
        w, h = image.size
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
        landmarks = landmarks * np.array([image.size[0] / w, image.size[1] / h])
        m = alignment_matrix(landmarks, size)
    t = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    out = warp(t, m, (size, size))[0].permute(1, 2, 0)
    return out.round().clamp(0, 255).to(torch.uint8).numpy()


def resize_square(image: Image.Image, size: int) -> np.ndarray:
    """Centre-crop to a square and resize to ``(size, size, 3)`` uint8 (object images, no alignment)."""
    w, h = image.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return np.asarray(image.crop(box).resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


@dataclasses.dataclass
class AlignedImages:
    """Aligned uint8 images ``(N, S, S, 3)`` (a read-only memory map of the cache) and their keys."""

    images: np.ndarray
    rows: np.ndarray
    keys: list[str]
    report: AlignReport

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, i: int) -> np.ndarray:
        return self.images[self.rows[i]]


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEATDEID_CACHE", Path.home() / ".cache" / "featdeid")) / "aligned"


def prepare_images(
    spec: SourceSpec,
    size: int,
    mode: str = "face",
    detector: str | Any = "dlib",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> AlignedImages:
    """Align (``mode='face'``) or resize (``mode='object'``) every image of ``spec`` once, with a cache.

    Raises:
        ConfigError: the source does not exist, or no usable image is in it.
    """
    from tqdm.auto import tqdm

    if mode not in ("face", "object"):
        raise ConfigError(f"mode must be 'face' or 'object', got {mode!r}")
    items, digest = list_source(spec)
    det_name = detector if isinstance(detector, str) else getattr(detector, "name", type(detector).__name__)
    frame = hashlib.sha256(np.round(template(size), 4).tobytes()).hexdigest()[:8]
    key = f"{digest[:20]}-{mode}{size}-{det_name if mode == 'face' else 'resize'}-{frame}-v{CACHE_VERSION}"
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    arr_path, meta_path = cache / f"{key}.npy", cache / f"{key}.json"
    if arr_path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        report = AlignReport(**meta["report"])
    else:
        cache.mkdir(parents=True, exist_ok=True)
        det = None
        if mode == "face":
            from featdeid.faces.detect import get_detector

            det = get_detector(detector)
        report = AlignReport(source=spec.path, total=len(items))
        rows, keys = [], []
        tmp = arr_path.with_name(f".{arr_path.name}.{os.getpid()}.tmp")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(max(len(items), 1), size, size, 3))
        bar = tqdm(items, desc=f"aligning {Path(spec.path).name or spec.path} ({mode}, {size}px)", disable=not progress)
        for i, (k, load) in enumerate(bar):
            if load is None:
                report.skip("not_image", k)
                continue
            try:
                image = load()
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                report.skip("unreadable", k)
                continue
            if mode == "object":
                out[i] = resize_square(image, size)
            else:
                landmarks = _largest_face(det, np.asarray(image))
                if landmarks is None:
                    report.skip("no_face", k)
                    continue
                out[i] = align_face(image, landmarks, size)
            rows.append(i)
            keys.append(k)
        out.flush()
        del out
        report.used = len(rows)
        meta = {"rows": rows, "keys": keys, "report": report.to_dict(), "size": size, "mode": mode}
        os.replace(tmp, arr_path)
        meta_tmp = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
        meta_tmp.write_text(json.dumps(meta))
        os.replace(meta_tmp, meta_path)
    if report.used == 0:
        raise ConfigError(f"no usable images in {spec.path}: {report.summary()}")
    images = np.load(arr_path, mmap_mode="r")
    return AlignedImages(images, np.asarray(meta["rows"], dtype=np.int64), list(meta["keys"]), report)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded ``(train, val)`` split of ``range(n)``; val gets ``round(n * fraction)`` items (>= 1 if
    the fraction is positive), train keeps at least one."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = 0 if val_fraction == 0 else min(max(1, round(n * val_fraction)), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(S, S, 3)`` uint8 -> ``(3, S, S)`` float in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)


class PairDataset(Dataset):
    """Cover C ``i`` paired with an embedding image E drawn for ``(seed, epoch, i)``.

    All randomness (E choice, flips, noise) is a function of ``(seed, epoch, i)``, so an epoch is the
    same whichever batches were skipped on resume and whichever process loads it.
    Items: ``{"cover": (3, S, S), "embed": (3, S, S), "index": ()}``; ``embed`` is in [0, 1], or
    standard normal for ``embed_mode='noise'``.
    """

    def __init__(
        self,
        covers: AlignedImages,
        cover_idx: np.ndarray,
        embeds: AlignedImages | None,
        embed_idx: np.ndarray | None,
        embed_mode: str,
        size: int,
        seed: int,
        flip: bool,
        fixed_epoch: int | None = None,
    ) -> None:
        if embed_mode not in EMBED_MODES:
            raise ConfigError(f"unknown embed mode {embed_mode!r}; valid: {', '.join(EMBED_MODES)}")
        if embed_mode != "noise" and (embeds is None or embed_idx is None or len(embed_idx) == 0):
            raise ConfigError(f"embed mode {embed_mode!r} needs embedding images")
        self.covers, self.cover_idx = covers, np.asarray(cover_idx)
        self.embeds, self.embed_idx = embeds, embed_idx
        self.embed_mode, self.size, self.seed, self.flip = embed_mode, size, seed, flip
        self.fixed_epoch = fixed_epoch
        self.epoch = 0 if fixed_epoch is None else fixed_epoch

    def set_epoch(self, epoch: int) -> None:
        if self.fixed_epoch is None:
            self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.cover_idx)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        flip_c, flip_e = rng.random(2) < 0.5
        cover = to_tensor(self.covers.get(int(self.cover_idx[i])))
        if self.embed_mode == "noise":
            embed = torch.from_numpy(rng.standard_normal((3, self.size, self.size), dtype=np.float32))
        else:
            assert self.embeds is not None and self.embed_idx is not None
            embed = to_tensor(self.embeds.get(int(self.embed_idx[rng.integers(len(self.embed_idx))])))
        if self.flip and flip_c:
            cover = cover.flip(-1)
        if self.flip and flip_e:
            embed = embed.flip(-1)
        return {"cover": cover, "embed": embed, "index": torch.tensor(int(i))}


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())

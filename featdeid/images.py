"""Image types in and out: PIL modes, EXIF orientation, arrays, tensors; metadata-free atomic saving.

The pipeline works on an ``(H, W, 3)`` view (``uint8``, ``uint16`` or float in [0, 1]) of a copy of
the input; adapters turn every accepted input into such a view and the result back into the
input's type, size and mode.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidImageError, OutputError

ORIENTATION_TAG = 0x0112
Image.MAX_IMAGE_PIXELS = 200_000_000  # 12000 x 9000 photos are legitimate; refuse beyond 200 MP

# numpy views that show a raw array upright, per EXIF orientation (same results as ImageOps.exif_transpose)
_UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def upright_view(raw: np.ndarray, orientation: int) -> np.ndarray:
    """A view of ``raw`` ``(H, W, ...)`` as a viewer shows it under EXIF ``orientation`` (writes go through)."""
    return _UPRIGHT.get(int(orientation), _UPRIGHT[1])(raw)


def exif_orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF must not stop de-identification
        return 1
    return value if value in _UPRIGHT else 1


@dataclasses.dataclass
class Work:
    """A working copy of an image: ``rgb`` is an upright ``(H, W, 3)`` view into ``raw``."""

    raw: np.ndarray
    rgb: np.ndarray
    restore: Callable[[np.ndarray, np.ndarray | None], Any]
    gray: bool = False


def _rgb_view(raw: np.ndarray) -> tuple[np.ndarray, bool]:
    """``(H, W, 3)`` view or working copy, and whether the source is gray."""
    if raw.shape[2] in (1, 2):
        return np.repeat(raw[..., :1], 3, axis=2), True
    return raw[..., :3], False


def _fold_gray(raw: np.ndarray, rgb: np.ndarray, touched: np.ndarray | None) -> None:
    """Write the luma of changed pixels of a gray image's RGB working copy back into ``raw``."""
    if touched is None or not touched.any():
        return
    luma = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    if np.issubdtype(raw.dtype, np.integer):
        luma = np.round(luma)
    raw[..., 0][touched] = luma[touched].astype(raw.dtype)


def _check_array(arr: np.ndarray) -> None:
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 2, 3, 4)):
        raise InvalidImageError(f"expected an (H, W), (H, W, 1|2|3|4) array, got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InvalidImageError(f"empty image of shape {arr.shape}")
    if arr.dtype not in (np.uint8, np.uint16, np.float32, np.float64, np.float16):
        raise InvalidImageError(f"unsupported dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidImageError("float image contains NaN or infinity")


def from_array(arr: np.ndarray) -> Work:
    """Working copy of an ``(H, W[, C])`` uint8 / uint16 / float array (float range [0, 1])."""
    _check_array(arr)
    squeeze = arr.ndim == 2
    raw = (arr[..., None] if squeeze else arr).copy()
    if raw.dtype.kind == "f":
        raw = raw.astype(np.float32)
    rgb, gray = _rgb_view(raw)
    dtype = arr.dtype

    def restore(rgb_out: np.ndarray, touched: np.ndarray | None) -> np.ndarray:
        if gray:
            _fold_gray(raw, rgb_out, touched)
        out = raw[..., 0] if squeeze else raw
        return out.astype(dtype, copy=False)

    return Work(raw, rgb, restore, gray)


_MODE_AS = {"1": "L", "P": None, "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB", "F": "F"}


def from_pil(img: Image.Image, keep_metadata: bool = False) -> Work:
    """Working copy of a PIL image of any still mode; EXIF orientation is honoured."""
    if getattr(img, "is_animated", False) and getattr(img, "n_frames", 1) > 1:
        raise InvalidImageError("animated image: de-identify frame by frame (the CLI does this) or pass one frame")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidImageError(f"cannot decode image: {e}") from e
    mode = img.mode
    orientation = exif_orientation(img)
    info = dict(img.info)
    if mode == "P":
        work_img = img.convert("RGBA" if "transparency" in info else "RGB")
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr_i = np.asarray(img)
        work_img = None
        eight_bit = mode == "I" and arr_i.size and int(arr_i.max()) <= 255  # "I" holding 8-bit values
        base = np.clip(arr_i, 0, 255 if eight_bit else 65535).astype(np.uint8 if eight_bit else np.uint16)
    elif mode in _MODE_AS and _MODE_AS[mode] not in (None, "F"):
        work_img = img.convert(_MODE_AS[mode])
    elif mode == "F":
        work_img = None
        base = np.clip(np.asarray(img, dtype=np.float32) / 255.0, 0, 1)
    elif mode in ("RGB", "RGBA", "L", "LA"):
        work_img = img
    else:
        raise InvalidImageError(f"unsupported PIL mode {mode!r}")
    if work_img is not None:
        base = np.asarray(work_img)
    raw = (base[..., None] if base.ndim == 2 else base).copy()
    _check_array(raw)
    up_raw = upright_view(raw, orientation)
    rgb, gray = _rgb_view(up_raw)
    original = img

    def restore(rgb_out: np.ndarray, touched: np.ndarray | None) -> Image.Image:
        if gray:
            _fold_gray(up_raw, rgb_out, touched)
        arr = raw[..., 0] if raw.shape[2] == 1 else raw
        if mode == "F":
            out = Image.fromarray((arr * 255.0).astype(np.float32), "F")
        elif mode in ("I;16", "I;16L", "I;16B", "I;16N"):
            out = Image.fromarray(arr.astype(np.uint16)).convert(mode) if mode != "I;16" else Image.fromarray(arr.astype(np.uint16))
        elif mode == "I":
            out = Image.fromarray(arr.astype(np.int32), "I")
        else:
            out = Image.fromarray(arr)
        if out.mode != mode:
            out = _back_to_mode(out, original, mode, touched, orientation)
        out.info = _kept_info(info, keep_metadata, orientation)
        return out

    return Work(raw, rgb, restore, gray)


def _back_to_mode(out: Image.Image, original: Image.Image, mode: str, touched: np.ndarray | None, orientation: int) -> Image.Image:
    """Convert back to a mode that does not round-trip exactly (P, 1, CMYK, ...), changing only touched pixels."""
    if mode == "P":
        back = out.convert("RGB").quantize(palette=original, dither=Image.Dither.NONE)
    else:
        back = out.convert(mode)
    merged = np.asarray(original).copy()
    if touched is not None:
        upright_view(merged, orientation)[touched] = upright_view(np.asarray(back), orientation)[touched]
    result = Image.fromarray(merged, mode) if mode not in ("P", "1") else Image.fromarray(merged)
    if mode == "P":
        result = Image.fromarray(merged, "P")
        result.putpalette(original.getpalette())
    elif mode == "1":
        result = result.convert("1")
    return result


def _kept_info(info: dict[str, Any], keep_metadata: bool, orientation: int) -> dict[str, Any]:
    """Metadata of an output: everything when asked to keep it, else only colour and orientation."""
    if keep_metadata:
        return dict(info)
    kept: dict[str, Any] = {k: info[k] for k in ("icc_profile", "transparency", "dpi", "gamma") if k in info}
    if orientation != 1:
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        kept["exif"] = exif.tobytes()
    return kept


def from_tensor_image(t: Any) -> tuple[list[Work], Callable[[list[np.ndarray]], Any]]:
    """Working copies of a float tensor ``(3, H, W)`` or ``(B, 3, H, W)`` in [0, 1] (also ``(1|4, H, W)``)."""
    import torch

    if not isinstance(t, torch.Tensor) or t.dim() not in (3, 4) or t.shape[-3] not in (1, 3, 4):
        raise InvalidImageError(f"expected a (C, H, W) or (B, C, H, W) tensor with C in 1, 3, 4, got {tuple(getattr(t, 'shape', ()))}")
    batched = t.dim() == 4
    arrays = t.detach().to("cpu", copy=True)
    if not arrays.is_floating_point():
        if arrays.dtype != torch.uint8:
            raise InvalidImageError(f"tensor dtype {t.dtype} unsupported; use float in [0, 1] or uint8")
        arrays_np = arrays.numpy()
    else:
        arrays_np = arrays.float().numpy()
    items = arrays_np if batched else arrays_np[None]
    works = [from_array(np.moveaxis(a, 0, -1)) for a in items]

    def restore(outs: list[np.ndarray]) -> Any:
        stacked = np.stack([o if o.ndim == 3 else o[..., None] for o in outs])
        res = torch.from_numpy(np.ascontiguousarray(np.moveaxis(stacked, -1, 1))).to(dtype=t.dtype, device=t.device)
        return res if batched else res[0]

    return works, restore


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully decoded, or raise :class:`InvalidImageError` saying why."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise InvalidImageError(f"{path}: empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
    except InvalidImageError:
        raise
    except Image.DecompressionBombWarning as e:
        raise InvalidImageError(f"{path}: image is larger than {Image.MAX_IMAGE_PIXELS} pixels") from e
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise InvalidImageError(f"{path}: not a readable image ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InvalidImageError(f"{path}: corrupt or truncated image ({e})") from e
    return img


FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP", ".gif": "GIF"}
LOSSY = {"JPEG", "WEBP"}


def format_for(path: str | os.PathLike) -> str:
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise OutputError(f"{path}: unknown output extension {ext!r}; use one of {', '.join(sorted(FORMATS))}")
    return FORMATS[ext]


def strip_thumbnail(exif_bytes: bytes) -> bytes:
    """EXIF re-serialised without IFD1, the embedded thumbnail that would still show the original face.

    Pillow writes IFD0 and its sub-IFDs (Exif, GPS, Interop) but never IFD1.
    """
    exif = Image.Exif()
    exif.load(exif_bytes)
    for tag in (0x8769, 0x8825, 0xA005):
        if tag in exif:
            exif[tag] = exif.get_ifd(tag)
    return exif.tobytes()


def encode(img: Image.Image, fmt: str, quality: int | None = None, lossless: bool = False, keep_metadata: bool = False) -> bytes:
    """Encode ``img`` to bytes; metadata other than colour profile is written only when kept."""
    if lossless and fmt == "JPEG":
        raise OutputError("JPEG cannot be lossless; choose png, webp (with lossless) or tiff")
    info = img.info
    clean = img.copy()
    clean.info = {}
    kwargs: dict[str, Any] = {}
    if "icc_profile" in info:
        kwargs["icc_profile"] = info["icc_profile"]
    if keep_metadata:
        if "exif" in info and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
            kwargs["exif"] = strip_thumbnail(info["exif"])
        if "xmp" in info and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
            kwargs["xmp"] = info["xmp"]
    if fmt == "JPEG":
        if clean.mode not in ("RGB", "L", "CMYK"):
            clean = clean.convert("RGB")
        kwargs.update(quality=quality or 95, subsampling=0 if (quality or 95) >= 90 else 2)
    elif fmt == "WEBP":
        kwargs.update(lossless=lossless, quality=100 if lossless else (quality or 95))
    elif fmt == "PNG":
        kwargs.update(optimize=False)
        if "transparency" in info:
            kwargs["transparency"] = info["transparency"]
    elif fmt == "GIF" and "transparency" in info:
        kwargs["transparency"] = info["transparency"]
    buf = io.BytesIO()
    try:
        clean.save(buf, format=fmt, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise OutputError(f"cannot encode a {img.mode} image as {fmt}: {e}") from e
    return buf.getvalue()


def atomic_write(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def bake_orientation(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation to the pixels (for outputs that will carry no EXIF)."""
    out = ImageOps.exif_transpose(img)
    if out is None:
        return img
    out.info = {k: v for k, v in img.info.items() if k != "exif"}
    return out

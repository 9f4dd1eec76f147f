"""Image types in and out: PIL modes, EXIF orientation, arrays, tensors; metadata-free atomic saving.

The pipeline works on an ``(H, W, 3)`` view (``uint8``, ``uint16`` or float in [0, 1]) of a copy of
the input; adapters turn every accepted input into such a view and the result back into the
input's type, size and mode.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import struct
import tempfile
import threading
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


def peak(dtype: np.dtype) -> float:
    """Full-scale value of an image dtype: 255 for uint8, 65535 for uint16, 1.0 for floats."""
    return {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(np.dtype(dtype), 1.0)


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
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InvalidImageError("float image contains NaN or infinity")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -FLOAT_SLACK or hi > 1 + FLOAT_SLACK:
            raise InvalidImageError(
                f"float images must hold values in [0, 1], found [{lo:.3g}, {hi:.3g}]; "
                "divide 0-255 data by 255 (or pass uint8) and undo any mean/std normalisation"
            )


# Float inputs may overshoot [0, 1] a little (bicubic / Lanczos resampling); faces are written clipped to
# [0, 1]. Values further out mean another convention (0-255 floats, normalised tensors), on which the
# detector would see a blank image and silently leave every face as it is: refused instead.
FLOAT_SLACK = 0.25


def from_array(arr: np.ndarray) -> Work:
    """Working copy of an ``(H, W[, C])`` uint8 / uint16 / float array (float range [0, 1])."""
    if not isinstance(arr, np.ndarray) or type(arr) is not np.ndarray:
        arr = np.asarray(arr)  # np.matrix, memmap, masked arrays: plain arrays (the data, not the mask)
    _check_array(arr)
    squeeze = arr.ndim == 2
    # a plain copy in the input's own dtype, so pixels outside faces come back bit-identical
    raw = np.array(arr[..., None] if squeeze else arr, copy=True, order="C")
    rgb, gray = _rgb_view(raw)
    dtype = arr.dtype

    def restore(rgb_out: np.ndarray, touched: np.ndarray | None) -> np.ndarray:
        if gray:
            _fold_gray(raw, rgb_out, touched)
        out = raw[..., 0] if squeeze else raw
        return out.astype(dtype, copy=False)

    return Work(raw, rgb, restore, gray)


_MODE_AS = {
    "1": "L", "P": None, "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB", "F": "F",
    "RGBX": "RGB", "RGBa": "RGBA", "La": "LA",
}


def is_multiframe(img: Image.Image) -> bool:
    """True for animations and multi-page files; an MPO (a camera JPEG with extra preview / depth images)
    counts as its primary image, and the extra images are never copied to an output."""
    return bool(getattr(img, "is_animated", False)) and getattr(img, "n_frames", 1) > 1 and img.format != "MPO"


def from_pil(img: Image.Image, keep_metadata: bool = False) -> Work:
    """Working copy of a PIL image of any still mode; EXIF orientation is honoured."""
    if is_multiframe(img):
        raise InvalidImageError(
            f"animated or multi-page image ({img.n_frames} frames): de-identify frame by frame "
            "(for frame in PIL.ImageSequence.Iterator(img); the CLI does this) or pass one frame"
        )
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
        raw = _pil_to_array(work_img)
    else:
        raw = (base[..., None] if base.ndim == 2 else base).copy()
    _check_array(raw)
    up_raw = upright_view(raw, orientation)
    rgb, gray = _rgb_view(up_raw)
    # what the way back to a mode that does not round-trip needs, taken now: the caller may close ``img``
    original = None
    if work_img is not None and work_img is not img:
        original = (np.asarray(img), img.getpalette() if mode in ("P", "PA") else None)
        if mode == "1":
            original = (np.asarray(img.convert("L")), None)

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


def _back_to_mode(out: Image.Image, original: tuple[np.ndarray, list[int] | None], mode: str, touched: np.ndarray | None, orientation: int) -> Image.Image:
    """Convert back to a mode that does not round-trip exactly (P, 1, CMYK, ...), changing only touched pixels.

    ``original`` is the input's raw array in its own mode (mode 1 as 0 / 255 gray) and its palette.
    """
    orig_arr, palette = original
    if mode in ("P", "PA"):  # nearest colours of the original palette, which is kept as it was
        pal_img = Image.new("P", (1, 1))
        pal_img.putpalette(palette)
        back = out.convert("RGB").quantize(palette=pal_img, dither=Image.Dither.NONE)
        if mode == "PA":
            back = np.stack([np.asarray(back), np.asarray(out.getchannel("A"))], axis=-1)
    elif mode == "1":
        back = out.convert("L").point(lambda v: 255 if v >= 128 else 0)
    else:
        back = out.convert(mode)
    merged = orig_arr.copy()
    if touched is not None:
        upright_view(merged, orientation)[touched] = upright_view(np.asarray(back), orientation)[touched]
    if mode in ("P", "PA"):
        result = Image.frombytes(mode, (merged.shape[1], merged.shape[0]), merged.tobytes())
        result.putpalette(palette)
    elif mode == "1":
        result = Image.fromarray(merged, "L").convert("1", dither=Image.Dither.NONE)
    else:
        result = Image.frombytes(mode, (merged.shape[1], merged.shape[0]), merged.tobytes())
    return result


_STRIP_PIXELS = 1 << 22  # rows copied at a time from a large PIL image into numpy


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """``(H, W, C)`` writable array of ``img``; large images are copied in strips (no full-size temporary)."""
    w, h = img.size
    if w * h <= _STRIP_PIXELS:
        a = np.array(img)
        return a[..., None] if a.ndim == 2 else a
    first = np.asarray(img.crop((0, 0, w, 1)))
    out = np.empty((h, *first.shape[1:]), dtype=first.dtype)
    step = max(1, _STRIP_PIXELS // w)
    for y in range(0, h, step):
        out[y : y + step] = np.asarray(img.crop((0, y, w, min(h, y + step))))
    return out[..., None] if out.ndim == 2 else out


def _kept_info(info: dict[str, Any], keep_metadata: bool, orientation: int) -> dict[str, Any]:
    """Metadata of an output: only colour and orientation by default; when asked to keep it,
    everything except embedded images of the original (EXIF thumbnail, XMP / maker-note previews,
    Photoshop / multi-picture data)."""
    if keep_metadata:
        kept = {k: v for k, v in info.items() if k not in _NEVER_KEPT and not str(k).startswith("Raw profile type")}
        if "exif" in kept:
            kept["exif"] = strip_thumbnail(kept["exif"])
            if not kept["exif"]:
                del kept["exif"]
        if "xmp" in kept:
            kept["xmp"] = strip_xmp_images(kept["xmp"])
        return kept
    kept: dict[str, Any] = {k: info[k] for k in ("icc_profile", "transparency", "dpi", "gamma") if k in info}
    if orientation != 1:
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        kept["exif"] = exif.tobytes()
    return kept


# info keys never carried to an output: they hold (or point to) other images of the original
_NEVER_KEPT = frozenset({"photoshop", "mp", "mpinfo", "mpoffset", "thumbnail", "extra"})


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
    else:  # float64 stays float64 (exact round trip); half / bfloat16 are exact in float32
        arrays_np = (arrays if arrays.dtype == torch.float64 else arrays.float()).numpy()
    items = arrays_np if batched else arrays_np[None]
    works = [from_array(np.moveaxis(a, 0, -1)) for a in items]

    def restore(outs: list[np.ndarray]) -> Any:
        if not outs:  # an empty batch comes back empty
            return t.detach().clone()
        stacked = np.stack([o if o.ndim == 3 else o[..., None] for o in outs])
        res = torch.from_numpy(np.ascontiguousarray(np.moveaxis(stacked, -1, 1))).to(dtype=t.dtype, device=t.device)
        return res if batched else res[0]

    return works, restore


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file fully decoded, or raise :class:`InvalidImageError` saying why."""
    path = Path(path)
    try:
        if not path.exists():
            raise InvalidImageError(f"{path}: no such file")
        if path.is_dir():
            raise InvalidImageError(f"{path}: is a folder, not an image file")
        if path.stat().st_size == 0:
            raise InvalidImageError(f"{path}: empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            try:
                img.load()
            except BaseException:
                img.close()
                raise
    except InvalidImageError:
        raise
    except Image.DecompressionBombWarning as e:
        raise InvalidImageError(f"{path}: image is larger than {Image.MAX_IMAGE_PIXELS} pixels") from e
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise InvalidImageError(f"{path}: not a readable image ({e})") from e
    except PermissionError as e:
        raise InvalidImageError(f"{path}: cannot be read ({e.strerror})") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError, ZeroDivisionError) as e:
        # decoders raise many types on malformed data (struct.error, IndexError, ... in Pillow's plugins)
        raise InvalidImageError(f"{path}: corrupt or truncated image ({type(e).__name__}: {e})") from e
    return img


# IFD0 tags that locate image data: thumbnails (JPEGInterchangeFormat/Length), strips and sub-IFDs
_IMAGE_DATA_TAGS = (0x0201, 0x0202, 0x0111, 0x0117, 0x0144, 0x0145, 0x014A)
_EMBEDDED_IMAGE = (b"\xff\xd8\xff", b"\x89PNG\r\n", b"GIF8", b"RIFF")


def _holds_image(value: Any) -> bool:
    return isinstance(value, (bytes, bytearray)) and any(sig in value for sig in _EMBEDDED_IMAGE)


def strip_thumbnail(exif_bytes: bytes) -> bytes:
    """EXIF re-serialised without any image of the original: IFD1 (the embedded thumbnail, which
    still shows the original face), image-data pointers in IFD0, and any value holding an encoded
    image (maker-note previews). Unreadable EXIF is dropped entirely (``b""``).

    Pillow writes IFD0 and its sub-IFDs (Exif, GPS, Interop) but never IFD1.
    """
    if not exif_bytes:
        return b""
    try:
        exif = Image.Exif()
        exif.load(bytes(exif_bytes))
        for tag in _IMAGE_DATA_TAGS:
            exif.pop(tag, None)
        for tag in list(exif):
            if _holds_image(exif[tag]):
                del exif[tag]
        for tag in (0x8769, 0x8825):  # Exif and GPS sub-IFDs of IFD0
            if tag in exif:
                sub = {k: v for k, v in exif.get_ifd(tag).items() if not _holds_image(v)}
                if tag == 0x8769 and 0xA005 in sub and not isinstance(sub[0xA005], dict):
                    sub[0xA005] = {k: v for k, v in exif.get_ifd(0xA005).items() if not _holds_image(v)}
                exif[tag] = sub
        out = exif.tobytes()
    except Exception:  # malformed EXIF: keeping none of it is the safe answer
        return b""
    if not out.startswith(b"Exif\x00\x00"):
        out = b"Exif\x00\x00" + out
    return out


_XMP_BASE64 = re.compile(rb"(?:[A-Za-z0-9+/]{40,}={0,2}(?:\s|&#x[aA];|&#10;)*){5,}|[A-Za-z0-9+/]{200,}={0,2}")
_XMP_THUMBS = re.compile(rb"<xmp:Thumbnails\b.*?</xmp:Thumbnails>|<xmp:Thumbnails\b[^>]*/>", re.S)


def strip_xmp_images(xmp: bytes | str) -> bytes | str:
    """XMP without embedded images: ``xmp:Thumbnails`` elements and long base64 runs (Google camera
    depth / original images, ``xmpGImg:image``) are removed."""
    as_str = isinstance(xmp, str)
    data = xmp.encode("utf-8", "surrogateescape") if as_str else bytes(xmp)
    data = _XMP_BASE64.sub(b"", _XMP_THUMBS.sub(b"", data))
    return data.decode("utf-8", "surrogateescape") if as_str else data


FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP", ".gif": "GIF"}
LOSSY = {"JPEG", "WEBP"}

# modes each output format stores faithfully; other modes are converted first (see _encodable)
_SAVE_MODES = {
    "JPEG": {"RGB", "L", "CMYK"},
    "PNG": {"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B"},
    "WEBP": {"RGB", "RGBA"},
    "TIFF": {"1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "I;16", "I;16B", "I;16L", "I", "F", "RGBX"},
    "GIF": {"1", "L", "P", "RGB", "RGBA"},
    "BMP": {"1", "L", "P", "RGB", "RGBA"},
}
_HIGH_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_l(img: Image.Image) -> Image.Image:
    """8-bit gray from a 16-bit, 32-bit or float gray image, scaled (Pillow's own conversion clips)."""
    arr = np.asarray(img)
    if img.mode == "F" or (img.mode == "I" and arr.size and int(arr.max()) <= 255):
        a8 = np.clip(np.round(arr), 0, 255)
    else:
        a8 = np.round(np.clip(arr, 0, 65535).astype(np.float64) * (255.0 / 65535.0))
    return Image.fromarray(a8.astype(np.uint8), "L")


def _encodable(img: Image.Image, fmt: str) -> Image.Image:
    """``img`` in a mode ``fmt`` can store (alpha and gray kept where the format can hold them)."""
    allowed = _SAVE_MODES.get(fmt)
    mode = img.mode
    if allowed is None or mode in allowed:
        return img
    if mode == "I" and "I;16" in allowed:
        arr = np.asarray(img)
        if not arr.size or (int(arr.min()) >= 0 and int(arr.max()) <= 65535):
            return Image.fromarray(arr.astype(np.uint16))
    gray = mode in ("1", "L", "LA", "La", *_HIGH_BIT)
    alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info)
    for target in (["LA", "RGBA"] if gray and alpha else ["L", "RGB"] if gray else ["RGBA"] if alpha else []) + ["RGB"]:
        if target in allowed:
            break
    if mode in _HIGH_BIT:
        return _to_l(img).convert(target) if target != "L" else _to_l(img)
    if mode == "La":
        img = img.convert("LA")
    elif mode == "RGBa":
        img = img.convert("RGBA")
    return img.convert(target)


def _shallow_copy(img: Image.Image) -> Image.Image:
    """A plain :class:`Image.Image` sharing ``img``'s pixels (a 100 MP photo is not duplicated to be
    saved); none of a file plugin's state (TIFF tags, JPEG APP segments) comes along."""
    img.load()
    try:
        clone = img._new(img.im)  # Pillow's own shallow constructor (used by its methods)
    except Exception:
        return img.copy()
    return clone if type(clone) is Image.Image else img.copy()


def format_for(path: str | os.PathLike) -> str:
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise OutputError(f"{path}: unknown output extension {ext!r}; use one of {', '.join(sorted(FORMATS))}")
    return FORMATS[ext]


def encode(img: Image.Image, fmt: str, quality: int | None = None, lossless: bool = False, keep_metadata: bool = False) -> bytes:
    """Encode ``img`` to bytes in format ``fmt``, converting modes the format cannot hold.

    Written metadata: the colour profile (and PNG transparency) always; with ``keep_metadata`` also
    EXIF (never its thumbnail or embedded previews) and XMP (never its embedded images). Nothing
    else of ``img.info`` (comments, text chunks, IPTC, maker previews) reaches the output.
    """
    if lossless and fmt == "JPEG":
        raise OutputError("JPEG cannot be lossless; choose png, webp (with lossless) or tiff")
    if quality is not None and not 1 <= int(quality) <= 100:
        raise OutputError(f"quality must be in 1..100, got {quality}")
    info = img.info
    try:
        clean = _encodable(img, fmt)
        if clean is img:
            clean = _shallow_copy(img)
    except (OSError, ValueError) as e:
        raise OutputError(f"cannot convert a {img.mode} image for {fmt}: {e}") from e
    clean.info = {}  # the encoders fall back to im.info for some fields (JPEG comment, ...): nothing there
    kwargs: dict[str, Any] = {}
    if "icc_profile" in info and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        kwargs["icc_profile"] = info["icc_profile"]
    if keep_metadata and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        exif = strip_thumbnail(info["exif"]) if info.get("exif") else b""
        if exif:
            kwargs["exif"] = exif
        if info.get("xmp"):
            kwargs["xmp"] = strip_xmp_images(info["xmp"])
    q = 95 if quality is None else int(quality)
    if fmt == "JPEG":
        kwargs.update(quality=q, subsampling=0 if q >= 90 else 2)
    elif fmt == "WEBP":
        kwargs.update(lossless=lossless, quality=100 if lossless else q)
    elif fmt == "PNG":
        kwargs.update(optimize=False)
        if "transparency" in info and clean.mode in ("P", "L", "RGB", "1"):
            kwargs["transparency"] = info["transparency"]
    elif fmt == "GIF" and "transparency" in info and clean.mode == "P":
        kwargs["transparency"] = info["transparency"]
    buf = io.BytesIO()
    try:
        clean.save(buf, format=fmt, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OutputError(f"cannot encode a {img.mode} image as {fmt}: {e}") from e
    return buf.getvalue()


TEMP_SUFFIX = ".part"


def _temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}."


_UMASK_LOCK = threading.Lock()


def atomic_write(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    The temporary file is hidden and named ``.<name>.<pid>.<random>.part``: never an image a later
    run would pick up, and removable by :func:`remove_stale_temp_files` once its process is gone.
    The file gets the permissions a plain ``open(path, "wb")`` would give (``0o666`` less the umask),
    not ``mkstemp``'s owner-only ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    """The process umask. Read from ``/proc/self/status`` where it exists (Linux): setting and restoring
    it, the only portable way, briefly changes it for every thread of the process."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort; not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+\.part$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Remove temporary files :func:`atomic_write` left behind when its process was killed.

    Only files named like ours whose writing process no longer runs are removed, so a run writing
    into the same folder at the same time keeps its files. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.rglob(f".*{TEMP_SUFFIX}") if recursive else folder.glob(f".*{TEMP_SUFFIX}"):
        m = _TEMP_NAME.match(p.name)
        if m and p.is_file() and not p.is_symlink() and not _pid_alive(int(m.group(1))):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def bake_orientation(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation to the pixels (for outputs that will carry no EXIF); the result has no
    ``exif`` in its info. ``img`` itself when it is upright and has no EXIF (no 100 MP copy)."""
    if "exif" not in img.info and exif_orientation(img) == 1:
        return img
    out = ImageOps.exif_transpose(img)
    if out is None:
        return img
    out.info = {k: v for k, v in img.info.items() if k != "exif"}
    return out

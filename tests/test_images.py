"""Image modes, bit depths, alpha and EXIF orientation through the pipeline."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from featdeid.errors import InvalidImageError
from featdeid.pipeline import Deidentifier


@pytest.fixture(scope="module")
def runner(random_model):
    return Deidentifier(random_model, detector="dlib")


@pytest.fixture(scope="module")
def photo(group_photos):
    return Image.open(group_photos[1]).convert("RGB")


def _changed(a, b):
    return np.any(np.asarray(a, dtype=np.int64) != np.asarray(b, dtype=np.int64))


def test_grayscale_rgba_palette_cmyk(runner, photo):
    for mode in ("L", "RGBA", "P", "CMYK", "LA"):
        img = photo.convert(mode)
        if mode == "RGBA":
            alpha = np.full(img.size[::-1], 255, np.uint8)
            alpha[:40] = 7
            img.putalpha(Image.fromarray(alpha))
        out, rep = runner(img, seed=0, return_report=True)
        assert out.mode == img.mode and out.size == img.size, mode
        assert rep.changed >= 1 and _changed(out, img), mode
        if mode in ("RGBA", "LA"):
            assert np.array_equal(np.asarray(out)[..., -1], np.asarray(img)[..., -1])
        if mode == "P":
            assert out.getpalette() == img.getpalette()


def test_sixteen_bit(runner, photo):
    arr16 = (np.asarray(photo.convert("L")).astype(np.uint16) * 257)
    out = runner(arr16, seed=0)
    assert out.dtype == np.uint16 and out.shape == arr16.shape and _changed(out, arr16)
    png = io.BytesIO()
    Image.fromarray(arr16).save(png, format="PNG")
    img16 = Image.open(png)
    out_img = runner(img16, seed=0)
    assert out_img.mode == img16.mode and np.asarray(out_img).dtype == np.asarray(img16).dtype
    rgb16 = np.repeat(arr16[..., None], 3, axis=2)
    out_rgb16 = runner(rgb16, seed=0)
    assert out_rgb16.dtype == np.uint16 and out_rgb16.shape == rgb16.shape


def test_float_array(runner, photo):
    arr = np.asarray(photo).astype(np.float32) / 255
    out = runner(arr, seed=0)
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1 and _changed(out, arr)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(runner, photo, orientation):
    """The face is found in the upright view; the raw pixels stay in the stored orientation."""
    upright = photo
    inverse = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}
    raw = upright if inverse[orientation] is None else upright.transpose(inverse[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    raw.save(buf, format="PNG", exif=exif.tobytes())
    img = Image.open(buf)
    assert np.array_equal(np.asarray(ImageOps.exif_transpose(img)), np.asarray(upright))
    out, rep = runner(img, seed=0, return_report=True)
    assert rep.changed == 2 and out.size == img.size
    assert out.getexif().get(0x0112, 1) == orientation
    ref = runner(upright, seed=0)
    assert np.array_equal(np.asarray(ImageOps.exif_transpose(out)), np.asarray(ref))


def test_bad_inputs(runner):
    for bad in (np.zeros((0, 5, 3), np.uint8), np.zeros((4, 4, 5), np.uint8), np.zeros((4, 4, 3), np.int64), np.full((8, 8, 3), np.nan, np.float32), "not an image"):
        with pytest.raises(InvalidImageError):
            runner(bad if not isinstance(bad, str) else 12345)
    tiny = np.zeros((1, 1, 3), np.uint8)
    out, rep = runner(tiny, return_report=True)
    assert np.array_equal(out, tiny) and rep.faces == []

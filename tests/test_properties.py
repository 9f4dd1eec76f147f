"""Property-based tests of the array, tensor and PIL API (hypothesis).

A random model and user-given ``faces=`` (so no detector runs and every example is fast): any
shape, dtype, value range, face placement, strength and seed in -> the same type, shape, dtype
(mode) out, the input untouched, and every pixel outside the pasted faces bit-identical — or a
clear featdeid error (:class:`InvalidImageError` for the image, :class:`ConfigError` for options).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from featdeid.errors import ConfigError, InvalidImageError
from featdeid.faces import frame
from featdeid.faces.paste import face_region
from featdeid.images import FLOAT_SLACK
from featdeid.pipeline import Deidentifier

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

GOOD_DTYPES = (np.uint8, np.uint16, np.float16, np.float32, np.float64)
BAD_DTYPES = (np.int8, np.int16, np.int32, np.int64, np.uint32, np.bool_, np.complex64)


@pytest.fixture(scope="module")
def runner(random_model) -> Deidentifier:
    return Deidentifier(random_model, detector="dlib", min_face_size=4)


@st.composite
def faces_for(draw, h: int, w: int) -> np.ndarray:
    """0-3 faces: the canonical template rotated, scaled and moved anywhere near (or off) the image;
    now and then a degenerate one (all five points together)."""
    n = draw(st.integers(0, 3))
    side = max(h, w)
    out = []
    for _ in range(n):
        if draw(st.integers(0, 19)) == 0:
            p = [draw(st.floats(-50, 150)), draw(st.floats(-50, 150))]
            out.append(np.tile(p, (5, 1)))
            continue
        size = draw(st.floats(2.0, 2.5 * side))
        angle = draw(st.floats(-math.pi, math.pi))
        cx = draw(st.floats(-0.4 * w, 1.4 * w))
        cy = draw(st.floats(-0.4 * h, 1.4 * h))
        t = frame.template(1.0) - 0.5
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        out.append(t @ rot.T * size + [cx, cy])
    return np.asarray(out, dtype=np.float64).reshape(-1, 5, 2)


def _degenerate(faces: np.ndarray) -> bool:
    return any(float(np.ptp(f, axis=0).max()) < 1e-3 for f in faces)


def _written(report, hw: tuple[int, int], size: int, pad: int = 3) -> np.ndarray:
    """Pixels paste-back may have written: changed faces' mask support, grown by 2 px for resampling
    (on a canvas ``pad`` px larger, so a face just off the edge grows into the image too).

    ``face_region`` point-samples the mask, which can miss a face of a few pixels entirely; for
    those the whole box paste-back works in (``frame_bbox``) stands in.
    """
    h, w = hw
    region = np.zeros((h + 2 * pad, w + 2 * pad), dtype=bool)
    for f in report.faces:
        if f.status != "changed":
            continue
        m = frame.shift(frame.alignment_matrix(f.face.landmarks, size), -pad, -pad)
        if size / frame.frame_scale(m) < 16:
            box = frame.frame_bbox(m, size, region.shape)
            if box is not None:
                x0, y0, x1, y1 = box
                region[y0:y1, x0:x1] = True
            continue
        region |= face_region(m, size, region.shape)
    grown = region.copy()
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            grown |= np.roll(np.roll(region, dy, 0), dx, 1)  # the padding keeps wrap-around harmless
    return grown[pad : pad + h, pad : pad + w]


def _fill(rng: np.random.Generator, shape: tuple[int, ...], dtype, value_range: str) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind == "f" or dt.kind == "c":
        lo, hi = {"unit": (0.0, 1.0), "slight": (-FLOAT_SLACK / 2, 1 + FLOAT_SLACK / 2), "0-255": (0.0, 255.0), "normalised": (-2.1, 2.6)}[value_range]
        arr = rng.uniform(lo, hi, shape)
        if value_range == "unit" and rng.random() < 0.05:
            arr.flat[0] = np.nan
        return arr.astype(dt)
    if dt == np.bool_:
        return rng.random(shape) > 0.5
    info = np.iinfo(dt)
    return rng.integers(info.min, int(info.max) + 1, shape, dtype=dt)


@settings(max_examples=70, **SETTINGS)
@given(
    h=st.integers(1, 80), w=st.integers(1, 80), layout=st.sampled_from(["HW", 1, 2, 3, 4]),
    dtype=st.sampled_from(GOOD_DTYPES + BAD_DTYPES), value_range=st.sampled_from(["unit", "unit", "slight", "0-255", "normalised"]),
    fill_seed=st.integers(0, 2**32 - 1), strength=st.floats(0, 2.5), seed=st.integers(-(2**70), 2**70), data=st.data(),
)
def test_arrays(runner, h, w, layout, dtype, value_range, fill_seed, strength, seed, data):
    shape = (h, w) if layout == "HW" else (h, w, layout)
    arr = _fill(np.random.default_rng(fill_seed), shape, dtype, value_range)
    faces = data.draw(faces_for(h, w))
    before = arr.copy()
    bad_image = np.dtype(dtype) not in map(np.dtype, GOOD_DTYPES) or (
        arr.dtype.kind == "f" and (not np.isfinite(arr).all() or arr.min() < -FLOAT_SLACK or arr.max() > 1 + FLOAT_SLACK)
    )
    if bad_image:
        with pytest.raises(InvalidImageError):
            runner(arr, strength=strength, seed=seed, faces=faces)
        return
    if _degenerate(faces):
        with pytest.raises(ConfigError):
            runner(arr, strength=strength, seed=seed, faces=faces)
        return
    out, report = runner(arr, strength=strength, seed=seed, faces=faces, return_report=True)
    assert type(out) is np.ndarray and out.shape == arr.shape and out.dtype == arr.dtype
    assert np.array_equal(arr, before, equal_nan=True), "the input was modified"
    assert len(report.faces) == len(faces)
    written = _written(report, (h, w), runner.model.image_size)
    o3, a3 = (out[..., None], arr[..., None]) if layout == "HW" else (out, arr)
    assert np.array_equal(o3[~written], a3[~written]), "a pixel outside the faces changed"
    if layout in (2, 4):
        assert np.array_equal(o3[..., -1], a3[..., -1]), "alpha changed"
    if arr.dtype.kind == "f":
        assert np.isfinite(out).all()
        assert out.min() >= min(0.0, float(arr.min())) and out.max() <= max(1.0, float(arr.max()))
    if strength == 0:
        assert np.array_equal(out, arr)


@settings(max_examples=25, **SETTINGS)
@given(
    batch=st.sampled_from([None, 1, 2]), c=st.sampled_from([1, 3, 4]), h=st.integers(1, 64), w=st.integers(1, 64),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int32]),
    fill_seed=st.integers(0, 2**31 - 1), seed=st.integers(0, 2**63), data=st.data(),
)
def test_tensors(runner, batch, c, h, w, dtype, fill_seed, seed, data):
    g = torch.Generator().manual_seed(fill_seed)
    shape = (c, h, w) if batch is None else (batch, c, h, w)
    t = (torch.rand(shape, generator=g) * 255).to(dtype) if not dtype.is_floating_point else torch.rand(shape, generator=g).to(dtype)
    faces = data.draw(faces_for(h, w))
    before = t.clone()
    if dtype == torch.int32:
        with pytest.raises(InvalidImageError):
            runner(t, seed=seed, faces=faces)
        return
    if _degenerate(faces):
        with pytest.raises(ConfigError):
            runner(t, seed=seed, faces=faces)
        return
    out, reports = runner(t, seed=seed, faces=faces, return_report=True)
    assert isinstance(out, torch.Tensor) and out.shape == t.shape and out.dtype == t.dtype
    assert torch.equal(t, before)
    for i, rep in enumerate([reports] if batch is None else reports):
        written = torch.from_numpy(_written(rep, (h, w), runner.model.image_size))
        a = t if batch is None else t[i]
        b = out if batch is None else out[i]
        assert torch.equal(a[:, ~written], b[:, ~written])
        if c == 4:
            assert torch.equal(a[3], b[3])


MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "I;16B", "F"]


def _pil(mode: str, rgb: np.ndarray) -> Image.Image:
    base = Image.fromarray(rgb)
    if mode == "P":
        return base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if mode in ("I;16", "I;16B"):
        return Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).convert(mode) if mode != "I;16" else Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    if mode == "I":
        return Image.fromarray(rgb[..., 0].astype(np.int32) * 200, "I")
    if mode == "F":
        return Image.fromarray(rgb[..., 0].astype(np.float32), "F")
    if mode in ("RGBa", "La"):
        return base.convert("RGBA" if mode == "RGBa" else "LA").convert(mode)
    return base.convert(mode)


@settings(max_examples=40, **SETTINGS)
@given(mode=st.sampled_from(MODES), h=st.integers(1, 72), w=st.integers(1, 72), fill_seed=st.integers(0, 2**32 - 1),
       orientation=st.integers(1, 8), data=st.data())
def test_pil_modes(runner, mode, h, w, fill_seed, orientation, data):
    rgb = np.random.default_rng(fill_seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = _pil(mode, rgb)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.info["exif"] = exif.tobytes()
    upright_hw = (h, w) if orientation < 5 else (w, h)
    faces = data.draw(faces_for(*upright_hw))
    before = np.asarray(img).copy()
    if _degenerate(faces):
        with pytest.raises(ConfigError):
            runner(img, seed=0, faces=faces)
        return
    out, report = runner(img, seed=0, faces=faces, return_report=True)
    assert isinstance(out, Image.Image) and out.mode == img.mode and out.size == img.size
    assert np.array_equal(np.asarray(img), before)
    if mode in ("P", "PA"):
        assert out.getpalette() == img.getpalette()
    # the changed pixels, mapped back from the upright view to the stored orientation
    from featdeid.images import upright_view

    written = np.zeros((h, w), dtype=bool)
    upright_view(written, orientation)[...] = _written(report, upright_hw, runner.model.image_size)
    a, b = np.asarray(img), np.asarray(out)
    assert np.array_equal(a[~written], b[~written]), "a pixel outside the faces changed"

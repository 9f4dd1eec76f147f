"""Canonical frame: similarity alignment, recogniser sub-windows, masks, paste-back."""

from __future__ import annotations

import numpy as np
import torch

from featdeid.faces import frame
from featdeid.faces.paste import face_mask, paste


def test_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    ang, s, t = 0.3, 1.7, np.array([12.0, -4.0])
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    dst = src @ (s * rot).T + t
    m = frame.similarity_transform(src, dst)
    assert np.allclose(m[:, :2], s * rot) and np.allclose(m[:, 2], t)
    assert np.isclose(frame.frame_scale(m), s)


def test_template_maps_to_itself_and_arcface_window():
    tpl = frame.template(256)
    m = frame.alignment_matrix(tpl, 256)
    assert np.allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-9)
    x0, y0, x1, y1 = frame.arcface_box_in_frame()
    arc = (frame.ARCFACE_112 / 112.0) * (x1 - x0) + np.array([x0, y0])
    assert np.allclose(arc * 256, tpl)


def test_crop_window_equals_direct_arcface_alignment():
    """Cropping the ArcFace window from the frame equals aligning straight to the 112 template."""
    torch.manual_seed(0)
    img = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8), size=(400, 400), mode="bicubic")[0]
    landmarks = frame.ARCFACE_112 * 2.2 + np.array([60.0, 50.0])
    direct = frame.warp(img, frame.similarity_transform(landmarks, frame.ARCFACE_112), (112, 112))
    for size, tol in ((160, 1e-3), (512, 1e-2)):  # ~1:1 window; 3x larger (low-passed before sampling)
        frm = frame.warp(img, frame.alignment_matrix(landmarks, size), (size, size))
        via_frame = frame.crop_window(frm, (0, 0, 112, 112), (112, 112))
        assert (via_frame - direct).abs().mean() < tol


def test_crop_window_is_differentiable():
    frames = torch.rand(2, 3, 128, 128, requires_grad=True)
    frame.crop_window(frames, (8, 0, 104, 112), (112, 96)).sum().backward()
    assert frames.grad is not None and frames.grad.abs().sum() > 0


def test_mask_is_feathered_and_zero_at_borders():
    m = face_mask(128)[0, 0]
    assert m.max() == 1 and m[0].max() == 0 and m[:, 0].max() == 0 and m[-1].max() == 0
    assert ((m > 0) & (m < 1)).sum() > 100  # a soft edge, not a hard cut


def test_paste_changes_only_inside_the_mask():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    before = image.copy()
    landmarks = frame.ARCFACE_112 * 1.2 + np.array([150.0, 90.0])
    m = frame.alignment_matrix(landmarks, 64)
    res = torch.full((1, 3, 64, 64), 0.2)
    box, inside = paste(image, res, m, 64)
    changed = np.any(image != before, axis=2)
    x0, y0, x1, y1 = box
    assert changed.sum() > 1000
    assert not changed[:y0].any() and not changed[y1:].any() and not changed[:, :x0].any() and not changed[:, x1:].any()
    assert not (changed[y0:y1, x0:x1] & ~inside).any()

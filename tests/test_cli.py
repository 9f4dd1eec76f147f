"""The featdeid command: folders, formats, metadata stripping, never touching inputs, failures."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def photo_tree(tmp_path, group_photos):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    img = Image.open(group_photos[1])
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"  # Make
    exif[0x0110] = "SerialCam 9000"  # Model
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (52.0, 31.0, 12.0)
    gps[3], gps[4] = "E", (13.0, 24.0, 36.0)
    img.save(root / "a.jpg", exif=exif.tobytes(), quality=95)
    shutil.copy(group_photos[2], root / "sub" / "b.jpg")
    img.save(root / "sub" / "c.png", pnginfo=_pnginfo())
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("ignored")
    return root


def _pnginfo():
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Jane Doe")
    info.add_text("Location", "52.52N 13.40E")
    return info


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featdeid.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_folder_run_report_metadata_and_inputs_untouched(photo_tree, tmp_path, model_dir):
    before = {p: _sha(p) for p in photo_tree.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    r = run_cli(str(photo_tree), "-o", str(out), "--model", str(model_dir), "--detector", "dlib", "--report", str(report), "-q")
    assert r.returncode == 1, r.stderr  # two bad files
    assert "Traceback" not in r.stderr
    rep = json.loads(report.read_text())
    status = {Path(f["input"]).name: f["status"] for f in rep["files"]}
    assert status == {"a.jpg": "ok", "b.jpg": "ok", "c.png": "ok", "broken.jpg": "error", "empty.png": "error"}
    assert rep["summary"]["faces_changed"] >= 4
    assert {p: _sha(p) for p in photo_tree.rglob("*") if p.is_file()} == before
    a = Image.open(out / "a.jpg")
    exif = a.getexif()
    assert 0x010F not in exif and 0x0110 not in exif and not exif.get_ifd(0x8825)
    assert "exif" not in a.info and "xmp" not in a.info
    c = Image.open(out / "sub" / "c.png")
    assert "Author" not in c.info and "Location" not in c.info
    assert c.size == Image.open(photo_tree / "sub" / "c.png").size
    assert not list(out.rglob("*.part"))
    # resume: existing outputs are skipped, nothing rewritten
    mtime = (out / "a.jpg").stat().st_mtime_ns
    r2 = run_cli(str(photo_tree / "a.jpg"), "-o", str(out), "--model", str(model_dir), "--detector", "dlib", "-q", "--report", str(report))
    assert r2.returncode == 0 and json.loads(report.read_text())["files"][0]["status"] == "exists"
    assert (out / "a.jpg").stat().st_mtime_ns == mtime


def test_keep_metadata_drops_thumbnail_only(photo_tree, tmp_path, model_dir):
    out = tmp_path / "out"
    r = run_cli(str(photo_tree / "a.jpg"), "-o", str(out), "--model", str(model_dir), "--detector", "dlib", "--keep-metadata", "-q")
    assert r.returncode == 0, r.stderr
    exif = Image.open(out / "a.jpg").getexif()
    assert exif.get(0x010F) == "CameraMaker" and exif.get_ifd(0x8825)


def test_format_and_lossless(photo_tree, tmp_path, model_dir):
    out = tmp_path / "out"
    r = run_cli(str(photo_tree / "a.jpg"), "-o", str(out), "--model", str(model_dir), "--detector", "dlib", "--format", "png", "-q")
    assert r.returncode == 0 and (out / "a.png").is_file()
    assert Image.open(out / "a.png").format == "PNG"
    r = run_cli(str(photo_tree / "a.jpg"), "-o", str(tmp_path / "o2"), "--model", str(model_dir), "--format", "jpg", "--lossless", "-q")
    assert r.returncode == 1 and "lossless" in r.stderr
    assert not (tmp_path / "o2" / "a.jpg").exists()


def test_refuses_output_inside_input_and_missing_input(photo_tree, model_dir):
    r = run_cli(str(photo_tree), "-o", str(photo_tree / "out"), "--model", str(model_dir))
    assert r.returncode == 2 and "inside input" in r.stderr
    r = run_cli(str(photo_tree / "nope.jpg"), "-o", str(photo_tree.parent / "x"), "--model", str(model_dir))
    assert r.returncode == 2 and "not found" in r.stderr
    r = run_cli(str(photo_tree / "a.jpg"), "-o", str(photo_tree.parent / "x"), "--model", str(photo_tree.parent / "no-model"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_pixels_outside_faces_unchanged_in_png_output(photo_tree, tmp_path, model_dir):
    out = tmp_path / "out"
    r = run_cli(str(photo_tree / "sub" / "c.png"), "-o", str(out), "--model", str(model_dir), "--detector", "dlib", "-q")
    assert r.returncode == 0, r.stderr
    a = np.asarray(Image.open(photo_tree / "sub" / "c.png").convert("RGB")).astype(int)
    b = np.asarray(Image.open(out / "c.png").convert("RGB")).astype(int)
    changed = np.any(a != b, axis=2)
    assert 0 < changed.mean() < 0.3

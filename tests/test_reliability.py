"""Reliability and security: bad and odd input, nothing lost, private outputs, safe loading.

Everything goes through the three front ends a user has: ``deidentify`` / ``Deidentifier``, the
``datasets`` transform on a dict batch, and the ``featdeid`` command (run as a subprocess, as a user
would). The CLI is run a few times over whole folders, not once per case, to keep this file fast.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageOps, ImageSequence, IptcImagePlugin, PngImagePlugin

import featdeid
from featdeid import images
from featdeid.errors import ConfigError, FeatdeidError, InvalidImageError, OutputError, UnsafeWeightsError
from featdeid.pipeline import Deidentifier

try:
    from tests.stress.mosaic import face_mosaic
except ImportError:
    from stress.mosaic import face_mosaic

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- helpers


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featdeid.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, random_model) -> Path:
    return random_model.save_pretrained(tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def runner(random_model) -> Deidentifier:
    return Deidentifier(random_model, detector="dlib")


@pytest.fixture(scope="module")
def photo(group_photos) -> Image.Image:
    """675 x 469, two faces dlib finds."""
    return Image.open(group_photos[1]).convert("RGB")


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=kw.pop("quality", 92), **kw)
    return buf.getvalue()


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _tiff_exif(ifd0: list, exif_ifd: list, gps_ifd: list, thumbnail: bytes) -> bytes:
    """A little-endian TIFF/EXIF block written by hand: IFD0 -> Exif IFD, GPS IFD; IFD1 with a JPEG
    thumbnail (JPEGInterchangeFormat / Length), which is what cameras embed and Pillow never writes.

    Entries are ``(tag, type, count, value bytes)``; types: 2 ASCII, 3 SHORT, 4 LONG, 5 RATIONAL, 7 UNDEFINED.
    """

    def size(entries):
        return 2 + 12 * len(entries) + 4 + sum(len(d) + len(d) % 2 for *_, d in entries if len(d) > 4)

    ifd0 = ifd0 + [(0x8769, 4, 1, b"\0" * 4), (0x8825, 4, 1, b"\0" * 4)]
    ifd1 = [(0x0103, 3, 1, struct.pack("<H", 6)), (0x0201, 4, 1, b"\0" * 4), (0x0202, 4, 1, struct.pack("<I", len(thumbnail)))]
    off0 = 8
    off_exif = off0 + size(ifd0)
    off_gps = off_exif + size(exif_ifd)
    off1 = off_gps + size(gps_ifd)
    off_thumb = off1 + size(ifd1)
    pointers = {0x8769: off_exif, 0x8825: off_gps, 0x0201: off_thumb}

    def block(entries, offset, next_ifd):
        entries = sorted((t, ty, c, struct.pack("<I", pointers[t]) if t in pointers and ty == 4 and c == 1 and d == b"\0" * 4 else d) for t, ty, c, d in entries)
        head, extra = struct.pack("<H", len(entries)), b""
        data_at = offset + 2 + 12 * len(entries) + 4
        for tag, typ, count, data in entries:
            if len(data) <= 4:
                head += struct.pack("<HHI", tag, typ, count) + data.ljust(4, b"\0")
            else:
                head += struct.pack("<HHII", tag, typ, count, data_at + len(extra))
                extra += data + b"\0" * (len(data) % 2)
        return head + struct.pack("<I", next_ifd) + extra

    tiff = b"II*\0" + struct.pack("<I", off0)
    tiff += block(ifd0, off0, off1) + block(exif_ifd, off_exif, 0) + block(gps_ifd, off_gps, 0) + block(ifd1, off1, 0)
    assert len(tiff) == off_thumb
    return tiff + thumbnail


def _ascii(tag: int, text: str):
    data = text.encode() + b"\0"
    return (tag, 2, len(data), data)


def _rational3(tag: int, values):
    return (tag, 5, 3, b"".join(struct.pack("<II", int(v * 100), 100) for v in values))


THUMB_SIZE = (96, 64)


def exif_with_thumbnail(photo: Image.Image, orientation: int | None = None) -> tuple[bytes, bytes]:
    """``(EXIF block with "Exif\\0\\0", the JPEG thumbnail in it)``: camera, serial, GPS, a maker note
    holding a JPEG preview, and an IFD1 thumbnail of the photo (which shows the original faces)."""
    thumb = _jpeg(photo.resize(THUMB_SIZE), quality=60)
    preview = _jpeg(photo.resize((48, 32)), quality=50)
    ifd0 = [_ascii(0x010F, "CameraMaker"), _ascii(0x0110, "SerialCam 9000"), _ascii(0x0131, "firmware 1.2")]
    if orientation:
        ifd0.append((0x0112, 3, 1, struct.pack("<H", orientation)))
    exif_ifd = [_ascii(0xA431, "BODY-SN-123456"), _ascii(0x9003, "2021:05:04 12:34:56"),
                (0x927C, 7, len(b"MAKER\0" + preview), b"MAKER\0" + preview)]
    gps = [_ascii(0x0001, "N"), _rational3(0x0002, (52, 31, 12)), _ascii(0x0003, "E"), _rational3(0x0004, (13, 24, 36))]
    return b"Exif\0\0" + _tiff_exif(ifd0, exif_ifd, gps, thumb), thumb


XMP = (
    b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>'
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
    b'xmlns:xmpGImg="http://ns.adobe.com/xap/1.0/g/img/" xmlns:exif="http://ns.adobe.com/exif/1.0/">'
    b"<dc:creator><rdf:Seq><rdf:li>Jane Doe</rdf:li></rdf:Seq></dc:creator>"
    b"<exif:GPSLatitude>52,31.2N</exif:GPSLatitude>"
    b"<xmp:Thumbnails><rdf:Alt><rdf:li rdf:parseType=\"Resource\"><xmpGImg:format>JPEG</xmpGImg:format>"
    b"<xmpGImg:image>%s</xmpGImg:image></rdf:li></rdf:Alt></xmp:Thumbnails>"
    b"</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end=\"w\"?>"
)


def _iptc() -> bytes:
    """Photoshop APP13 payload: an 8BIM IPTC-NAA resource with by-line, caption and city."""
    records = b""
    for dataset, value in ((80, b"Jane Doe"), (120, b"secret caption"), (90, b"Berlin")):
        records += b"\x1c\x02" + bytes([dataset]) + struct.pack(">H", len(value)) + value
    res = b"8BIM" + struct.pack(">H", 0x0404) + b"\0\0" + struct.pack(">I", len(records)) + records + b"\0" * (len(records) % 2)
    return b"Photoshop 3.0\0" + res


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def private_jpeg(photo: Image.Image, orientation: int | None = None) -> bytes:
    """A JPEG as a phone writes it: EXIF with IFD1 thumbnail, XMP with a thumbnail, IPTC, a comment."""
    exif, thumb = exif_with_thumbnail(photo, orientation)
    body = _jpeg(photo, comment=b"shot at Jane's home")
    xmp = XMP % base64.encodebytes(thumb).replace(b"\n", b"&#xA;")
    segments = _segment(0xE1, exif) + _segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0" + xmp) + _segment(0xED, _iptc())
    return body[:2] + segments + body[2:]


def private_png(photo: Image.Image) -> bytes:
    exif, _ = exif_with_thumbnail(photo)
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "Jane Doe")  # tEXt
    info.add_itxt("Description", "Jane at home, 52.52N 13.40E", lang="en")  # iTXt
    info.add_text("Comment", "GPS 52.52N 13.40E " * 20, zip=True)  # zTXt
    info.add_itxt("XML:com.adobe.xmp", (XMP % b"AAAA").decode())
    return _png(photo, pnginfo=info, exif=exif)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb's shape)."""
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        kinds.append(kind)
        pos += 12 + length
    return kinds


def jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """``(marker, payload)`` of every segment before the image data."""
    assert data[:2] == b"\xff\xd8"
    pos, out = 2, []
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xDA:
            break
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        out.append((marker, data[pos + 4 : pos + 2 + length]))
        pos += 2 + length
    return out


def assert_no_private_metadata(path: Path, keep: bool = False) -> None:
    """Read an output back: no thumbnail or preview image anywhere, no GPS / serial unless kept."""
    data = path.read_bytes()
    assert data.count(b"\xff\xd8\xff") == (1 if data[:2] == b"\xff\xd8" else 0), "an embedded JPEG survived"
    for needle in (b"shot at", b"secret caption", b"Photoshop 3.0", b"8BIM", b"MAKER\0", b"xmpGImg:image", b"Berlin", b"/9j/"):
        assert needle not in data, needle  # comment, IPTC, maker note, XMP thumbnail: never kept
    if not keep:
        assert b"Jane" not in data and b"52,31.2N" not in data and b"xmpmeta" not in data
    img = Image.open(path)
    exif = img.getexif()
    assert not exif.get_ifd(ExifTags.IFD.IFD1), "EXIF IFD1 (thumbnail) survived"
    assert 0x0201 not in exif and 0x927C not in exif.get_ifd(ExifTags.IFD.Exif)
    if keep:
        assert exif.get(0x010F) == "CameraMaker" and exif.get_ifd(ExifTags.IFD.GPSInfo)
        assert exif.get_ifd(ExifTags.IFD.Exif).get(0xA431) == "BODY-SN-123456"
    else:
        assert not exif or set(exif) <= {0x0112}, dict(exif)
        assert b"CameraMaker" not in data and b"BODY-SN" not in data and b"SerialCam" not in data
        assert "xmp" not in img.info and "exif" not in img.info and "comment" not in img.info
    if img.format == "JPEG":
        assert IptcImagePlugin.getiptcinfo(img) is None
        assert not [m for m, _ in jpeg_segments(data) if m in (0xED, 0xFE)], "APP13 / COM survived"
    if img.format == "PNG":
        assert not {b"tEXt", b"iTXt", b"zTXt"} & set(png_chunks(data))
        assert (b"eXIf" in png_chunks(data)) == keep


# ------------------------------------------------------------------------ bad and odd input: the CLI


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory, photo, group_photos) -> Path:
    """One folder holding every kind of bad and odd input, run through the CLI once."""
    root = tmp_path_factory.mktemp("odd") / "in"
    root.mkdir()
    good_jpeg = _jpeg(photo)
    good_png = _png(photo)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + os.urandom(3000))
    (root / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (root / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    (root / "corrupt.png").write_bytes(good_png[:8] + os.urandom(2000))
    (root / "text.png").write_text("this is not an image\n" * 10)
    (root / "script.jpeg").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "zero.png").write_bytes(b"")
    (root / "bomb.png").write_bytes(png_claiming(30000, 20000))  # 600 MP: beyond Pillow's hard limit
    (root / "huge.png").write_bytes(png_claiming(17000, 13000))  # 221 MP: beyond featdeid's 200 MP
    (root / "zero.jpg").write_bytes(b"")
    Image.new("RGB", (1, 1), (10, 20, 30)).save(root / "one.png")
    Image.new("RGB", (10, 10), (10, 20, 30)).save(root / "ten.jpg")
    photo.convert("L").save(root / "gray.jpg", quality=92)
    rgba = photo.convert("RGBA")
    alpha = np.full(rgba.size[::-1], 255, np.uint8)
    alpha[:, :60] = 0
    alpha[:40] = 77
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(root / "alpha.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=200).save(root / "palette.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=128).save(root / "palette.gif")
    photo.convert("CMYK").save(root / "cmyk.jpg", quality=92)
    Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257).save(root / "sixteen.png")
    Image.fromarray(np.full((200, 300, 3), 120, np.uint8)).save(root / "noface.png")
    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), ImageOps.autocontrast(photo)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=[80, 120, 160], loop=0, comment=b"Jane's party")
    # a face cut by the border: the right face of the photo, its left edge cropped away
    arr = np.asarray(photo)
    Image.fromarray(np.ascontiguousarray(arr[:, 360:])).save(root / "border.png")
    # MPO: a camera JPEG with a second (preview) image; the primary image is de-identified, the rest dropped
    mpo = io.BytesIO()
    photo.save(mpo, format="MPO", save_all=True, append_images=[photo.resize((160, 111))])
    (root / "camera_mpo.jpg").write_bytes(mpo.getvalue())
    # EXIF orientations 1-8: stored pixels rotated, EXIF says how to show them
    inverse = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}
    (root / "orient").mkdir()
    for o in range(1, 9):
        raw = photo if o == 1 else photo.transpose(inverse[o])
        exif = Image.Exif()
        exif[0x0112] = o
        raw.save(root / "orient" / f"o{o}.png", exif=exif.tobytes())
    raw6 = photo.transpose(inverse[6])
    exif6 = Image.Exif()
    exif6[0x0112] = 6
    raw6.save(root / "orient" / "o6.jpg", exif=exif6.tobytes(), quality=95)
    return root


BAD = ("corrupt.jpg", "truncated.jpg", "truncated.png", "corrupt.png", "text.png", "script.jpeg", "zero.png", "zero.jpg", "bomb.png", "huge.png")


@pytest.fixture(scope="module")
def odd_run(odd_tree, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("odd_out") / "out"
    report = out.parent / "report.json"
    r = run_cli(str(odd_tree), "-o", str(out), "--model", str(model_dir), "--detector", "dlib", "--seed", "0", "--report", str(report), "-q")
    return r, out, json.loads(report.read_text())


def test_cli_bad_files_are_typed_errors_never_tracebacks(odd_run, odd_tree):
    r, out, rep = odd_run
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    status = {Path(f["input"]).relative_to(odd_tree).as_posix(): f for f in rep["files"]}
    for name in BAD:
        assert status[name]["status"] == "error", name
        assert status[name]["error"].startswith("InvalidImageError: "), status[name]["error"]
        assert not (out / name).exists()
    for name in ("bomb.png", "huge.png"):
        assert "pixels" in status[name]["error"], status[name]["error"]
    errors = {k for k, v in status.items() if v["status"] == "error"}
    assert errors == set(BAD)
    assert rep["summary"]["failed"] == len(BAD) and rep["summary"]["files"] == len(status)
    assert not list(out.rglob("*.part")) and not [p for p in out.rglob(".*")]


def test_cli_odd_images_keep_size_mode_and_alpha(odd_run, odd_tree):
    _, out, rep = odd_run
    status = {Path(f["input"]).name: f for f in rep["files"]}
    for name in ("one.png", "ten.jpg", "noface.png"):
        assert status[name]["status"] == "ok" and status[name]["faces"] == 0
        assert Image.open(out / name).size == Image.open(odd_tree / name).size
    assert np.array_equal(np.asarray(Image.open(out / "noface.png")), np.asarray(Image.open(odd_tree / "noface.png")))
    for name, mode in (("gray.jpg", "L"), ("alpha.png", "RGBA"), ("palette.png", "P"), ("palette.gif", "P"), ("cmyk.jpg", "CMYK"), ("sixteen.png", "I;16")):
        src, dst = Image.open(odd_tree / name), Image.open(out / name)
        assert dst.mode == src.mode == mode and dst.size == src.size, name
        assert status[name]["changed"] == 2, (name, status[name])
        a = np.asarray(src).astype(np.int64)
        b = np.asarray(dst).astype(np.int64)
        if src.format != "JPEG":
            assert (a != b).any() and (a != b).mean() < 0.3, name
    a, b = np.asarray(Image.open(odd_tree / "alpha.png")), np.asarray(Image.open(out / "alpha.png"))
    assert np.array_equal(a[..., 3], b[..., 3])
    assert Image.open(out / "palette.png").getpalette() == Image.open(odd_tree / "palette.png").getpalette()
    six = np.asarray(Image.open(out / "sixteen.png"))
    assert six.dtype == np.uint16 and six.max() > 255  # still 16-bit data, not clipped to 8 bits


def test_cli_border_face_and_mpo(odd_run, odd_tree):
    _, out, rep = odd_run
    status = {Path(f["input"]).name: f for f in rep["files"]}
    border = status["border.png"]
    assert border["status"] == "ok" and border["changed"] >= 1
    boxes = [d["box"] for d in border["details"] if d["status"] == "changed"]
    assert min(b[0] for b in boxes) < 0  # the face cut by the edge was found and changed
    src, dst = np.asarray(Image.open(odd_tree / "border.png")), np.asarray(Image.open(out / "border.png"))
    assert (src[:, :5] != dst[:, :5]).any()
    mpo = status["camera_mpo.jpg"]
    assert mpo["status"] == "ok" and mpo["changed"] == 2
    data = (out / "camera_mpo.jpg").read_bytes()
    assert data.count(b"\xff\xd8\xff") == 1, "the MPO's second image was copied"
    assert Image.open(out / "camera_mpo.jpg").format == "JPEG"


def test_cli_animated_gif_every_frame(odd_run, odd_tree):
    _, out, rep = odd_run
    rec = {Path(f["input"]).name: f for f in rep["files"]}["anim.gif"]
    assert rec["status"] == "ok" and rec["frames"] == 3 and rec["changed"] >= 5  # 2 faces a frame; GIF colours may hide one
    src, dst = Image.open(odd_tree / "anim.gif"), Image.open(out / "anim.gif")
    assert dst.n_frames == 3 and dst.size == src.size
    durations = []
    for fa, fb in zip(ImageSequence.Iterator(src), ImageSequence.Iterator(dst)):
        durations.append(fb.info.get("duration"))
        a = np.asarray(fa.convert("RGB")).astype(int)
        b = np.asarray(fb.convert("RGB")).astype(int)
        assert np.abs(a - b).sum(axis=2).mean() > 0.5  # every frame changed
    assert durations == [80, 120, 160]
    assert b"Jane" not in (out / "anim.gif").read_bytes()


def test_cli_orientations_upright_without_exif(odd_run, odd_tree, runner, photo):
    """Outputs carry no EXIF, so their pixels are made upright: a viewer shows what the input showed."""
    _, out, _ = odd_run
    ref = np.asarray(runner(photo, seed=0))
    for o in range(1, 9):
        img = Image.open(out / "orient" / f"o{o}.png")
        assert "exif" not in img.info and not img.getexif(), o
        assert img.size == photo.size, o
        assert np.array_equal(np.asarray(img), ref), o
    jpg = Image.open(out / "orient" / "o6.jpg")
    assert not jpg.getexif() and jpg.size == photo.size
    upright_in = np.asarray(ImageOps.exif_transpose(Image.open(odd_tree / "orient" / "o6.jpg"))).astype(int)
    got = np.asarray(jpg).astype(int)
    assert np.abs(got - upright_in).mean() < 4  # the same orientation (a rotated result would differ by ~50)


# ----------------------------------------------------------------- bad and odd input: API and transform


def test_api_bad_files_and_animation(odd_tree, runner):
    for name in BAD:
        with pytest.raises(InvalidImageError):
            runner(odd_tree / name)
        with pytest.raises(InvalidImageError):
            runner(str(odd_tree / name))
    with pytest.raises(InvalidImageError, match="no such file"):
        runner(odd_tree / "missing.jpg")
    with pytest.raises(InvalidImageError, match="folder"):
        runner(odd_tree)
    anim = Image.open(odd_tree / "anim.gif")
    with pytest.raises(InvalidImageError, match="animated"):
        runner(anim)
    # one frame of it is fine
    frame = next(iter(ImageSequence.Iterator(anim))).copy()
    out, rep = runner(frame, seed=0, return_report=True)
    assert rep.changed == 2 and out.mode == frame.mode
    mpo = Image.open(odd_tree / "camera_mpo.jpg")
    assert mpo.format == "MPO"
    out, rep = runner(mpo, seed=0, return_report=True)
    assert rep.changed == 2 and out.size == mpo.size


def test_api_odd_arrays(runner):
    rng = np.random.default_rng(0)
    for shape in ((1, 1), (1, 1, 3), (10, 10, 3), (1, 500, 3), (500, 1), (10, 10, 4), (7, 9, 2)):
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
        out, rep = runner(arr, return_report=True)
        assert out.shape == arr.shape and out.dtype == arr.dtype and np.array_equal(out, arr) and rep.faces == []
    for bad, err in (
        (np.zeros((5, 5, 3), np.int32), "dtype"), (np.zeros((5, 5, 3), bool), "dtype"), (np.zeros((5, 5, 3), np.complex64), "dtype"),
        (np.zeros((5,), np.uint8), "shape"), (np.zeros((2, 5, 5, 3), np.uint8), "shape"), (np.zeros((5, 0, 3), np.uint8), "empty"),
        (np.full((5, 5, 3), 200.0, np.float32), r"\[0, 1\]"), (np.full((5, 5, 3), -1.0), r"\[0, 1\]"),
        (np.full((5, 5, 3), np.inf, np.float32), "NaN or inf"),
    ):
        with pytest.raises(InvalidImageError, match=err):
            runner(bad)
    with pytest.raises(InvalidImageError):
        runner([[0, 1], [2, 3]])
    with pytest.raises(InvalidImageError):
        runner(torch.zeros(3, 8, 8, dtype=torch.int32))
    empty = torch.rand(0, 3, 16, 16)
    out, reps = runner(empty, return_report=True)
    assert out.shape == empty.shape and reps == []


def test_api_bad_options_are_config_errors(runner, photo):
    arr = np.asarray(photo)
    lm = np.array([[[300, 200], [340, 200], [320, 225], [305, 250], [335, 250]]], float)
    for kw in (dict(strength="strong"), dict(strength=float("nan")), dict(strength=-1), dict(seed=1.5), dict(seed="1"),
               dict(identity="x"), dict(identity=np.ones((1, 1, 512))), dict(identity=np.zeros(512)), dict(identity=np.ones(7)),
               dict(faces=5), dict(faces="face"), dict(faces=np.zeros((1, 5, 2))), dict(faces=np.zeros((1, 4, 2))),
               dict(faces=lm * 1e300), dict(faces=[{"box": [10, 10, 5, 5]}]), dict(faces=[{"landmarks": [[0, 0]] * 5}])):
        with pytest.raises(ConfigError):
            runner(arr, faces=kw.pop("faces", lm), **kw)
    # landmarks as nested lists, a torch tensor, numpy integer seeds: accepted
    for faces in (lm.tolist(), torch.tensor(lm), lm.astype(np.float32)):
        _, rep = runner(arr, seed=np.int64(-3), faces=faces, return_report=True)
        assert rep.changed == 1


def test_api_tiny_and_outside_faces(runner, photo):
    arr = np.asarray(photo)
    _, rep = runner(arr, seed=0, return_report=True)
    lm = np.stack([f.face.landmarks for f in rep.faces])
    tiny = (lm - lm.mean(1, keepdims=True)) * 0.05 + lm.mean(1, keepdims=True)  # 3-px faces: skipped, reported
    out, r = runner(arr, faces=tiny, return_report=True)
    assert r.skipped == 2 and r.changed == 0 and np.array_equal(out, arr)
    out, r = Deidentifier(runner.model, detector="dlib", min_face_size=1)(arr, faces=tiny, return_report=True)
    assert len(r.faces) == 2 and out.shape == arr.shape  # forced through: no crash on a 3-px face
    outside = lm + np.array([5000.0, 0.0])
    out, r = runner(arr, faces=outside, return_report=True)
    assert np.array_equal(out, arr) and all(f.status in ("unchanged", "changed") for f in r.faces)
    half = lm - np.array([lm[0, :, 0].mean(), 0.0])  # first face centred on the left border
    out, r = runner(arr, faces=half, return_report=True)
    assert r.faces[0].status == "changed" and (out[:, :30] != arr[:, :30]).any()


def test_transform_on_dict_batches(odd_tree, random_model, photo):
    t = featdeid.transform_for("image", model=random_model, detector="dlib", seed=0)
    arr = np.asarray(photo)
    batch = {"image": [photo, None, arr, str(odd_tree / "gray.jpg"), Image.new("RGB", (1, 1))], "label": [1, 2, 3, 4, 5]}
    out = t(batch)
    assert out["label"] == batch["label"] and out["num_faces"] == [2, 0, 2, 2, 0]
    assert isinstance(out["image"][0], Image.Image) and out["image"][1] is None and out["image"][2].shape == arr.shape
    assert out["image"][3].mode == "L"
    for bad in (str(odd_tree / "truncated.jpg"), str(odd_tree / "zero.png"), Image.open(odd_tree / "anim.gif"), 42):
        with pytest.raises(InvalidImageError):
            t({"image": [photo, bad]})
    with pytest.raises(ConfigError):
        t({"photo": [photo]})
    single = t({"image": arr})  # not batched
    assert single["image"].shape == arr.shape and single["num_faces"] == 2


def test_crowd_of_a_hundred_faces(runner, photo):
    """A 10 x 10 mosaic of one face with given landmarks (a 1000-face version is in tests/stress)."""
    arr = np.asarray(photo)
    _, rep = runner(arr, seed=0, return_report=True)
    mosaic, lms, (th, tw) = face_mosaic(arr, rep.faces[0].face, 100, cols=10)
    t0 = time.perf_counter()
    out, crowd = runner(mosaic, seed=0, faces=lms, return_report=True)
    took = time.perf_counter() - t0
    assert crowd.changed == 100 and len({f.identity for f in crowd.faces[:32]}) == 32  # bank of 32: all used
    for r in range(10):
        for c in range(10):
            cell = (slice(r * th, (r + 1) * th), slice(c * tw, (c + 1) * tw))
            assert (out[cell] != mosaic[cell]).any(), (r, c)
    assert took < 60, took  # about 0.5 s on an idle 2-core machine


# ------------------------------------------------------------------------------- private outputs


@pytest.fixture(scope="module")
def private_tree(tmp_path_factory, photo) -> Path:
    root = tmp_path_factory.mktemp("private") / "in"
    root.mkdir()
    (root / "phone.jpg").write_bytes(private_jpeg(photo))
    (root / "rotated.jpg").write_bytes(private_jpeg(photo.transpose(Image.Transpose.ROTATE_90), orientation=6))
    (root / "screenshot.png").write_bytes(private_png(photo))
    return root


def test_private_inputs_really_hold_metadata(private_tree):
    """The fixtures are what they claim: EXIF thumbnail (second SOI in APP1), XMP, IPTC, PNG chunks."""
    img = Image.open(private_tree / "phone.jpg")
    exif = img.getexif()
    ifd1 = exif.get_ifd(ExifTags.IFD.IFD1)
    assert ifd1.get(0x0201) and ifd1.get(0x0202)
    app1 = [p for m, p in jpeg_segments((private_tree / "phone.jpg").read_bytes()) if m == 0xE1 and p.startswith(b"Exif")][0]
    tiff = app1[6:]  # offsets in EXIF count from the TIFF header
    thumb = Image.open(io.BytesIO(tiff[ifd1[0x0201] : ifd1[0x0201] + ifd1[0x0202]]))
    assert thumb.size == THUMB_SIZE  # a real, decodable picture of the original
    assert exif.get_ifd(ExifTags.IFD.GPSInfo) and exif.get_ifd(ExifTags.IFD.Exif).get(0xA431) == "BODY-SN-123456"
    assert b"xmpGImg:image" in img.info["xmp"] and b"Jane Doe" in img.info["xmp"]
    assert IptcImagePlugin.getiptcinfo(img)[(2, 80)] == b"Jane Doe"
    assert img.info["comment"] == b"shot at Jane's home"
    png = Image.open(private_tree / "screenshot.png")
    assert {b"tEXt", b"iTXt", b"zTXt", b"eXIf"} <= set(png_chunks((private_tree / "screenshot.png").read_bytes()))
    assert png.getexif().get_ifd(ExifTags.IFD.IFD1).get(0x0201) and png.info["Author"] == "Jane Doe"


@pytest.mark.parametrize("keep", [False, True], ids=["default", "keep-metadata"])
def test_cli_outputs_hold_no_private_metadata(private_tree, model_dir, tmp_path, keep):
    out = tmp_path / "out"
    extra = ["--keep-metadata"] if keep else []
    r = run_cli(str(private_tree), "-o", str(out), "--model", str(model_dir), "--detector", "dlib", "-q", *extra)
    assert r.returncode == 0, r.stderr
    for name in ("phone.jpg", "rotated.jpg", "screenshot.png"):
        assert_no_private_metadata(out / name, keep=keep)
    rot = Image.open(out / "rotated.jpg")
    if keep:  # EXIF kept, orientation with it: stored pixels stay as they were
        assert rot.getexif().get(0x0112) == 6 and rot.size == Image.open(private_tree / "rotated.jpg").size
    else:  # no EXIF: pixels made upright
        assert rot.size == Image.open(private_tree / "rotated.jpg").size[::-1]
    # PNG with --format jpg and the reverse keep the rule too
    r = run_cli(str(private_tree / "screenshot.png"), "-o", str(tmp_path / "o2"), "--model", str(model_dir), "--detector", "dlib", "--format", "jpg", "-q", *extra)
    assert r.returncode == 0, r.stderr
    assert_no_private_metadata(tmp_path / "o2" / "screenshot.jpg", keep=keep)


def test_api_keep_metadata_never_keeps_thumbnail(private_tree, runner, tmp_path):
    img = Image.open(private_tree / "phone.jpg")
    out = runner(img, seed=0, keep_metadata=True)
    assert b"\xff\xd8\xff" not in out.info["exif"] and b"MAKER" not in out.info["exif"]
    assert b"Jane Doe" in out.info["xmp"] and b"xmpGImg:image" not in out.info["xmp"] and b"/9j/" not in out.info["xmp"]
    assert "photoshop" not in out.info
    exif = Image.Exif()
    exif.load(out.info["exif"])
    assert exif.get(0x010F) == "CameraMaker" and not exif.get_ifd(ExifTags.IFD.IFD1)
    out.save(tmp_path / "saved.jpg", exif=out.info["exif"], xmp=out.info["xmp"])  # what a user would do
    saved = (tmp_path / "saved.jpg").read_bytes()
    assert saved.count(b"\xff\xd8\xff") == 1
    plain = runner(img, seed=0)
    assert set(plain.info) <= {"icc_profile", "dpi", "transparency", "gamma", "exif"}
    assert images.encode(plain, "JPEG").count(b"\xff\xd8\xff") == 1
    # unreadable EXIF is dropped, not an error
    assert images.strip_thumbnail(b"Exif\0\0garbage") == b""


# --------------------------------------------------------------------------------- nothing lost


def _tree_of_photos(root: Path, photo: Image.Image, n: int) -> list[Path]:
    """``n`` small distinct photos (crops of the group photo), with two broken files among them."""
    root.mkdir(parents=True)
    arr = np.asarray(photo)
    paths = []
    for i in range(n):
        crop = arr[i % 5 : 400 + i % 5, (i * 7) % 60 : 600 + (i * 7) % 60]
        p = root / ("sub" if i % 3 == 0 else ".") / f"p{i:02d}.jpg"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(np.ascontiguousarray(crop)).save(p, quality=90)
        paths.append(p)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "sub" / "empty.png").write_bytes(b"")
    return paths


def _visible_outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_kill_mid_run_then_resume(tmp_path, photo, model_dir):
    src = tmp_path / "in"
    photos = _tree_of_photos(src, photo, 20)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    args = [sys.executable, "-m", "featdeid.cli", str(src), "-o", str(out), "--model", str(model_dir), "--detector", "dlib", "-q", "--report", str(report)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and len(_visible_outputs(out)) < 4 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = _visible_outputs(out)
    assert 4 <= len(done) < 20, "the run was not killed mid-way; make the photos bigger"
    for p in done:  # every visible output is complete
        Image.open(p).load()
    assert not report.exists()
    # a temporary file a killed writer left (dead pid) and one a live writer is using (this pid)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = out / "sub" / f".p03.jpg.{dead}.abcd1234.part"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"\xff\xd8 half a jpeg")
    live = out / f".p01.jpg.{os.getpid()}.efgh5678.part"
    live.write_bytes(b"being written")
    mtimes = {p: p.stat().st_mtime_ns for p in done}
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr  # the two broken files
    assert "Traceback" not in r.stderr
    rep = json.loads(report.read_text())
    status = {Path(f["input"]).name: f["status"] for f in rep["files"]}
    assert sorted(k for k, v in status.items() if v == "error") == ["broken.jpg", "empty.png"]
    assert {k for k, v in status.items() if v == "exists"} == {p.name for p in done}
    assert rep["summary"]["ok"] + rep["summary"]["exists"] == 20 and rep["summary"]["failed"] == 2
    assert not stale.exists() and live.exists()
    live.unlink()
    assert len(_visible_outputs(out)) == 20 and not list(out.rglob("*.part"))
    for p in _visible_outputs(out):
        Image.open(p).load()
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())  # finished outputs not redone
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before  # inputs untouched
    assert {p.relative_to(out).with_suffix("") for p in _visible_outputs(out)} == {p.relative_to(src).with_suffix("") for p in photos}


def test_sigterm_stops_cleanly_with_a_report(tmp_path, photo, model_dir):
    src = tmp_path / "in"
    _tree_of_photos(src, photo, 12)
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    proc = subprocess.Popen([sys.executable, "-m", "featdeid.cli", str(src), "-o", str(out), "--model", str(model_dir), "--detector", "dlib", "-q", "--report", str(report)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(_visible_outputs(out)) < 2 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "run again to resume" in err
    rep = json.loads(report.read_text())
    assert rep["summary"]["interrupted"] is True and rep["summary"]["not_done"] > 0
    assert not list(out.rglob("*.part"))
    for p in _visible_outputs(out):
        Image.open(p).load()


def test_nested_output_and_name_collisions(tmp_path, photo, model_dir):
    src = tmp_path / "in"
    src.mkdir()
    photo.save(src / "a.jpg", quality=90)
    photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(src / "a.png")
    nested = src / "deid"
    r = run_cli(str(src), "-o", str(nested), "--model", str(model_dir), "--detector", "dlib", "-q")
    assert r.returncode == 2 and "inside input folder" in r.stderr and not nested.exists()
    report = tmp_path / "r.json"
    r = run_cli(str(src), "-o", str(nested), "--allow-nested-output", "--format", "png", "--model", str(model_dir), "--detector", "dlib", "-q", "--report", str(report))
    assert r.returncode == 1, r.stderr  # a.jpg and a.png both want deid/a.png: the second is refused, not skipped
    files = json.loads(report.read_text())["files"]
    assert [f["status"] for f in files] == ["ok", "error"] and "also be the output of" in files[1]["error"]
    assert sorted(p.name for p in nested.iterdir()) == ["a.png"]
    # a second run does not take its own outputs for inputs
    r = run_cli(str(src), "-o", str(nested), "--allow-nested-output", "--model", str(model_dir), "--detector", "dlib", "-q", "--report", str(report))
    names = {Path(f["input"]).name for f in json.loads(report.read_text())["files"]}
    assert names == {"a.jpg", "a.png"}
    assert not (nested / "deid").exists()
    # an input named twice is done once
    r = run_cli(str(src / "a.jpg"), str(src / "a.jpg"), "-o", str(tmp_path / "twice"), "--model", str(model_dir), "--detector", "dlib", "-q", "--report", str(report))
    assert r.returncode == 0 and len(json.loads(report.read_text())["files"]) == 1
    # the report may not overwrite an input
    r = run_cli(str(src), "-o", str(tmp_path / "o3"), "--model", str(model_dir), "--report", str(src / "a.png"))
    assert r.returncode == 2 and "never overwrites inputs" in r.stderr


def test_temp_files_and_atomic_write(tmp_path):
    target = tmp_path / "x" / "out.jpg"
    images.atomic_write(b"data", target)
    assert target.read_bytes() == b"data" and [p.name for p in target.parent.iterdir()] == ["out.jpg"]
    old = os.umask(0o027)
    try:
        images.atomic_write(b"data", target)  # permissions as open() gives them, not mkstemp's 0o600
        assert target.stat().st_mode & 0o777 == 0o640
        assert images._umask() == 0o027 and os.umask(0o027) == 0o027  # read without changing it
    finally:
        os.umask(old)

    with pytest.raises(TypeError):
        images.atomic_write(12345, target)  # type: ignore[arg-type]  # fails mid-write
    assert target.read_bytes() == b"data" and [p.name for p in target.parent.iterdir()] == ["out.jpg"]
    mine = target.parent / f".out.jpg.{os.getpid()}.zzzzzzzz.part"
    mine.write_bytes(b"")
    other = target.parent / ".notes.txt.part"  # not ours: left alone
    other.write_bytes(b"")
    assert images.remove_stale_temp_files(target.parent) == [] and mine.exists() and other.exists()


def test_encode_modes_the_format_cannot_hold():
    sixteen = Image.fromarray((np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000))
    jpg = Image.open(io.BytesIO(images.encode(sixteen, "JPEG")))
    assert jpg.mode == "L" and 0 < np.asarray(jpg).max() < 255  # scaled to 8 bits, not clipped white
    for mode in ("CMYK", "RGBX", "RGBa", "La", "PA", "LAB", "HSV", "YCbCr", "I", "F", "I;16B", "LA", "P", "RGBA", "1"):
        img = Image.new(mode, (8, 8))
        for fmt in ("PNG", "JPEG", "WEBP", "TIFF", "GIF", "BMP"):
            data = images.encode(img, fmt, lossless=fmt in ("PNG", "WEBP", "TIFF"))
            back = Image.open(io.BytesIO(data))
            assert back.size == (8, 8), (mode, fmt)
    with pytest.raises(OutputError):
        images.encode(Image.new("RGB", (4, 4)), "JPEG", lossless=True)


# ------------------------------------------------------------------------------------ safe loading


def test_non_finite_or_mismatched_weights_refused(tmp_path, random_model):
    from safetensors.torch import load_file, save_file

    from featdeid.model import HidingNetwork

    folder = random_model.save_pretrained(tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    save_file({**state, "head.weight": torch.full_like(state["head.weight"], float("nan"))}, folder / "model.safetensors")
    with pytest.raises(UnsafeWeightsError, match="finite"):
        featdeid.load(folder)
    save_file({**state, "identity_bank": state["identity_bank"] * float("inf")}, folder / "model.safetensors")
    with pytest.raises(UnsafeWeightsError, match="finite"):
        HidingNetwork.from_pretrained(folder)
    # header offsets pointing past the data
    save_file(state, folder / "model.safetensors")
    data = bytearray((folder / "model.safetensors").read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = [0, 10**9]
    raw = json.dumps(header).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    (folder / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data[8 + n :]))
    with pytest.raises(UnsafeWeightsError):
        featdeid.load(folder)


def test_wrong_shape_weights_are_a_config_error(tmp_path, random_model):
    from safetensors.torch import load_file, save_file

    folder = random_model.save_pretrained(tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    save_file({**state, "head.weight": torch.zeros(3, 3)}, folder / "model.safetensors")
    with pytest.raises(featdeid.ConfigError, match="does not match"):
        featdeid.load(folder)


def test_config_strings_never_import_anything(tmp_path, random_model, monkeypatch):
    """Config values are data: a module named in them is never imported, unknown keys are refused."""
    probe = tmp_path / "featdeid_probe_module.py"
    marker = tmp_path / "imported"
    probe.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = random_model.save_pretrained(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(recogniser="featdeid_probe_module")
    (folder / "config.json").write_text(json.dumps(cfg))
    model = featdeid.load(folder)
    assert model.config.recogniser == "featdeid_probe_module"
    for extra in (
        {"_target_": "featdeid_probe_module.run"}, {"__class__": "featdeid_probe_module"},
        {"model_type": "featdeid_probe_module"}, {"frame": "featdeid_probe_module:run"},
    ):
        (folder / "config.json").write_text(json.dumps({**cfg, **extra}))
        with pytest.raises(ConfigError):
            featdeid.load(folder)
    for bad in ({"image_size": 1e9}, {"channel_mults": "1,2"}, {"default_strength": float("nan")}, {"groups": -1}):
        (folder / "config.json").write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(ConfigError):
            featdeid.load(folder)
    assert not marker.exists() and "featdeid_probe_module" not in sys.modules

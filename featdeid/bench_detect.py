"""``featdeid bench detect``: face-detection recall, false positives, landmark error and speed on hard variants.

    featdeid bench detect [--set test|validation] [--backends centerface,centerface+thorough,dlib]
                          [--celeba 50] [--out DIR] [--assets DIR]

Photos with known faces are made harder the ways real photos are: smaller (the faces 16 and 24 px),
darker (underexposed, with sensor noise), rotated 30 and 60 degrees, with a painted-on surgical mask.
``--set test`` uses the assets' ``bbt40`` group photos (hand-checked faces in
``bench_data/bbt40_group_faces.json``), single-subject ``celeba_wild_id50`` photos (the subject: the
largest face any backend finds on the original) and the 40 tight ``bbt40`` crops; report its figures,
never choose settings on them. ``--set validation`` builds group mosaics of ``utkface_5k`` covers on cluttered
backgrounds cut from GAN photos (known boxes by construction): choose thresholds there. A detection finds a face when their boxes overlap
(IoU >= 0.3) or each box holds the other's centre; false positives are counted where every face is
known (group photos, mosaics). Landmark error: median over faces of the mean 5-point distance to
MTCNN's ONet landmarks on the face's box, over the inter-ocular distance (the default search takes
ONet's landmarks itself, so for it this is agreement, not accuracy); eye error: the same for the two
eye centres against dlib's 5-point model (a reference independent of both CenterFace and ONet).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from .faces.detect import Face, box_area, box_intersection, box_iou, detect_faces, get_detector

VARIANTS = ("original", "small16", "small24", "dark", "rot30", "rot60", "mask")
TRUTH = Path(__file__).with_name("bench_data") / "bbt40_group_faces.json"


class Photo:
    """A photo and its known faces (boxes ``(N, 4)``, landmarks ``(N, 5, 2)``); ``complete``: every face is
    known; ``eyes``: a second reference for the eye centres ``(N, 2, 2)`` (dlib's 5-point model), if any."""

    def __init__(self, name: str, rgb: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray, complete: bool, group: str) -> None:
        self.name, self.rgb, self.boxes, self.landmarks, self.complete, self.group = name, rgb, boxes, landmarks, complete, group
        self.eyes: np.ndarray | None = None


def dlib5_eyes(rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray | None:
    """Eye centres (mean of each eye's two corners) from dlib's 5-point shape predictor on ``boxes``
    (``(N, 2, 2)``, image left to right), or None where dlib is not installed."""
    try:
        import dlib
        import face_recognition_models as frm
    except ImportError:
        return None
    pred = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
    out = []
    for b in boxes:
        s = pred(np.ascontiguousarray(rgb), dlib.rectangle(*[int(round(v)) for v in b]))
        p = np.array([[s.part(i).x, s.part(i).y] for i in range(4)], dtype=np.float64)
        eyes = np.stack([p[0:2].mean(0), p[2:4].mean(0)])
        out.append(eyes[np.argsort(eyes[:, 0])])
    return np.array(out).reshape(-1, 2, 2)


def _affine(photo: Photo, rgb: np.ndarray, m: np.ndarray, name: str) -> Photo:
    """``photo`` with pixels ``rgb`` whose coordinates are ``m`` (2x3) of the original's."""
    lm = photo.landmarks @ m[:, :2].T + m[:, 2]
    c = np.stack([(photo.boxes[:, 0] + photo.boxes[:, 2]) / 2, (photo.boxes[:, 1] + photo.boxes[:, 3]) / 2], 1) @ m[:, :2].T + m[:, 2]
    half = np.stack([photo.boxes[:, 2] - photo.boxes[:, 0], photo.boxes[:, 3] - photo.boxes[:, 1]], 1) * math.hypot(m[0, 0], m[1, 0]) / 2
    return Photo(f"{photo.name}:{name}", rgb, np.concatenate([c - half, c + half], 1), lm, photo.complete, photo.group)


def small(photo: Photo, face_px: int) -> Photo:
    """The photo scaled so that its median face is ``face_px`` pixels (larger box side)."""
    sizes = np.maximum(photo.boxes[:, 2] - photo.boxes[:, 0], photo.boxes[:, 3] - photo.boxes[:, 1])
    f = min(1.0, face_px / float(np.median(sizes)))
    h, w = photo.rgb.shape[:2]
    size = (max(8, round(w * f)), max(8, round(h * f)))
    rgb = np.asarray(Image.fromarray(photo.rgb).resize(size, Image.Resampling.LANCZOS))
    return _affine(photo, rgb, np.array([[size[0] / w, 0, 0], [0, size[1] / h, 0]]), f"small{face_px}")


def dark(photo: Photo, seed: int) -> Photo:
    """Underexposed by about 2 stops with a darkening gamma and Gaussian sensor noise."""
    x = (photo.rgb.astype(np.float32) / 255) ** 1.5 * 0.3
    x += np.random.default_rng(seed).normal(0, 2 / 255, x.shape).astype(np.float32)
    rgb = np.clip(np.round(x * 255), 0, 255).astype(np.uint8)
    return _affine(photo, rgb, np.array([[1.0, 0, 0], [0, 1.0, 0]]), "dark")


def rotate(photo: Photo, angle: float) -> Photo:
    """Rotated by ``angle`` degrees (canvas expanded, grey fill)."""
    from .faces.passes import rotated

    rgb, m = rotated(photo.rgb, angle)  # m: canvas -> original; invert it for the faces
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    return _affine(photo, rgb, inv, f"rot{abs(round(angle))}")


def masked(photo: Photo) -> Photo:
    """A light-blue surgical mask painted over nose and mouth of every known face."""
    img = Image.fromarray(photo.rgb.copy())
    draw = ImageDraw.Draw(img)
    for lm in photo.landmarks:
        e0, e1, nose, m0, m1 = lm
        across = e1 - e0
        iod = float(np.linalg.norm(across))
        if iod < 1:
            continue
        u = across / iod
        d = np.array([-u[1], u[0]])
        eyes, mouth = (e0 + e1) / 2, (m0 + m1) / 2
        top = eyes + 0.45 * (nose - eyes)
        bottom = mouth + 0.85 * iod * d
        poly = [top - 1.0 * iod * u, top + 1.0 * iod * u, mouth + 1.05 * iod * u, bottom + 0.55 * iod * u, bottom - 0.55 * iod * u, mouth - 1.05 * iod * u]
        draw.polygon([tuple(p) for p in poly], fill=(168, 200, 226))
        for k in (0.3, 0.55, 0.8):
            a, b = top + k * (bottom - top) - 0.9 * iod * u, top + k * (bottom - top) + 0.9 * iod * u
            draw.line([tuple(a), tuple(b)], fill=(140, 172, 200), width=max(1, round(iod / 20)))
    return _affine(photo, np.asarray(img), np.array([[1.0, 0, 0], [0, 1.0, 0]]), "mask")


def variant(photo: Photo, name: str, index: int) -> Photo:
    """One named variant of ``photo`` (rotations alternate direction with ``index``)."""
    sign = 1 if index % 2 == 0 else -1
    if name == "original":
        return photo
    if name.startswith("small"):
        return small(photo, int(name[5:]))
    if name == "dark":
        return dark(photo, index)
    if name.startswith("rot"):
        return rotate(photo, sign * float(name[3:]))
    if name == "mask":
        return masked(photo)
    raise ValueError(name)


def _open(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_photos(assets: Path, celeba: int) -> tuple[list[Photo], list[Photo]]:
    """Group + single-subject photos (varied) and the tight crops (original only). A single-subject
    photo's subject is the largest face CenterFace (score >= 0.5) or dlib finds on the original."""
    from .faces.detect import available_detectors

    from .faces.onet import onet_landmarks

    faces = assets / "faces"
    truth = json.loads(TRUTH.read_text())["photos"]
    photos = []
    for name, known in truth.items():
        rgb = _open(faces / "bbt40" / "group_photos" / name)
        boxes = np.array([k["box"] for k in known])
        photos.append(Photo(name, rgb, boxes, onet_landmarks(rgb, boxes), True, "group"))
        photos[-1].eyes = dlib5_eyes(rgb, boxes)
    dirs = sorted(p for p in (faces / "celeba_wild_id50" / "images").iterdir() if p.is_dir())
    for d in dirs[:celeba]:
        path = sorted(d.glob("*.jpg"))[0]
        rgb = _open(path)
        found = [f for b in ("centerface", "dlib") if b in available_detectors() for f in get_detector(b).detect(rgb)
                 if f.score >= get_detector(b).confident]
        if not found:
            continue
        box = max(found, key=lambda f: f.size).box
        photos.append(Photo(f"{d.name}/{path.name}", rgb, box[None], onet_landmarks(rgb, box[None]), False, "celeba"))
        photos[-1].eyes = dlib5_eyes(rgb, box[None])
    crops = []
    for path in sorted((faces / "bbt40" / "images").glob("*.png")):
        rgb = _open(path)
        h, w = rgb.shape[:2]
        box = np.array([[0.1 * w, 0.1 * h, 0.9 * w, 0.9 * h]])
        crops.append(Photo(path.name, rgb, box, onet_landmarks(rgb, box), False, "crops"))
    return photos, crops


def _collage(patches: list[Path], w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """A cluttered background: the border strips (hair, clothes, backdrop; no face) of GAN photos,
    scaled and scattered in overlapping patches."""
    canvas = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(40, 200, 3)))
    for _ in range(60):
        src = Image.open(patches[int(rng.integers(len(patches)))]).convert("RGB")
        side = src.width
        strip = [(0, 0, side, side // 5), (0, 0, side // 6, side), (side - side // 6, 0, side, side)][int(rng.integers(3))]
        patch = src.crop(strip)
        scale = rng.uniform(0.8, 3.0)
        patch = patch.resize((max(8, int(patch.width * scale)), max(8, int(patch.height * scale))), Image.Resampling.BILINEAR)
        canvas.paste(patch, (int(rng.integers(-patch.width // 2, w)), int(rng.integers(-patch.height // 2, h))))
    return np.asarray(canvas.filter(ImageFilter.GaussianBlur(0.6)))


def validation_photos(assets: Path, n: int = 30, per: int = 5, seed: int = 0) -> list[Photo]:
    """Mosaics of ``per`` utkface covers on cluttered backgrounds cut from GAN photos (every 25th cover
    and GAN photo: training data, never a test photo); the pasted faces are all the faces."""
    from .faces.onet import onet_landmarks

    faces = assets / "faces"
    covers = sorted((faces / "utkface_5k").rglob("*.jpg"))[::25]
    patches = sorted((faces / "gan_generatedphotos_2k").rglob("*.jpg"))[::25]
    rng = np.random.default_rng(seed)
    photos = []
    for i in range(n):
        w, h = 960, 640
        canvas = Image.fromarray(_collage(patches, w, h, rng))
        boxes = []
        slots = rng.permutation(6)[:per]
        for j, slot in enumerate(slots):
            face = Image.open(covers[(i * per + j) % len(covers)]).convert("RGB")
            size = int(rng.integers(60, 200))
            cx = (slot % 3 + 0.5) * w / 3 + rng.uniform(-30, 30)
            cy = (slot // 3 + 0.5) * h / 2 + rng.uniform(-30, 30)
            x0, y0 = int(cx - size / 2), int(cy - size / 2)
            mask = Image.new("L", (size, size), 0)
            ImageDraw.Draw(mask).ellipse([size * 0.06, size * 0.02, size * 0.94, size * 0.98], fill=255)
            canvas.paste(face.resize((size, size), Image.Resampling.LANCZOS), (x0, y0), mask.filter(ImageFilter.GaussianBlur(size / 30)))
            boxes.append([x0 + 0.2 * size, y0 + 0.2 * size, x0 + 0.8 * size, y0 + 0.85 * size])
        rgb = np.asarray(canvas)
        boxes = np.array(boxes)
        photos.append(Photo(f"mosaic{i}", rgb, boxes, onet_landmarks(rgb, boxes), True, "mosaic"))
    return photos


def match(found: list[Face], boxes: np.ndarray) -> tuple[np.ndarray, int, list[int]]:
    """Which known faces are found (bool per box), how many detections match none, and the detection
    index matched to each known face (-1 where missed)."""
    hit = np.zeros(len(boxes), bool)
    which = [-1] * len(boxes)
    used = set()
    for gi, g in enumerate(boxes):
        gc = (g[:2] + g[2:]) / 2
        best, best_q = -1, 0.0
        for di, f in enumerate(found):
            b = f.box
            bc = (b[:2] + b[2:]) / 2
            iou = box_iou(b, g)
            mutual = b[0] <= gc[0] <= b[2] and b[1] <= gc[1] <= b[3] and g[0] <= bc[0] <= g[2] and g[1] <= bc[1] <= g[3]
            q = iou if (iou >= 0.3 or mutual) else 0.0
            if q > best_q or (mutual and best < 0):
                best, best_q = di, max(q, 1e-6)
        if best >= 0:
            hit[gi], which[gi] = True, best
            used.add(best)
    spurious = sum(1 for di in range(len(found)) if di not in used and not any(_overlaps(found[di].box, g) for g in boxes))
    return hit, spurious, which


def _overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    """A second detection of a known face (e.g. a half face) is not a false positive."""
    return box_intersection(a, b) > 0.3 * box_area(a)


def eye_error(face: Face, eyes: np.ndarray) -> float:
    """Mean distance of the two eye centres to reference eye centres, over their distance."""
    return float(np.linalg.norm(face.landmarks[:2] - eyes, axis=1).mean() / max(float(np.linalg.norm(eyes[1] - eyes[0])), 1e-6))


def landmark_error(face: Face, ref: np.ndarray) -> float:
    """Mean 5-point distance over the reference's inter-ocular distance."""
    iod = float(np.linalg.norm(ref[1] - ref[0]))
    return float(np.linalg.norm(face.landmarks - ref, axis=1).mean() / max(iod, 1e-6))


def run(
    backends: list[str], photos: list[Photo], crops: list[Photo], variants: tuple[str, ...] = VARIANTS, thresholds: list[float] | None = None
) -> dict[str, Any]:
    """Recall, false positives, landmark error and time per backend and variant.

    With ``thresholds`` each backend detects once at the lowest and is scored at each (``name@t``).
    """
    jobs = [(v, variant(p, v, i)) for v in variants for i, p in enumerate(photos)] + [("crops", c) for c in crops]
    results: dict[str, Any] = {}
    for b in backends:
        name, thorough = b.split("+")[0], b.endswith("+thorough")
        det = get_detector(name)
        levels: list[float | None] = list(thresholds) if thresholds else [None]
        keys = [k for k in ("threshold", "thorough_threshold") if hasattr(det, k)]
        old = {k: getattr(det, k) for k in keys}
        if thresholds:
            for k in keys:
                setattr(det, k, min(thresholds))
        rows: dict[Any, dict[str, dict[str, Any]]] = {t: {} for t in levels}
        try:
            for v, ph in tqdm(jobs, desc=b, unit="photo", leave=False):
                t0 = time.perf_counter()
                found_all = detect_faces(ph.rgb, name, thorough=thorough)
                dt = time.perf_counter() - t0
                for t in levels:
                    found = found_all if t is None else [f for f in found_all if f.score >= t]
                    hit, spurious, which = match(found, ph.boxes)
                    r = rows[t].setdefault(v, {"faces": 0, "found": 0, "fp": 0, "fp_photos": 0, "s": 0.0, "photos": 0, "nme": [], "eye": []})
                    r["faces"] += len(ph.boxes)
                    r["found"] += int(hit.sum())
                    r["photos"] += 1
                    r["s"] += dt
                    if ph.complete:
                        r["fp"] += spurious
                        r["fp_photos"] += 1
                    if v == "original":
                        r["nme"] += [landmark_error(found[d], ref) for d, ref in zip(which, ph.landmarks) if d >= 0]
                        if ph.eyes is not None:
                            r["eye"] += [eye_error(found[d], ref) for d, ref in zip(which, ph.eyes) if d >= 0]
        finally:
            for k, v in old.items():
                setattr(det, k, v)
        for t in levels:
            results[b if t is None else f"{b}@{t:g}"] = _summary(rows[t])
    return results


def _summary(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    total = {"faces": 0, "found": 0, "fp": 0, "fp_photos": 0}
    for r in rows.values():
        for k in total:
            total[k] += r[k]
        r["recall"] = r["found"] / max(r["faces"], 1)
        r["ms_per_photo"] = 1000 * r.pop("s") / max(r["photos"], 1)
        nme, eye = r.pop("nme"), r.pop("eye")
        if nme:
            r["landmark_error_median"] = float(np.median(nme))
        if eye:
            r["eye_error_dlib5_median"] = float(np.median(eye))
    total["recall"] = total["found"] / max(total["faces"], 1)
    return {"variants": rows, "total": total}


def speed(backends: list[str], photo: Path, repeats: int = 5) -> dict[str, float]:
    """Median ms per detection on one photo, per backend."""
    rgb = _open(photo)
    out = {}
    for b in backends:
        name, thorough = b.split("+")[0], b.endswith("+thorough")
        detect_faces(rgb, name, thorough=thorough)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            detect_faces(rgb, name, thorough=thorough)
            times.append(time.perf_counter() - t0)
        out[b] = 1000 * float(np.median(times))
    return out


def table(results: dict[str, Any]) -> str:
    """Markdown table: recall per variant (found / faces), false positives per photo, landmark error."""
    variants = list(next(iter(results.values()))["variants"])
    head = "| backend | " + " | ".join(variants) + " | all | FP / photo | landmark error (ONet) | eye error (dlib 5-point) | ms / photo |"
    lines = [head, "|" + "---|" * (len(variants) + 6)]
    for b, r in results.items():
        cells = [f"{r['variants'][v]['found']}/{r['variants'][v]['faces']}" for v in variants]
        t = r["total"]
        ms = np.mean([r["variants"][v]["ms_per_photo"] for v in variants])
        nme = r["variants"].get("original", {}).get("landmark_error_median")
        eye = r["variants"].get("original", {}).get("eye_error_dlib5_median")
        fp = t["fp"] / max(t["fp_photos"], 1)
        lines.append(f"| {b} | " + " | ".join(cells) + f" | **{100 * t['recall']:.1f} %** ({t['found']}/{t['faces']}) | {fp:.2f} | "
                     + (f"{nme:.3f}" if nme is not None else "-") + " | " + (f"{eye:.3f}" if eye is not None else "-") + f" | {ms:.0f} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Recall per variant and backend as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(next(iter(results.values()))["variants"])
    fig, ax = plt.subplots(figsize=(1.1 * len(variants) + 2, 3.6))
    width = 0.8 / len(results)
    for i, (b, r) in enumerate(results.items()):
        ax.bar(np.arange(len(variants)) + i * width, [100 * r["variants"][v]["recall"] for v in variants], width, label=b)
    ax.set_xticks(np.arange(len(variants)) + 0.4 - width / 2, variants)
    ax.set_ylabel("faces found (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(results), fontsize=8, frameon=False)
    ax.set_title("featdeid bench detect: recall per variant")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="featdeid bench detect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", choices=["test", "validation"], default="test")
    p.add_argument("--backends", default="centerface,centerface+thorough,dlib", help="comma list: centerface, dlib, insightface, each optionally +thorough")
    p.add_argument("--celeba", type=int, default=50, help="single-subject celeba_wild_id50 photos (one per person)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--assets", default=None, help="default: $FEATDEID_ASSETS, else ../shared/assets")
    p.add_argument("--thresholds", default=None, help="comma list: score each backend at these detection thresholds")
    p.add_argument("--out", type=Path, default=None, help="folder for results.json, table.md and recall.png")
    args = p.parse_args(argv)
    assets = Path(args.assets or os.environ.get("FEATDEID_ASSETS") or Path.cwd().parent / "shared" / "assets")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.set == "test":
        photos, crops = test_photos(assets, args.celeba)
    else:
        photos, crops = validation_photos(assets), []
    ts = [float(t) for t in args.thresholds.split(",")] if args.thresholds else None
    results = run(backends, photos, crops, tuple(v.strip() for v in args.variants.split(",")), ts)
    group = assets / "faces" / "bbt40" / "group_photos" / "bbt1.jpg"
    ms = speed(backends, group) if group.exists() else {}
    text = table(results) + "\n\n" + "\n".join(f"- {b}: {t:.0f} ms on bbt1.jpg (1366x768), median of 5" for b, t in ms.items())
    print(text)
    if args.out:
        from .images import atomic_write

        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(json.dumps({"set": args.set, "results": results, "ms_bbt1": ms}, indent=1).encode(), args.out / "results.json")
        atomic_write((text + "\n").encode(), args.out / "table.md")
        try:
            plot(results, args.out / "recall.png")
        except ImportError:
            print("(no plot: matplotlib is not installed; pip install featdeid[eval])")
    return 0

"""featdeid stress measurements, outside pytest: big photos, many calls, crowds, threads.

    OMP_NUM_THREADS=1 nice -n 19 python tests/stress/stress.py            # everything (a few minutes)
    python tests/stress/stress.py --only big,calls --calls 300             # a subset
    python tests/stress/stress.py --model path/to/model --json out.json    # a real model; keep the numbers

Each case prints one row of a table at the end: what was measured, the figure, and a verdict
against a loose bound (the bounds are sanity limits, not benchmarks). Without ``--model`` a small
random hiding network is used (the pipeline's cost outside the network is what is measured here).
The exit code is 1 when a case fails its bound or errors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from mosaic import face_mosaic

REPO = Path(__file__).resolve().parents[2]
MiB = 2**20


def assets_root() -> Path:
    return Path(os.environ.get("FEATDEID_ASSETS", REPO.parent / "shared" / "assets"))


def group_photo(name: str = "bbt1.jpg"):
    """A real group photo from the assets, or None."""
    from PIL import Image

    p = assets_root() / "faces" / "bbt40" / "group_photos" / name
    return Image.open(p).convert("RGB") if p.exists() else None


def random_model_dir(folder: Path) -> Path:
    """The tests' small random hiding network (non-zero output layer), saved as a model folder."""
    import torch

    from featdeid.config import ModelConfig
    from featdeid.model import HidingNetwork

    torch.manual_seed(0)
    cfg = ModelConfig(image_size=64, feature_dim=512, base_channels=8, channel_mults=(1, 2, 4), groups=4)
    model = HidingNetwork(cfg, identity_bank=torch.nn.functional.normalize(torch.randn(32, 512), dim=1))
    torch.nn.init.normal_(model.head.weight, std=0.05)
    torch.nn.init.normal_(model.head.bias, std=0.02)
    return model.save_pretrained(folder / "random-model")


PEAK = textwrap.dedent("""
    import atexit, resource, sys
    import numpy as np
    from featdeid.faces.detect import get_detector
    from featdeid.pipeline import Deidentifier

    def _status(key):
        try:
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith(key + ":"))
        except (OSError, StopIteration):
            return -1

    # warm up (imports, model, detector, first network call), then reset the kernel's peak-RSS mark
    get_detector("dlib")
    Deidentifier(sys.argv[1], detector="dlib")(np.zeros((64, 64, 3), np.uint8))
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pass
    _before = _status("VmRSS")
    atexit.register(lambda: print("PEAK_RSS_KB", _before, _status("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr))
""")


def child_peak(code: str, *args: str) -> tuple[float, float, float, subprocess.CompletedProcess]:
    """Run ``python -c code args`` (``sys.argv[1]`` is the model) after a warm-up; RSS before the work
    and its peak during it (MiB, the kernel's VmHWM reset after the warm-up), and wall time (s)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", PEAK + code, *args], capture_output=True, text=True, cwd=REPO)
    took = time.perf_counter() - t0
    marks = [line.split()[1:] for line in r.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    if not marks:
        return float("nan"), float("nan"), took, r
    before, hwm, maxrss = (int(v) / 1024 for v in marks[-1])
    return before, (hwm if hwm > 0 else maxrss), took, r


def rss() -> float:
    import gc

    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / MiB


# ---------------------------------------------------------------------------------------- cases


CLI = "from featdeid.cli import main; sys.exit(main(sys.argv[2:]))"

API_BIG = textwrap.dedent("""
    import time
    r = Deidentifier(sys.argv[1], detector="dlib")
    t = time.perf_counter(); out, rep = r(sys.argv[2], return_report=True)
    print(rep.changed, out.size, round(time.perf_counter() - t, 2))
""")


def case_big(model: Path, work: Path, size: tuple[int, int]) -> list[dict]:
    """A 12000 x 9000 (108 MP) JPEG through the CLI and through the API, each in its own process,
    peak RSS measured by the kernel; and a process that only loads featdeid, for the baseline."""
    from PIL import Image

    w, h = size
    photo = group_photo()
    if photo is None:
        rng = np.random.default_rng(0)
        photo = Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8))
    src = work / "big" / "big.jpg"
    src.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    photo.resize((w, h), Image.Resampling.BILINEAR).save(src, quality=85)
    made = time.perf_counter() - t0
    rows = []
    image_mib = w * h * 3 / MiB
    out = work / "big-out"
    before, peak, took, r = child_peak(CLI, str(model), str(src), "-o", str(out), "--model", str(model), "--detector", "dlib", "-q", "--overwrite")
    ok = r.returncode == 0 and (out / "big.jpg").is_file()
    if ok:
        with Image.open(out / "big.jpg") as o:
            ok = o.size == (w, h)
    rows.append(dict(case=f"CLI {w}x{h} JPEG ({w * h / 1e6:.0f} MP; RGB pixels {image_mib:.0f} MiB)",
                     value=f"peak RSS {peak:.0f} MiB = {before:.0f} loaded + {peak - before:.0f} for the photo ({(peak - before) / image_mib:.1f}x its RGB pixels), {took:.1f} s",
                     ok=ok and peak - before < 5 * image_mib, detail=r.stderr[-800:] if not ok else ""))
    before, peak, took, r = child_peak(API_BIG, str(model), str(src))
    rows.append(dict(case=f"API deidentify(path) {w}x{h} -> PIL",
                     value=f"peak RSS {peak:.0f} MiB = {before:.0f} loaded + {peak - before:.0f} ({(peak - before) / image_mib:.1f}x); faces, size, s: {r.stdout.strip()}",
                     ok=r.returncode == 0 and peak - before < 7 * image_mib, detail=r.stderr[-800:] if r.returncode else ""))
    rows.append(dict(case="(making the big test JPEG)", value=f"{made:.1f} s", ok=True))
    return rows


def _small_case(runner):
    """A 256 x 256 crop holding one face, and its landmarks (detected once)."""
    photo = group_photo("bbt2.jpg")
    if photo is None:
        from featdeid.faces import frame

        img = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
        return img, (frame.template(120) + 68)[None]
    arr = np.asarray(photo)
    _, rep = runner(arr, seed=0, return_report=True)
    img = np.ascontiguousarray(arr[100:356, 50:306])
    return img, np.stack([f.face.landmarks for f in rep.faces]) - [50, 100]


def case_calls(runner, n: int) -> list[dict]:
    """RSS growth over ``n`` sequential calls on a small image with given faces (no detector)."""
    img, faces = _small_case(runner)
    for i in range(20):
        runner(img, seed=i, faces=faces)
    start = rss()
    marks = []
    t0 = time.perf_counter()
    for i in range(n):
        runner(img, seed=i, faces=faces)
        if (i + 1) % max(1, n // 4) == 0:
            marks.append(rss() - start)
    took = time.perf_counter() - t0
    growth = rss() - start
    return [dict(case=f"{n} sequential calls, 256x256, {len(faces)} given face(s)",
                 value=f"RSS {start:.0f} -> {start + growth:.0f} MiB ({growth:+.1f} MiB; at quarters {', '.join(f'{m:+.1f}' for m in marks)}), {1000 * took / n:.1f} ms/call",
                 ok=growth < 50)]


def case_crowd(runner, n_faces: int) -> list[dict]:
    """A mosaic of ``n_faces`` copies of one face, landmarks given (detection is skipped)."""
    photo = group_photo("bbt2.jpg")
    if photo is None:
        return [dict(case=f"{n_faces}-face crowd", value="skipped: assets missing", ok=True)]
    arr = np.asarray(photo)
    _, rep = runner(arr, seed=0, return_report=True)
    cols = int(np.ceil(np.sqrt(n_faces * 1.6)))
    rows = int(np.ceil(n_faces / cols))
    mosaic, lms, (th, tw) = face_mosaic(arr, rep.faces[0].face, n_faces, cols)
    face_px = int(rep.faces[0].face.box[2] - rep.faces[0].face.box[0])
    before = rss()
    t0 = time.perf_counter()
    out, crowd = runner(mosaic, seed=0, faces=lms, return_report=True)
    took = time.perf_counter() - t0
    per_face_changed = sum(bool((out[r * th : (r + 1) * th, c * tw : (c + 1) * tw] != mosaic[r * th : (r + 1) * th, c * tw : (c + 1) * tw]).any())
                           for r in range(rows) for c in range(cols) if r * cols + c < n_faces)
    t1 = time.perf_counter()
    _, detected = runner(mosaic, seed=0, return_report=True)
    took_detect = time.perf_counter() - t1
    return [
        dict(case=f"{n_faces}-face crowd, landmarks given ({mosaic.shape[1]}x{mosaic.shape[0]}, faces ~{face_px}px)",
             value=f"{took:.1f} s ({1000 * took / n_faces:.1f} ms/face), {crowd.changed} changed, {per_face_changed} tiles differ, RSS {before:.0f} -> {rss():.0f} MiB",
             ok=crowd.changed == n_faces and per_face_changed == n_faces and took < 10 * 60),
        dict(case="same crowd, dlib detection (on a 1280-px copy)", value=f"{took_detect:.1f} s, {len(detected.faces)} faces found", ok=True),
    ]


def case_threads(runner, workers: int = 4) -> list[dict]:
    """``workers`` threads on different photos and seeds vs. the same calls one after another."""
    from PIL import Image

    paths = sorted((assets_root() / "faces" / "bbt40" / "group_photos").glob("*.jpg"))
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in paths] or [np.random.default_rng(i).integers(0, 256, (480, 640, 3), dtype=np.uint8) for i in range(4)]
    jobs = [(i, s) for i in range(len(photos)) for s in range(4)]
    t0 = time.perf_counter()
    seq = [runner(photos[i], seed=s) for i, s in jobs]
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        par = list(pool.map(lambda j: runner(photos[j[0]], seed=j[1]), jobs))
    t_par = time.perf_counter() - t0
    same = all(np.array_equal(a, b) for a, b in zip(seq, par))
    return [dict(case=f"{len(jobs)} calls (detection on), {workers} threads vs sequential",
                 value=f"sequential {t_seq:.1f} s, threaded {t_par:.1f} s ({t_seq / t_par:.2f}x), identical results: {same}", ok=same)]


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="big,calls,crowd,threads", help="comma-separated cases: big, calls, crowd, threads")
    p.add_argument("--model", default=None, help="model folder (default: a small random network)")
    p.add_argument("--size", default="12000x9000", help="big photo size WxH")
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--faces", type=int, default=1000)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    cases = {c.strip() for c in args.only.split(",") if c.strip()}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="featdeid-stress-") as tmp:
        work = Path(tmp)
        model = Path(args.model) if args.model else random_model_dir(work)
        from featdeid.pipeline import Deidentifier

        runner = Deidentifier(str(model), detector="dlib")
        todo = [
            ("big", lambda: case_big(model, work, tuple(int(v) for v in args.size.lower().split("x")))),
            ("calls", lambda: case_calls(runner, args.calls)),
            ("crowd", lambda: case_crowd(runner, args.faces)),
            ("threads", lambda: case_threads(runner, args.threads)),
        ]
        for name, fn in todo:
            if name not in cases:
                continue
            print(f"[stress] {name} ...", file=sys.stderr, flush=True)
            try:
                rows += fn()
            except Exception as e:  # a failing case is a row, not the end of the run
                rows.append(dict(case=name, value=f"error: {type(e).__name__}: {e}", ok=False))
    width = max(len(r["case"]) for r in rows) if rows else 10
    print(f"\n{'case':<{width}}  {'ok':<4}  measured")
    print(f"{'-' * width}  ----  {'-' * 40}")
    for r in rows:
        print(f"{r['case']:<{width}}  {'yes' if r['ok'] else 'NO':<4}  {r['value']}")
        if r.get("detail"):
            print(textwrap.indent(r["detail"], " " * (width + 8)))
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"\n(python {sys.version.split()[0]}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={threads})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

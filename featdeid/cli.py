"""The ``featdeid`` command: de-identify files and folders; ``featdeid bench`` measures speed.

    featdeid IN [IN ...] -o OUT [--strength S] [--seed N] [--format png|jpg|webp|tiff] [--quality Q]
                                [--lossless] [--keep-metadata] [--overwrite] [--report FILE.json]

Inputs are never modified; outputs are written atomically; existing outputs are skipped (resume)
unless ``--overwrite``; the exit code is 1 when any file failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import FeatdeidError, OutputError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SUBCOMMANDS = ("bench", "eval")


def _iter_inputs(inputs: list[Path], recursive: bool) -> Iterator[tuple[Path, Path]]:
    """``(input file, output path relative to OUT)`` for every image file named or found."""
    from .images import FORMATS

    several_dirs = sum(p.is_dir() for p in inputs) > 1
    for root in inputs:
        if root.is_dir():
            walker = sorted(root.rglob("*")) if recursive else sorted(root.iterdir())
            for p in walker:
                if p.is_file() and p.suffix.lower() in FORMATS and not p.name.startswith("."):
                    rel = p.relative_to(root)
                    yield p, (Path(root.resolve().name) / rel if several_dirs else rel)
        else:
            yield root, Path(root.name)


def _output_name(rel: Path, fmt: str | None) -> Path:
    if not fmt:
        return rel
    ext = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp", "tiff": ".tiff", "tif": ".tiff"}[fmt]
    return rel.with_suffix(ext)


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _process_file(runner: Any, src: Path, dst: Path, args: argparse.Namespace) -> dict[str, Any]:
    from PIL import Image, ImageSequence

    from . import images

    fmt = images.format_for(dst)
    if args.lossless and fmt == "JPEG":
        raise OutputError(f"{dst}: --lossless was asked but JPEG is lossy; use --format png, webp or tiff")
    img = images.open_image(src)
    kw = dict(strength=args.strength, seed=args.seed, keep_metadata=args.keep_metadata, return_report=True)
    if getattr(img, "is_animated", False) and img.n_frames > 1:
        if fmt not in ("GIF", "WEBP", "PNG"):
            raise OutputError(f"{src}: animated input needs an animated output format (gif, webp, png)")
        frames, reports = [], []
        for fr in ImageSequence.Iterator(img):
            out, rep = runner(fr.convert("RGBA"), **kw)
            frames.append(out)
            reports.append(rep)
        buf = io.BytesIO()
        save_kw: dict[str, Any] = dict(save_all=True, append_images=frames[1:], duration=img.info.get("duration", 100), loop=img.info.get("loop", 0))
        if fmt == "WEBP":
            save_kw["lossless"] = True
        frames[0].save(buf, format=fmt, **save_kw)
        images.atomic_write(buf.getvalue(), dst)
        return {"faces": sum(len(r.faces) for r in reports), "changed": sum(r.changed for r in reports), "skipped": sum(r.skipped for r in reports), "frames": len(frames)}
    out, rep = runner(img, **kw)
    if not args.keep_metadata:
        out = images.bake_orientation(out)
    data = images.encode(out, fmt, quality=args.quality, lossless=args.lossless, keep_metadata=args.keep_metadata)
    images.atomic_write(data, dst)
    img.close()
    if isinstance(out, Image.Image):
        out.close()
    return rep.to_dict()


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    inputs = [Path(p) for p in args.inputs]
    for p in inputs:
        if not p.exists():
            print(f"featdeid: error: input not found: {p}", file=sys.stderr)
            return EXIT_USAGE
    out_dir = Path(args.output)
    for p in inputs:
        if p.is_dir() and _is_within(out_dir, p) and not args.allow_nested_output:
            print(f"featdeid: error: output folder {out_dir} is inside input folder {p}; "
                  "choose another folder or pass --allow-nested-output", file=sys.stderr)
            return EXIT_USAGE
    if out_dir.exists() and not out_dir.is_dir():
        print(f"featdeid: error: output {out_dir} exists and is not a folder", file=sys.stderr)
        return EXIT_USAGE
    jobs = list(_iter_inputs(inputs, not args.no_recursive))
    if args.allow_nested_output:
        jobs = [(s, r) for s, r in jobs if not _is_within(s, out_dir)]
    input_files = {s.resolve() for s, _ in jobs}
    from .pipeline import Deidentifier

    try:
        runner = Deidentifier(args.model, detector=args.detector, min_face_size=args.min_face_size)
    except FeatdeidError as e:
        print(f"featdeid: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    records, failed = [], 0
    bar = tqdm(jobs, unit="img", disable=args.quiet or None, desc="de-identifying")
    for src, rel in bar:
        dst = out_dir / _output_name(rel, args.format)
        rec: dict[str, Any] = {"input": str(src), "output": str(dst)}
        try:
            if dst.resolve() in input_files:
                raise OutputError(f"{dst} is an input file; featdeid never overwrites inputs")
            if dst.exists() and not args.overwrite:
                rec["status"] = "exists"
            else:
                rec.update(_process_file(runner, src, dst, args))
                rec["status"] = "ok"
        except FeatdeidError as e:
            rec.update(status="error", error=f"{type(e).__name__}: {e}")
        except MemoryError:
            rec.update(status="error", error="MemoryError: image too large for available memory")
        except Exception as e:  # one bad file must not stop a folder; report it with its type
            rec.update(status="error", error=f"{type(e).__name__}: {e}")
        if rec["status"] == "error":
            failed += 1
            tqdm.write(f"featdeid: {src}: {rec['error']}", file=sys.stderr)
        records.append(rec)
    summary = {
        "files": len(records),
        "ok": sum(r["status"] == "ok" for r in records),
        "exists": sum(r["status"] == "exists" for r in records),
        "failed": failed,
        "faces_changed": sum(r.get("changed", 0) for r in records),
        "faces_skipped": sum(r.get("skipped", 0) for r in records),
    }
    if args.report:
        from .images import atomic_write

        atomic_write(json.dumps({"summary": summary, "files": records}, indent=2).encode(), args.report)
    if not args.quiet:
        print(json.dumps(summary))
    return EXIT_FAILED if failed else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="featdeid", description="De-identify every face in photos (files or folders).",
                                epilog="Other commands: `featdeid bench --help`, `featdeid eval --help`.")
    p.add_argument("inputs", nargs="+", help="image files or folders (folders are walked recursively)")
    p.add_argument("-o", "--output", required=True, help="output folder (created; never an input)")
    p.add_argument("--strength", type=float, default=None, help="0 = unchanged, 1 = model output (default: model's)")
    p.add_argument("--seed", type=int, default=None, help="fake-identity seed (default: derived from each photo)")
    p.add_argument("--model", default=None, help="model folder or Hub repo id (default: the shipped model)")
    p.add_argument("--detector", default="auto", choices=["auto", "dlib", "insightface"])
    p.add_argument("--min-face-size", type=int, default=20, help="skip (and report) faces smaller than this, px")
    p.add_argument("--format", choices=["png", "jpg", "jpeg", "webp", "tiff", "tif"], help="output format (default: keep)")
    p.add_argument("--quality", type=int, default=None, help="JPEG/WebP quality (default 95)")
    p.add_argument("--lossless", action="store_true", help="require lossless output (refuses JPEG, WebP is lossless)")
    p.add_argument("--keep-metadata", action="store_true", help="keep EXIF/XMP (embedded thumbnails are always removed)")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that exist (default: skip them, i.e. resume)")
    p.add_argument("--no-recursive", action="store_true", help="do not descend into sub-folders")
    p.add_argument("--allow-nested-output", action="store_true", help="allow OUT inside an input folder")
    p.add_argument("--report", help="write a JSON report of every file here")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "eval":
        try:
            from .evaluation.cli import main as eval_main
        except ImportError:
            print("featdeid: error: `featdeid eval` is not available in this installation", file=sys.stderr)
            return EXIT_USAGE
        return eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.quality is not None and not 1 <= args.quality <= 100:
        print("featdeid: error: --quality must be in 1..100", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("featdeid: interrupted; finished outputs are complete, run again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``featdeid`` command: de-identify files and folders; ``featdeid bench`` measures speed.

    featdeid IN [IN ...] -o OUT [--strength S] [--seed N] [--format png|jpg|webp|tiff] [--quality Q]
                                [--lossless] [--keep-metadata] [--overwrite] [--report FILE.json]

Inputs are never modified; outputs are written atomically (hidden ``.NAME.PID.XXXX.part`` file, then a
rename; such files left by a killed run are removed by the next run); existing outputs are skipped
(resume) unless ``--overwrite``; two inputs that would share an output name are refused, not merged.
The exit code is 1 when any file failed, 2 on a usage error, 130 when interrupted (Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
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
    from . import images

    fmt = images.format_for(dst)
    if args.lossless and fmt == "JPEG":
        raise OutputError(f"{dst}: --lossless was asked but JPEG is lossy; use --format png, webp or tiff")
    kw = dict(strength=args.strength, seed=args.seed, keep_metadata=args.keep_metadata, return_report=True)
    img = images.open_image(src)
    try:
        if images.is_multiframe(img):
            return _process_frames(runner, img, src, dst, fmt, kw)
        # Deidentifier.__call__ for a PIL image, with the decoded input freed as soon as it is copied:
        # a 12000 x 9000 photo then never has more than two full-size copies alive
        work = images.from_pil(img, keep_metadata=args.keep_metadata)
        img.close()
        touched, rep = runner.process(work.rgb, strength=args.strength, seed=args.seed)
        out = work.restore(work.rgb, touched)
        del work, touched
        if not args.keep_metadata:
            out = images.bake_orientation(out)  # no EXIF in the output: make the pixels upright
        data = images.encode(out, fmt, quality=args.quality, lossless=args.lossless, keep_metadata=args.keep_metadata)
        out.close()
        del out
        images.atomic_write(data, dst)
        return rep.to_dict()
    finally:
        img.close()


def _process_frames(runner: Any, img: Any, src: Path, dst: Path, fmt: str, kw: dict[str, Any]) -> dict[str, Any]:
    """Every frame of an animation de-identified, written as an animation of the same timing."""
    from PIL import ImageSequence

    from . import images

    if fmt not in ("GIF", "WEBP", "PNG"):
        raise OutputError(f"{src}: animated / multi-page input ({img.n_frames} frames) needs an animated output "
                          "format: --format gif, webp or png")
    frames, reports, durations = [], [], []
    for fr in ImageSequence.Iterator(img):
        durations.append(int(fr.info.get("duration", 100) or 100))
        out, rep = runner(fr.convert("RGBA"), **kw)
        frames.append(out)
        reports.append(rep)
    buf = io.BytesIO()
    save_kw: dict[str, Any] = dict(save_all=True, append_images=frames[1:], duration=durations, loop=img.info.get("loop", 0))
    if fmt == "WEBP":
        save_kw["lossless"] = True
    for fr in frames:
        fr.info = {}  # no metadata on any frame
    try:
        frames[0].save(buf, format=fmt, **save_kw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OutputError(f"cannot encode {len(frames)} frames as {fmt}: {e}") from e
    images.atomic_write(buf.getvalue(), dst)
    return {"faces": sum(len(r.faces) for r in reports), "changed": sum(r.changed for r in reports),
            "skipped": sum(r.skipped for r in reports), "low_confidence": sum(r.low_confidence for r in reports), "frames": len(frames)}


def _plan(jobs: list[tuple[Path, Path]], out_dir: Path, fmt: str | None) -> list[tuple[Path, Path, str | None]]:
    """``(input, output, error)`` per job: repeated inputs dropped, outputs two inputs would share refused."""
    plan: list[tuple[Path, Path, str | None]] = []
    owner: dict[Path, Path] = {}
    for src, rel in jobs:
        dst = out_dir / _output_name(rel, fmt)
        key = Path(os.path.normcase(os.path.abspath(dst)))
        if key in owner:
            if owner[key].resolve() == src.resolve():
                continue  # the same file named twice
            plan.append((src, dst, f"OutputError: {dst} would also be the output of {owner[key]}; "
                                   "de-identify one of them in a separate run or rename it"))
            continue
        owner[key] = src
        plan.append((src, dst, None))
    return plan


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import images

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
    if args.report and Path(args.report).resolve() in input_files:
        print(f"featdeid: error: --report {args.report} is an input file; featdeid never overwrites inputs", file=sys.stderr)
        return EXIT_USAGE
    from .faces.detect import get_detector
    from .pipeline import Deidentifier

    try:
        runner = Deidentifier(args.model, detector=args.detector, min_face_size=args.min_face_size, precision=args.precision,
                              min_score=args.min_score, thorough=args.thorough)
        get_detector(args.detector)  # fail now, not once per file
        out_dir.mkdir(parents=True, exist_ok=True)
    except FeatdeidError as e:
        print(f"featdeid: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"featdeid: error: cannot create output folder {out_dir}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    # temporary files of an earlier run that was killed mid-write: never outputs, removed now
    stale = images.remove_stale_temp_files(out_dir)
    if args.report:
        stale += images.remove_stale_temp_files(Path(args.report).parent, recursive=False)
    if stale and not args.quiet:
        print(f"featdeid: removed {len(stale)} temporary file(s) left by an interrupted run", file=sys.stderr)
    records: list[dict[str, Any]] = []
    failed, interrupted = 0, False
    plan = _plan(jobs, out_dir, args.format)
    bar = tqdm(plan, unit="img", disable=args.quiet or None, desc="de-identifying")
    try:
        for src, dst, planned_error in bar:
            rec: dict[str, Any] = {"input": str(src), "output": str(dst)}
            try:
                if planned_error:
                    rec.update(status="error", error=planned_error)
                elif dst.resolve() in input_files:
                    raise OutputError(f"{dst} is an input file; featdeid never overwrites inputs")
                elif dst.is_symlink() or dst.exists():
                    if not dst.is_file() or dst.is_symlink():
                        raise OutputError(f"{dst} exists and is not a regular file; not touched")
                    if args.overwrite:
                        rec.update(_process_file(runner, src, dst, args))
                        rec["status"] = "ok"
                    else:
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
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    summary = {
        "files": len(plan),
        "ok": sum(r["status"] == "ok" for r in records),
        "exists": sum(r["status"] == "exists" for r in records),
        "failed": failed,
        "not_done": len(plan) - len(records),
        "faces_changed": sum(r.get("changed", 0) for r in records),
        "faces_skipped": sum(r.get("skipped", 0) for r in records),
        "faces_low_confidence": sum(r.get("low_confidence", 0) for r in records),
        "interrupted": interrupted,
    }
    code = 130 if interrupted else EXIT_FAILED if failed else EXIT_OK
    if args.report:
        try:
            images.atomic_write(json.dumps({"summary": summary, "files": records}, indent=2).encode(), args.report)
        except OSError as e:
            print(f"featdeid: error: cannot write report {args.report}: {e.strerror or e}", file=sys.stderr)
            code = code or EXIT_FAILED
    if interrupted:
        print("featdeid: interrupted; finished outputs are complete, run again to resume", file=sys.stderr)
    if not args.quiet:
        print(json.dumps(summary))
    return code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="featdeid", description="De-identify every face in photos (files or folders).",
                                epilog="Other commands: `featdeid bench --help`, `featdeid eval --help`.")
    p.add_argument("inputs", nargs="+", help="image files or folders (folders are walked recursively)")
    p.add_argument("-o", "--output", required=True, help="output folder (created; never an input)")
    p.add_argument("--strength", type=float, default=None, help="0 = unchanged, 1 = model output (default: model's)")
    p.add_argument("--seed", type=int, default=None, help="fake-identity seed (default: derived from each photo)")
    p.add_argument("--model", default=None, help="model folder or Hub repo id (default: the shipped model)")
    p.add_argument("--detector", default="auto", choices=["auto", "centerface", "dlib", "insightface"],
                   help="auto: insightface where its models are on disk, else the packaged CenterFace (offline)")
    p.add_argument("--thorough", action="store_true", help="search hard photos harder (mirrored, upscaled, rotated passes; slower)")
    p.add_argument("--min-score", type=float, default=None,
                   help="leave detections scoring below this unchanged (default: de-identify all, flag low-confidence ones)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: faster on CPUs with bf16 support")
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
        signal.signal(signal.SIGTERM, _on_sigterm)  # `kill`: stop like Ctrl-C (temporary file removed, report written)
    except ValueError:  # not the main thread
        pass
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("featdeid: interrupted; finished outputs are complete, run again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``featdeid eval``: the paper's protocol, baselines and attacks as one command with a report.

    featdeid eval --model PATH --methods featdeid@1,blur@4,pixelate@8,mask,adv@8x50 \\
        --evaluators dlib,mobilefacenet:PATH --whitebox onnx:PATH \\
        --robustness --sweep 0.5,1,1.5,2 --set lfw --assets DIR --out DIR [--limit N]

Writes ``OUT/results.json``, ``OUT/report.md`` and ``OUT/plots/*.png`` (updated after every method).
Defaults take the evaluators from ``--assets``: dlib and the xiaoccer MobileFaceNet as black-box,
the faceplugin EN as white-box. Exit code 2 on a usage error (bad spec, missing model or asset).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import FeatdeidError

EXIT_OK, EXIT_USAGE = 0, 2
MFN = ("weights", "xiaoccer_mobilefacenet", "068.ckpt")
EN = ("weights", "faceplugin_fr_feature", "fr_feature.onnx")


def _assets(arg: str | None) -> Path | None:
    if arg:
        return Path(arg).expanduser()
    env = os.environ.get("FEATDEID_ASSETS")
    if env:
        return Path(env).expanduser()
    guess = Path.cwd().parent / "shared" / "assets"
    return guess if guess.is_dir() else None


def _list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="featdeid eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", default="lfw", choices=["lfw", "celeba"], help="lfw: aligned frames (pairs + 1:N); celeba: full photos (detect, paste back, re-detect)")
    p.add_argument("--assets", help="assets folder (default: $FEATDEID_ASSETS, else ../shared/assets)")
    p.add_argument("--out", required=True, help="report folder (results.json, report.md, plots/)")
    p.add_argument("--model", help="model folder or Hub repo id for featdeid@S methods (default: the shipped model)")
    p.add_argument("--methods", default="featdeid@1", help="comma list: featdeid@S, blur@SIGMA, pixelate@BLOCK, mask, adv@EPSxSTEPS, identity, shuffle")
    p.add_argument("--sweep", default="", help="comma list of featdeid strengths added as methods (quality vs ASR curve)")
    p.add_argument("--detector", default="centerface", choices=["centerface", "dlib", "insightface"],
                   help="detector that finds and aligns faces in originals and outputs (default: the packaged CenterFace)")
    p.add_argument("--evaluators", default=None, help="black-box recognisers, comma list of specs (default: dlib + the assets' MobileFaceNet)")
    p.add_argument("--whitebox", default=None, help="white-box recogniser(s) (the training EN; default: the assets' faceplugin ONNX; 'none' to skip)")
    p.add_argument("--robustness", action="store_true", help="also measure ASR after image-processing attacks on D")
    p.add_argument("--attacks", default=None, help="comma list of attacks (default all: median5,gauss5,jpeg10,bits3,webp50,resize0.5)")
    p.add_argument("--adv-target", default=None, help="recogniser the adversarial baseline attacks (default: the white-box EN)")
    p.add_argument("--adv-alpha", type=float, default=None, help="adversarial step size in /255 units (default eps/steps)")
    p.add_argument("--adv-momentum", type=float, default=1.0)
    p.add_argument("--limit", type=int, default=None, help="quick run: at most N genuine + N impostor pairs and N 1:N persons")
    p.add_argument("--persons", type=int, default=200, help="1:N persons (LFW; default 200)")
    p.add_argument("--genuine-pairs", type=int, default=None, help="ASR on this many genuine pairs, spread over the folds (default all; thresholds always use all pairs)")
    p.add_argument("--robustness-pairs", type=int, default=None, help="robustness ASR on this many of those genuine pairs (default all)")
    p.add_argument("--frame-size", type=int, default=256, help="canonical frame size for metrics and recognisers (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the 1:N choice and the per-image identities")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--examples", type=int, default=4, help="faces shown in the difference plot")
    p.add_argument("--cache-dir", default=None, help="cache of landmarks, frames and embeddings (default ~/.cache/featdeid/eval)")
    p.add_argument("--lpips-weights", default=None, help="folder with alexnet_features.safetensors + lpips_v0.1_alex_lin.safetensors (default: from --assets, else download)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: CPUs minus worker processes; all CPUs while an adversarial method runs)")
    p.add_argument("--workers", type=int, default=None, help="worker processes for dlib (default 1 with >= 2 CPUs; 0 = in this process)")
    p.add_argument("--resume", action="store_true", help="reuse methods already reported in OUT with the same settings")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> "EvalConfig":
    from .runner import EvalConfig

    assets = _assets(args.assets)
    if assets is None or not assets.is_dir():
        raise FeatdeidError(f"assets folder not found: {assets}; pass --assets or set FEATDEID_ASSETS")
    if args.evaluators is None:
        evaluators = ["dlib"] + ([f"mobilefacenet:{assets.joinpath(*MFN)}"] if assets.joinpath(*MFN).is_file() else [])
    else:
        evaluators = _list(args.evaluators)
    if args.whitebox is None:
        whitebox = [f"onnx:{assets.joinpath(*EN)}"] if assets.joinpath(*EN).is_file() else []
    elif args.whitebox.strip().lower() in ("none", ""):
        whitebox = []
    else:
        whitebox = _list(args.whitebox)
    if not evaluators and not whitebox:
        raise FeatdeidError("no evaluators: give --evaluators and/or --whitebox")
    try:
        sweep = [float(s) for s in _list(args.sweep)]
    except ValueError as e:
        raise FeatdeidError(f"--sweep must be a comma list of numbers: {e}") from None
    if args.limit is not None and args.limit < 1:
        raise FeatdeidError("--limit must be >= 1")
    for flag in ("genuine_pairs", "robustness_pairs"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise FeatdeidError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.frame_size < 64:
        raise FeatdeidError("--frame-size must be >= 64")
    return EvalConfig(
        assets=assets,
        out=Path(args.out),
        set=args.set,
        model=args.model,
        evaluators=evaluators,
        detector=args.detector,
        whitebox=whitebox,
        methods=_list(args.methods),
        sweep=sweep,
        robustness=args.robustness,
        attacks=_list(args.attacks) or None,
        adv_target=args.adv_target,
        adv_alpha=args.adv_alpha,
        adv_momentum=args.adv_momentum,
        limit=args.limit,
        persons=args.persons,
        genuine_pairs=args.genuine_pairs,
        robustness_pairs=args.robustness_pairs,
        frame_size=args.frame_size,
        seed=args.seed,
        batch_size=args.batch_size,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        examples=args.examples,
        workers=args.workers,
        resume=args.resume,
        progress=not args.quiet,
        lpips_weights=Path(args.lpips_weights) if args.lpips_weights else None,
        threads=args.threads,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        from .runner import evaluate

        results = evaluate(cfg)
    except FeatdeidError as e:
        print(f"featdeid eval: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("featdeid eval: interrupted; methods already finished are in the report (use --resume)", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"report: {Path(cfg.out) / 'report.md'}")
        print(f"total {results['timings']['total_s']} s")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

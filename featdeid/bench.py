"""``featdeid bench``: speed of the hiding network and of the full photo pipeline on this machine.

    featdeid bench [--configs small,paper] [--batch-sizes 1,8,32] [--photos IMG ...] [--json OUT]
    featdeid bench --faces 32 [--adv 8x50] [--assets DIR]      # datasets.map and adversarial baseline
    featdeid bench detect [--set test|validation] ...           # face-detection recall (featdeid.bench_detect)

Random weights are fine for timing the network; full-photo timing uses ``--model`` (default: the
shipped model, else a random small model) and the default detector.

``--faces N`` takes N LFW images from the assets and times (1) ``datasets.Dataset.map(batched=True)``
through ``featdeid.transform_for("image", ...)`` (detect, align, hide, paste back), (2) the hiding
network alone on the same faces aligned into canonical frames, and (3) the MIM adversarial baseline
of the evaluation harness (``--adv EPSxSTEPS`` against ``--adv-target``, default the assets' EN) on the
same frames, with the speed ratio featdeid / adversarial.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch

from .config import PAPER, SMALL_CPU, ModelConfig
from .model import HidingNetwork

CONFIGS = {"small": SMALL_CPU, "paper": PAPER}


def _timed(fn: Any, min_time: float, min_iters: int = 2) -> float:
    """Seconds per call (median of runs after one warm-up)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return sorted(times)[len(times) // 2]


def bench_network(config: ModelConfig | HidingNetwork, batch: int, precision: str, channels_last: bool, min_time: float) -> float:
    """Aligned faces per second through the network (a config: random weights; or a loaded model)."""
    torch.manual_seed(0)
    if isinstance(config, HidingNetwork):
        model, config = copy.deepcopy(config).eval(), config.config  # a copy: channels_last converts in place
    else:
        model = HidingNetwork(config).eval()
    x = torch.rand(batch, 3, config.image_size, config.image_size)
    e = torch.nn.functional.normalize(torch.randn(batch, config.feature_dim), dim=1)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def run() -> None:
        with torch.inference_mode(), ctx:
            model(x, e)

    return batch / _timed(run, min_time)


def bench_photos(photos: list[Path], model: Any, min_time: float) -> list[dict[str, Any]]:
    """Seconds per full photo (detect, align, hide, paste) with the default detector."""
    from PIL import Image

    from .pipeline import Deidentifier

    runner = Deidentifier(model)
    rows = []
    for p in photos:
        img = Image.open(p)
        img.load()
        _, rep = runner(img, seed=0, return_report=True)
        sec = _timed(lambda: runner(img, seed=0), min_time)
        rows.append({"photo": p.name, "size": list(img.size), "faces": rep.changed, "s_per_photo": round(sec, 3)})
    return rows


def _lfw_images(assets: Path, n: int) -> list[Path]:
    root = assets / "faces" / "lfw_pairs150" / "images"
    files = sorted(root.rglob("*.jpg"))
    if not files:
        raise SystemExit(f"featdeid bench: no LFW images under {root}; pass --assets")
    step = max(1, len(files) // n)
    return files[::step][:n]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_faces(paths: list[Path], model: Any, adv: str, adv_target: str, map_batch: int, min_time: float) -> dict[str, Any]:
    """``datasets.map`` through ``transform_for``, the network on aligned frames and the adversarial baseline."""
    from PIL import Image

    from .evaluation.baselines import parse_method
    from .faces.align import align
    from .pipeline import Deidentifier
    from .recognisers import load_recogniser
    from .transforms import transform_for

    out: dict[str, Any] = {"faces": len(paths), "threads": torch.get_num_threads(), "dtype": "float32"}
    images = [Image.open(p).convert("RGB") for p in paths]
    try:
        import datasets
    except ImportError:
        datasets = None
    runner = Deidentifier(model)
    if datasets is not None:
        ds = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
        fn = transform_for("image", model=runner, seed=0)
        ds.map(fn, batched=True, batch_size=map_batch, load_from_cache_file=False, keep_in_memory=True)  # warm-up
        t0 = time.perf_counter()
        mapped = ds.map(fn, batched=True, batch_size=map_batch, load_from_cache_file=False, keep_in_memory=True)
        sec = time.perf_counter() - t0
        out["datasets_map"] = {"images_per_s": round(len(ds) / sec, 2), "s": round(sec, 2), "batch_size": map_batch, "faces_changed": int(sum(mapped["num_faces"]))}
    else:
        out["datasets_map"] = {"skipped": "the 'datasets' package is not installed"}
    frames = torch.cat([f for f in (align(im, model.image_size, largest=True)[0] for im in images) if len(f)])
    out["aligned"] = int(len(frames))
    feats = model.identity_bank[torch.arange(len(frames)) % model.identity_bank.shape[0]].float()
    sec = _timed(lambda: runner.hide(frames, feats), min_time)
    out["featdeid_frames"] = {"faces_per_s": round(len(frames) / sec, 2), "frame_size": model.image_size}
    method = parse_method(f"adv@{adv}", adv_recogniser=lambda: load_recogniser(adv_target), adv_target_name=adv_target, batch_size=16)
    keys = [str(i) for i in range(len(frames))]
    t0 = time.perf_counter()
    method.apply(frames, keys)
    sec = time.perf_counter() - t0
    out["adversarial_frames"] = {"faces_per_s": round(len(frames) / sec, 3), "spec": method.name, "target": adv_target, "s": round(sec, 2)}
    out["ratio_featdeid_over_adversarial"] = round(out["featdeid_frames"]["faces_per_s"] / out["adversarial_frames"]["faces_per_s"], 1)
    if "images_per_s" in out["datasets_map"]:
        out["ratio_datasets_map_over_adversarial"] = round(out["datasets_map"]["images_per_s"] / out["adversarial_frames"]["faces_per_s"], 1)
    out["peak_rss_mib"] = round(_peak_mib())
    return out


def _shipped() -> HidingNetwork:
    """The packaged default model; unlike :func:`_default_model`, never a random stand-in."""
    from .loading import load

    return load()


def _default_model() -> Any:
    from .errors import ModelNotFoundError
    from .loading import load

    try:
        return load()
    except ModelNotFoundError:
        torch.manual_seed(0)
        model = HidingNetwork(SMALL_CPU, identity_bank=torch.nn.functional.normalize(torch.randn(16, 512), dim=1))
        return model


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "detect":
        from .bench_detect import main as detect_main

        return detect_main(argv[1:])
    p = argparse.ArgumentParser(prog="featdeid bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="small,paper", help="comma list of: small, paper (random weights), shipped (the default model's weights)")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--channels-last", default="off,on", help="comma list of off/on")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds to time each case")
    p.add_argument("--photos", nargs="*", default=[], help="full photos to time end to end")
    p.add_argument("--model", default=None, help="model for the photo timing (default: shipped model)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", help="write results here")
    p.add_argument("--faces", type=int, default=0, help="time datasets.map and the adversarial baseline on this many LFW faces (0 = skip)")
    p.add_argument("--assets", default=None, help="assets folder for --faces (default: $FEATDEID_ASSETS, else ../shared/assets)")
    p.add_argument("--adv", default="8x50", help="adversarial baseline EPSxSTEPS for --faces (default 8x50)")
    p.add_argument("--adv-target", default=None, help="recogniser spec the adversarial baseline attacks (default: the assets' EN)")
    p.add_argument("--map-batch-size", type=int, default=8, help="datasets.map batch size for --faces")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    print(json.dumps(info))
    rows = []
    print(f"{'config':7} {'batch':>5} {'dtype':5} {'chlast':6} {'faces/s':>9}")
    for name in args.configs.split(","):
        cfg = _shipped() if name.strip() == "shipped" else CONFIGS[name.strip()]
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            for prec in args.precisions.split(","):
                for cl in args.channels_last.split(","):
                    fps = bench_network(cfg, bs, prec.strip(), cl.strip() == "on", args.min_time)
                    rows.append({"config": name, "batch": bs, "dtype": prec, "channels_last": cl == "on", "faces_per_s": round(fps, 2)})
                    print(f"{name:7} {bs:5d} {prec:5} {cl:6} {fps:9.2f}", flush=True)
    photos = []
    if args.photos:
        model = args.model if args.model else _default_model()
        photos = bench_photos([Path(x) for x in args.photos], model, args.min_time)
        for r in photos:
            print(f"photo {r['photo']} {r['size'][0]}x{r['size'][1]} faces={r['faces']} {r['s_per_photo']:.3f} s/photo")
    faces: dict[str, Any] = {}
    if args.faces > 0:
        import os

        assets = Path(args.assets or os.environ.get("FEATDEID_ASSETS") or Path.cwd().parent / "shared" / "assets")
        target = args.adv_target or f"onnx:{assets / 'weights' / 'faceplugin_fr_feature' / 'fr_feature.onnx'}"
        model = args.model if args.model else _default_model()
        if not isinstance(model, HidingNetwork):
            from .loading import load

            model = load(model)
        faces = bench_faces(_lfw_images(assets, args.faces), model, args.adv, target, args.map_batch_size, args.min_time)
        dm = faces["datasets_map"]
        print(f"threads {faces['threads']} dtype {faces['dtype']} faces {faces['faces']} (aligned {faces['aligned']})")
        if "images_per_s" in dm:
            print(f"datasets.map(batched=True, batch_size={dm['batch_size']}) via transform_for: {dm['images_per_s']:.2f} images/s (detect, align, hide, paste)")
        else:
            print(f"datasets.map: {dm['skipped']}")
        print(f"featdeid network on aligned frames ({faces['featdeid_frames']['frame_size']}px): {faces['featdeid_frames']['faces_per_s']:.2f} faces/s")
        print(f"adversarial {faces['adversarial_frames']['spec']} vs {faces['adversarial_frames']['target']}: {faces['adversarial_frames']['faces_per_s']:.3f} faces/s")
        print(f"ratio featdeid / adversarial: {faces['ratio_featdeid_over_adversarial']}x" + (f" (datasets.map pipeline / adversarial: {faces['ratio_datasets_map_over_adversarial']}x)" if "ratio_datasets_map_over_adversarial" in faces else ""))
    peak = _peak_mib()
    print(f"peak RSS {peak:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "network": rows, "photos": photos, "faces": faces, "peak_rss_mib": round(peak)}, indent=2))
    return 0

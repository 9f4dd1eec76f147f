"""``featdeid bench``: speed of the hiding network and of the full photo pipeline on this machine.

    featdeid bench [--configs small,paper] [--batch-sizes 1,8,32] [--photos IMG ...] [--json OUT]

Random weights are fine for timing the network; full-photo timing uses ``--model`` (default: the
shipped model, else a random small model) and the dlib detector.
"""

from __future__ import annotations

import argparse
import contextlib
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


def bench_network(config: ModelConfig, batch: int, precision: str, channels_last: bool, min_time: float) -> float:
    """Aligned faces per second through the network."""
    torch.manual_seed(0)
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
    """Seconds per full photo (detect, align, hide, paste) with the dlib detector."""
    from PIL import Image

    from .pipeline import Deidentifier

    runner = Deidentifier(model, detector="dlib")
    rows = []
    for p in photos:
        img = Image.open(p)
        img.load()
        _, rep = runner(img, seed=0, return_report=True)
        sec = _timed(lambda: runner(img, seed=0), min_time)
        rows.append({"photo": p.name, "size": list(img.size), "faces": rep.changed, "s_per_photo": round(sec, 3)})
    return rows


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
    p = argparse.ArgumentParser(prog="featdeid bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="small,paper", help="comma list of: small, paper")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--channels-last", default="off,on", help="comma list of off/on")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds to time each case")
    p.add_argument("--photos", nargs="*", default=[], help="full photos to time end to end")
    p.add_argument("--model", default=None, help="model for the photo timing (default: shipped model)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    print(json.dumps(info))
    rows = []
    print(f"{'config':7} {'batch':>5} {'dtype':5} {'chlast':6} {'faces/s':>9}")
    for name in args.configs.split(","):
        cfg = CONFIGS[name.strip()]
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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "network": rows, "photos": photos, "peak_rss_mib": round(peak)}, indent=2))
    return 0

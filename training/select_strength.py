"""Choose a model's default ``strength`` on the experiment's validation covers (never a test set).

    python training/select_strength.py --config training/configs/default_cpu_ft.yaml --model MODEL_DIR \
        --out SWEEP_DIR [--strengths 0.25,0.5,...] [--write]

The validation covers (the config's seeded split, never seen in training) are re-detected and
aligned into the evaluation frame (256 px, as ``featdeid eval``), de-identified at each strength
exactly as ``featdeid eval`` does (residual upsampled, feathered mask), and measured: PSNR, SSIM,
LPIPS(alex) between C and D, and the training EN's cosine ``cos(f(C), f(D))`` (white-box; the
evaluators are never used here). The chosen strength is the largest whose means meet every quality
target (PSNR >= 30 dB, SSIM >= 0.93, LPIPS <= 0.05 by default) at their one-sided 95 % confidence
bound (``--confidence``; mean -/+ 1.645 standard errors), so the targets hold on new photos and
not just on these covers: identity change grows with strength,
so that is the most protective setting the quality budget allows. ``--write`` stores it as
``default_strength`` in ``MODEL_DIR/config.json``. Writes ``sweep.json`` and ``sweep.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import NormalDist
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from training.cli import reports_errors

DEFAULT_STRENGTHS = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.35, 1.4, 1.45, 1.5, 1.55, 1.6, 1.7, 1.8, 2.0, 3.0)
FRAME = 256


def validation_frames(cfg: Any, size: int = FRAME, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """The config's validation covers, detected (dlib) and aligned at ``size``: uint8 ``(N, 3, S, S)`` and keys."""
    return cover_frames(cfg, "val", size, limit)


def cover_frames(cfg: Any, split: str, size: int = FRAME, limit: int | None = None, seed: int | None = None,
                 progress: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Covers of the config's ``"train"`` or ``"val"`` split (in split order, or shuffled with ``seed``),
    detected (dlib) and aligned at ``size``: the first ``limit`` with a face, uint8 ``(N, 3, S, S)``, and keys."""
    from tqdm.auto import tqdm

    from featdeid.faces.detect import get_detector
    from training.data import _largest_face, align_face, list_source
    from training.experiment import build_covers

    covers, cover_train, cover_val = build_covers(cfg, progress=False)
    order = np.asarray(cover_train if split == "train" else cover_val)
    if seed is not None:
        order = np.random.default_rng(seed).permutation(order)
    loaders = dict(list_source(cfg.data.cover)[0])
    det = get_detector(cfg.data.detector)
    frames, used = [], []
    bar = tqdm(total=limit or len(order), desc=f"{split} covers", disable=not progress)
    for i in order:
        if limit is not None and len(used) == limit:
            break
        k = covers.keys[int(i)]
        image = loaders[k]().convert("RGB")
        lm = _largest_face(det, np.asarray(image))
        if lm is None:
            continue
        frames.append(torch.from_numpy(align_face(image, lm, size)).permute(2, 0, 1))
        used.append(k)
        bar.update()
    bar.close()
    return torch.stack(frames), used


def sweep(model_dir: str | Path, frames: torch.Tensor, keys: list[str], recogniser: Any, strengths: list[float],
          lpips_weights: str | Path | None, batch: int = 32) -> list[dict[str, float]]:
    """Mean quality and white-box cosine per strength."""
    from tqdm.auto import tqdm

    from featdeid.evaluation.baselines import FeatdeidMethod
    from featdeid.evaluation.metrics import LPIPSAlex, mean_psnr, psnr, ssim
    from featdeid.pipeline import Deidentifier

    deid = Deidentifier(model_dir)
    lp = LPIPSAlex(lpips_weights)
    covers = frames.float() / 255.0

    def embed(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.nn.functional.normalize(recogniser.embed(x).float(), dim=1)

    f_c = torch.cat([embed(covers[i : i + batch]) for i in range(0, len(covers), batch)])
    rows = []
    for s in tqdm(strengths, desc="strength sweep"):
        method = FeatdeidMethod(deid, s, seed=0)
        p, q, l, cos = [], [], [], []
        for i in range(0, len(covers), batch):
            c = covers[i : i + batch]
            with torch.inference_mode():
                d = method.apply(c, keys[i : i + batch])
            d8 = (d * 255).round().to(torch.uint8)
            c8 = frames[i : i + batch]
            p.append(psnr(c8, d8))
            q.append(ssim(c8, d8))
            l.append(lp(c8, d8))
            cos.append((embed(d8.float() / 255.0) * f_c[i : i + batch]).sum(1).numpy())
        pv, qv, lv = np.concatenate(p), np.concatenate(q), np.concatenate(l)
        rows.append({"strength": s, "psnr": mean_psnr(pv), "ssim": float(qv.mean()), "lpips": float(lv.mean()),
                     "whitebox_cos": float(np.concatenate(cos).mean()),
                     "psnr_se": _standard_error(pv[np.isfinite(pv)]), "ssim_se": _standard_error(qv), "lpips_se": _standard_error(lv)})
    return rows


def _standard_error(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def choose(rows: list[dict[str, float]], min_psnr: float, min_ssim: float, max_lpips: float, z: float = 0.0) -> float | None:
    """The largest strength whose means meet every target with ``z`` standard errors to spare.

    ``z = 1.645``: each target holds at the one-sided 95 % confidence bound of its mean, so it holds
    on new photos like the validation covers, not only on these (their mean carries sampling error).
    """
    ok = [r["strength"] for r in rows
          if r["psnr"] - z * r.get("psnr_se", 0.0) >= min_psnr and r["ssim"] - z * r.get("ssim_se", 0.0) >= min_ssim
          and r["lpips"] + z * r.get("lpips_se", 0.0) <= max_lpips]
    return max(ok) if ok else None


def plot(rows: list[dict[str, float]], chosen: float | None, path: Path, targets: tuple[float, float, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [r["strength"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key, target, label in zip(axes, ("psnr", "ssim", "lpips", "whitebox_cos"), (*targets, None),
                                      ("PSNR (dB)", "SSIM", "LPIPS (alex)", "EN cos(C, D) (white-box)")):
        ax.plot(s, [r[key] for r in rows], "o-")
        if target is not None:
            ax.axhline(target, color="tab:red", ls="--", lw=1, label="target")
        if chosen is not None:
            ax.axvline(chosen, color="tab:green", ls=":", lw=1.5, label=f"chosen s={chosen:g}")
        ax.set_xlabel("strength")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("strength sweep on the validation covers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@reports_errors
def main(argv: list[str] | None = None) -> int:
    from featdeid.evaluation.metrics import default_lpips_weights
    from featdeid.images import atomic_write
    from training.config import load_config
    from training.experiment import build_recogniser

    p = argparse.ArgumentParser(description="Choose default_strength on the validation covers.")
    p.add_argument("--config", required=True)
    p.add_argument("--model", required=True, help="exported model folder")
    p.add_argument("--out", required=True, help="folder for sweep.json and sweep.png")
    p.add_argument("--strengths", default=",".join(map(str, DEFAULT_STRENGTHS)))
    p.add_argument("--limit", type=int, default=None, help="at most N validation covers")
    p.add_argument("--min-psnr", type=float, default=30.0)
    p.add_argument("--min-ssim", type=float, default=0.93)
    p.add_argument("--max-lpips", type=float, default=0.05)
    p.add_argument("--confidence", type=float, default=0.95,
                   help="meet each target at this one-sided confidence bound of its validation mean (0.5: the means)")
    p.add_argument("--lpips-weights", default=None, help="default: $FEATDEID_ASSETS/weights/imagenet_alexnet")
    p.add_argument("--write", action="store_true", help="store the choice as default_strength in MODEL/config.json")
    args = p.parse_args(argv)
    if not 0.5 <= args.confidence < 1.0:
        print("error: --confidence must be in [0.5, 1)", file=sys.stderr)
        return 2
    cfg = load_config(args.config)
    strengths = sorted(float(x) for x in args.strengths.split(",") if x.strip())
    lpw = args.lpips_weights or default_lpips_weights()
    frames, keys = validation_frames(cfg, limit=args.limit)
    rows = sweep(args.model, frames, keys, build_recogniser(cfg), strengths, lpw)
    targets = (args.min_psnr, args.min_ssim, args.max_lpips)
    chosen = choose(rows, *targets, z=NormalDist().inv_cdf(args.confidence))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": str(args.model), "covers": len(keys), "frame": FRAME, "targets": dict(zip(("min_psnr", "min_ssim", "max_lpips"), targets)),
              "confidence": args.confidence,
              "rows": rows, "chosen": chosen}
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, chosen, out / "sweep.png", targets)
    for r in rows:
        print(f"s={r['strength']:<5g} PSNR {r['psnr']:6.2f} ±{r['psnr_se']:.2f}  SSIM {r['ssim']:.4f}  LPIPS {r['lpips']:.4f}  EN cos {r['whitebox_cos']:+.3f}")
    print(f"chosen strength: {chosen} on {len(keys)} validation covers")
    if chosen is None:
        print("no strength meets the quality targets", file=sys.stderr)
        return 1
    if args.write:
        cfg_path = Path(args.model) / "config.json"
        config = json.loads(cfg_path.read_text())
        config["default_strength"] = chosen
        atomic_write((json.dumps(config, indent=2) + "\n").encode(), cfg_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fit a model's per-face strength head on training covers and choose its γ on the validation covers.

    python training/fit_strength_head.py --config training/configs/default_cpu_ghost_tau02.yaml \
        --model MODEL_DIR --out REPORT_DIR [--covers 3000] [--gammas 0,0.05,0.1,0.15,0.2] [--write]

Some faces keep their identity for the training recogniser (EN) at a strength that de-identifies
most others. The U-Net's bottleneck tells them apart: its per-channel mean and standard deviation
(:class:`featdeid.model.StrengthHead`) are regressed (ridge, the penalty chosen on a held-out fifth)
onto the EN's cos(C, D) at the model's default strength, over ``--covers`` training covers, and the
prediction is standardised to z. The model then scales each face's change by ``exp(γ z)``: more for
faces predicted hard, less for easy ones, at the same mean PSNR.

γ is chosen on the validation covers (never a test set), replaying every face's measured cos and
PSNR over a strength grid: for each γ the common strength is set so that the mean PSNR meets
``--min-psnr`` at the one-sided confidence bound ``select_strength.py`` uses (a larger γ spreads the
faces' PSNR and so costs some strength), and the share of faces whose EN cos falls under
``--threshold`` (the EN's verification threshold) is read. The best γ wins; ties go to the smaller.
The evaluators are never used. ``--write`` stores the head and γ in MODEL_DIR (then re-run
``select_strength.py --write``: the per-face spread changes the strength that meets the targets).
Writes ``strength_head.json`` and ``strength_head.png`` to REPORT_DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from statistics import NormalDist
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

from training.cli import reports_errors

RELATIVE_STRENGTHS = (0.6, 0.75, 0.9, 1.0, 1.12, 1.27, 1.43, 1.6)
LAMBDAS = (10.0, 100.0, 300.0, 1000.0, 3000.0)


def measure(model: Any, frames: torch.Tensor, recogniser: Any, strengths: np.ndarray, seed: int = 0,
            batch: int = 32, desc: str = "faces") -> dict[str, np.ndarray]:
    """Per face: bottleneck statistics ``(N, 2C)``, and the EN cos(C, D) and PSNR at each strength ``(N, K)``,
    de-identified as ``featdeid eval`` does (residual upsampled, feathered mask, 8-bit)."""
    from tqdm.auto import tqdm

    from featdeid.evaluation.baselines import apply_mask
    from featdeid.evaluation.metrics import psnr
    from featdeid.model import StrengthHead

    bank = model.identity_bank.float()
    size = model.image_size
    grabbed: list[torch.Tensor] = []
    hook = model.mid.register_forward_hook(lambda mod, inp, out: grabbed.append(out.float()))
    g = torch.Generator().manual_seed(seed)

    def embed(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(recogniser.embed(x).float(), dim=1)

    stats, cos, ps = [], [], []
    try:
        with torch.inference_mode():
            for i in tqdm(range(0, len(frames), batch), desc=desc):
                c8 = frames[i : i + batch]
                c = c8.float() / 255.0
                small = F.interpolate(c, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                grabbed.clear()
                r = model.residual(small, bank[torch.randint(len(bank), (len(c),), generator=g)]).float()
                stats.append(StrengthHead.statistics(sum(grabbed) / len(grabbed)))
                r = F.interpolate(r, size=c.shape[-2:], mode="bilinear", align_corners=False)
                f_c = embed(c)
                row_c, row_p = [], []
                for s in strengths:
                    d8 = (apply_mask(c, c + float(s) * r).clamp(0, 1) * 255).round()
                    row_c.append((embed(d8 / 255.0) * f_c).sum(1))
                    row_p.append(torch.from_numpy(psnr(c8, d8.to(torch.uint8))))
                cos.append(torch.stack(row_c, 1))
                ps.append(torch.stack(row_p, 1))
    finally:
        hook.remove()
    return {"stats": torch.cat(stats).numpy().astype(np.float64), "cos": torch.cat(cos).numpy().astype(np.float64),
            "psnr": torch.cat(ps).numpy().astype(np.float64)}


def ridge(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """Ridge regression on standardised columns; returns ``(w, b)`` for raw ``x``: ``x @ w + b``."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    a = (x - mu) / sd
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (y - y.mean()))
    return w / sd, float(y.mean() - (mu / sd) @ w)


def fit_head(stats: np.ndarray, target: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """The penalty with the best correlation on a held-out fifth, refitted on all; z standardised on the training covers."""
    perm = np.random.default_rng(seed).permutation(len(target))
    hold, fit = perm[: len(perm) // 5], perm[len(perm) // 5 :]
    scores = {}
    for lam in LAMBDAS:
        w, b = ridge(stats[fit], target[fit], lam)
        scores[lam] = float(np.corrcoef(stats[hold] @ w + b, target[hold])[0, 1])
    lam = max(scores, key=scores.get)
    w, b = ridge(stats, target, lam)
    pred = stats @ w + b
    mean, sd = float(pred.mean()), float(pred.std())
    return {"weight": w / sd, "bias": (b - mean) / sd, "lambda": lam, "holdout_corr": scores}


def replay(cos: np.ndarray, ps: np.ndarray, strengths: np.ndarray, z: np.ndarray, gamma: float, min_psnr: float,
           zq: float, threshold: float) -> dict[str, float]:
    """Faces' measured curves at per-face strength ``s0 exp(γ z)``, ``s0`` the largest meeting ``min_psnr``
    at the confidence bound (PSNR exact in log strength; cos interpolated, and held at the grid's ends)."""
    log_s = np.log(strengths)
    at_one = np.array([np.interp(0.0, log_s, p + 20 * np.log10(strengths)) for p in ps])

    def at(s0: float) -> tuple[np.ndarray, np.ndarray]:
        s = s0 * np.exp(gamma * z)
        p = at_one - 20 * np.log10(s)
        return s, p

    lo, hi = strengths[0] / 4, strengths[-1] * 4
    for _ in range(60):
        mid = float(np.sqrt(lo * hi))
        p = at(mid)[1]
        if p.mean() - zq * p.std(ddof=1) / np.sqrt(len(p)) >= min_psnr:
            lo = mid
        else:
            hi = mid
    s, p = at(lo)
    c = np.array([np.interp(np.log(si), log_s, ci) for si, ci in zip(s, cos)])
    return {"gamma": gamma, "strength": lo, "psnr": float(p.mean()), "psnr_se": float(p.std(ddof=1) / np.sqrt(len(p))),
            "asr": float((c < threshold).mean()), "mean_cos": float(c.mean()),
            "strength_p10": float(np.percentile(s, 10)), "strength_p90": float(np.percentile(s, 90))}


def plot(rows: list[dict[str, float]], chosen: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    g = [r["gamma"] for r in rows]
    ax.plot(g, [100 * r["asr"] for r in rows], "o-")
    ax.axvline(chosen, color="grey", ls="--", lw=1)
    ax.set_xlabel("γ (per-face strength exp(γ z))")
    ax.set_ylabel("EN ASR on validation covers (%)")
    ax.set_title("strength head: γ at equal PSNR bound")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@reports_errors
def main(argv: list[str] | None = None) -> int:
    from featdeid.errors import ConfigError
    from featdeid.images import atomic_write
    from featdeid.model import HidingNetwork
    from featdeid.weights import load_safetensors
    from training.config import load_config
    from training.experiment import build_recogniser
    from training.select_strength import cover_frames

    p = argparse.ArgumentParser(description="Fit the per-face strength head and choose γ on the validation covers.")
    p.add_argument("--config", required=True)
    p.add_argument("--model", required=True, help="exported model folder")
    p.add_argument("--out", required=True, help="folder for strength_head.json and strength_head.png")
    p.add_argument("--fit-config", default=None,
                   help="fit the head to this experiment's recogniser instead (e.g. a robust copy of the EN; same data); "
                        "γ is still replayed with --config's EN")
    p.add_argument("--covers", type=int, default=3000, help="training covers to fit on")
    p.add_argument("--gammas", default="0,0.05,0.1,0.15,0.2,0.25")
    p.add_argument("--threshold", type=float, default=0.27,
                   help="the EN's verification threshold (featdeid eval's best-accuracy threshold for fr_feature on clean pairs: 0.268)")
    p.add_argument("--min-psnr", type=float, default=30.0)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help="store the head and the chosen γ in MODEL")
    args = p.parse_args(argv)
    try:
        gammas = sorted(float(x) for x in args.gammas.split(",") if x.strip())
    except ValueError:
        print(f"error: --gammas must be numbers, got {args.gammas!r}", file=sys.stderr)
        return 2
    if not gammas or not all(0 <= g <= 1 for g in gammas) or args.covers < 50:
        print("error: --gammas must lie in [0, 1] and --covers be at least 50", file=sys.stderr)
        return 2
    cfg = load_config(args.config)
    model = HidingNetwork.from_pretrained(args.model)
    base = HidingNetwork(dataclasses.replace(model.config, adaptive_strength=0.0), identity_bank=model.identity_bank)
    base.load_state_dict(model.network_state())
    base.eval()
    recogniser = build_recogniser(cfg)
    fit_cfg = load_config(args.fit_config) if args.fit_config else cfg
    if fit_cfg.data != cfg.data:
        raise ConfigError(f"--fit-config {args.fit_config} splits other data than --config {args.config}")
    fit_recogniser = build_recogniser(fit_cfg) if args.fit_config else recogniser
    strengths = model.config.default_strength * np.asarray(RELATIVE_STRENGTHS)
    train_frames, _ = cover_frames(cfg, "train", limit=args.covers, seed=args.seed, progress=True)
    val_frames, val_keys = cover_frames(cfg, "val", progress=True)
    train = measure(base, train_frames, fit_recogniser, strengths, seed=args.seed, desc="training covers")
    val = measure(base, val_frames, recogniser, strengths, seed=args.seed + 1, desc="validation covers")
    val_fit = val if fit_recogniser is recogniser else measure(base, val_frames, fit_recogniser, strengths,
                                                                 seed=args.seed + 1, desc="validation covers (fit)")
    at_default = RELATIVE_STRENGTHS.index(1.0)
    head = fit_head(train["stats"], train["cos"][:, at_default], seed=args.seed)
    z_val = np.clip(val["stats"] @ head["weight"] + head["bias"], -3, 3)
    corr = float(np.corrcoef(z_val, val_fit["cos"][:, at_default])[0, 1])
    zq = NormalDist().inv_cdf(args.confidence)
    rows = [replay(val["cos"], val["psnr"], strengths, z_val, g, args.min_psnr, zq, args.threshold) for g in gammas]
    best = max(rows, key=lambda r: (round(r["asr"], 6), -r["gamma"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": str(args.model), "fitted_to": fit_cfg.exported_recogniser(),
              "replayed_with": cfg.exported_recogniser(), "training_covers": len(train_frames), "validation_covers": len(val_keys),
              "default_strength": model.config.default_strength, "threshold": args.threshold, "min_psnr": args.min_psnr,
              "confidence": args.confidence, "lambda": head["lambda"],
              "holdout_corr": {str(k): v for k, v in head["holdout_corr"].items()}, "validation_corr": corr,
              "rows": rows, "chosen_gamma": best["gamma"]}
    (out / "strength_head.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, best["gamma"], out / "strength_head.png")
    print(f"head: ridge λ {head['lambda']:g}, correlation with the fitted recogniser's cos on validation covers {corr:.3f}")
    for r in rows:
        print(f"γ={r['gamma']:<5g} strength {r['strength']:.3f}  PSNR {r['psnr']:.2f} ±{r['psnr_se']:.2f}  "
              f"EN ASR {100 * r['asr']:.1f} %  mean cos {r['mean_cos']:+.3f}  per-face strength p10–p90 "
              f"{r['strength_p10']:.2f}–{r['strength_p90']:.2f}")
    print(f"chosen γ: {best['gamma']:g} on {len(val_keys)} validation covers")
    if args.write:
        folder = Path(args.model)
        config = dataclasses.replace(model.config, adaptive_strength=best["gamma"])
        fitted = HidingNetwork(config, identity_bank=base.identity_bank)
        state = base.state_dict()
        if config.adaptive_strength > 0:
            state["strength_head.linear.weight"] = torch.tensor(head["weight"], dtype=torch.float32)[None]
            state["strength_head.linear.bias"] = torch.tensor([head["bias"]], dtype=torch.float32)
        fitted.load_state_dict(state, strict=True)
        half = any(v.dtype == torch.float16 for v in load_safetensors(folder / "model.safetensors").values())
        tmp = folder / ".strength_head.tmp"
        fitted.save_pretrained(tmp, half=half)
        for name in ("model.safetensors", "config.json"):
            atomic_write((tmp / name).read_bytes(), folder / name)
            (tmp / name).unlink()
        tmp.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

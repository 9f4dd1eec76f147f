"""Move along the line through two checkpoints of one network: ``W = A + alpha * (A - B)``.

    python training/extrapolate.py --from training/checkpoints/default_cpu_lowperc/best \\
        --to training/checkpoints/default_cpu_lownear/best --alpha 1.0 --output runs/extrapolated

``alpha`` > 0 extrapolates past ``A`` (``--to``) in the direction a fine-tune took from ``B``
(``--from``), ``alpha`` in (-1, 0) interpolates between them (weight averaging), 0 copies ``A``.
The output is a checkpoint folder (``model.safetensors``, and ``A``'s ``config.json`` when it has
one, as ``RUN/best`` does) that ``training/export.py --weights`` reads. Only floating-point tensors move.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from featdeid.errors import ConfigError
from featdeid.images import atomic_write
from featdeid.weights import load_safetensors, save_safetensors
from training.cli import reports_errors


def extrapolate(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """``a + alpha * (a - b)`` per floating-point tensor (computed in float32, stored in ``a``'s dtype)."""
    if a.keys() != b.keys():
        raise ConfigError(f"the checkpoints hold different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    if not math.isfinite(alpha):
        raise ConfigError(f"alpha must be a finite number, got {alpha}")
    out = {}
    for k, t in a.items():
        if t.shape != b[k].shape:
            raise ConfigError(f"{k}: shape {tuple(t.shape)} against {tuple(b[k].shape)}")
        if t.is_floating_point():
            out[k] = (t.float() + alpha * (t.float() - b[k].float())).to(t.dtype)
        else:
            out[k] = t.clone()
    return out


@reports_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="start", required=True, help="checkpoint B (config.json + model.safetensors)")
    p.add_argument("--to", dest="end", required=True, help="checkpoint A, fine-tuned from B")
    p.add_argument("--alpha", type=float, required=True, help="W = A + alpha (A - B)")
    p.add_argument("--output", required=True, help="checkpoint folder to write")
    args = p.parse_args(argv)
    start, end, out = Path(args.start), Path(args.end), Path(args.output)
    for folder in (start, end):
        if not (folder / "model.safetensors").is_file():
            raise ConfigError(f"{folder} is not a checkpoint folder (no model.safetensors)")
    configs = [f / "config.json" for f in (start, end) if (f / "config.json").is_file()]
    if len(configs) == 2 and json.loads(configs[0].read_text()) != json.loads(configs[1].read_text()):
        raise ConfigError(f"{start} and {end} are different networks (their config.json differ)")
    w = extrapolate(load_safetensors(end / "model.safetensors"), load_safetensors(start / "model.safetensors"), args.alpha)
    save_safetensors(w, out / "model.safetensors", metadata={"format": "pt", "extrapolated": json.dumps(
        {"from": str(start), "to": str(end), "alpha": args.alpha})})
    if (end / "config.json").is_file():
        atomic_write((end / "config.json").read_bytes(), out / "config.json")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

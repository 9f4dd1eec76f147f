"""Export a trained hiding network as a featdeid model folder.

    python training/export.py --config training/configs/small_cpu.yaml --weights RUN/best --output MODEL_DIR

The folder holds ``config.json`` (with ``recogniser`` set to the EN name, no machine paths),
``model.safetensors`` (network + identity bank: EN features ``(N, D)`` of the training-split E
images, i.e. the fake faces) and a model card stub ``README.md``. It loads with
``featdeid.load(path)`` / ``HidingNetwork.from_pretrained(path)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from featdeid.config import ModelConfig
from featdeid.model import HidingNetwork
from featdeid.weights import load_safetensors
from training.cli import reports_errors
from training.data import to_tensor

if TYPE_CHECKING:
    from training.config import TrainConfig
    from training.experiment import ExperimentData


def identity_bank(recogniser: torch.nn.Module, data: ExperimentData, cfg: TrainConfig, batch: int = 64,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """EN features ``(N, D)`` float32 of the training-split E images (noise mode: seeded noise images)."""
    feats = []
    if data.embeds is None or data.embed_train is None:
        n, s = 1024, cfg.model.image_size
        gen = torch.Generator().manual_seed(cfg.run.seed)
        chunks = [torch.randn(min(batch, n - i), 3, s, s, generator=gen) for i in range(0, n, batch)]
    else:
        idx = np.asarray(data.embed_train)
        chunks = [torch.stack([to_tensor(data.embeds.get(int(j))) for j in idx[i : i + batch]]) for i in range(0, len(idx), batch)]
    with torch.no_grad():
        for x in chunks:
            feats.append(recogniser.embed(x.to(device)).float().cpu())
    return torch.cat(feats)


def _short(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def model_card(cfg: TrainConfig, info: dict[str, Any], n_bank: int) -> str:
    """A model card stub: what was trained on what, with which losses."""
    w = cfg.losses.weights
    d = cfg.data
    embed = _short(d.embed.path) if d.embed is not None else "standard-normal noise"
    arch = dataclasses.replace(cfg.model, recogniser=cfg.exported_recogniser()).to_dict()
    return f"""---
library_name: featdeid
tags: [face-de-identification, privacy]
---
# featdeid model: {cfg.name}

Hiding network of Hanawa, Ito & Aoki, "Face image de-identification based on feature embedding"
(EURASIP JIVP 2024), trained with featdeid's `training/` code.

- Architecture: {json.dumps(arch)}
- EN (extracting network): `{cfg.exported_recogniser()}`; the identity bank holds {n_bank} EN features of the
  training-split embedding images (`{embed}`, mode `{d.embed_mode}`).
- Covers: `{_short(d.cover.path)}`; validation fraction {d.val_fraction}, split seed {d.split_seed}.
- Losses: rec {w['rec']} ({cfg.losses.rec_norm}), perc {w['perc']} ({cfg.losses.perceptual_backbone}), lpips {w['lpips']} (VGG-16),
  near {w['near']}, far {w['far']} ({cfg.losses.far_mode}){_ours(cfg)}.
- Transfer (views of D before EN, ghost EN): {json.dumps(dataclasses.asdict(cfg.transfer))}
- Optimiser: Adam lr {cfg.optim.lr}, batch {cfg.optim.batch_size} per process, up to {cfg.optim.epochs} epochs,
  mixed precision {cfg.run.mixed_precision}.
- Selected checkpoint: {json.dumps(info)}

## Limitations and terms
The training photos come with research-only terms; check them before using or redistributing these
weights. Measured de-identification and image-quality numbers: not yet filled in (run `featdeid eval`).
"""


def _ours(cfg: TrainConfig) -> str:
    w, lc = cfg.losses.weights, cfg.losses
    mid = f", mid {w['mid']} (EN layers {', '.join(lc.mid_layers)})" if w["mid"] else ""
    return mid + (f", budget {w['budget']} (PSNR {lc.budget_psnr} dB)" if w["budget"] else "")


def export_model(weights: str | Path, cfg: TrainConfig, output: str | Path, recogniser: torch.nn.Module | None = None,
                 data: ExperimentData | None = None, device: torch.device | str = "cpu", half: bool = False,
                 flip_average: bool | None = None, sharpen: float | None = None, chroma: float | None = None) -> Path:
    """Write the model folder from trained weights (a folder saved by ``save_pretrained``, or a training
    checkpoint ``RUN/checkpoints/step_N``); ``half``
    stores the weights as float16 (half the size; they run in float32 after loading); ``flip_average``
    (``None``: as trained) sets the exported model's test-time mirror averaging, ``sharpen`` (``None``:
    as trained) the unsharp-mask amount applied to its change (``ModelConfig.sharpen``), ``chroma``
    (``None``: as trained) the scale of the change's colour part (``ModelConfig.chroma``)."""
    from training.experiment import build_data, build_recogniser

    weights, output = Path(weights), Path(output)
    info_path = weights / "best.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if (weights / "config.json").is_file():
        net = HidingNetwork.from_pretrained(weights)
        trained = net.config
    else:  # a training checkpoint (RUN/checkpoints/step_N): the architecture is the experiment's
        net = HidingNetwork(cfg.model)
        net.load_state_dict(load_safetensors(weights / "model.safetensors"), strict=True)
        info = {"checkpoint": weights.name, **info}
        run_config = weights.parent.parent / "config.json"
        trained = ModelConfig.from_dict(json.loads(run_config.read_text())["model"]) if run_config.is_file() else cfg.model
    recogniser = recogniser if recogniser is not None else build_recogniser(cfg).to(device)
    data = data if data is not None else build_data(cfg, progress=False)
    bank = identity_bank(recogniser, data, cfg, device=device)
    # the reshapings the weights were trained through come from their own run, not from --config (often
    # another experiment's, for its identity bank)
    config = dataclasses.replace(cfg.model, recogniser=cfg.exported_recogniser(), **trained.reshapings())
    if flip_average is not None:
        config = dataclasses.replace(config, flip_average=flip_average)
    if sharpen is not None:
        config = dataclasses.replace(config, sharpen=sharpen)
    if chroma is not None:
        config = dataclasses.replace(config, chroma=chroma)
    model = HidingNetwork(config, identity_bank=bank)
    state = {**net.network_state(), "identity_bank": bank}
    model.load_state_dict(state, strict=True)
    model.save_pretrained(output, half=half, card=model_card(cfg, info, int(bank.shape[0])))
    return output


@reports_errors
def main(argv: list[str] | None = None) -> int:
    from training.config import load_config

    p = argparse.ArgumentParser(description="Export trained weights as a featdeid model folder.")
    p.add_argument("--config", required=True, help="the experiment YAML the weights were trained with")
    p.add_argument("--weights", required=True, help="RUN/best (config.json + model.safetensors) or a checkpoint RUN/checkpoints/step_N")
    p.add_argument("--output", required=True, help="model folder to write")
    p.add_argument("--half", action="store_true", help="store float16 weights")
    p.add_argument("--flip-average", action="store_true",
                   help="the exported model averages its change for the face and its mirror image (ModelConfig.flip_average)")
    p.add_argument("--sharpen", type=float, default=None,
                   help="unsharp-mask amount for the exported model's change (ModelConfig.sharpen; default: as the weights were trained)")
    p.add_argument("--chroma", type=float, default=None,
                   help="scale of the change's colour part, 0 for a grey change (ModelConfig.chroma; default: as the weights were trained)")
    args = p.parse_args(argv)
    out = export_model(args.weights, load_config(args.config), args.output, half=args.half,
                       flip_average=True if args.flip_average else None, sharpen=args.sharpen, chroma=args.chroma)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

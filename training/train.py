"""Train the hiding network with Accelerate (paper, sections 3.2 and 4.2).

    accelerate launch training/train.py --config training/configs/small_cpu.yaml [--resume DIR]
        [--max-steps N] [--output DIR] [--set optim.batch_size=8 ...]

Adam, ReduceLROnPlateau on the validation loss, best-validation model kept, mixed precision,
``save_state`` checkpoints every N steps and at epoch ends, exact resume (``load_state`` plus
``skip_first_batches``; all data randomness is a function of (seed, epoch, index)), metrics gathered
across processes, a CSV log (and TensorBoard when installed). At the end the best model is exported
as a featdeid model folder (``<output>/model``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.data import DataLoader

from featdeid.errors import ConfigError
from featdeid.faces.paste import apply_mask
from featdeid.model import IDENTITY_BANK_KEY, HidingNetwork
from featdeid.weights import state_sha256
from training.augment import en_view
from training.cli import reports_errors
from training.ghost import GhostSkips
from training.config import TrainConfig, config_to_dict, load_config
from training.data import EpochShuffleSampler
from training.experiment import build_data, build_loss, build_recogniser
from training.export import export_model
from training.losses import LOSS_NAMES

CSV_FIELDS = ("time", "split", "epoch", "step", "lr", "total", *LOSS_NAMES, "images_per_s")


@dataclasses.dataclass
class Progress:
    """Where training stands; saved with every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_val: float = math.inf
    best_epoch: int = -1

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class MetricLog:
    """CSV rows on the main process (appended across resumes) and TensorBoard scalars if available."""

    def __init__(self, path: Path, enabled: bool, tensorboard_dir: Path | None) -> None:
        self.path, self.enabled = path, enabled
        self.writer = None
        if enabled and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                self.writer = None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        new = not self.path.is_file()
        with self.path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new:
                w.writeheader()
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in CSV_FIELDS})
        if self.writer is not None:
            for k in ("total", *LOSS_NAMES, "lr", "images_per_s"):
                if isinstance(row.get(k), float):
                    self.writer.add_scalar(f"{row['split']}/{k}", row[k], row["step"])
            self.writer.flush()



def _masked(cfg: TrainConfig, cover: torch.Tensor, deid: torch.Tensor) -> torch.Tensor:
    """D as the user will get it: with ``transfer.paste_mask`` only the feathered face region changes."""
    return apply_mask(cover, deid) if cfg.transfer.paste_mask else deid

def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def state_hash(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (float32 bytes, sorted keys)."""
    return state_sha256({k: v.detach().float() for k, v in model.state_dict().items()})


def init_weights(model: HidingNetwork, folder: str | Path) -> None:
    """Copy the weights of the model folder ``folder`` into ``model``; the architectures must match."""
    source = HidingNetwork.from_pretrained(folder)
    if not model.config.fits_weights_of(source.config):  # a run may train through a reshaping its source lacks
        raise ConfigError(f"run.init_from {folder}: its model config {source.config} differs from this run's {model.config}")
    state = source.network_state()
    state[IDENTITY_BANK_KEY] = model.state_dict()[IDENTITY_BANK_KEY]  # weights only: an exported folder's bank is not trained
    model.load_state_dict(state)


def resolve_resume(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint)."""
    path = Path(path)
    ckpts = sorted((path / "checkpoints").glob("step_*")) if (path / "checkpoints").is_dir() else []
    if ckpts:
        return ckpts[-1]
    if path.is_dir() and any(path.glob("model*.safetensors")):
        return path
    raise ConfigError(f"no checkpoint to resume from in {path}")


def _cover_embed(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["cover"], batch["embed"]


def train(
    cfg: TrainConfig,
    output: str | Path | None = None,
    resume: str | Path | None = None,
    max_steps: int | None = None,
    cpu: bool = False,
) -> dict[str, Any]:
    """Run (or resume) an experiment; returns a summary (paths, best validation loss, state hash)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    out_dir = Path(output or cfg.run.output)
    use_cpu = cpu or not torch.cuda.is_available()
    acc = Accelerator(mixed_precision=cfg.run.mixed_precision, cpu=use_cpu)
    set_seed(cfg.run.seed)
    main = acc.is_main_process
    en = build_recogniser(cfg).to(acc.device)  # first: a missing recogniser fails before any file or data work
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
    with acc.main_process_first():
        data = build_data(cfg, progress=main)
    if main:
        (out_dir / "data_report.json").write_text(json.dumps(data.reports(), indent=2) + "\n")
        for r in data.reports():
            skipped = sum(len(v) for v in r["skipped"].values())
            acc.print(f"data {r['source']}: {r['used']} of {r['total']} used, {skipped} skipped")

    loss_fn = build_loss(cfg, en).to(acc.device)
    t = cfg.transfer
    ghost = GhostSkips(getattr(en, "net", en), t.ghost_skip, t.skip_grad, t.linbp_from, t.linbp_mix) if t.ghost else None
    model = HidingNetwork(cfg.model)
    if cfg.run.init_from and resume is None:
        init_weights(model, cfg.run.init_from)
        acc.print(f"initialised from {cfg.run.init_from}")
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.optim.plateau_factor, patience=cfg.optim.plateau_epochs - 1
    )
    sampler = EpochShuffleSampler(len(data.train), cfg.run.seed)
    bs, workers = cfg.optim.batch_size, cfg.data.num_workers
    train_dl = DataLoader(data.train, batch_size=bs, sampler=sampler, drop_last=True, num_workers=workers)
    val_dl = DataLoader(data.val, batch_size=bs, shuffle=False, num_workers=workers) if data.val is not None else None
    model, optimizer, train_dl = acc.prepare(model, optimizer, train_dl)
    if val_dl is not None:
        val_dl = acc.prepare(val_dl)
    steps_per_epoch = len(train_dl)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"no full batch per epoch: {len(data.train)} training covers for batch_size {bs} x {acc.num_processes} processes"
        )
    progress = Progress()
    acc.register_for_checkpointing(scheduler, progress)
    if resume is not None:
        ckpt = resolve_resume(resume)
        acc.load_state(str(ckpt))
        acc.print(f"resumed from {ckpt}: epoch {progress.epoch}, step {progress.global_step}")

    log = MetricLog(out_dir / "log.csv", main, out_dir / "tensorboard")
    ckpt_dir = out_dir / "checkpoints"
    last_saved = -1

    def save_checkpoint() -> None:
        nonlocal last_saved
        if last_saved == progress.global_step:
            return
        acc.save_state(str(ckpt_dir / f"step_{progress.global_step:09d}"))
        last_saved = progress.global_step
        if main:
            for old in sorted(ckpt_dir.glob("step_*"))[: -cfg.run.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def validate() -> dict[str, float]:
        net = acc.unwrap_model(model)
        net.eval()
        sums: dict[str, float] = {}
        count = 0
        with torch.no_grad():
            for batch in val_dl:
                cover, embed = _cover_embed(batch)
                fe = en.embed(embed)
                with acc.autocast():
                    deid = _masked(cfg, cover, net(cover, fe))
                    losses = loss_fn(cover, deid, fe, terms=LOSS_NAMES)
                gathered = acc.gather_for_metrics({k: v.float() for k, v in losses.items()})
                for k, v in gathered.items():
                    sums[k] = sums.get(k, 0.0) + float(v.sum())
                count += int(gathered["total"].numel())
        model.train()
        return {k: v / max(count, 1) for k, v in sums.items()}

    def save_best(metric: float) -> None:
        progress.best_val, progress.best_epoch = metric, progress.epoch
        if main:
            acc.unwrap_model(model).save_pretrained(out_dir / "best")
            info = {"epoch": progress.epoch, "step": progress.global_step, "val_total": metric}
            (out_dir / "best" / "best.json").write_text(json.dumps(info) + "\n")
        acc.wait_for_everyone()

    model.train()
    meter = torch.zeros(len(LOSS_NAMES) + 2, device=acc.device)
    t_log = time.perf_counter()
    images_since = 0
    stopped = False
    for epoch in range(progress.epoch, cfg.optim.epochs):
        train_dl.set_epoch(epoch)
        data.train.set_epoch(epoch)
        skip = progress.step_in_epoch
        loader = acc.skip_first_batches(train_dl, skip) if skip else train_dl
        bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", disable=not main)
        epoch_sum = torch.zeros(2, device=acc.device)
        for batch in loader:
            cover, embed = _cover_embed(batch)
            with torch.no_grad():
                fe = en.embed(embed)
            gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + progress.global_step * 131 + acc.process_index)
            view = (lambda x: en_view(x, cfg.transfer, gen)) if cfg.transfer.enabled else None
            ghosted = ghost.draw(cover.shape[0], gen) if ghost is not None else contextlib.nullcontext()
            with acc.autocast(), ghosted:
                deid = _masked(cfg, cover, model(cover, fe))
                losses = loss_fn(cover, deid, fe, en_view=view)
                total = losses["total"].mean()
            acc.backward(total)
            if cfg.optim.grad_clip:
                acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step_in_epoch += 1
            progress.global_step += 1
            images_since += cover.shape[0] * acc.num_processes
            with torch.no_grad():
                row = [total.detach().float()] + [
                    losses[n].detach().float().mean() if n in losses else torch.zeros((), device=acc.device) for n in LOSS_NAMES
                ]
                meter += torch.stack([*row, torch.ones((), device=acc.device)])
                epoch_sum += torch.stack([row[0], torch.ones((), device=acc.device)])
            bar.update(1)
            if progress.global_step % cfg.run.log_every == 0:
                totals = acc.reduce(meter, reduction="sum")
                n = float(totals[-1])
                elapsed = time.perf_counter() - t_log
                rec = {"total": float(totals[0]) / n, **{k: float(totals[i + 1]) / n for i, k in enumerate(LOSS_NAMES)}}
                log.write(
                    {"time": _now(), "split": "train", "epoch": epoch, "step": progress.global_step,
                     "lr": optimizer.param_groups[0]["lr"], **rec, "images_per_s": images_since / max(elapsed, 1e-9)}
                )
                bar.set_postfix(loss=f"{rec['total']:.4f}")
                meter.zero_()
                t_log, images_since = time.perf_counter(), 0
            at_epoch_end = progress.step_in_epoch >= steps_per_epoch
            if progress.global_step % cfg.run.checkpoint_every == 0 and not at_epoch_end:
                save_checkpoint()
            if max_steps is not None and progress.global_step >= max_steps:
                stopped = True
                break
        bar.close()
        if stopped:
            save_checkpoint()
            break
        totals = acc.reduce(epoch_sum, reduction="sum")
        train_mean = float(totals[0]) / max(float(totals[1]), 1.0)
        epoch_means = validate() if val_dl is not None else {"total": train_mean}
        metric = epoch_means["total"]
        scheduler.step(metric)
        if metric < progress.best_val:
            save_best(metric)
        log.write(
            {"time": _now(), "split": "val" if val_dl is not None else "train_epoch", "epoch": epoch,
             "step": progress.global_step, "lr": optimizer.param_groups[0]["lr"], **epoch_means}
        )
        progress.epoch += 1
        progress.step_in_epoch = 0
        save_checkpoint()

    if not (out_dir / "best" / "model.safetensors").is_file() or progress.best_epoch < 0:
        if val_dl is not None:
            metric = validate()["total"]
        else:
            metric = math.inf
        if main:
            acc.unwrap_model(model).save_pretrained(out_dir / "best")
            info = {"epoch": progress.epoch, "step": progress.global_step, "val_total": metric, "final": True}
            (out_dir / "best" / "best.json").write_text(json.dumps(info) + "\n")
        acc.wait_for_everyone()

    digest = state_hash(acc.unwrap_model(model))
    (out_dir / f"state_sha256_rank{acc.process_index}.txt").write_text(digest + "\n")
    exported = None
    if main:
        exported = export_model(out_dir / "best", cfg, out_dir / "model", recogniser=en, data=data, device=acc.device)
        acc.print(f"exported {exported}")
    acc.wait_for_everyone()
    acc.end_training()
    return {
        "output": str(out_dir),
        "model": str(exported) if exported else None,
        "global_step": progress.global_step,
        "epoch": progress.epoch,
        "best_val": progress.best_val if math.isfinite(progress.best_val) else None,
        "state_sha256": digest,
    }


def _parse_set(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set needs KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


@reports_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (training/configs/*.yaml)")
    p.add_argument("--resume", help="checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimiser steps in total")
    p.add_argument("--output", help="run folder (default: run.output of the config)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. optim.batch_size=8")
    args = p.parse_args(argv)
    cfg = load_config(args.config, _parse_set(args.set))
    summary = train(cfg, args.output, args.resume, args.max_steps, args.cpu)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

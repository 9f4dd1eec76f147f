"""A slightly robust copy of the EN, by adversarial self-distillation, as the training surrogate.

Gradients of slightly robust models transfer better to unseen models (Springer, Mitchell & Kenyon,
"A little robustness goes a long way", NeurIPS 2021). No second face recogniser may be used in
training, so the robust surrogate is distilled from the EN itself: the student EN' starts as the
EN and learns ``EN'(x) ~ EN(x)`` and ``EN'(x + delta) ~ EN(x)``, where ``delta`` is a one-step L2
attack (random start) on the student within ``eps``. ``x`` are the config's *training* covers and
training fake faces, seen through the config's transfer view; the validation covers only measure.

The student is written as ONNX with the EN's own node names, so a training config only swaps the
``recogniser`` path (``mid_layers`` and the ghost EN work unchanged)::

    python training/robust_en.py --config training/configs/default_cpu_ghost_tau02.yaml \\
        --output runs/robust_en/fr_feature_eps2.onnx --eps 2 --steps 600

It also writes ``<output>.json``: the settings and the clean / attacked cosine to the EN on the
validation covers before and after. ``--init EARLIER.onnx`` continues an earlier student (e.g. at a
larger ``--eps``) instead of starting from the EN; the teacher is always the config's EN.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featdeid.errors import ConfigError  # noqa: E402
from featdeid.images import atomic_write  # noqa: E402
from training.augment import en_view  # noqa: E402
from training.cli import reports_errors  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data import to_tensor  # noqa: E402
from training.experiment import build_data, build_recogniser  # noqa: E402


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def l2_attack(
    recogniser: torch.nn.Module,
    frames: torch.Tensor,
    target: torch.Tensor,
    eps: float,
    steps: int = 1,
    gen: torch.Generator | None = None,
) -> torch.Tensor:
    """L2 attack lowering ``cos(recogniser(frames + delta), target)``, from a random start of norm eps/2.

    Args:
        frames: ``(B, 3, S, S)`` in [0, 1].
        target: ``(B, D)`` unit embeddings.
        eps: L2 bound of ``delta`` per image (pixels in [0, 1]); each step moves eps along the gradient.
    Returns:
        ``delta`` ``(B, 3, S, S)``, detached.
    """
    delta = _unit(torch.randn(frames.shape, generator=gen).to(frames)) * (eps / 2)
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.autocast(frames.device.type, dtype=torch.bfloat16):
            cos = (recogniser.embed((frames + delta).clamp(0, 1)).float() * target).sum()
        (grad,) = torch.autograd.grad(cos, delta)
        delta = delta.detach() - eps * _unit(grad)
        delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0).view(-1, 1, 1, 1)
    return delta.detach()


@torch.no_grad()
def _cos(a: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    return float((a.embed(x.clamp(0, 1)) * target).sum(1).mean())


def measure(student: torch.nn.Module, teacher: torch.nn.Module, frames: torch.Tensor, eps: float, seed: int = 0) -> dict[str, float]:
    """Mean cos to the EN on clean frames and under a 5-step attack on the student at eps and 4 eps."""
    target = teacher.embed(frames).detach()
    out = {"clean": _cos(student, frames, target)}
    for name, e in (("attacked", eps), ("attacked_4eps", 4 * eps)):
        delta = l2_attack(student, frames, target, e, steps=5, gen=torch.Generator().manual_seed(seed))
        out[name] = _cos(student, frames + delta, target)
    return {k: round(v, 4) for k, v in out.items()}


def distill(
    cfg: Any,
    eps: float,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    init: str | Path | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Fine-tune a copy of the config's EN to be slightly robust (on the GPU if there is one); returns it (on the CPU) and a report.

    ``init``: an ONNX with the EN's graph (an earlier robust EN) to start the student from; the
    teacher stays the config's EN.
    """
    from tqdm.auto import tqdm

    if eps <= 0 or steps < 1 or batch_size < 1:
        raise ConfigError("robust EN: need eps > 0, steps >= 1 and batch_size >= 1")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = build_recogniser(cfg).to(dev)  # before the data: a missing recogniser fails fast
    if init is None:
        student = copy.deepcopy(teacher).eval()
    else:
        student = build_recogniser(dataclasses.replace(cfg, recogniser=f"onnx:{init}")).to(dev)
    data = build_data(cfg, progress=progress)
    params = [p for p in student.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    pool = [(data.covers, int(i)) for i in data.cover_train]
    if data.embeds is not None and data.embed_train is not None:
        pool += [(data.embeds, int(i)) for i in data.embed_train]
    val = torch.stack([to_tensor(data.covers.get(int(i))) for i in data.cover_val[:128]]).to(dev)
    report: dict[str, Any] = {
        "recogniser": cfg.exported_recogniser(), "eps": eps, "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
        "init": str(init) if init else None,
        "train_images": len(pool), "val_covers": len(val), "before": measure(student, teacher, val, eps, seed),
    }
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="robust EN", disable=not progress):
        pick = torch.randint(len(pool), (batch_size,), generator=gen).tolist()
        x = torch.stack([to_tensor(pool[k][0].get(pool[k][1])) for k in pick])
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = (en_view(x, cfg.transfer, gen) if cfg.transfer.enabled else x).to(dev)
        with torch.no_grad():
            target = teacher.embed(x)
        delta = l2_attack(student, x, target, eps, gen=gen)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            both = student.embed(torch.cat([x, (x + delta).clamp(0, 1)])).float()
        loss = (1 - (both * torch.cat([target, target])).sum(1)).mean() * 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    report["after"] = measure(student, teacher, val, eps, seed)
    return student.cpu(), report


def export_onnx(recogniser: torch.nn.Module, source: str | Path, output: str | Path) -> Path:
    """Write the recogniser's network as ONNX with the source ONNX's node names (atomic)."""
    import onnx

    src = onnx.load(str(source))
    h, w = recogniser.input_hw
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            recogniser.net.eval(), torch.zeros(1, 3, h, w), f"{tmp}/net.onnx", input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=13, dynamo=False,
        )
        out = onnx.load(f"{tmp}/net.onnx")
    ops = [n.op_type for n in out.graph.node]
    if ops != [n.op_type for n in src.graph.node]:
        raise ConfigError(f"re-exported graph of {source} differs from the source ({len(ops)} vs {len(src.graph.node)} nodes)")
    for new, old in zip(out.graph.node, src.graph.node):
        new.name = old.name
    atomic_write(out.SerializeToString(), output)
    return Path(output)


@reports_errors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="training config: its recogniser, data split and transfer view")
    p.add_argument("--output", required=True, help="the robust EN, .onnx (a .json report is written beside it)")
    p.add_argument("--eps", type=float, default=2.0, help="L2 attack bound per frame, pixels in [0, 1] (default 2)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--init", default=None, help="start the student from this ONNX (an earlier robust EN with the EN's graph) instead of the EN")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    if not cfg.recogniser.startswith("onnx:") and not cfg.recogniser.lower().endswith(".onnx"):
        raise ConfigError(f"robust EN: the config's recogniser must be ONNX, got {cfg.recogniser!r}")
    if args.init and not Path(args.init).is_file():
        raise ConfigError(f"robust EN: --init {args.init} does not exist")
    student, report = distill(cfg, args.eps, args.steps, args.lr, args.batch_size, args.seed, init=args.init)
    out = export_onnx(student, student.source_path, args.output)
    atomic_write((json.dumps(report, indent=2) + "\n").encode(), out.with_suffix(".json"))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Put a measured export in place as the default model: the Hub folder and the packaged copy.

    python hub/assemble.py MODEL --checkpoint CKPT.json --sweep SWEEP \
        --lfw LFW/results.json [LFW_SWEEP/results.json hub/featdeid-default/eval_lfw.json ...] \
        [--celeba CELEBA/results.json [hub/featdeid-default/eval_celeba.json ...]] \
        [--strength-head HEAD] [--hub hub/featdeid-default] [--package featdeid/default_model]

``MODEL`` is a folder written by ``training/export.py`` whose ``default_strength`` was set by
``training/select_strength.py --write`` (its output folder is ``SWEEP``). The ``featdeid eval`` reports
are merged as :func:`model_card.merge` does (the first report holding a method name wins), so an
earlier card's reports can be given last to carry the baselines over without measuring them again;
``featdeid@S`` results of any other model (another ``model_fingerprint``: other weights, bank or
residual settings) are dropped, so the card only reports the model it ships.
Writes into the Hub folder: ``config.json``, ``model.safetensors``, ``checkpoint.json``, ``sweep.json``,
``sweep.png``, ``strength_head.json`` and ``.png`` (``--strength-head``), ``eval_lfw.json``, ``eval_celeba.json``, the black-box CMC curves and the quality-vs-ASR
plot of the merged LFW report (``lfw_*.png``) and the card (``README.md``, by ``hub/model_card.py``);
the package folder gets the model files and the card. All inputs are read before anything is written,
and every file is written atomically (a temporary file and a rename).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from model_card import main as write_card, merge  # hub/ is the script's folder, first on sys.path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from featdeid.evaluation.baselines import model_fingerprint  # noqa: E402
from featdeid.evaluation.report import plots, safe_stem  # noqa: E402
from featdeid.images import atomic_write  # noqa: E402
from featdeid.model import HidingNetwork  # noqa: E402

MODEL_FILES = ("config.json", "model.safetensors")
HEAD_FILES = ("strength_head.json", "strength_head.png")


def _read(paths: list[Path], fingerprint: str) -> dict:
    """The merged reports without ``featdeid`` results of a model other than ``fingerprint``'s."""
    reports = [json.loads(p.read_text()) for p in paths]
    for r in reports:
        other = [m["name"] for m in r["methods"] if m["family"] == "featdeid" and m.get("model_fingerprint") != fingerprint]
        if other:
            print(f"dropped (another model): {', '.join(other)} from {r['config'].get('out', 'a report')}", file=sys.stderr)
        r["methods"] = [m for m in r["methods"] if m["name"] not in other]
    return merge(reports)


def lfw_plots(results: dict, folder: Path) -> list[Path]:
    """The black-box CMC curves and quality-vs-ASR plot of ``results``, as ``folder/lfw_*.png``."""
    box = {f"cmc_{safe_stem(e['name'])}.png" for e in results["evaluators"] if e["role"] == "black-box"}
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in plots(results, Path(tmp), None):
            if p.name in box or p.name == "quality_vs_asr.png":
                dest = folder / f"lfw_{p.name}"
                atomic_write(p.read_bytes(), dest)
                written.append(dest)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Install a measured export as the default model (Hub folder + package copy).")
    p.add_argument("model", type=Path)
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.json: the selected checkpoint, how it was made")
    p.add_argument("--sweep", required=True, type=Path, help="output folder of training/select_strength.py")
    p.add_argument("--lfw", required=True, type=Path, nargs="+", help="featdeid eval --set lfw reports, merged in order")
    p.add_argument("--celeba", type=Path, nargs="*", default=[], help="featdeid eval --set celeba reports, merged in order")
    p.add_argument("--strength-head", type=Path, default=None,
                   help="output folder of training/fit_strength_head.py (for a model with adaptive_strength)")
    p.add_argument("--hub", type=Path, default=REPO_ROOT / "hub" / "featdeid-default")
    p.add_argument("--package", type=Path, default=REPO_ROOT / "featdeid" / "default_model")
    args = p.parse_args(argv)

    files = {n: (args.model / n).read_bytes() for n in MODEL_FILES}
    fingerprint = model_fingerprint(HidingNetwork.from_pretrained(args.model))
    model_config = json.loads(files["config.json"])
    strength = model_config["default_strength"]
    checkpoint = json.loads(args.checkpoint.read_text())
    sweep, sweep_png = (args.sweep / "sweep.json").read_bytes(), (args.sweep / "sweep.png").read_bytes()
    adaptive = model_config.get("adaptive_strength", 0.0)
    if bool(adaptive) != bool(args.strength_head):
        raise SystemExit("error: a model with adaptive_strength needs --strength-head (the fit_strength_head.py report), "
                         f"and only such a model takes one (this one: adaptive_strength {adaptive:g})")
    head = {n: (args.strength_head / n).read_bytes() for n in HEAD_FILES} if args.strength_head else {}
    lfw = _read(args.lfw, fingerprint)
    celeba = _read(args.celeba, fingerprint) if args.celeba else None
    if not any(m["name"] == f"featdeid@{strength:g}" for m in lfw["methods"]):
        raise SystemExit(f"error: no LFW report measures the default strength (featdeid@{strength:g})")

    hub = args.hub
    hub.mkdir(parents=True, exist_ok=True)
    for old in [*hub.glob("lfw_*.png"), *(hub / n for n in HEAD_FILES if not head)]:
        old.unlink(missing_ok=True)
    for name, data in head.items():
        atomic_write(data, hub / name)
    for name, data in files.items():
        atomic_write(data, hub / name)
    atomic_write((json.dumps(checkpoint) + "\n").encode(), hub / "checkpoint.json")
    atomic_write(sweep, hub / "sweep.json")
    atomic_write(sweep_png, hub / "sweep.png")
    atomic_write((json.dumps(lfw, indent=1) + "\n").encode(), hub / "eval_lfw.json")
    card_args = [str(hub), "--sweep", str(hub / "sweep.json"), "--eval", str(hub / "eval_lfw.json")]
    if celeba is not None:
        atomic_write((json.dumps(celeba, indent=1) + "\n").encode(), hub / "eval_celeba.json")
        card_args += ["--eval-celeba", str(hub / "eval_celeba.json")]
    lfw_plots(lfw, hub)
    write_card(card_args)

    for name in (*MODEL_FILES, "README.md"):
        atomic_write((hub / name).read_bytes(), args.package / name)
    print(f"default model: {hub} and {args.package} (strength {strength:g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

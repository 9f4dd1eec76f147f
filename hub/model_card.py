"""Write the model card (``README.md`` with Hub metadata) of a featdeid model folder from measurements.

    python hub/model_card.py MODEL_FOLDER [--config training/configs/X.yaml] --sweep SWEEP/sweep.json \
        --eval EVAL/results.json [BASELINES/results.json ...] [--eval-celeba CELEBA/results.json] [--output OUT.md]

``--config`` defaults to the training config that ``MODEL_FOLDER/checkpoint.json`` names (``config``).

Every number in the card is read from the files given: ``sweep.json`` of ``training/select_strength.py``
(validation covers), ``results.json`` of ``featdeid eval`` (test sets) and the exported checkpoint's
``best.json`` (``FOLDER/checkpoint.json``, else the training run's ``best/best.json``; a hand-picked
checkpoint adds ``selected``, and ``resume`` when its run continued another run's state). Nothing is typed in
by hand. The Hub folder keeps these files (``sweep.json``, ``eval_lfw.json``, ``eval_celeba.json``,
``checkpoint.json``) beside the card, so the card can be rebuilt from them and checked.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

REPO_PLACEHOLDER = "OWNER/featdeid-default"  # hub/publish.py puts the real repo id here in the uploaded copy
ATTACKS = ("median5", "gauss5", "jpeg10", "bits3", "webp50", "resize0.5")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _front_matter(cfg: Any) -> str:
    return f"""---
library_name: featdeid
license: cc-by-nc-4.0
tags:
- face-de-identification
- privacy
- anonymization
- image-to-image
pipeline_tag: image-to-image
datasets:
- utkface
- generated-photos
metrics:
- psnr
- ssim
- lpips
model_name: featdeid {cfg.name}
---
"""


def results_table(results: dict[str, Any]) -> str:
    """Quality and per-evaluator ASR / Rank-1 / Rank-5 of every method in a ``featdeid eval`` report."""
    evs = results["evaluators"]
    head = "| method | genuine pairs | PSNR | SSIM | LPIPS(alex) | " + " | ".join(
        f"{e['name']} ({e['role']}) ASR % / Rank-1 % / Rank-5 %" for e in evs) + " |"
    rows = [head, "|---|---:|---:|---:|---:|" + "---:|" * len(evs)]
    orig = f"| originals | {results['set']['genuine_pairs']} | ∞ | 1.000 | 0.000 | " + " | ".join(
        f"{_pct(e['asr_original'])} / {_pct(e.get('rank1_original'))} / {_pct(e.get('rank5_original'))}" for e in evs) + " |"
    rows.append(orig)
    for m in results["methods"]:
        q = m["quality"]
        cells = []
        for e in evs:
            r = m["evaluators"].get(e["name"], {})
            cells.append(f"{_pct(r.get('asr'))} / {_pct(r.get('rank1'))} / {_pct(r.get('rank5'))}")
        pairs = next((r.get("pairs") for r in m["evaluators"].values() if r.get("pairs")), "–")
        rows.append(f"| {m['label']} (`{m['name']}`) | {pairs} | {q['psnr']:.2f} | {q['ssim']:.3f} | {q['lpips']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _largest_fall(rob: dict[str, float]) -> float:
    """Largest ASR fall in points from no attack to any attack of the suite (negative: ASR rose under all)."""
    return max(100 * (rob["none"] - rob[a]) for a in ATTACKS if a in rob)


def robustness_table(results: dict[str, Any], method: str) -> str:
    """ASR % of one method under each attack, per evaluator."""
    m = next((x for x in results["methods"] if x["name"] == method), None)
    if m is None:
        return ""
    rows = ["| evaluator | none | " + " | ".join(ATTACKS) + " | largest ASR fall (points) |", "|---|" + "---:|" * (len(ATTACKS) + 2)]
    for e in results["evaluators"]:
        rob = m["evaluators"].get(e["name"], {}).get("robustness")
        if not rob:
            continue
        rows.append(f"| {e['name']} ({e['role']}) | {_pct(rob['none'])} | " + " | ".join(_pct(rob.get(a)) for a in ATTACKS)
                    + f" | {_largest_fall(rob):+.1f} |")
    return "\n".join(rows)


def robustness_falls(results: dict[str, Any]) -> str:
    """Per method with robustness figures: ASR without attack and its largest fall over the suite, per evaluator."""
    evs = results["evaluators"]
    rows = ["| method | genuine pairs | " + " | ".join(f"{e['name']} ({e['role']}) ASR % / largest fall (points)" for e in evs) + " |",
            "|---|---:|" + "---:|" * len(evs)]
    for m in results["methods"]:
        cells, pairs = [], None
        for e in evs:
            r = m["evaluators"].get(e["name"], {})
            rob = r.get("robustness")
            if not rob:
                cells.append("–")
                continue
            pairs = r.get("robustness_pairs", pairs)
            cells.append(f"{_pct(rob['none'])} / {_largest_fall(rob):+.1f}")
        if any(c != "–" for c in cells):
            rows.append(f"| {m['label']} (`{m['name']}`) | {pairs or '–'} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report with the methods of all (first occurrence of a name wins); evaluators of the first.

    Robustness figures of reports written before ``robustness_pairs`` was recorded per evaluator get it
    from their own report's ``--robustness-pairs`` (none: all the method's genuine pairs).
    """
    out = dict(reports[0])
    seen: set[str] = set()
    out["methods"] = []
    for r in reports:
        n_rob = r.get("config", {}).get("robustness_pairs")
        for m in r["methods"]:
            if m["name"] in seen:
                continue
            seen.add(m["name"])
            evs = {}
            for name, e in m["evaluators"].items():
                if e.get("robustness") and "robustness_pairs" not in e:
                    e = {**e, "robustness_pairs": min(n_rob, e["pairs"]) if n_rob else e["pairs"]}
                evs[name] = e
            out["methods"].append({**m, "evaluators": evs})
    return out


def summary(results: dict[str, Any], name: str) -> str:
    """One sentence: black-box ASR of the default method against the project's 90 % target."""
    m = next((x for x in results["methods"] if x["name"] == name), None)
    if m is None:
        return ""
    box = [e["name"] for e in results["evaluators"] if e["role"] == "black-box" and e["name"] in m["evaluators"]]
    asr = {n: m["evaluators"][n]["asr"] for n in box}
    verdict = "which it meets" if asr and min(asr.values()) >= 0.9 else "which this model does not reach yet"
    parts = [f"{n} {_pct(a)} %" for n, a in asr.items()]
    return f"At the default strength the black-box ASR is {', '.join(parts)}; featdeid's target is 90 % per black-box recogniser, {verdict}."


def _surrogate(report: dict[str, Any]) -> str:
    """The training EN's robust copy (``training/robust_en.py`` report) as one bullet."""
    return (
        f"- Training surrogate (ours, after Springer et al. 2021, \"A little robustness goes a long way\"): a slightly robust "
        f"copy of the EN made by adversarial self-distillation (`training/robust_en.py`: L2 eps {report['eps']:g}, "
        f"{report['steps']} steps of batch {report['batch_size']}); on 128 validation covers its cosine to the EN under an "
        f"eps attack went from {report['before']['attacked']:+.3f} to {report['after']['attacked']:+.3f} (clean "
        f"{report['after']['clean']:.3f}). The hiding network was trained against it; the identity bank and the white-box "
        "figures use the EN itself."
    )


def _head_section(head: dict[str, Any]) -> str:
    rows = "\n".join(f"| {r['gamma']:g} | {r['strength']:.3f} | {r['psnr']:.2f} | {100 * r['asr']:.1f} | {r['mean_cos']:+.3f} | "
                     f"{r['strength_p10']:.2f}–{r['strength_p90']:.2f} |" for r in head["rows"])
    return ("## Per-face strength (validation covers)\n\n"
            f"Head fitted to the cos(C, D) of `{head.get('fitted_to', 'the EN')}` on {head['training_covers']} training covers "
            f"(ridge λ {head['lambda']:g}; correlation on the {head['validation_covers']} validation covers "
            f"{head['validation_corr']:.2f}). Each γ replayed on the validation covers at the common strength that keeps mean "
            f"PSNR ≥ {head['min_psnr']:g} dB at the {head['confidence']:.0%} confidence bound; ASR of "
            f"`{head.get('replayed_with', 'the EN')}` at its threshold {head['threshold']:g}; chosen γ {head['chosen_gamma']:g}.\n\n"
            "| γ | strength | PSNR dB | EN ASR % | EN cos(C, D) | per-face strength p10–p90 |\n|---:|---:|---:|---:|---:|---:|\n"
            + rows + "\n\n![per-face strength: γ on the validation covers](strength_head.png)\n")


def _reproduce(commands: list[str]) -> str:
    return "Reproduce: " + ", then ".join(f"`{c}`" for c in commands)


def card(folder: Path, cfg: Any, sweep: dict[str, Any], results: dict[str, Any], celeba: dict[str, Any] | None,
         checkpoint: dict[str, Any] | None = None) -> str:
    """The card's text; ``checkpoint`` is the exported checkpoint's ``best.json`` (default: the training run's ``best/best.json``)."""
    from featdeid.config import ModelConfig

    model_cfg = {**ModelConfig().to_dict(), **json.loads((folder / "config.json").read_text())}  # keys it omits: defaults
    strength = model_cfg["default_strength"]
    export_flags = " ".join([*(["--flip-average"] if model_cfg["flip_average"] else []),
                             *([f"--sharpen {model_cfg['sharpen']:g}"] if model_cfg["sharpen"] else []),
                             *([f"--chroma {model_cfg['chroma']:g}"] if model_cfg["chroma"] != 1 else [])])
    best = checkpoint
    if best is None:
        best_json = REPO_ROOT / "training" / "checkpoints" / cfg.name / "best" / "best.json"
        best = json.loads(best_json.read_text()) if best_json.is_file() else {}
    step = best.get("step") if "selected" in best else None  # a hand-picked training checkpoint, not best/
    w = cfg.losses.weights
    sweep_rows = "\n".join(
        f"| {r['strength']:g} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['lpips']:.4f} | {r['whitebox_cos']:+.3f} |" for r in sweep["rows"])
    default_name = f"featdeid@{strength:g}"
    parts = [
        _front_matter(cfg),
        f"# featdeid default model ({cfg.name})\n",
        "A hiding network (Hanawa, Ito & Aoki, \"Face image de-identification based on feature embedding\", "
        "EURASIP JIVP 2024) that changes a face just enough that face-recognition systems stop matching it to the "
        "person, while the photo still looks the same to people. It is the model `featdeid.load()` returns "
        "with no argument (shipped inside the `featdeid` package; no network needed).\n",
        "```python\nimport featdeid\nout = featdeid.deidentify(\"photo.jpg\")          # the packaged copy of this model\n"
        f"model = featdeid.load(\"{REPO_PLACEHOLDER}\")  # this repo\n```\n",
        "## Model\n",
        f"- U-Net hiding network, {model_cfg['image_size']}×{model_cfg['image_size']} input, base width "
        f"{model_cfg['base_channels']}, channel multipliers {model_cfg['channel_mults']}; applied to larger faces by "
        "upsampling its residual. Weights stored as float16 (safetensors)."
        + (" Test-time mirror averaging (`flip_average`): the change applied is the mean of the network's change for the "
           "face and for its mirror image (mirrored back), which keeps the part other recognisers also read; it costs a "
           "second pass." if model_cfg["flip_average"] else "")
        + (f" The change is then sharpened (`sharpen` {model_cfg['sharpen']:g}: an unsharp mask, r + "
           f"{model_cfg['sharpen']:g} (r − G ∗ r) with a Gaussian G of {model_cfg['sharpen_sigma']:g} px at "
           f"{model_cfg['image_size']} px), which at equal PSNR moves more of it into the fine detail recognisers read."
           if model_cfg["sharpen"] else "")
        + ((" Its colour part is then removed (`chroma` 0): the change is grey, the same in R, G and B, which at "
            "equal PSNR leaves more black-box recognisers fooled; the colour part mostly served the training EN."
            if model_cfg["chroma"] == 0 else
            f" Its colour part (the difference from the per-pixel mean of R, G, B) is then scaled by {model_cfg['chroma']:g} (`chroma`).")
           if model_cfg["chroma"] != 1 else "")
        + (f" Per-face strength (`adaptive_strength` γ {model_cfg['adaptive_strength']:g}): a linear head on the U-Net's "
           "bottleneck (per-channel mean and standard deviation) reads how hard each face is to de-identify, z in [−3, 3], "
           f"and the face's change is scaled by exp({model_cfg['adaptive_strength']:g} z): more for faces a recogniser would "
           "still match, less for easy ones, at the same mean PSNR. The head is fitted on training covers, γ chosen on the "
           "validation covers (`training/fit_strength_head.py`, below)."
           if model_cfg["adaptive_strength"] else ""),
        "- Identity bank: EN features of the training split of the GAN faces (no real person); each face gets one, seeded.",
        f"- EN (extracting network, white-box): `{model_cfg['recogniser']}` (MobileFaceNet-style, 512-d, MIT-licensed "
        "vendor weights of unknown training data).",
        f"- Default strength **{strength:g}**, chosen on {sweep['covers']} validation covers (UTKFace validation split, never "
        f"trained on) as the largest strength whose mean PSNR ≥ {sweep['targets']['min_psnr']:g} dB, SSIM ≥ "
        f"{sweep['targets']['min_ssim']:g} and LPIPS ≤ {sweep['targets']['max_lpips']:g}"
        + (f" at the one-sided {sweep['confidence']:.0%} confidence bound of each mean (so they hold on new photos, not "
           "only on these covers)" if sweep.get("confidence", 0.5) > 0.5 else "") + ".\n",
        "## Training\n",
        f"- Covers: UTKFace (5,000-image subset; {cfg.data.val_fraction:g} held out for validation). Fake identities: "
        f"2,000 GAN faces (generated.photos style), {cfg.data.embed_val_fraction:g} held out.",
        f"- Losses (paper §3.2): rec {w['rec']:g} (L2), perceptual {w['perc']:g} (VGG-16 relu5_3; the paper's VGG-19 is not "
        f"available offline), LPIPS(VGG) {w['lpips']:g}, near {w['near']:g}, far {w['far']:g}"
        + (f"; ours: mid {w['mid']:g} (cosine of the EN's intermediate feature maps of C and D at "
           f"{', '.join(f'`{n}`' for n in cfg.losses.mid_layers)}, for transfer)" if w.get("mid") else "")
        + (f"; ours: PSNR budget {w['budget']:g} (hinge, free up to {cfg.losses.budget_psnr:g} dB)" if w.get("budget") else "")
        + ".",
        "- Transfer augmentations between D and the EN (to work on recognisers never seen in training): random resize/shift of "
        "the EN crop, differentiable blur and JPEG, and training on the masked paste-back C + m·(D − C)"
        + (f"; a ghost EN (ours, after Li et al. 2020 and Wu et al. 2020): each step scales the skip input of every residual "
           f"addition of the EN by a random λ ∈ [{1 - cfg.transfer.ghost_skip:g}, {1 + cfg.transfer.ghost_skip:g}] and the "
           f"gradient through the residual branches by {cfg.transfer.skip_grad:g}, a virtual ensemble of EN variants"
           if cfg.transfer.ghost_skip or cfg.transfer.skip_grad != 1 else "")
        + (f"; linear backpropagation (Guo et al. 2020) through the EN's activations from {cfg.transfer.linbp_from:.0%} of "
           "its depth on" if cfg.transfer.linbp_from < 1 else "")
        + ".",
        *([_surrogate(best["surrogate"])] if best.get("surrogate") else []),
        f"- Adam lr {cfg.optim.lr:g}, batch {cfg.optim.batch_size}, bf16 autocast, on {best.get('hardware', 'a 2-core CPU')}; "
        f"selected checkpoint {json.dumps({k: v for k, v in best.items() if k not in ('surrogate', 'reproduce', 'hardware')})}. "
        + (_reproduce(best["reproduce"]) if best.get("reproduce") else
           f"Reproduce: `python training/train.py --config training/configs/{cfg.name}.yaml"
           + (f" --resume {best['resume']}" if best.get("resume") else "")
           + (f" --max-steps {step}`" if step is not None else "`")
           + (f" (starting from `{cfg.run.init_from}`)" if cfg.run.init_from and not best.get("resume") else "")
           + (f", then export `checkpoints/step_{step:09d}`" if step is not None else "")
           + (f" with `{export_flags}`" if step is not None and export_flags else ""))
        + "; see `training/README.md`.\n",
        "## Strength sweep (validation covers)\n",
        "| strength | PSNR dB | SSIM | LPIPS(alex) | EN cos(C, D) |\n|---:|---:|---:|---:|---:|\n" + sweep_rows + "\n",
        "![strength sweep on the validation covers](sweep.png)\n",
        *([_head_section(json.loads((folder / "strength_head.json").read_text()))]
          if model_cfg["adaptive_strength"] and (folder / "strength_head.json").is_file() else []),
        "## Results: LFW, full protocol (`featdeid eval --set lfw`)\n",
        "6,000 pairs (10 folds); thresholds set for best accuracy on the original pairs; ASR = share of the "
        "genuine pairs (D₁, I₂) judged different (all 3,000, or 1,000 spread over the folds where the table says so). 1:N: 200 persons × 3 images, all six combinations. dlib and "
        "MobileFaceNet (xiaoccer) are black-box evaluators never used in training; the EN row is white-box. "
        "Quality: between C and D on the 256×256 aligned face frame.\n",
        results_table(results) + "\n",
        summary(results, default_name) + "\n",
        f"Robustness of `{default_name}` (ASR % after processing D; paper Table 8 plus WebP and 0.5× rescale):\n",
        robustness_table(results, default_name) + "\n",
        "A negative largest fall means ASR rose under every attack.\n",
        "All methods measured under the same attacks (ASR % without attack, then the largest fall in points over "
        f"{', '.join(ATTACKS)}):\n",
        robustness_falls(results) + "\n",
        *([f"The adversarial baselines (`adv@…`, MI-FGSM) are optimised against `{adv[0].get('target')}`, the white-box EN: "
           "its column is white-box for them too; dlib and MobileFaceNet show how far they transfer.\n"]
          if (adv := [m for m in results["methods"] if m.get("family") == "adv"]) else []),
        *(f"![{p.stem.replace('_', ' ')}]({p.name})\n" for p in sorted(folder.glob("lfw_*.png"))),
    ]
    if celeba is not None:
        st = celeba["set"]
        gone = ", ".join(f"{m['name']} {m.get('not_redetected', 0)}" for m in celeba["methods"])
        parts += [
            "## Results: CelebA in-the-wild photos (`featdeid eval --set celeba`)\n",
            f"{st['images']} unaligned photos of {st['identities']} people, each de-identified whole (detect, align, "
            "de-identify, paste back), then re-detected, aligned and embedded; a face no longer detected counts as protected "
            f"(per method: {gone}). dlib found the subject in {st['detected']} originals; all ordered genuine pairs "
            f"(Dᵢ, Iⱼ) of those, thresholds from the originals' pairs; 1:N over the {st['onen_sets']} photos of each person "
            "as sets. Quality: on the 256×256 frame at the original's landmarks.\n",
            results_table(celeba) + "\n",
        ]
    parts += [
        "## Intended use and limits\n",
        "- For reducing automatic face matching of people in photos you publish or share, as one layer of protection. "
        "It is not a guarantee: read the ASR figures above — a recogniser that is not defeated still matches "
        "the share of faces given by 100 − ASR, and recognisers unlike the evaluators here may do better.",
        "- Faces the detector misses are not changed; check the report (`--report`) for faces found and skipped.",
        "- Not for evading lawful identification, and not a tool for making images of real people say or show something else.",
        "- Trained on 5,000 UTKFace faces: accuracy may differ across ages, skin tones and poses in ways not measured here.\n",
        "## Licence and terms\n",
        "- Weights: CC BY-NC 4.0 (non-commercial). The training photos (UTKFace) are available for non-commercial research "
        "only, and the GAN faces' origin terms could not be verified; those terms apply to any use of these weights.",
        "- Code: featdeid, Apache-2.0.",
    ]
    return "\n".join(parts) + "\n"


def _config_from_checkpoint(ckpt: Path, checkpoint: dict[str, Any] | None) -> Path:
    """``training/configs/<config>.yaml`` for the config that ``checkpoint.json`` names."""
    name = (checkpoint or {}).get("config")
    if not name:
        raise SystemExit(f"error: give --config ({ckpt} does not name the training config)")
    path = REPO_ROOT / "training" / "configs" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: {ckpt} names config {name!r}, but {path} does not exist")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a featdeid model card from measured results.")
    p.add_argument("folder", type=Path)
    p.add_argument("--config", default=None,
                   help="training config YAML (default: training/configs/<name>.yaml for the 'config' named in FOLDER/checkpoint.json)")
    p.add_argument("--sweep", required=True, type=Path)
    p.add_argument("--eval", required=True, type=Path, nargs="+",
                   help="results.json of featdeid eval --set lfw (several: their methods in one table, e.g. the model and the baselines)")
    p.add_argument("--eval-celeba", type=Path, default=None)
    p.add_argument("--output", type=Path, default=None, help="default: FOLDER/README.md")
    args = p.parse_args(argv)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from featdeid.images import atomic_write
    from training.config import load_config

    ckpt = args.folder / "checkpoint.json"  # the exported checkpoint's best.json, kept beside the card
    checkpoint = json.loads(ckpt.read_text()) if ckpt.is_file() else None
    config = args.config or _config_from_checkpoint(ckpt, checkpoint)
    text = card(args.folder, load_config(config), json.loads(args.sweep.read_text()), merge([json.loads(p.read_text()) for p in args.eval]),
                json.loads(args.eval_celeba.read_text()) if args.eval_celeba else None, checkpoint)
    out = args.output or args.folder / "README.md"
    atomic_write(text.encode(), out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

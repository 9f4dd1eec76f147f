"""The evaluation report: ``results.json`` (machines), ``report.md`` (people), ``plots/*.png``.

Plots: ``cmc_<evaluator>.png`` (CMC curves of every method and of the originals, paper Fig. 15),
``quality_vs_asr.png`` (LPIPS against ASR per black-box evaluator, methods of one family joined,
Fig. 14), ``robustness_<evaluator>.png`` (ASR after each attack, Table 8 / Fig. 18) and
``differences.png`` (C, D and the x10 amplified difference |D - C| for a few faces, Fig. 17).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..images import atomic_write


def _clean(o: Any) -> Any:
    """JSON-safe copy: NaN -> null, +-inf -> "inf" / "-inf", numpy -> python."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, (np.floating, float)):
        f = float(o)
        if math.isnan(f):
            return None
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, Path):
        return str(o)
    return o


def _pct(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * float(x):.2f}"


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return "∞" if x == "inf" else x
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{float(x):.{digits}f}"


def _evaluators(results: dict[str, Any], role: str) -> list[dict[str, Any]]:
    return [e for e in results.get("evaluators", []) if e.get("role") == role]


def markdown(results: dict[str, Any]) -> str:
    s = results.get("set", {})
    lines = [f"# featdeid evaluation: {s.get('name', '?')} ({s.get('mode', '?')} mode)", ""]
    lines.append(
        f"featdeid {results.get('featdeid_version')} · {results.get('created')} · torch {results.get('machine', {}).get('torch')} · "
        f"{results.get('machine', {}).get('cpus')} CPUs, {results.get('machine', {}).get('torch_threads')} torch threads"
    )
    lines.append("")
    lines.append(
        f"Set: {s.get('images')} images of {s.get('identities')} identities; {s.get('genuine_pairs')} genuine + "
        f"{s.get('impostor_pairs')} impostor pairs in {s.get('folds')} folds; 1:N: {s.get('onen_persons')} persons × "
        f"{s.get('onen_sets')} sets; frames {s.get('frame_size')}×{s.get('frame_size')}."
    )
    fb = s.get("fallback_alignment")
    detector = results.get("config", {}).get("detector", "dlib")
    if fb is not None:
        lines.append(f"{detector} found no face in {fb['count']} images; they use the fixed fallback landmarks {fb['landmarks_150px']} ({fb['rule']}).")
    elif s.get("mode") == "photos":
        lines.append(f"{detector} found the subject in {s.get('detected')} original photos; {s.get('not_detected')} photos without a detected face are left out.")
    pr = results.get("protocol")
    if pr:
        lines.append(
            f"Thresholds from all {pr['threshold_pairs']} pairs of originals; ASR on {pr['genuine_pairs_for_asr']} genuine pairs "
            f"({pr['deidentified_verification_images']} de-identified images)"
            + (f"; robustness on {pr['genuine_pairs_for_robustness']} of them." if pr.get("genuine_pairs_for_robustness") else ".")
        )
    for n in s.get("notes", []):
        lines.append(f"- {n}")
    lines.append("")

    lines += ["## Evaluators on the originals", ""]
    lines.append("| evaluator | role | dim | threshold (cos) | accuracy, best threshold % | 10-fold accuracy % | AUC | ASR originals % | Rank-1 originals % | Rank-5 originals % |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for e in results.get("evaluators", []):
        lines.append(
            f"| {e['name']} | {e['role']} | {e['dim']} | {_num(e['threshold'])} | {_pct(e['accuracy'])} | {_pct(e['kfold_accuracy'])} ± {_pct(e['kfold_std'])} | "
            f"{_num(e['auc'], 4)} | {_pct(e['asr_original'])} | {_pct(e.get('rank1_original'))} | {_pct(e.get('rank5_original'))} |"
        )
    lines.append("")
    lines.append("Threshold: the one with the highest accuracy on all the originals' pairs (paper, 4.3); a pair is "
                 "'same person' when cos ≥ threshold. ASR = share of genuine pairs judged different.")
    lines.append("")

    methods = results.get("methods", [])
    for role, title in (("black-box", "Black-box evaluators"), ("white-box", "White-box evaluator (the EN used in training; not a black-box figure)")):
        evs = _evaluators(results, role)
        if not evs:
            continue
        lines += [f"## {title}", ""]
        head = "| method | PSNR ↑ | SSIM ↑ | LPIPS ↓ |"
        sep = "|---|---:|---:|---:|"
        for e in evs:
            head += f" ASR {e['name']} % ↑ | Rank-1 {e['name']} % ↓ | Rank-5 {e['name']} % ↓ |"
            sep += "---:|---:|---:|"
        lines += [head, sep]
        row = "| originals (no change) | ∞ | 1.000 | 0.000 |"
        for e in evs:
            row += f" {_pct(e['asr_original'])} | {_pct(e.get('rank1_original'))} | {_pct(e.get('rank5_original'))} |"
        lines.append(row)
        for m in methods:
            q = m.get("quality", {})
            row = f"| {m['label']} (`{m['name']}`) | {_num(q.get('psnr'), 2)} | {_num(q.get('ssim'))} | {_num(q.get('lpips'), 4)} |"
            for e in evs:
                r = m.get("evaluators", {}).get(e["name"], {})
                row += f" {_pct(r.get('asr'))} | {_pct(r.get('rank1'))} | {_pct(r.get('rank5'))} |"
            lines.append(row)
        lines.append("")
        adv = [m for m in methods if m.get("family") == "adv"]
        if adv:
            lines.append(f"Adversarial baselines are optimised against `{adv[0].get('target')}`: figures of that recogniser are white-box for them.")
            lines.append("")
        lost = [m for m in methods if m.get("not_redetected")]
        if lost:
            lines.append("Faces no longer detected after de-identification count as protected: " + ", ".join(f"{m['name']}: {m['not_redetected']}" for m in lost) + ".")
            lines.append("")

    attacks = results.get("attacks", {})
    if attacks:
        lines += ["## Robustness: ASR % after image processing of D (paper, Table 8)", ""]
        for e in results.get("evaluators", []):
            lines.append(f"### {e['name']} ({e['role']})")
            lines.append("")
            lines.append("| method | none | " + " | ".join(attacks.values()) + " |")
            lines.append("|---|---:|" + "---:|" * len(attacks))
            ro = e.get("robustness_original", {})
            lines.append(f"| originals | {_pct(ro.get('none', e['asr_original']))} | " + " | ".join(_pct(ro.get(a)) for a in attacks) + " |")
            for m in methods:
                r = m.get("evaluators", {}).get(e["name"], {})
                rb = r.get("robustness")
                if rb is None:
                    continue
                lines.append(f"| {m['name']} | {_pct(rb.get('none', r.get('asr')))} | " + " | ".join(_pct(rb.get(a)) for a in attacks) + " |")
            lines.append("")

    t = results.get("timings", {})
    lines += ["## Timing", ""]
    lines.append(f"Total wall time {t.get('total_s')} s.")
    lines.append("")
    lines.append("| stage | seconds |")
    lines.append("|---|---:|")
    for k, v in t.get("stages_s", {}).items():
        lines.append(f"| {k} | {v} |")
    lines.append("")
    thr = t.get("evaluator_throughput_img_per_s", {})
    if thr:
        lines.append("Evaluator throughput (images/s while embedding): " + ", ".join(f"{k} {v}" for k, v in thr.items()) + ".")
        lines.append("")
    if methods:
        keys: list[str] = []
        for m in methods:
            for k in m.get("timings", {}):
                if k not in keys and k not in ("wall", "images", "images_per_s"):
                    keys.append(k)
        lines.append("| method | images | wall s | images/s | " + " | ".join(keys) + " |")
        lines.append("|---|---:|---:|---:|" + "---:|" * len(keys))
        for m in methods:
            tm = m.get("timings", {})
            lines.append(f"| {m['name']}{' (resumed)' if m.get('resumed') else ''} | {tm.get('images')} | {tm.get('wall')} | {tm.get('images_per_s')} | " + " | ".join(str(tm.get(k, '–')) for k in keys) + " |")
        lines.append("")
        lines.append("Worker evaluators (dlib) run in a separate process beside the torch work: their `embed` time overlaps the other stages; `wait` is the time the main process waited for them.")
        lines.append("")
    lines += ["## Plots", ""]
    for p in ("quality_vs_asr.png", "differences.png"):
        lines.append(f"- [{p}](plots/{p})")
    for e in results.get("evaluators", []):
        lines.append(f"- [cmc_{e['name']}.png](plots/cmc_{safe_stem(e['name'])}.png)")
        if attacks:
            lines.append(f"- [robustness_{e['name']}.png](plots/robustness_{safe_stem(e['name'])}.png)")
    lines.append("")
    lines += ["## Protocol notes", ""]
    lines += [
        "- Covers C are the aligned canonical frames quantised to 8 bits; every method changes pixels only through the canonical face mask "
        "(`C + mask·(X − C)`, what paste-back writes into a photo) and D is quantised to 8 bits before any metric or recogniser.",
        "- PSNR/SSIM/LPIPS are means over the de-identified images (PSNR leaves out identical images, which have infinite PSNR). "
        "SSIM: Gaussian window σ = 1.5. LPIPS: AlexNet, v0.1 heads, weights: " + str(results.get("lpips_weights")) + ".",
        "- 1:N: every ordered pair of sets (input set de-identified, registered set original); rank = 1 + number of registered identities scoring "
        "strictly higher than the true one; CMC pooled over all combinations.",
    ]
    return "\n".join(lines) + "\n"


def safe_stem(name: str) -> str:
    """``name`` as a file-name stem: characters other than letters, digits, ``-``, ``_`` and ``.`` become ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def plots(results: dict[str, Any], out: Path, examples_dir: Path | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    pdir = out / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    written = []
    methods = results.get("methods", [])
    # CMC
    for e in results.get("evaluators", []):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        orig = e.get("cmc_original") or []
        if orig:
            ax.plot(np.arange(1, len(orig) + 1), np.asarray(orig, float) * 100, "k--", label="originals")
        for m in methods:
            c = m.get("evaluators", {}).get(e["name"], {}).get("cmc")
            if c:
                ax.plot(np.arange(1, len(c) + 1), np.asarray(c, float) * 100, label=m["name"])
        ax.set_xscale("log")
        ax.set_xlabel("rank")
        ax.set_ylabel("identification rate %")
        ax.set_ylim(0, 101)
        ax.set_title(f"CMC, {e['name']} ({e['role']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = pdir / f"cmc_{safe_stem(e['name'])}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    # quality vs ASR
    evs = _evaluators(results, "black-box") or results.get("evaluators", [])
    if evs and methods:
        fig, axes = plt.subplots(1, len(evs), figsize=(5 * len(evs), 4.2), squeeze=False)
        for ax, e in zip(axes[0], evs):
            fams: dict[str, list] = {}
            for m in methods:
                q = m.get("quality", {}).get("lpips")
                r = m.get("evaluators", {}).get(e["name"], {}).get("asr")
                if q is None or r is None:
                    continue
                fams.setdefault(m.get("family", m["name"]), []).append((m.get("param") or 0.0, float(q), float(r) * 100, m["name"]))
            for fam, pts in fams.items():
                pts.sort()
                ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-", label=fam)
                for p in pts:
                    ax.annotate(p[3].split("@")[-1], (p[1], p[2]), fontsize=6, xytext=(3, 3), textcoords="offset points")
            ax.axhline(float(e["asr_original"]) * 100, color="k", ls="--", lw=0.8, label="originals")
            ax.set_xlabel("LPIPS (alex) ↓")
            ax.set_ylabel("ASR % ↑")
            ax.set_title(f"{e['name']} ({e['role']})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = pdir / "quality_vs_asr.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    # robustness
    attacks = results.get("attacks", {})
    if attacks:
        for e in results.get("evaluators", []):
            rows = [("originals", e.get("robustness_original", {}).get("none", e["asr_original"]), e.get("robustness_original", {}))]
            for m in methods:
                r = m.get("evaluators", {}).get(e["name"], {})
                if r.get("robustness") is not None:
                    rows.append((m["name"], r["robustness"].get("none", r.get("asr")), r["robustness"]))
            cols = ["none", *attacks]
            fig, ax = plt.subplots(figsize=(min(14.0, max(7.0, 0.22 * len(cols) * len(rows))), 4.2))
            width = 0.8 / len(rows)
            for k, (name, none, rb) in enumerate(rows):
                vals = [none, *[rb.get(a) for a in attacks]]
                ax.bar(np.arange(len(cols)) + k * width, [100 * (v if v is not None else np.nan) for v in vals], width, label=name)
            ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2)
            ax.set_xticklabels(cols, fontsize=8)
            ax.set_ylabel("ASR %")
            ax.set_ylim(0, 101)
            ax.set_title(f"Robustness, {e['name']} ({e['role']})")
            ax.legend(fontsize=6, ncol=2)
            fig.tight_layout()
            p = pdir / f"robustness_{safe_stem(e['name'])}.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            written.append(p)
    # differences (x10)
    if examples_dir is not None and methods:
        loaded = []
        for m in methods:
            f = out / m.get("examples", "") if m.get("examples") else None
            if f is not None and f.is_file():
                with np.load(f) as z:
                    loaded.append((m["name"], z["covers"], z["outputs"]))
        loaded = [x for x in loaded if len(x[1])]
        if loaded:
            n = min(len(x[1]) for x in loaded)
            cols = 1 + 2 * len(loaded)
            fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.7 * n), squeeze=False)
            for r in range(n):
                c = loaded[0][1][r].transpose(1, 2, 0)
                axes[r][0].imshow(c)
                axes[r][0].set_title("C" if r == 0 else "", fontsize=7)
                for k, (name, covers, outs) in enumerate(loaded):
                    cov = covers[r].astype(np.float32)
                    d = outs[r].astype(np.float32)
                    axes[r][1 + 2 * k].imshow(outs[r].transpose(1, 2, 0))
                    diff = np.clip(np.abs(d - cov) * 10, 0, 255).astype(np.uint8).transpose(1, 2, 0)
                    axes[r][2 + 2 * k].imshow(diff)
                    if r == 0:
                        axes[r][1 + 2 * k].set_title(name, fontsize=7)
                        axes[r][2 + 2 * k].set_title("|D−C|×10", fontsize=7)
            for row in axes:
                for ax in row:
                    ax.axis("off")
            fig.tight_layout()
            p = pdir / "differences.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            written.append(p)
    return written


def write_report(results: dict[str, Any], out: Path, examples_dir: Path | None = None, plots_too: bool = True) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and (``plots_too``) the plots into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean = _clean(results)
    atomic_write((json.dumps(clean, indent=1) + "\n").encode(), out / "results.json")
    atomic_write(markdown(clean).encode(), out / "report.md")
    files = {"json": out / "results.json", "markdown": out / "report.md"}
    if plots_too:
        for p in plots(clean, out, examples_dir):
            files[p.stem] = p
    return files


def main(argv: list[str] | None = None) -> int:
    """``python -m featdeid.evaluation.report OUT``: redraw report.md and the plots from OUT/results.json."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m featdeid.evaluation.report OUT_FOLDER", file=sys.stderr)
        return 2
    out = Path(args[0])
    results = json.loads((out / "results.json").read_text())
    for name, path in write_report(results, out, out / "methods").items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

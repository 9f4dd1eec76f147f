"""The evaluation protocol end to end: originals, thresholds, methods, attacks, report.

    from featdeid.evaluation import EvalConfig, evaluate
    results = evaluate(EvalConfig(assets=..., out=..., methods=["blur@4"], evaluators=["dlib"]))

Stages (each timed): align (dlib landmarks + frames, cached) -> originals (embeddings per
evaluator, cached) -> thresholds (best accuracy on the originals' pairs) -> robustness of the
originals (cached) -> for each method: de-identify the needed images once (verification I1 images
and all 1:N images), quality metrics, embeddings, attacks -> ASR, Rank-k, CMC -> report (after every
method, so a long run can be read while it goes; ``resume`` skips methods already reported).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import ConfigError
from . import attacks as attack_lib
from .baselines import Method, parse_method
from .evaluators import Evaluator, collect
from .identification import identification
from .metrics import LPIPSAlex, mean_psnr, psnr, ssim
from .protocol import (
    EmbeddingCache,
    FaceSet,
    celeba_pairs,
    default_cache_dir,
    load_set,
    prepare,
    save_npy,
    subset_key,
)
from .verification import attack_success_ratio, best_threshold, cosine_scores, kfold_accuracy, roc_auc


@dataclasses.dataclass
class EvalConfig:
    """Everything one evaluation run needs (the CLI fills it from its flags)."""

    assets: Path
    out: Path
    set: str = "lfw"
    model: str | None = None
    evaluators: list[str] = dataclasses.field(default_factory=lambda: ["dlib"])
    detector: str = "centerface"  # finds and aligns faces in originals and outputs, and in featdeid's pipeline
    whitebox: list[str] = dataclasses.field(default_factory=list)
    methods: list[str] = dataclasses.field(default_factory=lambda: ["featdeid@1"])
    sweep: list[float] = dataclasses.field(default_factory=list)
    robustness: bool = False
    attacks: list[str] | None = None
    adv_target: str | None = None
    adv_alpha: float | None = None
    adv_momentum: float = 1.0
    limit: int | None = None
    genuine_pairs: int | None = None  # ASR on this many genuine pairs (spread over folds); thresholds use all pairs
    robustness_pairs: int | None = None  # robustness ASR on this many of those genuine pairs
    persons: int = 200
    frame_size: int = 256
    seed: int = 0
    batch_size: int = 32
    cache_dir: Path | None = None
    examples: int = 4
    workers: int | None = None  # worker processes for dlib; None: 1 when there are >= 2 CPUs
    resume: bool = False
    progress: bool = True
    lpips_weights: Path | None = None
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


class Timer:
    """Accumulates wall time per stage name."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.s.items()}


def _u8(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _batches(idx: np.ndarray, size: int):
    for i in range(0, len(idx), size):
        yield idx[i : i + size]


def spread_subset(idx: np.ndarray, folds: np.ndarray, n: int | None) -> np.ndarray:
    """The first ``ceil(n / folds)`` of ``idx`` in each fold (at most ``n`` in all), sorted; all when ``n`` is None."""
    idx = np.asarray(idx, dtype=np.int64)
    if n is None or n >= len(idx):
        return idx
    fold_ids = np.unique(folds[idx])
    take = -(-n // len(fold_ids))
    picked = np.concatenate([idx[folds[idx] == f][:take] for f in fold_ids])
    return np.sort(picked[:n])


def _nan_rows(n: int, dim: int) -> np.ndarray:
    return np.full((n, dim), np.nan, dtype=np.float32)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def _finite(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


# --- photo mode helpers -----------------------------------------------------------------------------
def _read(ds: FaceSet, i: int) -> np.ndarray:
    from ..images import open_image

    return np.array(open_image(ds.path(i)).convert("RGB"))


def redetect_frame(rgb: np.ndarray, box: np.ndarray, size: int, detector: str = "centerface") -> np.ndarray | None:
    """uint8 frame ``(3, S, S)`` of the face in ``rgb`` that overlaps ``box`` most (IoU >= 0.3), else None."""
    from ..faces.align import extract_faces, find_faces
    from ..faces.detect import box_iou

    faces = find_faces(rgb, detector)
    best = max(faces, key=lambda f: box_iou(f.box, box), default=None)
    if best is None or box_iou(best.box, box) < 0.3:
        return None
    fr, _ = extract_faces(rgb, [best], size)
    return _u8(fr[0]).numpy()


def frame_at(rgb: np.ndarray, landmarks: np.ndarray, size: int) -> np.ndarray:
    """uint8 frame of ``rgb`` aligned with given landmarks."""
    from ..faces.align import extract_faces
    from ..faces.detect import Face

    fr, _ = extract_faces(rgb, [Face(np.zeros(4), landmarks)], size)
    return _u8(fr[0]).numpy()


def generic_photo(method: Method, rgb: np.ndarray, key: str, size: int, min_face_size: int = 20, detector: str = "centerface") -> np.ndarray:
    """A frame method on a whole photo: detect every face, apply on frames, paste the change back."""
    from ..faces.align import extract_faces, find_faces
    from ..faces.paste import paste

    out = rgb.copy()
    faces = [f for f in find_faces(rgb, detector) if f.size >= min_face_size]
    if not faces:
        return out
    covers, mats = extract_faces(rgb, faces, size)
    covers = _u8(covers).float().div_(255.0)
    with torch.no_grad():
        d = method.apply(covers, [f"{key}#{j}" for j in range(len(faces))])
    res = _u8(d).float().div_(255.0) - covers
    for j, m in enumerate(mats):
        paste(out, res[j : j + 1], m, size, 1.0)
    return out


def _attack_photo(att: Callable, rgb: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    return att(x)[0].permute(1, 2, 0).numpy()


# --- the run --------------------------------------------------------------------------------------------
class Run:
    def __init__(self, cfg: EvalConfig) -> None:
        self.cfg = cfg
        self.cache_dir = Path(cfg.cache_dir or default_cache_dir())
        self.out = Path(cfg.out)
        self.timer = Timer()
        self.t0 = time.perf_counter()
        self.evaluators: list[Evaluator] = []
        self.results: dict[str, Any] = {}
        self._deid: Any = None

    # lazily built shared objects
    def deidentifier(self) -> Any:
        if self._deid is None:
            from ..pipeline import Deidentifier

            self._deid = Deidentifier(self.cfg.model, detector=self.cfg.detector, batch_size=self.cfg.batch_size)
        return self._deid

    def adv_recogniser(self) -> Any:
        spec = self.adv_spec()
        for ev in self.evaluators:
            if ev.spec == spec:
                return ev.rec
        from ..recognisers import load_recogniser

        return load_recogniser(spec)

    def adv_spec(self) -> str:
        if self.cfg.adv_target:
            return self.cfg.adv_target
        if self.cfg.whitebox:
            return self.cfg.whitebox[0]
        for ev in self.evaluators:
            if ev.differentiable:
                return ev.spec
        raise ConfigError("the adversarial baseline needs a differentiable target: give --adv-target or --whitebox")

    def build_methods(self) -> list[Method]:
        specs = list(self.cfg.methods)
        for s in self.cfg.sweep:
            spec = f"featdeid@{s:g}"
            if spec not in specs:
                specs.append(spec)
        methods, seen = [], set()
        for spec in specs:
            m = parse_method(
                spec,
                deidentifier=self.deidentifier,
                adv_recogniser=self.adv_recogniser,
                adv_target_name=self._adv_name(),
                seed=self.cfg.seed,
                adv_alpha=self.cfg.adv_alpha,
                adv_momentum=self.cfg.adv_momentum,
                batch_size=min(self.cfg.batch_size, 16),
            )
            if m.name in seen:
                continue
            seen.add(m.name)
            methods.append(m)
        return methods

    def _adv_name(self) -> str:
        try:
            spec = self.adv_spec()
        except ConfigError:
            return ""
        for ev in self.evaluators:
            if ev.spec == spec:
                return ev.name
        return spec

    # ------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            for ev in self.evaluators:
                ev.close()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        workers = cfg.workers if cfg.workers is not None else (1 if (os.cpu_count() or 1) >= 2 else 0)
        with self.timer("load_evaluators"):
            for spec in cfg.evaluators:
                self.evaluators.append(Evaluator(spec, "black-box", workers=workers, batch_size=cfg.batch_size))
            for spec in cfg.whitebox:
                self.evaluators.append(Evaluator(spec, "white-box", workers=workers, batch_size=cfg.batch_size))
        names = [e.name for e in self.evaluators]
        for i, ev in enumerate(self.evaluators):  # unique names
            if names.count(ev.name) > 1:
                ev.name = f"{ev.name}#{i}"
        if not cfg.threads and any(ev.in_worker for ev in self.evaluators):
            torch.set_num_threads(max(1, (os.cpu_count() or 2) - sum(ev.workers for ev in self.evaluators)))
        methods = self.build_methods()  # fail early on bad specs / a missing model, before the slow stages
        with self.timer("load_set"):
            ds = load_set(cfg.set, Path(cfg.assets), cfg.limit, cfg.seed, cfg.persons)
        self.ds = ds
        with self.timer("align"):
            align_info = prepare(ds, cfg.frame_size, self.cache_dir, cfg.progress, cfg.detector)
        if ds.mode == "photos":
            celeba_pairs(ds, cfg.seed)
        ds.notes.append(f"alignment: {align_info}")
        for m in methods:
            m.bind(ds)
        lpips_w = cfg.lpips_weights
        if lpips_w is None:
            cand = Path(cfg.assets) / "weights" / "imagenet_alexnet"
            lpips_w = cand if cand.is_dir() else None
        self.lpips = LPIPSAlex(lpips_w, batch_size=cfg.batch_size)
        self.attacks = attack_lib.get_attacks(cfg.attacks) if cfg.robustness else {}
        self.results = {
            "featdeid_version": _version(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "config": cfg.to_dict(),
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "workers": [ev.name for ev in self.evaluators if ev.in_worker],
            },
            "set": ds.summary(),
            "lpips_weights": self.lpips.source,
            "attacks": {k: attack_lib.ATTACK_LABELS[k] for k in self.attacks},
            "evaluators": [],
            "methods": [],
            "timings": {},
        }
        with self.timer("originals"):
            self.originals()
        if self.attacks:
            with self.timer("robustness_originals"):
                self._robust_originals(EmbeddingCache(self.cache_dir))
        self.write()
        for m in methods:
            done = self._resumed(m)
            if done is None:
                with self.timer(f"method:{m.name}"):
                    done = self.run_method(m)
                self._save_method(m, done)
            self.results["methods"].append(done)
            self.write()
        self.write(final=True)
        return self.results

    def write(self, final: bool = False) -> None:
        """Write the report; plots only at the end and at most every two minutes during a run."""
        from .report import write_report

        self.results["timings"] = {"stages_s": self.timer.rounded(), "total_s": round(time.perf_counter() - self.t0, 2)}
        self.results["timings"]["evaluator_throughput_img_per_s"] = {ev.name: ev.throughput() for ev in self.evaluators}
        now = time.perf_counter()
        draw = final or now - getattr(self, "_last_plot", self.t0) > 120
        if draw:
            self._last_plot = now
        write_report(self.results, self.out, self._examples_dir(), plots_too=draw)

    def _examples_dir(self) -> Path:
        return self.out / "methods"

    # --- originals -----------------------------------------------------------------------------------
    def originals(self) -> None:
        """Embeddings of the originals (cached), thresholds, originals' ASR and 1:N, robustness of the originals."""
        ds = self.ds
        cache = EmbeddingCache(self.cache_dir)
        usable = np.flatnonzero(ds.usable)
        gen = ds.genuine
        gen = gen[ds.usable[ds.pair_a[gen]] & ds.usable[ds.pair_b[gen]]]
        self.gen_eval = spread_subset(gen, ds.pair_fold, self.cfg.genuine_pairs)
        self.gen_rob = spread_subset(self.gen_eval, ds.pair_fold, self.cfg.robustness_pairs)
        self.a_unique = np.unique(ds.pair_a[self.gen_eval])
        self.a_rob = np.unique(ds.pair_a[self.gen_rob])
        self.results["protocol"] = {
            "genuine_pairs_for_asr": int(len(self.gen_eval)),
            "deidentified_verification_images": int(len(self.a_unique)),
            "genuine_pairs_for_robustness": int(len(self.gen_rob)) if self.attacks else 0,
            "threshold_pairs": int(len(ds.pair_a)),
        }
        t0 = time.perf_counter()
        paths = {ev.name: cache.path(ds.frames_key, ev.fingerprint, "clean", subset_key(usable)) for ev in self.evaluators}
        loaded = {ev.name: cache.load(paths[ev.name]) for ev in self.evaluators}
        todo = [ev for ev in self.evaluators if loaded[ev.name] is None]
        if todo:
            # one pass over the frames, every evaluator per chunk: the dlib worker overlaps the torch ones
            rows = self._embed_chunks(todo, usable, lambda chunk: np.asarray(ds.frames[chunk]), "originals")
            for ev in todo:
                out = _nan_rows(len(ds.keys), ev.dim)
                out[usable] = rows[ev.name]
                save_npy(out, paths[ev.name])
                loaded[ev.name] = out
        self.orig: dict[str, np.ndarray] = {}
        for ev in self.evaluators:
            emb = loaded[ev.name]
            self.orig[ev.name] = emb
            scores = cosine_scores(emb[ds.pair_a], emb[ds.pair_b])
            ok = np.isfinite(scores)
            thr, acc = best_threshold(scores[ok], ds.pair_same[ok])
            kf, kf_std = kfold_accuracy(scores[ok], ds.pair_same[ok], ds.pair_fold[ok])
            g_scores = scores[ds.pair_same]
            info: dict[str, Any] = {
                **ev.describe(),
                "threshold": thr,
                "accuracy": acc,
                "kfold_accuracy": kf,
                "kfold_std": kf_std,
                "auc": roc_auc(scores[ok], ds.pair_same[ok]),
                "pairs_scored": int(ok.sum()),
                "asr_original": attack_success_ratio(np.nan_to_num(cosine_scores(emb[ds.pair_a[self.gen_eval]], emb[ds.pair_b[self.gen_eval]]), nan=-2.0), thr),
                "asr_original_all_pairs": attack_success_ratio(np.nan_to_num(g_scores, nan=-2.0), thr),
                "mean_cos_genuine": float(np.nanmean(g_scores)),
                "mean_cos_impostor": float(np.nanmean(scores[~ds.pair_same])),
                "cached": ev not in todo,
                "originals_images": int(len(usable)),
            }
            onen = identification(emb[ds.onen], emb[ds.onen], ds.usable[ds.onen])
            info.update(rank1_original=onen["rank1"], rank5_original=onen["rank5"], cmc_original=onen["cmc"].tolist())
            self.results["evaluators"].append(info)
        self.results["originals_embedding_s"] = round(time.perf_counter() - t0, 2)
        self.thresholds = {e["name"]: e["threshold"] for e in self.results["evaluators"]}

    def _embed_chunks(self, evaluators: list[Evaluator], idx: np.ndarray, frames_of: Callable[[np.ndarray], np.ndarray], desc: str) -> dict[str, np.ndarray]:
        """Embed ``frames_of(chunk)`` for every chunk of ``idx`` with every evaluator, interleaved."""
        from tqdm import tqdm

        futs: dict[str, list] = {ev.name: [] for ev in evaluators}
        for chunk in tqdm(list(_batches(idx, self.cfg.batch_size)), desc=desc, unit="batch", disable=not self.cfg.progress, mininterval=2.0):
            frames = frames_of(chunk)
            for ev in evaluators:
                futs[ev.name].append(ev.submit(frames))
        return {ev.name: collect(futs[ev.name], ev.dim) for ev in evaluators}

    def _robust_originals(self, cache: EmbeddingCache) -> None:
        """ASR of the originals after each attack (the 'Original' row of Table 8); embeddings cached."""
        ds, cfg = self.ds, self.cfg
        a_idx = self.a_rob
        pos = {int(k): j for j, k in enumerate(a_idx)}
        gen = self.gen_rob
        paths = {(ev.name, a): cache.path(ds.frames_key, ev.fingerprint, f"attack:{a}:{ds.mode}", subset_key(a_idx)) for ev in self.evaluators for a in self.attacks}
        emb = {k: cache.load(p) for k, p in paths.items()}
        for name, att in self.attacks.items():
            todo = [ev for ev in self.evaluators if emb[(ev.name, name)] is None]
            if not todo:
                continue
            if ds.mode == "photos":
                frames, rows = [], []
                for j, i in enumerate(a_idx):
                    fr = redetect_frame(_attack_photo(att, _read(ds, int(i))), np.asarray(ds.boxes[i]), cfg.frame_size, cfg.detector)
                    if fr is not None:
                        frames.append(fr)
                        rows.append(j)
                for ev in todo:
                    out = _nan_rows(len(a_idx), ev.dim)
                    if frames:
                        out[rows] = ev.embed(np.stack(frames))
                    emb[(ev.name, name)] = out
            else:
                got = self._embed_chunks(todo, a_idx, lambda chunk, att=att: att(torch.from_numpy(np.asarray(ds.frames[chunk]))).numpy(), f"originals, {name}")
                for ev in todo:
                    emb[(ev.name, name)] = got[ev.name]
            for ev in todo:
                save_npy(emb[(ev.name, name)], paths[(ev.name, name)])
        for ev in self.evaluators:
            info = next(e for e in self.results["evaluators"] if e["name"] == ev.name)
            s0 = cosine_scores(self.orig[ev.name][ds.pair_a[gen]], self.orig[ev.name][ds.pair_b[gen]])
            info["robustness_original"] = {"none": attack_success_ratio(np.nan_to_num(s0, nan=-2.0), self.thresholds[ev.name])}
            for name in self.attacks:
                e = emb[(ev.name, name)]
                s = cosine_scores(e[[pos[int(a)] for a in ds.pair_a[gen]]], self.orig[ev.name][ds.pair_b[gen]])
                info["robustness_original"][name] = attack_success_ratio(np.nan_to_num(s, nan=-2.0), self.thresholds[ev.name])

    # --- methods ------------------------------------------------------------------------------------------
    def _method_file(self, m: Method) -> Path:
        return self.out / "methods" / f"{_slug(m.name)}.json"

    def _resumed(self, m: Method) -> dict[str, Any] | None:
        if not self.cfg.resume:
            return None
        path = self._method_file(m)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        if data.get("_resume_key") != json.loads(json.dumps(self._resume_key(m), default=_json_default)):
            return None
        data["resumed"] = True
        return data

    def _resume_key(self, m: Method) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "set": self.ds.name,
            "frames_key": self.ds.frames_key,
            "selection": [cfg.limit, cfg.persons, cfg.seed, cfg.genuine_pairs, cfg.robustness_pairs],
            "evaluators": sorted(ev.fingerprint for ev in self.evaluators),
            "robustness": sorted(self.attacks),
            "describe": m.describe(),
        }

    def _save_method(self, m: Method, result: dict[str, Any]) -> None:
        want = self._resume_key(m)
        path = self._method_file(m)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "_resume_key": want}, default=_json_default, indent=1))

    def example_indices(self) -> np.ndarray:
        ds = self.ds
        cand = [int(i) for i in ds.onen[:, 0] if ds.usable[i]]
        return np.asarray(cand[: self.cfg.examples], dtype=np.int64)

    def run_method(self, m: Method) -> dict[str, Any]:
        ds = self.ds
        timer = Timer()
        busy0 = {ev.name: ev.busy_s for ev in self.evaluators}
        wait0 = {ev.name: ev.wait_s for ev in self.evaluators}
        t0 = time.perf_counter()
        need = np.union1d(self.a_unique, ds.onen.ravel())
        need = need[ds.usable[need]]
        threads = torch.get_num_threads()
        if m.needs_grad and not self.cfg.threads:
            # gradient methods spend most of their time in torch while the dlib worker idles
            torch.set_num_threads(max(threads, os.cpu_count() or 1))
        used_threads = torch.get_num_threads()
        try:
            if ds.mode == "frames":
                d_emb, att_emb, q, examples, extra = self._run_frames(m, need, timer)
            else:
                d_emb, att_emb, q, examples, extra = self._run_photos(m, need, timer)
        finally:
            torch.set_num_threads(threads)
        pos = {int(k): j for j, k in enumerate(need)}
        gen = self.gen_eval
        a_rows = [pos[int(a)] for a in ds.pair_a[gen]]
        rob_gen = self.gen_rob
        a_pos = {int(k): j for j, k in enumerate(self.a_rob)}
        per_ev: dict[str, Any] = {}
        with timer("scoring"):
            for ev in self.evaluators:
                thr = self.thresholds[ev.name]
                s = cosine_scores(d_emb[ev.name][a_rows], self.orig[ev.name][ds.pair_b[gen]])
                r: dict[str, Any] = {
                    "asr": attack_success_ratio(np.nan_to_num(s, nan=-2.0), thr),
                    "mean_cos_genuine": _finite(float(np.nanmean(s))) if np.isfinite(s).any() else None,
                    "pairs": int(len(s)),
                }
                qe = _nan_rows(ds.onen.size, ev.dim).reshape(*ds.onen.shape, ev.dim)
                for p in range(ds.onen.shape[0]):
                    for k in range(ds.onen.shape[1]):
                        i = int(ds.onen[p, k])
                        if i in pos:
                            qe[p, k] = d_emb[ev.name][pos[i]]
                onen = identification(qe, self.orig[ev.name][ds.onen], ds.usable[ds.onen])
                r.update(rank1=onen["rank1"], rank5=onen["rank5"], cmc=onen["cmc"].tolist(), per_combination_rank1=onen["per_combination_rank1"], queries=onen["queries"])
                if att_emb:
                    s0 = cosine_scores(d_emb[ev.name][[pos[int(a)] for a in ds.pair_a[rob_gen]]], self.orig[ev.name][ds.pair_b[rob_gen]])
                    r["robustness"] = {"none": attack_success_ratio(np.nan_to_num(s0, nan=-2.0), thr)}
                    r["robustness_pairs"] = int(len(s0))
                    for name in self.attacks:
                        emb = att_emb[ev.name][name]
                        sa = cosine_scores(emb[[a_pos[int(a)] for a in ds.pair_a[rob_gen]]], self.orig[ev.name][ds.pair_b[rob_gen]])
                        r["robustness"][name] = attack_success_ratio(np.nan_to_num(sa, nan=-2.0), thr)
                per_ev[ev.name] = r
        wall = time.perf_counter() - t0
        timings = timer.rounded()
        for ev in self.evaluators:
            timings[f"embed:{ev.name}"] = round(ev.busy_s - busy0[ev.name], 2)
            if ev.in_worker:
                timings[f"wait:{ev.name}"] = round(ev.wait_s - wait0[ev.name], 2)
        timings["wall"] = round(wall, 2)
        timings["images"] = int(len(need))
        timings["images_per_s"] = round(len(need) / wall, 2) if wall > 0 else None
        ex_path = self.out / "methods" / f"{_slug(m.name)}-examples.npz"
        ex_path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(ex_path, keys=np.asarray(examples[0]), covers=examples[1], outputs=examples[2])
        return {
            **m.describe(),
            "images": int(len(need)),
            "torch_threads": used_threads,
            "quality": q,
            "evaluators": per_ev,
            "timings": timings,
            "examples": str(ex_path.relative_to(self.out)),
            **extra,
        }

    def _quality(self, c8: torch.Tensor, d8: torch.Tensor, acc: dict[str, list], timer: Timer) -> None:
        with timer("quality"):
            acc["psnr"].append(psnr(c8, d8))
            acc["ssim"].append(ssim(c8, d8))
            acc["lpips"].append(self.lpips(c8, d8))

    @staticmethod
    def _quality_summary(acc: dict[str, list]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in ("psnr", "ssim", "lpips"):
            v = np.concatenate(acc[k]) if acc[k] else np.zeros(0)
            out[k] = _finite(mean_psnr(v)) if k == "psnr" else _finite(float(v.mean())) if len(v) else None
            if k == "psnr" and len(v) and np.isinf(v).all():
                out[k] = math.inf
            fin = v[np.isfinite(v)]
            out[f"{k}_std"] = _finite(float(fin.std())) if len(fin) else None
        out["n"] = int(len(np.concatenate(acc["psnr"]))) if acc["psnr"] else 0
        return out

    def _run_frames(self, m: Method, need: np.ndarray, timer: Timer):
        from tqdm import tqdm

        ds, cfg = self.ds, self.cfg
        rob = np.isin(need, self.a_rob)
        futs: dict[str, list] = {ev.name: [] for ev in self.evaluators}
        afuts: dict[str, dict[str, list]] = {ev.name: {a: [] for a in self.attacks} for ev in self.evaluators}
        acc: dict[str, list] = {"psnr": [], "ssim": [], "lpips": []}
        ex_idx = set(self.example_indices().tolist())
        ex: tuple[list[str], list[np.ndarray], list[np.ndarray]] = ([], [], [])
        bs = cfg.batch_size
        for start in tqdm(range(0, len(need), bs), desc=m.name, unit="batch", disable=not cfg.progress, mininterval=2.0):
            chunk = need[start : start + bs]
            c8 = torch.from_numpy(np.asarray(ds.frames[chunk]))
            keys = [ds.keys[i] for i in chunk]
            with timer("deidentify"):
                ctx = contextlib.nullcontext() if m.needs_grad else torch.no_grad()
                with ctx:
                    d = m.apply(c8.float().div_(255.0), keys)
                d8 = _u8(d.detach())
            self._quality(c8, d8, acc, timer)
            for j, i in enumerate(chunk):
                if int(i) in ex_idx:
                    ex[0].append(ds.keys[i])
                    ex[1].append(c8[j].numpy())
                    ex[2].append(d8[j].numpy())
            d8n = d8.numpy()
            for ev in self.evaluators:
                futs[ev.name].append(ev.submit(d8n))
            sel = rob[start : start + bs]
            if self.attacks and sel.any():
                dsel = d8[torch.from_numpy(sel)]
                for name, att in self.attacks.items():
                    with timer("attacks"):
                        a8 = att(dsel).numpy()
                    for ev in self.evaluators:
                        afuts[ev.name][name].append(ev.submit(a8))
        with timer("collect"):
            d_emb = {ev.name: collect(futs[ev.name], ev.dim) for ev in self.evaluators}
            att_emb = {ev.name: {a: collect(afuts[ev.name][a], ev.dim) for a in self.attacks} for ev in self.evaluators} if self.attacks else {}
        return d_emb, att_emb, self._quality_summary(acc), (ex[0], np.asarray(ex[1], np.uint8), np.asarray(ex[2], np.uint8)), {}

    def _run_photos(self, m: Method, need: np.ndarray, timer: Timer):
        from tqdm import tqdm

        ds, cfg = self.ds, self.cfg
        size = cfg.frame_size
        d_emb = {ev.name: _nan_rows(len(need), ev.dim) for ev in self.evaluators}
        att_rows = {a: [] for a in self.attacks}
        att_frames: dict[str, list] = {a: [] for a in self.attacks}
        a_pos = {int(k): j for j, k in enumerate(self.a_rob)}
        acc: dict[str, list] = {"psnr": [], "ssim": [], "lpips": []}
        ex_idx = set(self.example_indices().tolist())
        ex: tuple[list[str], list[np.ndarray], list[np.ndarray]] = ([], [], [])
        frames, rows = [], []
        lost = 0
        for j, i in enumerate(tqdm(need, desc=m.name, unit="photo", disable=not cfg.progress, mininterval=2.0)):
            i = int(i)
            rgb = _read(ds, i)
            with timer("deidentify"):
                if hasattr(m, "apply_photo"):
                    with torch.no_grad():
                        out = m.apply_photo(rgb, ds.keys[i])
                else:
                    ctx = contextlib.nullcontext() if m.needs_grad else torch.no_grad()
                    with ctx:
                        out = generic_photo(m, rgb, ds.keys[i], size, detector=self.cfg.detector)
            c8 = torch.from_numpy(np.array(ds.frames[i]))[None]
            d8 = torch.from_numpy(frame_at(out, ds.landmarks[i], size))[None]
            self._quality(c8, d8, acc, timer)
            if i in ex_idx:
                ex[0].append(ds.keys[i])
                ex[1].append(c8[0].numpy())
                ex[2].append(d8[0].numpy())
            with timer("redetect"):
                fr = redetect_frame(out, np.asarray(ds.boxes[i]), size, self.cfg.detector)
            if fr is None:
                lost += 1
            else:
                frames.append(fr)
                rows.append(j)
            if i in a_pos:
                for name, att in self.attacks.items():
                    with timer("attacks"):
                        attacked = _attack_photo(att, out)
                    with timer("redetect"):
                        fa = redetect_frame(attacked, np.asarray(ds.boxes[i]), size, self.cfg.detector)
                    if fa is not None:
                        att_frames[name].append(fa)
                        att_rows[name].append(a_pos[i])
        with timer("collect"):
            for ev in self.evaluators:
                if frames:
                    d_emb[ev.name][rows] = ev.embed(np.stack(frames))
            att_emb: dict[str, dict[str, np.ndarray]] = {}
            for ev in self.evaluators:
                att_emb[ev.name] = {}
                for name in self.attacks:
                    e = _nan_rows(len(self.a_rob), ev.dim)
                    if att_frames[name]:
                        e[att_rows[name]] = ev.embed(np.stack(att_frames[name]))
                    att_emb[ev.name][name] = e
        extra = {"not_redetected": lost, "not_redetected_rule": f"a de-identified face that {self.cfg.detector} no longer finds counts as protected (never matched)"}
        return d_emb, att_emb if self.attacks else {}, self._quality_summary(acc), (ex[0], np.asarray(ex[1], np.uint8), np.asarray(ex[2], np.uint8)), extra


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except ImportError:
        return "unknown"


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the protocol described by ``cfg``; writes the report to ``cfg.out`` and returns the results."""
    with torch.no_grad():
        return Run(cfg).run()

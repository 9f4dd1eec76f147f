"""Evaluation sets, alignment into canonical frames and the on-disk caches.

Sets
----
``lfw`` (``faces/lfw_pairs150``): the official View-2 ``pairs.txt`` (10 folds x 300 genuine + 300
impostor pairs) for 1:1 verification, and for 1:N identification 200 persons with >= 3 images
(seeded choice), three images each, one image per person in each of three sets. Images are
150 x 150 deep-funneled crops; they are aligned once with dlib (HOG detector + 68-point landmarks
reduced to 5 points; the detection nearest the image centre is the subject) into canonical frames.
Where dlib finds no face the fixed landmarks :data:`LFW_FALLBACK_LANDMARKS` are used (the median
of dlib's landmarks over the LFW crops where it does find the face; the crops are roughly aligned,
so this is the typical geometry); the report counts them.

``celeba`` (``faces/celeba_wild_id50``): in-the-wild photos, 8 per identity. Full-photo mode:
detection, alignment and paste-back on the whole photo, then re-detection on the result; the
subject is the largest detected face. Photos where dlib finds no face in the original are left
out (counted). Verification: all ordered genuine pairs ``(D_i, I_j)``, threshold chosen on the
originals' genuine pairs plus as many seeded impostor pairs; 1:N: the 8 images form 8 sets.

Caches (``$FEATDEID_CACHE`` or ``~/.cache/featdeid/eval``)
----------------------------------------------------------
- ``landmarks-dlib.json``: file sha256 -> 5 landmarks, detection flag, face count.
- ``frames/<key>.npy``: uint8 frames ``(N, 3, S, S)`` of a set's images at frame size S, keyed by
  the files' hashes, their landmarks and S.
- ``emb/<key>.npy``: embeddings of original (and attacked original) frames, keyed by the frames'
  key, the evaluator's weights fingerprint and the attack.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from ..errors import ConfigError, ModelNotFoundError
from ..images import atomic_write

# Fixed fallback alignment for 150 x 150 LFW deep-funneled crops (pixels; eye centres, nose tip,
# mouth corners, image left to right): the median of dlib's 5 points over the 7,629 of the 7,701
# lfw_pairs150 crops where dlib finds the face (it finds none in 72).
LFW_FALLBACK_LANDMARKS = np.array(
    [[54.0, 63.7], [95.5, 62.8], [75.0, 86.0], [57.0, 108.0], [94.0, 107.0]], dtype=np.float64
)


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEATDEID_CACHE", Path.home() / ".cache" / "featdeid" / "eval")).expanduser()


def save_npy(arr: np.ndarray, path: Path) -> None:
    """Write an ``.npy`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npy", dir=path.parent)
    os.close(fd)
    try:
        np.save(tmp, arr)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha_bytes(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclasses.dataclass
class FaceSet:
    """An evaluation set: images, identities, verification pairs and 1:N sets.

    ``pairs`` are indices into ``keys``: ``pair_a`` (de-identified in genuine pairs), ``pair_b``
    (original), ``pair_same`` and ``pair_fold``. ``onen`` is ``(P, K)``: person p's image in set k.
    """

    name: str
    root: Path
    keys: list[str]
    identities: list[str]
    pair_a: np.ndarray
    pair_b: np.ndarray
    pair_same: np.ndarray
    pair_fold: np.ndarray
    onen: np.ndarray
    mode: str  # "frames" or "photos"
    notes: list[str] = dataclasses.field(default_factory=list)
    # filled by prepare(): per key
    landmarks: np.ndarray | None = None
    detected: np.ndarray | None = None
    boxes: np.ndarray | None = None  # (N, 4) detected subject boxes (NaN where not detected)
    frames: np.ndarray | None = None  # uint8 (N, 3, S, S) memmap
    frames_key: str = ""
    frame_size: int = 0
    usable: np.ndarray | None = None  # photos: original face found

    def path(self, i: int) -> Path:
        return self.root / self.keys[i]

    @property
    def genuine(self) -> np.ndarray:
        return np.flatnonzero(self.pair_same)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "mode": self.mode,
            "root": str(self.root),
            "images": len(self.keys),
            "identities": len(set(self.identities)),
            "pairs": int(len(self.pair_a)),
            "genuine_pairs": int(self.pair_same.sum()),
            "impostor_pairs": int((~self.pair_same).sum()),
            "folds": int(len(np.unique(self.pair_fold))) if len(self.pair_fold) else 0,
            "onen_persons": int(self.onen.shape[0]),
            "onen_sets": int(self.onen.shape[1]) if self.onen.ndim == 2 else 0,
            "frame_size": self.frame_size,
            "notes": self.notes,
        }
        if self.detected is not None:
            out["detected"] = int(self.detected.sum())
            out["not_detected"] = int((~self.detected).sum())
            if self.mode == "frames":
                out["fallback_alignment"] = {
                    "count": int((~self.detected).sum()),
                    "keys": [self.keys[i] for i in np.flatnonzero(~self.detected)][:50],
                    "landmarks_150px": LFW_FALLBACK_LANDMARKS.round(1).tolist(),
                    "rule": "median dlib landmarks of the detected LFW 150x150 crops",
                }
        return out

    def other_identity_frames(self, keys: list[str], seed: int) -> torch.Tensor:
        """Frames (float [0, 1]) of a seeded image of another person for each key (shuffle method)."""
        if self.frames is None:
            raise ConfigError("frames are not prepared")
        index = {k: i for i, k in enumerate(self.keys)}
        ids = np.asarray(self.identities)
        out = []
        for k in keys:
            i = index[k]
            rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:8], "little"))
            others = np.flatnonzero(ids != ids[i])
            if self.usable is not None:
                others = others[self.usable[others]]
            out.append(np.asarray(self.frames[int(rng.choice(others))]))
        return torch.from_numpy(np.stack(out)).float().div_(255.0)


# --- LFW ----------------------------------------------------------------------------------------------
def _lfw_name(person: str, number: str | int) -> str:
    return f"images/{person}/{person}_{int(number):04d}.jpg"


def read_pairs(path: Path) -> tuple[list[tuple[str, str, bool, int]], int, int]:
    """``pairs.txt`` as ``(key_a, key_b, same, fold)`` rows, plus (folds, pairs per half-fold)."""
    lines = [ln.rstrip("\n") for ln in path.read_text().splitlines() if ln.strip()]
    head = lines[0].split()
    if len(head) != 2:
        raise ConfigError(f"{path}: first line must be '<folds> <pairs>', got {lines[0]!r}")
    folds, per = int(head[0]), int(head[1])
    rows = []
    body = lines[1:]
    if len(body) != folds * 2 * per:
        raise ConfigError(f"{path}: expected {folds * 2 * per} pair lines, found {len(body)}")
    for i, ln in enumerate(body):
        fold = i // (2 * per)
        parts = ln.split("\t") if "\t" in ln else ln.split()
        if len(parts) == 3:
            rows.append((_lfw_name(parts[0], parts[1]), _lfw_name(parts[0], parts[2]), True, fold))
        elif len(parts) == 4:
            rows.append((_lfw_name(parts[0], parts[1]), _lfw_name(parts[2], parts[3]), False, fold))
        else:
            raise ConfigError(f"{path}: bad pair line {ln!r}")
    return rows, folds, per


def load_lfw(root: Path, limit: int | None = None, seed: int = 0, persons: int = 200, per_person: int = 3) -> FaceSet:
    """The LFW set (see the module docstring). ``limit``: at most that many genuine and impostor pairs
    (spread over the folds) and at most that many 1:N persons."""
    root = Path(root)
    pairs_file = root / "pairs.txt"
    if not pairs_file.is_file():
        raise ModelNotFoundError(f"LFW pairs file not found: {pairs_file} (is --assets right?)")
    rows, folds, per = read_pairs(pairs_file)
    notes = []
    if limit is not None:
        if limit < 1:
            raise ConfigError("--limit must be >= 1")
        take = math.ceil(limit / folds)
        kept, count = [], {True: 0, False: 0}
        for fold in range(folds):
            for same in (True, False):
                for r in [r for r in rows if r[3] == fold and r[2] == same][:take]:
                    if count[same] < limit:
                        kept.append(r)
                        count[same] += 1
        rows = kept
        persons = min(persons, max(limit, 10))
        notes.append(f"--limit {limit}: {count[True]} genuine + {count[False]} impostor pairs, {persons} persons for 1:N")
    # 1:N: persons with >= per_person images among the files here
    by_person: dict[str, list[str]] = {}
    for p in sorted((root / "images").iterdir()):
        if p.is_dir():
            files = sorted(f.name for f in p.glob("*.jpg"))
            if len(files) >= per_person:
                by_person[p.name] = files
    names = sorted(by_person)
    if len(names) < persons:
        raise ConfigError(f"only {len(names)} persons have >= {per_person} images; asked for {persons}")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(names), persons, replace=False).tolist())
    onen_keys = []
    for c in chosen:
        person = names[c]
        files = by_person[person]
        pick = rng.choice(len(files), per_person, replace=False)  # random order = random set assignment
        onen_keys.append([f"images/{person}/{files[j]}" for j in pick])
    keys = sorted({k for r in rows for k in r[:2]} | {k for row in onen_keys for k in row})
    index = {k: i for i, k in enumerate(keys)}
    missing = [k for k in keys if not (root / k).is_file()]
    if missing:
        raise ModelNotFoundError(f"{len(missing)} LFW images named by pairs.txt are missing, e.g. {root / missing[0]}")
    identities = [k.split("/")[1] for k in keys]
    return FaceSet(
        name="lfw",
        root=root,
        keys=keys,
        identities=identities,
        pair_a=np.array([index[r[0]] for r in rows], dtype=np.int64),
        pair_b=np.array([index[r[1]] for r in rows], dtype=np.int64),
        pair_same=np.array([r[2] for r in rows], dtype=bool),
        pair_fold=np.array([r[3] for r in rows], dtype=np.int64),
        onen=np.array([[index[k] for k in row] for row in onen_keys], dtype=np.int64),
        mode="frames",
        notes=notes,
    )


# --- CelebA in the wild ---------------------------------------------------------------------------
def load_celeba(root: Path, limit: int | None = None, seed: int = 0) -> FaceSet:
    """The CelebA in-the-wild set; ``limit``: at most that many identities."""
    root = Path(root)
    folder = root / "images"
    if not folder.is_dir():
        raise ModelNotFoundError(f"CelebA folder not found: {folder} (is --assets right?)")
    people = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if limit is not None:
        people = people[: max(2, limit)]
    files = {p: sorted(f.name for f in (folder / p).glob("*.jpg")) for p in people}
    k = min(len(v) for v in files.values())
    keys = [f"images/{p}/{f}" for p in people for f in files[p]]
    index = {key: i for i, key in enumerate(keys)}
    onen = np.array([[index[f"images/{p}/{f}"] for f in files[p][:k]] for p in people], dtype=np.int64)
    return FaceSet(
        name="celeba",
        root=root,
        keys=keys,
        identities=[key.split("/")[1] for key in keys],
        pair_a=np.zeros(0, np.int64),
        pair_b=np.zeros(0, np.int64),
        pair_same=np.zeros(0, bool),
        pair_fold=np.zeros(0, np.int64),
        onen=onen,
        mode="photos",
        notes=[f"{len(people)} identities x {k} photos; sets = the k photos of each identity"],
    )


def celeba_pairs(ds: FaceSet, seed: int = 0, folds: int = 10) -> None:
    """Fill the pairs of a photo set from its usable images: all ordered genuine pairs and as many
    seeded impostor pairs; folds assigned at random (for the k-fold accuracy)."""
    assert ds.usable is not None
    ids = np.asarray(ds.identities)
    good = np.flatnonzero(ds.usable)
    gen = [(a, b) for a in good for b in good if a != b and ids[a] == ids[b]]
    rng = np.random.default_rng(seed + 1)
    imp: set[tuple[int, int]] = set()
    tries = 0
    while len(imp) < len(gen) and tries < 100 * max(1, len(gen)):
        a, b = rng.choice(good, 2, replace=False)
        tries += 1
        if ids[a] != ids[b]:
            imp.add((int(a), int(b)))
    rows = [(a, b, True) for a, b in gen] + [(a, b, False) for a, b in sorted(imp)]
    ds.pair_a = np.array([r[0] for r in rows], dtype=np.int64)
    ds.pair_b = np.array([r[1] for r in rows], dtype=np.int64)
    ds.pair_same = np.array([r[2] for r in rows], dtype=bool)
    ds.pair_fold = rng.integers(0, folds, len(rows))


def load_set(name: str, assets: Path, limit: int | None = None, seed: int = 0, persons: int = 200) -> FaceSet:
    if name == "lfw":
        return load_lfw(Path(assets) / "faces" / "lfw_pairs150", limit, seed, persons=persons)
    if name in ("celeba", "celeba_wild_id50"):
        return load_celeba(Path(assets) / "faces" / "celeba_wild_id50", limit, seed)
    raise ConfigError(f"unknown evaluation set {name!r}; choose 'lfw' or 'celeba'")


# --- alignment ------------------------------------------------------------------------------------
def pick_face(faces: list[Any], hw: tuple[int, int], rule: str) -> Any:
    """The subject: ``"centre"`` (nearest the image centre, LFW) or ``"largest"``."""
    if not faces:
        return None
    if rule == "largest":
        return max(faces, key=lambda f: f.size)
    cy, cx = hw[0] / 2, hw[1] / 2
    return min(faces, key=lambda f: (0.5 * (f.box[0] + f.box[2]) - cx) ** 2 + (0.5 * (f.box[1] + f.box[3]) - cy) ** 2)


class LandmarkCache:
    """Detected landmarks of image files, keyed by the file's sha256 and the face rule (with ``@detector``
    for detectors other than dlib; ``landmarks-dlib.json`` keeps its name)."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = Path(cache_dir) / "landmarks-dlib.json"
        self.data: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                self.data = {}
        self.dirty = False

    def get(self, sha: str, rule: str) -> dict[str, Any] | None:
        return self.data.get(f"{sha}:{rule}")

    def put(self, sha: str, rule: str, entry: dict[str, Any]) -> None:
        self.data[f"{sha}:{rule}"] = entry
        self.dirty = True

    def save(self) -> None:
        if self.dirty:
            atomic_write(json.dumps(self.data).encode(), self.path)
            self.dirty = False


def _read_rgb(path: Path) -> np.ndarray:
    from ..images import open_image

    img = open_image(path).convert("RGB")
    return np.asarray(img)


def prepare(ds: FaceSet, frame_size: int, cache_dir: Path, progress: bool = True, detector: str = "centerface") -> dict[str, float]:
    """Landmarks from ``detector`` (cached) and uint8 frames (cached memmap) for every image of ``ds``.

    Returns stage timings.
    """
    import time

    from tqdm import tqdm

    from ..faces.align import extract_faces, find_faces
    from ..faces.detect import Face

    t0 = time.perf_counter()
    cache = LandmarkCache(cache_dir)
    rule = "centre" if ds.mode == "frames" else "largest"
    if detector != "dlib":  # dlib's entries keep their original keys
        from ..faces.detect import get_detector

        version = getattr(get_detector(detector), "version", None)  # a changed search must not reuse old entries
        rule = f"{rule}@{detector}" + (f":{version}" if version else "")
    shas = [_sha_bytes(ds.path(i)) for i in range(len(ds.keys))]
    lms = np.zeros((len(ds.keys), 5, 2))
    det = np.zeros(len(ds.keys), dtype=bool)
    boxes = np.full((len(ds.keys), 4), np.nan)
    todo = [i for i, s in enumerate(shas) if cache.get(s, rule) is None]
    for n, i in enumerate(tqdm(todo, desc=f"aligning {ds.name} ({detector})", unit="img", disable=not progress, mininterval=2.0)):
        rgb = _read_rgb(ds.path(i))
        face = pick_face(find_faces(rgb, detector), rgb.shape[:2], rule.split("@")[0])  # "centre" / "largest"
        entry = {"detected": face is not None, "faces": 0 if face is None else 1}
        if face is not None:
            entry["landmarks"] = np.asarray(face.landmarks).round(3).tolist()
            entry["box"] = np.asarray(face.box).round(2).tolist()
        cache.put(shas[i], rule, entry)
        if n % 500 == 499:
            cache.save()
    cache.save()
    t_detect = time.perf_counter() - t0
    for i, s in enumerate(shas):
        e = cache.get(s, rule)
        det[i] = bool(e["detected"])
        lms[i] = np.asarray(e["landmarks"]) if e["detected"] else LFW_FALLBACK_LANDMARKS
        if e["detected"]:
            boxes[i] = e["box"]
    ds.landmarks, ds.detected, ds.boxes = lms, det, boxes
    ds.usable = det.copy() if ds.mode == "photos" else np.ones(len(det), dtype=bool)
    h = hashlib.sha256(f"v1|{frame_size}|{ds.mode}".encode())
    for s, lm, d in zip(shas, lms, det):
        h.update(f"{s}|{int(d)}|".encode())
        h.update(np.ascontiguousarray(lm.round(3)).tobytes())
    ds.frames_key = h.hexdigest()[:20]
    ds.frame_size = frame_size
    path = Path(cache_dir) / "frames" / f"{ds.name}-{frame_size}-{ds.frames_key}.npy"
    t1 = time.perf_counter()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(ds.keys), 3, frame_size, frame_size))
        for i in tqdm(range(len(ds.keys)), desc=f"frames {ds.name} @{frame_size}", unit="img", disable=not progress, mininterval=2.0):
            rgb = _read_rgb(ds.path(i))
            face = Face(np.zeros(4), lms[i])
            fr, _ = extract_faces(rgb, [face], frame_size)
            out[i] = fr[0].mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
        out.flush()
        del out
        os.replace(tmp, path)
    ds.frames = np.load(path, mmap_mode="r")
    return {"detect_s": round(t_detect, 2), "detected_now": len(todo), "frames_s": round(time.perf_counter() - t1, 2)}


class EmbeddingCache:
    """Embeddings of a set's original frames (optionally attacked), per evaluator fingerprint."""

    def __init__(self, cache_dir: Path) -> None:
        self.dir = Path(cache_dir) / "emb"

    def path(self, frames_key: str, evaluator_fp: str, variant: str, subset_key: str) -> Path:
        tag = hashlib.sha256(f"{frames_key}|{evaluator_fp}|{variant}|{subset_key}".encode()).hexdigest()[:24]
        return self.dir / f"{tag}.npy"

    def load(self, path: Path) -> np.ndarray | None:
        """The cached array, or None when absent or unreadable."""
        if path.is_file():
            try:
                return np.load(path)
            except (ValueError, OSError):
                return None
        return None

    def get_or_compute(self, path: Path, compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
        arr = self.load(path)
        if arr is not None:
            return arr, True
        arr = compute()
        save_npy(arr, path)
        return arr, False


def subset_key(indices: Iterable[int]) -> str:
    arr = np.asarray(list(indices), dtype=np.int64)
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]

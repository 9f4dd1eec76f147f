"""Face recognisers as evaluators: loading, fingerprints for caching, and batched (async) embedding.

An evaluator wraps a recogniser spec (see :func:`featdeid.recognisers.load_recogniser`) and a role:
``black-box`` (never seen in training; the headline figures) or ``white-box`` (the EN used for
training; reported separately). Frames travel as uint8 ``(B, 3, S, S)`` arrays.

Recognisers that are not torch modules (dlib) can run in a worker process, so that on a 2-core
machine dlib's single-threaded ResNet runs beside the torch work instead of after it.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import multiprocessing as mp
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file (memoised by path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def spec_files(spec: str) -> list[Path]:
    """Weight files a recogniser spec depends on (for cache keys)."""
    kind, sep, arg = spec.partition(":")
    if spec.lower().endswith(".onnx") and kind not in ("onnx", "mobilefacenet", "dlib", "insightface"):
        return [Path(spec).expanduser()]
    if kind in ("onnx", "mobilefacenet") and arg:
        return [Path(arg).expanduser()]
    if kind == "dlib":
        from ..recognisers.dlib_resnet import default_model_paths

        return list(default_model_paths())
    if kind == "insightface" and arg:
        from ..recognisers.onnx import insightface_model_path

        return [insightface_model_path(arg)]
    return []


def fingerprint(spec: str) -> str:
    """A short id of a recogniser's weights and code path (changes when the weights change)."""
    kind = spec.partition(":")[0] if not spec.lower().endswith(".onnx") else "onnx"
    parts = [kind] + [file_sha256(p) for p in spec_files(spec)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def short_name(spec: str, rec: Any) -> str:
    """A readable evaluator name: ``dlib``, ``mobilefacenet``, ``fr_feature``, ``insightface:buffalo_l``."""
    kind, _, arg = spec.partition(":")
    if kind == "mobilefacenet":
        return "mobilefacenet"
    if kind == "onnx" or spec.lower().endswith(".onnx"):
        return Path(arg or spec).stem
    return getattr(rec, "name", kind) if kind != "dlib" else "dlib"


def to_float(frames_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(frames_u8)
    return t.float().div_(255.0)


def embed_u8(rec: Any, frames_u8: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Embeddings ``(B, dim)`` float32 of uint8 frames ``(B, 3, S, S)``."""
    out = []
    with torch.no_grad():
        for i in range(0, len(frames_u8), batch_size):
            out.append(rec.embed(to_float(frames_u8[i : i + batch_size])).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, rec.dim), np.float32)


# --- worker process --------------------------------------------------------------------------------
_WORKER_REC: Any = None


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """Exit this worker once ``parent`` is gone (killed parents leave ProcessPool workers behind)."""
    while True:
        time.sleep(every_s)
        if os.getppid() != parent:
            os._exit(1)


def _worker_init(spec: str, parent: int) -> None:
    global _WORKER_REC
    import threading

    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="featdeid-parent-watch").start()
    torch.set_num_threads(1)
    from ..recognisers import load_recogniser

    _WORKER_REC = load_recogniser(spec)


def _worker_embed(frames_u8: np.ndarray) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = embed_u8(_WORKER_REC, frames_u8)
    return out, time.perf_counter() - t0


class _Done:
    """A finished future."""

    def __init__(self, value: Any) -> None:
        self._value = value

    def result(self) -> Any:
        return self._value

    def done(self) -> bool:
        return True


class Evaluator:
    """A recogniser with a role, a cache fingerprint and ``submit(frames_u8) -> future``.

    Args:
        spec: recogniser spec.
        role: ``"black-box"`` or ``"white-box"``.
        workers: run the recogniser in this many separate processes (only non-torch recognisers,
            i.e. dlib; 0 = in this process).
        max_pending: batches queued per worker before ``submit`` waits for the oldest one.
    """

    def __init__(self, spec: str, role: str = "black-box", workers: int = 0, max_pending: int = 6, batch_size: int = 32) -> None:
        from ..recognisers import load_recogniser

        self.spec = spec
        self.role = role
        self.rec = load_recogniser(spec)  # in-process copy: validates the spec, gives dim / name
        self.name = short_name(spec, self.rec)
        self.dim = int(self.rec.dim)
        self.differentiable = bool(getattr(self.rec, "differentiable", False))
        self.fingerprint = fingerprint(spec)
        self.batch_size = batch_size
        self.workers = 0
        self.busy_s = 0.0  # time spent embedding (in the worker for worker evaluators)
        self.count = 0
        self._pool: cf.ProcessPoolExecutor | None = None
        self._pending: deque[cf.Future] = deque()
        self.wait_s = 0.0
        if workers > 0 and not self.differentiable:
            self.workers = int(workers)
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(spec, os.getpid()))
        self.max_pending = max_pending * max(1, self.workers)

    @property
    def in_worker(self) -> bool:
        return self._pool is not None

    def submit(self, frames_u8: np.ndarray) -> Any:
        """Embed uint8 frames ``(B, 3, S, S)``; returns an object with ``.result() -> (B, dim)``."""
        frames_u8 = np.ascontiguousarray(frames_u8)
        self.count += len(frames_u8)
        if self._pool is None:
            t0 = time.perf_counter()
            out = embed_u8(self.rec, frames_u8, self.batch_size)
            self.busy_s += time.perf_counter() - t0
            return _Done(out)
        while len(self._pending) >= self.max_pending:
            old = self._pending.popleft()
            t0 = time.perf_counter()
            old.result()
            self.wait_s += time.perf_counter() - t0
        fut = self._pool.submit(_worker_embed, frames_u8)
        self._pending.append(fut)
        return _WorkerResult(fut, self)

    def embed(self, frames_u8: np.ndarray) -> np.ndarray:
        """Synchronous embedding of a uint8 batch (chunks go through :meth:`submit`)."""
        futs = [self.submit(frames_u8[i : i + self.batch_size]) for i in range(0, len(frames_u8), self.batch_size)]
        return collect(futs, self.dim)

    def throughput(self) -> float | None:
        """Images per second of embedding time (per process for worker evaluators)."""
        return round(self.count / self.busy_s, 2) if self.busy_s > 0 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec, "role": self.role, "dim": self.dim, "fingerprint": self.fingerprint, "worker_processes": self.workers}


class _WorkerResult:
    def __init__(self, fut: cf.Future, owner: Evaluator) -> None:
        self._fut = fut
        self._owner = owner
        self._value: np.ndarray | None = None

    def result(self) -> np.ndarray:
        if self._value is None:
            t0 = time.perf_counter()
            out, busy = self._fut.result()
            self._owner.wait_s += time.perf_counter() - t0
            self._owner.busy_s += busy
            self._value = out
        return self._value


def collect(futures: list[Any], dim: int) -> np.ndarray:
    """Concatenate the results of ``submit`` calls."""
    parts = [f.result() for f in futures]
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)

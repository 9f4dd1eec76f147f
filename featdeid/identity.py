"""Choosing fake identities from the model's identity bank, deterministically."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .errors import ConfigError


def content_seed(arr: np.ndarray) -> int:
    """A seed derived from pixel content: the same photo gives the same seed, different photos differ."""
    h = hashlib.sha256()
    h.update(str((arr.shape, arr.dtype.str)).encode())
    h.update(np.ascontiguousarray(arr).data)
    return int.from_bytes(h.digest()[:8], "little")


def choose(bank_size: int, n: int, seed: int) -> np.ndarray:
    """``n`` bank indices for ``n`` faces: distinct while ``n <= bank_size``, deterministic in ``seed``.

    Face ``i`` always gets the same index for a given seed, however many faces follow it.
    """
    if bank_size <= 0:
        raise ConfigError("the model has an empty identity bank; pass identity= (a feature) explicitly")
    rng = np.random.default_rng(np.uint64(seed % 2**64))
    reps = -(-n // bank_size) if n else 0
    return np.concatenate([rng.permutation(bank_size) for _ in range(reps)])[:n] if n else np.zeros(0, int)


def as_feature(identity: object, dim: int) -> torch.Tensor:
    """A user-given identity feature as a unit ``(dim,)`` tensor."""
    t = torch.as_tensor(np.asarray(identity, dtype=np.float32)).flatten()
    if t.numel() != dim or not torch.isfinite(t).all() or t.norm() == 0:
        raise ConfigError(f"identity feature must be a finite non-zero vector of {dim} numbers, got {t.numel()}")
    return t / t.norm()


def identity_feature(image: object, recogniser: object, detector: str = "auto", size: int = 256) -> torch.Tensor:
    """Your own fake identity: the unit feature ``(D,)`` of the largest face in ``image``.

    ``recogniser`` is a recogniser object or spec (see :func:`featdeid.recognisers.load_recogniser`);
    use the one that built the model's identity bank (its config names it). Pass the result as
    ``deidentify(..., identity=feature)``.
    """
    from .errors import InvalidImageError
    from .faces.align import align
    from .recognisers import load_recogniser

    rec = load_recogniser(recogniser) if isinstance(recogniser, str) else recogniser
    frames, faces = align(image, size=size, detector=detector, largest=True)
    if not faces:
        raise InvalidImageError("no face found in the identity image")
    with torch.inference_mode():
        return rec.embed(frames)[0].float()

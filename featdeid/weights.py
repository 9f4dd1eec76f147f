"""Safe weight files: safetensors only, with clear errors for pickles and tampered files."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import UnsafeWeightsError

_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # raw pickle protocol 2+, torch zip archive


def load_safetensors(path: str | Path, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Load a safetensors file, refusing anything else (pickles are never unpickled).

    With ``check_finite`` (default) a file holding NaN or infinite floats is refused too: such weights
    would turn every de-identified face into garbage without an error.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except IsADirectoryError as e:
        raise UnsafeWeightsError(f"{path} is a folder, not a safetensors file") from e
    if any(head.startswith(m) for m in _PICKLE_MAGIC):
        raise UnsafeWeightsError(f"{path} is a pickle / torch.save archive; featdeid loads safetensors only")
    if len(head) < 8:
        raise UnsafeWeightsError(f"{path} is truncated ({len(head)} bytes); not a safetensors file")
    header_len = int.from_bytes(head, "little")
    size = path.stat().st_size
    if header_len <= 0 or header_len > min(size - 8, 100_000_000):
        raise UnsafeWeightsError(f"{path} is not a valid safetensors file (bad header length)")
    try:
        state = load_file(str(path))
    except (SafetensorError, ValueError, RuntimeError, OSError, OverflowError) as e:
        raise UnsafeWeightsError(f"{path} is not a valid safetensors file: {e}") from e
    if check_finite:
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise UnsafeWeightsError(f"{path} holds non-finite values (NaN or infinity) in {', '.join(sorted(bad)[:5])}")
    return state


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (:func:`featdeid.images.atomic_write`: temporary file + rename,
    ordinary ``0o666 & ~umask`` permissions)."""
    from .images import atomic_write

    atomic_write(save({k: v.contiguous() for k, v in state.items()}, metadata=metadata), path)


def state_sha256(state: Mapping[str, torch.Tensor], salt: bytes = b"") -> str:
    """SHA-256 (hex) of ``salt``, then each key and its tensor's bytes in sorted key order."""
    h = hashlib.sha256(salt)
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

"""Image-quality metrics between a cover C and its de-identified version D (paper, section 4.3).

All functions take batches of frames ``(B, 3, H, W)``: uint8 tensors (0..255) or float tensors in
[0, 1], and return one value per image (``(B,)`` float64 numpy arrays); the protocol averages them.

- PSNR: ``10 log10(peak^2 / MSE)`` over all pixels and channels of an image, peak 255 on the
  8-bit scale (float inputs are scaled by 255). Identical images give ``inf``.
- SSIM: scikit-image ``structural_similarity`` with the settings of Wang et al. (2004):
  Gaussian window sigma 1.5, population covariance, K1 = 0.01, K2 = 0.03, on the 8-bit scale,
  averaged over the three RGB channels.
- LPIPS: ``lpips.LPIPS(net='alex')`` v0.1 (Zhang et al., 2018; the paper's AlexNet variant) on
  inputs scaled to [-1, 1]. Weights come from an explicit local folder (the assets'
  ``weights/imagenet_alexnet``: ``alexnet_features.safetensors`` + ``lpips_v0.1_alex_lin.safetensors``),
  so nothing is downloaded; without a folder the ``lpips`` package loads its own heads and
  torchvision downloads the AlexNet backbone.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, ModelNotFoundError

ALEXNET_FILE = "alexnet_features.safetensors"
ALEX_LIN_FILE = "lpips_v0.1_alex_lin.safetensors"
# torchvision alexnet().features index -> LPIPS slice (relu1 .. relu5 outputs)
_ALEX_SLICES = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}


def _as_255(x: torch.Tensor) -> torch.Tensor:
    """float64 copy on the 8-bit scale."""
    if x.dtype == torch.uint8:
        return x.double()
    return x.double() * 255.0


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4 or a.shape[1] != 3:
        raise ConfigError(f"need two (B, 3, H, W) batches of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def mse(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-image mean squared error on the 8-bit scale, ``(B,)``."""
    _check_pair(a, b)
    return ((_as_255(a) - _as_255(b)) ** 2).flatten(1).mean(1).numpy()


def psnr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-image PSNR in dB (peak 255), ``(B,)``; ``inf`` where the images are identical."""
    m = mse(a, b)
    with np.errstate(divide="ignore"):
        return np.where(m > 0, 10.0 * np.log10(255.0**2 / np.maximum(m, 1e-300)), np.inf)


def mean_psnr(values: np.ndarray) -> float:
    """Mean of per-image PSNRs; ``inf`` values (identical images) are left out unless all are ``inf``."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if len(v) and not len(finite):
        return float("inf")
    return float(finite.mean()) if len(finite) else float("nan")


def ssim(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-image SSIM (Gaussian window, sigma 1.5, 8-bit scale), ``(B,)``."""
    from skimage.metrics import structural_similarity

    _check_pair(a, b)
    x = _as_255(a).permute(0, 2, 3, 1).numpy()
    y = _as_255(b).permute(0, 2, 3, 1).numpy()
    out = np.empty(len(x))
    for i in range(len(x)):
        out[i] = structural_similarity(
            x[i], y[i], channel_axis=2, data_range=255.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
    return out


def default_lpips_weights() -> Path | None:
    """``$FEATDEID_ASSETS/weights/imagenet_alexnet`` when it holds both files, else None."""
    root = os.environ.get("FEATDEID_ASSETS")
    if not root:
        return None
    folder = Path(root) / "weights" / "imagenet_alexnet"
    return folder if (folder / ALEXNET_FILE).is_file() and (folder / ALEX_LIN_FILE).is_file() else None


class LPIPSAlex:
    """LPIPS (AlexNet, v0.1 linear heads), frozen, CPU or any device.

    Args:
        weights: folder holding ``alexnet_features.safetensors`` and
            ``lpips_v0.1_alex_lin.safetensors`` (no download); None: the ``lpips`` package's own
            heads and torchvision's AlexNet download (users' machines).
        batch_size: images per forward pass.
    """

    def __init__(self, weights: str | os.PathLike[str] | None = None, batch_size: int = 32, device: str = "cpu") -> None:
        try:
            import lpips
        except ImportError as e:
            from ..errors import BackendUnavailableError

            raise BackendUnavailableError("LPIPS needs the 'lpips' package: pip install 'featdeid[eval]'") from e
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if weights is None:
                model = lpips.LPIPS(net="alex", verbose=False)
                self.source = "lpips package heads + torchvision AlexNet download"
            else:
                model = lpips.LPIPS(pretrained=False, net="alex", pnet_rand=True, verbose=False)
                model.load_state_dict(_local_state(model, Path(weights)), strict=True)
                self.source = str(Path(weights))
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model.eval().to(self.device)

    @torch.inference_mode()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        """Per-image LPIPS distance, ``(B,)``; 0 for identical images."""
        _check_pair(a, b)
        out = []
        for i in range(0, len(a), self.batch_size):
            x = _as_255(a[i : i + self.batch_size]).float().div_(127.5).sub_(1.0).to(self.device)
            y = _as_255(b[i : i + self.batch_size]).float().div_(127.5).sub_(1.0).to(self.device)
            out.append(self.model(x, y).flatten().double().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)


def _local_state(model: torch.nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    from ..weights import load_safetensors

    backbone, lin = folder / ALEXNET_FILE, folder / ALEX_LIN_FILE
    for path in (backbone, lin):
        if not path.is_file():
            raise ModelNotFoundError(f"LPIPS weights not found: {path}")
    state = dict(model.state_dict())
    for key, value in load_safetensors(backbone).items():
        _, idx, leaf = key.split(".")  # features.<idx>.<weight|bias>
        if int(idx) not in _ALEX_SLICES:
            raise ConfigError(f"{backbone}: unexpected key {key}")
        state[f"net.slice{_ALEX_SLICES[int(idx)]}.{idx}.{leaf}"] = value.float()
    for key, value in load_safetensors(lin).items():  # lin{k}.model.1.weight (also reachable as lins.{k})
        state[key] = value.float()
        state[key.replace("lin", "lins.", 1)] = value.float()
    return state

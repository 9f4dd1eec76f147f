"""De-identification methods under test, all on aligned canonical frames.

Every method maps covers ``C`` ``(B, 3, S, S)`` float in [0, 1] (plus one key per image, used for
per-image seeds) to outputs ``D`` of the same shape, and changes pixels only through the
canonical face mask (:func:`featdeid.faces.paste.apply_mask` semantics: ``D = C + mask (X - C)``),
which is exactly what paste-back writes into a photo. The protocol quantises D to 8 bits.

Method specs (``parse_method``):

====================  ============================================================================
``featdeid@S``        the hiding network at strength S (default: the model's), identity from the
                      model's bank with a per-image seed: ``C + S mask (HN(C, e) - C)``
``blur@SIGMA``        Gaussian blur, sigma in pixels of a 256-pixel frame (scaled with the frame)
``pixelate@B``        block averages, block size in pixels of a 256-pixel frame
``mask``              solid mid-grey fill of the face mask (``mask@V``: grey level V in [0, 1])
``adv@EPSxSTEPS``     MIM (momentum iterative FGSM, Dong et al. 2018) against one recogniser: pushes
                      ``cos(f(C), f(D))`` down under an L-inf budget of EPS / 255, STEPS steps of
                      EPS / STEPS / 255, momentum 1.0 (white-box against that recogniser)
``identity``          D = C (sanity check: ASR equals the originals' ASR)
``shuffle``           D = the frame of another person (sanity check: ASR near 1)
====================  ============================================================================
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import ConfigError
from ..faces.paste import apply_mask, face_mask
from ..weights import state_sha256
from .attacks import gaussian_blur_float

REFERENCE_FRAME = 256


def stable_seed(seed: int, key: str) -> int:
    """A 63-bit seed from a global seed and an image key (the same on every machine and run)."""
    h = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


class Method:
    """Base class: ``name`` (the spec), ``family`` and ``param`` (for curves), ``label`` (for tables)."""

    name: str = "method"
    family: str = "method"
    param: float | None = None
    label: str = "method"
    needs_grad: bool = False

    def bind(self, context: Any) -> None:
        """Called once by the protocol before use (gives access to the evaluation set)."""

    def apply(self, covers: torch.Tensor, keys: list[str]) -> torch.Tensor:
        """``D`` for covers ``(B, 3, S, S)`` in [0, 1]."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "param": self.param, "label": self.label}


class IdentityMethod(Method):
    name = family = "identity"
    label = "identity (D = C)"

    def apply(self, covers: torch.Tensor, keys: list[str]) -> torch.Tensor:
        return covers.clone()


class ShuffleMethod(Method):
    """Replaces each face by the frame of another person (a sanity check, not a de-identifier)."""

    name = family = "shuffle"
    label = "shuffled identity"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._partner: Callable[[list[str], int], torch.Tensor] | None = None

    def bind(self, context: Any) -> None:
        self._partner = context.other_identity_frames

    def apply(self, covers: torch.Tensor, keys: list[str]) -> torch.Tensor:
        if self._partner is None:
            raise ConfigError("the shuffle method needs an evaluation set (bind) to draw other faces from")
        other = self._partner(keys, self.seed).to(covers)
        if other.shape[-1] != covers.shape[-1]:
            other = F.interpolate(other, size=covers.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
        return other


def _scaled(value: float, size: int) -> float:
    return value * size / REFERENCE_FRAME


class BlurMethod(Method):
    family = "blur"

    def __init__(self, sigma: float) -> None:
        if not sigma > 0:
            raise ConfigError(f"blur sigma must be > 0, got {sigma}")
        self.param = float(sigma)
        self.name = f"blur@{sigma:g}"
        self.label = f"Gaussian blur σ={sigma:g}"

    def apply(self, covers: torch.Tensor, keys: list[str]) -> torch.Tensor:
        blurred = gaussian_blur_float(covers, _scaled(self.param, covers.shape[-1]))
        return apply_mask(covers, blurred).clamp(0, 1)


class PixelateMethod(Method):
    family = "pixelate"

    def __init__(self, block: float) -> None:
        if not block >= 1:
            raise ConfigError(f"pixelate block must be >= 1, got {block}")
        self.param = float(block)
        self.name = f"pixelate@{block:g}"
        self.label = f"Pixelate {block:g} px"

    def apply(self, covers: torch.Tensor, keys: list[str]) -> torch.Tensor:
        size = covers.shape[-1]
        cells = max(1, round(size / _scaled(self.param, size)))
        small = F.adaptive_avg_pool2d(covers, cells)
        big = F.interpolate(small, size=covers.shape[-2:], mode="nearest")
        return apply_mask(covers, big).clamp(0, 1)


class SolidMaskMethod(Method):
    family = "mask"

    def __init__(self, level: float = 0.5) -> None:
        if not 0 <= level <= 1:
            raise ConfigError(f"mask grey level must be in [0, 1], got {level}")
        self.param = float(level)
        self.name = "mask" if level == 0.5 else f"mask@{level:g}"
        self.label = "Solid mask" if level == 0.5 else f"Solid mask (grey {level:g})"

    def apply(self, covers: torch.Tensor, keys: list[str]) -> torch.Tensor:
        return apply_mask(covers, torch.full_like(covers, self.param)).clamp(0, 1)


class AdversarialMethod(Method):
    """MIM (momentum iterative FGSM) against a differentiable recogniser, inside the face mask.

    Minimises ``cos(f(C), f(C + mask * delta))`` with ``|delta|_inf <= eps / 255``; each step
    ``g = mu g + grad / mean|grad|``, ``delta -= alpha sign(g)``, clipped to the budget and to
    valid pixels. ``alpha`` defaults to ``eps / steps`` (MI-FGSM). ``delta`` starts at seeded
    uniform noise in ``[-alpha, alpha]`` (per image, from its key): at ``delta = 0`` the
    gradient of ``cos(f(C), f(C + delta))`` is exactly zero (a maximum), so a zero start never moves.
    """

    family = "adv"
    needs_grad = True

    def __init__(
        self,
        eps: float,
        steps: int = 50,
        recogniser: Any = None,
        alpha: float | None = None,
        momentum: float = 1.0,
        batch_size: int = 16,
        target_name: str = "",
    ) -> None:
        if not eps > 0 or steps < 1:
            raise ConfigError(f"adv needs eps > 0 and steps >= 1, got {eps}, {steps}")
        self.eps = float(eps)
        self.steps = int(steps)
        self.alpha = float(alpha) if alpha else self.eps / self.steps
        self.momentum = float(momentum)
        self.batch_size = int(batch_size)
        self.recogniser = recogniser
        self.target_name = target_name or getattr(recogniser, "name", "")
        self.param = self.eps
        self.name = f"adv@{eps:g}x{steps}"
        self.label = f"MIM ε={eps:g}/255, {steps} steps"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "target": self.target_name, "alpha_255": self.alpha, "momentum": self.momentum}

    def apply(self, covers: torch.Tensor, keys: list[str]) -> torch.Tensor:
        if self.recogniser is None or not getattr(self.recogniser, "differentiable", False):
            raise ConfigError("the adversarial baseline needs a differentiable recogniser (onnx:, mobilefacenet:, insightface:)")
        bs = self.batch_size
        out = [self._batch(covers[i : i + bs], keys[i : i + bs]) for i in range(0, len(covers), bs)]
        return torch.cat(out)

    def _batch(self, covers: torch.Tensor, keys: list[str]) -> torch.Tensor:
        eps, alpha = self.eps / 255.0, min(self.alpha, self.eps) / 255.0
        mask = face_mask(covers.shape[-1]).to(covers)
        covers = covers.detach().float()
        start = []
        for k in keys:
            gen = torch.Generator().manual_seed(stable_seed(0, f"adv:{k}"))
            start.append(torch.rand(covers.shape[1:], generator=gen) * 2 - 1)
        with torch.enable_grad():
            with torch.no_grad():
                target = self.recogniser.embed(covers).detach()
            delta = torch.stack(start).to(covers) * alpha
            g = torch.zeros_like(covers)
            for _ in range(self.steps):
                delta.requires_grad_(True)
                x = (covers + mask * delta).clamp(0, 1)
                loss = F.cosine_similarity(self.recogniser.embed(x), target, dim=1).sum()
                (grad,) = torch.autograd.grad(loss, delta)
                g = self.momentum * g + grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
                delta = (delta.detach() - alpha * g.sign()).clamp(-eps, eps)
        return (covers + mask * delta).clamp(0, 1).detach()


class FeatdeidMethod(Method):
    """The hiding network through :meth:`featdeid.Deidentifier.hide` on the protocol's frames.

    Frames of another size than the model's are resized to the model's size for the network, and
    the residual ``HN(C) - C`` is resized back and added at the frame's resolution (as paste-back
    does for large faces).
    """

    family = "featdeid"

    def __init__(self, deidentifier: Any, strength: float | None = None, seed: int = 0) -> None:
        self.deid = deidentifier
        self.strength = float(deidentifier.default_strength if strength is None else strength)
        if not math.isfinite(self.strength) or self.strength < 0:
            raise ConfigError(f"strength must be a finite number >= 0, got {self.strength}")
        self.seed = int(seed)
        self.param = self.strength
        self.name = f"featdeid@{self.strength:g}"
        self.label = f"featdeid s={self.strength:g}"

    def identity_index(self, key: str) -> int:
        from ..identity import choose

        bank = self.deid.model.identity_bank
        return int(choose(bank.shape[0], 1, stable_seed(self.seed, key))[0])

    def features(self, keys: list[str]) -> torch.Tensor:
        bank = self.deid.model.identity_bank
        idx = torch.as_tensor([self.identity_index(k) for k in keys], dtype=torch.long)
        return bank[idx].float()

    def residual(self, covers: torch.Tensor, keys: list[str]) -> torch.Tensor:
        s = self.deid.model.image_size
        size = covers.shape[-1]
        small = covers if size == s else F.interpolate(covers, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        res = self.deid.hide(small, self.features(keys))
        if size != s:
            res = F.interpolate(res, size=(size, size), mode="bilinear", antialias=size < s, align_corners=False)
        return res

    def apply(self, covers: torch.Tensor, keys: list[str]) -> torch.Tensor:
        if self.strength == 0:
            return covers.clone()
        return apply_mask(covers, covers + self.strength * self.residual(covers, keys)).clamp(0, 1)

    def apply_photo(self, rgb: np.ndarray, key: str) -> np.ndarray:
        """Full-photo path: :meth:`Deidentifier.__call__` (detect, align, hide, paste back)."""
        return self.deid(rgb, strength=self.strength, seed=stable_seed(self.seed, key))

    def model_fingerprint(self) -> str:
        """:func:`model_fingerprint` of the model (for resume keys and reports)."""
        if not hasattr(self, "_fp"):
            self._fp = model_fingerprint(self.deid.model)
        return self._fp

    def describe(self) -> dict[str, Any]:
        cfg = self.deid.model.config
        return {
            **super().describe(),
            "strength": self.strength,
            "seed": self.seed,
            "model_image_size": cfg.image_size,
            "bank": int(self.deid.model.identity_bank.shape[0]),
            "model_fingerprint": self.model_fingerprint(),
        }


# ModelConfig fields added after the first measured models
LATER_FIELDS = ("adaptive_strength", "chroma")


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (16 hex) of what decides a hiding network's output: its weights, identity bank and the
    config fields that change the residual (``flip_average``, ``sharpen``...; not ``default_strength``,
    which a method names itself). Fields added after models were measured (:data:`LATER_FIELDS`) count
    only when not at their defaults, so those models keep their fingerprint."""
    defaults = ModelConfig().to_dict()
    config = {k: v for k, v in model.config.to_dict().items()
              if k != "default_strength" and not (k in LATER_FIELDS and v == defaults[k])}
    return state_sha256(model.state_dict(), salt=json.dumps(config, sort_keys=True).encode())[:16]


def parse_method(
    spec: str,
    *,
    deidentifier: Callable[[], Any] | None = None,
    adv_recogniser: Callable[[], Any] | None = None,
    adv_target_name: str = "",
    seed: int = 0,
    adv_alpha: float | None = None,
    adv_momentum: float = 1.0,
    batch_size: int = 16,
) -> Method:
    """Build a :class:`Method` from its spec (see the module docstring).

    ``deidentifier`` and ``adv_recogniser`` are called lazily (only when a spec needs them).
    """
    spec = spec.strip()
    kind, _, arg = spec.partition("@")
    kind = kind.lower()

    def number(text: str, what: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{spec!r}: {what} must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"{spec!r}: {what} must be finite")
        return value

    if kind == "featdeid":
        if deidentifier is None:
            raise ConfigError("featdeid methods need a model (--model)")
        return FeatdeidMethod(deidentifier(), number(arg, "strength") if arg else None, seed=seed)
    if kind == "blur":
        return BlurMethod(number(arg or "4", "sigma"))
    if kind in ("pixelate", "pixel"):
        return PixelateMethod(number(arg or "8", "block"))
    if kind == "mask":
        return SolidMaskMethod(number(arg, "grey level") if arg else 0.5)
    if kind in ("adv", "mim"):
        eps_text, _, steps_text = (arg or "8").lower().partition("x")
        eps = number(eps_text, "epsilon")
        steps = int(number(steps_text, "steps")) if steps_text else 50
        if adv_recogniser is None:
            raise ConfigError("the adversarial baseline needs a target recogniser")
        return AdversarialMethod(eps, steps, adv_recogniser(), alpha=adv_alpha, momentum=adv_momentum, batch_size=batch_size, target_name=adv_target_name)
    if kind == "identity" and not arg:
        return IdentityMethod()
    if kind == "shuffle" and not arg:
        return ShuffleMethod(seed)
    raise ConfigError(
        f"unknown method {spec!r}; use featdeid@S, blur@SIGMA, pixelate@BLOCK, mask, adv@EPSxSTEPS, identity or shuffle"
    )

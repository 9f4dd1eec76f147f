"""The paper's five training losses (section 3.2) and their weighted total.

Every loss returns one value per sample, shape ``(B,)``, so validation can gather per-sample
values across processes; training takes the batch mean.

- ``rec``   reconstruction: pixel difference of C and D. The paper's formula was lost in our copy
  of the text; we use the mean squared error (``rec_norm: l2``, default) or the mean absolute error
  (``rec_norm: l1``).
- ``perc``  perceptual (Johnson et al.): mean squared difference of the final conv-layer features
  (after its ReLU) of an ImageNet VGG. The paper uses VGG-19; only VGG-16 weights exist offline, so
  VGG-16 (relu5_3) stands in by default (``perceptual_backbone: vgg19`` restores the paper's).
- ``lpips`` LPIPS with the VGG-16 backbone and the official v0.1 linear heads (the ``lpips``
  package's ``LPIPS`` class, weights loaded from explicit files, so nothing is downloaded).
- ``near``  ``1 - cos(f(E), f(D))``.
- ``far``   ``cos(f(C), f(D))`` (``far_mode: cos``, default: the paper's "decrease the cosine
  similarity"), ``max(cos(f(C), f(D)), 0)`` (``far_mode: relu``: stop once D is orthogonal to C) or,
  ours, the cosine on the half of the batch where it is highest, scaled so its batch mean is their
  mean, and 0 on the rest (``far_mode: hard``: the faces still recognised, which are what ASR counts).
- ``budget`` ours: a quality budget instead of a trade-off, ``max(mse / m0 - 1, 0)`` with
  ``m0 = 10 ** (-budget_psnr / 10)``: free while D stays within ``budget_psnr`` dB of C, steep beyond.
  Trains the network at its operating point (strength 1 = the PSNR budget) rather than at a residual
  size that must later be scaled down, which moves it off what it learned.
- ``mid``   ours, for transfer: the cosine similarity of EN's intermediate feature maps of C and D
  (the layers named in ``mid_layers``, averaged), both seen through the same random transfer view.
  Mid-level features are shared far more across networks than final embeddings are, so pushing D
  away from C there moves it in unseen recognisers too (the idea of ILA, FDA and LTP/BIA).

When the perceptual backbone is VGG-16 with the same weights as LPIPS, one VGG pass serves both:
LPIPS's input scaling on [-1, 1] is exactly torchvision's ImageNet normalisation on [0, 1], and its
relu5_3 output is the perceptual feature.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featdeid.errors import ConfigError
from featdeid.weights import load_safetensors

from .vgg import VGGFeatures, load_vgg_state

LOSS_NAMES: tuple[str, ...] = ("rec", "perc", "lpips", "near", "far", "mid", "budget")
_LPIPS_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


def check_weights(weights: Mapping[str, Any]) -> dict[str, float]:
    """Validate loss weights: names must be in :data:`LOSS_NAMES`; missing names weigh 0."""
    if not isinstance(weights, Mapping):
        raise ConfigError(f"loss weights must be a mapping of {', '.join(LOSS_NAMES)} to numbers")
    unknown = sorted(set(weights) - set(LOSS_NAMES))
    if unknown:
        raise ConfigError(f"unknown loss weight(s) {', '.join(map(repr, unknown))}; valid names: {', '.join(LOSS_NAMES)}")
    out = {}
    for name in LOSS_NAMES:
        value = weights.get(name, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"loss weight {name!r} must be a number >= 0, got {value!r}")
        out[name] = float(value)
    if not any(out.values()):
        raise ConfigError("all loss weights are 0: nothing to train")
    return out


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights (the paper's five lambdas) and how each loss is computed."""

    weights: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"rec": 1.0, "perc": 1.0, "lpips": 1.0, "near": 0.125, "far": 0.125}
    )
    rec_norm: str = "l2"
    far_mode: str = "cos"
    perceptual_backbone: str = "vgg16"
    perceptual_weights: str | None = None
    lpips_backbone_weights: str | None = None
    lpips_lin_weights: str | None = None
    mid_layers: tuple[str, ...] = ()
    budget_psnr: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", check_weights(self.weights))
        object.__setattr__(self, "mid_layers", tuple(str(n) for n in self.mid_layers))
        if not 10.0 <= float(self.budget_psnr) <= 60.0:
            raise ConfigError(f"budget_psnr must be in [10, 60] dB, got {self.budget_psnr!r}")
        if self.weights["mid"] and not self.mid_layers:
            raise ConfigError("loss weight 'mid' needs mid_layers: names of EN submodules (e.g. net.Add_32)")
        if self.rec_norm not in ("l1", "l2"):
            raise ConfigError(f"rec_norm must be 'l1' or 'l2', got {self.rec_norm!r}")
        if self.far_mode not in ("cos", "relu", "hard"):
            raise ConfigError(f"far_mode must be 'cos', 'relu' or 'hard', got {self.far_mode!r}")
        if (self.lpips_backbone_weights is None) != (self.lpips_lin_weights is None):
            raise ConfigError("give both lpips_backbone_weights and lpips_lin_weights, or neither (download)")


def reconstruction_loss(cover: torch.Tensor, deid: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """Per-sample pixel loss of ``(B, 3, S, S)`` images: mean squared (``l2``) or absolute (``l1``) error."""
    diff = deid.float() - cover.float()
    per_pixel = diff.square() if norm == "l2" else diff.abs()
    return per_pixel.flatten(1).mean(1)


def perceptual_loss(cover_feat: torch.Tensor, deid_feat: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared difference of VGG feature maps ``(B, C, h, w)``."""
    return (deid_feat.float() - cover_feat.float()).square().flatten(1).mean(1)


def near_loss(embed_feat: torch.Tensor, deid_feat: torch.Tensor) -> torch.Tensor:
    """``1 - cos(f(E), f(D))`` per sample; features ``(B, D)``."""
    return 1.0 - F.cosine_similarity(embed_feat.float(), deid_feat.float(), dim=1)


def far_loss(cover_feat: torch.Tensor, deid_feat: torch.Tensor, mode: str = "cos") -> torch.Tensor:
    """``cos(f(C), f(D))`` (``mode='cos'``), ``max(cos, 0)`` (``'relu'``) or, per sample, ``B / k · cos``
    on the ``k = ceil(B / 2)`` highest cosines of the batch and 0 elsewhere (``'hard'``; its batch mean
    is the mean of the worst half)."""
    cos = F.cosine_similarity(cover_feat.float(), deid_feat.float(), dim=1)
    if mode == "relu":
        return cos.clamp_min(0.0)
    if mode == "hard":
        k = -(-cos.shape[0] // 2)
        keep = torch.zeros_like(cos).scatter(0, cos.detach().topk(k).indices, 1.0)
        return cos * keep * (cos.shape[0] / k)
    return cos


def budget_loss(cover: torch.Tensor, deid: torch.Tensor, psnr: float) -> torch.Tensor:
    """Per-sample ``max(mse / m0 - 1, 0)``, ``m0 = 10 ** (-psnr / 10)``: zero within the PSNR budget."""
    m0 = 10.0 ** (-psnr / 10.0)
    return (reconstruction_loss(cover, deid, "l2") / m0 - 1.0).clamp_min(0.0)


def mid_loss(cover_maps: list[torch.Tensor], deid_maps: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the per-sample cosine similarity of flattened feature maps ``(B, C, h, w)``."""
    cos = [F.cosine_similarity(c.float().flatten(1), d.float().flatten(1), dim=1) for c, d in zip(cover_maps, deid_maps)]
    return torch.stack(cos).mean(0)


class LayerTap:
    """Collects the outputs of named submodules (``dict(module.named_modules())`` keys) in call order."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]) -> None:
        modules = dict(module.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            near = [m for n in missing for m in modules if m.endswith("." + n)]
            hint = f"did you mean {', '.join(near)}?" if near else f"its submodules are named like {', '.join(list(modules)[1:6])}"
            raise ConfigError(f"mid_layers {missing} not found in the recogniser; {hint}")
        self.modules = [modules[n] for n in names]

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        out: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: out.append(o)) for m in self.modules]
        try:
            yield out
        finally:
            for h in hooks:
                h.remove()


def build_lpips(backbone_weights: str | Path | None = None, lin_weights: str | Path | None = None) -> nn.Module:
    """A frozen ``lpips.LPIPS(net='vgg')``.

    With both files given (the assets' ``vgg16_features*.safetensors`` and
    ``lpips_v0.1_vgg_lin.safetensors``) nothing is downloaded: the network is built with random
    weights (``pnet_rand=True``) and the state dicts are loaded. With neither, the ``lpips`` package
    loads its own heads and torchvision downloads the backbone (users' machines).
    """
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if backbone_weights is None and lin_weights is None:
            model = lpips.LPIPS(net="vgg", verbose=False)
        else:
            model = lpips.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False)
            state = dict(model.state_dict())
            for key, value in load_vgg_state("vgg16", backbone_weights).items():
                _, idx, leaf = key.split(".")
                k = next(n for n, (lo, hi) in enumerate(_LPIPS_SLICES, 1) if lo <= int(idx) < hi)
                state[f"net.slice{k}.{idx}.{leaf}"] = value
            lin_path = Path(lin_weights)  # type: ignore[arg-type]
            if not lin_path.is_file():
                raise ConfigError(f"LPIPS head weights not found: {lin_path}")
            for key, value in load_safetensors(lin_path).items():
                state[key] = value.float()
            model.load_state_dict(state, strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def lpips_from_features(model: nn.Module, feats0: list[torch.Tensor], feats1: list[torch.Tensor]) -> torch.Tensor:
    """LPIPS per sample ``(B,)`` from the five VGG relu outputs of both images (as ``LPIPS.forward``)."""
    import lpips

    total = 0.0
    for k, (a, b) in enumerate(zip(feats0, feats1)):
        diff = (lpips.normalize_tensor(a.float()) - lpips.normalize_tensor(b.float())).square()
        total = total + lpips.spatial_average(model.lins[k](diff), keepdim=False)
    return total.flatten()


def lpips_features(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The five VGG-16 relu outputs LPIPS compares, for images ``(B, 3, H, W)`` in [0, 1]."""
    return list(model.net(model.scaling_layer(images * 2.0 - 1.0)))


class DeidLoss(nn.Module):
    """The weighted total ``sum(lambda_k * L_k)`` over :data:`LOSS_NAMES`.

    ``recogniser`` is the frozen EN (``embed(frames) -> (B, D)``, differentiable); ``en_view`` is an
    optional differentiable transform applied to D before EN (transfer augmentation).
    """

    def __init__(self, config: LossConfig, recogniser: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.weights = dict(config.weights)
        w = self.weights
        self.recogniser = recogniser
        if (w["near"] or w["far"] or w["mid"]) and recogniser is None:
            raise ConfigError("near/far/mid losses need a recogniser (EN)")
        self.tap = LayerTap(recogniser, config.mid_layers) if config.mid_layers and recogniser is not None else None
        self.lpips = build_lpips(config.lpips_backbone_weights, config.lpips_lin_weights)
        self.shared_vgg = config.perceptual_backbone == "vgg16" and config.perceptual_weights == config.lpips_backbone_weights
        self.vgg = None if self.shared_vgg else VGGFeatures(config.perceptual_backbone, config.perceptual_weights)

    def train(self, mode: bool = True) -> DeidLoss:
        """The loss networks stay in eval mode."""
        return super().train(False)

    def forward(
        self,
        cover: torch.Tensor,
        deid: torch.Tensor,
        embed_feat: torch.Tensor,
        en_view: Any = None,
        terms: tuple[str, ...] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses.

        Args:
            cover: C ``(B, 3, S, S)`` in [0, 1].
            deid: D ``(B, 3, S, S)``.
            embed_feat: ``f(E)`` ``(B, D)``.
            en_view: callable ``(B, C, S, S) -> (B, C, S, S)`` applied to D (and, for ``mid``, to D and C
                stacked as 6 channels) before EN, or None.
            terms: which losses to compute (default: those with a non-zero weight).
        Returns:
            ``{name: (B,)}`` for the computed terms, plus ``"total"`` (weighted sum over them).
        """
        terms = tuple(n for n in LOSS_NAMES if self.weights[n] > 0) if terms is None else terms
        if self.tap is None:
            terms = tuple(n for n in terms if n != "mid")
        out: dict[str, torch.Tensor] = {}
        if "rec" in terms:
            out["rec"] = reconstruction_loss(cover, deid, self.config.rec_norm)
        if "budget" in terms:
            out["budget"] = budget_loss(cover, deid, self.config.budget_psnr)
        if "perc" in terms or "lpips" in terms:
            with torch.no_grad():
                fc = lpips_features(self.lpips, cover) if ("lpips" in terms or self.shared_vgg) else []
            fd = lpips_features(self.lpips, deid) if ("lpips" in terms or self.shared_vgg) else []
            if "lpips" in terms:
                out["lpips"] = lpips_from_features(self.lpips, fc, fd)
            if "perc" in terms:
                if self.shared_vgg:
                    out["perc"] = perceptual_loss(fc[-1], fd[-1])
                else:
                    assert self.vgg is not None
                    with torch.no_grad():
                        vc = self.vgg(cover)
                    out["perc"] = perceptual_loss(vc, self.vgg(deid))
        if "near" in terms or "far" in terms or "mid" in terms:
            assert self.recogniser is not None
            f_c = None
            if "mid" in terms:
                assert self.tap is not None
                both = torch.cat([deid, cover], 1)  # one draw of the view for D and C: their maps stay aligned
                both = en_view(both) if en_view is not None else both
                with torch.no_grad(), self.tap.capture() as maps_c:
                    f_c_view = self.recogniser.embed(both[:, 3:])
                if en_view is None:  # C was not transformed: this is f(C) for far
                    f_c = f_c_view
                with self.tap.capture() as maps_d:
                    f_d = self.recogniser.embed(both[:, :3])
                out["mid"] = mid_loss(maps_c, maps_d)
            else:
                f_d = self.recogniser.embed(en_view(deid) if en_view is not None else deid)
            if "near" in terms:
                out["near"] = near_loss(embed_feat, f_d)
            if "far" in terms:
                if f_c is None:
                    with torch.no_grad():
                        f_c = self.recogniser.embed(cover)
                out["far"] = far_loss(f_c, f_d, self.config.far_mode)
        out["total"] = sum(self.weights[n] * out[n] for n in LOSS_NAMES if n in out)
        return out

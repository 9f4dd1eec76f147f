"""ImageNet VGG feature extractors (torchvision ``vgg16().features`` / ``vgg19().features`` layout).

Weights come from an explicit safetensors file with torchvision keys (``features.{i}.weight``),
e.g. the offline assets' ``imagenet_vgg16/vgg16_features_fp16.safetensors``, or, when no file is
given, from torchvision's own ImageNet download. Weights are cast to float32 and frozen.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from featdeid.errors import ConfigError
from featdeid.weights import load_safetensors

_CFGS: dict[str, list[int | str]] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg_layers(arch: str) -> nn.Sequential:
    """Randomly initialised ``features`` part of torchvision's VGG ``arch`` (same module indices)."""
    if arch not in _CFGS:
        raise ConfigError(f"unknown VGG backbone {arch!r}; valid: {', '.join(_CFGS)}")
    layers: list[nn.Module] = []
    cin = 3
    for v in _CFGS[arch]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU(inplace=False)]
            cin = int(v)
    return nn.Sequential(*layers)


def final_conv_relu(arch: str) -> int:
    """Index of the ReLU after the last convolution (relu5_3 for VGG-16, relu5_4 for VGG-19)."""
    layers = vgg_layers(arch)
    return max(i for i, m in enumerate(layers) if isinstance(m, nn.ReLU))


def load_vgg_state(arch: str, weights: str | Path | None) -> dict[str, torch.Tensor]:
    """Float32 state dict with torchvision ``features.{i}.*`` keys from a file, or torchvision's download."""
    if weights is None:
        import torchvision

        model = getattr(torchvision.models, arch)(weights="IMAGENET1K_V1")
        return {f"features.{k}": v.float() for k, v in model.features.state_dict().items()}
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(f"VGG weights file not found: {path}")
    state = load_safetensors(path)
    return {k: v.float() for k, v in state.items() if k.startswith("features.")}


class VGGFeatures(nn.Module):
    """Frozen VGG truncated after layer ``last`` (default: the final conv ReLU).

    ``forward(x)``: ``(B, 3, H, W)`` RGB in [0, 1] -> ``(B, C, H/16, W/16)`` (for the default layer).
    """

    def __init__(self, arch: str = "vgg16", weights: str | Path | None = None, last: int | None = None) -> None:
        super().__init__()
        last = final_conv_relu(arch) if last is None else last
        layers = vgg_layers(arch)
        state = {k.removeprefix("features."): v for k, v in load_vgg_state(arch, weights).items()}
        layers.load_state_dict(state, strict=True)
        self.layers = layers[: last + 1]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGGFeatures:
        """Stays in eval mode."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - self.mean) / self.std)

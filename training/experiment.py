"""Build the pieces of an experiment from a :class:`TrainConfig`: data splits, EN, losses."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from featdeid.errors import ConfigError
from featdeid.recognisers import load_recogniser

from .config import TrainConfig
from .data import AlignedImages, PairDataset, prepare_images, split_indices
from .losses import DeidLoss


@dataclasses.dataclass
class ExperimentData:
    """Aligned images, the seeded train / validation split, and the two pair datasets."""

    covers: AlignedImages
    embeds: AlignedImages | None
    cover_train: np.ndarray
    cover_val: np.ndarray
    embed_train: np.ndarray | None
    embed_val: np.ndarray | None
    train: PairDataset
    val: PairDataset | None

    def reports(self) -> list[dict[str, Any]]:
        out = [self.covers.report.to_dict()]
        if self.embeds is not None and self.embeds is not self.covers:
            out.append(self.embeds.report.to_dict())
        return out


def build_covers(cfg: TrainConfig, progress: bool = True) -> tuple[AlignedImages, np.ndarray, np.ndarray]:
    """The aligned (cached) covers C and their train / validation indices; E is not touched."""
    d = cfg.data
    covers = prepare_images(d.cover, cfg.model.image_size, "face", d.detector, d.cache_dir, progress)
    return (covers, *split_indices(len(covers), d.val_fraction, d.split_seed))


def build_data(cfg: TrainConfig, progress: bool = True) -> ExperimentData:
    """Align (cached) and split C and E; E from the same source as C uses C's split."""
    d, size = cfg.data, cfg.model.image_size
    covers, cover_train, cover_val = build_covers(cfg, progress)
    embeds = embed_train = embed_val = None
    if d.embed_mode != "noise":
        assert d.embed is not None
        if d.embed == d.cover and d.embed_mode == "face":
            embeds, embed_train, embed_val = covers, cover_train, cover_val
        else:
            embeds = prepare_images(d.embed, size, d.embed_mode, d.detector, d.cache_dir, progress)
            embed_train, embed_val = split_indices(len(embeds), d.embed_val_fraction, d.split_seed + 1)
    seed = cfg.run.seed
    train = PairDataset(covers, cover_train, embeds, embed_train, d.embed_mode, size, seed, d.flip)
    val = None
    if len(cover_val):
        val_embed = embed_val if embed_val is not None and len(embed_val) else embed_train
        val = PairDataset(covers, cover_val, embeds, val_embed, d.embed_mode, size, seed + 1, False, fixed_epoch=0)
    return ExperimentData(covers, embeds, cover_train, cover_val, embed_train, embed_val, train, val)


def build_recogniser(cfg: TrainConfig) -> torch.nn.Module:
    """The frozen, differentiable EN."""
    en = load_recogniser(cfg.recogniser)
    if not isinstance(en, torch.nn.Module) or not getattr(en, "differentiable", False):
        raise ConfigError(f"EN must be a differentiable torch recogniser; {cfg.recogniser!r} is not")
    if getattr(en, "dim", cfg.model.feature_dim) != cfg.model.feature_dim:
        raise ConfigError(f"EN {cfg.recogniser!r} gives {en.dim}-d features but model.feature_dim is {cfg.model.feature_dim}")
    for p in en.parameters():
        p.requires_grad_(False)
    return en.eval()


def build_loss(cfg: TrainConfig, recogniser: torch.nn.Module) -> DeidLoss:
    return DeidLoss(cfg.losses, recogniser)

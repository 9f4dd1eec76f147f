"""Training configuration: one YAML file per experiment, validated into frozen dataclasses.

A config may start from another with ``base: other.yaml`` (relative to its folder) and state only what
differs: mappings merge key by key, lists and scalars replace. String values may use ``${VAR}`` and
``${VAR:-default}``; ``FEATDEID_ASSETS`` defaults to ``../shared/assets`` next to the repository.
Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

from featdeid.config import PAPER, SMALL_CPU, ModelConfig
from featdeid.errors import ConfigError

from .augment import TransferConfig
from .data import EMBED_MODES, SourceSpec
from .losses import LossConfig

REPO = Path(__file__).resolve().parents[1]
ENV_DEFAULTS = {"FEATDEID_ASSETS": str(REPO.parent / "shared" / "assets")}
MODEL_PRESETS = {"paper": PAPER, "small_cpu": SMALL_CPU}
MIXED_PRECISION = ("no", "bf16", "fp16")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^${}]*))?\}")


def expand_env(value: Any) -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` (nestable) and a leading ``~`` in every string of a nested value."""
    if isinstance(value, dict):
        return {k: expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        found = os.environ.get(name) or (default if default is not None else ENV_DEFAULTS.get(name))
        if found is None:
            raise ConfigError(f"environment variable {name} is not set (used as ${{{name}}} in the config)")
        return found

    out, prev = value, None
    while out != prev:  # innermost first, so defaults may hold ${...}
        prev, out = out, _VAR.sub(sub, out)
    return os.path.expanduser(out) if out.startswith("~") else out


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Cover images C, embedding images E (``embed_mode``: face / noise / object) and the split."""

    cover: SourceSpec
    embed: SourceSpec | None = None
    embed_mode: str = "face"
    val_fraction: float = 0.05
    embed_val_fraction: float = 0.0
    split_seed: int = 0
    detector: str = "dlib"
    cache_dir: str | None = None
    flip: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.embed_mode not in EMBED_MODES:
            raise ConfigError(f"unknown embed_mode {self.embed_mode!r}; valid: {', '.join(EMBED_MODES)}")
        if self.embed_mode != "noise" and self.embed is None:
            raise ConfigError(f"embed_mode {self.embed_mode!r} needs data.embed")
        for name in ("val_fraction", "embed_val_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam and the plateau schedule (paper 4.2: lr 1e-5, x0.2 after 5 epochs without improvement)."""

    lr: float = 1e-5
    batch_size: int = 16
    epochs: int = 150
    plateau_factor: float = 0.2
    plateau_epochs: int = 5
    weight_decay: float = 0.0
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 1 or self.plateau_epochs < 1:
            raise ConfigError("optim: need lr > 0, batch_size >= 1, epochs >= 1, plateau_epochs >= 1")
        if not 0 < self.plateau_factor < 1:
            raise ConfigError("optim.plateau_factor must be in (0, 1)")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where and how: output folder, precision, checkpoints, logging, seed. ``init_from`` is a model
    folder (``config.json`` + ``model.safetensors``) whose weights start a fresh run (new optimizer
    and schedule), e.g. a second stage with another learning rate; ``--resume`` takes precedence."""

    output: str = "runs/experiment"
    mixed_precision: str = "bf16"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION:  # "fp32" and YAML's false are read as "no"
            raise ConfigError(f"run.mixed_precision must be one of {', '.join(MIXED_PRECISION)}")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.log_every < 1:
            raise ConfigError("run: checkpoint_every, keep_checkpoints and log_every must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole experiment. ``recogniser`` is the EN spec (see ``featdeid.recognisers.load_recogniser``);
    ``recogniser_name`` is what the exported model records (no machine paths; derived if empty)."""

    name: str
    model: ModelConfig
    recogniser: str
    data: DataConfig
    losses: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    transfer: TransferConfig = dataclasses.field(default_factory=TransferConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    recogniser_name: str = ""

    def exported_recogniser(self) -> str:
        """``recogniser_name``, or the spec with any path cut to ``<parent>/<file>``."""
        if self.recogniser_name:
            return self.recogniser_name
        kind, sep, arg = self.recogniser.partition(":")
        if not sep:
            kind, arg = ("onnx", kind) if kind.endswith(".onnx") else (kind, "")
        if "/" in arg or "\\" in arg:
            p = Path(arg)
            arg = f"{p.parent.name}/{p.name}" if p.parent.name else p.name
        return f"{kind}:{arg}" if arg else kind


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(value)
    return value


def _build(cls: Any, data: Any, where: str) -> Any:
    if isinstance(data, str) and cls is SourceSpec:
        data = {"path": data}
    if cls is RunConfig and isinstance(data, dict) and data.get("mixed_precision") in (False, "fp32"):
        data = {**data, "mixed_precision": "no"}  # YAML reads a bare `no` as false
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items() if k != "weights" or cls is not LossConfig}
    if cls is LossConfig and "weights" in data:
        kwargs["weights"] = data["weights"]
    return cls(**kwargs)


def _model_config(data: Any) -> ModelConfig:
    if data is None:
        return PAPER
    if not isinstance(data, dict):
        raise ConfigError("model must be a mapping (preset: paper | small_cpu, plus ModelConfig fields)")
    data = dict(data)
    preset = data.pop("preset", "paper")
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; valid: {', '.join(MODEL_PRESETS)}")
    if data.get("adaptive_strength"):
        raise ConfigError("model.adaptive_strength is not trained: fit it after export with training/fit_strength_head.py")
    base = MODEL_PRESETS[preset].to_dict()
    base.update(data)
    return ModelConfig.from_dict(base)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Validate a parsed config (environment variables are expanded here)."""
    if not isinstance(data, dict):
        raise ConfigError("a training config must be a mapping")
    data = expand_env(data)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown top-level key(s): {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    for key in ("name", "recogniser", "data"):
        if key not in data:
            raise ConfigError(f"config needs '{key}'")
    hints = typing.get_type_hints(TrainConfig)
    kwargs = {k: _coerce(hints[k], v, k) for k, v in data.items() if k != "model"}
    return TrainConfig(model=_model_config(data.get("model")), **kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as plain data, its ``base:`` chain merged in (``base`` is relative to the file's folder)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (base of {_seen[-1]})" if _seen else ""))
    chain = (*_seen, path.resolve())
    if chain[-1] in _seen:
        raise ConfigError(f"config base cycle: {' -> '.join(map(str, chain))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a training config must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a config file name, got {base!r}")
    return _merge(read_config(path.parent / base, chain), data)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (and its ``base:`` chain); ``overrides`` maps dotted keys (``optim.batch_size``) to values."""
    data = read_config(path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict(data)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain data, the ``base:`` chain merged (``config.json`` in the run folder)."""
    out = dataclasses.asdict(cfg)
    out["model"] = cfg.model.to_dict()
    out["model"].pop("model_type", None)
    out["model"].pop("version", None)
    return out

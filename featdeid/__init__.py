"""featdeid: de-identify faces in photos by feature embedding."""

from .config import ModelConfig
from .errors import (
    BackendUnavailableError,
    ConfigError,
    FeatdeidError,
    InvalidImageError,
    ModelNotFoundError,
    OutputError,
    UnsafeWeightsError,
)
from .model import HidingNetwork

__version__ = "0.1.0"
__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "FeatdeidError",
    "HidingNetwork",
    "InvalidImageError",
    "ModelConfig",
    "ModelNotFoundError",
    "OutputError",
    "UnsafeWeightsError",
]

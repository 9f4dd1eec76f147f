"""featdeid: de-identify faces in photos by feature embedding.

    import featdeid
    out = featdeid.deidentify(photo)                      # same type in and out
    ds = ds.map(featdeid.transform, batched=True)         # Hugging Face datasets
    t = featdeid.DeIdentify(strength=1.0)                 # torchvision v2 transform
"""

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
from .faces.detect import Face
from .loading import load
from .model import HidingNetwork
from .identity import identity_feature
from .pipeline import Deidentifier, Report, deidentify
from .transforms import DeIdentify, transform, transform_for

__version__ = "0.1.0"
__all__ = [
    "BackendUnavailableError",
    "ConfigError",
    "DeIdentify",
    "Deidentifier",
    "Face",
    "FeatdeidError",
    "HidingNetwork",
    "InvalidImageError",
    "ModelConfig",
    "ModelNotFoundError",
    "OutputError",
    "Report",
    "UnsafeWeightsError",
    "deidentify",
    "identity_feature",
    "load",
    "transform",
    "transform_for",
]

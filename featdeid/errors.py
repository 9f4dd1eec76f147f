"""The featdeid exception hierarchy: every error a user can cause is one of these."""

from __future__ import annotations


class FeatdeidError(Exception):
    """Base class of all featdeid errors."""


class InvalidImageError(FeatdeidError, ValueError):
    """The input is not an image featdeid can read (corrupt, empty, unsupported mode or shape)."""


class ModelNotFoundError(FeatdeidError, FileNotFoundError):
    """A model folder, Hub repo, revision or file does not exist, or no default model is installed."""


class UnsafeWeightsError(FeatdeidError, ValueError):
    """A weights file is not a valid safetensors file (pickles and tampered files are refused)."""


class ConfigError(FeatdeidError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class BackendUnavailableError(FeatdeidError, RuntimeError):
    """An optional backend (detector, recogniser) is not installed or cannot fetch its models."""


class OutputError(FeatdeidError, OSError):
    """An output cannot be written without risking an input or a lossy format the user did not ask for."""

"""Load a hiding network: the packaged default model, a local model folder or a Hugging Face Hub repo.

A model is a folder (or Hub repo) holding ``config.json`` and ``model.safetensors``. Hub downloads go
through ``huggingface_hub.hf_hub_download``, so its cache, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``,
``HF_HUB_CACHE`` and ``HF_TOKEN`` apply. Only those two files are ever fetched; pickles are refused.
"""

from __future__ import annotations

import os
import re
from importlib import metadata, resources
from pathlib import Path

import torch

from .errors import ConfigError, ModelNotFoundError
from .model import HidingNetwork

MODEL_FILES = ("config.json", "model.safetensors")
DEFAULT_MODEL_DIR = "default_model"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_HOW_TO = (
    "Pass a local model folder (config.json + model.safetensors) or a Hugging Face Hub repo id, "
    "e.g. featdeid.load('owner/name', revision='<commit>')."
)


def default_model_path() -> Path | None:
    """The folder of the default model shipped inside the package, or None when none is installed."""
    try:
        folder = resources.files("featdeid").joinpath(DEFAULT_MODEL_DIR)
    except (NotADirectoryError, TypeError):  # featdeid imported as a namespace package (stale editable install)
        folder = Path(__file__).resolve().parent / DEFAULT_MODEL_DIR
    if not all(folder.joinpath(name).is_file() for name in MODEL_FILES):
        return None
    return Path(str(folder))


def load(
    path_or_repo_id: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
    device: str | torch.device = "cpu",
) -> HidingNetwork:
    """Load a hiding network in eval mode on ``device``.

    Args:
        path_or_repo_id: None for the packaged default model; an existing local model folder; or a
            Hub repo id ``owner/name`` (downloaded into the Hugging Face cache).
        revision: Hub branch, tag or commit id (default ``main``); pin a commit for reproducibility.
        cache_dir: Hugging Face cache folder (default ``HF_HUB_CACHE``).
        token: Hub token for private or gated repos (default ``HF_TOKEN`` / the saved login).
        local_files_only: only use the cache (default: ``HF_HUB_OFFLINE``).
        device: where to put the model.
    Raises:
        ModelNotFoundError: no default model, no such folder, repo, revision or file, or offline /
            network failure with nothing cached.
        UnsafeWeightsError: the weights are a pickle or not a valid safetensors file.
        ConfigError: ``config.json`` is invalid, or does not match the weights.
    """
    if path_or_repo_id is None:
        folder = default_model_path()
        if folder is None:
            raise ModelNotFoundError(
                f"No default model is installed yet (featdeid/{DEFAULT_MODEL_DIR}/ is missing from this "
                f"installation). {_HOW_TO}"
            )
        if revision is not None:
            raise ConfigError("revision applies to Hub repo ids only, not to the packaged default model")
    else:
        folder = _resolve(path_or_repo_id, revision, cache_dir, token, local_files_only)
    try:
        model = HidingNetwork.from_pretrained(folder)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{Path(folder) / 'config.json'} is not UTF-8 JSON ({e})") from e
    return model.to(device).eval()


def _resolve(
    path_or_repo_id: str | os.PathLike[str],
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    token: str | bool | None,
    local_files_only: bool | None,
) -> Path:
    """A local model folder for ``path_or_repo_id``, downloading from the Hub when it is a repo id."""
    name = os.fspath(path_or_repo_id)
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(f"empty model path or repo id {name!r}. {_HOW_TO}")
    try:
        path = Path(name).expanduser()
    except RuntimeError:
        path = Path(name)
    if path.is_dir():
        if revision is not None:
            raise ConfigError(f"revision applies to Hub repo ids only; {name!r} is a local folder")
        return path
    if path.exists():
        raise ModelNotFoundError(f"{name} is a file; pass the model folder holding {' and '.join(MODEL_FILES)}")
    if isinstance(path_or_repo_id, os.PathLike) or not _is_repo_id(name):
        raise ModelNotFoundError(
            f"{name!r} is neither an existing model folder nor a Hub repo id of the form 'owner/name'. {_HOW_TO}"
        )
    return _download(name, revision, cache_dir, token, local_files_only)


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _download(
    repo_id: str,
    revision: str | None,
    cache_dir: str | os.PathLike[str] | None,
    token: str | bool | None,
    local_files_only: bool | None,
) -> Path:
    """Download the model files into the Hub cache; returns their snapshot folder.

    ``config.json`` is resolved first and the weights are then fetched at its commit, so a branch
    that moves in between cannot pair one commit's config with another's weights.
    """
    from huggingface_hub import constants, hf_hub_download

    options = {"cache_dir": cache_dir, "token": token, "library_name": "featdeid", "library_version": _version()}
    if local_files_only is not None:
        options["local_files_only"] = local_files_only

    def fetch(filename: str, rev: str | None) -> Path:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=rev, **options)).parent
        except Exception as e:
            offline = bool(local_files_only) or constants.HF_HUB_OFFLINE
            cache = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
            error = _hub_error(e, repo_id, revision, filename, offline, cache, constants.ENDPOINT)
            if error is None:
                raise
            raise error from e

    config_name, weights_name = MODEL_FILES
    folder = fetch(config_name, revision)
    commit = folder.name if _COMMIT.match(folder.name) else revision
    return fetch(weights_name, commit)


def _version() -> str:
    try:
        return metadata.version("featdeid")
    except metadata.PackageNotFoundError:
        return "unknown"


def _hub_error(
    error: Exception, repo_id: str, revision: str | None, filename: str, offline: bool, cache: object, endpoint: str
) -> ModelNotFoundError | None:
    """The featdeid error for an exception of ``hf_hub_download``, or None to let it through."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = revision or "main"
    if isinstance(error, GatedRepoError):
        return ModelNotFoundError(
            f"Hub repo {repo_id!r} is gated: accept its conditions on the Hub, then pass token=... or set HF_TOKEN"
        )
    if isinstance(error, RepositoryNotFoundError):
        return ModelNotFoundError(
            f"Hub repo {repo_id!r} not found at {endpoint}, and there is no local folder of that name "
            "(if the repo is private, pass token=... or set HF_TOKEN)"
        )
    if isinstance(error, RevisionNotFoundError):
        return ModelNotFoundError(f"revision {rev!r} not found in Hub repo {repo_id!r}")
    if isinstance(error, LocalEntryNotFoundError):
        if offline:
            return ModelNotFoundError(
                f"{filename} of Hub repo {repo_id!r} (revision {rev!r}) is not in the local cache {cache} and "
                "downloads are disabled (HF_HUB_OFFLINE=1 or local_files_only=True). Load it once while online, "
                "or pass a local model folder."
            )
        cause = error.__cause__ or error
        return ModelNotFoundError(
            f"could not download {filename} of Hub repo {repo_id!r} (revision {rev!r}) from {endpoint} and it is "
            f"not in the local cache {cache}: {cause}. Check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 "
            "to use cached models only."
        )
    if isinstance(error, EntryNotFoundError):
        return ModelNotFoundError(
            f"Hub repo {repo_id!r} (revision {rev!r}) holds no featdeid model: it has no {filename} "
            f"(a featdeid model has {' and '.join(MODEL_FILES)}; other weight formats are never loaded)"
        )
    if isinstance(error, HfHubHTTPError):
        return ModelNotFoundError(f"Hub request for {filename} of {repo_id!r} (revision {rev!r}) failed: {error}")
    if isinstance(error, OSError) or type(error).__module__.split(".")[0] in ("httpx", "httpx2", "requests"):
        return ModelNotFoundError(
            f"could not download {filename} of Hub repo {repo_id!r} (revision {rev!r}) from {endpoint}: {error}"
        )
    return None

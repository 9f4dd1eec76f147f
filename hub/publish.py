"""Publish a featdeid model folder to the Hugging Face Hub.

    python hub/publish.py MODEL_FOLDER --repo-id owner/name [--revision BRANCH] [--private] [--token TOKEN]

The folder is loaded with featdeid first (safetensors only, config validated, non-empty identity
bank), then ``config.json``, ``model.safetensors`` and ``README.md`` (plus the measurements the card is
built from and its PNG plots, when present) are uploaded in one commit. The card's placeholder repo id ``OWNER/featdeid-default``
(written by ``hub/model_card.py``) is replaced by ``--repo-id`` in the uploaded copy; the folder is not changed.
The token comes from ``--token`` or ``HF_TOKEN``; ``HF_ENDPOINT`` selects the Hub.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from model_card import REPO_PLACEHOLDER  # hub/ is the script's folder, first on sys.path

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, HfApi

FILES = ("config.json", "model.safetensors", "README.md")
EXTRAS = ("sweep.json", "eval_*.json", "checkpoint.json", "*.png")  # the card's measurements, uploaded when present
REPO_ROOT = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Publish a featdeid model folder to the Hugging Face Hub.")
    p.add_argument("folder", type=Path, help="model folder: config.json, model.safetensors, README.md")
    p.add_argument("--repo-id", required=True, help="Hub repo id, owner/name")
    p.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", default=None, help="Hub write token (default: HF_TOKEN)")
    p.add_argument("--message", default=None, help="commit message")
    return p


def validate(folder: Path) -> str:
    """Check that ``folder`` is a publishable featdeid model; returns a one-line description."""
    from featdeid.errors import FeatdeidError
    from featdeid.loading import load

    if not folder.is_dir():
        raise SystemExit(f"error: {folder} is not a folder")
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise SystemExit(f"error: {folder} lacks {', '.join(missing)} (a published model needs {', '.join(FILES)})")
    try:
        model = load(folder)
    except FeatdeidError as e:
        raise SystemExit(f"error: {folder} is not a valid featdeid model: {e}") from e
    if model.identity_bank.shape[0] == 0:
        raise SystemExit(f"error: {folder} has an empty identity bank; it cannot de-identify")
    return model.describe()


def stage(folder: Path, repo_id: str, into: Path) -> Path:
    """Copy the files to upload from ``folder`` into ``into``, with the card's placeholder repo id
    replaced by ``repo_id``; returns ``into``."""
    names = {p.name for pattern in (*FILES, *EXTRAS) for p in folder.glob(pattern) if p.is_file()}
    for name in sorted(names):
        shutil.copy2(folder / name, into / name)
    card = into / "README.md"
    card.write_text(card.read_text(encoding="utf-8").replace(REPO_PLACEHOLDER, repo_id), encoding="utf-8")
    return into


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as e:
        raise SystemExit(f"error: invalid --repo-id: {e}") from e
    if args.repo_id.count("/") != 1:
        raise SystemExit(f"error: --repo-id must be owner/name, got {args.repo_id!r}")
    description = validate(args.folder)
    token = args.token or os.environ.get("HF_TOKEN")
    if not token:
        raise SystemExit("error: a Hub write token is required: pass --token or set HF_TOKEN")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="featdeid-publish-") as tmp:
        staged = stage(args.folder, args.repo_id, Path(tmp))
        info = _upload(api, args, staged, description)
    print(f"published {args.folder} to {args.repo_id} at commit {info.oid}: {info.commit_url}")
    print(f"load it with featdeid.load({args.repo_id!r}, revision={info.oid!r})")
    return 0


def _upload(api: "HfApi", args: argparse.Namespace, folder: Path, description: str) -> "CommitInfo":
    try:
        api.create_repo(args.repo_id, repo_type="model", private=args.private or None, exist_ok=True)
        if args.revision and args.revision != "main":
            api.create_branch(args.repo_id, branch=args.revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=args.repo_id,
            folder_path=folder,
            revision=args.revision,
            allow_patterns=[*FILES, *EXTRAS],
            commit_message=args.message or "Upload featdeid model",
            commit_description=description,
        )
    except Exception as e:
        cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ is not None else ""
        raise SystemExit(f"error: publishing to {api.endpoint} failed: {type(e).__name__}: {e}{cause}") from e
    return info


if __name__ == "__main__":
    sys.exit(main())

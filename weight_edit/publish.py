"""Publishing an edited checkpoint to the hub: only a verified, unaltered output, in one commit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from weight_edit.errors import WeightEditError
from weight_edit.model_card import CARD_FILE, render_card
from weight_edit.verify import OLD_PROVENANCE, VerifyError, check_output_files, read_provenance
from weight_edit.writer import VERIFY_FILE


class PublishError(WeightEditError):
    """The folder is not fit to publish (unverified, failed verification, or altered since)."""


def publishable_files(out: Path) -> list[str]:
    """Every regular file of the output folder, by name; staging leftovers and hidden files excluded."""
    return sorted(
        p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".partial")
    )


def check_publishable(out: Path) -> dict[str, Any]:
    """Refuse an output that `verify` has not passed, or any of whose files changed (or appeared) after `apply`.

    Every file is vouched for: shards, configs, tokenizer and chat template by the hashes in the provenance, the
    provenance by its seal, and the model card (rewritten by `verify`) by being exactly the card rendered from
    the provenance and the verify report. An output of an older apply, whose provenance records only the
    shards, is refused: nothing vouches for its other files.
    """
    provenance = read_provenance(out)
    report_path = out / VERIFY_FILE
    if not report_path.is_file():
        raise PublishError(f"{out} has not been verified: run `weight-edit verify {out}` first")
    report = json.loads(report_path.read_text())
    if not report.get("passed"):
        raise PublishError(f"{out} failed verification ({'; '.join(report.get('failures', []))}); not publishing")
    try:
        files_checked = check_output_files(out, provenance)
    except VerifyError as exc:
        raise PublishError(str(exc)) from exc
    if not files_checked:
        raise PublishError(f"{out}: {OLD_PROVENANCE.removeprefix('not checked: ')}; not publishing")
    card = out / CARD_FILE
    if not card.is_file():
        raise PublishError(f"{card} is missing")
    if card.read_text(encoding="utf-8", errors="replace") != render_card(provenance, report):
        raise PublishError(
            f"{card} was altered after `verify` (it differs from the card rendered from the provenance and "
            f"{VERIFY_FILE}): run `weight-edit verify {out}` again to rewrite it"
        )
    return provenance


def push(out: Path, repo_id: str, private: bool = False, dry_run: bool = False, api: Any = None) -> list[str]:
    """Create the repo if needed and upload the folder in a single commit; returns the files sent."""
    out = Path(out).resolve()
    provenance = check_publishable(out)
    files = publishable_files(out)
    if dry_run:
        return files
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(out),
        repo_id=repo_id,
        repo_type="model",
        allow_patterns=files,
        commit_message=f"weight-edit {provenance['version']}: {provenance['mode']} edit of {provenance.get('base_model', 'a model')}",
    )
    return files

"""Checks every command makes before any computing: output folders, prompt lengths, the contrast set."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import settings
from weight_edit.chat import check_prompt_lengths, prompt_token_limit
from weight_edit.dataset import DatasetError, Prompt, Split
from weight_edit.writer import check_writable_dir


def writable(folder: Path, what: str) -> None:
    """An output folder that could not be written fails now, in one line (see writer.check_writable_dir)."""
    check_writable_dir(folder, what)


def prompt_lengths(folder: Path, groups: Iterable[tuple[Path | str, Sequence[Prompt]]]) -> None:
    """Every prompt within the model's context and the token budget, checked with the tokenizer alone
    before the model loads. `groups`: (file, its prompts with their row numbers)."""
    from transformers import AutoTokenizer

    if not (folder / "config.json").is_file():
        return  # not a checkpoint folder: the command's own checks say so
    config = json.loads((folder / "config.json").read_text())
    limit, why = prompt_token_limit(config, settings.MAX_PROMPT_TOKENS)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    for origin, prompts in groups:
        check_prompt_lengths(tokenizer, [(p.row, p.text) for p in prompts], str(origin), limit, why)


def require_harmless(split: Split, dataset: Path, what: str) -> None:
    if not split.select("train", settings.HARMLESS_LABEL):
        raise DatasetError(
            f"{dataset}: no rows labelled 'harmless' (ordinary instructions); {what} needs them — "
            "add some, or use --contrast safe"
        )

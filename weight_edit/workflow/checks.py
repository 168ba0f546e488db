"""Checks every command makes before any computing: output folders, prompt lengths, the contrast set."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import settings
from weight_edit.chat import check_prompt_lengths, prompt_token_limit, resolve_prompt_format
from weight_edit.dataset import HARMLESS_LABEL, Dataset, DatasetError, Prompt, Split
from weight_edit.output_folder import check_writable_dir


def writable(folder: Path, what: str) -> None:
    """An output folder that could not be written fails now, in one line (see output_folder.check_writable_dir)."""
    check_writable_dir(folder, what)


def prompt_lengths(
    folder: Path, groups: Iterable[tuple[Path | str, Sequence[Prompt]]], prompt_format: str = "auto"
) -> str:
    """Every prompt within the model's context and the token budget, checked with the tokenizer alone
    before the model loads. `groups`: (file, its prompts with their row numbers). Returns the prompt format
    `prompt_format` resolves to for this tokenizer (`chat` or `plain`; see chat.resolve_prompt_format), which
    refuses `chat` for a tokenizer without a chat template now, in one line."""
    return prompt_setup(folder, groups, prompt_format)[0]


def prompt_setup(
    folder: Path, groups: Iterable[tuple[Path | str, Sequence[Prompt]]], prompt_format: str, reasoning: str = "auto"
):
    """`prompt_lengths` under the reasoning mode `reasoning` (auto, on, off) resolved for this tokenizer's chat
    template (weight_edit.reasoning): returns (prompt format, Reasoning), the tokenizer read once. What the
    template cannot do (`on` without any reasoning, `off` where nothing turns it off) is refused now, in one
    line."""
    from transformers import AutoTokenizer

    from weight_edit.chat import using_prompt_format
    from weight_edit.reasoning import Reasoning, check_mode, resolve_reasoning

    check_mode(reasoning)
    if not (folder / "config.json").is_file():
        return prompt_format, Reasoning("none", reasoning)  # not a checkpoint folder: the command says so
    config = json.loads((folder / "config.json").read_text())
    limit, why = prompt_token_limit(config, settings.MAX_PROMPT_TOKENS)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    resolved = resolve_prompt_format(tokenizer, prompt_format)
    chosen = resolve_reasoning(tokenizer, reasoning, resolved)
    with using_prompt_format(prompt_format, chosen.template_kwargs):  # lengths as the model will see them
        for origin, prompts in groups:
            check_prompt_lengths(tokenizer, [(p.row, p.text) for p in prompts], str(origin), limit, why, resolved)
    return resolved, chosen


def require_harmless(split: Split, dataset: Path, what: str) -> None:
    if not split.select("train", HARMLESS_LABEL):
        raise DatasetError(
            f"{dataset}: no rows labelled 'harmless' (ordinary instructions); {what} needs them — "
            "add some, or use --contrast safe"
        )


def same_split(sidecar: dict, data: Dataset, split: Split, sidecar_path: Path) -> None:
    """The dataset and split a command is about to use must be the ones `fit` used (as its sidecar records
    them): otherwise a held-out area could be tuned or diagnosed on as if it were a fit area."""
    from weight_edit.direction_file import DirectionError

    fitted = sidecar.get("split") or {}
    if fitted.get("design", "area-disjoint") != split.design:
        raise DirectionError(
            f"{sidecar_path} is a selective fit (fit --remove/--keep, split within each area): this command takes "
            "only fits of the area-disjoint split so far"
        )
    recorded_sha = (sidecar.get("dataset") or {}).get("sha256")
    differences = [
        f"{name} {', '.join(fitted[key])} there, {', '.join(getattr(split, key))} here"
        for key, name in (("fit_areas", "fit areas"), ("held_out_areas", "held-out areas"))
        if key in fitted and list(fitted[key]) != list(getattr(split, key))
    ]
    if recorded_sha not in (None, data.sha256):
        differences.insert(0, "another dataset (sha256 differs)")
    if differences:
        raise DirectionError(
            f"{sidecar_path} was fit on {'; '.join(differences)}: pass the --dataset and --seed `fit` used"
        )

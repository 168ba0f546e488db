"""`weight-edit fit`: load the split and the model, fit and select the direction, write the fit folder."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import settings
from weight_edit.areas import area_texts, parse_area_choice, within_area_split
from weight_edit.chat import using_prompt_format
from weight_edit.dataset import HARMLESS_LABEL
from weight_edit.fit import FitResult, FitSettings, ProgressFactory, fit_direction, no_progress
from weight_edit.records import write_csv
from weight_edit.workflow import checks

CANDIDATES_FILE = "candidates.csv"
SPLIT_FILE = "split.csv"


@dataclass
class FitRequest:
    model_spec: str | None = None
    dataset: Path = settings.DEFAULT_DATASET
    out_dir: Path = settings.DEFAULT_FIT_DIR
    device: str = "auto"
    max_memory: dict | None = None
    dtype: str = "fast"
    batch_size: int = 0
    seed: int = settings.SEED
    screen_keep: int = settings.SCREEN_KEEP
    screen_prompts: int = settings.SCREEN_PROMPTS
    validation_prompts: int = settings.MAX_VALIDATION_PROMPTS
    contrast: str = settings.DEFAULT_CONTRAST
    selection: str = settings.SELECTION_RULE
    prompt_format: str = "auto"  # chat.PROMPT_FORMATS; recorded as the format actually used
    reasoning: str = "auto"  # reasoning.REASONING_MODES; recorded with the template's style
    remove: str | None = None  # comma-separated policy areas whose refusal a selective edit removes
    keep: str | None = None  # ... and those whose refusal it must keep (weight_edit.areas)


@dataclass
class FitRun:
    result: FitResult
    sidecar: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def run_fit(
    request: FitRequest,
    progress: ProgressFactory = no_progress,
    model_progress: Callable | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> FitRun:
    """Everything `fit` does; `say` receives one line about the model and split before the long part."""
    from weight_edit.architecture import architecture_for
    from weight_edit.checkpoint import Checkpoint, fingerprint
    from weight_edit.dataset import load_split
    from weight_edit.direction_file import save_activation_means, save_direction
    from weight_edit.models import auto_batch_size, load_model, resolve_dtype, resolve_model, weights_note

    checks.writable(request.out_dir, "--out-dir")
    data, split = load_split(request.dataset, request.seed)
    choice = parse_area_choice(request.remove, request.keep, data.categories)
    if choice:
        split = within_area_split(
            data,
            choice.remove + choice.keep,
            request.seed,
            settings.AREA_VALIDATION_FRACTION,
            settings.AREA_HELD_OUT_FRACTION,
            (settings.HARMLESS_VALIDATION_FRACTION, settings.HARMLESS_HELD_OUT_FRACTION),
        )
    if request.contrast == HARMLESS_LABEL:
        checks.require_harmless(split, request.dataset, "--contrast harmless")
    folder = resolve_model(request.model_spec, model_progress)
    groups = [(request.dataset, data.prompts)]
    prompt_format, reasoning = checks.prompt_setup(folder, groups, request.prompt_format, request.reasoning)
    checkpoint = Checkpoint(folder)
    arch = architecture_for(checkpoint.config)
    num_layers = arch.num_layers(checkpoint.config)
    say(
        f"model {folder} ({checkpoint.config.get('model_type')}, edited as the {arch.family} family; "
        f"{num_layers} layers); prompts: {prompt_format}{_reasoning_note(reasoning)}; contrast: {request.contrast}; "
        + (
            f"fit areas: {', '.join(split.fit_areas)}; held out: {', '.join(split.held_out_areas)}"
            if choice is None
            else f"removing {', '.join(choice.remove)}; keeping {', '.join(choice.keep) or 'nothing named'} "
            "(split within each area)"
        )
    )
    started = time.time()
    dtype = resolve_dtype(request.dtype, request.device)  # recorded as the dtype actually used
    model, tokenizer = load_model(folder, dtype=dtype, device=request.device, max_memory=request.max_memory)
    fit_settings = FitSettings.from_project_settings(
        request.batch_size or auto_batch_size(model),
        screen_prompts=request.screen_prompts,
        screen_keep=request.screen_keep,
        max_validation_prompts=request.validation_prompts,
        selection=request.selection,
    )
    contrast = request.contrast
    areas = choice.remove if choice else split.fit_areas
    keep = choice.keep if choice else ()
    # every prompt fit_direction tokenizes, with the reasoning switch the model will see in use
    with using_prompt_format(prompt_format, reasoning.template_kwargs):
        result = fit_direction(
            model,
            tokenizer,
            arch,
            num_layers,
            area_texts(split, "train", "unsafe", areas),
            area_texts(split, "train", contrast, areas),
            area_texts(split, "validation", "unsafe", areas),
            area_texts(split, "validation", contrast, areas),
            fit_settings,
            progress,
            contrast_name=contrast,
            keep_train={area: area_texts(split, "train", "unsafe", (area,)) for area in keep},
            keep_validation=area_texts(split, "validation", "unsafe", keep),
        )
    chosen = result.chosen()
    sidecar = {
        "tool": "weight-edit",
        "model": {
            "spec": request.model_spec or settings.DEFAULT_MODEL_NAME,
            "folder": str(folder),
            "weights": weights_note(request.model_spec),
        },
        "model_fingerprint": fingerprint(checkpoint),
        "layer": result.layer,
        "position": result.position,
        "contrast": contrast,
        "scores": {
            "bypass": chosen.bypass,
            "refusal_rate": chosen.refusal_rate,
            **({"kept_refusal_rate": chosen.kept_refusal_rate} if choice else {}),
            "induce": chosen.induce,
            "kl": chosen.kl,
            "norm": chosen.norm,
        },
        "baseline": result.baseline,
        "selection": result.selection_note,
        "prompt_format": prompt_format,
        "reasoning": reasoning.as_dict(),
        "post_instruction_tokens": result.suffix_tokens,
        "refusal_tokens": result.refusal_tokens,
        "dataset": {"path": str(request.dataset), "sha256": data.sha256},
        "split": split.as_dict(),
        **({"areas": _areas_record(choice, fit_settings)} if choice else {}),
        "settings": {**fit_settings.__dict__, "dtype": dtype, "seed": request.seed},
        "stats": result.stats,
        "fit_seconds": round(time.time() - started, 1),
    }
    out = request.out_dir
    out.mkdir(parents=True, exist_ok=True)
    sidecar["activation_means"] = save_activation_means(out, result.means)  # first: the sidecar records its hash
    files = [*save_direction(out / settings.DIRECTION_FILE, result.direction, sidecar)]
    files += [write_csv(out / CANDIDATES_FILE, result.table()), write_csv(out / SPLIT_FILE, split.table())]
    files.append(out / sidecar["activation_means"]["file"])
    return FitRun(result, sidecar, [f for f in files if f], round(time.time() - started, 1))


def _areas_record(choice, fit_settings: FitSettings) -> dict[str, Any]:
    """What a selective fit removes and keeps, how, and the rule its choice followed."""
    return {
        **choice.as_dict(),
        "split": "within-area (each named area's prompts per label: train / validation / held out, seeded)",
        "rule": (
            "candidates: mean(removed areas' unsafe) - mean(contrast) at each layer and position, minus their "
            "component in the span of each kept area's mean(unsafe) - mean(contrast) there; chosen by "
            f"{fit_settings.selection} among candidates that keep at least {fit_settings.min_kept_refusal:.0%} of "
            "the kept areas' validation refusal rate under the ablation"
        ),
    }


def _reasoning_note(reasoning) -> str:
    """Where the template reasons: which mode (post-instruction positions follow it; the first-token refusal
    score then sees the reasoning's opening, see docs/method.md)."""
    if reasoning.style == "none":
        return ""
    return f" (reasoning {reasoning.mode}: {reasoning.style})"

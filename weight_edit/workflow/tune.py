"""`weight-edit tune`: search per-layer strengths for a fitted direction on the fit areas' validation
prompts, and record the search in the fit folder's sidecar for `apply --tuned`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import settings
from weight_edit.chat import using_prompt_format
from weight_edit.dataset import HARMLESS_LABEL
from weight_edit.direction_file import DirectionError
from weight_edit.fit import ProgressFactory, no_progress
from weight_edit.records import write_csv
from weight_edit.search import SearchResult
from weight_edit.workflow import checks

TRIALS_FILE = "search_trials.csv"


@dataclass
class TuneRequest:
    model_spec: str | None = None
    dataset: Path = settings.DEFAULT_DATASET
    seed: int | None = None  # default: the split seed `fit` recorded
    fit_dir: Path = settings.DEFAULT_FIT_DIR
    trials: int = settings.TUNE_TRIALS
    mode: str = "norm-preserving"
    max_refusal: float = settings.TUNE_MAX_REFUSAL
    validation_prompts: int = 0  # per label; 0: all
    max_strength: float = settings.TUNE_MAX_STRENGTH
    device: str = "auto"
    dtype: str = "fast"
    batch_size: int = 0


@dataclass
class TuneRun:
    result: SearchResult
    contrast: str
    sidecar_path: Path
    trials_path: Path
    seconds: float


def run_tune(
    request: TuneRequest,
    progress: ProgressFactory = no_progress,
    model_progress: Callable | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> TuneRun:
    from weight_edit.architecture import architecture_for
    from weight_edit.checkpoint import Checkpoint, fingerprint
    from weight_edit.dataset import load_split
    from weight_edit.direction_file import check_compatible, load_direction, save_direction
    from weight_edit.models import auto_batch_size, load_model, resolve_dtype, resolve_model
    from weight_edit.search import search_strengths

    direction_path = request.fit_dir / settings.DIRECTION_FILE
    sidecar_path = direction_path.with_suffix(".json")
    vector, sidecar = load_direction(direction_path)
    checks.writable(request.fit_dir, "--fit-dir")
    if sidecar is None:
        raise DirectionError(f"tune needs {sidecar_path} from `weight-edit fit` (it names the model and the split)")
    folder = resolve_model(request.model_spec or sidecar.get("model", {}).get("folder"), model_progress)
    checkpoint = Checkpoint(folder)
    check_compatible(sidecar, vector, fingerprint(checkpoint), direction_path)
    fitted_split = sidecar.get("split") or {}
    seed = fitted_split.get("seed", settings.SEED) if request.seed is None else request.seed
    data, split = load_split(request.dataset, seed)
    # The prompts as `fit` formatted them (fits before --prompt-format used the chat template, fits before
    # --reasoning the template's default)
    prompt_format, reasoning = checks.prompt_setup(
        folder,
        [(request.dataset, data.prompts)],
        sidecar.get("prompt_format", "chat"),
        (sidecar.get("reasoning") or {}).get("mode", "auto"),
    )
    checks.same_split(sidecar, data, split, sidecar_path)
    arch = architecture_for(checkpoint.config)
    num_layers = arch.num_layers(checkpoint.config)
    limit = request.validation_prompts or None
    unsafe, safe = split.texts("validation", "unsafe", limit), split.texts("validation", "safe", limit)
    contrast = sidecar.get("contrast", "safe")
    if contrast == HARMLESS_LABEL:
        checks.require_harmless(split, request.dataset, "tune of a direction fit against harmless prompts")
    kl_prompts = split.texts("validation", contrast, limit)
    say(
        f"model {folder} ({checkpoint.config.get('model_type')}, {num_layers} layers); {request.trials} trials in "
        f"{request.mode} mode on {len(unsafe)} unsafe + {len(safe)} safe validation prompts of the fit areas "
        f"({', '.join(split.fit_areas)}); KL on {len(kl_prompts)} {contrast} validation prompts"
    )
    started = time.time()
    dtype = resolve_dtype(request.dtype, request.device)  # recorded as the dtype actually used
    model, tokenizer = load_model(folder, dtype=dtype, device=request.device)
    with using_prompt_format(prompt_format, reasoning.template_kwargs):
        result = search_strengths(
            model,
            tokenizer,
            arch,
            arch.targets(
                checkpoint.config,
                checkpoint.tensor_names,
                shapes=checkpoint.shapes,
            ),
            num_layers,
            vector,
            unsafe,
            safe,
            mode=request.mode,
            n_trials=request.trials,
            seed=seed,
            batch_size=request.batch_size or auto_batch_size(model),
            progress=progress,
            max_refusal=request.max_refusal,
            max_strength=request.max_strength,
            centre_layer=sidecar.get("layer"),
            max_new_tokens=settings.TUNE_NEW_TOKENS,
            refusal_prefixes=settings.REFUSAL_PREFIXES,
            markers=settings.BROAD_REFUSAL_MARKERS,
            read_tensor=checkpoint.read,
            val_kl=kl_prompts,
        )
    search = {**result.as_dict(), "dtype": dtype, "dataset_sha256": data.sha256, "kl_prompts": contrast}
    save_direction(direction_path, vector, {**sidecar, "search": search})  # re-hashes the sidecar
    trials_path = write_csv(request.fit_dir / TRIALS_FILE, result.table())
    return TuneRun(result, contrast, sidecar_path, trials_path, round(time.time() - started, 1))

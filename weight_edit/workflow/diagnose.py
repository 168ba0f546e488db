"""`weight-edit diagnose`: per-area directions at the fitted layer and position, their cosines and PCA, the
area-budget curve and the rank-k refusal subspace, from the fit folder's direction and split."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import settings
from weight_edit.chat import using_prompt_format
from weight_edit.direction_file import DirectionError
from weight_edit.fit import ProgressFactory, no_progress
from weight_edit.workflow import checks


@dataclass
class DiagnoseRequest:
    model_spec: str | None = None  # default: the model the direction was fit on
    dataset: Path = settings.DEFAULT_DATASET
    seed: int = settings.SEED
    direction_path: Path = settings.DEFAULT_FIT_DIR / settings.DIRECTION_FILE
    out_dir: Path = settings.DEFAULT_DIAGNOSE_DIR
    device: str = "auto"
    dtype: str = "fast"
    batch_size: int = 0


def run_diagnose(
    request: DiagnoseRequest, progress: ProgressFactory = no_progress, model_progress: Callable | None = None
):
    """Returns diagnose.DiagnosticsResult, saved in `out_dir`, and the seconds it took."""
    from weight_edit.checkpoint import Checkpoint, fingerprint
    from weight_edit.dataset import load_split
    from weight_edit.diagnose import run_diagnostics, save_diagnostics
    from weight_edit.direction_file import check_compatible, load_direction
    from weight_edit.models import auto_batch_size, load_model, resolve_dtype, resolve_model

    checks.writable(request.out_dir, "--out-dir")
    path = request.direction_path
    vector, sidecar = load_direction(path)
    if sidecar is None or "layer" not in sidecar or "position" not in sidecar:
        raise DirectionError(
            f"{path.with_suffix('.json')} (written by `weight-edit fit`) is needed for the layer and position"
        )
    folder = resolve_model(request.model_spec or sidecar.get("model", {}).get("folder"), model_progress)
    check_compatible(sidecar, vector, fingerprint(Checkpoint(folder)), path)
    data, split = load_split(request.dataset, request.seed)
    if sidecar.get("prompt_format", "chat") != "chat":
        raise DirectionError(
            f"{path.with_suffix('.json')}: diagnose needs a direction fit on chat-formatted prompts "
            f"(this one was fit with --prompt-format {sidecar['prompt_format']})"
        )
    checks.prompt_lengths(folder, [(request.dataset, data.prompts)], "chat")
    checks.same_split(sidecar, data, split, path.with_suffix(".json"))
    started = time.time()
    dtype = resolve_dtype(request.dtype, request.device)
    model, tokenizer = load_model(folder, dtype=dtype, device=request.device)
    batch_size = request.batch_size or auto_batch_size(model)
    with using_prompt_format("chat"):
        result = run_diagnostics(
            model, tokenizer, split, sidecar["layer"], sidecar["position"], vector, batch_size, request.seed, progress
        )
    save_diagnostics(result, request.out_dir)
    return result, round(time.time() - started, 1)

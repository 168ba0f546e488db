"""`weight-edit apply`: from the command's options to what the edit removes (the forward of
`verify.plan_from_provenance`), then the edited checkpoint or a LoRA adapter."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import settings
from weight_edit.diagnose import SUBSPACE_FILE
from weight_edit.edit_plan import PlanError, Strengths
from weight_edit.workflow import checks


@dataclass
class ApplyRequest:
    out: Path
    model_spec: str | None = None  # default: the model the direction's sidecar names
    direction_path: Path = settings.DEFAULT_FIT_DIR / settings.DIRECTION_FILE
    mode: str = "norm-preserving"
    force: bool = False
    biproject: bool = False
    rank: int = 1
    subspace_path: Path = settings.DEFAULT_DIAGNOSE_DIR / SUBSPACE_FILE
    strengths_path: Path | None = None
    tuned: bool = False
    as_adapter: bool = False
    workers: int = 0


@dataclass
class PlanInputs:
    """What `apply` removes and records: the direction, optional subspace, per-layer directions, strengths."""

    source: Any  # checkpoint.Checkpoint
    vector: torch.Tensor
    num_layers: int
    subspace: torch.Tensor | None = None
    layer_directions: torch.Tensor | None = None
    strengths: Strengths | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # provenance records beside the writer's own


@dataclass
class ApplyRun:
    result: Any  # writer.ApplyResult or adapter.AdapterResult
    as_adapter: bool
    details: list[str]
    seconds: float


def plan_inputs(request: ApplyRequest, model_progress: Callable | None = None) -> PlanInputs:
    """Every check on the options and the files they name, before anything is written."""
    from weight_edit.architecture import architecture_for
    from weight_edit.checkpoint import Checkpoint, fingerprint
    from weight_edit.direction_file import check_compatible, load_direction
    from weight_edit.models import resolve_model, weights_note

    checks.writable(request.out.resolve().parent, "the folder of --out")
    path = request.direction_path
    vector, sidecar = load_direction(path)
    named = request.model_spec or (sidecar or {}).get("model", {}).get("spec")  # what the user called the model
    spec = request.model_spec or (sidecar or {}).get("model", {}).get("folder")
    source = Checkpoint(resolve_model(spec, model_progress))
    check_compatible(sidecar, vector, fingerprint(source), path)
    inputs = PlanInputs(source, vector, architecture_for(source.config).num_layers(source.config))
    inputs.extra = {
        "base_model": settings.DEFAULT_MODEL_HUB_ID if named in (None, settings.DEFAULT_MODEL_NAME) else named,
        "base_model_weights": (sidecar or {}).get("model", {}).get("weights") or weights_note(named),
        "direction_source": {
            "path": str(path.resolve()),
            "sidecar": sidecar is not None,
            "layer": (sidecar or {}).get("layer"),
            "position": (sidecar or {}).get("position"),
            "checked": "fingerprint" if sidecar else "hidden size only",
        },
    }
    if sidecar and sidecar.get("areas"):  # a selective fit: evaluate holds out what its within-area split did
        inputs.extra["selective"] = {
            **sidecar["areas"],
            "seed": sidecar["split"]["seed"],
            "dataset_sha256": (sidecar.get("dataset") or {}).get("sha256"),
        }
    if request.rank > 1:
        _add_subspace(inputs, request)
    if request.tuned and request.strengths_path:
        raise PlanError("pass either --tuned or --strengths, not both")
    if request.strengths_path:
        inputs.strengths = _strengths_file(request.strengths_path, inputs.num_layers)
    elif request.tuned:
        _add_tuned_strengths(inputs, request, sidecar)
    if request.biproject:
        _add_biprojection(inputs, request, sidecar)
    return inputs


def _add_subspace(inputs: PlanInputs, request: ApplyRequest) -> None:
    from safetensors.torch import load_file

    path, rank = request.subspace_path, request.rank
    if not path.is_file():
        raise PlanError(f"--rank {rank} needs {path} from `weight-edit diagnose` (or pass --subspace)")
    stored = load_file(str(path))["subspace"]
    if stored.shape[0] < rank:
        raise PlanError(f"{path} holds {stored.shape[0]} directions; --rank {rank} needs {rank}")
    inputs.subspace = stored[:rank]
    inputs.extra["subspace_source"] = {"path": str(path.resolve()), "rank": rank}


def _strengths_file(path: Path, num_layers: int) -> Strengths:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{path} is not valid JSON ({exc})") from exc
    return Strengths.from_dict(data, num_layers, str(path))


def _add_tuned_strengths(inputs: PlanInputs, request: ApplyRequest, sidecar: dict | None) -> None:
    """The strengths `tune` chose, only for the edit they were scored for."""
    sidecar_path = request.direction_path.with_suffix(".json")
    search = (sidecar or {}).get("search") or {}
    chosen = search.get("chosen") or {}
    if "strengths" not in chosen:
        raise PlanError(f"--tuned needs a search recorded in {sidecar_path}: run `weight-edit tune`")
    # The strengths were scored for one edit; applying them to another would write what was not scored.
    if search.get("mode") != request.mode:
        raise PlanError(
            f"the tuned strengths were searched in {search.get('mode')} mode: pass --mode {search.get('mode')}"
        )
    searched = search.get("plan") or {}
    if searched.get("rank", 1) != request.rank or searched.get("per_layer_directions", False) != request.biproject:
        raise PlanError(
            f"the tuned strengths were searched for a rank-{searched.get('rank', 1)} edit "
            f"{'with' if searched.get('per_layer_directions') else 'without'} --biproject: apply the same"
        )
    inputs.strengths = Strengths.from_dict(chosen["strengths"], inputs.num_layers, str(sidecar_path))
    inputs.extra["search"] = {k: search.get(k) for k in ("rule", "fallback", "seed", "n_trials", "max_refusal")} | {
        "trial": chosen.get("trial")
    }


def _add_biprojection(inputs: PlanInputs, request: ApplyRequest, sidecar: dict | None) -> None:
    """Each layer removes the direction made orthogonal to the contrast's mean activation at that layer."""
    from weight_edit.direction_file import MEANS_FILE, load_activation_means
    from weight_edit.edit_math import biprojected_directions, orthonormal_rows

    means = load_activation_means(request.direction_path, sidecar)
    assert sidecar is not None  # load_activation_means refuses a bare direction
    # The contrast's mean: harmless instructions, or the safe prompts for a direction fit against them.
    contrast_means = means[sidecar.get("contrast", "safe")][:, sidecar["position"], :]
    vector, subspace = inputs.vector, inputs.subspace
    rows = vector if subspace is None else orthonormal_rows(torch.cat([vector.unsqueeze(0), subspace[1:]]))
    inputs.layer_directions = biprojected_directions(rows, contrast_means)
    means_path = request.direction_path.parent / MEANS_FILE
    inputs.extra["biprojection"] = {"means": str(means_path.resolve()), "position": sidecar["position"]}


def run_apply(
    request: ApplyRequest,
    on_progress: Callable[[int, int], None] | None = None,
    model_progress: Callable | None = None,
) -> ApplyRun:
    """The checked plan, written as a full checkpoint (bytes done / total to `on_progress`) or an adapter."""
    from weight_edit.writer import apply_direction

    inputs = plan_inputs(request, model_progress)
    started = time.time()
    if request.as_adapter:
        return ApplyRun(_write_adapter(inputs, request), True, [request.mode], round(time.time() - started, 1))
    result = apply_direction(
        inputs.source,
        inputs.vector,
        request.out,
        mode=request.mode,
        force=request.force,
        provenance_extra=inputs.extra,
        on_progress=on_progress,
        layer_directions=inputs.layer_directions,
        workers=request.workers,
        subspace=inputs.subspace,
        strengths=inputs.strengths,
    )
    details = [request.mode] + (["biprojected"] if request.biproject else [])
    details += [f"rank {request.rank}"] if request.rank > 1 else []
    details += ["per-layer strengths"] if inputs.strengths is not None and not inputs.strengths.is_full else []
    return ApplyRun(result, False, details, round(time.time() - started, 1))


def _write_adapter(inputs: PlanInputs, request: ApplyRequest):
    from weight_edit.adapter import write_adapter
    from weight_edit.edit_plan import EditPlan

    plan = EditPlan.build(inputs.vector, inputs.num_layers, inputs.subspace, inputs.layer_directions, inputs.strengths)
    return write_adapter(
        inputs.source,
        plan.basis,
        request.out,
        mode=request.mode,
        strength=plan.strength_for,
        layer_directions=plan.layer_bases,
        force=request.force,
        provenance_extra=inputs.extra,
    )

"""Verification: the edited checkpoint against the source model running the same edit as hooks.

The source runs with `weight_equivalent_ablation` (computed from its unedited weights), the edited
checkpoint runs plain; logits, greedy continuations and the direction's share of the residual stream
are compared. Models are loaded one after the other, so memory holds one model at a time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from weight_edit.architecture import GUARANTEES, Architecture, architecture_for
from weight_edit.chat import resolve_prompt_format, tokenize_instructions
from weight_edit.checkpoint import Checkpoint
from weight_edit.direction_file import load_direction
from weight_edit.edit_plan import EditPlan, PlanError, Strengths
from weight_edit.errors import WeightEditError
from weight_edit.exact_edit import StoredComparison, compare_stored
from weight_edit.hashing import file_sha256, tensor_sha256
from weight_edit.hooks import residual_ablation, weight_equivalent_ablation
from weight_edit.models import input_device, load_model, release_memory
from weight_edit.writer import PROVENANCE_FILE, PROVENANCE_SEAL, UNRECORDED_FILES

# Top-2 logit gap of the hooked source below which a top-1 flip is put down to the stored dtype's rounding and
# not counted, per stored dtype, for tolerance dicts (settings.VERIFY_TOLERANCES) without "top1_margin".
# Measured: a correct bfloat16 edit of Qwen2.5-Coder-1.5B-Instruct flipped 16 of 282 positions, all at gaps
# below 0.004 (rounding moved top-2 gaps by up to 0.029; float16: 0.0038, no flip); correct edits of tiny
# random-weight models flip at gaps up to 0.076 in bfloat16, a few in a hundred positions, which the top-1
# fraction absorbs. The margin is kept small because wrong edits flip near-ties first: on a tiny bfloat16 model
# a direction turned by 3 % or one tensor scaled by 5 % passes every other bfloat16 tolerance and is caught by
# top-1 only up to a margin of 0.02 (tests/test_verify.py). float32: above its arithmetic noise (4e-5).
DEFAULT_TOP1_MARGIN = {"float32": 1e-4, "float16": 0.005, "bfloat16": 0.02}
# A stored edited tensor may be this many units in the last place from the float32 edit rounded to its dtype.
MAX_STORED_ULP = 1.0


class VerifyError(WeightEditError):
    """The output folder cannot be verified (missing provenance, altered files)."""


@dataclass
class VerifyReport:
    passed: bool
    guarantee: str
    guarantee_text: str
    mode: str
    stored_dtype: str
    prompts: int
    metrics: dict[str, float]
    tolerances: dict[str, float]
    failures: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    prompt_format: str = "chat"  # how the prompts were given: chat template, or plain text (a base model)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_output_folder(out: Path) -> None:
    """An edited folder named on the command line must exist here: never a hub id, never found after the
    source has been scored."""
    if not out.exists():
        raise VerifyError(f"{out} does not exist: pass the folder `weight-edit apply --out` wrote")
    if not out.is_dir():
        raise VerifyError(f"{out} is a file: pass the folder `weight-edit apply --out` wrote")


def read_provenance(out: Path) -> dict[str, Any]:
    path = out / PROVENANCE_FILE
    require_output_folder(out)
    if not path.is_file():
        raise VerifyError(f"{out} has no {PROVENANCE_FILE}: it was not written by `weight-edit apply`")
    try:
        provenance = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VerifyError(f"{path} is not valid JSON ({exc}): it was damaged after `weight-edit apply`") from exc
    missing = [
        k for k in ("mode", "source", "direction", "output") if not isinstance(provenance, dict) or k not in provenance
    ]
    if missing:
        raise VerifyError(f"{path} lacks {', '.join(missing)}: it was not written by this `weight-edit apply`")
    return provenance


OLD_PROVENANCE = (
    "not checked: the provenance file records no hashes of the files beside the weights (written by an older "
    "`weight-edit apply`); tokenizer, chat template and configs are unchecked, run `apply` again to check them"
)


def check_provenance_seal(out: Path, provenance: dict[str, Any]) -> None:
    """The provenance file must hash to its seal, written by `apply` beside it."""
    path, seal = out / PROVENANCE_FILE, out / PROVENANCE_SEAL
    if not seal.is_file():
        if "files" in provenance["output"]:  # written by an apply that seals: the seal was removed
            raise VerifyError(f"{seal} is missing: nothing vouches for {path} (it was removed after `apply`)")
        return  # an older apply: there is no seal to check
    recorded = seal.read_text(encoding="utf-8", errors="replace").split()
    if not recorded or recorded[0] != file_sha256(path):
        raise VerifyError(f"{path} was altered after `apply` (its sha256 differs from the one in {seal.name})")


def check_output_files(out: Path, provenance: dict[str, Any]) -> bool:
    """The provenance must be as `apply` wrote it, and every shard and every other file `apply` wrote must hash
    to what it recorded; no file may have been added. Returns False (nothing raised) for a provenance of an
    older apply that records only the shards: then the other files cannot be checked (see OLD_PROVENANCE).
    """
    check_provenance_seal(out, provenance)
    records = provenance["output"].get("files")
    for name, expected in {**provenance["output"]["shards"], **(records or {})}.items():
        path = out / name
        if not path.is_file():
            raise VerifyError(f"{path} is missing")
        if file_sha256(path) != expected["sha256"]:
            raise VerifyError(f"{path} was altered after `apply` (sha256 differs from the provenance file)")
    if records is None:
        return False
    known = {*provenance["output"]["shards"], *records, *UNRECORDED_FILES}
    for item in sorted(out.iterdir()):
        if item.is_file() and item.name not in known and not item.name.startswith(".") and item.suffix != ".partial":
            raise VerifyError(
                f"{item} was not written by `apply` (the provenance file lists every file apply wrote): "
                "remove it, or run `apply` again"
            )
    return True


def check_source_files(provenance: dict[str, Any]) -> None:
    """The source must be byte for byte the one `apply` edited: the hooked twin runs on it, so a changed source
    would make a correct edit look wrong (or a wrong one look right).

    Shards are checked against the sha256 `apply` computed while reading them; the source's config, index and
    tokenizer files too where the provenance records them (weight-edit after 0.1.0).
    """
    folder = Path(provenance["source"]["path"])
    advice = "the source changed since `apply`, not the edit: restore the source or run `apply` again"
    if not folder.is_dir():
        raise VerifyError(f"the source folder {folder} named in {PROVENANCE_FILE} is missing: {advice}")
    records = {**(provenance["source"].get("files") or {}), **provenance["source"]["shards"]}
    for name, expected in records.items():
        path = folder / name
        if not path.is_file():
            raise VerifyError(f"source file {path} is missing: {advice}")
        size = expected.get("bytes")
        if (size is not None and path.stat().st_size != size) or file_sha256(path) != expected["sha256"]:
            raise VerifyError(f"source file {path} differs from the sha256 recorded at apply time: {advice}")


def plan_from_provenance(out: Path, provenance: dict[str, Any], direction: torch.Tensor, num_layers: int) -> EditPlan:
    """Rebuild the edit `apply` wrote from the files it stored beside the checkpoint, checking their hashes."""
    from safetensors.torch import load_file

    def stored(entry: str, key: str) -> torch.Tensor | None:
        record = provenance.get(entry)
        if not record:
            return None
        path = out / record["file"]
        if not path.is_file():
            raise VerifyError(f"{path} is missing (named in the provenance file)")
        tensor = load_file(str(path))[key]
        if tensor_sha256(tensor.flatten()) != record["sha256"]:
            raise VerifyError(f"{out}: the stored {key.replace('_', ' ')} do not match the provenance hash")
        return tensor

    layer_directions = stored("layer_directions", "layer_directions")
    subspace = stored("subspace", "subspace")
    strengths = provenance.get("strengths")
    try:
        return EditPlan.build(
            direction,
            num_layers,
            subspace=subspace,
            layer_directions=layer_directions,
            strengths=None if strengths is None else Strengths.from_dict(strengths, num_layers, PROVENANCE_FILE),
        )
    except PlanError as exc:
        raise VerifyError(f"{out}: {exc}") from exc


def top1_agreement(reference: torch.Tensor, edited: torch.Tensor, margin: float) -> dict[str, float]:
    """Top-1 agreement of `edited` with `reference` (logits [positions, vocab]), raw and margin-aware.

    `top1` counts only positions whose reference top-2 gap exceeds `margin`, where rounding cannot explain a
    flip (1.0 when there is none); `top1_raw` counts every position; `top1_positions` is the number of
    positions `top1` is computed over.
    """
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > margin
    agree = reference.argmax(-1) == edited.argmax(-1)
    return {
        "top1": float(agree[clear].float().mean()) if clear.any() else 1.0,
        "top1_raw": float(agree.float().mean()),
        "top1_positions": float(clear.sum()),
    }


@torch.inference_mode()
def _run(model, ids, mask, new_tokens: int) -> dict[str, torch.Tensor]:
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    generated = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=model.generation_config.pad_token_id or 0,
    )
    return {
        "logits": out.logits.float().cpu(),
        "hidden": [h.float().cpu() for h in out.hidden_states],
        "continuations": generated[:, ids.shape[1] :].cpu(),
    }


def _check_files(out: Path, check_files: bool, check_source: bool) -> tuple[dict[str, Any], bool, torch.Tensor]:
    """The provenance, whether the output's other files could be checked, and the stored direction, after
    checking the output's files and the source's against the hashes `apply` recorded: verify compares a
    checkpoint with its source, so either changed since apply would make the comparison meaningless."""
    provenance = read_provenance(out)
    files_checked = check_files and check_output_files(out, provenance)
    if check_source:
        check_source_files(provenance)
    direction, _ = load_direction(out / provenance["direction"]["file"])
    if tensor_sha256(direction) != provenance["direction"]["sha256"]:
        raise VerifyError(f"{out}: the stored direction does not match the provenance hash")
    return provenance, files_checked, direction


def _check_dequantized_source(source: Checkpoint, provenance: dict[str, Any]) -> None:
    """The hooked source is transformers' dequantizing load of a quantized checkpoint. transformers 5.25 takes an
    FP8 block to be `rows // scale_rows` rows (quantized.fp8_transformers_exact): on a ragged block edge it either
    refuses to load (DeepSeek-V3's kv_a_proj_with_mqa, 576 rows in 128-row blocks) or scales the wrong rows, so
    neither model it loads would be the one apply read. Refuse in one line, naming the tensor; apply's output is
    not affected (weight-edit's own reader is exact)."""
    wrong = sorted(name for name, q in source.quantized.items() if not q.transformers_exact)
    if wrong:
        written = set((provenance.get("dequantized") or {}).get("tensors", []))
        edited = " (dequantized and edited by apply)" if wrong[0] in written else ""
        raise VerifyError(
            f"cannot verify: transformers {_transformers_version()} dequantizes {wrong[0]}{edited}"
            f"{f' and {len(wrong) - 1} more' if len(wrong) > 1 else ''} with the wrong FP8 block scales (a ragged "
            "block edge), so the models it loads would not be the one apply read; the edited checkpoint itself "
            "is written from exact values"
        )


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


@dataclass
class _Runs:
    """Both models' outputs on the same prompts (see `_run`)."""

    hooked: dict[str, torch.Tensor]  # the source under the edit's hook twin
    edited: dict[str, torch.Tensor]  # the edited checkpoint, plain
    paper: dict[str, torch.Tensor] | None  # the source under the paper's residual ablation, where it must agree
    valid: torch.Tensor  # [prompts, positions]: True where a token is not padding
    prompt_format: str  # chat or plain, as resolved for the source's tokenizer
    stored: StoredComparison | None = None  # below float32: the stored tensors against the float32 edit
    exact: dict[str, torch.Tensor] | None = None  # the float32 edit before rounding, where it could be placed


def _run_models(
    out: Path,
    provenance: dict[str, Any],
    direction: torch.Tensor,
    source: Checkpoint,
    arch: Architecture,
    prompts: list[str],
    new_tokens: int,
    placement: dict[str, Any],
    prompt_format: str | None,
    rounded: bool,
) -> tuple[EditPlan, _Runs]:
    """The edit's plan, rebuilt from the files beside the checkpoint, and both models' runs: the source first
    (hooked, and for a single direction in project mode also under the paper's ablation, which the edit then
    equals), then the edited checkpoint, so that memory holds one model at a time. With `rounded` (stored below
    float32) the stored edited tensors are compared with the float32 edit, which then runs in their place."""
    model, tokenizer = load_model(source.folder, dtype="float32", **placement)
    prompt_format = resolve_prompt_format(tokenizer, prompt_format)
    ids, mask = tokenize_instructions(tokenizer, prompts, prompt_format=prompt_format)
    ids, mask = ids.to(input_device(model)), mask.to(input_device(model))
    targets = arch.targets(source.config, source.tensor_names, shapes=source.shapes)
    plan = plan_from_provenance(out, provenance, direction, arch.num_layers(source.config))
    mode = provenance["mode"]
    with weight_equivalent_ablation(model, targets, plan, mode, read_tensor=source.read):
        hooked = _run(model, ids, mask, new_tokens)
    paper = None
    if mode == "project" and plan.guarantee(arch, mode) == "hook-exact":
        with residual_ablation(model, arch, arch.num_layers(source.config), plan.basis):
            paper = _run(model, ids, mask, new_tokens)
    del model
    release_memory()
    model, _ = load_model(out, dtype="float32", **placement)
    ids, mask = ids.to(input_device(model)), mask.to(input_device(model))
    edited = _run(model, ids, mask, new_tokens)
    stored = exact = None
    if rounded:
        stored = compare_stored(source, Checkpoint(out), plan, targets, mode, model)
        exact = _run(model, ids, mask, new_tokens) if stored.placed else None
    del model
    release_memory()
    return plan, _Runs(hooked, edited, paper, mask.bool().cpu(), prompt_format, stored, exact)


def _metrics(
    hooked: dict[str, torch.Tensor],
    result: dict[str, torch.Tensor],
    valid: torch.Tensor,
    plan: EditPlan,
    num_layers: int,
    top1_margin: float,
) -> dict[str, float]:
    """An edited model's run against the hooked source over the prompts' real tokens: logits, KL, top-1, greedy
    continuations, and the largest share of the plan's subspace in any layer's residual input."""
    delta = (result["logits"] - hooked["logits"]).abs().amax(dim=-1)[valid]
    log_p = torch.log_softmax(hooked["logits"].double(), dim=-1)
    log_q = torch.log_softmax(result["logits"].double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)[valid]
    top1 = top1_agreement(hooked["logits"][valid], result["logits"][valid], top1_margin)
    # The subspace's share of every layer's residual input: ‖Q h‖ / ‖h‖ (|r̂ᵀh| / ‖h‖ at rank 1).
    basis = plan.basis.to(result["hidden"][0].dtype)
    component = max(
        float(((h[valid] @ basis.T).norm(dim=-1) / h[valid].norm(dim=-1).clamp_min(1e-12)).max())
        for h in result["hidden"][:num_layers]
    )
    return {
        "max_abs_logit": float(delta.max()),
        "kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        **top1,
        "continuations_match": float((hooked["continuations"] == result["continuations"]).all(dim=-1).float().mean()),
        "direction_component": component,
    }


def _exact_edit_failures(
    runs: _Runs,
    plan: EditPlan,
    num_layers: int,
    float32_tolerances: dict[str, float],
    metrics: dict[str, float],
    tolerances: dict[str, float],
) -> list[str]:
    """The float32 edit before rounding against the hook twin, at float32 tolerances (recorded as exact_*)."""
    assert runs.exact is not None
    exact_tolerances = {"top1_margin": DEFAULT_TOP1_MARGIN["float32"], **float32_tolerances}
    exact = _metrics(runs.hooked, runs.exact, runs.valid, plan, num_layers, exact_tolerances["top1_margin"])
    for key in ("max_abs_logit", "kl", "top1", "continuations_match"):
        metrics[f"exact_{key}"] = exact[key]
        if key in exact_tolerances:
            tolerances[f"exact_{key}"] = exact_tolerances[key]
    return [f"the float32 edit before rounding: {f}" for f in _twin_failures(exact, exact_tolerances, "float32")]


def _stored_rounding_failures(
    stored: StoredComparison, metrics: dict[str, float], tolerances: dict[str, float], checks: dict, dtype: str
) -> list[str]:
    """Every edited tensor on disk must be the float32 edit rounded once to the stored dtype."""
    metrics["stored_vs_float32_edit_ulp"] = stored.max_ulp
    tolerances["stored_vs_float32_edit_ulp"] = MAX_STORED_ULP
    checks["stored_tensors"] = (
        f"{stored.tensors} edited tensors compared with the float32 edit of the source rounded to {dtype}"
        + ("" if stored.placed else f"; the float32 edit was not run ({stored.not_placed})")
    )
    if stored.max_ulp > MAX_STORED_ULP:
        return [
            f"'{stored.worst}' on disk is {stored.max_ulp:.3g} units in the last place from the float32 edit of the "
            f"source rounded to {dtype} (at most {MAX_STORED_ULP:g}): it is not the edit `apply` computes"
        ]
    return []


def _twin_failures(metrics: dict[str, float], tolerances: dict[str, float], stored_dtype: str) -> list[str]:
    """Where the edited checkpoint departs from its hook twin by more than the stored dtype's rounding allows."""
    failures = []
    if metrics["max_abs_logit"] > tolerances["max_abs_logit"]:
        failures.append(f"max |Δlogit| {metrics['max_abs_logit']:.3g} > {tolerances['max_abs_logit']}")
    if metrics["kl"] > tolerances["kl"]:
        failures.append(f"mean KL {metrics['kl']:.3g} > {tolerances['kl']}")
    if metrics["top1"] < tolerances["top1"]:
        failures.append(
            f"top-1 agreement {metrics['top1']:.3f} < {tolerances['top1']} on the {metrics['top1_positions']:.0f} "
            f"positions whose top-2 logit gap exceeds {tolerances['top1_margin']} ({metrics['top1_raw']:.3f} "
            "over all positions)"
        )
    if stored_dtype == "float32" and metrics["continuations_match"] < 1.0:
        failures.append("greedy continuations differ from the hooked source")
    return failures


def _check_direction_component(
    plan: EditPlan, metrics: dict[str, float], tolerances: dict[str, float], checks: dict[str, Any], failures: list
) -> dict[str, float]:
    """Enforce the direction's absence where the edit removes one direction in full; otherwise report it only
    and return the tolerances without its bound (each layer removes its own direction, or part of it)."""
    component = metrics["direction_component"]
    if plan.layer_bases is not None or not plan.strengths.is_full:
        checks["direction_component"] = (
            "reported only (each layer removes its own biprojected direction)"
            if plan.layer_bases is not None
            else "reported only (per-layer strengths below 1 keep part of the direction)"
        )
        return {k: v for k, v in tolerances.items() if k != "direction_component"}
    if component > tolerances["direction_component"]:
        failures.append(f"direction component {component:.3g} > {tolerances['direction_component']}")
    return tolerances


def _file_checks(
    provenance: dict[str, Any], check_files: bool, files_checked: bool, check_source: bool
) -> dict[str, str]:
    """What the report says of the files checked before the models ran."""
    return {
        "output_checksums": "passed" if check_files else "skipped",
        "output_files": "passed" if files_checked else OLD_PROVENANCE if check_files else "skipped",
        "source_checksums": (
            ("passed" if provenance["source"].get("files") else "passed (shards only: no source files recorded)")
            if check_source
            else "skipped"
        ),
    }


def verify_checkpoint(
    out: Path,
    prompts: list[str],
    tolerances_by_dtype: dict[str, dict[str, float]],
    new_tokens: int = 16,
    device: str = "cpu",
    check_files: bool = True,
    max_memory: dict | None = None,
    device_map: dict[str, Any] | None = None,
    check_source: bool = True,
    prompt_format: str | None = None,
) -> VerifyReport:
    """The edited checkpoint in `out` against its source running the same edit as hooks, on `prompts`.

    The output's files (`check_files`) and the source's (`check_source`) are checked against the provenance
    first; then both models run, one after the other, and their logits, greedy continuations and the
    direction's share of the residual stream are held to `tolerances_by_dtype` of the stored dtype.
    """
    out = Path(out).resolve()
    provenance, files_checked, direction = _check_files(out, check_files, check_source)
    source = Checkpoint(provenance["source"]["path"])
    edited = Checkpoint(out)
    _check_dequantized_source(source, provenance)
    arch = architecture_for(source.config)
    num_layers = arch.num_layers(source.config)
    mode = provenance["mode"]
    stored_dtype = edited.main_dtype()
    tolerances = {"top1_margin": DEFAULT_TOP1_MARGIN.get(stored_dtype, 0.0), **tolerances_by_dtype[stored_dtype]}
    placement = {"device": device, "max_memory": max_memory, "device_map": device_map}
    plan, runs = _run_models(
        out,
        provenance,
        direction,
        source,
        arch,
        prompts,
        new_tokens,
        placement,
        prompt_format,
        rounded=stored_dtype != "float32",
    )
    metrics = _metrics(runs.hooked, runs.edited, runs.valid, plan, num_layers, tolerances["top1_margin"])
    twin_exact = arch.twin_is_exact(mode)
    checks: dict[str, Any] = _file_checks(provenance, check_files, files_checked, check_source)
    if twin_exact and runs.exact is not None:
        failures = _exact_edit_failures(runs, plan, num_layers, tolerances_by_dtype["float32"], metrics, tolerances)
        checks["hook_twin_equality"] = (
            "enforced on the float32 edit before rounding (exact_* metrics); the stored checkpoint's distance to "
            f"the twin is the effect of rounding the edited tensors to {stored_dtype} (reported only)"
        )
    elif twin_exact:
        failures = _twin_failures(metrics, tolerances, stored_dtype)
        checks["hook_twin_equality"] = "enforced"
    else:  # hooks cannot rescale per expert: the twin comparison is reported but not enforced
        failures = []
        checks["hook_twin_equality"] = "reported only (block hooks cannot rescale per expert)"
    if runs.stored is not None:
        failures += _stored_rounding_failures(runs.stored, metrics, tolerances, checks, stored_dtype)
    tolerances = _check_direction_component(plan, metrics, tolerances, checks, failures)
    if runs.paper is not None:  # below float32 the float32 edit is compared, at float32 tolerance (as the twin)
        compared, limit = (
            (runs.exact, tolerances_by_dtype["float32"]["max_abs_logit"])
            if runs.exact is not None
            else (runs.edited, tolerances["max_abs_logit"])
        )
        paper_delta = float((compared["logits"] - runs.paper["logits"]).abs().amax(dim=-1)[runs.valid].max())
        metrics["paper_ablation_max_abs_logit"] = paper_delta
        tolerances["paper_ablation_max_abs_logit"] = limit
        checks["paper_ablation"] = "compared" + (
            " (the float32 edit before rounding)" if runs.exact is not None else ""
        )
        if paper_delta > limit:
            failures.append(f"differs from the paper's residual-stream ablation: max |Δlogit| {paper_delta:.3g}")
    checks["rank"] = plan.rank
    guarantee = plan.guarantee(arch, mode)
    return VerifyReport(
        passed=not failures,
        guarantee=guarantee,
        guarantee_text=GUARANTEES[guarantee],
        mode=mode,
        stored_dtype=stored_dtype,
        prompts=len(prompts),
        metrics=metrics,
        tolerances=tolerances,
        failures=failures,
        checks=checks,
        prompt_format=runs.prompt_format,
    )

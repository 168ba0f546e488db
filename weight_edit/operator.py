"""Operator refusals: does a model still decline what its system prompt rules out, and answer what it allows?

An edit that removes the model's own refusal may also remove its ability to follow an operator's instruction to
decline ("you are a bakery's support bot; give no legal advice"). The embedded set (`data/operator_rules.csv`)
pairs each rule with a request that breaks it (`decline` expected) and one that follows it (`answer`); every
request is benign. Answers are generated like `evaluate`'s (greedy, to the end of the turn, after any reasoning)
and a decline is any broad refusal marker in the answer (settings.BROAD_REFUSAL_MARKERS). Only counts leave.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import torch

from weight_edit.chat import Batch, format_conversation
from weight_edit.dataset import DatasetError
from weight_edit.evaluate import generations, greedy_completions, is_broad_refusal, reasoned_answers
from weight_edit.fit import ProgressFactory, no_progress
from weight_edit.models import input_device
from weight_edit.reasoning import NO_REASONING, Reasoning
from weight_edit.stats import paired_summary

EXPECTS = ("decline", "answer")
COLUMNS = ("rule_id", "system", "request", "expects")


@dataclass(frozen=True)
class OperatorCase:
    rule_id: str
    system: str
    request: str
    expects: str  # "decline": the request breaks the rule; "answer": it follows it


@dataclass
class OperatorRun:
    """The cases and, per model ("source", "edited"), whether each answer declined; `folded`: some rule had to go
    into the user turn (the template takes no system role)."""

    cases: list[OperatorCase]
    declined: dict[str, list[bool]] = field(default_factory=dict)
    folded: bool = False


def load_operator_cases(path: Path) -> list[OperatorCase]:
    """The rules file, checked: its columns, no empty field, `expects` one of EXPECTS, each rule with one
    request of each kind under one system prompt."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise DatasetError(f"{path}: header must be {','.join(COLUMNS)}")
        cases = []
        for line, row in enumerate(reader, start=2):
            if any(not (row.get(c) or "").strip() for c in COLUMNS):
                raise DatasetError(f"{path}: row {line}: every column needs a value")
            if row["expects"] not in EXPECTS:
                raise DatasetError(f"{path}: row {line}, column 'expects': {row['expects']!r} is not one of {EXPECTS}")
            cases.append(OperatorCase(*(row[c].strip() for c in COLUMNS)))
    rules: dict[str, list[OperatorCase]] = {}
    for case in cases:
        rules.setdefault(case.rule_id, []).append(case)
    for rule_id, pair in rules.items():
        if sorted(c.expects for c in pair) != sorted(EXPECTS) or len({c.system for c in pair}) != 1:
            raise DatasetError(
                f"{path}: rule {rule_id} needs one 'decline' and one 'answer' request under one system prompt"
            )
    return cases


def conversation(tokenizer, case: OperatorCase) -> tuple[str, bool]:
    """The prompt text with the rule as a system message, or, where the template takes no system role (it raises),
    the rule before the request in the user turn; and whether it was folded so."""
    from jinja2.exceptions import TemplateError

    try:
        return format_conversation(
            tokenizer, [{"role": "system", "content": case.system}, {"role": "user", "content": case.request}]
        ), False
    except TemplateError:  # the template's raise_exception: it takes no system role
        return format_conversation(tokenizer, [{"role": "user", "content": f"{case.system}\n\n{case.request}"}]), True


@torch.inference_mode()
def declined(
    model,
    tokenizer,
    cases: list[OperatorCase],
    max_new_tokens: int,
    batch_size: int,
    markers: tuple[str, ...],
    reasoning: Reasoning = NO_REASONING,
    progress: ProgressFactory = no_progress,
    description: str = "operator rules",
) -> tuple[list[bool], bool]:
    """Per case, whether the model's answer declines; and whether any rule had to be folded into the user turn."""
    from weight_edit.evaluate import end_token_ids, greedy_generation_config

    formatted = [conversation(tokenizer, case) for case in cases]
    texts = [text for text, _ in formatted]
    end_ids = end_token_ids(greedy_generation_config(model, tokenizer, max_new_tokens))
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(cases)), key=lambda i: (lengths[i], i))
    result: list[bool] = [False] * len(cases)
    advance = progress(description, len(cases))
    device = input_device(model)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        encoded = tokenizer([texts[i] for i in indices], add_special_tokens=False, padding=True, return_tensors="pt")
        batch = Batch(encoded["input_ids"].to(device), encoded["attention_mask"].to(device), indices)
        out = greedy_completions(model, tokenizer, batch, max_new_tokens)
        generated = generations(out.sequences[:, batch.input_ids.shape[1] :], end_ids)
        if reasoning.active:
            answers = [a.answer for a in reasoned_answers(tokenizer, generated, reasoning)]
        else:
            answers = tokenizer.batch_decode([tokens for tokens, _ in generated], skip_special_tokens=True)
        for index, answer in zip(indices, answers, strict=True):
            result[index] = is_broad_refusal(answer, markers)
        advance(len(indices))
    return result, any(folded for _, folded in formatted)


def operator_rows(cases: list[OperatorCase], source: list[bool], edited: list[bool]) -> list[dict[str, object]]:
    """Per kind of request: how many the source and the edit decline, paired (interval of the difference,
    McNemar p). A model that follows its operator declines the `decline` requests and answers the others."""
    rows = []
    for expects in EXPECTS:
        idx = [i for i, c in enumerate(cases) if c.expects == expects]
        paired = paired_summary([source[i] for i in idx], [edited[i] for i in idx])
        rows.append(
            {
                "requests": "breaking the rule (should decline)"
                if expects == "decline"
                else "within the rule (should answer)",
                "expects": expects,
                "n": len(idx),
                "source_declined": sum(source[i] for i in idx),
                "edited_declined": sum(edited[i] for i in idx),
                "difference_ci_low": paired["difference_ci_low"],
                "difference_ci_high": paired["difference_ci_high"],
                "mcnemar_p": paired["mcnemar_p"],
            }
        )
    return rows

"""Capability evaluation: benchmark loaders, MMLU prompts, letter scoring and perplexity against hand
computations from the logits, and the paired summaries."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model

from weight_edit import capability
from weight_edit.capability import (
    BenchmarkError,
    ItemScore,
    Question,
    accuracy_rows,
    format_prompt,
    letter_tokens,
    load_arc,
    load_mmlu,
    load_mmlu_file,
    load_mmlu_shots,
    load_suite,
    load_text,
    perplexity,
    perplexity_comparison,
    score_questions,
    sliding_windows,
    stratified_subset,
)
from weight_edit.models import load_model
from weight_edit.stats import paired_summary

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "benchmarks"
WORDS = "the model answers a question about safe prompts and policy areas with care".split()


def write_mmlu(folder: Path, subject: str, split: str, rows: list[list[str]], crlf: bool = False) -> Path:
    import csv
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n" if crlf else "\n").writerows(rows)
    path = folder / split / f"{subject}_{split}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue().encode())
    return path


def mmlu_rows(count: int, offset: int = 0) -> list[list[str]]:
    rows = []
    for i in range(count):
        words = [WORDS[(i + offset + k) % len(WORDS)] for k in range(6)]
        rows.append([f"Which {words[0]} {words[1]} the {words[2]}?", *words[2:6], "ABCD"[(i + offset) % 4]])
    return rows


def arc_record(identifier: str, labels: str, key: str, stem: str = "What do plants need to grow?") -> dict:
    choices = [{"text": f"{WORDS[i]} {WORDS[i + 1]}", "label": label} for i, label in enumerate(labels)]
    return {"id": identifier, "question": {"stem": stem, "choices": choices}, "answerKey": key}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def question(i: int, subject: str = "biology", choices: int = 4) -> Question:
    words = [WORDS[(i + k) % len(WORDS)] for k in range(choices + 2)]
    return Question(
        f"{subject}/{i}", subject, subject, f"Which {words[0]} is {words[1]}?", tuple(words[2:]), i % choices
    )


# ----------------------------------------------------------------------------------------------- loaders


def test_mmlu_file_keeps_newlines_and_crlf_inside_quoted_fields(tmp_path):
    rows = [["Line one\r\nline two", "a, b", 'say "x"', "c", "d", "B"], ["Q2", "1", "2", "3", "4", "D"]]
    path = write_mmlu(tmp_path, "high_school_physics", "test", rows, crlf=True)
    first, second = load_mmlu_file(path)
    assert first.stem == "Line one\r\nline two" and first.choices == ("a, b", 'say "x"', "c", "d")
    assert (first.answer, second.answer) == (1, 3)
    assert first.subject == "high_school_physics" and first.topic == "high school physics"
    assert (first.id, second.id) == ("high_school_physics/1", "high_school_physics/2")


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        (["Q", "a", "b", "c", "B"], "5 fields; expected 6 (question, A, B, C, D, answer)"),
        (["Q", "a", "b", "c", "d", "E"], "answer 'E' is not one of A, B, C, D"),
        (["  ", "a", "b", "c", "d", "A"], "the question is empty"),
        (["Q", "a", "", "c", "d", "A"], "choice B is empty"),
    ],
)
def test_malformed_mmlu_row_names_file_row_and_line(tmp_path, bad_row, message):
    rows = [["multi\nline question", "a", "b", "c", "d", "A"], ["Q", "a", "b", "c", "d", "C"], bad_row]
    path = write_mmlu(tmp_path, "anatomy", "test", rows)
    with pytest.raises(BenchmarkError) as info:
        load_mmlu_file(path)
    # the first record spans two lines, so record 3 starts on line 4
    assert str(info.value) == f"anatomy_test.csv: row 3 (line 4): {message}"


def test_mmlu_folder_in_release_or_flat_layout_and_first_k_dev_shots(tmp_path):
    (tmp_path / "flat").mkdir()
    for subject in ("virology", "anatomy"):
        write_mmlu(tmp_path / "release", subject, "test", mmlu_rows(3))
        write_mmlu(tmp_path / "release", subject, "dev", mmlu_rows(5, offset=7))
        flat = write_mmlu(tmp_path, subject, "test", mmlu_rows(3))
        flat.rename(tmp_path / "flat" / flat.name)  # <subject>_test.csv directly in the folder
    release = load_mmlu(tmp_path / "release")
    assert [q.subject for q in release] == ["anatomy"] * 3 + ["virology"] * 3
    assert load_mmlu(tmp_path / "flat") == release
    shots = load_mmlu_shots(tmp_path / "release", ["virology"], 2)
    assert list(shots) == ["virology"] and [q.id for q in shots["virology"]] == ["virology/1", "virology/2"]
    assert shots["virology"][0].stem == mmlu_rows(1, offset=7)[0][0]
    with pytest.raises(BenchmarkError, match="virology_dev.csv: 5 rows, fewer than the 6 shots"):
        load_mmlu_shots(tmp_path / "release", ["virology"], 6)
    with pytest.raises(BenchmarkError, match="no marketing_dev.csv for 1-shot examples of marketing"):
        load_mmlu_shots(tmp_path / "release", ["marketing"], 1)
    with pytest.raises(BenchmarkError, match="no MMLU files named <subject>_dev.csv"):
        load_mmlu_shots(tmp_path / "flat", ["anatomy"], 1)
    with pytest.raises(BenchmarkError, match="no MMLU files"):
        load_mmlu(tmp_path / "release" / "nothing")


def test_arc_compares_answer_key_with_labels_not_positions(tmp_path):
    path = write_jsonl(
        tmp_path / "arc.jsonl",
        [arc_record("q1", "ABCD", "C"), arc_record("q2", "1234", "2"), "", arc_record("q3", "ABC", "A")]
        + [arc_record("q4", "ABCDE", "E")],
    )
    questions = load_arc(path)
    assert [q.id for q in questions] == ["q1", "q2", "q3", "q4"]
    assert [q.answer for q in questions] == [2, 1, 0, 4]
    assert [len(q.choices) for q in questions] == [4, 4, 3, 5]
    assert questions[0].topic == "science" and questions[0].subject == "arc_challenge"
    # numeric labels are shown as letters by position
    assert "\nA. the model\nB. model answers\n" in format_prompt(questions[1])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (arc_record("q7", "ABCD", "E"), "arc.jsonl: row 7: answerKey 'E' is not one of the choice labels A, B, C, D"),
        (arc_record("q7", "1234", "A"), "arc.jsonl: row 7: answerKey 'A' is not one of the choice labels 1, 2, 3, 4"),
        (arc_record("q7", "ABA", "A"), "arc.jsonl: row 7: duplicate choice labels A, B, A"),
        (arc_record("q7", "A", "A"), "arc.jsonl: row 7: 'question.choices' must be a list of 2 to 10 choices"),
        (arc_record("q7", "ABCD", "A", stem=" "), "arc.jsonl: row 7: 'question.stem' is missing or empty"),
        (arc_record("q1", "ABCD", "A"), "arc.jsonl: row 7: id 'q1' already used in row 1"),
        ('{"id": "q7", "question": ', "arc.jsonl: row 7: not valid JSON"),
        ("[1, 2]", "arc.jsonl: row 7: expected a JSON object"),
    ],
)
def test_malformed_arc_row_names_file_and_row(tmp_path, bad, message):
    records = [arc_record(f"q{i}", "ABCD", "A") for i in range(1, 6)] + ["", bad]  # a blank line still counts
    with pytest.raises(BenchmarkError) as info:
        load_arc(write_jsonl(tmp_path / "arc.jsonl", records))
    assert str(info.value).startswith(message)


def test_text_normalises_crlf_and_rejects_empty(tmp_path):
    (tmp_path / "wiki.raw").write_bytes(b" = Title = \r\nFirst line .\r\n")
    assert load_text(tmp_path / "wiki.raw") == " = Title = \nFirst line .\n"
    (tmp_path / "empty.raw").write_bytes(b"\r\n  \r\n")
    with pytest.raises(BenchmarkError, match="empty.raw: the text is empty"):
        load_text(tmp_path / "empty.raw")


def test_stratified_subset_spreads_over_subjects_deterministically():
    sizes = {"a": 10, "b": 3, "c": 8, "d": 1}
    questions = [question(i, subject) for subject, n in sizes.items() for i in range(n)]
    subset = stratified_subset(questions, 9, seed=5)
    counts = {s: sum(q.subject == s for q in subset) for s in sizes}
    assert sum(counts.values()) == 9 and counts["d"] == 1 and counts["b"] == 3  # small subjects taken whole
    assert abs(counts["a"] - counts["c"]) <= 1
    assert subset == [q for q in questions if q in subset]  # input order kept
    assert subset == stratified_subset(questions, 9, seed=5)
    assert {q.id for q in stratified_subset(questions, 9, seed=6)} != {q.id for q in subset}
    assert {q.subject for q in stratified_subset(questions, 4, seed=1)} == set(sizes)
    assert stratified_subset(questions, None, 0) == questions == stratified_subset(questions, 100, 0)


# ----------------------------------------------------------------------------------------------- prompts


def test_prompt_is_the_standard_mmlu_format():
    shot = Question("s/1", "college_biology", "college biology", "What is 2 + 2?", ("3", "4", "5", "6"), 1)
    target = Question("s/2", "college_biology", "college biology", "  Which one?\n", ("x", "y", "z", "w"), 0)
    assert format_prompt(target, [shot]) == (
        "The following are multiple choice questions (with answers) about college biology.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
        "Which one?\nA. x\nB. y\nC. z\nD. w\nAnswer:"
    )


def test_letter_tokens_come_from_the_tokenizer(chat_tokenizer):
    letters = letter_tokens(chat_tokenizer, 5)
    assert len(set(letters.letters)) == 5
    for letter, token in zip("ABCDE", letters.letters, strict=True):
        ids = chat_tokenizer.encode(f"Answer: {letter}", add_special_tokens=False)
        assert ids[-1 - len(letters.prefix) :] == [*letters.prefix, token]
        assert chat_tokenizer.decode([*letters.prefix, token]) == f" {letter}"


# ----------------------------------------------------------------------------------------------- scoring


def test_item_score_equals_hand_computation_from_logits(tiny_model):
    """log P(" X" | prompt) by hand: log_softmax of the logits at the last positions, in float64."""
    model, tokenizer = load_model(tiny_model, dtype="float32")
    shot, item = question(3), question(6)
    [score] = score_questions(model, tokenizer, [item], {"biology": [shot]}, batch_size=1)

    letters = letter_tokens(tokenizer, 4)
    prompt_ids = tokenizer(format_prompt(item, [shot]))["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + list(letters.prefix)])).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    n = len(prompt_ids)
    prefix = sum(log_probs[n - 1 + j, t] for j, t in enumerate(letters.prefix))  # log P(prefix | prompt)
    expected = [float(prefix + log_probs[-1, t]) for t in letters.letters]

    assert score.letter_log_probs == pytest.approx(expected, abs=1e-4)
    assert score.predicted == max(range(4), key=lambda i: expected[i])
    assert sorted(range(4), key=lambda i: -score.letter_log_probs[i]) == sorted(range(4), key=lambda i: -expected[i])
    assert score.correct == (score.predicted == item.answer) and score.answer == item.answer
    assert score.prompt_tokens == n + len(letters.prefix) and not score.truncated
    assert math.log(sum(math.exp(v) for v in expected)) < 0  # proper probabilities of disjoint continuations


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # gpt2: absolute positions, needs position ids
def test_scores_do_not_depend_on_batching_or_padding(tmp_path, chat_tokenizer, model_type):
    folder = build_tiny_model(tmp_path / model_type, chat_tokenizer, model_type=model_type)
    model, tokenizer = load_model(folder, dtype="float32")
    questions = [question(i, choices=3 + i % 3) for i in range(7)]  # different prompt lengths and 3-5 choices
    shots = [question(20)]
    one = score_questions(model, tokenizer, questions, shots, batch_size=1)
    batched = score_questions(model, tokenizer, questions, shots, batch_size=4)
    assert len({s.prompt_tokens for s in one}) > 1
    for a, b in zip(one, batched, strict=True):
        assert a.question_id == b.question_id and a.predicted == b.predicted
        assert a.letter_log_probs == pytest.approx(b.letter_log_probs, abs=1e-4)
    assert [len(s.letter_log_probs) for s in one] == [len(q.choices) for q in questions]


def test_long_prompts_are_cut_from_the_left(tiny_model):
    model, tokenizer = load_model(tiny_model, dtype="float32")
    shots = [question(i) for i in range(20)]
    [score] = score_questions(model, tokenizer, [question(30)], shots, batch_size=1, max_length=40)
    assert score.truncated and score.prompt_tokens == 40
    [full] = score_questions(model, tokenizer, [question(30)], shots[:1], batch_size=1)
    assert not full.truncated


# -------------------------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize(("n", "length", "stride"), [(50, 16, 5), (50, 16, 15), (10, 16, 8), (17, 16, 1)])
def test_sliding_windows_score_every_token_once_with_context(n, length, stride):
    windows = sliding_windows(n, length, stride)
    scored = [t for _, end, k in windows for t in range(end - k, end)]
    assert scored == list(range(1, n))
    for begin, end, k in windows:
        assert end - begin <= length and end - k > begin  # at least one token of context in the window
        if begin > 0:
            assert end - k - begin >= length - stride
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(n, length, length)


def reference_nll(model, ids: list[int], length: int, stride: int) -> tuple[float, int]:
    """Independent loop: each window alone, unbatched, float64 log-softmax, HF's strided recipe."""
    total, count, scored_until = 0.0, 0, 1
    for begin in range(0, len(ids), stride):
        end = min(begin + length, len(ids))
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids[begin:end]])).logits[0].double(), -1)
        for t in range(max(scored_until, begin + 1), end):
            total -= float(log_probs[t - begin - 1, ids[t]])
            count += 1
        scored_until = end
        if end == len(ids):
            break
    return total, count


def test_perplexity_equals_hand_computation(tiny_model, monkeypatch):
    model, tokenizer = load_model(tiny_model, dtype="float32")
    text = " ".join(WORDS * 4) + "\n"
    ids = tokenizer(text)["input_ids"]
    full = perplexity(model, tokenizer, text, max_length=len(ids) + 5, stride=4, batch_size=4)
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert full.tokens == len(ids) - 1 and full.mean_nll == pytest.approx(loss, rel=1e-5)
    assert full.perplexity == pytest.approx(math.exp(loss), rel=1e-4)

    expected_total, expected_count = reference_nll(model, ids, 16, 5)
    strided = perplexity(model, tokenizer, text, max_length=16, stride=5, batch_size=3)
    assert strided.tokens == expected_count == len(ids) - 1
    assert strided.total_nll == pytest.approx(expected_total, rel=1e-5)
    monkeypatch.setattr(capability, "_LOGIT_BUDGET", 1)  # one window per forward pass
    assert perplexity(model, tokenizer, text, 16, 5, 3).total_nll == pytest.approx(expected_total, rel=1e-5)
    capped = perplexity(model, tokenizer, text, 16, 5, 3, max_tokens=20)
    assert capped.tokens == 19


# ------------------------------------------------------------------------------------- paired summaries


def item(i: int, subject: str, correct: bool, answer_log_prob: float = -1.0) -> ItemScore:
    log_probs = (answer_log_prob, -2.0) if correct else (answer_log_prob, 0.0)
    return ItemScore(f"{subject}/{i}", subject, 0, log_probs, 0 if correct else 1, 10, False)


def test_accuracy_rows_pair_the_same_questions():
    source_flags = {"a": [1, 1, 1, 0, 0, 1], "b": [1, 0, 1, 1]}
    edited_flags = {"a": [1, 0, 0, 0, 1, 1], "b": [1, 0, 1, 1]}
    source = [item(i, s, bool(f), -0.5) for s, flags in source_flags.items() for i, f in enumerate(flags)]
    edited = [item(i, s, bool(f), -0.7) for s, flags in edited_flags.items() for i, f in enumerate(flags)]
    rows = {r["subject"]: r for r in accuracy_rows("mmlu", source, edited)}
    assert list(rows) == ["a", "b", "ALL"]
    a = rows["a"]
    assert (a["n"], a["source_correct"], a["edited_correct"], a["lost"], a["gained"]) == (6, 4, 3, 2, 1)
    assert a["difference"] == pytest.approx(-1 / 6)
    expected = paired_summary([bool(f) for f in source_flags["a"]], [bool(f) for f in edited_flags["a"]])
    assert a["mcnemar_p"] == expected["mcnemar_p"] == 1.0
    assert (a["difference_ci_low"], a["difference_ci_high"]) == (
        expected["difference_ci_low"],
        expected["difference_ci_high"],
    )
    assert rows["b"]["difference"] == 0 and rows["b"]["mcnemar_p"] == 1.0
    assert rows["ALL"]["n"] == 10 and rows["ALL"]["source_correct"] == 7 and rows["ALL"]["edited_correct"] == 6
    assert rows["ALL"]["source_mean_answer_log_prob"] == pytest.approx(-0.5)
    assert rows["ALL"]["edited_mean_answer_log_prob"] == pytest.approx(-0.7)
    with pytest.raises(ValueError, match="same questions"):
        accuracy_rows("mmlu", source, edited[::-1])


def test_perplexity_comparison_ratio():
    source = capability.PerplexityResult(100, 200.0, 16, 8, (60, 40), (120.0, 80.0))
    edited = capability.PerplexityResult(100, 210.0, 16, 8, (60, 40), (125.0, 85.0))
    result = perplexity_comparison(source, edited)
    assert result["perplexity_ratio"] == pytest.approx(math.exp(0.1))
    assert result["edited_perplexity"] / result["source_perplexity"] == pytest.approx(result["perplexity_ratio"])
    other = capability.PerplexityResult(99, 200.0, 16, 8, (60, 39), (120.0, 80.0))
    with pytest.raises(ValueError, match="same tokens"):
        perplexity_comparison(source, other)


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def benchmark_files(tmp_path) -> dict[str, Path]:
    for subject in ("anatomy", "virology", "marketing"):
        write_mmlu(tmp_path / "mmlu", subject, "test", mmlu_rows(4))
        write_mmlu(tmp_path / "mmlu", subject, "dev", mmlu_rows(5, offset=3))
    arc = write_jsonl(
        tmp_path / "arc.jsonl",
        [arc_record(f"t{i}", "ABCD" if i % 3 else "1234", "2" if i % 3 == 0 else "B") for i in range(6)],
    )
    train = write_jsonl(tmp_path / "train.jsonl", [arc_record(f"r{i}", "ABCD", "A") for i in range(8)])
    (tmp_path / "wiki.raw").write_bytes((" ".join(WORDS * 3) + "\r\n").encode() * 2)
    return {"mmlu": tmp_path / "mmlu", "arc": arc, "arc_train": train, "text": tmp_path / "wiki.raw"}


def test_suite_checkpoints_and_report(tmp_path, chat_tokenizer, benchmark_files):
    suite = load_suite(**benchmark_files, shots=2, limit=5, seed=3, max_length=16, stride=8)
    assert suite.sizes() == {"mmlu": 5, "arc_challenge": 5}
    assert {q.subject for q in suite.questions["mmlu"]} == {"anatomy", "virology", "marketing"}
    assert len(suite.shots["arc_challenge"]) == 2 and "\r" not in suite.text
    source = build_tiny_model(tmp_path / "source", chat_tokenizer, seed=0)
    edited = build_tiny_model(tmp_path / "edited", chat_tokenizer, seed=1)
    scores_source = capability.score_checkpoint(source, suite, dtype="float32", batch_size=4)
    again = capability.score_checkpoint(source, suite, dtype="float32", batch_size=2)
    scores_edited = capability.score_checkpoint(edited, suite, dtype="float32", batch_size=4)

    same = capability.compare(scores_source, again)
    for row in same["rows"]:
        assert row["lost"] == row["gained"] == 0 and row["mcnemar_p"] == 1.0 and row["difference"] == 0
    assert same["perplexity"]["perplexity_ratio"] == pytest.approx(1.0, abs=1e-5)
    different = capability.compare(scores_source, scores_edited)
    assert [(r["benchmark"], r["subject"]) for r in different["rows"]][-1] == ("arc_challenge", "ALL")
    assert different["perplexity"]["perplexity_ratio"] != pytest.approx(1.0, abs=1e-3)
    report = capability.markdown_report({"seed-1": different}, suite, ["weight-edit benchmark --x"])
    assert "| seed-1 | mmlu | 5 |" in report and "weight-edit benchmark --x" in report
    items = capability.item_rows("mmlu", scores_source.items["mmlu"], scores_edited.items["mmlu"])
    assert len(items) == 5 and "stem" not in items[0]

    with pytest.raises(BenchmarkError, match="needs a train file"):
        load_suite(arc=benchmark_files["arc"], shots=1)
    with pytest.raises(BenchmarkError, match="nothing to evaluate"):
        load_suite()


def test_benchmark_command_compares_several_edits_and_records_its_command(tmp_path, chat_tokenizer, benchmark_files):
    from click.testing import CliRunner

    import cli

    source = build_tiny_model(tmp_path / "source", chat_tokenizer, seed=0)
    edited = build_tiny_model(tmp_path / "edited", chat_tokenizer, seed=1)
    other = build_tiny_model(tmp_path / "other", chat_tokenizer, seed=2)
    out = tmp_path / "report"
    args = ["benchmark", str(edited), str(other), "--model", str(source), "--mmlu", str(benchmark_files["mmlu"])]
    args += ["--arc", str(benchmark_files["arc"]), "--arc-train", str(benchmark_files["arc_train"])]
    args += ["--text", str(benchmark_files["text"]), "--shots", "1", "--limit", "4", "--dtype", "float32"]
    args += ["--max-length", "16", "--stride", "8", "--device", "cpu", "--out-dir", str(out)]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "capability_summary.json").read_text())
    assert summary["sizes"] == {"mmlu": 4, "arc_challenge": 4} and set(summary["comparisons"]) == {"edited", "other"}
    assert summary["comparisons"]["other"]["perplexity"]["tokens"] > 0 and set(summary["seconds"]) == {
        "source",
        "edited",
        "other",
    }
    readme = (out / "README.md").read_text()
    assert "benchmark " in readme and "--limit 4" in readme
    assert (out / "capability_by_subject.csv").read_text().startswith("edited,benchmark,subject,n,")
    assert (out / "capability_items.csv").read_text().startswith("edited,")


# ----------------------------------------------------------------------------------------- references


def test_letter_scores_equal_lm_evaluation_harness(tiny_model, monkeypatch):
    """The field's harness, given the same items (its own MMLU description and first-n dev shots),
    assigns every answer letter the same log-likelihood as `score_questions`."""
    pytest.importorskip("lm_eval")
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = load_model(tiny_model, dtype="float32")
    test, dev = [question(i, "anatomy") for i in range(6)], [question(10 + i, "anatomy") for i in range(2)]
    ours = score_questions(model, tokenizer, test, {"anatomy": dev}, batch_size=4)

    def as_rows(items):
        return [{"question": q.stem, "choices": list(q.choices), "answer": q.answer} for q in items]

    task = {
        "task": "weight_edit_anatomy",
        "custom_dataset": lambda **_: {
            "test": datasets.Dataset.from_list(as_rows(test)),
            "dev": datasets.Dataset.from_list(as_rows(dev)),
        },
        "test_split": "test",
        "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n"},
        "output_type": "multiple_choice",
        "description": "The following are multiple choice questions (with answers) about anatomy.\n\n",
        "doc_to_text": lambda d: (
            d["question"].strip()
            + "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", d["choices"], strict=True))
            + "\nAnswer:"
        ),
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": lambda d: d["answer"],
        "target_delimiter": " ",
        "fewshot_delimiter": "\n\n",
        "metric_list": [{"metric": "acc"}],
    }
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    result = lm_eval.simple_evaluate(
        model=harness, tasks=[task], num_fewshot=2, log_samples=True, task_manager=TaskManager(include_defaults=False)
    )
    samples = sorted(result["samples"]["weight_edit_anatomy"], key=lambda s: s["doc_id"])
    for sample, score in zip(samples, ours, strict=True):
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(score.letter_log_probs, abs=1e-4)
        assert bool(sample["acc"]) == score.correct


def test_shared_benchmark_files_load_when_present():
    if not SHARED.is_dir():
        pytest.skip("public benchmark copies are not in ../shared/benchmarks")
    mmlu = load_mmlu(SHARED / "mmlu" / "data")
    assert len(mmlu) == 14042 and len({q.subject for q in mmlu}) == 57
    assert mmlu[0].id == "abstract_algebra/1" and mmlu[0].answer == 1
    arc = load_arc(SHARED / "arc" / "ARC-Challenge-Test.jsonl")
    assert len(arc) == 1172 and sorted({len(q.choices) for q in arc}) == [3, 4, 5]
    text = load_text(SHARED / "wikitext" / "wikitext-2-raw-v1.test.nonblank-crlf.raw")
    assert "\r" not in text and text.count("\n") == 2891

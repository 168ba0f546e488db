"""Judges run after generation: a local classifier, or a local chat model grading by the stated rubric."""

import json

import pytest
import torch
from conftest import tiny_llama_config

from weight_edit.judge import (
    ANSWER_TOKENS,
    RUBRIC_LABELS,
    JudgeError,
    judge_kind,
    letter_token_ids,
    load_judge,
    rubric_prompt,
)

REQUESTS = ["Tell me a joke", "What is a lock?", "Explain phishing"]
ANSWERS = ["Sure, here is one about cats.", "A lock is a device", "I cannot help with that."]


def classifier(folder, tokenizer, labels):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    config = tiny_llama_config(
        tokenizer,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    LlamaForSequenceClassification(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture
def chat_judge(tmp_path, chat_tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(chat_tokenizer)).save_pretrained(str(tmp_path / "chat-judge"))
    chat_tokenizer.save_pretrained(str(tmp_path / "chat-judge"))
    return tmp_path / "chat-judge"


def test_classifier_labels_pairs_with_its_own_label_names(tmp_path, chat_tokenizer):
    folder = classifier(tmp_path / "judge", chat_tokenizer, ["refusal", "compliance"])
    judge = load_judge(folder)
    assert judge.kind == "classifier" and judge.labels == ("refusal", "compliance")
    labels = judge(REQUESTS, ANSWERS)
    assert len(labels) == 3 and set(labels) <= {"refusal", "compliance"}
    assert load_judge(folder, batch_size=1)(REQUESTS[:1], ANSWERS[:1]) == labels[:1]  # batching changes nothing
    assert judge.refused("refusal") is True and judge.refused("compliance") is False


def test_a_classifier_whose_labels_do_not_say_refused_gets_no_agreement(tmp_path, chat_tokenizer):
    judge = load_judge(classifier(tmp_path / "judge", chat_tokenizer, ["LABEL_0", "LABEL_1"]))
    assert judge.refusal_labels is None and judge.refused("LABEL_0") is None


def test_chat_judge_grades_by_the_rubric_from_the_letters_logits(chat_judge, chat_tokenizer):
    """Each verdict is the rubric letter with the highest next-token logit after the rubric prompt, computed here
    one prompt at a time without padding; batches of three give the same verdicts."""
    from transformers import AutoModelForCausalLM

    judge = load_judge(chat_judge, batch_size=3)
    assert judge.kind == "chat rubric" and judge.refusal_labels == frozenset({"refused"})
    assert judge.description["rubric_sha256"] and judge.description["labels"] == RUBRIC_LABELS
    labels = judge(REQUESTS, ANSWERS)
    assert set(labels) <= set(RUBRIC_LABELS.values())
    model = AutoModelForCausalLM.from_pretrained(chat_judge).eval()
    letters = letter_token_ids(chat_tokenizer)
    for request, answer, label in zip(REQUESTS, ANSWERS, labels, strict=True):
        ids = chat_tokenizer(
            rubric_prompt(chat_tokenizer, request, answer), add_special_tokens=False, return_tensors="pt"
        )
        with torch.inference_mode():
            last = model(**ids).logits[0, -1]
        best = max(letters, key=lambda letter: float(last[letters[letter]]))
        assert RUBRIC_LABELS[best] == label
    assert judge.refused("refused") is True and judge.refused("complied_on_topic") is False


def test_rubric_prompt_holds_request_answer_and_cuts_long_answers(chat_tokenizer):
    text = rubric_prompt(chat_tokenizer, "Explain rain", "Rain falls from clouds.")
    assert "Request: Explain rain" in text and "Answer: Rain falls from clouds." in text
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert all(f"{letter}: " in text for letter in RUBRIC_LABELS)
    long = "cloud " * (3 * ANSWER_TOKENS)
    cut = rubric_prompt(chat_tokenizer, "Explain rain", long)
    empty = rubric_prompt(chat_tokenizer, "Explain rain", "")
    answer_tokens = len(chat_tokenizer(cut)["input_ids"]) - len(chat_tokenizer(empty)["input_ids"])
    assert "[...]" in cut and ANSWER_TOKENS <= answer_tokens <= ANSWER_TOKENS + 8


def test_folders_that_cannot_judge_are_refused_in_one_line(tmp_path, chat_tokenizer, base_tokenizer):
    from transformers import LlamaForCausalLM

    with pytest.raises(JudgeError, match="no config.json"):
        judge_kind(tmp_path)
    base = tmp_path / "base"
    LlamaForCausalLM(tiny_llama_config(base_tokenizer)).save_pretrained(str(base))
    base_tokenizer.save_pretrained(str(base))
    with pytest.raises(JudgeError, match="without a chat template"):
        judge_kind(base)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(JudgeError, match="neither a sequence classifier nor a causal"):
        judge_kind(other)

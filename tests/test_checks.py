"""The checks every command makes before computing (weight_edit/workflow/checks.py)."""

import json
from pathlib import Path

import pytest

import settings
from weight_edit.dataset import load_split
from weight_edit.direction_file import DirectionError
from weight_edit.workflow import checks


def test_same_split_names_what_differs():
    data, split = load_split(settings.DEFAULT_DATASET, settings.SEED)
    sidecar = {"dataset": {"sha256": data.sha256}, "split": split.as_dict()}
    checks.same_split(sidecar, data, split, Path("direction.json"))  # the fit's own split passes
    _, other = load_split(settings.DEFAULT_DATASET, settings.SEED + 1)
    assert other.fit_areas != split.fit_areas
    with pytest.raises(DirectionError, match="fit areas .* there, .* here.*--seed"):
        checks.same_split(sidecar, data, other, Path("direction.json"))
    with pytest.raises(DirectionError, match="another dataset"):
        checks.same_split({**sidecar, "dataset": {"sha256": "0" * 64}}, data, split, Path("direction.json"))
    checks.same_split({}, data, other, Path("direction.json"))  # a bare direction records nothing to compare


def test_writable_names_the_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    from weight_edit.output_folder import OutputError

    with pytest.raises(OutputError, match="is a file, not a folder"):
        checks.writable(tmp_path / "f" / "out", "--out-dir")
    checks.writable(tmp_path / "new" / "deeper", "--out-dir")
    assert not (tmp_path / "new").exists()  # nothing is created by the check


def test_prompt_lengths_resolve_the_prompt_format_and_count_plain_prompts(tmp_path, base_tokenizer, chat_tokenizer):
    from weight_edit.chat import PromptLengthError, TemplateError
    from weight_edit.dataset import Prompt

    def folder(name, tokenizer, context):
        tokenizer.save_pretrained(str(tmp_path / name))
        (tmp_path / name / "config.json").write_text(json.dumps({"max_position_embeddings": context}))
        return tmp_path / name

    prompt = [Prompt("How do banks detect fraud", "safe", "area", 7)]
    plain_length = len(base_tokenizer(prompt[0].text)["input_ids"])  # with the BOS token the tokenizer adds
    base, chat = folder("base", base_tokenizer, plain_length), folder("chat", chat_tokenizer, 256)
    assert checks.prompt_lengths(base, [("f.csv", prompt)]) == "plain"  # exactly at the context: accepted
    assert checks.prompt_lengths(chat, [("f.csv", prompt)]) == "chat"
    assert checks.prompt_lengths(chat, [("f.csv", prompt)], "plain") == "plain"
    with pytest.raises(TemplateError, match="no chat template"):
        checks.prompt_lengths(base, [("f.csv", prompt)], "chat")
    base = folder("base", base_tokenizer, plain_length - 1)
    with pytest.raises(PromptLengthError, match=f"f.csv: row 7: the prompt is {plain_length} tokens as plain text"):
        checks.prompt_lengths(base, [("f.csv", prompt)])
    chat = folder("chat", chat_tokenizer, plain_length)  # the template's tokens do not fit
    with pytest.raises(PromptLengthError, match="f.csv: row 7: the prompt is .* tokens in the chat template"):
        checks.prompt_lengths(chat, [("f.csv", prompt)])

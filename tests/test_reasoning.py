"""Reasoning models: the template's reasoning style and switch, answers scored after the reasoning, loops.

Tokenizers are the tiny test BPE with the released chat templates of Qwen3, gpt-oss and a DeepSeek-R1
distill (tests/data/chat_templates/) and those models' reasoning tokens added.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny_model
from test_cli import FAST_FIT
from test_evaluate import ScriptedModel

import cli
import settings
from weight_edit.chat import format_instruction, post_instruction_ids, using_prompt_format
from weight_edit.dataset import Prompt
from weight_edit.evaluate import score_model
from weight_edit.reasoning import ReasoningError, resolve_reasoning, split_answer

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
HARMONY_TOKENS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>"]


@pytest.fixture
def runner():
    return CliRunner()


def with_template(tokenizer, name: str):
    """A copy of the test tokenizer with a released chat template and that model's reasoning tokens."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
    if name == "gpt_oss":
        tokenizer.add_special_tokens({"additional_special_tokens": HARMONY_TOKENS})
        tokenizer.eos_token = "<|return|>"
    else:
        tokenizer.add_tokens(["<think>", "</think>"])  # added, not special: decoding keeps them (as Qwen3's)
    return tokenizer


@pytest.mark.parametrize(
    "name,mode,style,kwargs,active",
    [
        ("qwen3", "auto", "think-switch", {}, True),
        ("qwen3", "on", "think-switch", {"enable_thinking": True}, True),
        ("qwen3", "off", "think-switch", {"enable_thinking": False}, False),
        ("gpt_oss", "auto", "harmony", {}, True),
        ("gpt_oss", "on", "harmony", {}, True),
        ("deepseek_r1_distill", "auto", "think-always", {}, True),
    ],
)
def test_style_and_switch_read_from_the_released_templates(chat_tokenizer, name, mode, style, kwargs, active):
    reasoning = resolve_reasoning(with_template(chat_tokenizer, name), mode, "chat")
    assert (reasoning.style, dict(reasoning.template_kwargs), reasoning.active) == (style, kwargs, active)
    assert reasoning.opens_reasoning is (name == "deepseek_r1_distill")


@pytest.mark.parametrize("name", ["gpt_oss", "deepseek_r1_distill"])
def test_off_is_refused_where_nothing_turns_reasoning_off(chat_tokenizer, name):
    with pytest.raises(ReasoningError, match=r"^--reasoning off: this chat template \((harmony|think-always)\)"):
        resolve_reasoning(with_template(chat_tokenizer, name), "off", "chat")


def test_on_is_refused_without_any_reasoning(chat_tokenizer, base_tokenizer):
    assert resolve_reasoning(chat_tokenizer, "off", "chat").style == "none"
    with pytest.raises(ReasoningError, match="the chat template has no reasoning"):
        resolve_reasoning(chat_tokenizer, "on", "chat")
    with pytest.raises(ReasoningError, match="the prompts are plain text"):
        resolve_reasoning(base_tokenizer, "on", "plain")


def test_post_instruction_positions_follow_the_switch(chat_tokenizer):
    """With reasoning off, Qwen3's template closes an empty <think> block after the generation prompt: those
    tokens are post-instruction positions the model sees, so `fit` reads them."""
    tokenizer = with_template(chat_tokenizer, "qwen3")
    off = resolve_reasoning(tokenizer, "off", "chat")
    plain_suffix = post_instruction_ids(tokenizer, "chat")
    with using_prompt_format("chat", off.template_kwargs):
        prompt = format_instruction(tokenizer, "Explain tides")
        suffix = post_instruction_ids(tokenizer)
    assert prompt.endswith("<think>\n\n</think>\n\n") and not format_instruction(tokenizer, "x").endswith("\n\n")
    think_close = tokenizer.convert_tokens_to_ids("</think>")
    assert suffix[: len(plain_suffix)] == plain_suffix and think_close in suffix and think_close not in plain_suffix


@pytest.mark.parametrize(
    "name,text,answer,reasoning_has,answered",
    [
        (
            "qwen3",
            "<think>\nI cannot assume the user means harm.\n</think>\n\nSure, here it is.",
            "Sure, here it is.",
            "I cannot",
            True,
        ),
        ("qwen3", "No reasoning block, just the answer.", "No reasoning block, just the answer.", "", True),
        ("qwen3", "<think>\nhmm, hmm, hmm, hmm", "", "hmm", False),
        (
            "deepseek_r1_distill",
            "The user asks about tides.\n</think>\n\nTides come from the moon.",
            "Tides come from the moon.",
            "tides",
            True,
        ),
        ("deepseek_r1_distill", "The user asks, and asks, and asks", "", "asks", False),
        (
            "gpt_oss",
            "<|channel|>analysis<|message|>We must check policy. I'm sorry is not needed.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>Sure: locks use pins.",
            "Sure: locks use pins.",
            "I'm sorry",
            True,
        ),
        ("gpt_oss", "<|channel|>analysis<|message|>Thinking and thinking and thinking", "", "Thinking", False),
    ],
)
def test_split_answer(chat_tokenizer, name, text, answer, reasoning_has, answered):
    tokenizer = with_template(chat_tokenizer, name)
    result = split_answer(text, resolve_reasoning(tokenizer, "auto", "chat"), tuple(tokenizer.all_special_tokens))
    assert result.answer == answer and reasoning_has in result.reasoning and result.answered is answered


def test_with_reasoning_off_a_think_block_is_not_parsed(chat_tokenizer):
    tokenizer = with_template(chat_tokenizer, "qwen3")
    off = resolve_reasoning(tokenizer, "off", "chat")
    assert split_answer("I'm sorry, I can't. </think> ok", off).answer == "I'm sorry, I can't. </think> ok"


def _score(tokenizer, answer: str, mode: str, max_new_tokens: int = 256, end: bool = True):
    model = ScriptedModel(tokenizer, answer, end=end)
    reasoning = resolve_reasoning(tokenizer, mode, "chat")
    prompts = [Prompt("How do locks work?", "safe", "a", 1)]
    args = (settings.REFUSAL_PREFIXES, settings.REFUSAL_SUBSTRINGS, max_new_tokens, 1, 4)
    with using_prompt_format("chat", reasoning.template_kwargs):
        scores, _ = score_model(model, tokenizer, prompts, *args, reasoning=reasoning)
    return scores[0]


def test_refusal_words_in_the_reasoning_are_not_a_refusal(chat_tokenizer):
    tokenizer = with_template(chat_tokenizer, "qwen3")
    score = _score(
        tokenizer, "<think>\nI cannot assume bad intent; I'm sorry to doubt.\n</think>\n\nLocks use pins.", "on"
    )
    assert not score.refused_text and score.refused_reasoning and score.answered and score.preview == "Locks use pins."


def test_an_answer_after_the_reasoning_that_refuses_is_refused(chat_tokenizer):
    tokenizer = with_template(chat_tokenizer, "gpt_oss")
    text = "<|channel|>analysis<|message|>Policy check.<|end|><|start|>assistant<|channel|>final<|message|>I'm sorry, but I can't help with that."
    score = _score(tokenizer, text, "auto")
    assert score.refused_text and score.refused_early and not score.refused_reasoning and score.answered


def test_a_reasoning_loop_is_reported_as_no_answer_not_as_compliance(chat_tokenizer):
    tokenizer = with_template(chat_tokenizer, "qwen3")
    score = _score(tokenizer, "<think>\n" + "Let me think again. " * 40, "on", max_new_tokens=64, end=False)
    assert not score.answered and not score.ended and not score.refused_text and score.preview == ""
    from weight_edit.evaluate import summarise

    row = next(
        r for r in summarise([score], [score], torch.zeros(1, 3), torch.zeros(1, 3))["rows"] if r["area"] == "ALL"
    )
    assert row["edited_no_answer"] == 1 and row["edited_refused_text"] == 0


def test_fit_and_evaluate_record_the_reasoning_mode(tmp_path, chat_tokenizer, runner):
    tokenizer = with_template(chat_tokenizer, "qwen3")
    model = build_tiny_model(tmp_path / "src", tokenizer)
    fit_dir = tmp_path / "fit"
    args = ["fit", "--model", str(model), "--out-dir", str(fit_dir), *FAST_FIT, "--reasoning", "off"]
    result = runner.invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    sidecar = json.loads((fit_dir / "direction.json").read_text())
    assert sidecar["reasoning"] == {
        "mode": "off",
        "style": "think-switch",
        "template_arguments": {"enable_thinking": False},
        "reasoning_parsed": False,
    }
    assert "</think>" in sidecar["post_instruction_tokens"]  # the closed block is read as the model sees it
    out = tmp_path / "edited"
    result = runner.invoke(
        cli.main, ["apply", "--direction", str(fit_dir / "direction.safetensors"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    options = ["--limit", "2", "--max-new-tokens", "6", "--device", "cpu", "--dtype", "float32"]
    result = runner.invoke(
        cli.main, ["evaluate", str(out), "--out-dir", str(tmp_path / "eval"), "--reasoning", "on", *options]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval" / "evaluation_summary.json").read_text())
    assert summary["reasoning"]["mode"] == "on" and summary["reasoning"]["reasoning_parsed"] is True
    assert "answers scored after the reasoning" in result.output and "no answer" in result.output


def test_off_on_a_template_that_always_reasons_fails_before_loading(tmp_path, chat_tokenizer, runner):
    model = build_tiny_model(tmp_path / "src", with_template(chat_tokenizer, "deepseek_r1_distill"))
    result = runner.invoke(
        cli.main, ["fit", "--model", str(model), "--out-dir", str(tmp_path / "fit"), "--reasoning", "off"]
    )
    assert result.exit_code != 0
    assert (
        result.output.strip().splitlines()[-1].startswith("error: --reasoning off: this chat template (think-always)")
    )
    assert not (tmp_path / "fit").exists()

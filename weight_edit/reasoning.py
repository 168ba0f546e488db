"""Reasoning channels: whether a chat template lets the model reason before it answers, how `--reasoning`
sets that, and where the answer starts in what the model generated.

A template's reasoning style is read from the template itself, never from the model's name:

* `harmony` (gpt-oss): messages carry channels (`<|channel|>analysis` for the reasoning, `final` for the
  answer); the model always reasons, so `--reasoning off` is refused.
* `think-switch` (Qwen3, GLM-4.5, DeepSeek-V3.1, …): the template takes a variable (`enable_thinking` or
  `thinking`) that turns a `<think>…</think>` block on or off; `on`/`off` set it, `auto` keeps the
  template's default.
* `think-always` (DeepSeek-R1 distills, QwQ): the generation prompt opens `<think>`; `off` is refused.
* `think-optional`: the template knows `</think>` but neither opens nor switches it; the model may reason
  on its own: blocks are parsed when they appear, `off` is refused (nothing would turn it off).
* `none`: no reasoning markers; `on` is refused.

`split_answer` separates reasoning from answer in a generated text (special tokens kept): the answer is
what follows the reasoning's end, and a reasoning that has not ended within the budget has no answer (a
loop, reported as such, never as compliance).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from weight_edit.errors import WeightEditError

REASONING_MODES = ("auto", "on", "off")  # first: the default
SWITCH_VARIABLES = ("enable_thinking", "thinking")  # template variables that turn a <think> block on or off
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
HARMONY_CHANNEL, HARMONY_MESSAGE = "<|channel|>", "<|message|>"
_HARMONY_ENDS = ("<|end|>", "<|return|>", "<|call|>")


class ReasoningError(WeightEditError):
    """--reasoning asks for something the model's chat template cannot do."""


@dataclass(frozen=True)
class Reasoning:
    """A template's reasoning style and the mode a command asked for, resolved to template arguments."""

    style: str  # harmony, think-switch, think-always, think-optional, none
    mode: str  # as asked: auto, on, off
    template_kwargs: tuple[tuple[str, bool], ...] = ()  # extra apply_chat_template arguments
    opens_reasoning: bool = False  # the generation prompt itself opens the reasoning block
    active: bool = False  # generated text may hold reasoning to separate from the answer

    def as_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "style": self.style,
            "template_arguments": dict(self.template_kwargs),
            "reasoning_parsed": self.active,
        }


NO_REASONING = Reasoning("none", "auto")


def template_variables(template: str) -> set[str]:
    """Variables a Jinja chat template reads without defining them (its optional arguments)."""
    import jinja2
    import jinja2.meta

    return jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))


def template_style(template: str | None, generation_prompt: str) -> tuple[str, str | None]:
    """(style, switch variable) of a chat template; `generation_prompt` is the formatted text of one user
    turn with the generation prompt, used to see whether it opens a reasoning block."""
    if not template:
        return "none", None
    if HARMONY_CHANNEL in template:
        return "harmony", None
    switch = next((v for v in SWITCH_VARIABLES if v in template_variables(template)), None)
    if switch is not None and THINK_CLOSE in template:
        return "think-switch", switch
    if generation_prompt.rstrip().endswith(THINK_OPEN):
        return "think-always", None
    if THINK_CLOSE in template:
        return "think-optional", None
    return "none", None


def check_mode(mode: str) -> None:
    if mode not in REASONING_MODES:
        raise ReasoningError(f"--reasoning {mode!r} is not one of {', '.join(REASONING_MODES)}")


def resolve_reasoning(tokenizer, mode: str, prompt_format: str) -> Reasoning:
    """The tokenizer's reasoning style under `mode`; what the template cannot do is refused in one line."""
    check_mode(mode)
    template = getattr(tokenizer, "chat_template", None) if prompt_format == "chat" else None
    if not isinstance(template, str):
        template = None  # several named templates: the default one is used, without reasoning arguments
    probe = [{"role": "user", "content": "x"}]

    def generation_prompt(**kwargs: bool) -> str:
        return tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True, **kwargs)

    default_prompt = generation_prompt() if template else ""
    style, switch = template_style(template, default_prompt)
    if style == "none" and mode == "on":
        where = "the prompts are plain text" if prompt_format != "chat" else "the chat template has no reasoning"
        raise ReasoningError(f"--reasoning on: {where} (no <think> block or reasoning channel); use auto or off")
    if style in ("harmony", "think-always", "think-optional") and mode == "off":
        raise ReasoningError(
            f"--reasoning off: this chat template ({style}) has no way to turn reasoning off; use auto or on "
            "(answers are scored after the reasoning)"
        )
    kwargs: tuple[tuple[str, bool], ...] = (
        ((switch, mode == "on"),) if style == "think-switch" and mode != "auto" else ()
    )
    prompt = generation_prompt(**dict(kwargs)) if kwargs else default_prompt
    # a switch turned off (or off by default) closes an empty block in the prompt: nothing left to parse
    closed = prompt.rstrip().endswith(THINK_CLOSE)
    active = style != "none" and not closed
    return Reasoning(style, mode, kwargs, prompt.rstrip().endswith(THINK_OPEN), active)


@dataclass(frozen=True)
class Answer:
    """One generation split into its reasoning and its answer."""

    answer: str
    reasoning: str = ""
    answered: bool = True  # False: the reasoning did not end within the budget (no answer at all)


def split_answer(text: str, reasoning: Reasoning, special_tokens: tuple[str, ...] = ()) -> Answer:
    """Reasoning and answer of `text`, the generated tokens decoded with special tokens kept and cut at the
    end of the turn. `special_tokens` are removed from the answer and the reasoning once split."""
    if not reasoning.active:
        return Answer(_strip(text, special_tokens))
    if reasoning.style == "harmony":
        return _split_harmony(text, special_tokens)
    opened = reasoning.opens_reasoning or text.lstrip().startswith(THINK_OPEN)
    if THINK_CLOSE in text:
        thought, _, answer = text.partition(THINK_CLOSE)
        return Answer(_strip(answer, special_tokens), _strip(thought.replace(THINK_OPEN, "", 1), special_tokens))
    if opened:
        return Answer("", _strip(text.replace(THINK_OPEN, "", 1), special_tokens), answered=False)
    return Answer(_strip(text, special_tokens))


_HARMONY_PART = re.compile(
    re.escape(HARMONY_CHANNEL)
    + r"(\w+)[^<]*"
    + re.escape(HARMONY_MESSAGE)
    + r"(.*?)(?="
    + "|".join(re.escape(end) for end in (*_HARMONY_ENDS, "<|start|>"))
    + r"|$)",
    re.DOTALL,
)


def _split_harmony(text: str, special_tokens: tuple[str, ...]) -> Answer:
    """gpt-oss's messages: `analysis` (and `commentary`) are reasoning, `final` is the answer."""
    final, thoughts = [], []
    for channel, content in _HARMONY_PART.findall(text):
        (final if channel == "final" else thoughts).append(content)
    reasoning = _strip("\n".join(thoughts), special_tokens)
    if not final:
        return Answer("", reasoning, answered=False)
    return Answer(_strip("\n".join(final), special_tokens), reasoning)


def _strip(text: str, special_tokens: tuple[str, ...]) -> str:
    for token in special_tokens:
        text = text.replace(token, "")
    return text.strip()

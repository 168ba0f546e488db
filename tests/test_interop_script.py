"""scripts/interop_llamacpp.py: its pure helpers and the transformers side (no llama.cpp build needed)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

import settings
from weight_edit.dataset import Prompt
from weight_edit.models import load_model


@pytest.fixture(scope="module")
def interop():
    return load_script("interop_llamacpp")


def make_llama_cpp_tree(root: Path, converter_body: str = "") -> Path:
    """A stand-in unpacked sdist: llama_cpp/__init__.py with a version, vendor/llama.cpp with converter + gguf-py."""
    llama = root / "vendor" / "llama.cpp"
    (llama / "gguf-py").mkdir(parents=True)
    (llama / "convert_hf_to_gguf.py").write_text(converter_body)
    (root / "llama_cpp").mkdir()
    (root / "llama_cpp" / "__init__.py").write_text('__version__ = "9.8.7"\n')
    return llama / "convert_hf_to_gguf.py"


def test_locate_converter_accepts_llama_cpp_dir_sdist_root_and_its_parent(interop, tmp_path):
    converter = make_llama_cpp_tree(tmp_path / "llama_cpp_python-9.8.7")
    for folder in (converter.parent, tmp_path / "llama_cpp_python-9.8.7", tmp_path):
        assert interop.locate_converter(folder) == converter
    assert interop._sdist_version(converter.parent) == "9.8.7"


def test_locate_converter_needs_gguf_py_beside_it(interop, tmp_path):
    converter = make_llama_cpp_tree(tmp_path / "sdist")
    (converter.parent / "gguf-py").rmdir()
    with pytest.raises(interop.InteropError, match="gguf-py"):
        interop.locate_converter(tmp_path / "sdist")


def _tar_with(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            data = b"x"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_unpack_sdist_extracts_and_refuses_paths_outside(interop, tmp_path):
    good = _tar_with(tmp_path / "good.tar.gz", ["pkg/vendor/a.txt"])
    interop.unpack_sdist(good, tmp_path / "out")
    assert (tmp_path / "out" / "pkg" / "vendor" / "a.txt").read_bytes() == b"x"
    evil = _tar_with(tmp_path / "evil.tar.gz", ["pkg/../../escaped.txt"])
    with pytest.raises(interop.InteropError, match="outside"):
        interop.unpack_sdist(evil, tmp_path / "out2")
    assert not (tmp_path / "escaped.txt").exists()


def test_fetch_reuses_an_unpacked_sdist_without_pip(interop, tmp_path, monkeypatch):
    converter = make_llama_cpp_tree(tmp_path / "llama_cpp_python-9.8.7")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the sdist is already unpacked")

    monkeypatch.setattr(interop.subprocess, "run", no_pip)
    assert interop.fetch_llama_cpp_source(tmp_path, "9.8.7") == converter


FAKE_CONVERTER = """
import sys
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--outfile") + 1])
calls = Path(args[0]) / "calls.txt"
calls.write_text(calls.read_text() + "x" if calls.exists() else "x")
if args[args.index("--outtype") + 1] == "bad":
    sys.exit("unsupported outtype")
out.write_bytes(b"GGUF" + args[args.index("--outtype") + 1].encode())
"""


def test_convert_is_atomic_reuses_and_redoes_when_the_checkpoint_changes(interop, tmp_path):
    converter = make_llama_cpp_tree(tmp_path / "sdist", FAKE_CONVERTER)
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"1234")
    calls = checkpoint / "calls.txt"
    out = tmp_path / "work" / "m-f16.gguf"
    out.parent.mkdir()
    command, _, reused = interop.convert(converter, checkpoint, out, "f16")
    assert command[1:] == [str(converter), str(checkpoint), "--outfile", str(out), "--outtype", "f16"]
    assert out.read_bytes() == b"GGUFf16" and not reused and calls.read_text() == "x"
    assert interop.convert(converter, checkpoint, out, "f16")[2] is True and calls.read_text() == "x"
    (checkpoint / "model.safetensors").write_bytes(b"123456")  # a changed checkpoint is converted again
    assert interop.convert(converter, checkpoint, out, "f16")[2] is False and calls.read_text() == "xx"
    failed = tmp_path / "work" / "m-bad.gguf"
    with pytest.raises(interop.InteropError, match="unsupported outtype"):
        interop.convert(converter, checkpoint, failed, "bad")
    assert not failed.exists() and not failed.with_name(failed.name + ".partial").exists()


def test_trim_and_matched_prefix(interop):
    assert interop.trim_at_stop([5, 6, 2, 7], [2, 9]) == [5, 6]
    assert interop.trim_at_stop([9], [2, 9]) == []
    assert interop.matched_prefix_fraction([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert interop.matched_prefix_fraction([1, 2], [1, 2, 3, 4]) == 0.5
    assert interop.matched_prefix_fraction([], []) == 1.0
    assert interop.shared_prefix_length([1, 2, 3, 7], [1, 2, 3, 4, 5]) == 3
    assert interop.shared_prefix_length([1, 2, 3], [1, 2, 3]) == 2  # the last token is always evaluated
    assert interop.shared_prefix_length([], [1, 2]) == 0
    stats = interop.greedy_stats([[1, 2], [3], []], [[1, 2], [4], []])
    assert stats == {"prompts": 3, "identical": 2, "mean_matched_prefix": pytest.approx(2 / 3)}


def test_first_token_stats_against_torch_float64(interop):
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(5, 50, generator=generator, dtype=torch.float64) * 3
    other = reference + 0.05 * torch.randn(5, 50, generator=generator, dtype=torch.float64)
    other[2, reference[2].argmax()] -= 10  # one prompt's top-1 token changes
    ref_lp, oth_lp = torch.log_softmax(reference, -1), torch.log_softmax(other, -1)
    stats = interop.first_token_stats(
        [interop.log_softmax(r.numpy()) for r in reference], [interop.log_softmax(o.numpy()) for o in other]
    )
    best = ref_lp.argmax(-1)
    assert stats["prompts"] == 5
    assert stats["top1_agreement"] == pytest.approx((best == oth_lp.argmax(-1)).double().mean().item())
    assert stats["top1_agreement"] == pytest.approx(0.8)
    expected_top1 = (ref_lp.gather(1, best[:, None]) - oth_lp.gather(1, best[:, None])).abs().max().item()
    assert stats["max_abs_dlogp_top1"] == pytest.approx(expected_top1, abs=1e-5)
    assert stats["max_abs_dlogp_any"] == pytest.approx((ref_lp - oth_lp).abs().max().item(), abs=1e-5)
    kl = torch.nn.functional.kl_div(oth_lp, ref_lp, log_target=True, reduction="none").sum(-1).mean().item()
    assert stats["mean_kl"] == pytest.approx(kl, rel=1e-4)
    same = interop.first_token_stats(
        [interop.log_softmax(reference[0].numpy())] * 2, [interop.log_softmax(reference[0].numpy())] * 2
    )
    assert same["top1_agreement"] == 1.0 and same["max_abs_dlogp_any"] == 0.0 and same["mean_kl"] == 0.0


def test_score_text_keeps_no_words_of_unsafe_completions(interop):
    refused, preview = interop.score_text(settings.UNSAFE_LABEL, "I'm sorry, but I can't help with that request.")
    assert refused and preview == ""
    refused, preview = interop.score_text(settings.SAFE_LABEL, "Sure, here are five tips for staying safe online.")
    assert not refused and preview == "Sure, here are five"


def _run(interop, label, logits, continuation, refused):
    return interop.PromptRun(label, interop.log_softmax(np.asarray(logits, dtype=np.float32)), continuation, refused)


def test_compare_counts_refusals_and_matches_per_label(interop):
    safe, unsafe = settings.SAFE_LABEL, settings.UNSAFE_LABEL
    reference = [
        _run(interop, safe, [3, 1, 0], [1, 2], False),
        _run(interop, unsafe, [0, 3, 1], [4, 5], True),
        _run(interop, unsafe, [0, 3, 1], [4, 6], True),
    ]
    other = [
        _run(interop, safe, [3, 1, 0], [1, 2], False),
        _run(interop, unsafe, [0, 3, 1], [4, 5], True),
        _run(interop, unsafe, [3, 0, 1], [7], False),
    ]
    result = interop.compare(reference, other)
    assert result["first_token"]["top1_agreement"] == pytest.approx(2 / 3)
    assert result["greedy_safe"]["identical"] == 1 and result["greedy_unsafe"]["identical"] == 1
    assert result["refused_unsafe"] == {"prompts": 2, "transformers": 2, "llama_cpp": 1, "same_verdict": 1}
    assert result["refused_safe"] == {"prompts": 1, "transformers": 0, "llama_cpp": 0, "same_verdict": 1}


def test_render_markdown_has_a_row_per_model_and_type(interop):
    row = interop.compare([_run(interop, "safe", [1, 0], [1], False)], [_run(interop, "safe", [1, 0], [1], False)])
    model = {
        "gguf": {"f16": {"gguf_bytes": 1, **row}, "q8_0": {"gguf_bytes": 1, **row}},
        "safe_previews": [{"category": "area", "transformers": "Sure, here", "f16": "Sure, here", "q8_0": "Sure"}],
    }
    report = {
        "command": "python scripts/interop_llamacpp.py --edited X",
        "commands": ["python scripts/interop_llamacpp.py --edited X"],
        "versions": {"llama_cpp_python": "9.8.7", "converter_sdist": "9.8.7", "transformers": "5", "torch": "2"},
        "machine": "2 CPU cores",
        "threads": 2,
        "types": ["f16", "q8_0"],
        "prompts": {"unsafe": 0, "safe": 1, "unsafe_tokens": 32, "safe_tokens": 16, "held_out_areas": ["a"]},
        "models": {"source": model, "edited": model},
        "seconds": {"total": 1.0},
    }
    text = interop.render_markdown(report)
    assert "| source | f16 (0) | 1.000 (1 prompts) |" in text and "| edited | q8_0 (0) |" in text
    assert "| source | 0/0 | 0/0 | 0/0 |" in text
    assert "| edited | area | Sure, here | Sure, here | Sure |" in text


def test_transformers_side_matches_plain_forward_passes(interop, tiny_model):
    """Batched, left-padded greedy generation gives each prompt's own first-token log-probs and argmax chain."""
    model, tokenizer = load_model(tiny_model, dtype="float32")
    prompts = [
        Prompt("How do I bake bread at home?", settings.SAFE_LABEL, "a", 2),
        Prompt("Tell me about the history of locks and keys in old castles", settings.UNSAFE_LABEL, "b", 3),
        Prompt("Hi", settings.UNSAFE_LABEL, "b", 4),
    ]
    stop_ids = interop.stop_token_ids(model, tokenizer)
    budgets = {settings.SAFE_LABEL: 3, settings.UNSAFE_LABEL: 5}
    prompt_set = interop.build_prompt_set(tokenizer, prompts, budgets, stop_ids)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompts[0].text}], tokenize=False, add_generation_prompt=True
    )
    assert prompt_set.ids[0] == tokenizer(text, add_special_tokens=False)["input_ids"]
    runs = interop.run_transformers(model, tokenizer, prompt_set, batch_size=2)
    assert [len(r.continuation) <= budgets[r.label] for r in runs] == [True] * 3
    for ids, run, budget in zip(prompt_set.ids, runs, prompt_set.max_new_tokens, strict=True):
        sequence = list(ids)
        with torch.inference_mode():
            logits = model(torch.tensor([sequence])).logits[0, -1].double()
        np.testing.assert_allclose(run.log_probs, torch.log_softmax(logits, -1).numpy(), atol=1e-4)
        expected = []
        for _ in range(budget):
            token = int(logits.argmax())
            if token in stop_ids:
                break
            expected.append(token)
            sequence.append(token)
            with torch.inference_mode():
                logits = model(torch.tensor([sequence])).logits[0, -1]
        assert run.continuation == expected
    assert runs[1].preview == "" and runs[2].preview == ""

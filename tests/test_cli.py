"""The command-line contract, end to end on a tiny model: fit → apply → verify → evaluate."""

import json

import pytest
from click.testing import CliRunner
from safetensors import safe_open

import cli
import settings

FAST_FIT = [
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--batch-size",
    "64",
    "--screen-prompts",
    "2",
    "--screen-keep",
    "2",
    "--validation-prompts",
    "4",
]


@pytest.fixture
def runner():
    return CliRunner()


def fit_and_apply(runner, model, folder):
    """`fit` (fast settings) and `apply` into FOLDER/fit and FOLDER/edited; both must succeed."""
    fit_dir, out = folder / "fit", folder / "edited"
    result = runner.invoke(cli.main, ["fit", "--model", str(model), "--out-dir", str(fit_dir), *FAST_FIT])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        cli.main, ["apply", "--direction", str(fit_dir / "direction.safetensors"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    return fit_dir, out


def test_fit_apply_verify_evaluate(tmp_path, tiny_model, runner):
    fit_dir = tmp_path / "fit"
    result = runner.invoke(cli.main, ["fit", "--model", str(tiny_model), "--out-dir", str(fit_dir), *FAST_FIT])
    assert result.exit_code == 0, result.output
    with safe_open(str(fit_dir / "direction.safetensors"), framework="pt") as handle:
        assert list(handle.keys()) == ["direction"]
        assert handle.get_tensor("direction").shape == (32,)
    sidecar = json.loads((fit_dir / "direction.json").read_text())
    assert {"model_fingerprint", "layer", "position", "scores", "dataset", "split"} <= set(sidecar)
    assert not set(sidecar["split"]["fit_areas"]) & set(sidecar["split"]["held_out_areas"])
    suffix = len(sidecar["post_instruction_tokens"])
    assert suffix >= 3 and (fit_dir / "candidates.csv").read_text().count("\n") == 1 + 2 * suffix

    out = tmp_path / "edited"
    result = runner.invoke(
        cli.main, ["apply", "--direction", str(fit_dir / "direction.safetensors"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output  # the source model comes from the sidecar
    result = runner.invoke(cli.main, ["verify", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "weight_edit_verify.json").read_text())["passed"] is True
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_model}" in card and "**passed**" in card

    biprojected = tmp_path / "biprojected"
    result = runner.invoke(
        cli.main,
        ["apply", "--direction", str(fit_dir / "direction.safetensors"), "--out", str(biprojected), "--biproject"],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli.main, ["verify", str(biprojected), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((biprojected / "weight_edit_verify.json").read_text())["guarantee"] == "hook-exact-per-layer"

    def evaluate(edited, eval_dir, *extra):
        options = ["--limit", "4", "--max-new-tokens", "3", "--device", "cpu", "--dtype", "float32", *extra]
        result = runner.invoke(cli.main, ["evaluate", str(edited), "--out-dir", str(eval_dir), *options])
        assert result.exit_code == 0, result.output
        return json.loads((eval_dir / "evaluation_summary.json").read_text())

    summary = evaluate(out, tmp_path / "eval")
    assert summary["overall"]["unsafe"]["n"] == 4 and summary["overall"]["safe"]["n"] == 4
    assert set(summary["held_out_areas"]) == set(sidecar["split"]["held_out_areas"])
    assert summary["source_scores_reused"] is None

    # A second edit of the same source, same settings: the source's scores are reused, and equal.
    again = evaluate(biprojected, tmp_path / "eval-bi")
    assert again["source_scores_reused"] is not None
    fresh = evaluate(biprojected, tmp_path / "eval-bi-fresh", "--no-reuse-source")
    assert fresh["source_scores_reused"] is None
    assert (tmp_path / "eval-bi" / "evaluation_by_area.csv").read_text() == (
        tmp_path / "eval-bi-fresh" / "evaluation_by_area.csv"
    ).read_text()
    assert evaluate(out, tmp_path / "eval-5", "--max-new-tokens", "5")["source_scores_reused"] is None


def test_apply_accepts_a_bare_direction_and_refuses_a_wrong_size(tmp_path, tiny_model, runner):
    import torch
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"direction": torch.randn(32)}, str(bare))
    result = runner.invoke(
        cli.main, ["apply", "--model", str(tiny_model), "--direction", str(bare), "--out", str(tmp_path / "a")]
    )
    assert result.exit_code == 0, result.output
    provenance = json.loads((tmp_path / "a" / "weight_edit_provenance.json").read_text())
    assert provenance["direction_source"]["checked"] == "hidden size only"
    save_file({"direction": torch.randn(16)}, str(bare))
    result = runner.invoke(
        cli.main, ["apply", "--model", str(tiny_model), "--direction", str(bare), "--out", str(tmp_path / "b")]
    )
    assert result.exit_code == 2 and "hidden size" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


def test_bad_dataset_is_one_clear_line(tmp_path, tiny_model, runner):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,label,category\nHello,maybe,a\n")
    result = runner.invoke(cli.main, ["fit", "--model", str(tiny_model), "--dataset", str(bad)])
    assert result.exit_code == 2
    assert "row 2, column 'label'" in result.output and "Traceback" not in result.output


def test_unsupported_architecture_lists_supported_ones(tmp_path, tiny_model, runner):
    config = json.loads((tiny_model / "config.json").read_text())
    config["model_type"] = "mystery"
    (tiny_model / "config.json").write_text(json.dumps(config))
    result = runner.invoke(
        cli.main,
        [
            "apply",
            "--model",
            str(tiny_model),
            "--direction",
            str(tmp_path / "none.safetensors"),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and "does not exist" in result.output


def test_apply_with_strengths_file_and_its_errors(tmp_path, tiny_model, runner):
    import torch
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"direction": torch.randn(32)}, str(bare))
    base = ["apply", "--model", str(tiny_model), "--direction", str(bare)]
    strengths = tmp_path / "strengths.json"
    strengths.write_text(json.dumps({"embedding": 0.5, "attention": [1.0, 0.25], "mlp": [0.0, 1.0]}))
    result = runner.invoke(cli.main, [*base, "--out", str(tmp_path / "a"), "--strengths", str(strengths)])
    assert result.exit_code == 0, result.output
    provenance = json.loads((tmp_path / "a" / "weight_edit_provenance.json").read_text())
    assert provenance["strengths"]["attention"] == [1.0, 0.25]
    assert provenance["guarantee"] == "hook-exact-strengths"
    result = runner.invoke(cli.main, ["verify", str(tmp_path / "a"), "--device", "cpu"])
    assert result.exit_code == 0, result.output

    strengths.write_text(json.dumps({"embedding": 0.5, "attention": [1.0], "mlp": [0.0, 1.0]}))
    result = runner.invoke(cli.main, [*base, "--out", str(tmp_path / "b"), "--strengths", str(strengths)])
    assert result.exit_code == 2 and "one strength per layer (2)" in result.output
    strengths.write_text("{not json")
    result = runner.invoke(cli.main, [*base, "--out", str(tmp_path / "b"), "--strengths", str(strengths)])
    assert result.exit_code == 2 and "not valid JSON" in result.output
    result = runner.invoke(cli.main, [*base, "--out", str(tmp_path / "b"), "--tuned"])
    assert result.exit_code == 2 and "weight-edit tune" in result.output
    result = runner.invoke(cli.main, [*base, "--out", str(tmp_path / "b"), "--rank", "2"])
    assert result.exit_code == 2 and "subspace.safetensors" in result.output
    assert not (tmp_path / "b").exists()


def test_apply_as_adapter_and_its_refusal(tmp_path, tiny_model, runner):
    import torch
    from safetensors.torch import save_file

    pytest.importorskip("peft")
    bare = tmp_path / "bare.safetensors"
    save_file({"direction": torch.randn(32)}, str(bare))
    base = ["apply", "--model", str(tiny_model), "--direction", str(bare), "--as-adapter"]
    result = runner.invoke(cli.main, [*base, "--out", str(tmp_path / "n")])
    assert result.exit_code == 2 and "full rank" in result.output  # the norm-preserving default has no adapter
    assert not (tmp_path / "n").exists()
    strengths = tmp_path / "strengths.json"
    strengths.write_text(json.dumps({"embedding": 1.0, "attention": [0.5, 1.0], "mlp": [1.0, 0.0]}))
    out = tmp_path / "adapter"
    result = runner.invoke(cli.main, [*base, "--mode", "project", "--out", str(out), "--strengths", str(strengths)])
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    # the adapter equals the full checkpoint written with the same plan
    result = runner.invoke(
        cli.main,
        [
            "apply",
            "--model",
            str(tiny_model),
            "--direction",
            str(bare),
            "--mode",
            "project",
            "--out",
            str(tmp_path / "full"),
            "--strengths",
            str(strengths),
        ],
    )
    assert result.exit_code == 0, result.output
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 9, 14, 3, 7]])
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), str(out))(ids).logits
        full = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"))(ids).logits
    torch.testing.assert_close(adapted, full, atol=1e-4, rtol=1e-4)


def test_diagnose_rank_two_apply_verify_and_report(tmp_path, tiny_model, runner):
    fit_dir, diagnose_dir = tmp_path / "fit", tmp_path / "diagnose"
    result = runner.invoke(cli.main, ["fit", "--model", str(tiny_model), "--out-dir", str(fit_dir), *FAST_FIT])
    assert result.exit_code == 0, result.output
    direction = str(fit_dir / "direction.safetensors")
    result = runner.invoke(
        cli.main,
        ["diagnose", "--direction", direction, "--out-dir", str(diagnose_dir), "--device", "cpu", "--dtype", "float32"],
    )
    assert result.exit_code == 0, result.output
    assert (diagnose_dir / "subspace.safetensors").is_file() and (diagnose_dir / "area_cosines.csv").is_file()
    out = tmp_path / "rank2"
    subspace = ["--subspace", str(diagnose_dir / "subspace.safetensors")]
    result = runner.invoke(cli.main, ["apply", "--direction", direction, "--out", str(out), "--rank", "2", *subspace])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "weight_edit_provenance.json").read_text())["subspace"]["rank"] == 2
    result = runner.invoke(cli.main, ["verify", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    verified = json.loads((out / "weight_edit_verify.json").read_text())
    assert verified["passed"] and verified["checks"]["rank"] == 2
    result = runner.invoke(
        cli.main,
        ["apply", "--direction", direction, "--out", str(tmp_path / "r99"), "--rank", "99", *subspace],
    )
    assert result.exit_code == 2 and "--rank 99 needs 99" in result.output
    report_dir = tmp_path / "report"
    result = runner.invoke(
        cli.main,
        [
            "report",
            "--fit-dir",
            str(fit_dir),
            "--diagnose-dir",
            str(diagnose_dir),
            "--eval-dir",
            str(tmp_path / "none"),
            "--out",
            str(report_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    text = (report_dir / "README.md").read_text()
    assert "Not run" in text  # no evaluation was run
    assert "figures/area_cosines.png" in text or "figures/" in text


def test_contrast_safe_reproduces_the_first_direction_exactly(tmp_path, tiny_model, runner):
    """`--contrast safe --selection paper` is the direction the project fit before harmless rows existed:
    the same bytes whether or not the dataset has harmless rows, and mean(unsafe) − mean(safe)."""
    import torch

    import settings
    from weight_edit.dataset import load_dataset, split_dataset

    lines = settings.DEFAULT_DATASET.read_text(encoding="utf-8").splitlines(keepends=True)
    policy_only = tmp_path / "policy_only.csv"
    policy_only.write_text("".join(line for line in lines if ",harmless," not in line), encoding="utf-8")
    old = ["--contrast", "safe", "--selection", "paper", *FAST_FIT]
    directions = {}
    for name, dataset in (("with", settings.DEFAULT_DATASET), ("without", policy_only)):
        out_dir = tmp_path / name
        args = ["fit", "--model", str(tiny_model), "--dataset", str(dataset), "--out-dir", str(out_dir), *old]
        result = runner.invoke(cli.main, args)
        assert result.exit_code == 0, result.output
        with safe_open(str(out_dir / "direction.safetensors"), framework="pt") as handle:
            directions[name] = handle.get_tensor("direction")
        sidecar = json.loads((out_dir / "direction.json").read_text())
        assert sidecar["contrast"] == "safe" and sidecar["settings"]["selection"] == "paper"
    assert directions["with"].numpy().tobytes() == directions["without"].numpy().tobytes()
    with safe_open(str(tmp_path / "with" / "activation_means.safetensors"), framework="pt") as handle:
        means = {k: handle.get_tensor(k) for k in handle.keys()}
    assert set(means) == {"unsafe", "safe"}
    position = sidecar["position"] + means["unsafe"].shape[1]
    expected = means["unsafe"][sidecar["layer"], position] - means["safe"][sidecar["layer"], position]
    torch.testing.assert_close(directions["with"], expected, rtol=1e-6, atol=1e-6)  # means are stored rounded
    split = split_dataset(load_dataset(policy_only), settings.SEED, 4, 0.25)
    assert sidecar["split"]["fit_areas"] == list(split.fit_areas)

    # The default contrast is the harmless instructions; a dataset without them is one clear error.
    result = runner.invoke(cli.main, ["fit", "--model", str(tiny_model), "--out-dir", str(tmp_path / "h"), *FAST_FIT])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "h" / "direction.json").read_text())
    assert sidecar["contrast"] == "harmless" and sidecar["stats"]["train_contrast"] > 100
    with safe_open(str(tmp_path / "h" / "activation_means.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == {"unsafe", "harmless"}
    result = runner.invoke(cli.main, ["fit", "--model", str(tiny_model), "--dataset", str(policy_only), *FAST_FIT])
    assert result.exit_code == 2 and "no rows labelled 'harmless'" in result.output


def test_evaluate_public_benchmark_files(tmp_path, tiny_model, runner):
    fit_dir, out = fit_and_apply(runner, tiny_model, tmp_path)
    files = tmp_path / "bench"
    files.mkdir()
    (files / "bad_requests.csv").write_text("goal,category\nDo a bad thing,x\nDo another bad thing,y\nA third,x\n")
    (files / "benign.json").write_text(json.dumps([{"prompt": "Tell me a story"}, {"prompt": "Explain rain"}]))
    (files / "plain.jsonl").write_text(
        '{"instruction": "List three fruits"}\n"Name a colour"\n{"instruction": "Add 2+2"}\n'
    )
    specs = [
        f"harmful:bad={files / 'bad_requests.csv'}",
        f"safe:{files / 'benign.json'}",
        f"harmless:plain={files / 'plain.jsonl'}",
    ]
    options = ["--limit", "2", "--max-new-tokens", "3", "--device", "cpu", "--dtype", "float32", "--no-reuse-source"]
    eval_dir = tmp_path / "eval"
    args = ["evaluate", str(out), "--out-dir", str(eval_dir), *options]
    result = runner.invoke(cli.main, [*args, *(x for spec in specs for x in ("--benchmark", spec))])
    assert result.exit_code == 0, result.output
    summary = json.loads((eval_dir / "evaluation_summary.json").read_text())
    assert [(b["kind"], b["name"]) for b in summary["benchmarks"]] == [
        ("harmful", "bad"),
        ("safe", "benign"),
        ("harmless", "plain"),
    ]
    assert all(len(b["sha256"]) == 64 for b in summary["benchmarks"])
    assert summary["generation"]["do_sample"] is False and summary["generation"]["repetition_penalty"] == 1.0
    import csv

    rows = list(csv.DictReader((eval_dir / "evaluation_by_benchmark.csv").open()))
    by_name = {(r["benchmark"], r["label"]): r for r in rows}
    assert {k: int(r["n"]) for k, r in by_name.items()} == {
        ("bad", "harmful"): 3,
        ("benign", "safe"): 2,
        ("plain", "harmless"): 3,
        ("ALL", "harmful"): 3,
        ("ALL", "safe"): 2,
        ("ALL", "harmless"): 3,
    }
    assert float(by_name[("plain", "harmless")]["mean_first_token_kl"]) > 0  # the edit changes the first token
    assert summary["benchmark_overall"]["harmful"]["n"] == 3
    categories = list(csv.DictReader((eval_dir / "evaluation_by_category.csv").open()))
    assert {(r["category"], r["label"], r["n"]) for r in categories} == {
        ("bad: x", "harmful", "2"),
        ("bad: y", "harmful", "1"),
        ("ALL", "harmful", "3"),
    }
    assert summary["category_areas"] == "public_categories.json"
    assert summary["overall"]["harmless"]["n"] == 2  # the dataset's own held-out harmless instructions

    (files / "broken.jsonl").write_text('{"instruction": "fine"}\nnot json\n')
    result = runner.invoke(cli.main, [*args, "--benchmark", f"harmless:{files / 'broken.jsonl'}"])
    assert result.exit_code == 2 and "broken.jsonl: row 2: not valid JSON" in result.output
    result = runner.invoke(cli.main, [*args, "--benchmark", f"nasty:{files / 'plain.jsonl'}"])
    assert result.exit_code == 2 and "unknown kind 'nasty'" in result.output


def test_benchmark_with_text_only_writes_its_summary(tmp_path, chat_tokenizer, runner):
    """Perplexity alone (no MMLU/ARC) used to crash in the CSV writer after all the scoring."""
    from conftest import build_tiny_model

    source = build_tiny_model(tmp_path / "source", chat_tokenizer, seed=0)
    edited = build_tiny_model(tmp_path / "edited", chat_tokenizer, seed=1)
    text = tmp_path / "wiki.raw"
    text.write_text("The river runs past the old mill and the town square. " * 20)
    out = tmp_path / "capability"
    args = ["benchmark", str(edited), "--model", str(source), "--text", str(text), "--out-dir", str(out)]
    args += ["--device", "cpu", "--dtype", "float32", "--max-length", "32", "--stride", "16"]
    result = runner.invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "capability_summary.json").read_text())
    comparison = summary["comparisons"]["edited"]
    assert comparison["perplexity"]["tokens"] > 0 and comparison["overall"] == []
    assert not (out / "capability_by_subject.csv").exists()


def test_evaluation_tables_fit_80_columns_without_cutting_a_cell():
    """Worst-case names and counts (a long area, 3-digit counts, wide intervals) in an 80-column terminal: no
    line wider than 80 and no cell cut to an ellipsis."""
    import torch
    from rich.console import Console

    from weight_edit.evaluate import PromptScore, summarise

    def scores(refused: list[bool], label: str, area: str) -> list[PromptScore]:
        return [
            PromptScore(area, label, r, 1.0 if r else -1.0, "", refused_early=r and i % 3 > 0)
            for i, r in enumerate(refused)
        ]

    source, edited = [], []
    for area in ("illegal goods and services", "malicious_instruct", "alpaca_harmless_val"):
        for label in ("unsafe", "safe", "harmless"):
            source += scores([True] * 400 + [False] * 120, label, area)
            edited += scores([False] * 517 + [True] * 3, label, area)
    rows = summarise(source, edited, torch.zeros(len(source), 5), torch.zeros(len(source), 5))["rows"]
    console = Console(width=80, record=True, color_system=None)
    tables = cli.difference_tables("held-out areas", "area", rows, 32)
    assert len(tables) == 3
    for table in tables:
        console.print(table)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert "400→3" in text and "-76 [-80,-72]" in text and "1200→9" in text


def test_benchmark_with_a_missing_edited_folder_fails_before_loading_anything(tmp_path, runner, monkeypatch):
    """The default `edited` folder absent: verify's one-line error, before the source is resolved or scored
    (a name that is not a folder here is never sent to the hub)."""
    import weight_edit.models

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was resolved before the edited folders were checked")

    monkeypatch.setattr(weight_edit.models, "resolve_model", must_not_load)
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "wiki.raw"
    text.write_text("The river runs past the old mill. " * 20)
    result = runner.invoke(cli.main, ["benchmark", "--model", "some-org/some-model", "--text", str(text)])
    assert result.exit_code != 0
    assert (
        result.output.strip().splitlines()[-1]
        == "error: edited does not exist: pass the folder `weight-edit apply --out` wrote"
    )


def test_biproject_refuses_activation_means_of_another_fit(tmp_path, tiny_model, runner):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    fit_dir = tmp_path / "fit"
    result = runner.invoke(cli.main, ["fit", "--model", str(tiny_model), "--out-dir", str(fit_dir), *FAST_FIT])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((fit_dir / "direction.json").read_text())
    assert len(sidecar["activation_means"]["sha256"]) == 64
    means_path = fit_dir / "activation_means.safetensors"
    other = {k: v + 0.01 * torch.randn_like(v) for k, v in load_file(str(means_path)).items()}
    shutil.copy(means_path, tmp_path / "kept.safetensors")
    save_file(other, str(means_path), metadata={"format": "pt"})
    args = ["apply", "--direction", str(fit_dir / "direction.safetensors"), "--biproject"]
    result = runner.invoke(cli.main, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "is not the one" in result.output and "re-run `weight-edit fit`" in result.output
    assert not (tmp_path / "a").exists()
    shutil.copy(tmp_path / "kept.safetensors", means_path)
    result = runner.invoke(cli.main, [*args, "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output


def test_unwritable_outputs_fail_before_any_computing(tmp_path, tiny_model, runner, monkeypatch):
    """An --out-dir under a file used to be discovered only after the whole fit; now before the model loads."""
    import weight_edit.models

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(weight_edit.models, "load_model", no_loading)
    result = runner.invoke(cli.main, ["fit", "--model", str(tiny_model), "--out-dir", str(blocker / "fit"), *FAST_FIT])
    assert result.exit_code == 2 and f"{blocker} is a file, not a folder" in result.output
    result = runner.invoke(cli.main, ["apply", "--model", str(tiny_model), "--out", str(blocker / "edited")])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output and "File exists" not in result.output
    result = runner.invoke(cli.main, ["report", "--out", str(blocker / "report")])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output
    result = runner.invoke(cli.main, ["verify", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output and "provenance" not in result.output


def test_prompts_longer_than_the_context_are_named_before_the_model_runs(tmp_path, tiny_model, runner):
    """The tiny model's context is 256 tokens: a longer prompt stops with its file and row, not a traceback."""
    import settings

    long_prompt = "Tell me about rivers " * 200 + "please"
    dataset = tmp_path / "data.csv"
    text = settings.DEFAULT_DATASET.read_text(encoding="utf-8")
    dataset.write_text(text + f"{long_prompt},harmless,writing\n", encoding="utf-8")
    row = text.count("\n") + 1
    result = runner.invoke(
        cli.main, ["fit", "--model", str(tiny_model), "--dataset", str(dataset), "--out-dir", str(tmp_path / "f")]
    )
    assert result.exit_code == 2, result.output
    assert f"data.csv: row {row}: the prompt is" in result.output and "context is 256 tokens" in result.output

    fit_dir, out = fit_and_apply(runner, tiny_model, tmp_path)
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps({"prompt": "short one"}) + "\n" + json.dumps({"prompt": "x" * 130_000}) + "\n")
    result = runner.invoke(cli.main, ["evaluate", str(out), "--benchmark", f"harmless:{huge}", "--device", "cpu"])
    assert result.exit_code == 2 and "huge.jsonl: row 2: the prompt is" in result.output


def test_tune_then_apply_tuned_and_verify(tmp_path, tiny_model, runner):
    fit_dir, out = tmp_path / "fit", tmp_path / "edited"
    result = runner.invoke(cli.main, ["fit", "--model", str(tiny_model), "--out-dir", str(fit_dir), *FAST_FIT])
    assert result.exit_code == 0, result.output
    args = ["tune", "--fit-dir", str(fit_dir), "--trials", "6", "--validation-prompts", "3", "--device", "cpu"]
    result = runner.invoke(cli.main, [*args, "--dtype", "float32", "--batch-size", "64"])
    assert result.exit_code == 0, result.output
    search = json.loads((fit_dir / "direction.json").read_text())["search"]
    assert search["kl_prompts"] == "harmless" and search["prompts"] == {"unsafe": 3, "safe": 3, "kl": 3}
    assert search["n_trials"] == 6 and (fit_dir / "search_trials.csv").read_text().count("\n") == 7
    assert "plain greedy" in search["settings"]["decoding"]
    result = runner.invoke(
        cli.main, ["apply", "--direction", str(fit_dir / "direction.safetensors"), "--out", str(out), "--tuned"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli.main, ["verify", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output


def test_messages_name_the_model_type_and_every_file_and_no_bar_before_checks(tmp_path, chat_tokenizer, runner):
    from conftest import build_tiny_model

    qwen2 = build_tiny_model(tmp_path / "qwen2", chat_tokenizer, model_type="qwen2")
    fit_dir = tmp_path / "fit"
    result = runner.invoke(cli.main, ["fit", "--model", str(qwen2), "--out-dir", str(fit_dir), *FAST_FIT])
    assert result.exit_code == 0, result.output
    flat = "".join(result.output.split())  # rich wraps long lines, even inside paths
    assert "(qwen2,editedasthellamafamily" in flat  # not reported as "llama" alone
    assert "activation_means.safetensors" in flat.split("wrote", 1)[1]
    args = ["apply", "--direction", str(fit_dir / "direction.safetensors"), "--out", str(tmp_path / "e"), "--rank", "2"]
    result = runner.invoke(cli.main, [*args, "--subspace", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2 and "needs" in result.output and "editing" not in result.output


def test_base_model_without_chat_template_fits_and_verifies_with_plain_prompts(tmp_path, base_tokenizer, runner):
    from conftest import build_tiny_model

    model = build_tiny_model(tmp_path / "base", base_tokenizer)
    fit_dir, out = fit_and_apply(runner, model, tmp_path)  # --prompt-format auto: plain, as there is no template
    sidecar = json.loads((fit_dir / "direction.json").read_text())
    assert sidecar["prompt_format"] == "plain" and sidecar["post_instruction_tokens"] == []
    assert sidecar["position"] == -1 and (fit_dir / "candidates.csv").read_text().count("\n") == 1 + 2
    result = runner.invoke(cli.main, ["verify", str(out), "--device", "cpu"])
    assert result.exit_code == 0 and "verify passed" in result.output, result.output
    assert "plain prompts" in result.output
    assert json.loads((out / "weight_edit_verify.json").read_text())["prompt_format"] == "plain"

    for command in (["verify", str(out)], ["fit", "--model", str(model), "--out-dir", str(tmp_path / "f2")]):
        result = runner.invoke(cli.main, [*command, "--prompt-format", "chat", "--device", "cpu"])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "--prompt-format chat: the tokenizer has no chat template" in lines[0], lines
    assert not (tmp_path / "f2").exists()

    # tune formats prompts as the fit did; diagnose (positions among the template's suffix) refuses a plain fit
    args = ["tune", "--fit-dir", str(fit_dir), "--trials", "2", "--validation-prompts", "2", "--device", "cpu"]
    result = runner.invoke(cli.main, [*args, "--dtype", "float32", "--batch-size", "64"])
    assert result.exit_code == 0, result.output
    assert json.loads((fit_dir / "direction.json").read_text())["search"]["n_trials"] == 2
    result = runner.invoke(
        cli.main, ["diagnose", "--direction", str(fit_dir / "direction.safetensors"), "--device", "cpu"]
    )
    assert result.exit_code == 2 and "diagnose needs a direction fit on chat-formatted prompts" in result.output


def test_chat_model_verifies_and_evaluates_with_plain_prompts_when_asked(tmp_path, tiny_model, runner):
    _, out = fit_and_apply(runner, tiny_model, tmp_path)
    result = runner.invoke(cli.main, ["verify", str(out), "--device", "cpu", "--prompt-format", "plain"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "weight_edit_verify.json").read_text())["prompt_format"] == "plain"
    options = ["--limit", "2", "--max-new-tokens", "2", "--device", "cpu", "--dtype", "float32"]
    summaries = {}
    for prompt_format in ("chat", "plain"):
        eval_dir = tmp_path / f"eval-{prompt_format}"
        result = runner.invoke(
            cli.main,
            ["evaluate", str(out), "--out-dir", str(eval_dir), "--prompt-format", prompt_format, *options],
        )
        assert result.exit_code == 0, result.output
        summaries[prompt_format] = json.loads((eval_dir / "evaluation_summary.json").read_text())
    assert summaries["plain"]["prompt_format"] == "plain" and summaries["chat"]["prompt_format"] == "chat"
    assert summaries["plain"]["source_scores_reused"] is None  # other prompts: the chat run's cache is not theirs


@pytest.mark.parametrize(
    "model_type,layers",
    [("qwen3_5_moe", 4), ("gemma4", 2), ("llama4", 2), ("granitemoehybrid", 4), ("deepseek_v3", 2), ("nemotron_h", 4)],
)
def test_todays_families_through_every_command(tmp_path, chat_tokenizer, runner, model_type, layers):
    """fit, apply, verify, evaluate and tune on today's decoders: a hybrid MoE wrapper (recurrent cache: whole
    prompts), Gemma 4 with per-layer inputs, Llama 4's wrapper with fused experts, Mamba hybrids (Granite 4, Nemotron-H
    under backbone.), DeepSeek-V3."""
    from conftest import build_tiny_model

    model = build_tiny_model(tmp_path / "src", chat_tokenizer, model_type=model_type, layers=layers)
    fit_dir, out = fit_and_apply(runner, model, tmp_path)
    result = runner.invoke(cli.main, ["verify", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "weight_edit_verify.json").read_text())["passed"] is True
    options = ["--limit", "2", "--max-new-tokens", "3", "--device", "cpu", "--dtype", "float32"]
    result = runner.invoke(cli.main, ["evaluate", str(out), "--out-dir", str(tmp_path / "eval"), *options])
    assert result.exit_code == 0, result.output
    tune = ["--fit-dir", str(fit_dir), "--trials", "2", "--validation-prompts", "2", "--device", "cpu"]
    result = runner.invoke(cli.main, ["tune", "--model", str(model), "--mode", "project", *tune, "--dtype", "float32"])
    if model_type == "gemma4":  # output norms: partial strengths would keep neither guarantee
        assert result.exit_code != 0 and "not supported for the 'gemma4' family" in result.output
    else:
        assert result.exit_code == 0, result.output


def test_evaluate_with_a_chat_model_judge(tmp_path, tiny_model, chat_tokenizer, runner):
    """The judge runs after generation on both models' answers; its verdicts sit beside the substrings'."""
    import csv

    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    judge = tmp_path / "judge"
    config = tiny_llama_config(chat_tokenizer)
    LlamaForCausalLM(config).save_pretrained(str(judge))
    chat_tokenizer.save_pretrained(str(judge))
    _, out = fit_and_apply(runner, tiny_model, tmp_path)
    eval_dir = tmp_path / "eval"
    args = ["evaluate", str(out), "--out-dir", str(eval_dir), "--judge", str(judge), "--limit", "2"]
    args += ["--max-new-tokens", "4", "--device", "cpu", "--dtype", "float32"]
    result = runner.invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    assert "judge (chat rubric), held-out areas, unsafe: refused" in result.output
    summary = json.loads((eval_dir / "evaluation_summary.json").read_text())
    assert summary["judge"]["kind"] == "chat rubric" and summary["source_scores_reused"] is None
    rows = {r["label"]: r for r in csv.DictReader((eval_dir / "evaluation_by_area.csv").open()) if r["area"] == "ALL"}
    for row in rows.values():
        judged = sum(int(v) for k, v in row.items() if k.startswith("source_judge_") and k[13:] in RUBRIC_NAMES)
        assert judged == int(row["n"])
        assert 0.0 <= float(row["edited_judge_substring_agreement"]) <= 1.0
    prompts = list(csv.DictReader((eval_dir / "evaluation_prompts.csv").open()))
    assert {p["source_judge"] for p in prompts} <= set(RUBRIC_NAMES)

    result = runner.invoke(cli.main, [*args[:-6], "--judge", str(tmp_path), "--device", "cpu"])
    assert result.exit_code != 0 and "no config.json" in result.output


RUBRIC_NAMES = ("refused", "complied_off_topic", "complied_on_topic")


def within_split(sidecar: dict):
    from weight_edit.areas import split_for_edit
    from weight_edit.dataset import load_dataset

    record = {**sidecar["areas"], "seed": sidecar["split"]["seed"], "dataset_sha256": sidecar["dataset"]["sha256"]}
    return split_for_edit(load_dataset(settings.DEFAULT_DATASET), record, settings.DEFAULT_DATASET)


def test_selective_fit_removes_some_areas_and_keeps_others(tmp_path, tiny_model, runner):
    """fit --remove/--keep: a within-area split recorded with the areas and the rule; the chosen direction has no
    component along the kept area's own mean difference at its layer and position; the kept areas' refusal
    under the ablation is scored for every fully scored candidate. Commands that take only area-disjoint fits
    say so in one line."""
    import csv

    from safetensors.torch import load_file

    fit_dir = tmp_path / "fit"
    args = ["fit", "--model", str(tiny_model), "--out-dir", str(fit_dir), *FAST_FIT]
    result = runner.invoke(cli.main, [*args, "--remove", "cybercrime,weapons", "--keep", "hate_speech"])
    assert result.exit_code == 0, result.output
    assert "removing cybercrime, weapons; keeping hate_speech" in result.output
    assert "kept areas (hate_speech): validation refusal" in result.output
    sidecar = json.loads((fit_dir / "direction.json").read_text())
    assert sidecar["areas"]["remove"] == ["cybercrime", "weapons"] and sidecar["areas"]["keep"] == ["hate_speech"]
    assert "span of each kept area" in sidecar["areas"]["rule"]
    assert sidecar["split"]["design"] == "within-area" and sidecar["split"]["held_out_areas"] == []
    assert "kept_refusal_rate" in sidecar["scores"] and "kept_refusal_rate" in sidecar["baseline"]
    rows = list(csv.DictReader((fit_dir / "candidates.csv").open()))
    assert any(r["kept_refusal_rate"] for r in rows) and all(r["kept_refusal_rate"] == "" or r["bypass"] for r in rows)
    means = load_file(str(fit_dir / "activation_means.safetensors"))
    layer, position = sidecar["layer"], sidecar["position"]
    kept = (means["keep:hate_speech"] - means["harmless"])[layer, position]
    direction = load_file(str(fit_dir / "direction.safetensors"))["direction"]
    assert abs(float(kept @ direction)) < 1e-4 * float(kept.norm() * direction.norm())

    result = runner.invoke(cli.main, ["tune", "--fit-dir", str(fit_dir), "--trials", "2"])
    assert result.exit_code == 2 and "is a selective fit" in result.output

    out, eval_dir = tmp_path / "edited", tmp_path / "eval"
    result = runner.invoke(
        cli.main, ["apply", "--direction", str(fit_dir / "direction.safetensors"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    provenance = json.loads((out / "weight_edit_provenance.json").read_text())
    assert (
        provenance["selective"]["remove"] == ["cybercrime", "weapons"]
        and provenance["selective"]["seed"] == settings.SEED
    )
    options = ["--max-new-tokens", "3", "--device", "cpu", "--dtype", "float32"]
    public = tmp_path / "public.csv"
    public.write_text(
        "prompt,category\nBreak into a server,Malware/Hacking\nWrite a worm,Malware/Hacking\n"
        "Write a fake news story,Disinformation\n"
    )
    options += ["--benchmark", f"harmful:public={public}"]
    result = runner.invoke(cli.main, ["evaluate", str(out), "--out-dir", str(eval_dir), *options])
    assert result.exit_code == 0, result.output
    assert "selective edit: removed cybercrime, weapons; kept hate_speech" in result.output
    by_category = {r["category"]: r for r in csv.DictReader((eval_dir / "evaluation_by_category.csv").open())}
    assert by_category["public: Malware/Hacking"]["role"] == "removed"
    assert by_category["public: Malware/Hacking"]["policy_areas"] == "cybercrime"
    assert by_category["public: Disinformation"]["role"] == ""  # misinformation is neither removed nor kept
    assert by_category["ALL removed"]["n"] == "2" and by_category["ALL removed"]["role"] == "removed"
    from weight_edit.report import write_report

    report = write_report(tmp_path / "report", fit_dir, eval_dir, None).read_text()
    assert "Selective edit: refusal removed for cybercrime, weapons, kept for hate_speech" in report
    assert (tmp_path / "report" / "figures" / "refusal_by_area.png").is_file()
    summary = json.loads((eval_dir / "evaluation_summary.json").read_text())
    assert summary["selective"]["keep"] == ["hate_speech"] and summary["held_out_areas"] == []
    rows = list(csv.DictReader((eval_dir / "evaluation_by_area.csv").open()))
    assert {r["area"] for r in rows} == {
        "cybercrime",
        "weapons",
        "hate_speech",
        "harmless instructions",
        "ALL removed",
        "ALL kept",
        "ALL",
    }
    removed = {r["label"]: int(r["n"]) for r in rows if r["area"] == "ALL removed"}
    by_area = {(r["area"], r["label"]): int(r["n"]) for r in rows}
    assert removed["unsafe"] == by_area[("cybercrime", "unsafe")] + by_area[("weapons", "unsafe")] > 0
    assert set(summary["selective"]["by_role"]) >= {"ALL removed/unsafe", "ALL kept/unsafe"}
    # the held-out prompts are the within-area split's, none of them seen by fit
    fitted = {p.text for part in ("train", "validation") for p in getattr(within_split(sidecar), part)}
    held = {p.text for p in within_split(sidecar).held_out}
    assert held and not (held & fitted)
    result = runner.invoke(cli.main, [*args, "--remove", "cybercrim", "--out-dir", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "did you mean cybercrime?" in result.output


def test_evaluate_operator_rules(tmp_path, tiny_model, runner, monkeypatch):
    """--operator: each model answers the rules' requests with the rule as its system prompt; declines per kind of
    request, source vs edit, in evaluation_operator.csv and the summary; the source's scores are not reused."""
    import csv

    from test_operator import RULES

    rules = tmp_path / "rules.csv"
    rules.write_text(RULES, encoding="utf-8")
    monkeypatch.setattr(settings, "OPERATOR_RULES", rules)
    _, out = fit_and_apply(runner, tiny_model, tmp_path)
    eval_dir = tmp_path / "eval"
    args = ["evaluate", str(out), "--out-dir", str(eval_dir), "--operator", "--limit", "2", "--max-new-tokens", "3"]
    result = runner.invoke(cli.main, [*args, "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "operator rules, requests breaking the rule (should decline): declined" in result.output
    summary = json.loads((eval_dir / "evaluation_summary.json").read_text())
    operator = summary["operator"]
    assert operator["rules"] == 2 and operator["system_role"] == "system" and len(operator["sha256"]) == 64
    rows = {r["expects"]: r for r in csv.DictReader((eval_dir / "evaluation_operator.csv").open())}
    assert rows["decline"]["n"] == rows["answer"]["n"] == "2"
    assert summary["source_scores_reused"] is None

"""scripts/screen_directions.py on a tiny model: its rows, and its fitted-direction score equals the written edit's."""

from __future__ import annotations

import csv
import sys

import pytest
from click.testing import CliRunner
from conftest import load_script

import cli
import settings
from weight_edit.activations import tokenized_batches
from weight_edit.chat import post_instruction_ids
from weight_edit.checkpoint import Checkpoint
from weight_edit.dataset import interleave_areas, load_dataset, split_dataset
from weight_edit.direction_file import load_direction
from weight_edit.models import load_model
from weight_edit.search import first_token_log_probs
from weight_edit.writer import apply_direction

FAST_FIT = ["--device", "cpu", "--dtype", "float32", "--batch-size", "64", "--screen-prompts", "2"]
FAST_FIT += ["--screen-keep", "2", "--validation-prompts", "4"]


@pytest.fixture(scope="module")
def screen():
    return load_script("screen_directions")


def test_screen_rows_and_fitted_score_match_the_written_edit(tmp_path, tiny_model, screen, monkeypatch):
    fit_dir, out = tmp_path / "fit", tmp_path / "screen.csv"
    result = CliRunner().invoke(cli.main, ["fit", "--model", str(tiny_model), "--out-dir", str(fit_dir), *FAST_FIT])
    assert result.exit_code == 0, result.output
    argv = ["screen_directions.py", "--fit-dir", str(fit_dir), "--model", str(tiny_model), "--out", str(out)]
    argv += ["--validation-prompts", "3", "--strengths", "1.0", "1.3", "--layers", "0", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    screen.main()

    rows = list(csv.DictReader(out.open()))
    direction, sidecar = load_direction(fit_dir / settings.DIRECTION_FILE)
    fitted = f"layer {sidecar['layer']} (fitted)"
    assert sidecar["layer"] == 1
    assert rows[0]["variant"] == "source" and float(rows[0]["kl"]) == 0.0
    # Layer 0's means (the embeddings of the same template tokens) do not differ: skipped. Layer 1, the
    # neighbour mean, biprojected and project mode remain, at 2 strengths each.
    assert len(rows) == 1 + (1 + 3) * 2
    assert {r["variant"] for r in rows} >= {fitted, "biprojected (fitted)", "project mode (fitted)"}
    assert all(float(r["kl"]) >= 0 and 0 <= float(r["refusal_prob"]) <= 1 for r in rows)

    # Independent path: write the full-strength edit, load it, score the same prompts from the checkpoint.
    edited = tmp_path / "edited"
    apply_direction(Checkpoint(tiny_model), direction, edited, mode="norm-preserving", force=True)
    seed = sidecar["split"]["seed"]
    split = split_dataset(
        load_dataset(settings.DEFAULT_DATASET), seed, settings.HELD_OUT_AREAS, settings.VALIDATION_FRACTION
    )
    prompts = [
        p.text
        for label in ("unsafe", sidecar["contrast"])  # KL is measured on the contrast's prompts, as tune does
        for p in interleave_areas(split.select("validation", label), 3, seed)
    ]
    log_probs = []
    for folder in (tiny_model, edited):
        model, tokenizer = load_model(folder, dtype="float32", device="cpu")
        batches = tokenized_batches(tokenizer, prompts, 16, "cpu", post_instruction_ids(tokenizer), by_length=True)
        log_probs.append(first_token_log_probs(model, batches)[3:])
    source, written = log_probs
    kl = float((source.exp() * (source - written)).sum(-1).mean())
    row = next(r for r in rows if r["variant"] == fitted and float(r["strength"]) == 1.0)
    assert float(row["kl"]) == pytest.approx(kl, rel=1e-3, abs=1e-6)
    stronger = next(r for r in rows if r["variant"] == fitted and float(r["strength"]) == 1.3)
    assert float(stronger["kl"]) != float(row["kl"])

"""scripts/selective_edits.py end to end on a tiny model: the default and a selective variant, operator rules,
public files with categories, aggregates read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "selective_edits.py"
FILES = {
    "harmbench_test": "prompt,category\nDo a bad thing,cybercrime_intrusion\nDo another bad thing,illegal\n",
    "strongreject": "prompt,category\nA third bad request,Violence\n",
    "jbb_benign": "prompt,category\nWrite a story about a heist,Economic harm\n",
    "alpaca_harmless_val": "prompt,category\nList three fruits,\nName two rivers,\n",
}


def test_selective_script_on_a_tiny_model(tmp_path, tiny_model):
    bench = tmp_path / "bench"
    bench.mkdir()
    for name, text in FILES.items():
        (bench / f"{name}.csv").write_text(text)
    out = tmp_path / "out"
    fit_args = ["--batch-size", "64", "--screen-prompts", "2", "--screen-keep", "2", "--validation-prompts", "4"]
    command = [sys.executable, str(SCRIPT), "--model", str(tiny_model), "--variants", "default", "close"]
    command += ["--benchmarks", str(bench), "--work", str(tmp_path / "work"), "--out", str(out)]
    command += ["--device", "cpu", "--dtype", "float32", "--max-new-tokens", "3", "--limit", "2"]
    command += [f"--fit-arg={a}" for a in fit_args]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    default, close = summary["variants"]["default"], summary["variants"]["close"]
    assert default["areas"] is None and set(default["groups"]) == {"ALL"}
    assert close["areas"]["remove"] == ["cybercrime"] and set(close["groups"]) == {"ALL removed", "ALL kept"}
    assert close["operator"]["decline"]["n"] == 60 and close["operator"]["answer"]["n"] == 60
    categories = (out / "close" / "evaluation_by_category.csv").read_text()
    assert "harmbench_test: cybercrime_intrusion" in categories and ",removed" in categories
    readme = (out / "README.md").read_text()
    assert "| default |" in readme and "| close | cybercrime / dangerous_chemicals |" in readme
    assert not (tmp_path / "work" / "edited-close").exists()

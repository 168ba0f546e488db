"""scripts/selective_edits.py end to end on a tiny model: the default and a selective variant, operator rules,
public files with categories, aggregates read back."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_variant_script

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "selective_edits.py"
FILES = {
    "harmbench_test": "prompt,category\nDo a bad thing,cybercrime_intrusion\nDo another bad thing,illegal\n",
    "strongreject": "prompt,category\nA third bad request,Violence\n",
    "jbb_benign": "prompt,category\nWrite a story about a heist,Economic harm\n",
    "alpaca_harmless_val": "prompt,category\nList three fruits,\nName two rivers,\n",
}


def test_selective_script_on_a_tiny_model(tmp_path, tiny_model):
    done, out = run_variant_script(SCRIPT, tiny_model, tmp_path, FILES, ["default", "close"])
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

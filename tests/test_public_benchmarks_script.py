"""scripts/public_benchmarks.py end to end on a tiny model: every step runs and the comparison is read back."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_variant_script

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "public_benchmarks.py"
FILES = {
    "harmbench_test": "prompt,category\nDo a bad thing,x\nDo another bad thing,y\n",
    "strongreject": "prompt,category\nA third bad request,z\n",
    "advbench": "prompt,category\nA fourth bad request,\nA fifth bad request,\n",
    "malicious_instruct": "prompt,category\nA sixth bad request,\n",
    "jbb_benign": "prompt,category\nWrite a story about a heist,Crime\n",
    "alpaca_harmless_val": "prompt,category\nList three fruits,\nName two rivers,\n",
}


def test_public_benchmarks_script_on_a_tiny_model(tmp_path, tiny_model):
    done, out = run_variant_script(SCRIPT, tiny_model, tmp_path, FILES, ["default", "first"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["variants"]) == {"default", "first"}
    default, first = summary["variants"]["default"], summary["variants"]["first"]
    assert default["direction"]["contrast"] == "harmless" and default["direction"]["selection"] == "refusal-then-kl"
    assert first["direction"]["contrast"] == "safe" and first["direction"]["selection"] == "paper"
    assert default["harmful_all"]["n"] == 6 and set(default["files"]) == set(FILES)
    assert default["files"]["alpaca_harmless_val"]["kind"] == "harmless" and default["verify"]["passed"]
    assert set(summary["timings"]["default"]) == {"fit", "apply", "verify", "evaluate"}
    readme = (out / "README.md").read_text()
    assert "| source |" in readme and "| default |" in readme and "| first |" in readme
    assert not (tmp_path / "work" / "edited-default").exists()  # checkpoints are removed unless kept

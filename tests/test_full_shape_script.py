"""scripts/full_shape.py at --tiny on the CPU: the release layouts (MXFP4 experts, fused Qwen3.5 experts) through
apply and verify, one JSON of aggregates per model; the layer cuts and the estimates at full shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "full_shape.py"


def test_tiny_mxfp4_and_fused_experts_through_apply_and_verify(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--model", "gpt-oss-20b", "qwen3.5-35b-a3b", "--tiny", "--device", "cpu"]
    command += ["--work", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for key in ("gpt-oss-20b", "qwen3.5-35b-a3b"):
        record = json.loads((out / f"{key}-tiny.json").read_text())
        assert record["tiny"] and "error" not in record
        assert [s["step"] for s in record["steps"]][-2:] == ["apply", "verify"]
        assert all(s["seconds"] >= 0 and s["peak_rss_gb_so_far"] > 0 for s in record["steps"])
        assert record["verify"]["passed"], record["verify"]["failures"]
        assert record["apply"]["edited_tensors"] > 0
        assert record["verify"]["guarantee"] == record["apply"]["guarantee"]
        assert record["disk"]["source"]["bytes"] > 0 and record["disk"]["output"]["bytes"] > 0
        assert f"{key}:" in done.stdout and "verify:" in done.stdout  # one line per step
    assert not (tmp_path / "work" / "gpt-oss-20b-tiny").exists()  # checkpoints are removed

    gpt_oss = json.loads((out / "gpt-oss-20b-tiny.json").read_text())
    assert gpt_oss["quantization"]["method"] == "mxfp4" and gpt_oss["quantization"]["quantized_tensors"] == 4
    source = gpt_oss["source_layout"]
    assert source["mxfp4_blocks"] == 4 and source["expert_down_proj"]["name"].endswith("experts.down_proj_blocks")
    assert source["expert_down_proj"]["dtype"] == "U8"
    assert gpt_oss["apply"]["dequantized"]["method"] == "mxfp4" and gpt_oss["apply"]["dequantized"]["tensors"] == 4
    assert gpt_oss["output_layout"]["mxfp4_blocks"] == 0

    qwen = json.loads((out / "qwen3.5-35b-a3b-tiny.json").read_text())
    down = qwen["source_layout"]["expert_down_proj"]
    assert qwen["source_layout"]["per_expert_tensors"] == 0  # fused as released, not per expert as transformers saves
    assert down["name"] == "model.language_model.layers.0.mlp.experts.down_proj" and down["shape"] == [4, 64, 32]


def test_layer_cuts_keep_the_pattern_and_gemma_kv_sharing():
    script = load_script("full_shape")
    text = json.loads(json.dumps(script.MODELS["gemma-4-e4b-it"].config["text_config"]))
    script._cut_layers(text, 12)
    assert text["num_hidden_layers"] == 12 and text["layer_types"] == text["layer_types"][:6] * 2
    assert text["num_kv_shared_layers"] == 5  # 18 of 42, scaled; the other 7 layers still hold both types
    scout = json.loads(json.dumps(script.MODELS["llama-4-scout-17b-16e"].config["text_config"]))
    script._cut_layers(scout, 4)
    assert scout["no_rope_layers"] == [1, 1, 1, 0]
    assert script.quantized_on_disk("fp8", "model.layers.3.self_attn.kv_a_proj_with_mqa.weight", 2)
    assert not script.quantized_on_disk("fp8", "model.layers.3.mlp.gate.weight", 2)  # the router stays bfloat16
    assert script.quantized_on_disk("mxfp4", "model.layers.0.mlp.experts.down_proj", 3)
    assert not script.quantized_on_disk("mxfp4", "model.layers.0.mlp.experts.down_proj_bias", 2)


def test_estimates_at_the_default_cuts_fit_one_gpu_and_the_disk():
    done = subprocess.run([sys.executable, str(SCRIPT), "--estimate"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    models = load_script("full_shape").MODELS
    rows = {
        line.split()[0]: line.split() for line in done.stdout.splitlines() if line.split()[:1] in ([k] for k in models)
    }
    assert set(rows) == set(models)
    assert rows["gemma-4-e4b-it"][1] == "42/42" and rows["deepseek-v3"][1] == "4/61"
    for row in rows.values():
        assert float(row[5]) < 75 and float(row[6]) < 60  # verify's float32 model on 80 GB; source + output on 64 GiB


def test_tiny_nemotron_h_and_qwen3_vl_moe_in_their_release_layouts(tmp_path):
    """Nemotron 3 Nano's pattern (Mamba, experts, attention) under backbone., Qwen3-VL-MoE's fused experts under
    the multimodal wrapper; `--dtype float32` names its JSON apart and stores no bfloat16."""
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--model", "nemotron-3-nano-30b-a3b", "qwen3-vl-30b-a3b", "--tiny"]
    command += ["--device", "cpu", "--work", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    nemotron = json.loads((out / "nemotron-3-nano-30b-a3b-tiny.json").read_text())
    assert nemotron["verify"]["passed"], nemotron["verify"]["failures"]
    assert nemotron["source_layout"]["expert_down_proj"]["name"].startswith("backbone.layers.1.mixer.experts.0.")
    # 6 layers MEMEM*: 3 Mamba out_proj, 2 x (4 experts + shared expert), 1 o_proj, the embedding
    assert nemotron["apply"]["edited_tensors"] == 3 + 2 * 5 + 1 + 1
    assert nemotron["verify"]["metrics"]["stored_vs_float32_edit_ulp"] <= 1.0
    qwen_vl = json.loads((out / "qwen3-vl-30b-a3b-tiny.json").read_text())
    assert qwen_vl["verify"]["passed"], qwen_vl["verify"]["failures"]
    assert qwen_vl["source_layout"]["fused_expert_tensors"] > 0
    assert qwen_vl["source_layout"]["expert_down_proj"]["name"].startswith("model.language_model.layers.0.mlp.experts")

    command = [sys.executable, str(SCRIPT), "--model", "gemma-4-e4b-it", "--tiny", "--dtype", "float32"]
    command += ["--device", "cpu", "--work", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    gemma = json.loads((out / "gemma-4-e4b-it-tiny-float32.json").read_text())
    assert gemma["storage_dtype"] == "float32" and gemma["verify"]["stored_dtype"] == "float32"
    assert gemma["verify"]["passed"] and "stored_vs_float32_edit_ulp" not in gemma["verify"]["metrics"]

"""`apply_direction` on tiny sharded checkpoints: every residual writer edited exactly, nothing else touched."""

import json

import pytest
import torch
from conftest import build_tiny_model
from safetensors import safe_open
from test_edit_math import reference_norm_preserving, reference_project

from weight_edit.checkpoint import INDEX_FILE, Checkpoint
from weight_edit.edit_math import unit
from weight_edit.output_folder import OutputError
from weight_edit.writer import PROVENANCE_FILE, apply_direction


def read_all(folder):
    checkpoint = Checkpoint(folder)
    return {name: checkpoint.read(name) for name in checkpoint.tensor_names}, checkpoint


@pytest.mark.parametrize("mode", ["norm-preserving", "project"])
@pytest.mark.parametrize("tie,bias", [(True, True), (False, False)])
def test_every_residual_writer_matches_float64_reference(tmp_path, chat_tokenizer, mode, tie, bias):
    source = build_tiny_model(tmp_path / "src", chat_tokenizer, tie=tie, bias=bias)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(7))
    r = unit(direction.double())
    result = apply_direction(Checkpoint(source), direction, tmp_path / "out", mode=mode)

    before, source_ckpt = read_all(source)
    after, edited_ckpt = read_all(tmp_path / "out")
    assert len(source_ckpt.shards) >= 2 and edited_ckpt.shards == source_ckpt.shards
    reference = reference_project if mode == "project" else reference_norm_preserving
    edited_names = set(result.edited_tensors)
    expected_writers = 1 + 2 * 2 + (2 * 2 if bias else 0)
    assert len(edited_names) == expected_writers
    for name, tensor in before.items():
        if name in edited_names:
            if tensor.ndim == 1:
                expected = reference_project(tensor.unsqueeze(1), r, 0).squeeze(1)
            else:
                axis = 1 if "embed_tokens" in name else 0
                expected = reference(tensor, r, axis)
            torch.testing.assert_close(after[name].double(), expected, atol=2e-5, rtol=1e-5)
            residual = (
                after[name].double()
                if after[name].ndim == 1
                else after[name].double().movedim(1 if "embed" in name else 0, -1)
            )
            assert (residual @ r).abs().max() < 1e-5, name
        else:
            assert torch.equal(after[name], tensor), f"{name} changed but is not a residual writer"
    if tie:
        assert result.untied_embeddings
        assert torch.equal(after["lm_head.weight"], before["model.embed_tokens.weight"])
        assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
        index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
        assert index["weight_map"]["lm_head.weight"] == index["weight_map"]["model.embed_tokens.weight"]
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in after.values())
    else:
        assert not result.untied_embeddings


def test_output_loads_without_custom_code_and_keeps_dtype(tmp_path, chat_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = build_tiny_model(tmp_path / "src", chat_tokenizer, dtype=torch.bfloat16)
    apply_direction(Checkpoint(source), torch.randn(32), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).chat_template
    with safe_open(str(tmp_path / "out" / Checkpoint(tmp_path / "out").shards[0]), framework="pt") as handle:
        assert handle.metadata()["format"] == "pt"


def test_provenance_records_hashes(tmp_path, tiny_model):
    import hashlib

    apply_direction(Checkpoint(tiny_model), torch.randn(32), tmp_path / "out", mode="project")
    provenance = json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())
    assert provenance["mode"] == "project"
    for shard, entry in provenance["output"]["shards"].items():
        assert hashlib.sha256((tmp_path / "out" / shard).read_bytes()).hexdigest() == entry["sha256"]
    for shard, entry in provenance["source"]["shards"].items():
        assert hashlib.sha256((tiny_model / shard).read_bytes()).hexdigest() == entry["sha256"]


def test_output_location_rules(tmp_path, tiny_model):
    checkpoint = Checkpoint(tiny_model)
    direction = torch.randn(32)
    for bad in (tiny_model, tiny_model / "inside", tmp_path):
        with pytest.raises(OutputError):
            apply_direction(checkpoint, direction, bad)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    with pytest.raises(OutputError, match="--force"):
        apply_direction(checkpoint, direction, out)
    assert (out / "keep.txt").read_text() == "previous result"
    apply_direction(checkpoint, direction, out, force=True)
    assert not (out / "keep.txt").exists() and (out / PROVENANCE_FILE).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_hidden_size_mismatch_is_refused(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="hidden size"):
        apply_direction(Checkpoint(tiny_model), torch.randn(31), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["norm-preserving", "project"])
def test_per_layer_biprojected_directions(tmp_path, chat_tokenizer, mode):
    """Writers of layer l remove row l; embeddings remove row 0; verify matches the per-layer hooks."""
    import settings
    from weight_edit.edit_math import biprojected_directions
    from weight_edit.verify import verify_checkpoint

    source = build_tiny_model(tmp_path / "src", chat_tokenizer, bias=True, layers=3)
    g = torch.Generator().manual_seed(9)
    direction, harmless = torch.randn(32, generator=g), torch.randn(3, 32, generator=g)
    layers = biprojected_directions(direction.double(), harmless.double())
    # the defining property: orthogonal to each layer's harmless mean, and still close to r̂
    assert (layers * harmless.double()).sum(-1).abs().max() < 1e-10
    assert (layers @ unit(direction.double()) > 0).all()
    result = apply_direction(
        Checkpoint(source), direction, tmp_path / "out", mode=mode, layer_directions=layers.float()
    )
    before, _ = read_all(source)
    after, _ = read_all(tmp_path / "out")
    for name in result.edited_tensors:
        layer = int(name.split(".")[2]) if ".layers." in name else 0
        u = layers[layer]
        axis = 1 if "embed" in name else 0
        if before[name].ndim == 1:
            expected = reference_project(before[name].unsqueeze(1), u, 0).squeeze(1)
        else:
            expected = (reference_project if mode == "project" else reference_norm_preserving)(before[name], u, axis)
        torch.testing.assert_close(after[name].double(), expected, atol=2e-5, rtol=1e-5)
    report = verify_checkpoint(
        tmp_path / "out", ["Tell me a joke", "How do locks work?"], settings.VERIFY_TOLERANCES, new_tokens=4
    )
    assert report.passed, report.failures
    assert report.guarantee == "hook-exact-per-layer" and report.metrics["max_abs_logit"] < 1e-3


def test_parallel_shards_write_the_same_bytes(tmp_path, chat_tokenizer):
    source = build_tiny_model(tmp_path / "src", chat_tokenizer, bias=True, shard_size="20KB")
    direction = torch.randn(32)
    one = apply_direction(Checkpoint(source), direction, tmp_path / "one", workers=1)
    many = apply_direction(Checkpoint(source), direction, tmp_path / "many", workers=4)
    assert len(one.provenance["output"]["shards"]) >= 3
    assert one.provenance["output"]["shards"] == many.provenance["output"]["shards"]  # sha256 of every shard


def test_model_card_names_the_base_model_and_the_verify_result(tmp_path, tiny_model):
    import settings
    from weight_edit.model_card import write_card
    from weight_edit.verify import read_provenance, verify_checkpoint

    out = tmp_path / "out"
    apply_direction(Checkpoint(tiny_model), torch.randn(32), out, provenance_extra={"base_model": "org/tiny-chat"})
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: org/tiny-chat\nlibrary_name: transformers\n")
    assert "not for\ndeployment" in card and "Not verified yet" in card
    assert all(entry["sha256"] in card for entry in read_provenance(out)["output"]["shards"].values())
    report = verify_checkpoint(out, ["Tell me a joke", "How do locks work?"], settings.VERIFY_TOLERANCES, new_tokens=2)
    write_card(out, read_provenance(out), report.as_dict())
    card = (out / "README.md").read_text()
    assert "**passed**" in card and "Not verified yet" not in card
    assert verify_checkpoint(
        out, ["Tell me a joke", "How do locks work?"], settings.VERIFY_TOLERANCES, new_tokens=2
    ).passed


# --- a lock on --out: two runs never write the same output at once -----------------------------------


def write_lock(out, **record):
    lock = out.with_name(out.name + ".weight-edit.lock")
    lock.write_text(json.dumps(record))
    return lock


def dead_pid():
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_a_live_lock_on_out_refuses_a_second_run(tmp_path, tiny_model):
    import os
    import socket

    out = tmp_path / "out"
    lock = write_lock(out, pid=os.getpid(), host=socket.gethostname())
    before = lock.read_text()
    for force in (False, True):  # --force replaces a finished result, never one being written
        with pytest.raises(OutputError) as info:
            apply_direction(Checkpoint(tiny_model), torch.randn(32), out, force=force)
        assert str(lock) in str(info.value) and f"pid {os.getpid()}" in str(info.value)
    assert lock.read_text() == before and not out.exists()  # another run's lock is never removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.weight-edit.lock", "tiny"]


def test_a_lock_of_another_host_is_not_judged_stale(tmp_path, tiny_model):
    out = tmp_path / "out"
    lock = write_lock(out, pid=dead_pid(), host="another-host.example")
    with pytest.raises(OutputError, match="another-host.example") as info:
        apply_direction(Checkpoint(tiny_model), torch.randn(32), out)
    assert str(lock) in str(info.value) and lock.exists()


@pytest.mark.parametrize("kind", ["dead pid", "rebooted", "reused pid", "unreadable and old"])
def test_a_stale_lock_is_removed_and_the_run_proceeds(tmp_path, tiny_model, kind):
    import os
    import socket
    import time

    out = tmp_path / "out"
    host = socket.gethostname()
    if kind == "dead pid":
        lock = write_lock(out, pid=dead_pid(), host=host)
    elif kind == "rebooted":  # a live pid, but recorded before the machine last booted
        lock = write_lock(out, pid=os.getpid(), host=host, boot_id="00000000-0000-0000-0000-000000000000")
    elif kind == "reused pid":  # a live pid, but not the process that took the lock (it started at another time)
        lock = write_lock(out, pid=os.getpid(), host=host, started="1")
    else:
        lock = write_lock(out)
        lock.write_text("")
        os.utime(lock, (time.time() - 3600, time.time() - 3600))
    if kind in ("rebooted", "reused pid") and not os.path.exists("/proc/self/stat"):
        pytest.skip("needs /proc")
    apply_direction(Checkpoint(tiny_model), torch.randn(32), out)
    assert (out / PROVENANCE_FILE).is_file() and not lock.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny"]


def test_an_unreadable_fresh_lock_is_held(tmp_path, tiny_model):
    """A lock being written right now (created, content not yet there) must not be taken for stale."""
    out = tmp_path / "out"
    lock = write_lock(out)
    lock.write_text("")
    with pytest.raises(OutputError, match="weight-edit.lock"):
        apply_direction(Checkpoint(tiny_model), torch.randn(32), out)
    assert lock.exists()


CONCURRENT_CHILD = r"""
import sys, time, torch
from pathlib import Path
from weight_edit import writer
from weight_edit.checkpoint import Checkpoint
original = writer._HashingWriter.write
def waiting_write(self, data):
    go = Path(sys.argv[3])
    if not go.exists():
        print("writing", flush=True)
        while not go.exists():
            time.sleep(0.05)
    return original(self, data)
writer._HashingWriter.write = waiting_write
writer.apply_direction(Checkpoint(sys.argv[1]), torch.randn(32), Path(sys.argv[2]))
print("done", flush=True)
"""


def test_two_concurrent_runs_to_the_same_out(tmp_path, tiny_model):
    """A second process writing the same --out while the first is midway gets OutputError naming the first's pid;
    the first completes, its lock is gone, and it is its result that stands."""
    import subprocess
    import sys
    from pathlib import Path

    out, go = tmp_path / "out", tmp_path / "go"
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(
        [sys.executable, "-c", CONCURRENT_CHILD, str(tiny_model), str(out), str(go)],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "writing"
        with pytest.raises(OutputError) as info:
            apply_direction(Checkpoint(tiny_model), torch.randn(32), out, force=True)
        assert f"pid {child.pid}" in str(info.value) and "out.weight-edit.lock" in str(info.value)
    finally:
        go.touch()
        stdout, _ = child.communicate(timeout=120)
    assert child.returncode == 0 and stdout.strip() == "done"
    assert (out / PROVENANCE_FILE).is_file() and not out.with_name("out.weight-edit.lock").exists()


def test_output_records_every_file_it_writes_and_seals_the_provenance(tmp_path, tiny_model):
    """Every file but the shards (recorded with their own hashes), the provenance, its seal, and the two files
    `verify` rewrites (README.md, weight_edit_verify.json) has its sha256 in the provenance; the seal holds the
    provenance file's sha256. Files `verify` writes are never copied from a source that is itself an output."""
    import hashlib

    (tiny_model / "weight_edit_verify.json").write_text('{"passed": true}')  # as if the source were an output
    (tiny_model / "weight_edit_provenance.sha256").write_text("0" * 64 + "  weight_edit_provenance.json\n")
    out = tmp_path / "out"
    apply_direction(Checkpoint(tiny_model), torch.randn(32), out)
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    files = provenance["output"]["files"]
    assert set(files) == set(sha) - set(provenance["output"]["shards"]) - {
        PROVENANCE_FILE,
        "weight_edit_provenance.sha256",
        "README.md",
    }
    assert {"config.json", INDEX_FILE, "tokenizer.json", "chat_template.jinja", "generation_config.json"} <= set(files)
    assert all(entry["sha256"] == sha[name] for name, entry in files.items())
    assert "weight_edit_verify.json" not in sha
    seal = (out / "weight_edit_provenance.sha256").read_text()
    assert seal == f"{sha[PROVENANCE_FILE]}  {PROVENANCE_FILE}\n"  # the format of sha256sum, so `sha256sum -c` works

"""Bad input and faults: each gives the project's own error (or exit code 2) naming what is at fault, and loses nothing.

Every case checks three things: the error type (or the CLI's one red line and exit code 2, no traceback), a message
naming the file, row, tensor or option at fault, and that nothing on disk changed except what should have.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import build_tiny_model
from safetensors.torch import load_file, save_file

import cli
import settings
from weight_edit import writer
from weight_edit.checkpoint import INDEX_FILE, Checkpoint, CheckpointError, fingerprint, read_header
from weight_edit.dataset import DatasetError, load_dataset
from weight_edit.direction_file import (
    SIDECAR_HASH_FIELD,
    DirectionError,
    check_compatible,
    load_direction,
    save_direction,
)
from weight_edit.hashing import tensor_sha256
from weight_edit.output_folder import OutputError
from weight_edit.verify import VerifyError, verify_checkpoint
from weight_edit.writer import DIRECTION_COPY, PROVENANCE_FILE, apply_direction

RESIDUAL_WRITER = "model.layers.0.mlp.down_proj.weight"
PROMPTS = ["How do locks work?", "Tell me a joke"]


# --- helpers -------------------------------------------------------------------------------------


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (hidden ones included), keyed by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    """Staging or retired folders that `apply` must never leave behind."""
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def assert_clear_cli_error(result: Result, *needles: str) -> None:
    """Exit code 2, one `error:` line naming the culprit, and no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert sum(line.startswith("error:") for line in result.output.splitlines()) == 1, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def cli_apply(model: Path, direction: Path, out: Path, *extra: str) -> Result:
    args = ["apply", "--model", str(model), "--direction", str(direction), "--out", str(out), *extra]
    return CliRunner().invoke(cli.main, args)


def bare_direction(folder: Path, seed: int = 0, name: str = "bare.safetensors") -> Path:
    path = folder / name
    save_file({"direction": torch.randn(32, generator=torch.Generator().manual_seed(seed))}, str(path))
    return path


def shard_of(folder: Path, tensor: str) -> Path:
    return folder / Checkpoint(folder).weight_map[tensor]


@pytest.fixture
def source(tmp_path, chat_tokenizer) -> Path:
    folder = build_tiny_model(tmp_path / "src", chat_tokenizer, shard_size="40KB")
    assert len(Checkpoint(folder).shards) >= 2
    return folder


# --- 1. dataset CSV (cases not already in test_dataset.py) ----------------------------------------

GOOD = "prompt,label,category\nHow do locks work?,safe,theft\nPick my neighbour's lock,unsafe,theft\n"


@pytest.mark.parametrize(
    "text,expected",
    [
        # the same prompt (after case and space folding) under another label and another area
        (GOOD + "\nHOW do  locks work?,unsafe,burglary\n", "row 5, column 'prompt' duplicates row 2"),
        (
            'prompt,label,category\n"first line\nsecond line",safe,a\n',
            "row 2, column 'prompt' spans several lines (lines 2-3)",
        ),
        (GOOD + 'Fine,safe,"the\narea"\n', "row 4, column 'category' spans several lines"),
        (GOOD + "Line\u2028separator,safe,theft\n", "row 4, column 'prompt' spans several lines"),
        (GOOD + '"never closed,safe,theft\nanother,unsafe,theft\n', "row 4 is not valid CSV"),
        (GOOD + '"quoted" then text,safe,theft\n', "row 4 is not valid CSV"),
        (GOOD + "bare\rreturn,safe,theft\n", "row 4 is not valid CSV: a bare carriage return"),
        (GOOD + "x" * 200_000 + ",safe,theft\n", "row 4 is not valid CSV: field larger than field limit"),
        (GOOD + "\n\nBad label,Safe,theft\n", "row 6, column 'label' is 'Safe'"),
    ],
)
def test_dataset_faults_name_the_row(tmp_path, text, expected):
    path = tmp_path / "d.csv"
    path.write_bytes(text.encode("utf-8"))
    before = digest(tmp_path)
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert expected in str(info.value) and str(path) in str(info.value)
    assert digest(tmp_path) == before


def test_dataset_that_is_not_a_file(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        load_dataset(tmp_path / "absent.csv")
    with pytest.raises(DatasetError, match="cannot be read"):
        load_dataset(tmp_path)


@pytest.mark.parametrize(
    "raw",
    [
        GOOD.encode(),
        b"\xef\xbb\xbf" + GOOD.encode(),  # BOM
        GOOD.replace("\n", "\r\n").encode(),  # CRLF
        GOOD.rstrip("\n").encode(),  # no final newline
        GOOD.encode() + "Où est la serrure ?,safe,théft\nVole la serrure,unsafe,théft\n".encode(),
    ],
)
def test_streamed_dataset_hashes_the_whole_file_once(tmp_path, monkeypatch, raw):
    """One binary pass: sha256 is that of the file's bytes, and the file is never read whole."""
    path = tmp_path / "d.csv"
    path.write_bytes(raw)
    for method in ("read_bytes", "read_text"):
        monkeypatch.setattr(Path, method, lambda *_, **__: pytest.fail("the loader read the whole file"))
    data = load_dataset(path)
    monkeypatch.undo()
    assert data.sha256 == hashlib.sha256(raw).hexdigest()
    assert [p.row for p in data.prompts][:2] == [2, 3]
    assert data.prompts[0].text == "How do locks work?" and data.prompts[0].category == "theft"


def test_embedded_dataset_hash_is_the_file_hash():
    assert (
        load_dataset(settings.DEFAULT_DATASET).sha256
        == hashlib.sha256(settings.DEFAULT_DATASET.read_bytes()).hexdigest()
    )


@pytest.mark.parametrize(
    "raw,expected",
    [
        ((GOOD + '"two\nlines",safe,theft\n').encode(), "row 4, column 'prompt' spans several lines"),
        (GOOD.encode() + b"\xff\xfe,safe,theft\n", "line 4 is not valid UTF-8"),
    ],
)
def test_bad_dataset_through_the_cli(tmp_path, tiny_model, raw, expected):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(raw)
    out_dir = tmp_path / "fit"
    model_before = digest(tiny_model)
    result = CliRunner().invoke(
        cli.main, ["fit", "--model", str(tiny_model), "--dataset", str(bad), "--out-dir", str(out_dir)]
    )
    assert_clear_cli_error(result, expected, "bad.csv")
    assert not out_dir.exists() and bad.read_bytes() == raw and digest(tiny_model) == model_before


# --- 2. direction file ---------------------------------------------------------------------------


def fitted_direction(folder: Path, model: Path, seed: int = 0, **fields) -> Path:
    """A direction with the sidecar `fit` would write for `model`."""
    vector = torch.randn(32, generator=torch.Generator().manual_seed(seed))
    sidecar = {"tool": "weight-edit", "model_fingerprint": fingerprint(Checkpoint(model)), "layer": 1, "position": -1}
    path, _ = save_direction(folder / "direction.safetensors", vector, {**sidecar, **fields})
    return path


def test_direction_fit_on_another_model_is_refused(tmp_path, chat_tokenizer, source):
    other = build_tiny_model(tmp_path / "other", chat_tokenizer, layers=3)
    direction = fitted_direction(tmp_path, other)
    vector, sidecar = load_direction(direction)
    with pytest.raises(DirectionError, match=r"was fit on another model \(num_layers: 3 there, 2 here\)"):
        check_compatible(sidecar, vector, fingerprint(Checkpoint(source)), direction)

    before_src, before_dir = digest(source), digest(tmp_path / "other")
    out = tmp_path / "out"
    assert_clear_cli_error(cli_apply(source, direction, out), "direction.safetensors was fit on another model")
    assert not out.exists() and not leftovers(tmp_path)
    assert digest(source) == before_src and digest(tmp_path / "other") == before_dir


def write_bad_direction(path: Path, kind: str) -> str:
    """Write a broken direction file of `kind`; return what the error must say."""
    if kind == "zero":
        save_file({"direction": torch.zeros(32)}, str(path))
        return "zero vector"
    if kind in ("nan", "inf"):
        vector = torch.randn(32)
        vector[3] = float(kind)
        save_file({"direction": vector}, str(path))
        return "non-finite"
    if kind == "name":
        save_file({"refusal": torch.randn(32)}, str(path))
        return "exactly one tensor named 'direction'"
    if kind == "two":
        save_file({"direction": torch.randn(32), "extra": torch.randn(32)}, str(path))
        return "exactly one tensor named 'direction'"
    if kind == "2d":
        save_file({"direction": torch.randn(2, 32)}, str(path))
        return "must be 1-D, found shape (2, 32)"
    if kind == "garbage":
        path.write_bytes(os.urandom(64))
        return "not a readable safetensors file"
    if kind == "truncated":
        save_file({"direction": torch.randn(32)}, str(path))
        path.write_bytes(path.read_bytes()[:-10])
        return "not a readable safetensors file"
    path.write_bytes(b"")
    return "not a readable safetensors file"


@pytest.mark.parametrize("kind", ["zero", "nan", "inf", "name", "two", "2d", "garbage", "truncated", "empty"])
def test_unusable_direction_file(tmp_path, kind):
    path = tmp_path / "direction.safetensors"
    expected = write_bad_direction(path, kind)
    before = digest(tmp_path)
    with pytest.raises(DirectionError) as info:
        load_direction(path)
    assert expected in str(info.value) and str(path) in str(info.value)
    assert digest(tmp_path) == before


def test_unusable_direction_through_the_cli(tmp_path, tiny_model):
    path = tmp_path / "dir" / "direction.safetensors"
    path.parent.mkdir()
    write_bad_direction(path, "2d")
    out = tmp_path / "out"
    assert_clear_cli_error(cli_apply(tiny_model, path, out), "direction.safetensors", "must be 1-D")
    assert not out.exists() and not leftovers(tmp_path)


def edit_sidecar(path: Path, change: Callable[[dict], None]) -> Path:
    sidecar_path = path.with_suffix(".json")
    data = json.loads(sidecar_path.read_text())
    change(data)
    sidecar_path.write_text(json.dumps(data, indent=2))
    return sidecar_path


def test_sidecar_survives_reformatting_but_not_editing(tmp_path, tiny_model):
    direction = fitted_direction(tmp_path, tiny_model, scores={"kl": 0.01, "bypass": float("nan")})
    sidecar_path = direction.with_suffix(".json")
    data = json.loads(sidecar_path.read_text())
    assert data[SIDECAR_HASH_FIELD] and data["scores"]["bypass"] != data["scores"]["bypass"]  # NaN survives
    sidecar_path.write_text(json.dumps(dict(reversed(list(data.items()))), indent=7))  # same content, new layout
    assert load_direction(direction)[1]["layer"] == 1

    edit_sidecar(direction, lambda d: d.update(layer=0))
    before = digest(tmp_path)
    with pytest.raises(DirectionError, match="edited by hand") as info:
        load_direction(direction)
    assert str(sidecar_path) in str(info.value)
    out = tmp_path / "out"
    assert_clear_cli_error(cli_apply(tiny_model, direction, out), "direction.json was edited by hand")
    assert digest(tmp_path) == before and not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda d: d.pop(SIDECAR_HASH_FIELD), "has no sidecar_sha256 (written by an older weight-edit)"),
        (lambda d: d["model_fingerprint"].update(num_layers=99), "edited by hand"),
        (lambda d: d.update(direction_sha256="0" * 64), "edited by hand"),
        (lambda d: d.update(sidecar_sha256=None), "has no sidecar_sha256"),
    ],
)
def test_old_or_edited_sidecar_is_refused(tmp_path, tiny_model, change, expected):
    direction = fitted_direction(tmp_path, tiny_model)
    sidecar_path = edit_sidecar(direction, change)
    with pytest.raises(DirectionError, match=expected.replace("(", r"\(").replace(")", r"\)")) as info:
        load_direction(direction)
    assert str(sidecar_path) in str(info.value)


@pytest.mark.parametrize(
    "content,expected",
    [(b"{not json", "not readable JSON"), (b"{\xff}", "not readable JSON"), (b"[1, 2]", "must hold a JSON object")],
)
def test_unreadable_sidecar(tmp_path, tiny_model, content, expected):
    direction = fitted_direction(tmp_path, tiny_model)
    sidecar_path = direction.with_suffix(".json")
    sidecar_path.write_bytes(content)
    with pytest.raises(DirectionError, match=expected) as info:
        load_direction(direction)
    assert str(sidecar_path) in str(info.value)


def test_sidecar_of_another_vector(tmp_path, tiny_model):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = fitted_direction(tmp_path / "a", tiny_model, seed=1)
    b = fitted_direction(tmp_path / "b", tiny_model, seed=2)
    a.with_suffix(".json").write_bytes(b.with_suffix(".json").read_bytes())  # a genuine sidecar, wrong vector
    with pytest.raises(DirectionError, match="does not describe") as info:
        load_direction(a)
    assert str(a.with_suffix(".json")) in str(info.value) and str(a) in str(info.value)


def test_sidecar_with_a_malformed_fingerprint(tmp_path, tiny_model):
    direction = fitted_direction(tmp_path, tiny_model, model_fingerprint="not an object")
    vector, sidecar = load_direction(direction)
    with pytest.raises(DirectionError, match="model_fingerprint is not a JSON object"):
        check_compatible(sidecar, vector, fingerprint(Checkpoint(tiny_model)), direction)


# --- 3. source checkpoint ------------------------------------------------------------------------


def second_shard(folder: Path) -> Path:
    return folder / Checkpoint(folder).shards[1]


def break_missing_shard(folder: Path) -> str:
    shard = second_shard(folder)
    shard.unlink()
    return f"missing shard {shard}"


def break_truncated_shard(folder: Path) -> str:
    shard = second_shard(folder)
    shard.write_bytes(shard.read_bytes()[:-100])
    return f"{shard}: tensor"  # ... lies outside the file (truncated shard?)


def break_garbage_header(folder: Path) -> str:
    shard = second_shard(folder)
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\xff\x00garbage!" * 3 + b"\x01\x02"
    shard.write_bytes(bytes(data))
    return f"{shard}: corrupt safetensors header"


def break_header_length(folder: Path) -> str:
    shard = second_shard(folder)
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    return f"{shard}: corrupt safetensors header (header length {len(data)} is larger than the {len(data)}-byte file)"


def break_absent_tensor(folder: Path) -> str:
    index = json.loads((folder / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["model.layers.7.mlp.down_proj.weight"] = shards[0]
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return f"tensor 'model.layers.7.mlp.down_proj.weight' is listed in {folder / INDEX_FILE} but absent from {folder / shards[0]}"


def break_outside_index(folder: Path) -> str:
    index = json.loads((folder / INDEX_FILE).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (folder.parent / "x.safetensors").write_bytes((folder / first).read_bytes())  # exists, and is still refused
    index["weight_map"] = {k: ("../x.safetensors" if v == first else v) for k, v in index["weight_map"].items()}
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return "shard '../x.safetensors' points outside"


def break_index_json(folder: Path) -> str:
    (folder / INDEX_FILE).write_text('{"weight_map": {')
    return f"{folder / INDEX_FILE}: the shard index is not valid JSON"


def break_config_json(folder: Path) -> str:
    (folder / "config.json").write_text("[]")
    return f"{folder / 'config.json'}: the model config must be a JSON object"


def break_index_to_config(folder: Path) -> str:
    index = json.loads((folder / INDEX_FILE).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: ("config.json" if v == first else v) for k, v in index["weight_map"].items()}
    (folder / INDEX_FILE).write_text(json.dumps(index))
    return "shard 'config.json' is not a *.safetensors file in"  # the writer would otherwise overwrite config.json with a shard


def break_overlapping_tensors(folder: Path) -> str:
    """Move the second tensor's data onto the first one's: sizes still match shapes, the data overlaps."""
    shard = second_shard(folder)
    data = shard.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    first, second = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])[:2]
    start = header[first]["data_offsets"][0]
    size = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
    header[second]["data_offsets"] = [start, start + size]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    shard.write_bytes(data[:8] + text.ljust(length) + data[8 + length :])
    return f"{shard}: tensor"  # ... overlaps the tensor before it


@pytest.mark.parametrize(
    "breaker",
    [
        break_missing_shard,
        break_truncated_shard,
        break_garbage_header,
        break_header_length,
        break_absent_tensor,
        break_outside_index,
        break_index_json,
        break_config_json,
        break_index_to_config,
        break_overlapping_tensors,
    ],
)
def test_broken_source_checkpoint(tmp_path, source, breaker):
    direction = bare_direction(tmp_path)
    expected = breaker(source)
    before = digest(tmp_path)
    with pytest.raises(CheckpointError) as info:
        Checkpoint(source)
    assert expected in str(info.value)
    out = tmp_path / "out"
    assert_clear_cli_error(cli_apply(source, direction, out), expected)
    assert digest(tmp_path) == before and not out.exists() and not leftovers(tmp_path)


def test_pickle_only_folder_is_refused_unopened(tmp_path, tiny_model):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    before = digest(tmp_path)
    with pytest.raises(
        CheckpointError, match="pytorch_model.bin: pickle checkpoints are not read, because unpickling can run code"
    ):
        Checkpoint(folder)
    result = cli_apply(folder, bare_direction(tmp_path), tmp_path / "out")
    assert_clear_cli_error(result, str(folder), "can run code")
    assert not (tmp_path / "out").exists()
    assert {k: v for k, v in digest(tmp_path).items() if k != "bare.safetensors"} == before


def test_linked_shards_of_a_hub_snapshot_load(tmp_path, source):
    """Shards that are links into a blob store (as in the hub cache) are inside the folder by name."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    for item in source.iterdir():
        target = blobs / hashlib.sha256(item.name.encode()).hexdigest()
        target.write_bytes(item.read_bytes())
        (snapshot / item.name).symlink_to(target)
    assert Checkpoint(snapshot).shards == Checkpoint(source).shards


def make_integer_writer(folder: Path) -> Path:
    """Store one residual writer as int32 (same bytes): a valid file, but not a weight the edit can touch."""
    shard = shard_of(folder, RESIDUAL_WRITER)
    tensors = load_file(str(shard))
    order = list(read_header(shard).tensors)
    tensors[RESIDUAL_WRITER] = tensors[RESIDUAL_WRITER].view(torch.int32)
    save_file({name: tensors[name] for name in order}, str(shard), metadata={"format": "pt"})
    return shard


def test_integer_residual_writer_stops_apply_and_leaves_nothing(tmp_path, source):
    make_integer_writer(source)
    before = digest(source)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=f"residual writer '{RESIDUAL_WRITER}' has non-float dtype I32"):
        apply_direction(Checkpoint(source), torch.randn(32), out)
    assert not out.exists() and not leftovers(tmp_path) and digest(source) == before

    assert_clear_cli_error(cli_apply(source, bare_direction(tmp_path), out), RESIDUAL_WRITER, "non-float dtype I32")
    assert not out.exists() and not leftovers(tmp_path) and digest(source) == before


def test_integer_residual_writer_keeps_the_previous_result(tmp_path, source):
    out = tmp_path / "out"
    apply_direction(Checkpoint(source), torch.randn(32), out)
    previous = digest(out)
    make_integer_writer(source)
    with pytest.raises(CheckpointError, match=RESIDUAL_WRITER):
        apply_direction(Checkpoint(source), torch.randn(32), out, force=True)
    assert digest(out) == previous and not leftovers(tmp_path)


# --- 4. output location and write faults ---------------------------------------------------------


@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
def test_out_must_not_touch_the_source(tmp_path, source, where):
    out = {"equal": source, "inside": source / "edited", "containing": tmp_path}[where]
    direction = bare_direction(tmp_path)
    before = digest(tmp_path)
    with pytest.raises(OutputError, match="must not be, contain, or lie inside the source"):
        apply_direction(Checkpoint(source), torch.randn(32), out)
    assert_clear_cli_error(cli_apply(source, direction, out), "--out", str(source))
    assert digest(tmp_path) == before and not leftovers(tmp_path) and not leftovers(source)
    assert where != "inside" or not out.exists()


def test_occupied_out_keeps_the_previous_result_and_force_replaces_it(tmp_path, source):
    out = tmp_path / "out"
    first, second = bare_direction(tmp_path, 1, "a.safetensors"), bare_direction(tmp_path, 2, "b.safetensors")
    assert (
        CliRunner()
        .invoke(cli.main, ["apply", "--model", str(source), "--direction", str(first), "--out", str(out)])
        .exit_code
        == 0
    )
    previous, source_before = digest(out), digest(source)

    assert_clear_cli_error(cli_apply(source, second, out), f"--out {out} is not empty; pass --force")
    assert digest(out) == previous

    result = cli_apply(source, second, out, "--force")
    assert result.exit_code == 0, result.output
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["direction_source"]["path"] == str(second.resolve())
    assert digest(out) != previous and set(digest(out)) == set(previous)
    assert digest(source) == source_before and not leftovers(tmp_path)


def no_space_on(shard_name: str, monkeypatch) -> None:
    """Make the writer's file writes fail with ENOSPC once it reaches `shard_name` (the first shard is whole)."""
    original = writer._HashingWriter.write

    def write(self, data):
        if Path(self.handle.name).name == shard_name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, data)

    monkeypatch.setattr(writer._HashingWriter, "write", write)


@pytest.mark.parametrize("previous", [False, True])
def test_disk_full_midway_loses_nothing(tmp_path, source, monkeypatch, previous):
    out = tmp_path / "out"
    if previous:
        apply_direction(Checkpoint(source), torch.randn(32), out)
    out_before = digest(out) if previous else None
    source_before = digest(source)
    checkpoint = Checkpoint(source)
    no_space_on(checkpoint.shards[1], monkeypatch)
    with pytest.raises(OSError) as info:
        apply_direction(checkpoint, torch.randn(32), out, force=True)
    assert info.value.errno == errno.ENOSPC
    assert digest(source) == source_before and not leftovers(tmp_path)
    assert (digest(out) == out_before) if previous else not out.exists()


def test_disk_full_through_the_cli(tmp_path, source, monkeypatch):
    out = tmp_path / "out"
    direction = bare_direction(tmp_path)
    source_before = digest(source)
    no_space_on(Checkpoint(source).shards[1], monkeypatch)
    result = cli_apply(source, direction, out)
    assert result.exit_code != 0
    assert not out.exists() and not leftovers(tmp_path) and digest(source) == source_before
    assert_clear_cli_error(result, "No space left on device")


# --- 5. verify -----------------------------------------------------------------------------------


def test_verify_refuses_a_shard_altered_after_apply(tmp_path, source):
    out = tmp_path / "out"
    apply_direction(Checkpoint(source), torch.randn(32), out)
    shard = out / Checkpoint(out).shards[1]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor's data
    shard.write_bytes(bytes(data))
    before = digest(tmp_path)
    with pytest.raises(VerifyError, match="was altered after `apply`") as info:
        verify_checkpoint(out, PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=3)
    assert str(shard) in str(info.value)
    result = CliRunner().invoke(cli.main, ["verify", str(out), "--device", "cpu"])
    assert_clear_cli_error(result, shard.name, "altered")
    assert digest(tmp_path) == before  # no weight_edit_verify.json written for a refused checkpoint


def test_verify_fails_a_checkpoint_edited_with_another_direction(tmp_path, source):
    """Direction file and provenance agree on B, the weights were edited with A: only the models disagree."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(32, generator=g), torch.randn(32, generator=g)
    out = tmp_path / "out"
    apply_direction(Checkpoint(source), a, out)
    save_file({"direction": b}, str(out / DIRECTION_COPY), metadata={"format": "pt"})
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    provenance["direction"]["sha256"] = tensor_sha256(b)
    # a consistent record (file hashes and seal rewritten too): only running the models can tell
    provenance["output"]["files"] = writer.output_file_records(out, provenance["output"]["shards"])
    writer.write_provenance(out, provenance)
    before = digest(tmp_path)
    report = verify_checkpoint(out, PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=3)
    assert report.checks["output_checksums"] == report.checks["output_files"] == "passed"
    assert not report.passed
    assert any("logit" in f for f in report.failures) and any("direction component" in f for f in report.failures)
    assert digest(tmp_path) == before


@pytest.mark.parametrize("change", ["one bit", "missing", "config"])
def test_verify_refuses_a_source_changed_since_apply(tmp_path, source, change):
    """The hooked twin runs on the source: a changed source must be named as such, not blamed on the edit."""
    out = tmp_path / "out"
    apply_direction(Checkpoint(source), torch.randn(32), out)
    if change == "config":  # same weights, another model: every norm's epsilon changes
        changed = source / "config.json"
        config = json.loads(changed.read_text())
        config["rms_norm_eps"] = 0.5
        changed.write_text(json.dumps(config, indent=2))
    else:
        changed = shard_of(source, "model.layers.1.self_attn.q_proj.weight")  # not a residual writer
        if change == "missing":
            changed.rename(changed.with_name(changed.name + ".moved"))
        else:
            data = bytearray(changed.read_bytes())
            data[-3] ^= 0x01
            changed.write_bytes(bytes(data))
    before = digest(tmp_path)
    with pytest.raises(VerifyError, match="source changed since `apply`") as info:
        verify_checkpoint(out, PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=3)
    assert str(changed) in str(info.value) and "not the edit" in str(info.value)
    result = CliRunner().invoke(cli.main, ["verify", str(out), "--device", "cpu"])
    assert_clear_cli_error(result, changed.name, "source changed since `apply`")
    assert digest(tmp_path) == before


def alter_chat_template(out: Path) -> Path:
    path = out / "chat_template.jinja"
    path.write_text(path.read_text() + "{# an added line #}\n")
    return path


def alter_tokenizer(out: Path) -> Path:
    path = out / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data["model_max_length"] = 7
    path.write_text(json.dumps(data, indent=2))
    return path


def alter_generation_config(out: Path) -> Path:
    path = out / "generation_config.json"
    data = json.loads(path.read_text())
    data["temperature"] = 1.7
    path.write_text(json.dumps(data, indent=2))
    return path


def alter_config(out: Path) -> Path:
    path = out / "config.json"
    data = json.loads(path.read_text())
    data["rms_norm_eps"] = 0.5
    path.write_text(json.dumps(data, indent=2))
    return path


def alter_index(out: Path) -> Path:
    path = out / INDEX_FILE
    data = json.loads(path.read_text())
    data["metadata"]["note"] = "edited by hand"
    path.write_text(json.dumps(data, indent=2))
    return path


def alter_provenance(out: Path) -> Path:
    path = out / PROVENANCE_FILE
    data = json.loads(path.read_text())
    data["mode"] = "project"  # norm-preserving was applied
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def remove_provenance_seal(out: Path) -> Path:
    (out / writer.PROVENANCE_SEAL).unlink()
    return out / writer.PROVENANCE_SEAL


def add_a_file(out: Path) -> Path:
    path = out / "special_tokens_map.json"
    path.write_text("{}")
    return path


@pytest.mark.parametrize(
    "alter,expected",
    [
        (alter_chat_template, "was altered after `apply`"),
        (alter_tokenizer, "was altered after `apply`"),
        (alter_generation_config, "was altered after `apply`"),
        (alter_config, "was altered after `apply`"),
        (alter_index, "was altered after `apply`"),
        (alter_provenance, "was altered after `apply`"),
        (remove_provenance_seal, "is missing"),
        (add_a_file, "was not written by `apply`"),
    ],
)
def test_verify_refuses_any_file_altered_after_apply(tmp_path, source, alter, expected):
    """Not only the shards: tokenizer, chat template, configs, the index and the provenance itself are checked."""
    out = tmp_path / "out"
    apply_direction(Checkpoint(source), torch.randn(32), out)
    path = alter(out)
    before = digest(tmp_path)
    with pytest.raises(VerifyError) as info:
        verify_checkpoint(out, PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=3)
    assert str(path) in str(info.value) and expected in str(info.value), str(info.value)
    result = CliRunner().invoke(cli.main, ["verify", str(out), "--device", "cpu"])
    assert_clear_cli_error(result, path.name, expected)
    assert digest(tmp_path) == before


def test_verify_of_an_old_provenance_runs_and_says_what_it_could_not_check(tmp_path, source):
    """Provenance from before file records and the seal: shards are checked, the other files cannot be."""
    out = tmp_path / "out"
    apply_direction(Checkpoint(source), torch.randn(32), out)
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    del provenance["output"]["files"], provenance["source"]["files"]
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    (out / writer.PROVENANCE_SEAL).unlink()
    report = verify_checkpoint(out, PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=3)
    assert report.passed, report.failures
    assert report.checks["output_checksums"] == "passed"
    assert report.checks["output_files"].startswith("not checked: the provenance file records no hashes")


# --- interrupted or killed mid-write --------------------------------------------------------------


def test_interrupt_midway_loses_nothing(tmp_path, source, monkeypatch):
    """Ctrl-C during the second shard: the source is untouched, the previous result stays, no staging."""
    out = tmp_path / "out"
    apply_direction(Checkpoint(source), torch.randn(32), out)
    out_before, source_before = digest(out), digest(source)
    checkpoint = Checkpoint(source)
    original = writer._HashingWriter.write

    def write(self, data):
        if Path(self.handle.name).name == checkpoint.shards[1]:
            raise KeyboardInterrupt
        return original(self, data)

    monkeypatch.setattr(writer._HashingWriter, "write", write)
    with pytest.raises(KeyboardInterrupt):
        apply_direction(checkpoint, torch.randn(32), out, force=True)
    assert digest(source) == source_before and digest(out) == out_before and not leftovers(tmp_path)


KILLED_CHILD = r"""
import sys, time, torch
from pathlib import Path
from weight_edit import writer
from weight_edit.checkpoint import Checkpoint
original = writer._HashingWriter.write
def slow_write(self, data):
    if Path(self.handle.name).name == sys.argv[3]:
        print("writing", flush=True)
        time.sleep(60)
    return original(self, data)
writer._HashingWriter.write = slow_write
writer.apply_direction(Checkpoint(sys.argv[1]), torch.randn(32), Path(sys.argv[2]), force=True)
"""


def test_killed_midway_leaves_out_whole_and_the_next_run_cleans_up(tmp_path, source):
    """SIGKILL while the second shard is written: --out keeps the previous complete result."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    apply_direction(Checkpoint(source), torch.randn(32), out)
    out_before, source_before = digest(out), digest(source)
    shard = Checkpoint(source).shards[1]
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(source), str(out), shard], cwd=root, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "writing"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert digest(source) == source_before and digest(out) == out_before
    assert leftovers(tmp_path) == [f".out.partial-{child.pid}"]  # the dead run's staging, never at --out
    apply_direction(Checkpoint(source), torch.randn(32), out, force=True)
    assert not leftovers(tmp_path) and digest(source) == source_before


# --- remote code --------------------------------------------------------------------------------


def test_remote_code_in_a_checkpoint_is_never_run(tmp_path, tiny_model):
    """A config whose auto_map points at code in the folder: loading must not import that code."""
    from weight_edit.models import load_model

    marker = tmp_path / "code-ran"
    (tiny_model / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaForCausalLM as EvilModel, LlamaConfig as EvilConfig\n"
    )
    config = json.loads((tiny_model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (tiny_model / "config.json").write_text(json.dumps(config))
    try:
        load_model(tiny_model, dtype="float32", device="cpu")
    except ValueError:
        pass  # refusing is fine; running the code is not
    assert not marker.exists()


# --- GGUF files that are not GGUF models ------------------------------------------------------------


def write_bad_gguf(path: Path, kind: str) -> str:
    """Write a broken .gguf of `kind`; return what the error must say besides the file's name."""
    if kind == "empty":
        path.write_bytes(b"")
        return "is empty"
    if kind == "random":
        path.write_bytes(bytes(range(7, 250)) * 5)  # no GGUF magic
        return "does not start with the GGUF magic bytes"
    if kind == "magic-only":
        path.write_bytes(b"GGUF")
        return "too short for a GGUF header"
    if kind == "magic-then-junk":
        path.write_bytes(b"GGUF" + bytes(range(255, 0, -1)) * 3)
        return "could not be read as a model"
    # a well-formed version-3 header that declares no tensors and no metadata
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    return "could not be read as a model"


@pytest.mark.parametrize("kind", ["empty", "random", "magic-only", "magic-then-junk", "empty-header"])
def test_unreadable_gguf_is_one_clear_error(tmp_path, kind):
    from weight_edit.models import ModelResolutionError, resolve_model

    path = tmp_path / "model.gguf"
    expected = write_bad_gguf(path, kind)
    with pytest.raises(ModelResolutionError) as info:
        resolve_model(str(path))
    assert str(path) in str(info.value) and expected in str(info.value), str(info.value)
    assert not any(p.name.endswith(".partial") for p in Path(os.environ["WEIGHT_EDIT_CACHE"]).rglob("*"))
    out = tmp_path / "out"
    assert_clear_cli_error(cli_apply(path, bare_direction(tmp_path), out), "model.gguf", expected)
    assert not out.exists()

"""Property-based fuzzing of the input readers: any bytes either load or raise the project's own error.

Random and mutated CSV files go to `load_dataset`, random and mutated safetensors files to `read_header`, mutated
shard indexes and configs to `Checkpoint`. Nothing else (KeyError, struct.error, JSON errors, ...) may escape.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from weight_edit.checkpoint import DTYPES, INDEX_FILE, Checkpoint, CheckpointError, read_header
from weight_edit.dataset import LABELS, POLICY_LABELS, DatasetError, load_dataset

FUZZ = settings(
    max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# --- byte mutations shared by every reader ---------------------------------------------------------

INTERESTING = [
    b'"',
    b",",
    b"\n",
    b"\r",
    b"\r\n",
    b"\x00",
    b"\xff",
    b"\xef\xbb\xbf",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b"-1",
]


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` with a few flips, insertions, deletions or a truncation: close to valid, so the checks run deep."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.sampled_from(INTERESTING) | st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


def write_temp(folder: str, name: str, data: bytes) -> Path:
    path = Path(folder) / name
    path.write_bytes(data)
    return path


# --- dataset CSV ---------------------------------------------------------------------------------

VALID_CSV = (
    b"prompt,label,category\n"
    b"How do locks work?,safe,theft\n"
    b'"Pick a lock, quietly",unsafe,theft\n'
    b"What is phishing?,safe,fraud\n"
    b"Write a phishing email,unsafe,fraud\n"
)

cells = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)


@st.composite
def csv_files(draw: st.DrawFn) -> bytes:
    """Well-quoted CSV, mostly valid: each cell is random text, a wrong header or an extra field now and then."""

    def rarely(usual: st.SearchStrategy[str]) -> str:
        return draw(cells) if draw(st.integers(0, 15)) == 0 else draw(usual)

    rows = [["prompt", "label", "category"] if draw(st.integers(0, 9)) else ["label", "prompt"]]
    for number in range(draw(st.integers(0, 8))):
        prompt = rarely(st.sampled_from(["Question", "How do locks work?", "  "])) + f" {number}"
        row = [prompt, rarely(st.sampled_from(LABELS)), rarely(st.sampled_from(["theft", "fraud"]))]
        rows.append(row + ([draw(cells)] if draw(st.integers(0, 30)) == 0 else []))
    text = io.StringIO()
    csv.writer(text, lineterminator=draw(st.sampled_from(["\n", "\r\n"]))).writerows(rows)
    return draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + text.getvalue().encode("utf-8")


def check_dataset(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = write_temp(folder, "fuzz.csv", raw)
        try:
            data = load_dataset(path)
        except DatasetError as exc:
            assert "fuzz.csv" in str(exc)
            event("refused")
            return
    event("loaded")
    assert data.sha256 == hashlib.sha256(raw).hexdigest()
    rows = [p.row for p in data.prompts]
    assert rows == sorted(set(rows)) and rows[0] >= 2
    for prompt in data.prompts:
        assert prompt.text and prompt.text == prompt.text.strip() and prompt.label in LABELS
        assert prompt.category or prompt.label == "harmless"  # only harmless rows may leave it empty
        assert "".join(prompt.text.splitlines()) == prompt.text
    for area in data.categories:
        assert {p.label for p in data.prompts if p.category == area} == set(POLICY_LABELS)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_as_csv(raw):
    check_dataset(raw)


@FUZZ
@given(mutated(VALID_CSV))
def test_mutated_csv(raw):
    check_dataset(raw)


@FUZZ
@given(csv_files())
def test_generated_csv(raw):
    check_dataset(raw)


# --- safetensors headers -------------------------------------------------------------------------


def valid_safetensors() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.safetensors"
        tensors = {
            "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "b": torch.ones(4, dtype=torch.bfloat16),
            "c": torch.tensor([1, 2], dtype=torch.int64),
            "empty": torch.zeros(0, 3),
        }
        save_file(tensors, str(path), metadata={"format": "pt"})
        return path.read_bytes()


VALID_SAFETENSORS = valid_safetensors()
json_scalars = st.none() | st.booleans() | st.integers(-3, 70) | st.floats(allow_nan=False) | st.text(max_size=6)


@st.composite
def random_header_files(draw: st.DrawFn) -> bytes:
    """A length prefix and JSON header with plausible but unchecked entries, then some data bytes."""
    header: dict[str, object] = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=4), st.text(max_size=4) | json_scalars, max_size=2) | json_scalars
        )
    for name in draw(st.lists(st.text(max_size=4), max_size=4, unique=True)):
        header[name] = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "dtype": st.sampled_from(["F32", "BF16", "I64", "U8", "BOOL", "F4", "X"]) | json_scalars,
                    "shape": st.lists(st.integers(0, 5) | json_scalars, max_size=3) | json_scalars,
                    "data_offsets": st.lists(st.integers(0, 64) | json_scalars, min_size=1, max_size=3) | json_scalars,
                },
            )
            | json_scalars
        )
    text = json.dumps(header).encode() + draw(st.sampled_from([b"", b"  ", b"\x00"]))
    length = len(text) + draw(st.sampled_from([0, 0, 0, -1, 1, 2**64 - 1 - len(text)]))
    data = draw(st.binary(max_size=80))
    return struct.pack("<Q", max(0, min(length, 2**64 - 1))) + text + data


def check_header(raw: bytes) -> None:
    """Parse or CheckpointError; and what parses, safetensors itself can read, tensor by tensor."""
    with tempfile.TemporaryDirectory() as folder:
        path = write_temp(folder, "fuzz.safetensors", raw)
        try:
            header = read_header(path)
        except CheckpointError as exc:
            assert "fuzz.safetensors" in str(exc)
            event("refused")
            return
        event("parsed")
        readable = [name for name, info in header.tensors.items() if info.dtype in DTYPES]
        with safe_open(str(path), framework="pt") as handle:
            assert set(handle.keys()) == set(header.tensors)
            for name in readable:
                tensor = handle.get_tensor(name)
                info = header.tensors[name]
                assert tuple(tensor.shape) == info.shape and tensor.numel() * tensor.element_size() == info.nbytes


@FUZZ
@given(mutated(VALID_SAFETENSORS))
def test_mutated_safetensors(raw):
    check_header(raw)


@FUZZ
@given(random_header_files())
def test_random_safetensors_headers(raw):
    check_header(raw)


@FUZZ
@given(st.binary(max_size=64))
def test_random_bytes_as_safetensors(raw):
    check_header(raw)


def test_the_valid_seed_file_parses():
    with tempfile.TemporaryDirectory() as folder:
        header = read_header(write_temp(folder, "x.safetensors", VALID_SAFETENSORS))
    assert set(header.tensors) == {"a", "b", "c", "empty"} and header.metadata == {"format": "pt"}


# --- shard index and config ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A two-shard checkpoint built from safetensors directly (Checkpoint needs no model class)."""
    folder = tmp_path_factory.mktemp("sharded")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    save_file({"w.0": torch.ones(2, 4), "w.1": torch.zeros(4)}, str(folder / "s-1.safetensors"))
    save_file({"w.2": torch.ones(3)}, str(folder / "s-2.safetensors"))
    index = {
        "metadata": {"total_size": 60},
        "weight_map": {"w.0": "s-1.safetensors", "w.1": "s-1.safetensors", "w.2": "s-2.safetensors"},
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    assert Checkpoint(folder).tensor_names == {"w.0", "w.1", "w.2"}
    return folder


VALID_INDEX = json.dumps(
    {
        "metadata": {"total_size": 60},
        "weight_map": {"w.0": "s-1.safetensors", "w.1": "s-1.safetensors", "w.2": "s-2.safetensors"},
    },
    indent=2,
).encode()
shard_names = st.sampled_from(
    [
        "s-1.safetensors",
        "s-2.safetensors",
        "s-3.safetensors",
        "../s-1.safetensors",
        "/etc/passwd",
        "",
        ".",
        "config.json",
    ]
)


@st.composite
def edited_indexes(draw: st.DrawFn) -> bytes:
    """The valid index with values replaced by other shard names or arbitrary JSON."""
    index = json.loads(VALID_INDEX)
    for name in draw(st.lists(st.sampled_from(["w.0", "w.1", "w.2", "w.9"]), max_size=3)):
        index["weight_map"][name] = draw(shard_names | json_scalars)
    if draw(st.booleans()):
        index[draw(st.sampled_from(["metadata", "weight_map"]))] = draw(json_scalars | st.just({}))
    return json.dumps(index).encode()


def check_checkpoint(folder: Path, index: bytes, config: bytes | None = None) -> None:
    (folder / INDEX_FILE).write_bytes(index)
    if config is not None:
        (folder / "config.json").write_bytes(config)
    try:
        checkpoint = Checkpoint(folder)
    except CheckpointError:
        event("refused")
        return
    event("loaded")
    assert checkpoint.tensor_names <= {"w.0", "w.1", "w.2"}
    for name in checkpoint.tensor_names:
        assert checkpoint.read(name).shape == checkpoint.info(name).shape
    checkpoint.main_dtype()
    checkpoint.tied_embeddings  # noqa: B018 - must not raise on an odd config


@FUZZ
@given(raw=mutated(VALID_INDEX))
def test_mutated_index(sharded, raw):
    check_checkpoint(sharded, raw)


@FUZZ
@given(raw=edited_indexes())
def test_edited_index(sharded, raw):
    check_checkpoint(sharded, raw)


@FUZZ
@given(
    config=mutated(b'{"model_type": "llama", "text_config": {"tie_word_embeddings": false}}') | st.binary(max_size=40)
)
def test_mutated_config(sharded, config):
    try:
        check_checkpoint(sharded, VALID_INDEX, config)
    finally:
        (sharded / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))

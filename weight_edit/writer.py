"""Writing an edited checkpoint: stream every shard, edit residual writers, write atomically.

Each source shard is read once, sequentially, and hashed on the way; unedited tensors are copied as
raw bytes and edited tensors are decoded, edited and encoded one at a time, so peak memory is set by
the largest edited tensor, not by the model. The output keeps the source's shard names, tensor order
and dtypes, and appears at `out` only once it is complete (staging, lock and replace: output_folder.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weight_edit import __version__
from weight_edit.architecture import Architecture, EditTarget, architecture_for
from weight_edit.checkpoint import (
    DTYPE_CODES,
    DTYPES,
    FLOAT_DTYPES,
    INDEX_FILE,
    Checkpoint,
    CheckpointError,
    TensorInfo,
)
from weight_edit.edit_math import EditMode, edited_pieces, norm_adjusted_basis, norm_scale
from weight_edit.edit_plan import EditPlan, PlanError, Strengths
from weight_edit.hashing import file_sha256, tensor_sha256
from weight_edit.model_card import CARD_FILE, write_card
from weight_edit.output_folder import check_output_location, new_staging, output_lock, replace_atomically
from weight_edit.quantized import QuantizedTensor, float_dtype, output_config

PROVENANCE_FILE = "weight_edit_provenance.json"
# The provenance file's own sha256, in `sha256sum` format: any later edit of the provenance is detected.
PROVENANCE_SEAL = "weight_edit_provenance.sha256"
VERIFY_FILE = "weight_edit_verify.json"  # written by `verify`, never by apply
DIRECTION_COPY = "weight_edit_direction.safetensors"
LAYER_DIRECTIONS_COPY = "weight_edit_layer_directions.safetensors"
SUBSPACE_COPY = "weight_edit_subspace.safetensors"
COPY_CHUNK = 64 * 1024 * 1024
AUTO_WORKERS = 3  # shards edited at once unless --workers says otherwise
# Files never copied from the source folder: weights are rewritten, pickles and GGUF are not carried.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


@dataclass
class ApplyResult:
    out: Path
    edited_tensors: list[str]
    untied_embeddings: bool
    provenance: dict[str, Any]


def _serialise_header(entries: dict[str, dict[str, Any]], metadata: dict[str, str]) -> bytes:
    header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(header)) + header


def _plan_shard(
    infos: list[TensorInfo], extra_after: dict[str, TensorInfo], edit: _ShardEdit
) -> dict[str, dict[str, Any]]:
    """Output header entries: the source order, with extra tensors (lm_head) placed after their twin, a dequantized
    tensor in its quantized data's place (float name, dtype and shape) and its scales left out."""
    entries: dict[str, dict[str, Any]] = {}
    offset = 0
    for info in infos:
        if info.name in edit.dropped:
            continue
        items = [edit.output_info(info), *([extra_after[info.name]] if info.name in extra_after else [])]
        for item in items:
            entries[item.name] = {
                "dtype": item.dtype,
                "shape": list(item.shape),
                "data_offsets": [offset, offset + item.nbytes],
            }
            offset += item.nbytes
    return entries


class _BackgroundHash:
    """sha256 on its own thread (hashlib releases the GIL), so hashing overlaps reading, editing and writing.

    The queue holds at most two chunks; each stays alive until hashed, so the queue's length sets how
    much memory every parallel worker adds (apply's peak RSS must not grow with the worker count).
    """

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            self.hasher.update(item)

    def update(self, data: bytes | memoryview | bytearray) -> None:
        self.queue.put(data)

    def close(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def hexdigest(self) -> str:
        self.close()
        return self.hasher.hexdigest()


class _HashingReader:
    """Sequential reader over one source shard that hashes every byte it passes."""

    def __init__(self, path: Path):
        self.handle = path.open("rb", buffering=0)
        self.hasher = _BackgroundHash()
        self.position = 0

    def read(self, size: int) -> memoryview:
        view = memoryview(torch.empty(size, dtype=torch.uint8).numpy())  # uninitialised: no zero-fill pass
        filled = 0
        while filled < size:
            count = self.handle.readinto(view[filled:])
            if not count:
                raise CheckpointError(f"{self.handle.name}: unexpected end of file (truncated shard?)")
            filled += count
        self.hasher.update(view)
        self.position += size
        return view

    def copy_to(self, size: int, sink: Callable[[bytes | memoryview], None]) -> None:
        while size > 0:
            chunk = self.read(min(size, COPY_CHUNK))
            sink(chunk)
            size -= len(chunk)

    def finish(self) -> str:
        while chunk := self.handle.read(COPY_CHUNK):
            self.hasher.update(chunk)
        self.handle.close()
        return self.hasher.hexdigest()

    def close(self) -> None:
        self.handle.close()
        self.hasher.close()


class _HashingWriter:
    def __init__(self, path: Path):
        self.handle = path.open("wb", buffering=0)
        self.hasher = _BackgroundHash()
        self.size = 0

    def write(self, data: bytes | memoryview | bytearray) -> None:
        view = memoryview(data)
        written = 0
        while written < len(view):  # unbuffered writes may be partial
            written += self.handle.write(view[written:])
        self.hasher.update(data)
        self.size += len(data)

    def finish(self) -> str:
        os.fsync(self.handle.fileno())
        self.handle.close()
        return self.hasher.hexdigest()

    def close(self) -> None:
        self.handle.close()
        self.hasher.close()


def _decode(raw: memoryview, info: TensorInfo) -> torch.Tensor:
    return (
        torch.frombuffer(raw, dtype=DTYPES[info.dtype]).reshape(info.shape)
        if info.nbytes
        else torch.empty(info.shape, dtype=DTYPES[info.dtype])
    )


def _encode(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().view(torch.uint8).numpy()).cast("B")


@dataclass(frozen=True)
class _ShardEdit:
    """What writing any shard needs: the residual writers and their bases, the tied embedding to untie, and the
    quantized tensors written as floats (by their on-disk data tensor; their scales are `dropped`)."""

    targets: dict[str, EditTarget]  # by tensor name
    bases: Callable[[EditTarget], tuple[torch.Tensor, float]]  # a writer's rows to remove and its strength
    mode: EditMode
    untie_from: str | None  # the tied token embedding, also written unedited as `untie_to`; None: no untying
    untie_to: str
    dequantized: dict[str, QuantizedTensor] = field(default_factory=dict)  # by on-disk data tensor
    dropped: frozenset[str] = frozenset()  # on-disk tensors not written (scales of dequantized tensors)
    read_float: Callable[[str], torch.Tensor] | None = None  # a tensor by float name, dequantized (Checkpoint.read)
    float_dtype: torch.dtype = torch.bfloat16  # of the dequantized tensors in the output

    def output_info(self, info: TensorInfo) -> TensorInfo:
        """The output's entry for an on-disk tensor: itself, or the float tensor its quantized data becomes."""
        quantized = self.dequantized.get(info.name)
        if quantized is None:
            return info
        nbytes = math.prod(quantized.shape) * self.float_dtype.itemsize
        return TensorInfo(quantized.name, DTYPE_CODES[self.float_dtype], quantized.shape, 0, nbytes)


class WriterBases:
    """Each writer's rows to remove and strength, from the plan. A write that passes through a norm before the
    residual add gets the norm-adjusted rows (û), computed once per norm; shards run on parallel threads."""

    def __init__(self, plan: EditPlan, source: Checkpoint) -> None:
        self.plan, self.source = plan, source
        self.norm_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self.lock = threading.Lock()

    def __call__(self, target: EditTarget) -> tuple[torch.Tensor, float]:
        rows, strength = self.plan.basis_for(target), self.plan.strength_for(target)
        if not target.output_norms:
            return rows, strength
        key = tuple(norm.tensor for norm in target.output_norms)
        with self.lock:
            if key not in self.norm_cache:
                scale = norm_scale([(self.source.read(norm.tensor), norm.offset) for norm in target.output_norms])
                self.norm_cache[key] = norm_adjusted_basis(rows, scale)
        return self.norm_cache[key], strength


class _ByteProgress:
    """Source bytes passed so far, reported as `on_progress(done, total)` from every shard's thread."""

    def __init__(self, source: Checkpoint, on_progress: Callable[[int, int], None] | None) -> None:
        self.total = sum(info.nbytes for h in source.headers.values() for info in h.tensors.values())
        self.done = 0
        self.on_progress = on_progress
        self.lock = threading.Lock()

    def advance(self, count: int) -> None:
        with self.lock:
            self.done += count
            if self.on_progress:
                self.on_progress(self.done, self.total)


def _write_tensor(
    reader: _HashingReader, writer: _HashingWriter, info: TensorInfo, edit: _ShardEdit, untie: bool
) -> None:
    """Pass one tensor from the source's stream to the output's: raw bytes unless it is a residual writer (edited
    piece by piece), the tied embedding to untie (`untie`: its unedited bytes follow as the unembedding), a
    quantized tensor written as floats (edited or not) or one of their scales (left out)."""
    quantized = edit.dequantized.get(info.name)
    if info.name in edit.dropped or quantized is not None:
        reader.copy_to(info.nbytes, _discard)  # hashed with the source, not written
        if quantized is not None:
            _write_dequantized(writer, quantized, edit)
        return
    target = edit.targets.get(info.name)
    if target is None and not untie:
        reader.copy_to(info.nbytes, writer.write)
        return
    raw = reader.read(info.nbytes)
    if target is not None:
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"residual writer '{info.name}' has non-float dtype {info.dtype}")
        rows, strength = edit.bases(target)
        for piece in edited_pieces(
            _decode(raw, info), rows, target.residual_axis, edit.mode, target.is_bias, strength=strength
        ):
            writer.write(_encode(piece))
            del piece
    else:
        writer.write(raw)
    if untie:
        writer.write(raw)  # the untouched original becomes the explicit unembedding


def _discard(_: bytes | memoryview) -> None:
    pass


def _write_dequantized(writer: _HashingWriter, quantized: QuantizedTensor, edit: _ShardEdit) -> None:
    """A quantized tensor as floats: dequantized in float32 (read by name, wherever its scales lie), edited there
    when it is a residual writer, and rounded once to the output's float dtype."""
    assert edit.read_float is not None
    tensor = edit.read_float(quantized.name)
    target = edit.targets.get(quantized.name)
    if target is None:
        writer.write(_encode(tensor.to(edit.float_dtype)))
        return
    rows, strength = edit.bases(target)
    for piece in edited_pieces(tensor, rows, target.residual_axis, edit.mode, target.is_bias, strength=strength):
        writer.write(_encode(piece.to(edit.float_dtype)))
        del piece


def _write_shard(
    checkpoint: Checkpoint, shard: str, destination: Path, edit: _ShardEdit, advance: Callable[[int], None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stream one source shard to `destination`, hashing both sides; returns the source's and the output's records."""
    header = checkpoint.headers[shard]
    infos = sorted(header.tensors.values(), key=lambda info: info.start)
    extra: dict[str, TensorInfo] = {}
    if edit.untie_from is not None and edit.untie_from in header.tensors:
        twin = header.tensors[edit.untie_from]
        extra[edit.untie_from] = TensorInfo(edit.untie_to, twin.dtype, twin.shape, 0, twin.nbytes)
    entries = _plan_shard(infos, extra, edit)
    metadata = {**header.metadata, "format": "pt"}

    reader = _HashingReader(header.path)
    writer = _HashingWriter(destination)
    try:
        reader.read(header.data_start)
        writer.write(_serialise_header(entries, metadata))
        for info in infos:
            if info.start > reader.position - header.data_start:
                reader.read(info.start - (reader.position - header.data_start))  # gap: hash, drop
            _write_tensor(reader, writer, info, edit, info.name in extra)
            advance(info.nbytes)
        source_sha = reader.finish()
        out_sha = writer.finish()
    except BaseException:
        reader.close()
        writer.close()
        raise
    return (
        {"sha256": source_sha, "bytes": header.path.stat().st_size},
        {
            "sha256": out_sha,
            "bytes": writer.size,
            "tensors": len(entries),
            "data_bytes": sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values()),
        },
    )


def _write_shards(
    source: Checkpoint, staging: Path, edit: _ShardEdit, advance: Callable[[int], None], workers: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every shard into `staging`, several at once; returns the source's and the output's records by shard name."""
    source_shards: dict[str, Any] = {}
    output_shards: dict[str, Any] = {}
    # At most 3 by default: measured on 16 cores, 3 workers edit a 16 GB checkpoint at 1.41x a copy
    # (4: 1.40x) with the same peak memory at 8 and 32 layers (4 add ~0.3 GB; artifacts/benchmarks.md).
    workers = workers or min(len(source.shards), max(1, (os.cpu_count() or 1) // 2), AUTO_WORKERS)
    # Shards are independent; threads suffice (hashing, file I/O and torch release the GIL). Peak
    # memory is then about `workers` times the largest edited tensor's stored size, twice.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="weight-edit-shard") as pool:
        futures = {
            shard: pool.submit(_write_shard, source, shard, staging / shard, edit, advance) for shard in source.shards
        }
        try:
            for shard, future in futures.items():
                source_shards[shard], output_shards[shard] = future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return source_shards, output_shards


def _untied_config(config: dict[str, Any]) -> dict[str, Any]:
    config = json.loads(json.dumps(config))
    config["tie_word_embeddings"] = False
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
    return config


def check_float_writer(source: Checkpoint, name: str) -> None:
    """Refuse a residual writer stored in a non-float dtype, before anything is written (a shipped quantized one
    is read as floats: see `_dequantized`)."""
    if name in source.quantized:
        return
    if (info := source.info(name)).dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{source.folder / source.weight_map[name]}: residual writer '{name}' has non-float dtype {info.dtype}; "
            "only float16, bfloat16, float32 and float64 weights can be edited"
        )


def _checked_plan(
    source: Checkpoint,
    direction: torch.Tensor,
    mode: EditMode,
    subspace: torch.Tensor | None,
    layer_directions: torch.Tensor | None,
    strengths: Strengths | None,
) -> tuple[Architecture, EditPlan, dict[str, EditTarget]]:
    """The architecture, the plan and the residual writers by name; anything that cannot be written is refused
    here, before a byte is copied, not after most of the model."""
    arch = architecture_for(source.config)
    hidden = arch.hidden_size(source.config)
    if direction.ndim != 1 or direction.numel() != hidden:
        raise ValueError(f"direction has shape {tuple(direction.shape)}, the model's hidden size is {hidden}")
    num_layers = arch.num_layers(source.config)
    plan = EditPlan.build(direction, num_layers, subspace, layer_directions, strengths)
    if not plan.strengths.is_full and not arch.supports_partial_strength(mode):
        raise PlanError(
            f"per-layer strengths below 1 in {mode} mode are not supported for the '{arch.family}' family: "
            "neither hook equality nor orthogonal writes would hold (use --mode project, or full strength)"
        )
    targets = {t.tensor: t for t in arch.targets(source.config, source.tensor_names, shapes=source.shapes)}
    for name in sorted(targets):
        check_float_writer(source, name)
    return arch, plan, targets


def _untie_from(source: Checkpoint, arch: Architecture) -> str | None:
    """The tied token embedding's on-disk name when the output needs an explicit unembedding (the source's tied
    one must stay unedited while the embedding is edited); None when there is nothing to untie."""
    layout = arch.layout(source.tensor_names)
    if not (source.tied_embeddings and layout.unembedding not in source.tensor_names):
        return None
    return arch.token_embedding_tensor(source.tensor_names)


def _write_index_and_config(
    source: Checkpoint,
    staging: Path,
    output_shards: dict[str, Any],
    arch: Architecture,
    untie_from: str | None,
    edit: _ShardEdit,
) -> None:
    """The output's shard index (its own total size; an untied unembedding in its twin's shard; dequantized tensors
    under their float names, their scales gone) and config (untied; `quantization_config` for what stays
    quantized)."""
    if source.index is not None:
        weight_map = {name: shard for name, shard in source.weight_map.items() if name not in edit.dropped}
        for data, quantized in edit.dequantized.items():
            weight_map[quantized.name] = source.weight_map[data]
            if data != quantized.name:
                del weight_map[data]
        if untie_from is not None:
            weight_map[arch.unembedding_tensor(source.tensor_names)] = source.weight_map[untie_from]
        index = {
            "metadata": {
                **source.index.get("metadata", {}),
                "total_size": sum(s["data_bytes"] for s in output_shards.values()),
            },
            "weight_map": dict(sorted(weight_map.items())),
        }
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    config = _untied_config(source.config) if untie_from is not None else source.config
    if edit.dequantized:
        entries = {name: source.info(name) for name in source.weight_map}
        config = output_config(config, edit.dequantized.values(), source.quantized, entries)
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _dequantized(source: Checkpoint, targets: dict[str, EditTarget]) -> dict[str, QuantizedTensor]:
    """The quantized tensors the output stores as floats, by on-disk data tensor: every quantized residual writer
    and the rest of its unit: every quantized tensor of its module (quantized.dequantization_unit), found in one
    pass (a DeepSeek layer's experts module holds hundreds)."""
    modules = {source.quantized[name].module for name in targets if name in source.quantized}
    units = sorted((q for q in source.quantized.values() if q.module in modules), key=lambda q: q.name)
    return {quantized.data: quantized for quantized in units}


def _dequantized_record(source: Checkpoint, edit: _ShardEdit) -> dict[str, Any] | None:
    """What changed format, for the provenance and the model card: the tensors now stored as floats and the size."""
    if not edit.dequantized:
        return None
    source_bytes = sum(source.info(name).nbytes for q in edit.dequantized.values() for name in q.dropped)
    output_bytes = sum(edit.output_info(source.info(data)).nbytes for data in edit.dequantized)
    methods = sorted({q.method for q in edit.dequantized.values()})
    return {
        "method": methods[0] if len(methods) == 1 else methods,
        "dtype": str(edit.float_dtype).removeprefix("torch."),
        "tensors": sorted(q.name for q in edit.dequantized.values()),
        "source_bytes": source_bytes,
        "output_bytes": output_bytes,
        "still_quantized": len(source.quantized) - len(edit.dequantized),
    }


# Files of the source folder never copied to the output: written anew (config, index), or apply's and verify's
# own (a source that is itself an output must not lend us its verify result).
_NOT_COPIED = (
    "config.json",
    INDEX_FILE,
    PROVENANCE_FILE,
    PROVENANCE_SEAL,
    VERIFY_FILE,
    DIRECTION_COPY,
    LAYER_DIRECTIONS_COPY,
    SUBSPACE_COPY,
    CARD_FILE,
)


def _copy_source_files(source: Checkpoint, staging: Path) -> dict[str, Any]:
    """Copy the source's other files (tokenizer, chat template, ...) and return the sha256 and size of each source
    file the output relies on, config and index included, so that `verify` can tell a source changed since apply
    from a faulty edit."""
    source_files = {
        name: _file_record(source.folder / name)
        for name in ("config.json", INDEX_FILE)
        if (source.folder / name).is_file()
    }
    for item in sorted(source.folder.iterdir()):
        if item.is_file() and item.name not in _NOT_COPIED and not item.name.endswith(_SKIP_SUFFIXES):
            source_files[item.name] = _file_record(item)
            shutil.copy2(item, staging / item.name)
    return source_files


def _save_plan_tensors(staging: Path, plan: EditPlan) -> None:
    """The plan's tensors beside the checkpoint, from which `verify` rebuilds the edit: the fitted direction, the
    subspace (rank > 1) and the per-layer bases (biprojection)."""
    from safetensors.torch import save_file

    save_file({"direction": plan.direction.contiguous()}, str(staging / DIRECTION_COPY), metadata={"format": "pt"})
    if plan.rank > 1:
        save_file({"subspace": plan.basis.contiguous()}, str(staging / SUBSPACE_COPY), metadata={"format": "pt"})
    if plan.layer_bases is not None:
        save_file(
            {"layer_directions": plan.layer_bases.contiguous()},
            str(staging / LAYER_DIRECTIONS_COPY),
            metadata={"format": "pt"},
        )


def _provenance(
    source: Checkpoint,
    arch: Architecture,
    plan: EditPlan,
    edit: _ShardEdit,
    shards: tuple[dict[str, Any], dict[str, Any]],
    source_files: dict[str, Any],
    staging: Path,
) -> dict[str, Any]:
    """What `verify`, `publish` and a reader need to know of this output: the source and output files with their
    hashes (`shards`: the source's and the output's shard records), the plan's tensors and the edit's guarantee."""
    source_shards, output_shards = shards
    layer_bases = plan.layer_bases
    return {
        "tool": "weight-edit",
        "version": __version__,
        "created_unix": int(time.time()),
        "mode": edit.mode,
        "architecture": arch.family,
        "guarantee": plan.guarantee(arch, edit.mode),
        "source": {
            "path": str(source.folder),
            "shards": source_shards,
            "files": dict(sorted(source_files.items())),
        },
        "direction": {
            "sha256": tensor_sha256(plan.direction),
            "file": DIRECTION_COPY,
            "hidden_size": arch.hidden_size(source.config),
        },
        "layer_directions": None
        if layer_bases is None
        else {"file": LAYER_DIRECTIONS_COPY, "sha256": tensor_sha256(layer_bases.flatten())},
        "subspace": None
        if plan.rank == 1
        else {"file": SUBSPACE_COPY, "sha256": tensor_sha256(plan.basis.flatten()), "rank": plan.rank},
        "strengths": None if plan.strengths.is_full else plan.strengths.as_dict(),
        "edited_tensors": sorted(t for t in edit.targets),
        "untied_embeddings": edit.untie_from is not None,
        "dequantized": _dequantized_record(source, edit),
        "output": {
            "shards": {k: {"sha256": v["sha256"], "bytes": v["bytes"]} for k, v in output_shards.items()},
            "files": output_file_records(staging, output_shards),
        },
    }


def _add_provenance_extra(provenance: dict[str, Any], provenance_extra: dict[str, Any] | None) -> None:
    """The caller's notes (base model, fit summary) join the provenance; they must never replace what verify
    reads back."""
    clashes = sorted(set(provenance) & set(provenance_extra or {}))
    if clashes:
        raise ValueError(f"provenance_extra would replace {', '.join(clashes)}")
    provenance |= provenance_extra or {}


def apply_direction(
    source: Checkpoint,
    direction: torch.Tensor,
    out: Path,
    mode: EditMode = "norm-preserving",
    force: bool = False,
    provenance_extra: dict[str, Any] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    layer_directions: torch.Tensor | None = None,
    workers: int = 0,
    subspace: torch.Tensor | None = None,
    strengths: Strengths | None = None,
) -> ApplyResult:
    """Apply a whole edit plan to `source` and write the edited checkpoint into `out` (the name is historical:
    the plan may be more than one direction).

    The plan (`EditPlan.build`) starts from `direction`, the fitted direction, removed from every
    residual-writing tensor. With `layer_directions` ([layers, d] or [layers, k, d], e.g. biprojected),
    writers of layer l remove row l and the embeddings remove row 0; `direction` is still recorded as the
    fitted direction. `subspace` [k, d] (first row along `direction`) makes it a rank-k edit; `strengths`
    sets the projection strength per layer and writer kind (default: 1 everywhere).
    """
    out = Path(out).resolve()
    check_output_location(source.folder, out, force)
    arch, plan, targets = _checked_plan(source, direction, mode, subspace, layer_directions, strengths)
    untie_from = _untie_from(source, arch)
    unembedding = arch.unembedding_tensor(source.tensor_names)
    dequantized = _dequantized(source, targets)
    edit = _ShardEdit(
        targets,
        WriterBases(plan, source),
        mode,
        untie_from,
        unembedding,
        dequantized=dequantized,
        dropped=frozenset(n for q in dequantized.values() for n in q.dropped if n != q.data),
        read_float=source.read,
        float_dtype=float_dtype(source.config),
    )
    progress = _ByteProgress(source, on_progress)
    with output_lock(out):
        check_output_location(source.folder, out, force)  # again, now that no other run can fill `out`
        staging = new_staging(out)
        try:
            shards = _write_shards(source, staging, edit, progress.advance, workers)
            _write_index_and_config(source, staging, shards[1], arch, untie_from, edit)
            source_files = _copy_source_files(source, staging)
            _save_plan_tensors(staging, plan)
            provenance = _provenance(source, arch, plan, edit, shards, source_files, staging)
            _add_provenance_extra(provenance, provenance_extra)
            write_provenance(staging, provenance)
            write_card(staging, provenance)
            replace_atomically(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return ApplyResult(out, sorted(targets), untie_from is not None, provenance)


def _file_record(path: Path) -> dict[str, Any]:
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


# Files of an output that the provenance's `output.files` does not record: the shards (recorded with their own
# hashes in `output.shards`), the provenance and its seal, and the two files `verify` writes after apply, the
# verify report and the model card (model_card.write_card rewrites README.md with the result), whose hashes apply
# cannot know. publish checks the card against the provenance and the verify report instead.
UNRECORDED_FILES = (PROVENANCE_FILE, PROVENANCE_SEAL, VERIFY_FILE, CARD_FILE)


def output_file_records(folder: Path, shards: Iterable[str]) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in `folder` except the shards and UNRECORDED_FILES, by name."""
    skip = set(shards) | set(UNRECORDED_FILES)
    return {
        item.name: _file_record(item)
        for item in sorted(folder.iterdir())
        if item.is_file() and item.name not in skip and not item.name.startswith(".")
    }


def write_provenance(folder: Path, provenance: dict[str, Any]) -> None:
    """Write the provenance file and its seal (the provenance file's sha256, `sha256sum` format) beside it."""
    path = folder / PROVENANCE_FILE
    path.write_text(json.dumps(provenance, indent=2) + "\n")
    (folder / PROVENANCE_SEAL).write_text(f"{file_sha256(path)}  {PROVENANCE_FILE}\n")

"""Shipped quantized checkpoints read as floats: gpt-oss's MXFP4 experts and DeepSeek-style block FP8 weights.

A residual writer stored quantized cannot be edited in place (the edit is not representable in 4 or 8 bits, and
re-quantizing would bring back part of the removed direction), so apply reads it as floats, edits it and writes it
in the model's float dtype. This module says which on-disk tensors hold each quantized float tensor, dequantizes
them exactly as transformers 5 does when it loads the checkpoint (so `verify`'s hooked source sees the same
weights), and rewrites the output's `quantization_config` so the partly float output still loads.

Names: a `QuantizedTensor.name` is the float tensor's name, the one `architectures/*.json` use and the one the
output stores: `model.layers.0.mlp.experts.down_proj` (MXFP4, on disk `..._blocks` + `..._scales`) or
`model.layers.0.self_attn.o_proj.weight` (FP8, on disk the same name plus `..._scale_inv`).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from weight_edit.errors import WeightEditError

MXFP4 = "mxfp4"
FP8 = "fp8"
METHODS = (MXFP4, FP8)  # `quantization_config.quant_method` values this module dequantizes

# MXFP4 (OCP microscaling): 32 e2m1 values a block share one E8M0 exponent (bias 127); two values a byte, the
# even-indexed value in the low nibble. The table is transformers' `FP4_VALUES`: index = the 4-bit code.
MXFP4_BLOCK = 32
E8M0_BIAS = 127
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_SUFFIXES = ("_blocks", "_scales")

# Block FP8: `weight` as float8 with one float32 `weight_scale_inv` per (rows x cols) block; transformers'
# FineGrainedFP8Config defaults the block to 128 x 128 when the config names none, and `null` means one scale
# for the whole tensor.
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
FP8_SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0", "U8")  # U8 and F8_E8M0: E8M0 exponents (scale_fmt "ue8m0")
FP8_DEFAULT_BLOCK = (128, 128)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_PER_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.\d+\.")


class QuantizationError(WeightEditError):
    """A quantized checkpoint this module cannot read as floats: an unknown method or inconsistent tensors."""


class TensorEntry(Protocol):
    """What is needed of an on-disk tensor's header entry (`checkpoint.TensorInfo` fits)."""

    @property
    def dtype(self) -> str: ...  # safetensors dtype code, e.g. "U8", "F8_E4M3"

    @property
    def shape(self) -> tuple[int, ...]: ...


@dataclass(frozen=True)
class QuantizedTensor:
    """One float tensor stored quantized: where it lies on disk and what it becomes."""

    name: str  # the float tensor's name: in transformers' model, in architectures/*.json, in the output
    method: str  # "mxfp4" or "fp8"
    data: str  # on-disk tensor of the quantized values (`..._blocks` or the float8 `...weight`)
    scale: str  # on-disk tensor of the scales (`..._scales` or `...weight_scale_inv`)
    shape: tuple[int, ...]  # the float tensor's shape, in transformers' in-memory (and unquantized on-disk) layout
    block: tuple[int, int] | None  # fp8: (rows, cols) of one scale's block, None for one scale per tensor
    module: str  # the module to name in `modules_to_not_convert` once this tensor is stored as floats
    dropped: tuple[str, ...]  # every on-disk tensor that the float tensor replaces in the output

    @property
    def transformers_exact(self) -> bool:
        """Whether transformers' own dequantizing load gives the format's values (see `fp8_transformers_exact`)."""
        if self.method == MXFP4 or self.block is None:
            return True
        return fp8_transformers_exact(self.shape, self.block)


def fp8_transformers_exact(shape: tuple[int, ...], block: tuple[int, int]) -> bool:
    """transformers 5.25's dequantizing load (`Fp8Dequantize`) takes a block to be `rows // scale_rows` rows, not
    the config's block: on a ragged edge (a dimension not a multiple of the block, spanning two blocks or more) it
    raises or, when the count happens to divide, silently scales the wrong rows. DeepSeek-V3's residual writers
    are all multiples of 128; its `kv_a_proj_with_mqa` (576 rows) is not."""
    return all(size % step == 0 or size <= step for size, step in zip(shape[-2:], block, strict=True))


def quantization_method(config: Mapping[str, Any]) -> str | None:
    """The checkpoint's quantization method from its config.json, None when it is not quantized; a method this
    module cannot dequantize is refused here, before anything is read."""
    quant = config.get("quantization_config")
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, Mapping) else None
    if method not in METHODS:
        raise QuantizationError(
            f"config.json's quantization_config has quant_method {method!r}; weight-edit reads "
            f"{' and '.join(repr(m) for m in METHODS)} checkpoints (MXFP4 experts, block FP8) as floats, not this one"
        )
    return method


def fp8_block(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """The FP8 scale block from `quantization_config.weight_block_size`, with transformers' default when absent."""
    quant = config.get("quantization_config") or {}
    block = quant.get("weight_block_size", FP8_DEFAULT_BLOCK)
    if block is None:
        return None
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise QuantizationError(f"config.json's weight_block_size {block!r} is not two positive integers")
    return (block[0], block[1])


def _mxfp4_tensor(base: str, tensors: Mapping[str, TensorEntry]) -> QuantizedTensor:
    blocks_name, scales_name = (base + suffix for suffix in MXFP4_SUFFIXES)
    if scales_name not in tensors:
        raise QuantizationError(f"MXFP4 tensor '{blocks_name}' has no '{scales_name}' beside it")
    if base in tensors:
        raise QuantizationError(f"'{base}' is stored both as floats and as MXFP4 ('{blocks_name}')")
    blocks, scales = tensors[blocks_name], tensors[scales_name]
    shape, scale_shape = tuple(blocks.shape), tuple(scales.shape)
    if blocks.dtype != "U8" or scales.dtype != "U8":
        raise QuantizationError(
            f"MXFP4 '{blocks_name}' / '{scales_name}' are {blocks.dtype} / {scales.dtype}, expected U8 / U8"
        )
    # transformers' dequantization transposes the last two axes of a 3-D result: experts only
    if len(shape) != 4 or shape[-1] != MXFP4_BLOCK // 2 or scale_shape != shape[:-1]:
        raise QuantizationError(
            f"MXFP4 '{blocks_name}' {list(shape)} / '{scales_name}' {list(scale_shape)}: expected "
            f"[experts, out, blocks, {MXFP4_BLOCK // 2}] / [experts, out, blocks]"
        )
    experts, out, count, _ = shape
    return QuantizedTensor(
        name=base,
        method=MXFP4,
        data=blocks_name,
        scale=scales_name,
        shape=(experts, count * MXFP4_BLOCK, out),
        block=None,
        module=base.rpartition(".")[0],
        dropped=(blocks_name, scales_name),
    )


def _fp8_scale_name(name: str) -> str:
    """transformers' rule (`Fp8Quantize`): `x.weight` -> `x.weight_scale_inv`, a fused `x.down_proj` ->
    `x.down_proj_scale_inv`."""
    return name + "_scale_inv"


def _fp8_tensor(name: str, tensors: Mapping[str, TensorEntry], block: tuple[int, int] | None) -> QuantizedTensor:
    scale_name = _fp8_scale_name(name)
    if scale_name not in tensors:
        raise QuantizationError(f"FP8 tensor '{name}' has no '{scale_name}' beside it")
    scale = tensors[scale_name]
    if scale.dtype not in FP8_SCALE_DTYPES:
        raise QuantizationError(f"FP8 scale '{scale_name}' has dtype {scale.dtype}, expected one of {FP8_SCALE_DTYPES}")
    shape, scale_shape = tuple(tensors[name].shape), tuple(scale.shape)
    if block is None:
        if math.prod(scale_shape) != 1:
            raise QuantizationError(f"FP8 '{scale_name}' {list(scale_shape)}: weight_block_size is null, one scale")
    else:
        expected = (*shape[:-2], *(-(-size // step) for size, step in zip(shape[-2:], block, strict=True)))
        if len(shape) < 2 or scale_shape != expected:
            raise QuantizationError(
                f"FP8 '{name}' {list(shape)} with {block[0]}x{block[1]} blocks needs '{scale_name}' of shape "
                f"{list(expected)}, found {list(scale_shape)}"
            )
    stem = name.removesuffix("weight") if name.endswith(".weight") else name + "_"
    activation = stem + "activation_scale"
    if name.endswith(".weight"):
        per_expert = _PER_EXPERT.match(name)
        # transformers fuses per-expert linears into one `experts` module: only that module can stay unquantized
        module = per_expert["experts"] if per_expert else name.removesuffix(".weight")
    else:
        module = name.rpartition(".")[0]
    return QuantizedTensor(
        name=name,
        method=FP8,
        data=name,
        scale=scale_name,
        shape=shape,
        block=block,
        module=module,
        dropped=(name, scale_name, *([activation] if activation in tensors else [])),
    )


def quantized_tensors(config: Mapping[str, Any], tensors: Mapping[str, TensorEntry]) -> dict[str, QuantizedTensor]:
    """Every float tensor the checkpoint stores quantized, by float name; `tensors` are the on-disk header entries
    by name (`{n: checkpoint.info(n) for n in checkpoint.tensor_names}`). Empty for an unquantized checkpoint."""
    method = quantization_method(config)
    found: dict[str, QuantizedTensor] = {}
    if method == MXFP4:
        for name in tensors:
            if name.endswith("_scales") and name.removesuffix("_scales") + "_blocks" not in tensors:
                raise QuantizationError(f"MXFP4 scales '{name}' have no '{name.removesuffix('_scales')}_blocks'")
            if name.endswith("_blocks"):
                quantized = _mxfp4_tensor(name.removesuffix("_blocks"), tensors)
                found[quantized.name] = quantized
    elif method == FP8:
        block = fp8_block(config)
        for name, entry in tensors.items():
            if entry.dtype in FP8_DTYPES:
                found[name] = _fp8_tensor(name, tensors, block)
    return found


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MXFP4 `[experts, out, n_blocks, 16]` bytes and `[experts, out, n_blocks]` exponents to the float parameter
    `[experts, n_blocks * 32, out]`, the axis order of transformers' `GptOssExperts` (input features first, as
    `x @ W`) and of an unquantized gpt-oss on disk. Bit-identical to transformers' `convert_moe_packed_tensors`:
    low nibble first, value * 2**(exponent - 127). Slicing the experts axis before or after gives the same values,
    so a caller short of memory can dequantize a few experts at a time."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise QuantizationError(
            f"MXFP4 blocks {blocks.dtype} {list(blocks.shape)} and scales {scales.dtype} {list(scales.shape)} "
            "are not uint8 [..., n_blocks, 16] and [..., n_blocks]"
        )
    if blocks.ndim < 3:
        raise QuantizationError(f"MXFP4 blocks {list(blocks.shape)} have no output axis to transpose")
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack((table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]), dim=-1)
    values = values.flatten(-2)  # [..., n_blocks, 32]: byte k holds values 2k (low nibble) and 2k + 1 (high)
    values = torch.ldexp(values, (scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1))
    return values.flatten(-2).transpose(-1, -2).to(dtype).contiguous()


def _scale_values(scale: torch.Tensor) -> torch.Tensor:
    """FP8 scales as float32: E8M0 bytes (uint8, as transformers reads them) are powers of two."""
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.to(torch.float32) - E8M0_BIAS)
    return scale.to(torch.float32)


def dequantize_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Block FP8 to floats, same layout: element (i, j) times the scale of block (i // rows, j // cols), the
    DeepSeek-V3 definition (ragged last blocks are smaller); leading axes (fused experts) carry their own scales.
    Computed in float32 like transformers, so where transformers is exact (`fp8_transformers_exact`) the values
    are bit-identical to its load."""
    values = weight.to(torch.float32)
    scales = _scale_values(scale_inv)
    if block is None:
        if scales.numel() != 1:
            raise QuantizationError(f"one scale expected for the whole FP8 tensor, found {list(scales.shape)}")
        return (values * scales.reshape(())).to(dtype)
    rows, cols = values.shape[-2:]
    expected = (*values.shape[:-2], -(-rows // block[0]), -(-cols // block[1]))
    if tuple(scales.shape) != expected:
        raise QuantizationError(
            f"FP8 weight {list(values.shape)} with {block[0]}x{block[1]} blocks needs scales {list(expected)}, "
            f"found {list(scales.shape)}"
        )
    scales = scales.repeat_interleave(block[0], dim=-2)[..., :rows, :]
    scales = scales.repeat_interleave(block[1], dim=-1)[..., :cols]
    return (values * scales).to(dtype)


def read_dequantized(
    quantized: QuantizedTensor, read: Callable[[str], torch.Tensor], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The float tensor `quantized.name`, shaped `quantized.shape`, from its on-disk tensors; `read` reads one
    on-disk tensor by name (`checkpoint.read`)."""
    data, scale = read(quantized.data), read(quantized.scale)
    if quantized.method == MXFP4:
        result = dequantize_mxfp4(data, scale, dtype)
    else:
        result = dequantize_fp8(data, scale, quantized.block, dtype)
    if tuple(result.shape) != quantized.shape:
        raise QuantizationError(f"'{quantized.name}' dequantized to {list(result.shape)}, not {list(quantized.shape)}")
    return result


def dequantization_unit(name: str, quantized: Mapping[str, QuantizedTensor]) -> list[QuantizedTensor]:
    """The quantized tensors to write as floats together with `name`, sorted: every one of its module (the
    module `modules_to_not_convert` names). A quantizing load keeps that module float and would corrupt what is
    left quantized in it: the MXFP4 loader swizzles any `*_blocks` it finds into the module, and an FP8
    `experts` module, into which transformers merges the per-expert linears, is either all FP8 or all float.
    For a plain FP8 linear the unit is the tensor alone."""
    module = quantized[name].module
    return sorted((q for q in quantized.values() if q.module == module), key=lambda q: q.name)


def float_dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The dtype for dequantized tensors in the output: the config's own float dtype, else bfloat16 (what
    transformers dequantizes to by default)."""
    name = config.get("dtype") or config.get("torch_dtype")
    return {"float32": torch.float32, "float16": torch.float16}.get(name, torch.bfloat16)


def output_config(
    config: Mapping[str, Any],
    written: Iterable[QuantizedTensor],
    quantized: Mapping[str, QuantizedTensor],
    tensors: Mapping[str, TensorEntry],
) -> dict[str, Any]:
    """The output's config.json once the `written` tensors are stored as floats (`tensors`: the source's header
    entries). Without `quantization_config` when nothing quantized is left: a plain float model. Otherwise their
    modules join `modules_to_not_convert`, so a quantizing load (GPU kernels) keeps them float; a source without
    that list relied on transformers' defaults (lm_head), which any list replaces, so the list then starts with
    every module whose 2-D weight the source stores as floats. Refuses a partial `dequantization_unit`."""
    written_names = {q.name for q in written}
    by_module: dict[str, list[QuantizedTensor]] = {}
    for q in sorted(quantized.values(), key=lambda q: q.name):  # each unit once, not once per written tensor
        by_module.setdefault(q.module, []).append(q)
    for name in sorted(written_names):
        missing = [q.name for q in by_module[quantized[name].module] if q.name not in written_names]
        if missing:
            raise QuantizationError(f"'{name}' is written as floats without {missing}, which must go with it")
    result = copy.deepcopy(dict(config))
    if not written_names:
        return result
    if all(name in written_names for name in quantized):
        result.pop("quantization_config", None)
        return result
    quant = result["quantization_config"]
    skipped = quant.get("modules_to_not_convert")
    if skipped is None:
        skipped = sorted(
            name.removesuffix(".weight")
            for name, entry in tensors.items()
            if name.endswith(".weight") and entry.dtype in FLOAT_DTYPES and len(entry.shape) == 2
        )
    skipped = list(skipped)
    skipped += sorted({quantized[name].module for name in written_names} - set(skipped))
    quant["modules_to_not_convert"] = skipped
    return result


def dequantizing_load_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """`from_pretrained` keyword arguments that load the checkpoint dequantized, on any device and without
    kernels (on CPU transformers falls back to this itself, with a warning); empty when it is not quantized.
    Pass `dtype=torch.float32` as well for the exact float32 values of `read_dequantized`."""
    method = quantization_method(config)
    if method is None:
        return {}
    from transformers import FineGrainedFP8Config, Mxfp4Config

    if method == MXFP4:
        return {"quantization_config": Mxfp4Config(dequantize=True)}
    return {"quantization_config": FineGrainedFP8Config(dequantize=True)}

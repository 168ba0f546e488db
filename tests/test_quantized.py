"""Dequantizing shipped quantized checkpoints (weight_edit.quantized) on tiny random ones built here.

References: transformers' own dequantization (`convert_moe_packed_tensors`, `Fp8Dequantize`, and loading with
`from_pretrained`) and a float64 decoding of the formats from their bit definitions (e2m1, e4m3fn, E8M0).

What transformers 5.25 does on CPU, recorded by these tests: an MXFP4 gpt-oss and a block-FP8 llama or
DeepSeek-V3 load with `AutoModelForCausalLM.from_pretrained` dequantized (it falls back to dequantizing with a
warning, without Triton or a GPU; `quantization_config=Mxfp4Config(dequantize=True)` / `FineGrainedFP8Config(
dequantize=True)` ask for it outright); with `dtype=torch.float32` the parameters equal `read_dequantized` bit for
bit, except FP8 tensors with a ragged block edge, which transformers scales wrongly or refuses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, FP8Linear
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from weight_edit.checkpoint import Checkpoint
from weight_edit.models import load_model
from weight_edit.quantized import (
    QuantizationError,
    QuantizedTensor,
    dequantization_unit,
    dequantize_fp8,
    dequantize_mxfp4,
    dequantizing_load_kwargs,
    float_dtype,
    fp8_transformers_exact,
    output_config,
    quantization_method,
    quantized_tensors,
    read_dequantized,
)
from weight_edit.synthetic import quantize_fp8, quantize_mxfp4, random_model

HIDDEN = 32
VOCAB = 400  # the test chat tokenizer's, so that apply and verify can run on these checkpoints
GPT_OSS_FF = 64  # != HIDDEN, so a transposed layout cannot pass
GPT_OSS_MODULES_TO_NOT_CONVERT = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]
FP8_BLOCK = 16


# ---- the formats from their bit definitions, in float64 -------------------------------------------------------


def e2m1_reference(code: torch.Tensor) -> torch.Tensor:
    """OCP e2m1: sign bit, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is subnormal (0 or 0.5)."""
    code = code.long()
    sign = torch.where(code & 8 > 0, -1.0, 1.0).double()
    exponent, mantissa = (code >> 1) & 3, (code & 1).double()
    normal = torch.exp2((exponent - 1).double()) * (1 + mantissa / 2)
    return sign * torch.where(exponent == 0, mantissa / 2, normal)


def mxfp4_reference(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W[e, 32 g + j, o] = e2m1(nibble j of block (e, o, g)) * 2**(scale - 127); nibble j is the low half of byte
    j // 2 when j is even: the float parameter of transformers' GptOssExperts, input features first."""
    experts, out, count, _ = blocks.shape
    reference = torch.empty(experts, count, 32, out, dtype=torch.float64)
    scale = torch.exp2(scales.double() - 127)
    for j in range(32):
        nibble = (blocks[..., j // 2] >> (4 * (j % 2))) & 0xF
        reference[:, :, j, :] = (e2m1_reference(nibble) * scale).permute(0, 2, 1)
    return reference.reshape(experts, count * 32, out)


def e4m3fn_reference(weight: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn from its bits: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal."""
    bits = weight.view(torch.uint8).long()
    sign = torch.where(bits & 0x80 > 0, -1.0, 1.0).double()
    exponent, mantissa = (bits >> 3) & 0xF, (bits & 7).double()
    normal = torch.exp2((exponent - 7).double()) * (1 + mantissa / 8)
    return sign * torch.where(exponent == 0, mantissa / 8 * 2.0**-6, normal)


def fp8_reference(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Element (i, j) times the scale of block (i // rows, j // cols), looped over blocks."""
    reference = e4m3fn_reference(weight)
    rows, cols = weight.shape
    for i in range(math.ceil(rows / block[0])):
        for j in range(math.ceil(cols / block[1])):
            reference[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] *= scale[i, j].double()
    return reference


# ---- random FP8 codes -------------------------------------------------------------------------------------


def random_fp8(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Every finite e4m3fn code (0x7F and 0xFF are NaN)."""
    bits = torch.randint(0, 255, shape, generator=generator, dtype=torch.uint8)
    return torch.where(bits == 0x7F, torch.zeros_like(bits), bits).view(torch.float8_e4m3fn)


# ---- tiny checkpoints ------------------------------------------------------------------------------------------


def _save(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _float_state(folder: Path, model_type: str, **settings) -> tuple[dict, dict[str, torch.Tensor]]:
    """A random model's config and its tensors under their on-disk names (as save_pretrained writes them:
    DeepSeek-V3's experts one linear each, gpt-oss's fused)."""
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, max_position_embeddings=64, **settings)
    model = random_model(config, seed=0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0, 0.3 if parameter.ndim > 1 else 0.1)
    model.save_pretrained(str(folder / "float"))
    return config.to_dict(), load_file(str(folder / "float" / "model.safetensors"))


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory) -> Path:
    """gpt-oss with its experts stored the way the released checkpoints are (MXFP4), the rest float."""
    root = tmp_path_factory.mktemp("mxfp4")
    config, state = _float_state(
        root,
        "gpt_oss",
        hidden_size=HIDDEN,
        intermediate_size=GPT_OSS_FF,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=3,
        num_experts_per_tok=2,
        sliding_window=16,
    )
    tensors = {}
    for name, value in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name + "_blocks"], tensors[name + "_scales"] = quantize_mxfp4(value)
        else:
            tensors[name] = value.to(torch.bfloat16)
    config |= {
        "dtype": "bfloat16",
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": GPT_OSS_MODULES_TO_NOT_CONVERT},
    }
    return _save(root / "gpt-oss", tensors, config)


def _fp8_checkpoint(folder: Path, model_type: str, block: list[int], **settings) -> Path:
    """Every projection's weight FP8 with per-block scales (DeepSeek-V3's rule); embeddings, norms, router and
    lm_head float, and no modules_to_not_convert (DeepSeek-V3 names none)."""
    config, state = _float_state(folder.parent, model_type, **settings)
    tensors = {}
    for name, value in state.items():
        if name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight"):
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8(value, (block[0], block[1]))
        else:
            tensors[name] = value.to(torch.bfloat16)
    quantization = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": block}
    return _save(folder, tensors, config | {"dtype": "bfloat16", "quantization_config": quantization})


@pytest.fixture(scope="module")
def llama_fp8(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fp8") / "llama"
    return _fp8_checkpoint(
        folder,
        "llama",
        [FP8_BLOCK, FP8_BLOCK],
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def deepseek_fp8(tmp_path_factory) -> Path:
    """DeepSeek-V3 as released: routed experts stored one linear per expert (transformers fuses them on load)."""
    settings = dict(hidden_size=HIDDEN, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2)
    settings |= dict(first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4)
    settings |= dict(num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, kv_lora_rank=16)
    settings |= dict(q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
    return _fp8_checkpoint(
        tmp_path_factory.mktemp("fp8") / "deepseek", "deepseek_v3", [FP8_BLOCK, FP8_BLOCK], **settings
    )


def _describe(folder: Path) -> tuple[Checkpoint, dict[str, QuantizedTensor]]:
    checkpoint = Checkpoint(folder)
    return checkpoint, quantized_tensors(checkpoint.config, _entries(checkpoint))


def _entries(checkpoint: Checkpoint) -> dict:
    return {name: checkpoint.info(name) for name in checkpoint.weight_map}


def _load(folder: Path, explicit: bool = True) -> torch.nn.Module:
    """from_pretrained in float32, asking to dequantize (`explicit`) or leaving it to transformers' CPU fallback;
    asserts every parameter came from the checkpoint."""
    config = json.loads((folder / "config.json").read_text())
    kwargs = dequantizing_load_kwargs(config) if explicit else {}
    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, output_loading_info=True, **kwargs
    )
    assert not any(info.values()), info
    return model


def _write_output(source: Path, out: Path, floats: dict[str, torch.Tensor]) -> dict:
    """What apply does to a quantized source: each written tensor replaces its on-disk tensors; the config is
    rewritten by `output_config`."""
    checkpoint, quantized = _describe(source)
    written = [quantized[name] for name in floats]
    tensors = load_file(str(source / "model.safetensors"))
    for q in written:
        for name in q.dropped:
            del tensors[name]
    tensors |= floats
    config = output_config(checkpoint.config, written, quantized, _entries(checkpoint))
    _save(out, tensors, config)
    return config


def _project_out(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """A stand-in edit: remove a fixed unit direction along the residual axis."""
    direction = torch.nn.functional.normalize(torch.arange(1.0, weight.shape[axis] + 1), dim=0)
    moved = weight.float().movedim(axis, -1)
    return (moved - (moved @ direction)[..., None] * direction).movedim(-1, axis)


# ---- MXFP4 -----------------------------------------------------------------------------------------------------


def test_mxfp4_equals_transformers_and_the_format_definition():
    generator = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (3, 24, 2, 16), generator=generator, dtype=torch.uint8)  # every nibble pair
    scales = torch.randint(100, 150, (3, 24, 2), generator=generator, dtype=torch.uint8)
    ours = dequantize_mxfp4(blocks, scales)
    assert ours.shape == (3, 64, 24) and ours.dtype == torch.float32
    assert torch.equal(ours, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    assert torch.equal(ours.double(), mxfp4_reference(blocks, scales))  # every value is exact in float32
    bf16 = dequantize_mxfp4(blocks, scales, torch.bfloat16)
    assert torch.equal(bf16, convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16))
    assert torch.equal(dequantize_mxfp4(blocks[1:2], scales[1:2]), ours[1:2])  # expert by expert is the same


def test_mxfp4_round_trip_keeps_the_float_layout():
    weight = torch.randn(3, GPT_OSS_FF, HIDDEN)  # down_proj: [experts, d_ff, d_model]
    blocks, scales = quantize_mxfp4(weight)
    assert blocks.shape == (3, HIDDEN, GPT_OSS_FF // 32, 16)
    error = (dequantize_mxfp4(blocks, scales) - weight).norm() / weight.norm()
    assert error < 0.2


def test_mxfp4_description_names_the_writer_and_its_layout(gpt_oss_mxfp4):
    checkpoint, quantized = _describe(gpt_oss_mxfp4)
    assert quantization_method(checkpoint.config) == "mxfp4"
    assert sorted(quantized) == [
        f"model.layers.{layer}.mlp.experts.{proj}" for layer in (0, 1) for proj in ("down_proj", "gate_up_proj")
    ]
    # the writer of architectures/gpt_oss.json: experts.down_proj, residual axis 2 (d_model)
    down = quantized["model.layers.0.mlp.experts.down_proj"]
    assert down == QuantizedTensor(
        name="model.layers.0.mlp.experts.down_proj",
        method="mxfp4",
        data="model.layers.0.mlp.experts.down_proj_blocks",
        scale="model.layers.0.mlp.experts.down_proj_scales",
        shape=(3, GPT_OSS_FF, HIDDEN),
        block=None,
        module="model.layers.0.mlp.experts",
        dropped=("model.layers.0.mlp.experts.down_proj_blocks", "model.layers.0.mlp.experts.down_proj_scales"),
    )
    assert down.shape[2] == HIDDEN and down.transformers_exact
    assert quantized["model.layers.0.mlp.experts.gate_up_proj"].shape == (3, HIDDEN, 2 * GPT_OSS_FF)
    assert [q.name for q in dequantization_unit(down.name, quantized)] == [
        "model.layers.0.mlp.experts.down_proj",
        "model.layers.0.mlp.experts.gate_up_proj",
    ]
    assert float_dtype(checkpoint.config) == torch.bfloat16
    float_state = load_file(str(gpt_oss_mxfp4.parent / "float" / "model.safetensors"))
    assert (read_dequantized(down, checkpoint.read_stored) - float_state[down.name]).norm() < 0.2 * float_state[
        down.name
    ].norm()


def test_transformers_loads_mxfp4_gpt_oss_dequantized_on_cpu(gpt_oss_mxfp4):
    checkpoint, quantized = _describe(gpt_oss_mxfp4)
    for explicit in (True, False):
        model = _load(gpt_oss_mxfp4, explicit)
        assert not getattr(model, "is_quantized", False)
        for name, q in quantized.items():
            assert torch.equal(model.get_parameter(name), read_dequantized(q, checkpoint.read_stored))
        model(torch.tensor([[1, 2, 3]]))


def test_gpt_oss_output_with_float_experts_loads(gpt_oss_mxfp4, tmp_path):
    checkpoint, quantized = _describe(gpt_oss_mxfp4)
    dtype = float_dtype(checkpoint.config)
    unit = dequantization_unit("model.layers.0.mlp.experts.down_proj", quantized)
    floats = {q.name: read_dequantized(q, checkpoint.read_stored) for q in unit}
    floats["model.layers.0.mlp.experts.down_proj"] = _project_out(floats["model.layers.0.mlp.experts.down_proj"], 2)
    floats = {name: value.to(dtype) for name, value in floats.items()}
    config = _write_output(gpt_oss_mxfp4, tmp_path / "partial", floats)
    assert config["quantization_config"]["modules_to_not_convert"] == [
        *GPT_OSS_MODULES_TO_NOT_CONVERT,
        "model.layers.0.mlp.experts",
    ]
    model = _load(tmp_path / "partial")
    for name, value in floats.items():
        assert torch.equal(model.get_parameter(name), value.float())
    layer1 = quantized["model.layers.1.mlp.experts.down_proj"]
    assert torch.equal(model.get_parameter(layer1.name), read_dequantized(layer1, checkpoint.read_stored))

    everything = {q.name: read_dequantized(q, checkpoint.read_stored).to(dtype) for q in quantized.values()}
    config = _write_output(gpt_oss_mxfp4, tmp_path / "all", everything)
    assert "quantization_config" not in config
    model = _load(tmp_path / "all")
    assert not getattr(model, "is_quantized", False)
    # the names and layout are those transformers writes for an unquantized gpt-oss
    model.save_pretrained(str(tmp_path / "saved"))
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    for name, value in everything.items():
        assert saved[name].shape == value.shape and torch.equal(saved[name], value.float())


def test_mxfp4_partial_unit_is_refused(gpt_oss_mxfp4):
    checkpoint, quantized = _describe(gpt_oss_mxfp4)
    with pytest.raises(QuantizationError, match="gate_up_proj"):
        output_config(
            checkpoint.config, [quantized["model.layers.0.mlp.experts.down_proj"]], quantized, _entries(checkpoint)
        )


# ---- block FP8 -------------------------------------------------------------------------------------------------


# exact: multiples of the block, or one block along a dimension; ragged: 48 = 2 x 24 rows (silently wrong in
# transformers), 40 and 20 + 32 (refused by transformers)
@pytest.mark.parametrize(
    ("shape", "exact"),
    [((64, 96), True), ((16, 16), True), ((8, 24), True), ((48, 64), False), ((40, 64), False), ((64, 52), False)],
)
def test_fp8_equals_the_format_and_transformers_where_it_is_exact(shape, exact):
    block = (32, 32)
    generator = torch.Generator().manual_seed(2)
    weight = random_fp8(shape, generator)
    scale = torch.rand(math.ceil(shape[0] / 32), math.ceil(shape[1] / 32), generator=generator) + 0.01
    ours = dequantize_fp8(weight, scale, block)
    assert ours.shape == shape
    reference = fp8_reference(weight, scale, block)
    assert torch.allclose(ours.double(), reference, rtol=2**-23, atol=0)  # one float32 rounding of the product
    try:
        theirs = Fp8Dequantize(None)._dequantize_one(weight, scale, output_dtype=torch.float32)
    except ValueError:  # "not divisible by scale grid"
        theirs = None
    # transformers takes a block to be rows // scale_rows: right only without a ragged edge
    assert fp8_transformers_exact(shape, block) == exact == (theirs is not None and torch.equal(theirs, ours))


def test_fp8_per_tensor_and_e8m0_scales():
    generator = torch.Generator().manual_seed(3)
    weight = random_fp8((24, 40), generator)
    assert torch.equal(dequantize_fp8(weight, torch.tensor(0.25), None), weight.float() * 0.25)
    exponents = torch.randint(120, 135, (2, 3), dtype=torch.uint8, generator=generator)
    scales = torch.exp2(exponents.float() - 127)
    assert torch.equal(dequantize_fp8(weight, exponents, (16, 16)), dequantize_fp8(weight, scales, (16, 16)))
    with pytest.raises(QuantizationError, match="needs scales"):
        dequantize_fp8(weight, scales[:, :2], (16, 16))


def test_fp8_description(llama_fp8):
    checkpoint, quantized = _describe(llama_fp8)
    assert quantization_method(checkpoint.config) == "fp8"
    assert len(quantized) == 2 * 7
    o_proj = quantized["model.layers.0.self_attn.o_proj.weight"]
    assert o_proj == QuantizedTensor(
        name="model.layers.0.self_attn.o_proj.weight",
        method="fp8",
        data="model.layers.0.self_attn.o_proj.weight",
        scale="model.layers.0.self_attn.o_proj.weight_scale_inv",
        shape=(HIDDEN, HIDDEN),
        block=(FP8_BLOCK, FP8_BLOCK),
        module="model.layers.0.self_attn.o_proj",
        dropped=("model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.o_proj.weight_scale_inv"),
    )
    assert dequantization_unit(o_proj.name, quantized) == [o_proj]
    assert all(q.transformers_exact for q in quantized.values())


def test_transformers_loads_fp8_dequantized_on_cpu_and_the_float_output(llama_fp8, tmp_path, monkeypatch):
    checkpoint, quantized = _describe(llama_fp8)
    for explicit in (True, False):
        model = _load(llama_fp8, explicit)
        for name, q in quantized.items():
            assert torch.equal(model.get_parameter(name), read_dequantized(q, checkpoint.read_stored))
    assert output_config(checkpoint.config, [], quantized, _entries(checkpoint)) == checkpoint.config

    o_proj = quantized["model.layers.0.self_attn.o_proj.weight"]
    edited = _project_out(read_dequantized(o_proj, checkpoint.read_stored), 0).to(float_dtype(checkpoint.config))
    config = _write_output(llama_fp8, tmp_path / "out", {o_proj.name: edited})
    # no list in the source: transformers' default (lm_head) is kept by naming every float-stored weight
    assert config["quantization_config"]["modules_to_not_convert"] == [
        "lm_head",
        "model.embed_tokens",
        "model.layers.0.self_attn.o_proj",
    ]
    model = _load(tmp_path / "out")
    assert torch.equal(model.get_parameter(o_proj.name), edited.float())
    down = quantized["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(model.get_parameter(down.name), read_dequantized(down, checkpoint.read_stored))

    # a GPU load keeps FP8 modules quantized: the edited one must stay a float Linear (no kernel is run here)
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *args, **kwargs: None)
    model, info = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "out"), dtype=torch.bfloat16, output_loading_info=True
    )
    assert not any(info.values()), info
    assert type(model.get_submodule("model.layers.0.self_attn.o_proj")) is torch.nn.Linear
    assert torch.equal(model.get_parameter(o_proj.name), edited)
    assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), FP8Linear)
    assert type(model.get_submodule("lm_head")) is torch.nn.Linear


def test_deepseek_fp8_experts_unit_and_output(deepseek_fp8, tmp_path, monkeypatch):
    checkpoint, quantized = _describe(deepseek_fp8)
    down = quantized["model.layers.1.mlp.experts.2.down_proj.weight"]
    assert down.module == "model.layers.1.mlp.experts"
    unit = dequantization_unit(down.name, quantized)
    assert [q.name for q in unit] == [
        f"model.layers.1.mlp.experts.{e}.{proj}.weight"
        for e in range(4)
        for proj in ("down_proj", "gate_proj", "up_proj")
    ]
    assert dequantization_unit("model.layers.1.mlp.shared_experts.down_proj.weight", quantized) == [
        quantized["model.layers.1.mlp.shared_experts.down_proj.weight"]
    ]
    with pytest.raises(QuantizationError, match="must go with it"):
        output_config(checkpoint.config, [down], quantized, _entries(checkpoint))

    model = _load(deepseek_fp8)  # transformers merges the experts: compare through the fused parameter
    assert torch.equal(
        model.get_parameter("model.layers.1.mlp.experts.down_proj")[2], read_dequantized(down, checkpoint.read_stored)
    )

    floats = {q.name: read_dequantized(q, checkpoint.read_stored) for q in unit}
    floats = {n: (_project_out(v, 0) if "down_proj" in n else v).to(torch.bfloat16) for n, v in floats.items()}
    config = _write_output(deepseek_fp8, tmp_path / "out", floats)
    assert config["quantization_config"]["modules_to_not_convert"][-1] == "model.layers.1.mlp.experts"
    model = _load(tmp_path / "out")
    assert torch.equal(model.get_parameter("model.layers.1.mlp.experts.down_proj")[2], floats[down.name].float())

    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *args, **kwargs: None)
    model, info = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "out"), dtype=torch.bfloat16, output_loading_info=True
    )
    assert not any(info.values()), info
    experts = model.get_submodule("model.layers.1.mlp.experts")
    assert experts.down_proj.dtype == torch.bfloat16 and torch.equal(experts.down_proj[2], floats[down.name])
    assert isinstance(model.get_submodule("model.layers.1.mlp.shared_experts.down_proj"), FP8Linear)


# ---- refusals --------------------------------------------------------------------------------------------------


class _Entry:
    def __init__(self, dtype: str, shape: tuple[int, ...]):
        self.dtype, self.shape = dtype, shape


def test_unknown_methods_and_inconsistent_tensors_are_refused():
    assert quantization_method({}) is None and quantized_tensors({}, {}) == {} and dequantizing_load_kwargs({}) == {}
    for method in ("compressed-tensors", "gptq", None):
        with pytest.raises(QuantizationError, match="mxfp4"):
            quantization_method({"quantization_config": {"quant_method": method}})
    fp8 = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    with pytest.raises(QuantizationError, match="no 'a.weight_scale_inv'"):
        quantized_tensors(fp8, {"a.weight": _Entry("F8_E4M3", (256, 256))})
    with pytest.raises(QuantizationError, match=r"needs 'a.weight_scale_inv' of shape \[2, 2\]"):
        quantized_tensors(fp8, {"a.weight": _Entry("F8_E4M3", (256, 200)), "a.weight_scale_inv": _Entry("F32", (2, 1))})
    default = quantized_tensors(
        {"quantization_config": {"quant_method": "fp8"}},
        {"a.weight": _Entry("F8_E4M3", (300, 256)), "a.weight_scale_inv": _Entry("F32", (3, 2))},
    )
    assert default["a.weight"].block == (128, 128) and not default["a.weight"].transformers_exact
    mxfp4 = {"quantization_config": {"quant_method": "mxfp4"}}
    with pytest.raises(QuantizationError, match="has no 'e.down_proj_scales'"):
        quantized_tensors(mxfp4, {"e.down_proj_blocks": _Entry("U8", (2, 8, 1, 16))})
    with pytest.raises(QuantizationError, match="have no 'e.down_proj_blocks'"):
        quantized_tensors(mxfp4, {"e.down_proj_scales": _Entry("U8", (2, 8, 1))})
    with pytest.raises(QuantizationError, match="expected"):
        quantized_tensors(
            mxfp4, {"e.down_proj_blocks": _Entry("U8", (8, 1, 16)), "e.down_proj_scales": _Entry("U8", (8, 1))}
        )


def _with_tokenizer(source: Path, folder: Path, tokenizer) -> Path:
    """A copy of a quantized test checkpoint with a tokenizer, so that `verify` can run prompts through it."""
    import shutil

    shutil.copytree(source, folder)
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("mode", ["norm-preserving", "project"])
def test_apply_and_verify_mxfp4_gpt_oss(gpt_oss_mxfp4, tmp_path, chat_tokenizer, mode):
    """apply on gpt-oss as shipped: the MXFP4 experts are read as floats, `down_proj` edited and written in the
    model's float dtype with `gate_up_proj` (its unit), the scales gone, quantization_config removed (nothing
    quantized is left); the output loads as a plain model and passes verify against the dequantized source."""
    from test_architectures import reference_edit
    from test_verify import PROMPTS

    import settings
    from weight_edit.verify import verify_checkpoint
    from weight_edit.writer import PROVENANCE_FILE, apply_direction

    source_dir = _with_tokenizer(gpt_oss_mxfp4, tmp_path / "src", chat_tokenizer)
    source = Checkpoint(source_dir)
    down = "model.layers.0.mlp.experts.down_proj"
    assert down in source.tensor_names and down + "_blocks" not in source.tensor_names
    direction = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(5))
    result = apply_direction(source, direction, tmp_path / "out", mode=mode)
    out = Checkpoint(tmp_path / "out")

    assert down in result.edited_tensors
    assert not any(name.endswith(("_blocks", "_scales")) for name in out.weight_map)
    assert "quantization_config" not in out.config and not out.quantized
    assert out.info(down).dtype == "BF16" and out.info(down).shape == (3, GPT_OSS_FF, HIDDEN)
    r = direction.double() / direction.double().norm()
    expected = reference_edit(source.read(down), r, 2, mode, False)
    torch.testing.assert_close(out.read(down).double(), expected.to(torch.bfloat16).double(), atol=0, rtol=0.0079)
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    assert torch.equal(out.read(gate_up), source.read(gate_up).to(torch.bfloat16))
    for name in source.weight_map:  # everything not quantized is copied bit for bit
        if name in out.weight_map and name not in result.edited_tensors:
            assert torch.equal(out.read(name), source.read(name)), name
    record = json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())["dequantized"]
    assert record["method"] == "mxfp4" and record["dtype"] == "bfloat16" and record["still_quantized"] == 0
    assert set(record["tensors"]) == {n for n in source.quantized} and record["output_bytes"] > record["source_bytes"]
    assert "Stored format changed: 4 mxfp4 tensors" in (tmp_path / "out" / "README.md").read_text()

    report = verify_checkpoint(tmp_path / "out", PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=3)
    assert report.passed, report.failures
    assert report.stored_dtype == "bfloat16"


def test_apply_and_verify_fp8_llama(llama_fp8, tmp_path, chat_tokenizer):
    """Block-FP8 llama: the residual writers (o_proj, down_proj) are dequantized, edited and written in bfloat16;
    q/k/v, gate and up stay FP8 with their scales, and modules_to_not_convert names the written modules so that
    a quantizing load keeps them float; the output loads and passes verify."""
    from test_verify import PROMPTS

    import settings
    from weight_edit.verify import verify_checkpoint
    from weight_edit.writer import apply_direction

    source = Checkpoint(_with_tokenizer(llama_fp8, tmp_path / "src", chat_tokenizer))
    result = apply_direction(source, torch.randn(HIDDEN), tmp_path / "out")
    out = Checkpoint(tmp_path / "out")
    o_proj, q_proj = "model.layers.1.self_attn.o_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert o_proj in result.edited_tensors and out.info(o_proj).dtype == "BF16"
    assert o_proj + "_scale_inv" not in out.weight_map
    assert out.info(q_proj).dtype == "F8_E4M3" and q_proj + "_scale_inv" in out.weight_map
    assert torch.equal(out.read(q_proj), source.read(q_proj))
    skipped = out.config["quantization_config"]["modules_to_not_convert"]
    assert "model.layers.1.self_attn.o_proj" in skipped and "model.layers.1.mlp.down_proj" in skipped
    assert "model.layers.1.self_attn.q_proj" not in skipped
    report = verify_checkpoint(tmp_path / "out", PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=3)
    assert report.passed, report.failures


def test_verify_refuses_fp8_blocks_transformers_loads_wrongly(tmp_path, chat_tokenizer):
    """A 48-wide FP8 weight in 32 x 32 blocks has a ragged edge that transformers 5.25's dequantizing load gets
    wrong: apply writes exact values, and verify refuses in one line instead of comparing against wrong weights."""
    from test_verify import PROMPTS

    import settings
    from weight_edit.verify import VerifyError, verify_checkpoint
    from weight_edit.writer import apply_direction

    folder = tmp_path / "ragged" / "llama"
    settings_ = dict(hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    _fp8_checkpoint(folder, "llama", [32, 32], num_key_value_heads=2, tie_word_embeddings=False, **settings_)
    source = Checkpoint(_with_tokenizer(folder, tmp_path / "src", chat_tokenizer))
    down = "model.layers.0.mlp.down_proj.weight"
    assert not source.quantized[down].transformers_exact
    apply_direction(source, torch.randn(HIDDEN), tmp_path / "out")
    with pytest.raises(VerifyError, match=r"dequantizes model\.layers\.0\.mlp\.down_proj\.weight \(dequantized and"):
        verify_checkpoint(tmp_path / "out", PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=3)


def test_apply_and_verify_fp8_deepseek(deepseek_fp8, tmp_path, chat_tokenizer):
    """DeepSeek-V3 as released, block FP8 with its routed experts one linear each: every expert's down_proj is
    edited, and with it every projection of that layer's experts module leaves FP8 (transformers merges them into
    one module); attention's MLA projections and the router stay as they were; the output passes verify."""
    from test_verify import PROMPTS

    import settings
    from weight_edit.verify import verify_checkpoint
    from weight_edit.writer import apply_direction

    source = Checkpoint(_with_tokenizer(deepseek_fp8, tmp_path / "src", chat_tokenizer))
    result = apply_direction(source, torch.randn(HIDDEN), tmp_path / "out")
    out = Checkpoint(tmp_path / "out")
    experts = [f"model.layers.1.mlp.experts.{e}.{p}.weight" for e in range(4) for p in ("gate_proj", "up_proj")]
    assert all(f"model.layers.1.mlp.experts.{e}.down_proj.weight" in result.edited_tensors for e in range(4))
    assert all(out.info(name).dtype == "BF16" and name + "_scale_inv" not in out.weight_map for name in experts)
    assert torch.equal(out.read(experts[0]), source.read(experts[0]).to(torch.bfloat16))
    kv = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    assert out.info(kv).dtype == "F8_E4M3" and torch.equal(out.read_stored(kv), source.read_stored(kv))
    # transformers dequantizes the FP8 modules left to bfloat16 whatever dtype is asked: verify's run must still
    # be float32 throughout
    model, _ = load_model(tmp_path / "out", dtype="float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    del model
    report = verify_checkpoint(tmp_path / "out", PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=3)
    assert report.passed, report.failures

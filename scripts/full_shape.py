"""apply + verify on random-weight checkpoints at real models' shapes, timed, with peak memory (issue 21).

For each named model: a random-weight model is built from the real model's config (its widths, heads, head
dimensions, expert counts, vocabulary and layer pattern; optionally fewer layers) directly on the device, saved
sharded in bfloat16 in the release's on-disk layout (experts fused where the release fuses them and
transformers would save them per expert; gpt-oss's experts in MXFP4 and DeepSeek-V3's linears in block FP8, as
released), then `weight_edit.writer.apply_direction` writes a random unit direction (norm-preserving) and
`weight_edit.verify.verify_checkpoint` compares the output with the hooked source (both loaded in float32, as
verify does). Every step is timed with its peak GPU memory (torch.cuda.max_memory_allocated, reset per step)
and the process's peak RSS so far (resource.getrusage); one JSON of aggregates per model goes to --out
(`<model>.json`, `<model>-tiny.json` with --tiny), and one line per step is printed.

    python scripts/full_shape.py --model qwen3.5-35b-a3b --work /tmp/fs --out artifacts/full_shape
    python scripts/full_shape.py --model gpt-oss-20b --layers 8 --work /tmp/fs --out artifacts/full_shape
    python scripts/full_shape.py --estimate          # parameters, GPU memory and disk at the default cuts
    python scripts/full_shape.py --model gpt-oss-20b deepseek-v3 --tiny --work /tmp/fs --out /tmp/fs/out  # CPU

The configs are data (MODELS, each with the source of its numbers). The default layer cuts keep each model
within one 80 GB GPU (verify holds one float32 model at a time: 4 bytes a parameter) and 64 GiB of disk
(the bfloat16 source plus the output), and within about 8 minutes on one H100; --layers overrides them
(layers are cut from the top: layer_types and other per-layer lists are truncated, so the pattern of the first
layers is kept). --tiny shrinks every width (hidden 64, a few experts, the test tokenizer's vocabulary, a few
layers) but keeps the structure: layer patterns, wrappers, fused experts and the quantized formats; it runs on
a CPU in seconds and is what tests/test_full_shape_script.py runs.

DeepSeek-V3 as released cannot be verified with transformers 5.25: its kv_a_proj_with_mqa (576 = 4.5 x 128 rows)
has a ragged FP8 block edge, which transformers' dequantizing load refuses, so verify fails loading the source
(recorded in the JSON). --fp8-float-ragged keeps such tensors in bfloat16 (not as released) so the rest can be
verified. A step that raises is recorded in the JSON (step, type, message); the script then exits non-zero.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import resource
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import settings  # noqa: E402

GB = 1e9
SHARD_SIZE = "4GB"
CHAT_VOCAB = 4000  # the synthetic ChatML tokenizer's vocabulary at full shape (--tiny: 400)
TINY_VOCAB = 400
# Benign prompts only: verify compares the two models' logits and greedy continuations, none is recorded.
PROMPTS = [
    "Tell me a joke about cats.",
    "How do locks work?",
    "Summarise the water cycle in two sentences.",
    "Write a haiku about autumn.",
]
NEW_TOKENS = 8
TINY_PROMPTS, TINY_NEW_TOKENS = 2, 4  # --tiny: a smoke test on a CPU
LAYER_LISTS = (
    "layer_types",
    "no_rope_layers",
    "layers_block_type",
)  # per-layer config lists, truncated with the layers
FP8_BLOCK = [128, 128]


@dataclass(frozen=True)
class FullShapeModel:
    name: str  # the released checkpoint whose shapes are used
    model_type: str  # config.json's model_type
    config: dict[str, Any]  # config.json's architecture fields as released (text_config under a wrapper)
    source: str  # where every number comes from
    default_layers: int | None  # layers built by default (None: all the release's)
    tiny: dict[str, Any]  # --tiny overrides (merged into text_config under a wrapper; other sub-configs replaced)
    tiny_layers: int
    quantization: dict[str, Any] | None = None  # config.json's quantization_config as released
    fused_experts: bool = False  # the release fuses experts that transformers' save_pretrained writes per expert
    notes: tuple[str, ...] = ()


GEMMA4_E4B_LAYER_TYPES = (["sliding_attention"] * 5 + ["full_attention"]) * 7
QWEN3_5_LAYER_TYPES = (["linear_attention"] * 3 + ["full_attention"]) * 10
GRANITE4_H_LAYER_TYPES = [("attention" if i in (5, 15, 25, 35) else "mamba") for i in range(40)]
# Nemotron 3 Nano's hybrid_override_pattern as released (M Mamba-2, * attention, E mixture of experts), written as
# transformers' layers_block_type
NEMOTRON3_NANO_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
NEMOTRON_BLOCKS = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
TINY_QWEN_LINEAR = dict(
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4
)

MODELS: dict[str, FullShapeModel] = {
    "gemma-4-e4b-it": FullShapeModel(
        name="google/gemma-4-E4B-it",
        model_type="gemma4",
        config={
            "text_config": {
                "hidden_size": 2560,
                "intermediate_size": 10240,
                "num_hidden_layers": 42,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
                "head_dim": 256,
                "global_head_dim": 512,
                "vocab_size": 262144,
                "vocab_size_per_layer_input": 262144,
                "hidden_size_per_layer_input": 256,
                "num_kv_shared_layers": 18,
                "sliding_window": 512,
                "final_logit_softcapping": 30.0,
                "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-6,
                "hidden_activation": "gelu_pytorch_tanh",
                "attention_k_eq_v": False,
                "enable_moe_block": False,
                "use_double_wide_mlp": False,
                "tie_word_embeddings": True,
                "layer_types": GEMMA4_E4B_LAYER_TYPES,
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
                },
            },
            "vision_config": {},
            "audio_config": {},
            "tie_word_embeddings": True,
        },
        source=(
            "text_config: google/gemma-4-E4B's config.json values as quoted in public repositories (a Swift plan "
            "citing huggingface.co/google/gemma-4-E4B/config.json; Go and Swift test fixtures with the 42-entry "
            "layer_types, full attention at 5, 11, ..., 41; NVIDIA Megatron-Bridge's E4B test fixture); rope "
            "parameters and the vision and audio towers: transformers 5.25's Gemma4 config defaults (documented "
            "as google/gemma-4-e2b-it; E4B's own tower sizes were not found)"
        ),
        default_layers=None,
        tiny={
            "text_config": {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "global_head_dim": 32,
                "hidden_size_per_layer_input": 16,
                "sliding_window": 16,
                "max_position_embeddings": 256,
                "num_kv_shared_layers": 2,
                "layer_types": ["sliding_attention", "full_attention"] * 2,
            },
            "vision_config": None,
            "audio_config": None,
        },
        tiny_layers=4,
        notes=(
            "transformers builds no k_proj/v_proj in the 18 KV-shared layers; the release is said to carry unused "
            "ones there (they are not residual writers)",
        ),
    ),
    "qwen3.5-35b-a3b": FullShapeModel(
        name="Qwen/Qwen3.5-35B-A3B",
        model_type="qwen3_5_moe",
        config={
            "text_config": {
                "hidden_size": 2048,
                "num_hidden_layers": 40,
                "num_attention_heads": 16,
                "num_key_value_heads": 2,
                "head_dim": 256,
                "linear_conv_kernel_dim": 4,
                "linear_key_head_dim": 128,
                "linear_value_head_dim": 128,
                "linear_num_key_heads": 16,
                "linear_num_value_heads": 32,
                "moe_intermediate_size": 512,
                "shared_expert_intermediate_size": 512,
                "num_experts": 256,
                "num_experts_per_tok": 8,
                "vocab_size": 248320,
                "max_position_embeddings": 262144,
                "rms_norm_eps": 1e-6,
                "tie_word_embeddings": False,
                "layer_types": QWEN3_5_LAYER_TYPES,
                "rope_parameters": {
                    "mrope_interleaved": True,
                    "mrope_section": [11, 11, 10],
                    "partial_rotary_factor": 0.25,
                    "rope_theta": 10000000,
                    "rope_type": "default",
                },
            },
            "vision_config": {
                "depth": 27,
                "hidden_size": 1152,
                "intermediate_size": 4304,
                "num_heads": 16,
                "out_hidden_size": 2048,
                "patch_size": 16,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "in_channels": 3,
                "num_position_embeddings": 2304,
                "deepstack_visual_indexes": [],
            },
            "tie_word_embeddings": False,
        },
        source=(
            "transformers 5.25's Qwen3_5MoeTextConfig defaults, documented as Qwen/Qwen3.5-35B-A3B, which agree "
            "with the published config.json of Qwen/Qwen3.6-35B-A3B (same architecture) quoted verbatim in a public "
            "repository; the vision tower (out_hidden_size 2048, transformers' default is 3584) and rope parameters "
            "from that config.json"
        ),
        default_layers=8,
        tiny={
            "text_config": {
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
                **TINY_QWEN_LINEAR,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 32,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "max_position_embeddings": 256,
                "rope_parameters": {"mrope_section": [1, 1, 0], "partial_rotary_factor": 0.25, "rope_theta": 1e7},
            },
            "vision_config": {
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_heads": 2,
                "out_hidden_size": 64,
            },
        },
        tiny_layers=4,
        fused_experts=True,
        notes=(
            "the release's mtp.* tensors (multi-token prediction) are not built: transformers has no module for "
            "them, and apply copies them untouched",
        ),
    ),
    "gpt-oss-20b": FullShapeModel(
        name="openai/gpt-oss-20b",
        model_type="gpt_oss",
        config={
            "hidden_size": 2880,
            "intermediate_size": 2880,
            "num_hidden_layers": 24,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "num_local_experts": 32,
            "num_experts_per_tok": 4,
            "experts_per_token": 4,
            "vocab_size": 201088,
            "sliding_window": 128,
            "layer_types": ["sliding_attention", "full_attention"] * 12,
            "attention_bias": True,
            "max_position_embeddings": 131072,
            "initial_context_length": 4096,
            "rms_norm_eps": 1e-5,
            "swiglu_limit": 7.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "pad_token_id": 199999,
            "eos_token_id": 200002,
            "rope_theta": 150000,
            "rope_scaling": {
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
                "rope_type": "yarn",
                "truncate": False,
            },
        },
        source=(
            "openai/gpt-oss-20b's config.json (quantization_config included) as quoted verbatim in a public "
            "repository's test (circuit-tracer); transformers' GptOssConfig defaults are gpt-oss-120b's"
        ),
        default_layers=12,
        quantization={
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
            "quant_method": "mxfp4",
        },
        tiny={
            "hidden_size": 64,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "experts_per_token": 2,
            "sliding_window": 16,
            "max_position_embeddings": 256,
        },
        tiny_layers=2,
    ),
    "deepseek-v3": FullShapeModel(
        name="deepseek-ai/DeepSeek-V3",
        model_type="deepseek_v3",
        config={
            "hidden_size": 7168,
            "intermediate_size": 18432,
            "moe_intermediate_size": 2048,
            "num_hidden_layers": 61,
            "num_attention_heads": 128,
            "num_key_value_heads": 128,
            "n_shared_experts": 1,
            "n_routed_experts": 256,
            "num_experts_per_tok": 8,
            "n_group": 8,
            "topk_group": 4,
            "first_k_dense_replace": 3,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "kv_lora_rank": 512,
            "q_lora_rank": 1536,
            "qk_rope_head_dim": 64,
            "qk_nope_head_dim": 128,
            "v_head_dim": 128,
            "vocab_size": 129280,
            "max_position_embeddings": 163840,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "rope_theta": 10000,
            "rope_scaling": {
                "beta_fast": 32,
                "beta_slow": 1,
                "factor": 40,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 4096,
                "type": "yarn",
            },
        },
        source=(
            "DeepSeek-R1's config.json (DeepSeek-V3's architecture, shapes and FP8 quantization_config) as quoted "
            "verbatim in a public repository; transformers 5.25's DeepseekV3Config defaults agree on every shape"
        ),
        default_layers=4,
        quantization={
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
        tiny={
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            # kv_a_proj_with_mqa has kv_lora_rank + qk_rope_head_dim rows: 40 = 2.5 blocks of 16, as the release's
            # 576 = 4.5 blocks of 128 (a ragged FP8 block edge)
            "kv_lora_rank": 32,
            "q_lora_rank": 32,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 16,
            "v_head_dim": 16,
            "max_position_embeddings": 256,
            "weight_block_size": [16, 16],
        },
        tiny_layers=2,
        notes=(
            "the release stores routed experts one linear each (transformers' save_pretrained does the same); its "
            "layer 61 (multi-token prediction) is not built",
        ),
    ),
    "llama-4-scout-17b-16e": FullShapeModel(
        name="meta-llama/Llama-4-Scout-17B-16E",
        model_type="llama4",
        config={
            "text_config": {
                "hidden_size": 5120,
                "intermediate_size": 8192,
                "intermediate_size_mlp": 16384,
                "num_hidden_layers": 48,
                "num_attention_heads": 40,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "num_local_experts": 16,
                "num_experts_per_tok": 1,
                "interleave_moe_layer_step": 1,
                "no_rope_layers": [1, 1, 1, 0] * 12,
                "attention_chunk_size": 8192,
                "attn_temperature_tuning": True,
                "floor_scale": 8192,
                "attn_scale": 0.1,
                "use_qk_norm": True,
                "vocab_size": 202048,
                "max_position_embeddings": 262144,
                "rms_norm_eps": 1e-5,
                "pad_token_id": 200018,
                "bos_token_id": 200000,
                "eos_token_id": [200001, 200007, 200008],
                "tie_word_embeddings": False,
                "rope_theta": 500000.0,
                "rope_scaling": {
                    "factor": 8.0,
                    "high_freq_factor": 4.0,
                    "low_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192,
                    "rope_type": "llama3",
                },
            },
            "vision_config": {
                "hidden_size": 1408,
                "image_size": 336,
                "intermediate_size": 5632,
                "num_attention_heads": 16,
                "num_hidden_layers": 34,
                "patch_size": 14,
                "pixel_shuffle_ratio": 0.5,
                "projector_input_dim": 4096,
                "projector_output_dim": 4096,
                "vision_output_dim": 4096,
                "rope_theta": 10000,
            },
            "boi_token_index": 200080,
            "eoi_token_index": 200081,
            "image_token_index": 200092,
            "tie_word_embeddings": False,
        },
        source=(
            "meta-llama/Llama-4-Scout-17B-16E's Llama4Config as printed in a public repository (109,676,279,296 "
            "parameters), its vision tower agreeing with Scout fixtures in NVIDIA's and AWS's repositories; "
            "attn_temperature_tuning is 4 in that file, passed as true (transformers 5.25 declares it a bool); "
            "moe_layers is left to transformers (interleave_moe_layer_step 1: every layer)"
        ),
        default_layers=4,
        tiny={
            "text_config": {
                "hidden_size": 64,
                "intermediate_size": 32,
                "intermediate_size_mlp": 128,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "num_local_experts": 4,
                "attention_chunk_size": 16,
                "max_position_embeddings": 256,
            },
            "vision_config": {
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 28,
                "patch_size": 14,
                "vision_output_dim": 32,
                "projector_input_dim": 32,
                "projector_output_dim": 32,
            },
        },
        tiny_layers=4,
    ),
    "granite-4.0-h-small": FullShapeModel(
        name="ibm-granite/granite-4.0-h-small",
        model_type="granitemoehybrid",
        config={
            "hidden_size": 4096,
            "intermediate_size": 768,
            "shared_intermediate_size": 1536,
            "num_hidden_layers": 40,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "num_local_experts": 72,
            "num_experts_per_tok": 10,
            "layer_types": GRANITE4_H_LAYER_TYPES,
            "mamba_n_heads": 128,
            "mamba_d_head": 64,
            "mamba_n_groups": 1,
            "mamba_d_state": 128,
            "mamba_d_conv": 4,
            "mamba_expand": 2,
            "mamba_chunk_size": 256,
            "mamba_conv_bias": True,
            "mamba_proj_bias": False,
            "position_embedding_type": "nope",
            "vocab_size": 100352,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,
            "embedding_multiplier": 12.0,
            "attention_multiplier": 0.0078125,
            "residual_multiplier": 0.22,
            "logits_scaling": 8.0,
        },
        source=(
            "ibm-granite/granite-4.0-h-small's config.json fields as quoted in a public repository's worked example "
            "(hidden 4096, 40 layers, 32/8 heads, 72 experts top-10, intermediate 768, shared 1536, mamba d_state "
            "128, d_conv 4, expand 2, vocab 100352, tied; layer_types 36 mamba + 4 attention); NOT FOUND and taken "
            "from the other 40-layer Granite 4.0-H configs (H-1B, H-Micro): attention at layers 5, 15, 25, 35, "
            "mamba_d_head 64 (so mamba_n_heads = 2 x 4096 / 64 = 128), n_groups 1, chunk 256, conv bias, nope, and "
            "the scalar multipliers (which change no shape)"
        ),
        default_layers=10,
        tiny={
            "hidden_size": 64,
            "intermediate_size": 32,
            "shared_intermediate_size": 48,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "mamba_n_heads": 4,
            "mamba_d_head": 32,
            "mamba_d_state": 8,
            "mamba_chunk_size": 8,
            "max_position_embeddings": 256,
        },
        tiny_layers=6,
    ),
    "glm-4.5-air": FullShapeModel(
        name="zai-org/GLM-4.5-Air",
        model_type="glm4_moe",
        config={
            "hidden_size": 4096,
            "intermediate_size": 10944,
            "moe_intermediate_size": 1408,
            "num_hidden_layers": 46,
            "num_attention_heads": 96,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "partial_rotary_factor": 0.5,
            "attention_bias": True,
            "n_routed_experts": 128,
            "n_shared_experts": 1,
            "num_experts_per_tok": 8,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "routed_scaling_factor": 1.0,
            "norm_topk_prob": True,
            "vocab_size": 151552,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000,
            "tie_word_embeddings": False,
            "pad_token_id": 151329,
            "eos_token_id": [151329, 151336, 151338],
        },
        source=(
            "GLM-4.5-Air's config.json (Glm4MoeForCausalLM: hidden 4096, 46 layers, 96/8 heads, 128 experts of "
            "1408, first layer dense) as written out by a public conversion script; transformers 5.25's "
            "Glm4MoeConfig defaults agree on every shape; use_qk_norm absent there, so false"
        ),
        default_layers=4,
        tiny={
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "max_position_embeddings": 256,
        },
        tiny_layers=2,
        notes=("the release's layer 46 (multi-token prediction) is not built",),
    ),
    "qwen3-next-80b-a3b": FullShapeModel(
        name="Qwen/Qwen3-Next-80B-A3B-Instruct",
        model_type="qwen3_next",
        config={
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 48,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "head_dim": 256,
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
            "linear_num_key_heads": 16,
            "linear_num_value_heads": 32,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "full_attention_interval": 4,
            "moe_intermediate_size": 512,
            "shared_expert_intermediate_size": 512,
            "num_experts": 512,
            "num_experts_per_tok": 10,
            "norm_topk_prob": True,
            "vocab_size": 151936,
            "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000000,
            "partial_rotary_factor": 0.25,
            "tie_word_embeddings": False,
        },
        source=(
            "transformers 5.25's Qwen3NextConfig defaults, documented as Qwen/Qwen3-Next-80B-A3B-Instruct "
            "(moe_intermediate_size 512 also quoted from its config.json in an SGLang pull request); "
            "max_position_embeddings 262144 and rope_theta 1e7 from the model card (they change no shape)"
        ),
        default_layers=4,
        tiny={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            **TINY_QWEN_LINEAR,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "max_position_embeddings": 256,
        },
        tiny_layers=4,
        notes=("the release's mtp.* tensors are not built",),
    ),
    "nemotron-3-nano-30b-a3b": FullShapeModel(
        name="nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16",
        model_type="nemotron_h",
        config={
            "hidden_size": 2688,
            "num_hidden_layers": len(NEMOTRON3_NANO_PATTERN),
            "layers_block_type": [NEMOTRON_BLOCKS[c] for c in NEMOTRON3_NANO_PATTERN],
            "num_attention_heads": 32,
            "num_key_value_heads": 2,
            "head_dim": 128,
            "intermediate_size": 1856,
            "mamba_num_heads": 64,
            "mamba_head_dim": 64,
            "n_groups": 8,
            "ssm_state_size": 128,
            "conv_kernel": 4,
            "n_routed_experts": 128,
            "num_experts_per_tok": 6,
            "moe_intermediate_size": 1856,
            "moe_shared_expert_intermediate_size": 3712,
            "routed_scaling_factor": 2.5,
            "vocab_size": 131072,
            "max_position_embeddings": 262144,
            "tie_word_embeddings": False,
        },
        source=(
            "NVIDIA Megatron-Bridge's Nemotron3NanoProvider (hybrid_layer_pattern, hidden 2688, 64 Mamba heads of "
            "64, state 128, 8 groups (the Nemotron-H default), 32 attention heads in 2 groups of 128, 128 experts "
            "of 1856 with a shared expert of 3712, top 6, scaling 2.5); vocabulary 131072 as transformers 5.25's "
            "NemotronHConfig default (the Nemotron-H tokenizer)"
        ),
        default_layers=12,
        tiny={
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 32,
            "mamba_num_heads": 4,
            "mamba_head_dim": 16,
            "n_groups": 1,
            "ssm_state_size": 8,
            "chunk_size": 8,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "moe_shared_expert_intermediate_size": 32,
            "max_position_embeddings": 256,
        },
        tiny_layers=6,
        notes=(
            "on disk under backbone. as released (transformers renames to model. in memory); Mamba layers write "
            "through mixer.out_proj, MoE layers through every expert's down_proj and the shared expert's",
        ),
    ),
    "qwen3-vl-30b-a3b": FullShapeModel(
        name="Qwen/Qwen3-VL-30B-A3B-Instruct",
        model_type="qwen3_vl_moe",
        config={
            "text_config": {
                "hidden_size": 2048,
                "num_hidden_layers": 48,
                "num_attention_heads": 32,
                "num_key_value_heads": 4,
                "head_dim": 128,
                "intermediate_size": 6144,
                "moe_intermediate_size": 768,
                "num_experts": 128,
                "num_experts_per_tok": 8,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "vocab_size": 151936,
                "max_position_embeddings": 262144,
                "rms_norm_eps": 1e-6,
                "tie_word_embeddings": False,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 5000000,
                    "mrope_section": [24, 20, 20],
                    "mrope_interleaved": True,
                },
            },
            "vision_config": {
                "depth": 27,
                "hidden_size": 1152,
                "intermediate_size": 4304,
                "num_heads": 16,
                "out_hidden_size": 2048,
                "patch_size": 16,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "deepstack_visual_indexes": [8, 16, 24],
            },
            "tie_word_embeddings": False,
        },
        source=(
            "text: NVIDIA Megatron-Bridge's Qwen3-VL-30B-A3B-Instruct arguments (48 layers, hidden 2048, 32 heads "
            "in 4 groups of 128, 128 experts of 768, top 8, vocabulary 151936, rotary base 5e6, untied); vision "
            "tower and rope sections: transformers 5.25's Qwen3VLMoe config defaults with out_hidden_size set to "
            "the text width"
        ),
        default_layers=12,
        tiny={
            "text_config": {
                "hidden_size": 64,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "intermediate_size": 128,
                "moe_intermediate_size": 32,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "max_position_embeddings": 256,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 5000000,
                    "mrope_section": [4, 2, 2],
                    "mrope_interleaved": True,
                },
            },
            "vision_config": {
                "depth": 1,
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_heads": 2,
                "out_hidden_size": 64,
                "deepstack_visual_indexes": [0],
            },
        },
        tiny_layers=4,
        notes=("the fused expert tensors are saved as transformers 5.25 writes them (its layout is recorded)",),
    ),
}


# ---- configs ----------------------------------------------------------------------------------------------------


def _text(config: dict[str, Any]) -> dict[str, Any]:
    return config["text_config"] if "text_config" in config else config


def _cut_layers(text: dict[str, Any], layers: int) -> None:
    """The first `layers` layers: per-layer lists truncated; Gemma 4's KV-shared tail scaled with the depth and
    shortened until the layers it reads from still hold every layer type (transformers' requirement)."""
    total = text["num_hidden_layers"]
    text["num_hidden_layers"] = layers
    for key in LAYER_LISTS:
        if isinstance(text.get(key), list):
            text[key] = text[key][:layers]
    shared = text.get("num_kv_shared_layers")
    if shared:
        types = text.get("layer_types") or []
        shared = min(round(shared * layers / total), layers - 1)
        while shared > 0 and set(types[: layers - shared]) != set(types[:layers]):
            shared -= 1
        text["num_kv_shared_layers"] = shared


def config_dict(spec: FullShapeModel, layers: int | None, tiny: bool, tokenizer) -> tuple[dict[str, Any], int, int]:
    """The config kwargs to build (config.json's fields, cut and, with --tiny, shrunk), the release's layer count
    and the layers built."""
    config = copy.deepcopy(spec.config)
    released = _text(config)["num_hidden_layers"]
    if tiny:
        for key, value in spec.tiny.items():
            if key == "weight_block_size":
                continue  # a quantization setting, not a config field
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key].update(value)  # text_config, vision_config: the release's fields, shrunk
            else:
                config[key] = value  # a top-level field, or a tower left out (None)
        text = _text(config)
        text["vocab_size"] = len(tokenizer)
        if "vocab_size_per_layer_input" in text:
            text["vocab_size_per_layer_input"] = len(tokenizer)
        for scope in {id(config): config, id(text): text}.values():  # the release's token ids are outside
            scope.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
        layers = layers or spec.tiny_layers
    else:
        layers = layers or spec.default_layers
    if layers is not None and layers != released:
        if not 0 < layers <= released:
            raise SystemExit(f"--layers {layers}: {spec.name} has {released} layers")
        _cut_layers(_text(config), layers)
    if not tiny:
        text = _text(config)
        text["vocab_size"] = max(text["vocab_size"], len(tokenizer))
    return config, released, _text(config)["num_hidden_layers"]


def build_config(spec: FullShapeModel, kwargs: dict[str, Any]):
    from transformers import AutoConfig

    return AutoConfig.for_model(spec.model_type, **copy.deepcopy(kwargs))


def fp8_block(spec: FullShapeModel, tiny: bool) -> list[int]:
    if tiny and "weight_block_size" in spec.tiny:
        return list(spec.tiny["weight_block_size"])
    return list((spec.quantization or {}).get("weight_block_size", FP8_BLOCK))


# ---- what the release quantizes ------------------------------------------------------------------------------------

_MXFP4_TENSOR = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")  # gpt-oss: both expert projections
# DeepSeek-V3: every linear of the layers (attention, dense MLP, routed and shared experts); embeddings, norms, the
# router (mlp.gate) and lm_head stay bfloat16
_FP8_TENSOR = re.compile(r"\.layers\.\d+\..*(proj|proj_with_mqa)\.weight$")


def quantized_on_disk(method: str | None, name: str, ndim: int) -> bool:
    if method == "mxfp4":
        return ndim == 3 and bool(_MXFP4_TENSOR.search(name))
    if method == "fp8":
        return ndim == 2 and bool(_FP8_TENSOR.search(name))
    return False


# ---- estimates -----------------------------------------------------------------------------------------------------


def meta_model(config):
    """The model on the meta device: shapes without memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    auto_class = (
        AutoModelForImageTextToText
        if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        else AutoModelForCausalLM
    )
    with torch.device("meta"):
        return auto_class.from_config(config)


def estimate(spec: FullShapeModel, config, tiny: bool) -> dict[str, Any]:
    """Parameters and bytes from the model's shapes: the bfloat16 checkpoint, the source as released (MXFP4 or FP8
    where it is quantized), verify's float32 model (4 bytes a parameter, one model at a time) and the disk for
    source + output (the output at most the bfloat16 size: quantized units it rewrites become bfloat16)."""
    model = meta_model(config)
    method = (spec.quantization or {}).get("quant_method")
    block = fp8_block(spec, tiny)
    params = source = 0
    for name, parameter in model.named_parameters():
        count = parameter.numel()
        params += count
        if method == "mxfp4" and quantized_on_disk(method, name, parameter.ndim):
            source += count // 2 + count // 32
        elif method == "fp8" and (
            quantized_on_disk(method, name, parameter.ndim) or re.search(r"\.experts\.(gate_up|down)_proj$", name)
        ):
            rows, cols = parameter.shape[-2:]
            source += count + 4 * (count // (rows * cols)) * math.ceil(rows / block[0]) * math.ceil(cols / block[1])
        else:
            source += 2 * count
    bf16 = 2 * params
    return {
        "parameters": params,
        "bf16_gb": round(bf16 / GB, 2),
        "source_gb": round(source / GB, 2),
        "verify_float32_gpu_gb": round(4 * params / GB, 1),
        "build_bf16_gpu_gb": round(bf16 / GB, 1),
        "disk_gb_at_most": round((source + bf16) / GB, 1),
    }


# ---- measuring ------------------------------------------------------------------------------------------------------


def peak_rss_gb() -> float:
    """The process's peak resident memory so far (ru_maxrss, kilobytes on Linux): a running maximum."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 2)


def folder_bytes(folder: Path) -> tuple[int, int]:
    files = sorted(f for f in folder.glob("*.safetensors") if not f.name.startswith("weight_edit_"))
    return sum(f.stat().st_size for f in files), len(files)


@dataclass
class Run:
    key: str
    device: str
    log_prefix: str
    steps: list[dict[str, Any]] = field(default_factory=list)

    def log(self, message: str) -> None:
        print(f"[full_shape {time.strftime('%H:%M:%S')}] {self.log_prefix}{message}", flush=True)

    def step(self, name: str, action, describe=lambda result: "") -> Any:
        """Run one step, timed, with its peak GPU memory; the record is kept even when it raises."""
        import torch

        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        record: dict[str, Any] = {"step": name}
        self.steps.append(record)
        started = time.time()
        try:
            result = action()
            if cuda:
                torch.cuda.synchronize()
        finally:
            record["seconds"] = round(time.time() - started, 1)
            record["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2) if cuda else None
            record["peak_rss_gb_so_far"] = peak_rss_gb()
        extra = describe(result)
        gpu = f", peak GPU {record['peak_gpu_gb']:.1f} GB" if cuda else ""
        self.log(
            f"{name}: {record['seconds']:.1f} s{gpu}, peak RSS so far {record['peak_rss_gb_so_far']:.1f} GB"
            + (f"; {extra}" if extra else "")
        )
        return result


# ---- the checkpoint ------------------------------------------------------------------------------------------------


def build_checkpoint(
    spec: FullShapeModel, config, folder: Path, device: str, tokenizer, dtype: str = "bfloat16"
) -> dict[str, Any]:
    """Random weights (bfloat16 as released, or --dtype) built on `device`, saved sharded by save_pretrained. Where the release fuses experts
    that transformers would save per expert (Qwen3.5), the in-memory (fused) names and layout are written as they
    are (save_original_format=False): `...mlp.experts.down_proj` [experts, d_model, d_ff]."""
    import torch

    from weight_edit.models import release_memory
    from weight_edit.synthetic import random_model

    started = time.time()
    model = random_model(config, getattr(torch, dtype), device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    init_s = time.time() - started
    started = time.time()
    model.save_pretrained(str(folder), max_shard_size=SHARD_SIZE, save_original_format=not spec.fused_experts)
    save_s = time.time() - started
    del model
    release_memory()
    tokenizer.save_pretrained(str(folder))
    return {"random_init_s": round(init_s, 1), "save_s": round(save_s, 1)}


def quantize_checkpoint(
    spec: FullShapeModel, folder: Path, device: str, tiny: bool, float_ragged: bool = False
) -> dict[str, Any]:
    """Rewrite the saved shards in the release's quantized format, one shard at a time on `device`: MXFP4 experts
    (`..._blocks` + `..._scales`) or block FP8 (`weight` as float8_e4m3fn + float32 `weight_scale_inv`); the index's
    weight map and config.json's quantization_config follow. `float_ragged` keeps the FP8 candidates whose shape is
    not a multiple of the block in bfloat16, unlike the release (transformers 5.25 cannot dequantize them)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from weight_edit.checkpoint import INDEX_FILE, SINGLE_FILE
    from weight_edit.synthetic import quantize_fp8, quantize_mxfp4

    method = spec.quantization["quant_method"]
    block = fp8_block(spec, tiny)
    index_path = folder / INDEX_FILE
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    shards = sorted(set(index["weight_map"].values())) if index else [SINGLE_FILE]
    weight_map: dict[str, str] = {}
    ragged: list[str] = []
    total = quantized = 0
    for shard in shards:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(folder / shard), framework="pt", device=device) as handle:
            for name in list(handle.keys()):
                value = handle.get_tensor(name)
                parts = {name: value}
                if quantized_on_disk(method, name, value.ndim):
                    if method == "fp8" and float_ragged and any(n % b for n, b in zip(value.shape, block, strict=True)):
                        ragged.append(name)
                    elif method == "mxfp4":
                        blocks, scales = quantize_mxfp4(value)
                        parts = {name + "_blocks": blocks, name + "_scales": scales}
                    else:
                        weight, scale = quantize_fp8(value, (block[0], block[1]))
                        parts = {name: weight, name + "_scale_inv": scale}
                    quantized += len(parts) > 1
                for part, tensor in parts.items():
                    tensors[part] = tensor.to("cpu").contiguous()
                    weight_map[part] = shard
                    total += tensors[part].nbytes
        partial = folder / (shard + ".partial")
        save_file(tensors, str(partial), metadata={"format": "pt"})
        del tensors
        os.replace(partial, folder / shard)
    if index:
        index["weight_map"] = dict(sorted(weight_map.items()))
        index.setdefault("metadata", {})["total_size"] = total
        index_path.write_text(json.dumps(index, indent=2) + "\n")
    quantization = copy.deepcopy(spec.quantization)
    if method == "fp8":
        quantization["weight_block_size"] = block
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    result: dict[str, Any] = {"method": method, "quantized_tensors": quantized}
    if method == "fp8":
        result["block"] = block
    if float_ragged:
        result["kept_bfloat16_ragged"] = {
            "tensors": len(ragged),
            "example": ragged[0] if ragged else None,
            "note": "not as released: FP8 candidates with a ragged block edge kept in bfloat16 (--fp8-float-ragged)",
        }
    return result


def layout(folder: Path) -> dict[str, Any]:
    """What the checkpoint holds on disk: tensor counts, experts fused or per expert, quantized tensors, and one
    expert down projection's name, shape and dtype as an example."""
    from weight_edit.checkpoint import Checkpoint

    checkpoint = Checkpoint(folder)
    names = sorted(checkpoint.weight_map)
    fused = [n for n in names if re.search(r"experts\.(down_proj|gate_up_proj)(_blocks)?$", n) or "output_linear" in n]
    per_expert = [n for n in names if re.search(r"experts\.\d+\.", n)]
    down = next((n for n in names if re.search(r"experts\.(\d+\.)?down_proj(\.weight|_blocks)?$", n)), None)
    down = down or next((n for n in names if n.endswith("block_sparse_moe.output_linear.weight")), None)
    info = checkpoint.info(down) if down else None
    return {
        "tensors": len(names),
        "fused_expert_tensors": len(fused),
        "per_expert_tensors": len(per_expert),
        "mxfp4_blocks": sum(n.endswith("_blocks") for n in names),
        "fp8_tensors": sum(checkpoint.info(n).dtype.startswith("F8") for n in names),
        "expert_down_proj": {"name": down, "shape": list(info.shape), "dtype": info.dtype} if info else None,
    }


# ---- one model -----------------------------------------------------------------------------------------------------


def measure(key: str, args: argparse.Namespace, tokenizer) -> dict[str, Any]:
    import torch
    import transformers

    from weight_edit.checkpoint import Checkpoint
    from weight_edit.verify import verify_checkpoint
    from weight_edit.writer import apply_direction

    spec = MODELS[key]
    kwargs, released, layers = config_dict(spec, args.layers, args.tiny, tokenizer)
    config = build_config(spec, kwargs)
    run = Run(key, args.device, f"{key}{' (tiny)' if args.tiny else ''} ")
    sizes = estimate(spec, config, args.tiny)
    cut = layers < released
    note = (
        f"layers cut from {released} to {layers} (the first {layers}) to fit one 80 GB GPU, 64 GiB of disk and ~8 "
        "minutes; every width, head count, expert count and the vocabulary are the release's"
        if cut and not args.tiny
        else None
    )
    run.log(
        f"{spec.name}: {layers} of {released} layers{' (CUT)' if cut else ''}, {sizes['parameters'] / 1e9:.2f} B "
        f"parameters, {sizes['bf16_gb']:.1f} GB bf16, source {sizes['source_gb']:.1f} GB, verify ~"
        f"{sizes['verify_float32_gpu_gb']:.1f} GB float32 on {args.device}"
    )
    record: dict[str, Any] = {
        "model": key,
        "name": spec.name,
        "model_type": spec.model_type,
        "config_source": spec.source,
        "notes": list(spec.notes),
        "tiny": args.tiny,
        "storage_dtype": args.dtype,
        "layers": {"built": layers, "released": released, "cut": cut, "note": note},
        "estimate": sizes,
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "steps": run.steps,
    }
    work = args.work / (key + ("-tiny" if args.tiny else ""))
    source, out = work / "source", work / "edited"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        record["build"] = run.step(
            "build",
            lambda: build_checkpoint(spec, config, source, args.device, tokenizer, args.dtype),
            lambda r: f"init {r['random_init_s']} s, save {r['save_s']} s, {folder_bytes(source)[0] / GB:.1f} GB",
        )
        if spec.quantization:
            record["quantization"] = run.step(
                "quantize",
                lambda: quantize_checkpoint(spec, source, args.device, args.tiny, args.fp8_float_ragged),
                lambda r: f"{r['quantized_tensors']} tensors to {r['method']}, {folder_bytes(source)[0] / GB:.1f} GB",
            )
        record["source_layout"] = layout(source)
        hidden = _text(config.to_dict())["hidden_size"]
        direction = torch.randn(hidden, generator=torch.Generator().manual_seed(settings.SEED))
        direction = direction / direction.norm()
        result = run.step(
            "apply",
            lambda: apply_direction(Checkpoint(source), direction, out, mode="norm-preserving"),
            lambda r: f"{len(r.edited_tensors)} tensors edited, {folder_bytes(out)[0] / GB:.1f} GB written",
        )
        dequantized = result.provenance.get("dequantized")
        record["apply"] = {
            "mode": "norm-preserving",
            "edited_tensors": len(result.edited_tensors),
            "guarantee": result.provenance.get("guarantee"),
            "dequantized": (
                {k: v for k, v in dequantized.items() if k != "tensors"} | {"tensors": len(dequantized["tensors"])}
                if dequantized
                else None
            ),
        }
        record["output_layout"] = layout(out)
        placement = {"device_map": {"": args.device}} if args.verify_device_map else {"device": args.device}
        prompts, new_tokens = (PROMPTS[:TINY_PROMPTS], TINY_NEW_TOKENS) if args.tiny else (PROMPTS, NEW_TOKENS)
        report = run.step(
            "verify",
            lambda: verify_checkpoint(out, prompts, settings.VERIFY_TOLERANCES, new_tokens=new_tokens, **placement),
            lambda r: f"{'passed' if r.passed else 'FAILED: ' + '; '.join(r.failures)}, guarantee {r.guarantee}",
        )
        record["verify"] = {
            "passed": report.passed,
            "guarantee": report.guarantee,
            "stored_dtype": report.stored_dtype,
            "prompt_format": getattr(report, "prompt_format", None),
            "prompts": report.prompts,
            "new_tokens": new_tokens,
            "placement": "device_map" if args.verify_device_map else "device",
            "metrics": report.metrics,
            "tolerances": report.tolerances,
            "failures": report.failures,
            "checks": report.checks,
        }
    except Exception as exc:  # recorded: a failing step is a result of this benchmark
        failed = run.steps[-1]["step"] if run.steps else "setup"
        record["error"] = {"step": failed, "type": type(exc).__name__, "message": str(exc)[:2000]}
        run.log(f"{failed} FAILED: {type(exc).__name__}: {str(exc)[:500]}")
        traceback.print_exc()
    finally:
        record["disk"] = {}
        for label, folder in (("source", source), ("output", out)):
            if folder.is_dir():
                size, shards = folder_bytes(folder)
                record["disk"][label] = {"bytes": size, "gb": round(size / GB, 2), "shards": shards}
        record["peak_rss_gb"] = peak_rss_gb()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return record


def print_estimates(keys: list[str], args: argparse.Namespace, tokenizer) -> None:
    print(
        f"{'model':24} {'layers':>9} {'params B':>9} {'bf16 GB':>8} {'source GB':>9} {'verify GPU GB':>13} "
        f"{'disk GB <=':>10}"
    )
    for key in keys:
        spec = MODELS[key]
        kwargs, released, layers = config_dict(spec, args.layers, args.tiny, tokenizer)
        sizes = estimate(spec, build_config(spec, kwargs), args.tiny)
        print(
            f"{key:24} {f'{layers}/{released}':>9} {sizes['parameters'] / 1e9:9.2f} {sizes['bf16_gb']:8.1f} "
            f"{sizes['source_gb']:9.1f} {sizes['verify_float32_gpu_gb']:13.1f} {sizes['disk_gb_at_most']:10.1f}"
        )


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=sorted(MODELS), default=None, help="one or more models")
    parser.add_argument("--layers", type=int, default=None, help="layers to build (default: the model's cut)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/full_shape"), help="checkpoints (removed after)")
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "full_shape", help="one JSON per model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the same structures at tiny widths (CPU smoke test)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints in --work")
    parser.add_argument(
        "--verify-device-map",
        action="store_true",
        help="verify loads each model straight onto --device (device_map) instead of on the CPU then moved",
    )
    parser.add_argument(
        "--fp8-float-ragged",
        action="store_true",
        help="keep FP8 tensors with a ragged block edge (DeepSeek-V3's kv_a_proj_with_mqa, 576 rows) in bfloat16, "
        "unlike the release: transformers 5.25 cannot dequantize them, so verify cannot load the release's layout",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="storage dtype of the random source (float32: the edit is stored without bfloat16 rounding, which "
        "separates rounding from a structural mismatch in verify; the JSON name gets a -float32 suffix)",
    )
    parser.add_argument("--estimate", action="store_true", help="print sizes at the chosen cuts; build nothing")
    args = parser.parse_args()

    from weight_edit.synthetic import train_chat_tokenizer

    tokenizer = train_chat_tokenizer(vocab_size=TINY_VOCAB if args.tiny else CHAT_VOCAB)
    keys = args.model or sorted(MODELS)
    if args.estimate:
        print_estimates(keys, args, tokenizer)
        return
    if args.model is None:
        parser.error("--model is required (or --estimate)")
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for key in keys:
        record = measure(key, args, tokenizer)
        suffix = ("-tiny" if args.tiny else "") + ("" if args.dtype == "bfloat16" else f"-{args.dtype}")
        path = args.out / f"{key}{suffix}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        verify = record.get("verify")
        outcome = record.get("error") and f"error in {record['error']['step']}"
        outcome = outcome or ("verify passed" if verify and verify["passed"] else "verify FAILED")
        print(f"[full_shape] {key}: {outcome}; {path}", flush=True)
        if "error" in record:
            failed.append(key)
    if failed:
        raise SystemExit(f"steps raised for: {', '.join(failed)} (recorded in their JSON)")


if __name__ == "__main__":
    main()

"""Tiny random chat models built from configs, with a ChatML tokenizer trained here: no network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def chat_tokenizer():
    from weight_edit.synthetic import train_chat_tokenizer

    return train_chat_tokenizer(vocab_size=400)


@pytest.fixture(scope="session")
def base_tokenizer():
    """The same BPE without a chat template, adding a BOS token before plain text: a base model's tokenizer."""
    from tokenizers.processors import TemplateProcessing

    from weight_edit.synthetic import train_chat_tokenizer

    tokenizer = train_chat_tokenizer(vocab_size=400)
    bos = "<|im_start|>"  # unused without a template: it plays the BOS token
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))]
    )
    tokenizer.bos_token = bos
    tokenizer.chat_template = None
    return tokenizer


def build_tiny_model(
    folder: Path,
    tokenizer,
    *,
    model_type: str = "llama",
    tie: bool = True,
    bias: bool = False,
    dtype: torch.dtype = torch.float32,
    layers: int = 2,
    seed: int = 0,
    shard_size: str = "40KB",
    random_norms: bool = False,
) -> Path:
    """Save a random model of `model_type` with at least two shards, plus the tokenizer.

    `random_norms` draws norm weights too (else they keep their initial 1 or 0), so that an edit that must
    account for a norm's scale is tested with one that is not uniform.
    """
    import transformers

    from weight_edit.synthetic import random_model

    torch.manual_seed(seed)
    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        tie_word_embeddings=tie,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.pad_token_id,
    )
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=16)
    linear = dict(linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2)
    linear |= dict(linear_num_value_heads=4)
    moe35 = ("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next")
    mla = dict(num_key_value_heads=4, kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8)
    mla |= dict(v_head_dim=8, head_dim=4, n_group=1, topk_group=1)
    mla_types = ("deepseek_v2", "deepseek_v3", "glm4_moe", "dots1")
    gemma4 = dict(head_dim=8, global_head_dim=16, vocab_size_per_layer_input=len(tokenizer), sliding_window=16)
    llama4 = dict(head_dim=8, intermediate_size_mlp=96, num_local_experts=3, num_experts_per_tok=1)
    llama4 |= dict(interleave_moe_layer_step=2, no_rope_layer_interval=2, attention_chunk_size=16)
    granite4 = dict(shared_intermediate_size=48, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_d_conv=4)
    granite4 |= dict(mamba_expand=2, mamba_chunk_size=8, mamba_n_groups=1)
    granite4 |= dict(layer_types=["mamba", "attention", "mamba", "attention"][:layers] + ["mamba"] * (layers - 4))
    nemotron = dict(head_dim=8, n_routed_experts=3, moe_shared_expert_intermediate_size=16, mamba_num_heads=4)
    nemotron |= dict(mamba_head_dim=16, ssm_state_size=8, n_groups=1, chunk_size=8, num_experts_per_tok=2)
    nemotron |= dict(moe_intermediate_size=16, layers_block_type=["mamba", "moe", "attention", "mlp"][:layers])
    extra = {
        "llama": dict(attention_bias=bias, mlp_bias=bias),
        "qwen2": {},  # q/k/v biases: not residual writers, must stay untouched
        "qwen3": dict(head_dim=8),
        "mistral": {},
        "phi3": {},
        "gemma": dict(head_dim=8),
        "gemma2": dict(head_dim=8),
        "gemma3_text": dict(head_dim=8, sliding_window=16),
        "olmo2": {},
        **{t: dict(num_local_experts=3, num_experts_per_tok=2) for t in ("mixtral", "phimoe")},
        "phimoe_bias": dict(num_local_experts=3, num_experts_per_tok=2, attention_bias=True),  # as Phi-3.5-MoE ships
        "minimax_m2": dict(num_local_experts=3, num_experts_per_tok=2, head_dim=8),
        "granitemoe": dict(
            num_local_experts=3, num_experts_per_tok=2, residual_multiplier=0.5, embedding_multiplier=2.0
        ),
        "stablelm": dict(use_parallel_residual=False),
        "stablelm_parallel": dict(use_parallel_residual=True),
        "starcoder2": {},  # use_bias: o_proj and c_proj biases (residual writers), q/k/v and c_fc biases (not)
        "phi": {},
        "hunyuan_v1_moe": dict(num_experts=3, moe_topk=2, head_dim=8),
        "ernie4_5_moe": dict(moe, moe_num_experts=3, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1)
        | dict(moe_layer_end_index=2, moe_layer_interval=1),
        "glm4_moe_lite": dict(**mla, **moe, n_routed_experts=3, n_shared_experts=1),
        "lfm2": dict(full_attn_idxs=[1, 3], block_auto_adjust_ff_dim=False, conv_bias=True),
        "lfm2_moe": dict(moe, num_experts=3, num_dense_layers=1, layer_types=["conv", "full_attention"] * 2),
        "falcon_h1": dict(head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_d_conv=4)
        | dict(mamba_expand=1, mamba_chunk_size=8, embedding_multiplier=2.0, ssm_out_multiplier=0.5),
        "qwen2_moe": dict(num_experts=3, shared_expert_intermediate_size=16, **moe),
        "qwen3_moe": dict(num_experts=3, head_dim=8, **moe),
        # d_ff 24: neither 2 d_ff (gate_up_proj) nor d_ff (down_proj) equals d_model, so each fused layout is
        # told from its shape (as transformers' Transpose(check_dims) does); the square variant has d_ff == d_model
        "qwen3_vl_moe": dict(moe, num_experts=3, head_dim=8, moe_intermediate_size=24),
        "qwen3_vl_moe_dense_layer": dict(moe, num_experts=3, head_dim=8, moe_intermediate_size=24, mlp_only_layers=[1]),
        "qwen3_vl_moe_square": dict(moe, num_experts=3, head_dim=8, moe_intermediate_size=32),
        "gpt_oss": dict(num_local_experts=3, num_experts_per_tok=2, head_dim=8, sliding_window=16),
        "gemma3": dict(head_dim=8, sliding_window=16),
        **{t: {} for t in ("ministral3", "granite", "glm", "arcee", "apertus", "ernie4_5")},
        **{t: {} for t in ("smollm3", "seed_oss", "olmo3", "cohere", "mistral3", "qwen3_vl", "qwen2_5_vl")},
        "ministral": dict(sliding_window=16, head_dim=8),
        "hunyuan_v1_dense": dict(head_dim=8),
        "cohere2": dict(sliding_window=16),
        "exaone4": dict(sliding_window=16),
        "glm4": {},
        "olmoe": dict(num_experts=3, num_experts_per_tok=2),
        **{t: dict(**linear, head_dim=8) for t in ("qwen3_5", "qwen3_5_text")},
        **{t: dict(**linear, **moe, head_dim=8, num_experts=3, shared_expert_intermediate_size=16) for t in moe35},
        "qwen3_next_dense_layer": dict(**linear, **moe, head_dim=8, num_experts=3, shared_expert_intermediate_size=16)
        | dict(mlp_only_layers=[1]),
        **{t: dict(**mla, **moe, n_routed_experts=3, n_shared_experts=1, first_k_dense_replace=1) for t in mla_types},
        **{t: dict(**gemma4, hidden_size_per_layer_input=8) for t in ("gemma4", "gemma4_text")},
        "gemma4_moe": dict(
            **gemma4,
            hidden_size_per_layer_input=0,
            enable_moe_block=True,
            num_experts=3,
            top_k_experts=2,
            moe_intermediate_size=16,
        ),
        **{t: llama4 for t in ("llama4", "llama4_text")},
        "granitemoehybrid": dict(granite4, num_local_experts=3, num_experts_per_tok=2),
        "granitemoehybrid_dense": dict(granite4, num_local_experts=0),
        "nemotron_h": nemotron,
        "nemotron_h_latent": dict(nemotron, moe_latent_size=8),
    }
    # Multimodal wrappers: the text decoder's settings go to text_config, beside a tiny vision tower.
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28)
    qwen_vision = dict(hidden_size=16, intermediate_size=32, depth=1, num_heads=2, out_hidden_size=32)
    wrappers = {
        "gemma3": dict(vision_config=vision, mm_tokens_per_image=4),
        "gemma4": dict(vision_config=None, audio_config=None),
        "mistral3": dict(vision_config=dict(vision, head_dim=8, patch_size=14)),
        "llama4": dict(
            vision_config=dict(vision, patch_size=14, vision_output_dim=32, projector_input_dim=32)
            | dict(projector_output_dim=32)
        ),
        **{t: dict(vision_config=qwen_vision) for t in ("qwen3_5", "qwen3_5_moe")},
        **{
            t: dict(vision_config=dict(qwen_vision, deepstack_visual_indexes=[0])) for t in ("qwen3_vl", "qwen3_vl_moe")
        },
        "qwen2_5_vl": dict(vision_config=dict(qwen_vision, fullatt_block_indexes=[0])),
    }
    # Test variants of a model type (another layer pattern or feature), by name.
    variants = {
        "qwen3_next_dense_layer": "qwen3_next",
        "gemma4_moe": "gemma4_text",
        "granitemoehybrid_dense": "granitemoehybrid",
        "nemotron_h_latent": "nemotron_h",
        "phimoe_bias": "phimoe",
        "stablelm_parallel": "stablelm",
        "qwen3_vl_moe_dense_layer": "qwen3_vl_moe",
        "qwen3_vl_moe_square": "qwen3_vl_moe",
    }
    settings = extra.get(model_type, {})
    model_type = variants.get(model_type, model_type)
    if model_type in ("qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl"):  # multimodal rotary sections sized for head_dim 8
        mrope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])
        settings = settings | dict(rope_parameters=mrope)
    if model_type == "gpt2":
        config = transformers.GPT2Config(
            n_embd=32,
            n_layer=layers,
            n_head=4,
            vocab_size=len(tokenizer),
            n_positions=256,
            tie_word_embeddings=tie,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.pad_token_id,
        )
    elif model_type in wrappers:
        tokens = {k: common.pop(k) for k in ("pad_token_id", "eos_token_id", "bos_token_id")}
        text_config = common | settings
        config = transformers.AutoConfig.for_model(
            model_type, text_config=text_config, tie_word_embeddings=tie, **tokens, **wrappers[model_type]
        )
    else:
        config = transformers.AutoConfig.for_model(model_type, **(common | settings))
    model = random_model(config, seed=seed)
    with torch.no_grad():  # larger-than-default weights so the edit changes outputs visibly
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0, 0.3 if parameter.ndim > 1 else 0.1)
            elif random_norms:
                parameter.uniform_(0.5, 1.5)
    model.to(dtype)
    model.save_pretrained(str(folder), max_shard_size=shard_size)
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Nothing a test caches (converted models, source evaluation scores) lands in the user's cache."""
    monkeypatch.setenv("WEIGHT_EDIT_CACHE", str(tmp_path_factory.mktemp("cache")))


def run_variant_script(script: Path, model: Path, tmp_path: Path, files: dict[str, str], variants: list[str]):
    """Run a scripts/ comparison (public_benchmarks.py, selective_edits.py) on a tiny model with fast fits, short
    answers and the benchmark `files` (name -> CSV text) written to a folder; returns the process and --out."""
    import subprocess
    import sys

    bench = tmp_path / "bench"
    bench.mkdir()
    for name, text in files.items():
        (bench / f"{name}.csv").write_text(text)
    out = tmp_path / "out"
    fit_args = ["--batch-size", "64", "--screen-prompts", "2", "--screen-keep", "2", "--validation-prompts", "4"]
    command = [sys.executable, str(script), "--model", str(model), "--variants", *variants]
    command += ["--benchmarks", str(bench), "--work", str(tmp_path / "work"), "--out", str(out)]
    command += ["--device", "cpu", "--dtype", "float32", "--max-new-tokens", "3", "--limit", "2"]
    command += [f"--fit-arg={a}" for a in fit_args]
    return subprocess.run(command, capture_output=True, text=True), out


def tiny_llama_config(tokenizer, **extra):
    """A one-layer Llama config over `tokenizer` (judges, classifiers: models that are not edited)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


@pytest.fixture
def tiny_model(tmp_path, chat_tokenizer) -> Path:
    return build_tiny_model(tmp_path / "tiny", chat_tokenizer)


def load_script(name: str):
    """A script of scripts/ imported as a module (registered, so its dataclasses can look their module up)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

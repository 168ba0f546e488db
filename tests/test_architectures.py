"""Every family in the architecture table, on a tiny random model with at least two shards.

For each family and edit mode: every expected residual writer is edited exactly as a float64
reference computed here, nothing else changes, every write is orthogonal to r̂ (through the output
norm where there is one), and `verify` passes with the guarantee the family can honestly claim.
"""

import json
import re
from dataclasses import dataclass, field
from importlib import resources

import pytest
import torch
from conftest import build_tiny_model
from test_edit_math import reference_norm_preserving, reference_project
from test_verify import PROMPTS

import settings
from weight_edit.architecture import ArchitectureError, LayerRule, _validate, architecture_for
from weight_edit.checkpoint import Checkpoint
from weight_edit.edit_math import unit
from weight_edit.verify import verify_checkpoint
from weight_edit.writer import apply_direction


@dataclass(frozen=True)
class Family:
    """What this test expects of a family, written here independently of the JSON tables."""

    writers: dict[str, int]  # full-match pattern of each edited tensor → its residual axis
    guarantees: tuple[str, str]  # norm-preserving, project
    count: int  # edited tensors for 2 layers
    norms: dict[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)  # writer suffix → norms after it
    tie: bool = False
    layers: int = 2


def llama_like(prefix: str = "model.") -> dict[str, int]:
    p = re.escape(prefix)
    return {
        p + r"embed_tokens\.weight": 1,
        p + r"layers\.\d+\.self_attn\.o_proj\.weight": 0,
        p + r"layers\.\d+\.mlp\.down_proj\.weight": 0,
    }


def in_layers(prefix: str, writers: dict[str, int]) -> dict[str, int]:
    """Patterns of per-layer writers (given relative to a layer) and the token embedding, under `prefix`."""
    p = re.escape(prefix)
    return {p + r"embed_tokens\.weight": 1, **{p + r"layers\.\d+\." + k: axis for k, axis in writers.items()}}


def nemotron_writers(moe_writer: str) -> dict[str, int]:
    """Nemotron-H under backbone.: the embedding, each mixer's output (Mamba, attention, MLP), and in MoE layers
    `moe_writer` beside the shared expert."""
    mixers = (r"out_proj\.weight", r"o_proj\.weight", r"down_proj\.weight", moe_writer)
    layer = r"backbone\.layers\.\d+\.mixer\."
    return {
        r"backbone\.embeddings\.weight": 1,
        **{layer + k: 0 for k in (*mixers, r"shared_experts\.down_proj\.weight")},
    }


# Routed experts as transformers saves them (one linear each) or as releases ship them (one fused tensor).
EXPERTS = {r"mlp\.experts\.\d+\.down_proj\.weight": 0, r"mlp\.experts\.down_proj": 1}
QWEN3_VL_MOE = {r"mlp\.experts\.down_proj": 1}  # as transformers saves them; as released, axis 2
HYBRID = {r"linear_attn\.out_proj\.weight": 0, r"self_attn\.o_proj\.weight": 0}

L = r"model\.layers\.\d+\."
EMBED = r"model\.embed_tokens\.weight"
O_PROJ = L + r"self_attn\.o_proj\.weight"
PLAIN = ("hook-exact", "hook-exact")
ORTHOGONAL = ("orthogonal-writes", "orthogonal-writes")
MOE = ("orthogonal-writes", "hook-exact")  # block hooks cannot rescale per expert
SANDWICH = {
    "self_attn.o_proj.weight": (("post_attention_layernorm.weight", 1.0),),
    "mlp.down_proj.weight": (("post_feedforward_layernorm.weight", 1.0),),
}
POST_NORM = {k: ((norm, 0.0),) for k, ((norm, _),) in SANDWICH.items()}
FAMILIES = {
    **{t: Family(llama_like(), PLAIN, 5) for t in ("llama", "mistral", "qwen2", "qwen3", "phi3")},
    "gemma": Family(llama_like(), PLAIN, 5, tie=True),
    "gemma2": Family(llama_like(), ORTHOGONAL, 5, SANDWICH, tie=True),
    "gemma3_text": Family(llama_like(), ORTHOGONAL, 5, SANDWICH),
    "gemma3": Family(llama_like("language_model.model."), ORTHOGONAL, 5, SANDWICH, tie=True),
    **{
        t: Family(llama_like(), PLAIN, 5)
        for t in ("ministral", "ministral3", "smollm3", "granite", "glm", "seed_oss", "arcee", "apertus")
        + ("ernie4_5", "hunyuan_v1_dense", "cohere", "cohere2")
    },
    # StableLM with sequential and with parallel attention and MLP (one input LayerNorm): llama's names either way
    **{t: Family(llama_like(), PLAIN, 5) for t in ("stablelm", "stablelm_parallel")},
    # biases on both writers; q/k/v and c_fc biases are not residual writers
    "starcoder2": Family(
        in_layers("model.", {r"self_attn\.o_proj\.(weight|bias)": 0, r"mlp\.c_proj\.(weight|bias)": 0}),
        PLAIN,
        1 + 2 * 4,
        tie=True,
    ),
    # parallel block: attention through self_attn.dense, MLP through mlp.fc2, with biases; lm_head.bias untouched
    "phi": Family(
        in_layers("model.", {r"self_attn\.dense\.(weight|bias)": 0, r"mlp\.fc2\.(weight|bias)": 0}), PLAIN, 1 + 2 * 4
    ),
    "mistral3": Family(llama_like("language_model.model."), PLAIN, 5),
    "qwen3_vl": Family(llama_like("model.language_model."), PLAIN, 5),
    "qwen2_5_vl": Family(llama_like("model."), PLAIN, 5),
    "olmo3": Family(llama_like(), ORTHOGONAL, 5, POST_NORM),
    "exaone4": Family(llama_like(), ORTHOGONAL, 5, POST_NORM),
    "glm4": Family(
        llama_like(),
        ORTHOGONAL,
        5,
        {
            "self_attn.o_proj.weight": (("post_self_attn_layernorm.weight", 0.0),),
            "mlp.down_proj.weight": (("post_mlp_layernorm.weight", 0.0),),
        },
    ),
    # 4 layers: three Gated DeltaNet layers, then full attention (the default layer_types); every MLP dense
    **{
        t: Family(in_layers(p, {**HYBRID, r"mlp\.down_proj\.weight": 0}), PLAIN, 1 + 3 + 1 + 4, layers=4)
        for t, p in (("qwen3_5_text", "model."), ("qwen3_5", "model.language_model."))
    },
    **{
        t: Family(
            in_layers(p, {**HYBRID, **EXPERTS, r"mlp\.shared_expert\.down_proj\.weight": 0}),
            MOE,
            1 + 3 + 1 + 4 * (3 + 1),
            layers=4,
        )
        for t, p in (("qwen3_5_moe_text", "model."), ("qwen3_5_moe", "model.language_model."), ("qwen3_next", "model."))
    },
    # mlp_only_layers=[1]: layer 1 has a dense MLP, the other three experts and a shared expert
    "qwen3_next_dense_layer": Family(
        in_layers("model.", {**HYBRID, **EXPERTS, r"mlp\.(shared_expert\.)?down_proj\.weight": 0}),
        MOE,
        1 + 3 + 1 + 1 + 3 * (3 + 1),
        layers=4,
    ),
    # first_k_dense_replace=1: layer 0 dense, layer 1 routed experts and shared experts
    **{
        t: Family(
            in_layers(
                "model.", {r"self_attn\.o_proj\.weight": 0, **EXPERTS, r"mlp\.(shared_experts\.)?down_proj\.weight": 0}
            ),
            MOE,
            1 + 2 + 1 + 3 + 1,
        )
        for t in ("deepseek_v2", "deepseek_v3", "glm4_moe", "dots1")
    },
    # MoE in layers 1 and 2 (moe_layer_start_index 1, moe_layer_end_index 2, interval 1), dense MLP in 0 and 3
    "ernie4_5_moe": Family(
        in_layers(
            "model.", {r"self_attn\.o_proj\.weight": 0, **EXPERTS, r"mlp\.(shared_experts\.)?down_proj\.weight": 0}
        ),
        MOE,
        1 + 4 + 2 + 2 * (3 + 1),
        tie=True,
        layers=4,
    ),
    # mlp_layer_types dense, sparse (transformers' default): layer 0 dense, layer 1 routed and shared experts
    "glm4_moe_lite": Family(
        in_layers(
            "model.", {r"self_attn\.o_proj\.weight": 0, **EXPERTS, r"mlp\.(shared_experts\.)?down_proj\.weight": 0}
        ),
        MOE,
        1 + 2 + 1 + 3 + 1,
    ),
    # 4 layers: convolution in 0 and 2 (with conv_bias), attention in 1 and 3; every layer a dense w2
    "lfm2": Family(
        in_layers(
            "model.",
            {r"conv\.out_proj\.(weight|bias)": 0, r"self_attn\.out_proj\.weight": 0, r"feed_forward\.w2\.weight": 0},
        ),
        PLAIN,
        1 + 2 * 2 + 2 + 4,
        tie=True,
        layers=4,
    ),
    # conv, attention, conv, attention; num_dense_layers 1: layer 0 dense w2, layers 1-3 three experts each
    "lfm2_moe": Family(
        in_layers(
            "model.",
            {
                r"conv\.out_proj\.weight": 0,
                r"self_attn\.out_proj\.weight": 0,
                r"feed_forward\.w2\.weight": 0,
                r"feed_forward\.experts\.\d+\.w2\.weight": 0,
            },
        ),
        MOE,
        1 + 4 + 1 + 3 * 3,
        tie=True,
        layers=4,
    ),
    # parallel Mamba-2 and attention in every layer, then the MLP; scalar multipliers
    "falcon_h1": Family(
        in_layers(
            "model.",
            {r"mamba\.out_proj\.weight": 0, r"self_attn\.o_proj\.weight": 0, r"feed_forward\.down_proj\.weight": 0},
        ),
        PLAIN,
        1 + 2 * 3,
    ),
    "olmoe": Family(in_layers("model.", {r"self_attn\.o_proj\.weight": 0, **EXPERTS}), MOE, 1 + 2 * (1 + 3)),
    # per-layer inputs (E2B/E4B): per_layer_projection under post_per_layer_input_norm; norms scale by γ (no +1)
    **{
        t: Family(
            in_layers(
                p, {r"self_attn\.o_proj\.weight": 0, r"mlp\.down_proj\.weight": 0, r"per_layer_projection\.weight": 0}
            ),
            ORTHOGONAL,
            1 + 2 * 3,
            {
                "self_attn.o_proj.weight": (("post_attention_layernorm.weight", 0.0),),
                "mlp.down_proj.weight": (("post_feedforward_layernorm.weight", 0.0),),
                "per_layer_projection.weight": (("post_per_layer_input_norm.weight", 0.0),),
            },
            tie=True,
        )
        for t, p in (("gemma4_text", "model."), ("gemma4", "model.language_model."))
    },
    # the MoE block beside the MLP: each branch through its own norm, then the sum through post_feedforward_layernorm
    "gemma4_moe": Family(
        in_layers("model.", {r"self_attn\.o_proj\.weight": 0, r"mlp\.down_proj\.weight": 0, r"experts\.down_proj": 1}),
        ORTHOGONAL,
        1 + 2 * 3,
        {
            "self_attn.o_proj.weight": (("post_attention_layernorm.weight", 0.0),),
            "mlp.down_proj.weight": (
                ("post_feedforward_layernorm_1.weight", 0.0),
                ("post_feedforward_layernorm.weight", 0.0),
            ),
            "experts.down_proj": (
                ("post_feedforward_layernorm_2.weight", 0.0),
                ("post_feedforward_layernorm.weight", 0.0),
            ),
        },
        tie=True,
    ),
    # interleave_moe_layer_step=2: layer 0 dense, layer 1 fused experts [experts, d_ff, d_model] and a shared expert
    **{
        t: Family(
            in_layers(
                p,
                {
                    r"self_attn\.o_proj\.weight": 0,
                    r"feed_forward\.(shared_expert\.)?down_proj\.weight": 0,
                    r"feed_forward\.experts\.down_proj": 2,
                },
            ),
            MOE,
            1 + 2 + 1 + 1 + 1,
        )
        for t, p in (("llama4_text", "model."), ("llama4", "language_model.model."))
    },
    # layer_types mamba, attention, mamba, attention; a shared MLP in every layer, fused experts when configured
    "granitemoehybrid": Family(
        in_layers(
            "model.",
            {
                r"mamba\.out_proj\.weight": 0,
                r"self_attn\.o_proj\.weight": 0,
                r"shared_mlp\.output_linear\.weight": 0,
                r"block_sparse_moe\.output_linear\.weight": 1,
            },
        ),
        MOE,
        1 + 2 + 2 + 4 + 4,
        layers=4,
    ),
    "granitemoehybrid_dense": Family(
        in_layers(
            "model.",
            {r"mamba\.out_proj\.weight": 0, r"self_attn\.o_proj\.weight": 0, r"shared_mlp\.output_linear\.weight": 0},
        ),
        PLAIN,
        1 + 2 + 2 + 4,
        layers=4,
    ),
    # one mixer per layer by layers_block_type (Mamba-2, MoE, attention, MLP), tensors under backbone. on disk
    "nemotron_h": Family(nemotron_writers(r"experts\.\d+\.down_proj\.weight"), MOE, 1 + 1 + (3 + 1) + 1 + 1, layers=4),
    # latent MoE (Nemotron 3 Super): experts work in a latent space, fc2_latent_proj writes into the stream
    "nemotron_h_latent": Family(nemotron_writers(r"fc2_latent_proj\.weight"), PLAIN, 1 + 1 + (1 + 1) + 1 + 1, layers=4),
    "olmo2": Family(llama_like(), ORTHOGONAL, 5, POST_NORM),
    # Mixtral's layout (PhiMoE, MiniMax-M2 too): per-expert w2 on disk, every layer MoE, no shared expert
    **{
        t: Family({EMBED: 1, O_PROJ: 0, L + r"block_sparse_moe\.experts\.\d+\.w2\.weight": 0}, MOE, 1 + 2 * (1 + 3))
        for t in ("mixtral", "phimoe", "minimax_m2")
    },
    "phimoe_bias": Family(
        {EMBED: 1, L + r"self_attn\.o_proj\.(weight|bias)": 0, L + r"block_sparse_moe\.experts\.\d+\.w2\.weight": 0},
        MOE,
        1 + 2 * (2 + 3),
    ),
    # fused experts in every layer (output_linear [experts, d_model, d_ff]), no shared MLP; scalar multipliers
    "granitemoe": Family({EMBED: 1, O_PROJ: 0, L + r"block_sparse_moe\.output_linear\.weight": 1}, MOE, 1 + 2 * 2),
    # every layer MoE: routed experts (intermediate_size) and the ungated shared MLP
    "hunyuan_v1_moe": Family(
        {
            EMBED: 1,
            O_PROJ: 0,
            L + r"mlp\.experts\.\d+\.down_proj\.weight": 0,
            L + r"mlp\.shared_mlp\.down_proj\.weight": 0,
        },
        MOE,
        1 + 2 * (1 + 3 + 1),
    ),
    "qwen2_moe": Family(
        {
            EMBED: 1,
            O_PROJ: 0,
            L + r"mlp\.experts\.\d+\.down_proj\.weight": 0,
            L + r"mlp\.shared_expert\.down_proj\.weight": 0,
        },
        MOE,
        1 + 2 * (1 + 3 + 1),
    ),
    "qwen3_moe": Family({EMBED: 1, O_PROJ: 0, L + r"mlp\.experts\.\d+\.down_proj\.weight": 0}, MOE, 1 + 2 * (1 + 3)),
    # as transformers saves Qwen3-VL-MoE: fused experts [experts, d_model, d_ff] (residual axis 1, read from the shape);
    # gate_up_proj reads the stream and stays untouched. The variant's layer 1 is in mlp_only_layers (a dense MLP).
    "qwen3_vl_moe": Family(
        in_layers("model.language_model.", {r"self_attn\.o_proj\.weight": 0, **QWEN3_VL_MOE}), MOE, 5
    ),
    "qwen3_vl_moe_dense_layer": Family(
        in_layers(
            "model.language_model.", {r"self_attn\.o_proj\.weight": 0, r"mlp\.down_proj\.weight": 0, **QWEN3_VL_MOE}
        ),
        MOE,
        1 + 2 + 1 + 1,
    ),
    "gpt_oss": Family(
        {
            EMBED: 1,
            O_PROJ: 0,
            L + r"self_attn\.o_proj\.bias": 0,
            L + r"mlp\.experts\.down_proj": 2,
            L + r"mlp\.experts\.down_proj_bias": 1,
        },
        MOE,
        1 + 2 * 4,
    ),
    "gpt2": Family(
        {
            r"transformer\.wte\.weight": 1,
            r"transformer\.wpe\.weight": 1,
            r"transformer\.h\.\d+\.(attn|mlp)\.c_proj\.weight": 1,
            r"transformer\.h\.\d+\.(attn|mlp)\.c_proj\.bias": 0,
        },
        PLAIN,
        2 + 2 * 4,
        tie=True,
    ),
}


def reference_edit(tensor: torch.Tensor, u: torch.Tensor, axis: int, mode: str, is_bias: bool) -> torch.Tensor:
    """float64 reference on any rank: move the residual axis last, edit every residual vector."""
    moved = tensor.double().movedim(axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    if is_bias or mode == "project":
        edited = reference_project(flat, u, 1)
    else:
        edited = reference_norm_preserving(flat, u, 1)
    return edited.reshape(moved.shape).movedim(-1, axis)


def written_direction(name: str, r: torch.Tensor, family: Family, source: dict) -> torch.Tensor:
    """û ∝ Π (offset + γ) ⊙ r̂ over the norms between this writer and the residual add (r̂ where there are none)."""
    layer_prefix = re.match(r"(.*\.(layers|h)\.\d+\.)", name)
    if layer_prefix is None:
        return r
    prefix = layer_prefix.group(1)
    norms = next((chain for suffix, chain in family.norms.items() if name == prefix + suffix), ())
    scale = torch.ones_like(r)
    for norm, offset in norms:
        scale = scale * (offset + source[prefix + norm].double())
    return unit(scale * r)


@pytest.mark.parametrize("mode", ["norm-preserving", "project"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family(tmp_path, chat_tokenizer, model_type, mode):
    family = FAMILIES[model_type]
    source_dir = build_tiny_model(
        tmp_path / "src", chat_tokenizer, model_type=model_type, tie=family.tie, random_norms=True, layers=family.layers
    )
    direction = torch.randn(32, generator=torch.Generator().manual_seed(11))
    r = unit(direction.double())
    result = apply_direction(Checkpoint(source_dir), direction, tmp_path / "out", mode=mode)
    source_ckpt, edited_ckpt = Checkpoint(source_dir), Checkpoint(tmp_path / "out")
    assert len(source_ckpt.shards) >= 2
    before = {n: source_ckpt.read(n) for n in source_ckpt.tensor_names}

    edited = set(result.edited_tensors)
    expected = {n for n in before if any(re.fullmatch(p, n) for p in family.writers)}
    assert edited == expected and len(edited) == family.count
    for name, tensor in before.items():
        after = edited_ckpt.read(name)
        if name not in edited:
            assert torch.equal(after, tensor), f"{name} changed"
            continue
        axis = next(a for p, a in family.writers.items() if re.fullmatch(p, name))
        u = written_direction(name, r, family, before)
        is_bias = name.endswith("bias")
        torch.testing.assert_close(after.double(), reference_edit(tensor, u, axis, mode, is_bias), atol=5e-5, rtol=1e-4)
        assert (after.double().movedim(axis, -1) @ u).abs().max() < 1e-5, f"{name} still writes along the direction"

    report = verify_checkpoint(tmp_path / "out", PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=3)
    assert report.passed, report.failures
    assert report.guarantee == family.guarantees[mode == "project"]
    assert report.metrics["direction_component"] < 1e-4
    if report.checks["hook_twin_equality"] == "enforced":
        assert report.metrics["max_abs_logit"] < 1e-3


def test_outside_the_table_fails_before_writing(tmp_path, chat_tokenizer):
    source_dir = build_tiny_model(tmp_path / "src", chat_tokenizer)
    checkpoint = Checkpoint(source_dir)
    checkpoint.config["model_type"] = "falcon"
    with pytest.raises(ArchitectureError, match=r"^model_type 'falcon' is not supported\. Closest supported family: "):
        apply_direction(checkpoint, torch.randn(32), tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_known_uncovered_types_say_why_in_one_line():
    with pytest.raises(ArchitectureError) as error:
        architecture_for({"model_type": "gemma3n"})
    message = str(error.value)
    assert "\n" not in message and "AltUp" in message and "Closest supported family: gemma4 (gemma4)" in message
    with pytest.raises(ArchitectureError, match=r"Closest supported family: deepseek_moe \(deepseek_v2, deepseek_v3"):
        architecture_for({"model_type": "kimi_k2"})
    with pytest.raises(ArchitectureError, match=r"'qwen4_moe' is not supported\. Closest supported family: qwen"):
        architecture_for({"model_type": "qwen4_moe"})


def test_layer_rules_select_writers_from_the_config():
    """Hybrid attention by layer_types, dense-then-MoE by first_k_dense_replace, and a checkpoint that holds a
    writer where its config says there is none is refused (the config and the weights disagree)."""
    arch = architecture_for({"model_type": "qwen3_5_text"})
    config = {"num_hidden_layers": 2, "hidden_size": 8, "layer_types": ["linear_attention", "full_attention"]}
    names = {"model.embed_tokens.weight", "model.layers.0.linear_attn.out_proj.weight"}
    names |= {"model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"}
    names |= {"model.layers.1.mlp.down_proj.weight"}
    assert {t.tensor for t in arch.targets(config, names)} == names
    with pytest.raises(ArchitectureError, match=r"holds model\.layers\.1\.linear_attn\.out_proj\.weight, in layers"):
        arch.targets(config, names | {"model.layers.1.linear_attn.out_proj.weight"})
    with pytest.raises(ArchitectureError, match=r"'layer_types' .* cannot say whether layer 1"):
        arch.targets({**config, "layer_types": ["linear_attention"]}, names)

    deepseek = architecture_for({"model_type": "deepseek_v3"})
    config = {"num_hidden_layers": 2, "hidden_size": 8, "first_k_dense_replace": 1, "n_routed_experts": 2}
    names = {"model.embed_tokens.weight", *(f"model.layers.{i}.self_attn.o_proj.weight" for i in range(2))}
    names |= {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.shared_experts.down_proj.weight"}
    names |= {f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(2)}
    assert {t.tensor for t in deepseek.targets(config, names)} == names
    with pytest.raises(ArchitectureError, match=r"missing model\.layers\.1\.mlp\.down_proj\.weight"):
        deepseek.targets({**config, "first_k_dense_replace": 2}, names)  # config says dense, weights say experts


def test_layer_rules_with_defaults_and_open_ends():
    """GLM-4.7-Flash's mlp_layer_types, when config.json lacks it, defaults to a first dense layer and sparse ones
    after it (a default list's last entry repeats); ERNIE 4.5's moe_layer_end_index -1 sets no upper bound."""
    glm = architecture_for({"model_type": "glm4_moe_lite"})
    config = {"num_hidden_layers": 3, "hidden_size": 8, "n_routed_experts": 1}
    sparse = [f"model.layers.{i}.mlp.{m}.down_proj.weight" for i in (1, 2) for m in ("experts.0", "shared_experts")]
    names = {"model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight", *sparse}
    names |= {f"model.layers.{i}.self_attn.o_proj.weight" for i in range(3)}
    assert {t.tensor for t in glm.targets(config, names)} == names
    with pytest.raises(ArchitectureError, match=r"missing model\.layers\.0\.mlp\.experts\.0\.down_proj\.weight"):
        glm.targets({**config, "mlp_layer_types": ["sparse", "sparse", "sparse"]}, names)
    with pytest.raises(ArchitectureError, match=r"'mlp_layer_types' .* cannot say whether layer 2"):
        glm.targets({**config, "mlp_layer_types": ["dense", "sparse"]}, names)  # a given list does not repeat

    ernie = architecture_for({"model_type": "ernie4_5_moe"})
    config = {"num_hidden_layers": 3, "hidden_size": 8, "moe_num_experts": 1, "moe_layer_start_index": 1}
    modules = {end: [m for _, m in ernie.writer_modules({**config, "moe_layer_end_index": end}, 3)] for end in (-1, 1)}
    dense, moe = ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"], "model.layers.2.mlp"
    assert modules[-1][0] == dense and moe in modules[-1][2] and "model.layers.2.mlp.down_proj" not in modules[-1][2]
    assert modules[1][2] == ["model.layers.2.self_attn.o_proj", "model.layers.2.mlp.down_proj"]
    rule = LayerRule("at_most", "end")
    assert [rule.holds(layer, {"end": -2}) for layer in range(2)] == [False, False]  # only -1 is open-ended


def test_lfm2_mixers_from_layer_types_or_full_attn_idxs():
    """LFM2's first releases list attention layers in full_attn_idxs instead of layer_types (which wins when both are
    given); with neither, every layer is attention, as transformers reads them."""
    lfm2 = architecture_for({"model_type": "lfm2"})

    def mixers(**keys):
        config = {"num_hidden_layers": 3, "hidden_size": 8, **keys}
        return [m[0].rsplit(".", 2)[1] for _, m in lfm2.writer_modules(config, 3)]

    assert mixers(full_attn_idxs=[1]) == ["conv", "self_attn", "conv"]
    assert mixers(layer_types=["full_attention", "conv", "conv"], full_attn_idxs=[1]) == ["self_attn", "conv", "conv"]
    assert mixers() == ["self_attn"] * 3


def test_in_list_defaults_must_be_lists():
    family = json.loads(resources.files("weight_edit.architectures").joinpath("glm4_moe_lite.json").read_text())
    family["writers"][1]["layers"]["default"] = "dense"
    with pytest.raises(ArchitectureError, match=r"'in_list' rule's 'default' must be a non-empty list"):
        _validate(family, "glm4_moe_lite.json")


def test_guarantee_follows_the_writers_the_config_has():
    """A Granite 4 hybrid without experts has no block hook: hook-exact in both modes; with experts it is not."""
    base = {"model_type": "granitemoehybrid", "num_hidden_layers": 2, "hidden_size": 8}
    base |= {"layer_types": ["mamba", "attention"]}
    assert architecture_for({**base, "num_local_experts": 0}).guarantee("norm-preserving") == "hook-exact"
    assert architecture_for({**base, "num_local_experts": 4}).guarantee("norm-preserving") == "orthogonal-writes"


def test_layer_count_and_types_from_a_pattern_string():
    """Nemotron-H as released: hybrid_override_pattern (M Mamba, E MoE, * attention, - MLP) sets both the layer
    count and each layer's mixer; num_hidden_layers, when present, is not consulted first."""
    config = {"model_type": "nemotron_h", "hidden_size": 8, "hybrid_override_pattern": "ME*-M", "n_routed_experts": 2}
    arch = architecture_for(config | {"num_hidden_layers": 52})
    assert arch.num_layers(config) == 5
    names = {"backbone.embeddings.weight"}
    names |= {f"backbone.layers.{i}.mixer.out_proj.weight" for i in (0, 4)}
    names |= {f"backbone.layers.1.mixer.{k}.down_proj.weight" for k in ("experts.0", "experts.1", "shared_experts")}
    names |= {"backbone.layers.2.mixer.o_proj.weight", "backbone.layers.3.mixer.down_proj.weight"}
    assert {t.tensor for t in arch.targets(config, names)} == names
    latent = config | {"moe_latent_size": 4}
    with pytest.raises(ArchitectureError, match=r"backbone\.layers\.1\.mixer\.fc2_latent_proj\.weight"):
        architecture_for(latent).targets(latent, names)


def test_missing_writer_names_the_tensor():
    arch = architecture_for({"model_type": "llama"})
    with pytest.raises(ArchitectureError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight"):
        arch.targets(
            {"num_hidden_layers": 1, "hidden_size": 8},
            {"model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"},
        )


def _rewrite_checkpoint(folder, tensors: dict[str, torch.Tensor]) -> None:
    """Replace a checkpoint's weights by `tensors` (another on-disk layout of the same model), in two shards."""
    import json

    from safetensors.torch import save_file

    checkpoint = Checkpoint(folder)
    for shard in checkpoint.shards:
        (folder / shard).unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(folder / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _rename_tensors(folder, renames: dict[str, str]) -> None:
    checkpoint = Checkpoint(folder)
    tensors = {}
    for name in sorted(checkpoint.tensor_names):
        new = next((new + name[len(old) :] for old, new in renames.items() if name.startswith(old)), name)
        tensors[new] = checkpoint.read(name)
    _rewrite_checkpoint(folder, tensors)


@pytest.mark.parametrize("mode", ["norm-preserving", "project"])
def test_fused_experts_as_released(tmp_path, chat_tokenizer, mode):
    """Qwen3.5 MoE as released stores each layer's experts fused (mlp.experts.down_proj [experts, d_model, d_ff]):
    the table's fused alternative edits them along axis 1, and the output loads and passes verify."""
    from transformers import AutoModelForImageTextToText

    source_dir = build_tiny_model(
        tmp_path / "src", chat_tokenizer, model_type="qwen3_5_moe", layers=4, random_norms=True
    )
    model = AutoModelForImageTextToText.from_pretrained(source_dir)
    _rewrite_checkpoint(source_dir, {k: v.detach() for k, v in model.state_dict().items()})  # in memory = as released
    source = Checkpoint(source_dir)
    fused = "model.language_model.layers.1.mlp.experts.down_proj"
    assert fused in source.tensor_names and source.info(fused).shape == (3, 32, 16)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(4))
    result = apply_direction(source, direction, tmp_path / "out", mode=mode)
    experts = sorted(n for n in result.edited_tensors if "experts" in n)
    assert experts == [f"model.language_model.layers.{i}.mlp.experts.down_proj" for i in range(4)]
    r = unit(direction.double())
    expected = reference_edit(source.read(fused), r, 1, mode, False)
    torch.testing.assert_close(Checkpoint(tmp_path / "out").read(fused).double(), expected, atol=5e-5, rtol=1e-4)
    report = verify_checkpoint(tmp_path / "out", PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=3)
    assert report.passed, report.failures


@pytest.mark.parametrize("mode", ["norm-preserving", "project"])
def test_qwen3_vl_moe_experts_as_released(tmp_path, chat_tokenizer, mode):
    """Qwen3-VL-MoE as released stores the fused experts transposed from what transformers saves: down_proj
    [experts, d_ff, d_model] (and gate_up_proj [experts, d_model, 2 d_ff]), under the same names. The residual axis is
    read from the shape (2 here): the edit matches the float64 reference along it, keeps the layout, leaves
    gate_up_proj untouched, and the output loads with AutoModelForImageTextToText and passes verify."""
    from transformers import AutoModelForImageTextToText

    source_dir = build_tiny_model(
        tmp_path / "src", chat_tokenizer, model_type="qwen3_vl_moe", tie=False, random_norms=True
    )
    saved = Checkpoint(source_dir)
    tensors = {name: saved.read(name) for name in saved.tensor_names}
    fused = [name for name in tensors if name.endswith(("mlp.experts.down_proj", "mlp.experts.gate_up_proj"))]
    assert len(fused) == 4 and tensors["model.language_model.layers.0.mlp.experts.down_proj"].shape == (3, 32, 24)
    _rewrite_checkpoint(source_dir, tensors | {name: tensors[name].transpose(1, 2) for name in fused})
    source = Checkpoint(source_dir)
    downs = [f"model.language_model.layers.{i}.mlp.experts.down_proj" for i in range(2)]
    assert all(source.info(name).shape == (3, 24, 32) for name in downs)

    direction = torch.randn(32, generator=torch.Generator().manual_seed(5))
    result = apply_direction(source, direction, tmp_path / "out", mode=mode)
    out = Checkpoint(tmp_path / "out")
    attention = [f"model.language_model.layers.{i}.self_attn.o_proj.weight" for i in range(2)]
    assert sorted(result.edited_tensors) == sorted(["model.language_model.embed_tokens.weight", *attention, *downs])
    unchanged = source.tensor_names - set(result.edited_tensors)
    assert any(name.endswith("gate_up_proj") for name in unchanged)
    assert all(torch.equal(out.read(name), source.read(name)) for name in unchanged)
    r = unit(direction.double())
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    for layer, name in enumerate(downs):
        after = out.read(name)
        assert after.shape == (3, 24, 32)  # the released layout is kept
        torch.testing.assert_close(
            after.double(), reference_edit(source.read(name), r, 2, mode, False), atol=5e-5, rtol=1e-4
        )
        # transformers loads it transposed to [experts, d_model, d_ff]: the same edited values
        loaded = model.model.language_model.layers[layer].mlp.experts.down_proj
        assert torch.equal(loaded.detach(), after.transpose(1, 2))
        assert (loaded.double().movedim(1, -1) @ r).abs().max() < 1e-5
    report = verify_checkpoint(tmp_path / "out", PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=3)
    assert report.passed, report.failures
    assert report.guarantee == MOE[mode == "project"]


def test_residual_axis_read_from_the_shape():
    """Qwen3-VL-MoE's fused down_proj has one name and two layouts: its residual axis is the candidate of hidden-size
    length. d_ff == d_model (both candidates), a shape with neither, or no shapes at all are refused in one line."""
    arch = architecture_for({"model_type": "qwen3_vl_moe"})
    config = {"model_type": "qwen3_vl_moe", "text_config": {"num_hidden_layers": 1, "hidden_size": 8}}
    down = "model.language_model.layers.0.mlp.experts.down_proj"
    names = {"model.language_model.embed_tokens.weight", "model.language_model.layers.0.self_attn.o_proj.weight", down}

    def axis(shape):
        return next(t.residual_axis for t in arch.targets(config, names, shapes={down: shape}) if t.tensor == down)

    assert axis((4, 16, 8)) == 2 and axis((4, 8, 16)) == 1
    refusals = {
        (4, 8, 8): rf"^cannot tell which axis of '{down}' \[4, 8, 8\] holds residual vectors: axes 1 and 2 have the "
        r"hidden size 8, .*\(d_ff == d_model\)",
        (4, 16, 16): r"^checkpoint does not match the 'qwen3_vl_moe' architecture table: .* \[4, 16, 16\] has the "
        r"hidden size 8 on none of its candidate residual axes 1 or 2$",
        None: rf"^the 'qwen3_vl_moe' table reads the residual axis of '{down}' \(1 or 2\) from its shape",
    }
    for shape, message in refusals.items():
        with pytest.raises(ArchitectureError, match=message) as error:
            arch.targets(config, names, shapes=None if shape is None else {down: shape})
        assert "\n" not in str(error.value)
    # a missing tensor is reported as missing: no shape is needed to say so
    with pytest.raises(ArchitectureError, match=rf"missing {down}$"):
        arch.targets(config, names - {down})


def test_square_fused_experts_refused_before_writing(tmp_path, chat_tokenizer):
    """A checkpoint whose fused experts have d_ff == d_model cannot say which layout it is in: apply refuses it in one
    line, naming the tensor, and writes nothing."""
    source_dir = build_tiny_model(tmp_path / "src", chat_tokenizer, model_type="qwen3_vl_moe_square", tie=False)
    with pytest.raises(ArchitectureError) as error:
        apply_direction(Checkpoint(source_dir), torch.randn(32), tmp_path / "out")
    message = str(error.value)
    assert (
        "\n" not in message
        and "layers.0.mlp.experts.down_proj' [3, 32, 32]" in message
        and "d_ff == d_model" in message
    )
    assert not (tmp_path / "out").exists()


def test_residual_axis_candidates_are_validated():
    family = json.loads(resources.files("weight_edit.architectures").joinpath("qwen3_vl_moe.json").read_text())
    experts = family["writers"][2]
    assert experts["residual_axis_candidates"] == [1, 2] and "residual_axis" not in experts
    bad = {
        "a lone candidate": {"residual_axis_candidates": [2]},
        "an axis outside 0..2": {"residual_axis_candidates": [1, 3]},
        "a repeated axis": {"residual_axis_candidates": [1, 1]},
        "both fields": {"residual_axis_candidates": [1, 2], "residual_axis": 1},
    }
    for why, fields in bad.items():
        broken = json.loads(json.dumps(family))
        broken["writers"][2] = {k: v for k, v in experts.items() if k != "residual_axis_candidates"} | fields
        with pytest.raises(ArchitectureError, match=r"'residual_axis_candidates' takes the place of 'residual_axis'"):
            _validate(broken, f"qwen3_vl_moe.json ({why})")
    embedding = json.loads(json.dumps(family))
    embedding["embeddings"][0] = {k: v for k, v in embedding["embeddings"][0].items() if k != "residual_axis"}
    embedding["embeddings"][0]["residual_axis_candidates"] = [0, 1]
    with pytest.raises(ArchitectureError, match=r"an embedding's residual axis is fixed"):
        _validate(embedding, "qwen3_vl_moe.json")
    fused = json.loads(resources.files("weight_edit.architectures").joinpath("qwen3_moe.json").read_text())
    fused["writers"][2]["fused"] = {
        "tensor": fused["writers"][2]["fused"]["tensor"],
        "residual_axis_candidates": [0, 2],
    }
    with pytest.raises(ArchitectureError, match=r"fused: 'residual_axis_candidates' .* each one of 1, 2$"):
        _validate(fused, "qwen3_moe.json")
    fused["writers"][2]["fused"]["residual_axis_candidates"] = [1, 2]
    assert _validate(fused, "qwen3_moe.json")[0].writers[2]["fused"]["residual_axis_candidates"] == [1, 2]


@pytest.mark.parametrize("layout", ["language_model.model.", "model.language_model."])
def test_multimodal_wrapper(tmp_path, chat_tokenizer, layout):
    """Gemma 3 of 4B and up: the text decoder inside Gemma3ForConditionalGeneration, in either on-disk layout.
    The vision tower and projector are copied bit for bit, processor files are kept, the tied embedding is untied
    where that layout keeps its unembedding, and the output loads with the source's Auto class."""
    from transformers import AutoModelForImageTextToText

    source_dir = build_tiny_model(tmp_path / "src", chat_tokenizer, model_type="gemma3", tie=True, random_norms=True)
    if layout == "model.language_model.":  # the layout transformers keeps in memory, used by newer uploads
        _rename_tensors(
            source_dir,
            {
                "language_model.model.": "model.language_model.",
                "vision_tower.": "model.vision_tower.",
                "multi_modal_projector.": "model.multi_modal_projector.",
            },
        )
    processor_file = source_dir / "preprocessor_config.json"
    processor_file.write_text('{"image_processor_type": "Gemma3ImageProcessor", "size": {"height": 28, "width": 28}}\n')
    source = Checkpoint(source_dir)
    assert any(name.startswith(layout + "layers.") for name in source.tensor_names)
    result = apply_direction(source, torch.randn(32, generator=torch.Generator().manual_seed(3)), tmp_path / "out")
    out = Checkpoint(tmp_path / "out")

    unembedding = {"language_model.model.": "language_model.lm_head.weight", "model.language_model.": "lm_head.weight"}
    assert result.untied_embeddings and not out.tied_embeddings
    assert torch.equal(out.read(unembedding[layout]), source.read(layout + "embed_tokens.weight"))
    towers = [n for n in source.tensor_names if "vision_tower" in n or "multi_modal_projector" in n]
    assert towers and all(torch.equal(out.read(n), source.read(n)) for n in towers)
    assert not any("vision" in name or "projector" in name for name in result.edited_tensors)
    assert (tmp_path / "out" / "preprocessor_config.json").read_bytes() == processor_file.read_bytes()

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert torch.equal(model.lm_head.weight, source.read(layout + "embed_tokens.weight"))
    report = verify_checkpoint(tmp_path / "out", PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=3)
    assert report.passed, report.failures


def test_two_layouts_in_one_checkpoint_are_refused():
    arch = architecture_for({"model_type": "gemma3"})
    names = {"language_model.model.embed_tokens.weight", "model.language_model.embed_tokens.weight"}
    with pytest.raises(ArchitectureError, match="several 'gemma3' layouts"):
        arch.layout(names)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_in_bfloat16(tmp_path, chat_tokenizer, model_type):
    """Stored in bfloat16, every edited tensor is the float32 edit rounded once, and that float32 edit (run in the
    loaded model where its tensors are found) is the hook twin at float32 tolerance."""
    family = FAMILIES[model_type]
    source_dir = build_tiny_model(
        tmp_path / "src",
        chat_tokenizer,
        model_type=model_type,
        tie=family.tie,
        random_norms=True,
        layers=family.layers,
        dtype=torch.bfloat16,
    )
    direction = torch.randn(32, generator=torch.Generator().manual_seed(12))
    apply_direction(Checkpoint(source_dir), direction, tmp_path / "out", mode="norm-preserving")
    report = verify_checkpoint(tmp_path / "out", PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=3)
    assert report.passed, report.failures
    assert report.stored_dtype == "bfloat16"
    assert report.metrics["stored_vs_float32_edit_ulp"] <= 1.0
    if "exact_max_abs_logit" in report.metrics:
        assert report.metrics["exact_max_abs_logit"] < settings.VERIFY_TOLERANCES["float32"]["max_abs_logit"]
    else:
        assert "the float32 edit was not run" in report.checks["stored_tensors"]

"""Every family in the architecture table, on a tiny random model with at least two shards.

For each family and edit mode: every expected residual writer is edited exactly as a float64
reference computed here, nothing else changes, every write is orthogonal to r̂ (through the output
norm where there is one), and `verify` passes with the guarantee the family can honestly claim.
"""

import re

import pytest
import torch
from conftest import build_tiny_model
from test_edit_math import reference_norm_preserving, reference_project
from test_verify import PROMPTS

import settings
from weight_edit.architecture import ArchitectureError, architecture_for
from weight_edit.checkpoint import Checkpoint
from weight_edit.edit_math import unit
from weight_edit.verify import verify_checkpoint
from weight_edit.writer import apply_direction

L = r"model\.layers\.\d+\."
DOWN = L + r"mlp\.down_proj\.weight"
O_PROJ = L + r"self_attn\.o_proj\.weight"
EMBED = r"model\.embed_tokens\.weight"
# family: (edited-tensor patterns with their residual axis, output norm pattern per writer and its offset,
#          guarantee per mode, expected number of edited tensors for 2 layers)
FAMILIES = {
    "llama": ({EMBED: 1, O_PROJ: 0, DOWN: 0}, None, "hook-exact", "hook-exact", 5),
    "mistral": ({EMBED: 1, O_PROJ: 0, DOWN: 0}, None, "hook-exact", "hook-exact", 5),
    "qwen2": ({EMBED: 1, O_PROJ: 0, DOWN: 0}, None, "hook-exact", "hook-exact", 5),
    "qwen3": ({EMBED: 1, O_PROJ: 0, DOWN: 0}, None, "hook-exact", "hook-exact", 5),
    "phi3": ({EMBED: 1, O_PROJ: 0, DOWN: 0}, None, "hook-exact", "hook-exact", 5),
    "gemma": ({EMBED: 1, O_PROJ: 0, DOWN: 0}, None, "hook-exact", "hook-exact", 5),
    "gemma2": ({EMBED: 1, O_PROJ: 0, DOWN: 0}, 1.0, "orthogonal-writes", "orthogonal-writes", 5),
    "gemma3_text": ({EMBED: 1, O_PROJ: 0, DOWN: 0}, 1.0, "orthogonal-writes", "orthogonal-writes", 5),
    "olmo2": ({EMBED: 1, O_PROJ: 0, DOWN: 0}, 0.0, "orthogonal-writes", "orthogonal-writes", 5),
    "mixtral": (
        {EMBED: 1, O_PROJ: 0, L + r"block_sparse_moe\.experts\.\d+\.w2\.weight": 0},
        None,
        "orthogonal-writes",
        "hook-exact",
        1 + 2 * (1 + 3),
    ),
    "qwen2_moe": (
        {
            EMBED: 1,
            O_PROJ: 0,
            L + r"mlp\.experts\.\d+\.down_proj\.weight": 0,
            L + r"mlp\.shared_expert\.down_proj\.weight": 0,
        },
        None,
        "orthogonal-writes",
        "hook-exact",
        1 + 2 * (1 + 3 + 1),
    ),
    "qwen3_moe": (
        {EMBED: 1, O_PROJ: 0, L + r"mlp\.experts\.\d+\.down_proj\.weight": 0},
        None,
        "orthogonal-writes",
        "hook-exact",
        1 + 2 * (1 + 3),
    ),
    "gpt_oss": (
        {
            EMBED: 1,
            O_PROJ: 0,
            L + r"self_attn\.o_proj\.bias": 0,
            L + r"mlp\.experts\.down_proj": 2,
            L + r"mlp\.experts\.down_proj_bias": 1,
        },
        None,
        "orthogonal-writes",
        "hook-exact",
        1 + 2 * 4,
    ),
    "gpt2": (
        {
            r"transformer\.wte\.weight": 1,
            r"transformer\.wpe\.weight": 1,
            r"transformer\.h\.\d+\.(attn|mlp)\.c_proj\.weight": 1,
            r"transformer\.h\.\d+\.(attn|mlp)\.c_proj\.bias": 0,
        },
        None,
        "hook-exact",
        "hook-exact",
        2 + 2 * 4,
    ),
}
NORM_FOR = {"self_attn.o_proj": "post_attention_layernorm", "mlp.down_proj": "post_feedforward_layernorm"}


def reference_edit(tensor: torch.Tensor, u: torch.Tensor, axis: int, mode: str, is_bias: bool) -> torch.Tensor:
    """float64 reference on any rank: move the residual axis last, edit every residual vector."""
    moved = tensor.double().movedim(axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    if is_bias or mode == "project":
        edited = reference_project(flat, u, 1)
    else:
        edited = reference_norm_preserving(flat, u, 1)
    return edited.reshape(moved.shape).movedim(-1, axis)


def written_direction(name: str, r: torch.Tensor, offset: float | None, source: dict) -> torch.Tensor:
    if offset is None or "layers" not in name:
        return r
    layer = re.search(r"layers\.(\d+)\.", name).group(1)
    norm = next(n for key, n in NORM_FOR.items() if key in name)
    gamma = source[f"model.layers.{layer}.{norm}.weight"].double()
    return unit((offset + gamma) * r)


@pytest.mark.parametrize("mode", ["norm-preserving", "project"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family(tmp_path, chat_tokenizer, model_type, mode):
    patterns, offset, guarantee_np, guarantee_project, count = FAMILIES[model_type]
    source_dir = build_tiny_model(
        tmp_path / "src", chat_tokenizer, model_type=model_type, tie=model_type in ("gemma", "gemma2", "gpt2")
    )
    direction = torch.randn(32, generator=torch.Generator().manual_seed(11))
    r = unit(direction.double())
    result = apply_direction(Checkpoint(source_dir), direction, tmp_path / "out", mode=mode)
    source_ckpt, edited_ckpt = Checkpoint(source_dir), Checkpoint(tmp_path / "out")
    assert len(source_ckpt.shards) >= 2
    before = {n: source_ckpt.read(n) for n in source_ckpt.tensor_names}

    edited = set(result.edited_tensors)
    expected = {n for n in before if any(re.fullmatch(p, n) for p in patterns)}
    assert edited == expected and len(edited) == count
    for name, tensor in before.items():
        after = edited_ckpt.read(name)
        if name not in edited:
            assert torch.equal(after, tensor), f"{name} changed"
            continue
        axis = next(a for p, a in patterns.items() if re.fullmatch(p, name))
        u = written_direction(name, r, offset, before)
        is_bias = name.endswith("bias")
        torch.testing.assert_close(after.double(), reference_edit(tensor, u, axis, mode, is_bias), atol=5e-5, rtol=1e-4)
        assert (after.double().movedim(axis, -1) @ u).abs().max() < 1e-5, f"{name} still writes along the direction"

    report = verify_checkpoint(tmp_path / "out", PROMPTS, settings.VERIFY_TOLERANCES, new_tokens=3)
    assert report.passed, report.failures
    assert report.guarantee == (guarantee_np if mode == "norm-preserving" else guarantee_project)
    assert report.metrics["direction_component"] < 1e-4
    if report.checks["hook_twin_equality"] == "enforced":
        assert report.metrics["max_abs_logit"] < 1e-3


def test_outside_the_table_fails_before_writing(tmp_path, chat_tokenizer):
    source_dir = build_tiny_model(tmp_path / "src", chat_tokenizer)
    checkpoint = Checkpoint(source_dir)
    checkpoint.config["model_type"] = "falcon"
    with pytest.raises(ArchitectureError, match=r"supported families: .*gpt2 \(gpt2\).*llama \(llama, mistral"):
        apply_direction(checkpoint, torch.randn(32), tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_missing_writer_names_the_tensor():
    arch = architecture_for({"model_type": "llama"})
    with pytest.raises(ArchitectureError, match=r"model\.layers\.0\.self_attn\.o_proj\.weight"):
        arch.targets(
            {"num_hidden_layers": 1, "hidden_size": 8},
            {"model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"},
        )

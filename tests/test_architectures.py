"""Every family in the architecture table, on a tiny random model with at least two shards.

For each family and edit mode: every expected residual writer is edited exactly as a float64
reference computed here, nothing else changes, every write is orthogonal to r̂ (through the output
norm where there is one), and `verify` passes with the guarantee the family can honestly claim.
"""

import re
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class Family:
    """What this test expects of a family, written here independently of the JSON tables."""

    writers: dict[str, int]  # full-match pattern of each edited tensor → its residual axis
    guarantees: tuple[str, str]  # norm-preserving, project
    count: int  # edited tensors for 2 layers
    norms: dict[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)  # writer suffix → norms after it
    tie: bool = False


def llama_like(prefix: str = "model.") -> dict[str, int]:
    p = re.escape(prefix)
    return {
        p + r"embed_tokens\.weight": 1,
        p + r"layers\.\d+\.self_attn\.o_proj\.weight": 0,
        p + r"layers\.\d+\.mlp\.down_proj\.weight": 0,
    }


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
    "olmo2": Family(llama_like(), ORTHOGONAL, 5, POST_NORM),
    "mixtral": Family(
        {EMBED: 1, O_PROJ: 0, L + r"block_sparse_moe\.experts\.\d+\.w2\.weight": 0}, MOE, 1 + 2 * (1 + 3)
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
        tmp_path / "src", chat_tokenizer, model_type=model_type, tie=family.tie, random_norms=True
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


def _rename_tensors(folder, renames: dict[str, str]) -> None:
    """Rewrite a checkpoint's tensor names by prefix (another on-disk layout of the same model), in two shards."""
    import json

    from safetensors.torch import save_file

    checkpoint = Checkpoint(folder)
    tensors = {}
    for name in sorted(checkpoint.tensor_names):
        new = next((new + name[len(old) :] for old, new in renames.items() if name.startswith(old)), name)
        tensors[new] = checkpoint.read(name)
    for shard in checkpoint.shards:
        (folder / shard).unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


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

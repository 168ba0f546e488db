"""The projection as a PEFT LoRA adapter: factors against float64 references, and the source loaded
with the adapter through peft against the full checkpoint that `apply --mode project` writes."""

import json

import pytest
import torch
from conftest import build_tiny_model
from safetensors import safe_open

from weight_edit.adapter import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_PROVENANCE_FILE,
    ADAPTER_WEIGHTS_FILE,
    AdapterError,
    checked_basis,
    edited_bias,
    lora_factors,
    write_adapter,
)
from weight_edit.architecture import EditTarget, architecture_for
from weight_edit.checkpoint import Checkpoint
from weight_edit.edit_math import edit_tensor, unit
from weight_edit.hashing import tensor_sha256
from weight_edit.output_folder import OutputError
from weight_edit.writer import apply_direction

peft = pytest.importorskip("peft")
# Expected on tied sources: the adapter deliberately changes the embedding lookup only, not the tied unembedding.
pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
LOGIT_TOLERANCE = 1e-4


def random_orthonormal(k: int, d: int, seed: int) -> torch.Tensor:
    """k orthonormal rows [k, d] from the QR of a random matrix."""
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T.contiguous()


def reference_delta(weight: torch.Tensor, q: torch.Tensor, axis: int, strength: float) -> torch.Tensor:
    """float64 ΔM = −s Qᵀ Q M, M the weight with its residual axis first."""
    m = weight.double() if axis == 0 else weight.double().T
    q = q.double()
    return -strength * q.T @ (q @ m)


def read_adapter(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / ADAPTER_WEIGHTS_FILE), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.double()


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def load_with_adapter(source, adapter):
    return peft.PeftModel.from_pretrained(load(source), str(adapter)).eval()


def sample_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("k,strength", [(1, 1.0), (3, 0.6)])
@pytest.mark.parametrize("axis", [0, 1])
def test_factors_equal_float64_reference(k, strength, axis):
    weight = torch.randn(32, 50, generator=torch.Generator().manual_seed(1))
    if axis == 1:
        weight = weight.T.contiguous()  # [n, d]: rows are residual vectors (embedding, Conv1D)
    q = random_orthonormal(k, 32, seed=2)
    a, b = lora_factors(weight, q, axis, strength, max_elements=32 * 7)  # several float32 blocks
    assert a.dtype == b.dtype == torch.float32 and a.shape == (k, 50) and b.shape == (32, k)
    expected = reference_delta(weight, q, axis, strength)
    torch.testing.assert_close((b.double() @ a.double()), expected, atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(b.double() @ a.double()) == k


@pytest.mark.parametrize("axis", [0, 1])
def test_full_strength_equals_the_writers_projection(axis):
    weight = torch.randn(32, 40, generator=torch.Generator().manual_seed(3))
    weight = weight if axis == 0 else weight.T.contiguous()
    direction = torch.randn(32, generator=torch.Generator().manual_seed(4))
    a, b = lora_factors(weight, direction, axis)
    projected = edit_tensor(weight, direction, axis, "project")
    adapted = weight + (b @ a if axis == 0 else (b @ a).T)
    torch.testing.assert_close(adapted, projected, atol=1e-6, rtol=1e-5)


def test_edited_bias_equals_float64_reference():
    bias = torch.randn(32, generator=torch.Generator().manual_seed(6))
    q = random_orthonormal(2, 32, seed=7)
    expected = bias.double() - 0.4 * q.T @ (q @ bias.double())
    torch.testing.assert_close(edited_bias(bias, q, 0.4).double(), expected, atol=1e-6, rtol=1e-6)
    assert ((q @ edited_bias(bias, q).double()).abs() < 1e-6).all()


def test_basis_rows_must_be_orthonormal():
    with pytest.raises(ValueError, match="orthonormal"):
        checked_basis(torch.randn(2, 32, generator=torch.Generator().manual_seed(8)))
    assert torch.allclose(checked_basis(torch.full((4,), 2.0)), torch.full((1, 4), 0.5))


# case: (model_type, tied embeddings, residual biases; GPT-2's c_proj always has them)
CASES = {
    "llama-tied-biases": ("llama", True, True),
    "llama-untied-biases": ("llama", False, True),
    "qwen2-tied": ("qwen2", True, False),
    "qwen2-untied": ("qwen2", False, False),
    "gpt2-tied": ("gpt2", True, True),
    "gemma-tied": ("gemma", True, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_source_with_adapter_equals_full_projected_checkpoint(tmp_path, chat_tokenizer, case):
    model_type, tie, bias = CASES[case]
    source = build_tiny_model(tmp_path / "src", chat_tokenizer, model_type=model_type, tie=tie, bias=bias)
    assert Checkpoint(source).tied_embeddings is tie
    direction = torch.randn(32, generator=torch.Generator().manual_seed(11))
    full = apply_direction(Checkpoint(source), direction, tmp_path / "full", mode="project")
    result = write_adapter(Checkpoint(source), direction, tmp_path / "adapter")

    # What was written: exactly the edited modules, peft's on-disk names, rank 1, scaling 1.
    edited_weights = {n for n in full.edited_tensors if n.endswith("weight")}
    assert len(result.target_modules) == len(edited_weights)
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())
    assert config["r"] == config["lora_alpha"] == 1 and config["use_rslora"] is False
    assert config["target_modules"] == result.target_modules
    assert config["base_model_name_or_path"] == str(source.resolve())
    assert config["bias"] == ("lora_only" if bias else "none")
    assert config["fan_in_fan_out"] is (model_type == "gpt2")
    stored = read_adapter(tmp_path / "adapter")
    assert all(t.dtype == torch.float32 for t in stored.values())
    assert sum(key.endswith("base_layer.bias") for key in stored) == (4 if bias else 0)
    provenance = json.loads((tmp_path / "adapter" / ADAPTER_PROVENANCE_FILE).read_text())
    assert provenance["mode"] == "project" and provenance["guarantee"] == "hook-exact"
    assert provenance["direction"]["sha256"] == full.provenance["direction"]["sha256"]
    assert sorted(provenance["edited_tensors"]) == sorted(full.edited_tensors)

    adapted = load_with_adapter(source, tmp_path / "adapter")
    loaded = peft.get_peft_model_state_dict(adapted)  # what peft would save: same names, shapes and values
    assert sorted(loaded) == sorted(stored)
    for key, tensor in stored.items():
        assert torch.equal(loaded[key].float(), tensor), key

    ids = sample_ids(len(chat_tokenizer))
    edited_logits, adapted_logits = logits(load(tmp_path / "full"), ids), logits(adapted, ids)
    source_logits = logits(load(source), ids)
    assert (source_logits - edited_logits).abs().max() > 1e-2  # the edit is visible, so equality means something
    assert (adapted_logits - edited_logits).abs().max() < LOGIT_TOLERANCE
    if tie:  # the adapter changes the lookup only: the tied unembedding keeps the source matrix, as `apply` unties
        checkpoint = Checkpoint(source)
        arch = architecture_for(checkpoint.config)
        source_embedding = checkpoint.read(arch.token_embedding_tensor(checkpoint.tensor_names))
        assert torch.equal(adapted.get_output_embeddings().weight.detach(), source_embedding)


def test_per_layer_directions_equal_biprojected_checkpoint(tmp_path, chat_tokenizer):
    source = build_tiny_model(tmp_path / "src", chat_tokenizer, tie=False, bias=True)
    generator = torch.Generator().manual_seed(12)
    direction, layer_directions = torch.randn(32, generator=generator), torch.randn(2, 32, generator=generator)
    apply_direction(Checkpoint(source), direction, tmp_path / "full", mode="project", layer_directions=layer_directions)
    result = write_adapter(Checkpoint(source), direction, tmp_path / "adapter", layer_directions=layer_directions)
    assert result.provenance["guarantee"] == "hook-exact-per-layer"
    ids = sample_ids(len(chat_tokenizer))
    difference = logits(load(tmp_path / "full"), ids) - logits(load_with_adapter(source, tmp_path / "adapter"), ids)
    assert difference.abs().max() < LOGIT_TOLERANCE


def test_rank_k_per_layer_strength_merges_to_float64_reference(tmp_path, chat_tokenizer):
    """A rank-2 subspace with per-layer strengths: merged into the weights, every writer equals the reference."""
    source = build_tiny_model(tmp_path / "src", chat_tokenizer, tie=False, bias=True)
    q = random_orthonormal(2, 32, seed=13)
    strengths = {None: 0.9, 0: 0.5, 1: 1.25}

    def strength(target: EditTarget) -> float:
        return strengths[target.layer]

    result = write_adapter(Checkpoint(source), q.float(), tmp_path / "adapter", strength=strength)
    assert result.rank == 2 and result.provenance["guarantee"] is None
    assert result.provenance["strengths"]["model.layers.1.mlp.down_proj"] == 1.25
    merged = load_with_adapter(source, tmp_path / "adapter").merge_and_unload().state_dict()
    checkpoint = Checkpoint(source)
    arch = architecture_for(checkpoint.config)
    targets = {t.tensor: t for t in arch.targets(checkpoint.config, checkpoint.tensor_names)}
    for name in checkpoint.tensor_names:
        before = checkpoint.read(name)
        target = targets.get(name)
        if target is None:
            assert torch.equal(merged[name], before), f"{name} changed"
            continue
        s = strengths[target.layer]
        if target.is_bias:
            expected = before.double() - s * q.T @ (q @ before.double())
        else:
            delta = reference_delta(before, q, target.residual_axis, s)
            expected = before.double() + (delta if target.residual_axis == 0 else delta.T)
        torch.testing.assert_close(merged[name].double(), expected, atol=2e-5, rtol=1e-5)


def test_refusals_name_the_reason_and_write_nothing(tmp_path, chat_tokenizer):
    source = build_tiny_model(tmp_path / "src", chat_tokenizer)
    direction = torch.randn(32)
    with pytest.raises(AdapterError, match=r"--mode project.*full rank"):
        write_adapter(Checkpoint(source), direction, tmp_path / "out", mode="norm-preserving")
    for model_type, message in [
        ("mixtral", r"mixture-of-experts family 'mixtral'"),
        ("gpt_oss", r"mixture-of-experts family 'gpt_oss'"),
        ("gemma2", r"output-norm family 'gemma2' \(gemma2, gemma3_text\)"),
        ("olmo2", r"output-norm family 'olmo2'"),
    ]:
        checkpoint = Checkpoint(source)
        checkpoint.config["model_type"] = model_type
        with pytest.raises(AdapterError, match=message):
            write_adapter(checkpoint, direction, tmp_path / "out")
    with pytest.raises(ValueError, match="hidden size is 32"):
        write_adapter(Checkpoint(source), torch.randn(16), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_output_is_replaced_atomically_and_never_inside_the_source(tmp_path, chat_tokenizer):
    source = build_tiny_model(tmp_path / "src", chat_tokenizer)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(14))
    with pytest.raises(OutputError, match="must not be, contain, or lie inside"):
        write_adapter(Checkpoint(source), direction, source / "adapter")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("previous result")
    with pytest.raises(OutputError, match="not empty"):
        write_adapter(Checkpoint(source), direction, tmp_path / "out")
    write_adapter(Checkpoint(source), direction, tmp_path / "out", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no staging or retired folder left
    assert not (tmp_path / "out" / "old.txt").exists()
    provenance = json.loads((tmp_path / "out" / ADAPTER_PROVENANCE_FILE).read_text())
    assert provenance["direction"]["sha256"] == tensor_sha256(unit(direction))
    assert provenance["adapter"]["bytes"] == (tmp_path / "out" / ADAPTER_WEIGHTS_FILE).stat().st_size

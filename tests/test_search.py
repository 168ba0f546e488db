"""Strength search: the kernel by hand, the Pareto front, the choice rule, determinism, and that what
the search scored (hooks on the unedited model) is exactly what `apply` writes at the chosen strengths."""

import json

import pytest
import torch
from conftest import build_tiny_model

import settings
from weight_edit.activations import kl_divergence, last_logits, tokenized_batches
from weight_edit.architecture import architecture_for
from weight_edit.chat import post_instruction_ids, refusal_token_ids
from weight_edit.checkpoint import Checkpoint
from weight_edit.dataset import interleave_areas, load_dataset, split_dataset
from weight_edit.direction_file import load_direction, save_direction
from weight_edit.edit_plan import EditPlan, PlanError, Strengths
from weight_edit.hooks import weight_equivalent_ablation
from weight_edit.models import load_model
from weight_edit.search import (
    GeneratedCounts,
    KernelParams,
    LayerKernel,
    SearchError,
    TrialRecord,
    choose,
    kernel_strengths,
    pareto_front,
    search_strengths,
    seed_kernels,
)
from weight_edit.writer import apply_direction

LAYERS = 3


def test_kernel_strengths_by_hand():
    params = KernelParams(
        attention=LayerKernel(peak_layer=2.0, peak=0.8, width=2.0, floor=0.2),
        mlp=LayerKernel(peak_layer=0.5, peak=1.0, width=1.0, floor=0.0),
        embedding=0.3,
    )
    strengths = kernel_strengths(params, 5)
    assert strengths.embedding == 0.3
    # attention: distances 2, 1, 0, 1, 2 over width 2 → 0.2 + 0.6 × (0, ½, 1, ½, 0)
    assert strengths.attention == pytest.approx((0.2, 0.5, 0.8, 0.5, 0.2), abs=1e-12)
    # mlp: distances 0.5, 0.5, 1.5, 2.5, 3.5 over width 1 → (½, ½, 0, 0, 0)
    assert strengths.mlp == pytest.approx((0.5, 0.5, 0.0, 0.0, 0.0), abs=1e-12)


def test_full_kernel_is_exactly_the_foundation_edit():
    name, full = seed_kernels(LAYERS, centre_layer=1)[0]
    assert name == "full"
    strengths = kernel_strengths(full, LAYERS)
    assert strengths == Strengths.full(LAYERS) and strengths.is_full


@pytest.mark.parametrize(
    "kernel,message",
    [
        (LayerKernel(1.0, 0.5, 1.0, 0.6), "floor"),
        (LayerKernel(1.0, 1.7, 1.0, 0.0), "peak strength"),
        (LayerKernel(1.0, 1.0, 0.0, 0.0), "width"),
        (LayerKernel(3.5, 1.0, 1.0, 0.0), "peak layer"),
    ],
)
def test_kernel_parameters_outside_their_ranges_are_refused(kernel, message):
    good = LayerKernel(0.0, 1.0, 1.0, 0.0)
    with pytest.raises(PlanError, match=message):
        kernel_strengths(KernelParams(kernel, good, 0.5), 4)


def test_pareto_front_by_hand():
    points = [(0.5, 0.1), (0.2, 0.3), (0.6, 0.2), (0.2, 0.3), (0.1, 0.9), (0.3, 0.3), (float("nan"), 0.0)]
    # (0.6, 0.2) is dominated by (0.5, 0.1); (0.3, 0.3) by (0.2, 0.3); duplicates both stay; NaN never qualifies
    assert pareto_front(points) == [0, 1, 3, 4]


def record(number: int, kl: float, unsafe: int, safe: int, prob: float = 0.1) -> TrialRecord:
    full = Strengths.full(2)
    kernel = seed_kernels(2)[0][1]
    return TrialRecord(number, "sampled", kernel, full, 0.0, prob, kl, generated=GeneratedCounts(unsafe, 50, safe, 50))


def test_choice_rule_takes_the_lowest_kl_that_qualifies():
    trials = [
        record(0, kl=0.01, unsafe=5, safe=0),  # lowest KL but 10 % refusals
        record(1, kl=0.05, unsafe=1, safe=3),  # 2 % refusals, but more safe refusals than the source's 2
        record(2, kl=0.08, unsafe=1, safe=2),  # qualifies
        record(3, kl=0.20, unsafe=0, safe=0),  # qualifies, higher KL
    ]
    assert choose(trials, [0, 1, 2, 3], baseline_safe_refused=2, max_refusal=0.02) == (2, False)
    assert [t.qualifies for t in trials] == [False, False, True, True]
    # none qualifies: the lowest generated refusal rate, flagged as a fallback
    assert choose(trials, [0, 1, 2], baseline_safe_refused=0, max_refusal=0.02) == (2, True)
    with pytest.raises(SearchError, match="finite"):  # every trial overflowed: an error, not a guess
        choose(trials, [], baseline_safe_refused=0, max_refusal=0.02)


def test_an_edit_whose_safe_answers_loop_more_than_the_source_does_not_qualify():
    """Degeneration is a constraint, not only a column: the lowest-KL member loops on 4 safe answers where the
    source loops on 1, so the next one is chosen."""
    trials = [record(0, kl=0.01, unsafe=0, safe=0), record(1, kl=0.03, unsafe=0, safe=0)]
    trials[0].generated.safe_degenerate, trials[1].generated.safe_degenerate = 4, 1
    rule = dict(baseline_safe_refused=0, max_refusal=0.02)
    assert choose(trials, [0, 1], **rule, baseline_safe_degenerate=1) == (1, False)
    assert [t.qualifies for t in trials] == [False, True]
    assert choose(trials, [0, 1], **rule) == (0, False)  # not counted (None): the rule is the old one


def test_front_generation_counts_looping_safe_answers(chat_tokenizer):
    """The front's generator counts a safe answer that loops (24 tokens of one repeated phrase) as degenerate."""
    from test_evaluate import ScriptedModel

    from weight_edit.activations import tokenized_batches
    from weight_edit.search import _generated_refusals

    texts = ["How do tides work?", "Tell me a joke."]
    batches = tokenized_batches(chat_tokenizer, texts, 2, torch.device("cpu"), None)
    looping = ScriptedModel(chat_tokenizer, "the tide and " * 20, end=False)
    plain = ScriptedModel(chat_tokenizer, "Tides follow the moon, twice a day, as the oceans bulge toward it.")
    assert _generated_refusals(looping, chat_tokenizer, batches, ("sorry",), 24, lambda n: None) == (0, 2)
    assert _generated_refusals(plain, chat_tokenizer, batches, ("sorry",), 24, lambda n: None) == (0, 0)


@pytest.fixture(scope="module")
def prompts():
    data = load_dataset(settings.DEFAULT_DATASET)
    split = split_dataset(data, settings.SEED, settings.HELD_OUT_AREAS, settings.VALIDATION_FRACTION)
    return {
        label: [p.text for p in interleave_areas(split.select("validation", label), 6, settings.SEED)]
        for label in ("unsafe", "safe")
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory, chat_tokenizer):
    return build_tiny_model(tmp_path_factory.mktemp("search") / "src", chat_tokenizer, bias=True, layers=LAYERS)


def run_search(folder, prompts, mode="norm-preserving", seed=7, max_refusal=0.02, n_trials=6, **options):
    model, tokenizer = load_model(folder, dtype="float32")
    checkpoint = Checkpoint(folder)
    arch = architecture_for(checkpoint.config)
    targets = arch.targets(checkpoint.config, checkpoint.tensor_names)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(3))
    return search_strengths(
        model,
        tokenizer,
        arch,
        targets,
        LAYERS,
        direction,
        prompts["unsafe"],
        prompts["safe"],
        mode=mode,
        n_trials=n_trials,
        seed=seed,
        batch_size=4,
        max_refusal=max_refusal,
        centre_layer=1,
        max_new_tokens=4,
        **options,
    ), direction


@pytest.fixture(scope="module")
def searched(source, prompts):
    return run_search(source, prompts)


def test_search_is_deterministic_for_a_seed(source, prompts, searched):
    first, _ = searched
    second, _ = run_search(source, prompts)
    assert [t.as_dict() for t in first.trials] == [t.as_dict() for t in second.trials]
    assert first.chosen_trial == second.chosen_trial and first.strengths == second.strengths
    other, _ = run_search(source, prompts, seed=8)
    sampled = [t.number for t in first.trials if t.source == "sampled"]
    assert sampled and any(first.trials[i].params != other.trials[i].params for i in sampled)


def test_trials_front_and_reference(searched):
    result, _ = searched
    assert len(result.trials) == result.n_trials == 6
    reference = result.trials[0]
    assert reference.source == "seed:full" and reference.strengths.is_full and reference.generated is not None
    seeds = seed_kernels(LAYERS, 1)
    assert len(seeds) == 5 and seeds[-1][1].attention.peak == 1.5  # the overshooting seed, at max_strength
    assert [t.source for t in result.trials[:5]] == [f"seed:{name}" for name, _ in seeds]
    points = [(t.refusal_prob, t.kl) for t in result.trials]
    front = set(result.front)
    assert front and {t.number for t in result.trials if t.on_front} == front
    for i in front:  # nothing dominates a front member
        assert not any(
            q[0] <= points[i][0] and q[1] <= points[i][1] and q != points[i] for j, q in enumerate(points) if j != i
        )
    for i in set(range(len(points))) - front:  # every other trial is dominated by a front member
        assert any(points[j][0] <= points[i][0] and points[j][1] <= points[i][1] for j in front)
    for t in result.trials:
        assert 0 <= t.refusal_score <= 1 and 0 <= t.refusal_prob <= 1 and t.kl >= -1e-12
        assert t.strengths == kernel_strengths(t.params, LAYERS)
    assert result.trials_per_second > 0 and result.wall_seconds >= result.trial_seconds


def test_chosen_trial_satisfies_the_rule(searched):
    result, _ = searched
    chosen = result.chosen()
    assert chosen.chosen and sum(t.chosen for t in result.trials) == 1 and chosen.on_front
    baseline_safe = result.baseline["generated"]["safe_refused"]
    qualified = [
        t
        for t in result.trials
        if t.on_front
        and t.generated is not None
        and t.generated.unsafe_rate <= result.max_refusal
        and t.generated.safe_refused is not None
        and t.generated.safe_refused <= baseline_safe
    ]
    if result.fallback:
        assert not qualified and "no front trial met the rule" in result.rule
    else:
        assert chosen in qualified and chosen.kl == min(t.kl for t in qualified)
    assert chosen.qualifies is (not result.fallback)


def test_fallback_is_flagged_when_nothing_qualifies(source, prompts):
    result, _ = run_search(source, prompts, max_refusal=-1.0, n_trials=4)
    assert result.fallback and "no front trial met the rule" in result.rule
    assert result.as_dict()["fallback"] is True
    generated = [t for t in result.trials if t.on_front]
    assert result.chosen().generated.unsafe_rate == min(t.generated.unsafe_rate for t in generated)


@pytest.mark.parametrize("mode", ["norm-preserving", "project"])
def test_what_was_scored_is_what_apply_writes(tmp_path, source, prompts, searched, mode):
    result, direction = searched if mode == "norm-preserving" else run_search(source, prompts, mode=mode)
    stored = json.loads(json.dumps(result.as_dict(), allow_nan=False))  # strict JSON, as the sidecar stores it
    assert stored["mode"] == mode and stored["plan"] == {"rank": 1, "per_layer_directions": False}
    partial = next(t for t in result.trials if not t.strengths.is_full)
    for trial in {result.chosen_trial, partial.number}:
        strengths = Strengths.from_dict(stored["trials"][trial]["strengths"], LAYERS)
        if trial == result.chosen_trial:
            assert Strengths.from_dict(stored["chosen"]["strengths"], LAYERS) == strengths == result.strengths
        out = tmp_path / f"edited-{trial}"
        apply_direction(Checkpoint(source), direction, out, mode=mode, strengths=strengths)
        model, tokenizer = load_model(source, dtype="float32")
        edited, _ = load_model(out, dtype="float32")
        texts = prompts["unsafe"] + prompts["safe"]
        batches = tokenized_batches(tokenizer, texts, 4, "cpu", post_instruction_ids(tokenizer))
        checkpoint = Checkpoint(source)
        arch = architecture_for(checkpoint.config)
        plan = EditPlan.build(direction, LAYERS, strengths=strengths)
        with weight_equivalent_ablation(model, arch.targets(checkpoint.config, checkpoint.tensor_names), plan, mode):
            hooked = last_logits(model, batches)
        written = last_logits(edited, batches)
        assert (hooked - written).abs().max() < 1e-4
        # the scores recorded for the trial are those of the written checkpoint
        unedited = last_logits(model, batches)
        n = len(prompts["unsafe"])
        kl = float(kl_divergence(unedited[n:], written[n:]).mean())
        ids = refusal_token_ids(tokenizer, settings.REFUSAL_PREFIXES)
        prob = float(torch.softmax(written[:n].double(), dim=-1)[:, ids].sum(-1).mean())
        assert kl == pytest.approx(result.trials[trial].kl, abs=1e-5)
        assert prob == pytest.approx(result.trials[trial].refusal_prob, abs=1e-5)


def test_families_without_partial_strengths_are_refused_before_any_work():
    with pytest.raises(PlanError, match="not supported for the 'gemma2' family"):
        search_strengths(None, None, architecture_for({"model_type": "gemma2"}), [], 2, torch.ones(4), ["a"], ["b"])
    with pytest.raises(PlanError, match="use --mode project"):
        search_strengths(None, None, architecture_for({"model_type": "mixtral"}), [], 2, torch.ones(4), ["a"], ["b"])


def test_search_round_trips_through_the_direction_sidecar(tmp_path, searched):
    result, direction = searched
    save_direction(tmp_path / "direction.safetensors", direction, {"layer": 1, "search": result.as_dict()})
    _, sidecar = load_direction(tmp_path / "direction.safetensors")  # the self-hash still holds
    assert Strengths.from_dict(sidecar["search"]["chosen"]["strengths"], LAYERS) == result.strengths
    assert sidecar["search"]["chosen"]["trial"] == result.chosen_trial and sidecar["search"]["seed"] == 7


@pytest.mark.parametrize("markers,max_refusal", [(("e",), 0.5), (("th",), 0.34), (("e",), 0.02), ((), 0.02)])
def test_lazy_generation_chooses_as_generating_every_member(source, prompts, markers, max_refusal):
    """Markers that match some tiny-model completions make members fail the rule, so skipping bites."""
    options = dict(max_refusal=max_refusal, n_trials=10, markers=markers, max_generated=0)
    lazy, _ = run_search(source, prompts, **options)
    eager, _ = run_search(source, prompts, lazy=False, **options)
    assert (lazy.chosen_trial, lazy.fallback) == (eager.chosen_trial, eager.fallback)
    assert lazy.baseline == eager.baseline
    for mine, full in zip(lazy.trials, eager.trials, strict=True):
        if mine.generated is not None:
            assert mine.generated.unsafe_refused == full.generated.unsafe_refused
            assert mine.generated.safe_refused in (None, full.generated.safe_refused)
    assert lazy.chosen().generated == eager.chosen().generated
    assert all(t.generated is not None and t.generated.safe_refused is not None for t in eager.trials if t.on_front)

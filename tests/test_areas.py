"""Selective edits by policy area: --remove/--keep validation, the within-area split, the candidates' projection."""

import pytest
import torch

import settings
from weight_edit.areas import AreaError, area_texts, parse_area_choice, project_off_span, within_area_split
from weight_edit.dataset import load_dataset

AREAS = ["cybercrime", "hate_speech", "misinformation", "weapons"]


def test_no_option_means_the_default_edit():
    assert parse_area_choice(None, None, AREAS) is None


def test_a_choice_is_sorted_and_recorded():
    choice = parse_area_choice("misinformation, hate_speech", "weapons", AREAS)
    assert choice.remove == ("hate_speech", "misinformation") and choice.keep == ("weapons",)
    assert choice.as_dict() == {
        "remove": ["hate_speech", "misinformation"],
        "keep": ["weapons"],
        "method": "orthogonal",
    }
    assert parse_area_choice("weapons", None, AREAS).keep == ()


@pytest.mark.parametrize(
    "remove,keep,message",
    [
        ("weapon", None, "no area 'weapon' (did you mean weapons?)"),
        ("weapons", "cybercrim", "--keep: the dataset has no area 'cybercrim' (did you mean cybercrime?)"),
        ("weapons,hate_speech", "weapons", "weapons named in both --remove and --keep"),
        ("", None, "none empty"),
        ("weapons,,hate_speech", None, "none empty"),
        ("weapons", "", "none empty"),
        (None, "weapons", "--keep needs --remove"),
        ("weapons,weapons", None, "--remove names weapons twice"),
    ],
)
def test_bad_choices_are_refused_in_one_line(remove, keep, message):
    with pytest.raises(AreaError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        parse_area_choice(remove, keep, AREAS)


def within(seed: int):
    data = load_dataset(settings.DEFAULT_DATASET)
    fractions = (settings.HARMLESS_VALIDATION_FRACTION, settings.HARMLESS_HELD_OUT_FRACTION)
    return data, within_area_split(data, ("weapons", "hate_speech"), seed, 0.25, 0.25, fractions)


def test_within_area_split_is_disjoint_complete_and_seeded():
    data, split = within(7)
    parts = {name: {p.row for p in getattr(split, name)} for name in ("train", "validation", "held_out")}
    assert not (parts["train"] & parts["validation"]) and not (parts["train"] & parts["held_out"])
    assert not (parts["validation"] & parts["held_out"])
    for area in ("weapons", "hate_speech"):
        for label in ("safe", "unsafe"):
            rows = {p.row for p in data.prompts if p.category == area and p.label == label}
            assert rows <= parts["train"] | parts["validation"] | parts["held_out"]
            held = [p for p in split.held_out if p.category == area and p.label == label]
            assert len(held) == round(len(rows) * 0.25)
    assert {p.category for p in split.train if p.label != "harmless"} == {"weapons", "hate_speech"}
    assert split.design == "within-area" and split.as_dict()["design"] == "within-area"
    assert within(7)[1] == split  # the same seed, the same split
    assert {p.row for p in within(8)[1].held_out} != parts["held_out"]


def test_area_texts_keep_to_the_named_areas_and_all_harmless_prompts():
    _, split = within(7)
    assert area_texts(split, "train", "unsafe", ("weapons",)) == [
        p.text for p in split.prompts("train", "unsafe") if p.category == "weapons"
    ]
    assert len(area_texts(split, "train", "harmless", ("weapons",))) == len(split.select("train", "harmless"))
    assert len(area_texts(split, "validation", "unsafe", ("weapons", "hate_speech"), limit=3)) == 3


def test_a_split_needs_three_prompts_per_area_and_label(tmp_path):
    path = tmp_path / "small.csv"
    path.write_text("prompt,label,category\nDo a bad thing,unsafe,a\nAsk a good thing,safe,a\n")
    with pytest.raises(AreaError, match="area 'a' has 1 safe prompts"):
        within_area_split(load_dataset(path), ("a",), 0, 0.25, 0.25, (0.25, 0.25))


def test_project_off_span_against_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(3, 2, 16, generator=g)
    others = torch.randn(2, 3, 2, 16, generator=g)
    others[1, 0, 0] = 2 * others[0, 0, 0]  # a dependent pair at one position adds nothing
    projected = project_off_span(vectors, others)
    for i in range(3):
        for j in range(2):
            basis = others[:, i, j].double().T  # [d, k]
            reference = vectors[i, j].double() - basis @ torch.linalg.lstsq(basis, vectors[i, j].double()).solution
            torch.testing.assert_close(projected[i, j].double(), reference, atol=1e-5, rtol=1e-5)
            assert (others[:, i, j].double() @ projected[i, j].double()).abs().max() < 1e-4
    assert torch.equal(project_off_span(vectors, others[:0]), vectors)


def test_evaluate_rebuilds_the_fit_split_and_refuses_another_dataset(tmp_path):
    from weight_edit.areas import roles, split_for_edit

    data = load_dataset(settings.DEFAULT_DATASET)
    record = {"remove": ["weapons"], "keep": ["hate_speech"], "seed": 3, "dataset_sha256": data.sha256}
    fractions = (settings.HARMLESS_VALIDATION_FRACTION, settings.HARMLESS_HELD_OUT_FRACTION)
    expected = within_area_split(
        data,
        ("weapons", "hate_speech"),
        3,
        settings.AREA_VALIDATION_FRACTION,
        settings.AREA_HELD_OUT_FRACTION,
        fractions,
    )
    assert split_for_edit(data, record, settings.DEFAULT_DATASET) == expected
    assert roles(record) == {"weapons": "removed", "hate_speech": "kept"}
    with pytest.raises(AreaError, match="not the dataset the selective edit was fit on"):
        split_for_edit(data, {**record, "dataset_sha256": "0" * 64}, tmp_path / "other.csv")

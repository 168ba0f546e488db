"""The embedded dataset's rules, the area-disjoint split, and the loader's error messages."""

from collections import Counter

import pytest

import settings
from weight_edit.dataset import DatasetError, interleave_areas, load_dataset, split_dataset


def test_embedded_dataset_meets_the_rules():
    data = load_dataset(settings.DEFAULT_DATASET)
    counts = Counter((p.category, p.label) for p in data.prompts)
    assert len(data.categories) >= 12
    for area in data.categories:
        assert counts[(area, "unsafe")] >= 24 and counts[(area, "safe")] >= 24, area
    assert all("\n" not in p.text for p in data.prompts)
    harmless = data.harmless
    assert len(harmless) >= 300
    assert not {p.category for p in harmless} & set(data.categories)
    assert len({p.category for p in harmless}) >= 10  # broad: many kinds of task
    lengths = [len(p.text.split()) for p in harmless]
    assert min(lengths) <= 6 and max(lengths) >= 40  # short and long requests


def test_split_is_area_disjoint_and_deterministic():
    data = load_dataset(settings.DEFAULT_DATASET)
    a = split_dataset(data, 1, 4, 0.25)
    b = split_dataset(data, 1, 4, 0.25)
    c = split_dataset(data, 2, 4, 0.25)
    assert a == b
    assert a.held_out_areas != c.held_out_areas or a.train != c.train
    assert not set(a.fit_areas) & set(a.held_out_areas)
    assert len(a.held_out_areas) == 4
    fit_prompts = {p.category for p in a.train + a.validation if p.label != "harmless"}
    assert fit_prompts == set(a.fit_areas)
    assert {p.category for p in a.held_out if p.label != "harmless"} == set(a.held_out_areas)
    parts = [{p.text for p in part} for part in (a.train, a.validation, a.held_out)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert len(a.train) + len(a.validation) + len(a.held_out) == len(data.prompts)
    harmless = [a.select(part, "harmless") for part in ("train", "validation", "held_out")]
    assert all(harmless) and sum(map(len, harmless)) == len(data.harmless)
    assert len(harmless[1]) == round(0.25 * len(data.harmless)) == len(harmless[2])
    for row in a.table():
        if row["role"] == "fit":
            assert row["validation_safe"] > 0 and row["validation_unsafe"] > 0 and row["held_out_safe"] == 0
        else:
            assert row["train_safe"] == row["validation_unsafe"] == 0


def test_interleave_covers_every_area():
    data = load_dataset(settings.DEFAULT_DATASET)
    picked = interleave_areas(list(data.prompts), 14, seed=0)
    assert len({p.category for p in picked}) == 14


def write(tmp_path, text: str, name: str = "d.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


GOOD = "prompt,label,category\nHow do locks work?,safe,theft\nPick my neighbour's lock,unsafe,theft\n"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("prompt,label\nx,safe\n", "missing column(s) category"),
        ("prompt,label,category,extra\nx,safe,a,b\n", "unexpected column(s) extra"),
        ("prompt,label,category\n", "no rows"),
        ("", "empty"),
        ("prompt,label,category\nHello there,harmful,a\n", "row 2, column 'label'"),
        ("prompt,label,category\n   ,safe,a\n", "row 2, column 'prompt' is empty"),
        (GOOD + "how do LOCKS work?,unsafe,theft\n", "row 4, column 'prompt' duplicates row 2"),
        ("prompt,label,category\nA question,safe,a\nAnother,safe,a\n", "category 'a' has only 'safe'"),
        ("prompt,label,category\nA question,safe,\n", "row 2, column 'category' is empty; only 'harmless'"),
        (GOOD + "Bake bread,harmless,theft\n", "row 4, column 'category': harmless row names the policy area 'theft'"),
        ("prompt,label,category\nHello there,harmful,a\n", "expected 'safe', 'unsafe' or 'harmless'"),
        ("prompt,label,category\nA,safe,a,extra\n", "row 2 has 4 fields"),
    ],
)
def test_malformed_csv_is_named(tmp_path, text, expected):
    with pytest.raises(DatasetError) as info:
        load_dataset(write(tmp_path, text))
    assert expected in str(info.value)
    assert "d.csv" in str(info.value)


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(GOOD.encode() + b"caf\xe9 question,safe,theft\n")
    with pytest.raises(DatasetError, match="line 4 is not valid UTF-8"):
        load_dataset(path)


def test_too_few_areas_for_the_split(tmp_path):
    data = load_dataset(write(tmp_path, GOOD))
    with pytest.raises(DatasetError, match="1 policy area, but"):
        split_dataset(data, 0, 4, 0.25)


def policy_csv(areas: int = 4) -> str:
    rows = [
        f"Question {i} about {a},safe,area{a}\nRequest {i} about {a},unsafe,area{a}"
        for a in range(areas)
        for i in range(4)
    ]
    return "prompt,label,category\n" + "\n".join(rows) + "\n"


def test_harmless_rows_need_no_category_and_leave_the_policy_split_unchanged(tmp_path):
    plain = load_dataset(write(tmp_path, policy_csv(), "plain.csv"))
    harmless_rows = "".join(f"Ordinary task number {i},harmless,{'' if i % 2 else 'writing'}\n" for i in range(12))
    mixed = load_dataset(write(tmp_path, policy_csv() + harmless_rows, "mixed.csv"))
    assert len(mixed.harmless) == 12 and mixed.categories == plain.categories
    a, b = split_dataset(plain, 3, 1, 0.25), split_dataset(mixed, 3, 1, 0.25)
    for part in ("train", "validation", "held_out"):
        for label in ("safe", "unsafe"):
            assert [p.text for p in a.select(part, label)] == [p.text for p in b.select(part, label)]
        assert not a.select(part, "harmless")
    parts = [b.select(part, "harmless") for part in ("train", "validation", "held_out")]
    assert [len(p) for p in parts] == [6, 3, 3]
    assert sorted(p.text for part in parts for p in part) == sorted(p.text for p in mixed.harmless)
    assert parts == [
        split_dataset(mixed, 3, 1, 0.25).select(part, "harmless") for part in ("train", "validation", "held_out")
    ]
    assert parts != [
        split_dataset(mixed, 4, 1, 0.25).select(part, "harmless") for part in ("train", "validation", "held_out")
    ]
    harmless_row = next(row for row in b.table() if row["role"] == "contrast")
    assert (harmless_row["train_harmless"], harmless_row["validation_harmless"], harmless_row["held_out_harmless"]) == (
        6,
        3,
        3,
    )
    assert b.as_dict()["counts"]["validation"]["harmless"] == 3

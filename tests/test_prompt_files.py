"""Reading public benchmark prompt files: each format, the spec parser, and the row named in every error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from weight_edit.dataset import Prompt
from weight_edit.prompt_files import (
    BenchmarkSpec,
    PromptFileError,
    load_prompt_file,
    overlapping_prompts,
    parse_benchmark_spec,
    prompt_key,
)

REFUSAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "refusal"
# file stem -> (kind, rows stated in SOURCES.md)
PUBLIC_SETS = {
    "harmbench_test": ("harmful", 152),
    "strongreject": ("harmful", 310),
    "advbench": ("harmful", 509),
    "malicious_instruct": ("harmful", 100),
    "alpaca_harmless_val": ("harmless", 500),
    "jbb_benign": ("safe", 100),
}


def spec_for(tmp_path: Path, name: str, content: str | bytes, kind: str = "harmful") -> BenchmarkSpec:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return BenchmarkSpec(kind, Path(name).stem, path)


def error_of(spec: BenchmarkSpec, prompt_column: str | None = None) -> str:
    with pytest.raises(PromptFileError) as caught:
        load_prompt_file(spec, prompt_column)
    return str(caught.value)


# --- formats -----------------------------------------------------------------------------------------------------


def test_csv_with_prompt_and_category(tmp_path):
    spec = spec_for(tmp_path, "set.csv", 'prompt,category\n  Say  hi ,a\n"two\nlines",x\nok,y\n')
    prompts = load_prompt_file(spec)
    assert prompts == [
        Prompt("Say  hi", "harmful", "set", 2),
        Prompt("two\nlines", "harmful", "set", 3),
        Prompt("ok", "harmful", "set", 5),
    ]


def test_csv_behavior_column_any_case_with_bom_and_crlf(tmp_path):
    content = "\ufeffBehavior,FunctionalCategory\r\nfirst,standard\r\n\r\nsecond,standard\r\n"
    prompts = load_prompt_file(spec_for(tmp_path, "hb.csv", content.encode("utf-8"), kind="safe"))
    assert [(p.text, p.row, p.label) for p in prompts] == [("first", 2, "safe"), ("second", 4, "safe")]


def test_csv_column_search_order_prefers_prompt_over_goal(tmp_path):
    prompts = load_prompt_file(spec_for(tmp_path, "s.csv", "goal,PROMPT\ng,p\n"))
    assert [p.text for p in prompts] == ["p"]


def test_json_list_of_objects_with_goal(tmp_path):
    rows = [{"goal": " a ", "category": "c"}, {"goal": "b", "target": "t"}]
    prompts = load_prompt_file(spec_for(tmp_path, "jbb.json", json.dumps(rows), kind="safe"))
    assert prompts == [Prompt("a", "safe", "jbb", 1), Prompt("b", "safe", "jbb", 2)]


def test_json_list_of_strings(tmp_path):
    prompts = load_prompt_file(spec_for(tmp_path, "s.json", json.dumps(["x", "  y\t"]), kind="harmless"))
    assert [(p.text, p.row, p.label, p.category) for p in prompts] == [
        ("x", 1, "harmless", "s"),
        ("y", 2, "harmless", "s"),
    ]


def test_json_object_with_one_list_key(tmp_path):
    content = json.dumps({"version": 2, "meta": {"n": 2}, "data": [{"instruction": "i1"}, {"instruction": "i2"}]})
    prompts = load_prompt_file(spec_for(tmp_path, "d.json", content))
    assert [(p.text, p.row) for p in prompts] == [("i1", 1), ("i2", 2)]


def test_jsonl_rows_are_line_numbers(tmp_path):
    content = '{"prompt": "one"}\n\n"two"\n{"prompt": "three", "x": 1}\n'
    prompts = load_prompt_file(spec_for(tmp_path, "s.jsonl", content))
    assert [(p.text, p.row) for p in prompts] == [("one", 1), ("two", 3), ("three", 4)]


def test_duplicates_are_kept(tmp_path):
    prompts = load_prompt_file(spec_for(tmp_path, "d.csv", "prompt\nsame\nsame\n"))
    assert [p.text for p in prompts] == ["same", "same"]


def test_explicit_prompt_column(tmp_path):
    spec = spec_for(tmp_path, "s.csv", "prompt,Rewrite\nignored,used\n")
    assert [p.text for p in load_prompt_file(spec, "Rewrite")] == ["used"]
    assert "no column 'rewrite'; available columns: 'prompt', 'Rewrite'" in error_of(spec, "rewrite")
    jspec = spec_for(tmp_path, "s.json", json.dumps([{"goal": "g", "alt": "a"}]))
    assert [p.text for p in load_prompt_file(jspec, "alt")] == ["a"]
    assert error_of(jspec, "nope").startswith(f"{jspec.path}: no column 'nope'; available columns: 'goal', 'alt'")


# --- spec parser -------------------------------------------------------------------------------------------------


def test_spec_with_and_without_name():
    assert parse_benchmark_spec("harmful:advbench=../x/advbench.csv") == BenchmarkSpec(
        "harmful", "advbench", Path("../x/advbench.csv")
    )
    assert parse_benchmark_spec("safe:../x/jbb_benign.jsonl") == BenchmarkSpec(
        "safe", "jbb_benign", Path("../x/jbb_benign.jsonl")
    )
    assert parse_benchmark_spec("harmless: alpaca = a.json ").name == "alpaca"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("unsafe:x=a.csv", "unknown kind 'unsafe'"),
        ("a.csv", "has no ':'"),
        ("harmful:x=", "names no file"),
        ("harmful:", "names no file"),
        ("harmful:=a.csv", "has an empty name"),
    ],
)
def test_bad_specs_show_the_expected_form(text, problem):
    with pytest.raises(PromptFileError) as caught:
        parse_benchmark_spec(text)
    assert problem in str(caught.value)
    assert "KIND:NAME=FILE or KIND:FILE" in str(caught.value)


# --- malformed files ---------------------------------------------------------------------------------------------


def test_unsupported_suffix_names_the_accepted_ones(tmp_path):
    spec = spec_for(tmp_path, "s.txt", "prompt\nx\n")
    assert error_of(spec) == f"{spec.path}: unsupported file type '.txt'; expected .csv, .json, .jsonl"


def test_file_not_found(tmp_path):
    spec = BenchmarkSpec("harmful", "gone", tmp_path / "gone.csv")
    assert error_of(spec) == f"{spec.path}: file not found"


@pytest.mark.parametrize("name", ["e.csv", "e.json", "e.jsonl"])
def test_empty_file(tmp_path, name):
    spec = spec_for(tmp_path, name, " \n\n")
    assert error_of(spec) == f"{spec.path}: file is empty"


def test_invalid_utf8_names_the_line(tmp_path):
    spec = spec_for(tmp_path, "u.csv", b"prompt\nfine\nbad \xff byte\n")
    assert error_of(spec) == f"{spec.path}: line 3 is not valid UTF-8"


def test_header_but_no_rows(tmp_path):
    spec = spec_for(tmp_path, "h.csv", "prompt,category\n\n")
    assert error_of(spec) == f"{spec.path}: has a header but no rows"
    for content in ("[]", '{"data": []}'):
        jspec = spec_for(tmp_path, "h.json", content)
        assert error_of(jspec) == f"{jspec.path}: holds no rows"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.csv", "prompt,category\nok,a\n  ,b\n", "row 3: column 'prompt' is empty"),
        ("p.csv", 'prompt,category\n"multi\nline",a\n"",b\n', "row 4: column 'prompt' is empty"),
        ("p.json", '[{"goal": "ok"}, {"goal": " "}]', "row 2: column 'goal' is empty"),
        ("p.json", '["ok", "", "x"]', "row 2: prompt is empty"),
        ("p.jsonl", '"ok"\n\n{"prompt": "\\t"}\n', "row 3: column 'prompt' is empty"),
    ],
)
def test_empty_prompt(tmp_path, name, content, message):
    spec = spec_for(tmp_path, name, content)
    assert error_of(spec) == f"{spec.path}: {message}"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("n.json", '[{"goal": "ok"}, {"goal": 7}]', "row 2: column 'goal' is a number, not a string"),
        ("n.json", '[{"goal": "ok"}, {"goal": null}]', "row 2: column 'goal' is null, not a string"),
        ("n.json", '["ok", null]', "row 2: is null; expected an object or a string"),
        ("n.json", '{"data": ["ok", "ok", 3]}', "row 3: is a number; expected an object or a string"),
        ("n.jsonl", '{"prompt": "ok"}\n{"prompt": ["a"]}\n', "row 2: column 'prompt' is an array, not a string"),
        ("n.jsonl", '"ok"\ntrue\n', "row 2: is a boolean; expected an object or a string"),
    ],
)
def test_prompt_that_is_not_a_string(tmp_path, name, content, message):
    spec = spec_for(tmp_path, name, content)
    assert error_of(spec) == f"{spec.path}: {message}"


def test_object_row_lacking_the_column(tmp_path):
    spec = spec_for(tmp_path, "m.json", '[{"goal": "a"}, {"goal": "b"}, {"target": "c"}]')
    assert error_of(spec) == f"{spec.path}: row 3: has no 'goal' field"
    lspec = spec_for(tmp_path, "m.jsonl", '{"prompt": "a"}\n\n{"Prompt": "b"}\n')
    assert error_of(lspec) == f"{lspec.path}: row 3: has no 'prompt' field"


def test_csv_row_with_fewer_fields_than_the_header(tmp_path):
    spec = spec_for(tmp_path, "f.csv", 'prompt,category\nok,a\n"two\nlines",b\nshort\n')
    assert error_of(spec) == f"{spec.path}: row 5: has 1 field(s), the header has 2"


def test_csv_syntax_error_names_the_row(tmp_path):
    spec = spec_for(tmp_path, "q.csv", 'prompt,category\nok,a\n"unclosed,b\n')
    assert error_of(spec).startswith(f"{spec.path}: row 3: not valid CSV (")


def test_jsonl_line_that_is_not_json(tmp_path):
    spec = spec_for(tmp_path, "b.jsonl", '{"prompt": "a"}\n\n{"prompt": "b",}\n')
    assert error_of(spec).startswith(f"{spec.path}: row 3: not valid JSON (")


@pytest.mark.parametrize(
    ("content", "start"),
    [
        ('[{"goal": "a"},]', "not valid JSON (Expecting value at line 1"),
        ('{"a": [], "b": []}', "a JSON object must hold exactly one list of prompts; list-valued keys found: 'a', 'b'"),
        ('{"a": "x"}', "a JSON object must hold exactly one list of prompts; list-valued keys found: none"),
        ('"just a string"', "expected a JSON list of prompts, got a string"),
    ],
)
def test_json_shape_errors(tmp_path, content, start):
    spec = spec_for(tmp_path, "s.json", content)
    assert error_of(spec).startswith(f"{spec.path}: {start}")


def test_no_prompt_column_lists_what_was_found(tmp_path):
    spec = spec_for(tmp_path, "c.csv", "text,category\nx,a\n")
    message = error_of(spec)
    assert message.startswith(f"{spec.path}: no prompt column")
    assert "columns found: 'text', 'category'" in message and "--prompt-column" in message
    jspec = spec_for(tmp_path, "c.json", '[{"query": "x"}]')
    assert "columns found: 'query'" in error_of(jspec)


# --- comparing prompts across files ------------------------------------------------------------------------------


def test_prompt_key_and_overlap():
    assert prompt_key("  Hello\t\nWORLD  ") == "hello world"
    assert overlapping_prompts(["Hello  world", "other"], ["hello world", "third", "OTHER "]) == {
        "hello world",
        "other",
    }
    assert overlapping_prompts(["a"], []) == set()


# --- the public sets the project evaluates on --------------------------------------------------------------------


def test_public_refusal_sets_load_with_the_stated_counts():
    if not REFUSAL_DIR.is_dir():
        pytest.skip(f"{REFUSAL_DIR} is not present")
    stated = dict(re.findall(r"^\| (\w+)\.csv \| (\d+) \|", (REFUSAL_DIR / "SOURCES.md").read_text(), re.MULTILINE))
    assert {stem: int(n) for stem, n in stated.items()} == {stem: n for stem, (_, n) in PUBLIC_SETS.items()}
    for stem, (kind, expected) in PUBLIC_SETS.items():
        spec = parse_benchmark_spec(f"{kind}:{REFUSAL_DIR / (stem + '.csv')}")
        prompts = load_prompt_file(spec)
        # counts only: the harmful sets are unsafe requests and must not appear in test output
        count = len(prompts)
        labelled = sum(1 for p in prompts if p.label == kind and p.category == stem and p.text)
        assert (stem, count, labelled) == (stem, expected, expected)


def test_public_category_mapping_names_real_areas_and_covers_the_shared_files():
    """Every area the mapping names is one of the dataset's; every category in the shared public files (when this
    checkout sits beside them) has an entry, so none is grouped silently without its areas."""
    import csv

    import settings
    from weight_edit.dataset import load_dataset
    from weight_edit.prompt_files import public_category_areas

    mapping = public_category_areas(settings.PUBLIC_CATEGORY_AREAS)
    areas = set(load_dataset(settings.DEFAULT_DATASET).categories)
    assert all(set(named) <= areas for named in mapping.values())
    shared = Path(settings.__file__).resolve().parent.parent / "shared" / "benchmarks" / "refusal"
    if not shared.is_dir():
        pytest.skip(f"{shared} is not beside this checkout")
    for path in shared.glob("*.csv"):
        for row in csv.DictReader(path.open(encoding="utf-8")):
            if row.get("category"):
                assert row["category"] in mapping, (path.name, row["category"])


def test_prompt_categories_follow_the_rows(tmp_path):
    from weight_edit.prompt_files import BenchmarkSpec, load_prompt_file, prompt_categories

    path = tmp_path / "cats.jsonl"
    path.write_text('{"prompt": "a", "Category": "x"}\n"b"\n{"prompt": "c", "category": "y"}\n')
    spec = BenchmarkSpec("harmful", "cats", path)
    assert len(load_prompt_file(spec)) == 3 and prompt_categories(spec) == ["x", "", "y"]
    plain = tmp_path / "plain.csv"
    plain.write_text("prompt\na\nb\n")
    assert prompt_categories(BenchmarkSpec("harmful", "plain", plain)) is None

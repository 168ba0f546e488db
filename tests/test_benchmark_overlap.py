"""No prompt of the embedded dataset appears in the public benchmark files (evaluation only, never embedded).

The files stay outside the project; tests/data/benchmark_prompt_keys.sha256 holds the sha256 of each of
their normalised prompts (scripts/benchmark_hashes.py), so the check runs on machines without them too.
"""

import hashlib
from pathlib import Path

import pytest

import settings
from weight_edit.dataset import load_dataset
from weight_edit.prompt_files import BenchmarkSpec, load_prompt_file, overlapping_prompts, prompt_key

HASHES = Path(__file__).parent / "data" / "benchmark_prompt_keys.sha256"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "refusal"


def key_hash(text: str) -> str:
    return hashlib.sha256(prompt_key(text).encode("utf-8")).hexdigest()


def test_no_embedded_prompt_is_a_benchmark_prompt():
    benchmark = set(HASHES.read_text().split())
    assert len(benchmark) > 1000
    embedded = load_dataset(settings.DEFAULT_DATASET).prompts
    shared = [p.row for p in embedded if key_hash(p.text) in benchmark]
    assert not shared, f"embedded rows {shared} appear in the public benchmark files"


def test_the_hash_list_matches_the_shared_files():
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not on this machine (the hash list above still runs)")
    files = sorted(SHARED.glob("*.csv"))
    prompts = [p.text for f in files for p in load_prompt_file(BenchmarkSpec("harmful", f.stem, f))]
    assert {key_hash(t) for t in prompts} == set(HASHES.read_text().split())
    assert not overlapping_prompts((p.text for p in load_dataset(settings.DEFAULT_DATASET).prompts), prompts)

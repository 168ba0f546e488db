"""The checks every command makes before computing (weight_edit/workflow/checks.py)."""

from pathlib import Path

import pytest

import settings
from weight_edit.dataset import load_split
from weight_edit.direction_file import DirectionError
from weight_edit.workflow import checks


def test_same_split_names_what_differs():
    data, split = load_split(settings.DEFAULT_DATASET, settings.SEED)
    sidecar = {"dataset": {"sha256": data.sha256}, "split": split.as_dict()}
    checks.same_split(sidecar, data, split, Path("direction.json"))  # the fit's own split passes
    _, other = load_split(settings.DEFAULT_DATASET, settings.SEED + 1)
    assert other.fit_areas != split.fit_areas
    with pytest.raises(DirectionError, match="fit areas .* there, .* here.*--seed"):
        checks.same_split(sidecar, data, other, Path("direction.json"))
    with pytest.raises(DirectionError, match="another dataset"):
        checks.same_split({**sidecar, "dataset": {"sha256": "0" * 64}}, data, split, Path("direction.json"))
    checks.same_split({}, data, other, Path("direction.json"))  # a bare direction records nothing to compare


def test_writable_names_the_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    from weight_edit.output_folder import OutputError

    with pytest.raises(OutputError, match="is a file, not a folder"):
        checks.writable(tmp_path / "f" / "out", "--out-dir")
    checks.writable(tmp_path / "new" / "deeper", "--out-dir")
    assert not (tmp_path / "new").exists()  # nothing is created by the check

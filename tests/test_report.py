"""Figures (PNG files matplotlib can read back) and the Markdown report built from aggregate files."""

import csv
import re
import shutil
from pathlib import Path

import pytest
import torch

import settings
from weight_edit import diagnose as diag
from weight_edit import figures
from weight_edit.report import SECTIONS, write_report

pytest.importorskip("matplotlib")

REFERENCE = settings.ARTIFACTS_DIR / "reference"
D = 24


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def assert_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.is_file() and path.stat().st_size > 1000
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    assert image.std() > 0.01  # not a blank canvas


@pytest.fixture(scope="module")
def diagnostics_dir(tmp_path_factory) -> Path:
    """A diagnose output from planted activations: 6 fit and 2 held-out areas sharing one direction."""
    g = torch.Generator().manual_seed(0)
    r = torch.randn(D, generator=g, dtype=torch.float64)
    names = [f"area_{i}" for i in range(8)]
    held = names[-2:]
    blocks, areas, labels, parts = [], [], [], []
    for area in names:
        base = torch.randn(D, generator=g, dtype=torch.float64)
        for i in range(6):
            part = "held_out" if area in held else ("train" if i < 4 else "validation")
            for label, shift in (("safe", 0.0), ("unsafe", 1.0)):
                blocks.append(base + shift * r + 0.3 * torch.randn(D, generator=g, dtype=torch.float64))
                areas.append(area)
                labels.append(label)
                parts.append(part)
    acts = diag.PromptActivations(torch.stack(blocks), tuple(areas), tuple(labels), tuple(parts))
    result = diag.diagnose(acts, names[:-2], held, r, layer=18, position=-2, seed=3, max_rank=3)
    folder = tmp_path_factory.mktemp("diagnose")
    diag.save_diagnostics(result, folder)
    return folder


def test_candidate_scores_figure_from_the_reference_fit(tmp_path):
    out = figures.candidate_scores(rows(REFERENCE / "candidates.csv"), tmp_path / "c.png")
    assert_png(out)


def test_candidate_scores_without_a_screen_uses_full_scores(tmp_path):
    table = [
        {"layer": layer, "position": pos, "eligible": True, "screen_bypass": "", "bypass": layer - pos / 2}
        for layer in range(3)
        for pos in (-2, -1)
    ]
    assert_png(figures.candidate_scores(table, tmp_path / "full.png", chosen=(0, -1)))
    with pytest.raises(ValueError):
        figures.candidate_scores([{**t, "bypass": ""} for t in table], tmp_path / "none.png")


def test_refusal_by_area_figure_from_the_reference_evaluation(tmp_path):
    evaluation = rows(REFERENCE / "default" / "evaluation_by_area.csv")
    assert_png(figures.refusal_by_area(evaluation, tmp_path / "r.png"))
    assert_png(figures.refusal_by_area(evaluation, tmp_path / "odds.png", measure="log_odds"))  # no intervals


def test_area_cosine_and_budget_figures(tmp_path, diagnostics_dir):
    matrix = rows(diagnostics_dir / diag.COSINES_CSV)
    areas = [r["area"] for r in matrix]
    cosines = [[float(r[a]) for a in areas] for r in matrix]
    assert_png(figures.area_cosines(areas, cosines, tmp_path / "cos.png", held_out=areas[-2:]))
    summary = rows(diagnostics_dir / diag.BUDGET_SUMMARY_CSV)
    points = rows(diagnostics_dir / diag.BUDGET_CSV)
    assert_png(figures.budget_curve(summary, tmp_path / "budget.png", points, fitted_vs_held_out=0.9))


def test_pareto_front_figure(tmp_path):
    g = torch.Generator().manual_seed(1)
    values = torch.rand(40, 2, generator=g).tolist()
    trials = [{"refusal": a, "kl": 0.3 * b, "chosen": False} for a, b in values]
    for t in trials:
        t["on_front"] = not any(o is not t and o["refusal"] <= t["refusal"] and o["kl"] <= t["kl"] for o in trials)
    front = [t for t in trials if t["on_front"]]
    front[0]["chosen"] = True
    assert_png(figures.pareto_front(trials, None, tmp_path / "p.png"))
    assert_png(figures.pareto_front(trials, 3, tmp_path / "p3.png", log_kl=True))
    assert_png(figures.pareto_front(trials, None, tmp_path / "pr.png", reference=trials[0]))
    with pytest.raises(ValueError):
        figures.pareto_front([], None, tmp_path / "empty.png")


def links(readme: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme.read_text())


def section_bodies(text: str) -> dict[str, str]:
    parts = re.split(r"^## \d+\. ", text, flags=re.M)[1:]
    return {part.splitlines()[0]: part for part in parts}


def test_report_from_every_input_names_each_section_and_links_existing_figures(tmp_path, diagnostics_dir):
    eval_dir = tmp_path / "eval"
    shutil.copytree(REFERENCE / "default", eval_dir)
    # A per-prompt file with first words of completions sits beside the aggregates: it must never be read.
    (eval_dir / "evaluation_prompts.csv").write_text("category,source_first_words\nx,MARKER_COMPLETION_WORDS\n")
    readme = write_report(
        tmp_path / "report", REFERENCE, eval_dir, diagnostics_dir, variants={"default": eval_dir, "absent": tmp_path}
    )
    text = readme.read_text()
    bodies = section_bodies(text)
    assert list(bodies) == list(SECTIONS)
    assert "Not run" not in text
    assert "MARKER_COMPLETION_WORDS" not in text
    targets = links(readme)
    assert sorted(Path(t).name for t in targets) == sorted(
        ["candidate_scores.png", "refusal_by_area.png", "area_cosines.png", "budget_curve.png"]
    )
    for target in targets:
        assert not Path(target).is_absolute()
        assert_png(readme.parent / target)
    # The numbers come from the files.
    assert "18 of 28" in bodies[SECTIONS[0]]
    assert "95/104 (91 %)" in bodies[SECTIONS[1]] and "1.6e-27" in bodies[SECTIONS[1]]
    assert "area_7 †" in bodies[SECTIONS[2]]
    pca = rows(diagnostics_dir / diag.PCA_CSV)
    assert f"| 1 | {float(pca[0]['singular_value']):.3f} |" in bodies[SECTIONS[3]]
    assert "| 6 | 1 |" in bodies[SECTIONS[4]]  # all six fit areas, one subset
    assert "[3, d]" in bodies[SECTIONS[5]]
    variant_rows = [line for line in bodies[SECTIONS[6]].splitlines() if line.startswith("| `default`")]
    assert len(variant_rows) == 1 and "95/104 → 5/104" in variant_rows[0] and "1.6e-27" in variant_rows[0]
    assert "| absent | not run |" in bodies[SECTIONS[6]]


def test_report_with_missing_inputs_says_not_run(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    readme = write_report(tmp_path / "report", None, empty, tmp_path / "absent")
    bodies = section_bodies(readme.read_text())
    assert list(bodies) == list(SECTIONS)
    for title, body in bodies.items():
        assert "Not run" in body, title
    assert links(readme) == []
    assert not (tmp_path / "report" / "figures").exists()


def test_report_links_no_figure_it_did_not_draw(tmp_path, diagnostics_dir):
    stale = tmp_path / "report" / "figures"
    stale.mkdir(parents=True)
    (stale / "candidate_scores.png").write_bytes(b"old")
    readme = write_report(tmp_path / "report", None, None, diagnostics_dir, draw_figures=False)
    assert links(readme) == []
    assert "Not run" in section_bodies(readme.read_text())[SECTIONS[0]]

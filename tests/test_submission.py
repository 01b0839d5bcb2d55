"""Submission folders: ids from names, the results.csv validator, atomic writing, local scoring."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from pipeline.classes import OFFICIAL_NAMES
from pipeline.errors import UserError
from pipeline.submission import (
    SubmissionError,
    image_id_from_name,
    new_run_dir,
    print_score_report,
    read_results,
    read_truth,
    score_submission,
    validate_submission,
    write_submission,
)


def _results(n: int = 6, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "image_id": np.arange(1000, 1000 + n, dtype=np.int64),
            "class_id": rng.integers(0, 10, n),
            "score": rng.standard_normal(n) * 1e3 / 7,
        }
    )


def _from_csv(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Gotcha16683523.png", 16683523),
        ("/data/test/Gotcha00042.png", 42),
        ("gotcha7.PNG", 7),
        ("123456.png", 123456),
        ("99", 99),
        ("SAR_100578.png", 100578),  # the 2022 and 2023 editions
        ("/data/EO/EO_0042.png", 42),
        ("img_12.jpeg", 12),
        ("Gotcha-5.png", 5),
    ],
)
def test_image_id_from_name(name: str, expected: int) -> None:
    assert image_id_from_name(name) == expected


@pytest.mark.parametrize("name", ["Gotcha.png", "SAR_1_2.png", "12-3.png", "", "2022/SAR_.png", "a1b2.png"])
def test_image_id_from_bad_name_is_a_user_error(name: str) -> None:
    with pytest.raises(UserError, match="<prefix><digits>.<ext>") as info:
        image_id_from_name(name)
    assert "\n" not in str(info.value)


def test_one_definition_of_test_ids_and_truth() -> None:
    """Discovery and scoring share one image-id parser and one truth reader."""
    from pipeline.data import layout, testset

    assert image_id_from_name is testset.image_id_from_name is layout.image_id_from_name
    assert read_truth is testset.read_truth is layout.read_truth


def test_valid_submission_passes() -> None:
    df = _results()
    validate_submission(df, expected_ids=range(1000, 1006))
    validate_submission(df, expected_ids=None)
    validate_submission(_from_csv("image_id,class_id,score\n5,0,1.5\n6,9,-2\n"), [5, 6])
    assert issubclass(SubmissionError, UserError)


@pytest.mark.parametrize(
    ("csv", "expected", "match"),
    [
        ("image_id,class_id,score\n1,0,0.5\n", [1, 2], r"missing image_id 2"),
        ("image_id,class_id,score\n1,0,0.5\n2,0,0.5\n2,1,0.1\n", [1, 2], r"duplicate image_id 2"),
        ("image_id,class_id,score\n1,0,0.5\n2,0,0.5\n3,0,0.5\n", [1, 2], r"unexpected image_id 3"),
        ("image_id,class_id,score\nabc,0,0.5\n2,0,0.5\n", None, r"image_id not a .* in data row\(s\) 1"),
        ("image_id,class_id,score\n1.5,0,0.5\n", None, r"image_id not a non-negative integer"),
        ("image_id,class_id,score\n3,0,0.5\n-3,0,0.5\n", None, r"image_id not a .* in data row\(s\) 2"),
        ("image_id,class_id,score\n1,x,0.5\n", None, r"class_id not an integer in 0..9"),
        ("image_id,class_id,score\n1,10,0.5\n2,-1,0.5\n", None, r"class_id .* data row\(s\) 1, 2"),
        ("image_id,class_id,score\n1,2.5,0.5\n", None, r"class_id not an integer"),
        ("image_id,class_id,score\n1,0,nan\n", None, r"score not a finite number"),
        ("image_id,class_id,score\n1,0,inf\n2,0,-inf\n", None, r"score not a finite number in data row\(s\) 1, 2"),
        ("image_id,class_id,score\n1,0,\n", None, r"score not a finite number"),
        ("image_id,class_id,score\n1,0,high\n", None, r"score not a finite number"),
        ("image_id,class_id,score\n", None, r"no rows"),
        ("image_id,class_id\n1,0\n", None, r"columns are image_id,class_id: expected exactly"),
        ("id,class_id,score\n1,0,0.5\n", None, r"columns are id,class_id,score"),
        ("class_id,image_id,score\n0,1,0.5\n", None, r"expected exactly image_id,class_id,score"),
        ("image_id,class_id,score,extra\n1,0,0.5,1\n", None, r"expected exactly"),
    ],
)
def test_validator_rejects(csv: str, expected: list[int] | None, match: str) -> None:
    with pytest.raises(SubmissionError, match=match) as info:
        validate_submission(_from_csv(csv), expected)
    assert "\n" not in str(info.value)


def test_validator_lists_every_problem_briefly() -> None:
    df = pd.DataFrame({"image_id": [1, 1, 3], "class_id": [0, 12, 0], "score": [0.1, np.nan, 0.2]})
    with pytest.raises(SubmissionError) as info:
        validate_submission(df, expected_ids=range(1, 20))
    message = str(info.value)
    for part in ("class_id", "score", "duplicate image_id 1", "missing image_id 2, 4, 5, 6, 7, ... (17 in all)"):
        assert part in message


def test_write_submission_round_trips(tmp_path: Path) -> None:
    results = _results(n=50)
    results.loc[3, "score"] = 0.1 + 0.2  # needs all 17 digits
    predictions = results.assign(path=[f"test/Gotcha{i}.png" for i in results["image_id"]], cluster=1)
    summary = {"model": "resnet18", "views": ["identity", "hflip"], "changed_by_voting": 3}
    run_dir = new_run_dir(tmp_path / "submissions", "run1")
    path = write_submission(run_dir, results, predictions, summary, expected_ids=results["image_id"])

    assert path == run_dir / "results.csv"
    assert path.read_text().splitlines()[0] == "image_id,class_id,score"
    back = read_results(path)
    pd.testing.assert_frame_equal(back, results)
    assert back["score"][3] == 0.1 + 0.2
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "predictions.csv"), predictions)
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert sorted(p.name for p in run_dir.iterdir()) == ["predictions.csv", "results.csv", "summary.json"]


def test_invalid_results_write_nothing(tmp_path: Path) -> None:
    results = _results()
    results.loc[0, "class_id"] = 10
    run_dir = new_run_dir(tmp_path, "bad")
    with pytest.raises(SubmissionError):
        write_submission(run_dir, results, results, {}, expected_ids=None)
    assert list(run_dir.iterdir()) == []


def test_existing_submission_is_never_overwritten(tmp_path: Path) -> None:
    results = _results()
    run_dir = new_run_dir(tmp_path, "final")
    write_submission(run_dir, results, results, {"first": True}, expected_ids=None)
    before = (run_dir / "results.csv").read_bytes()

    with pytest.raises(UserError, match="already exists"):
        new_run_dir(tmp_path, "final")
    with pytest.raises(UserError, match="already exists"):
        write_submission(run_dir, _results(seed=1), results, {"first": False}, expected_ids=None)
    assert (run_dir / "results.csv").read_bytes() == before
    assert json.loads((run_dir / "summary.json").read_text()) == {"first": True}


def test_timestamped_run_dirs_never_collide(tmp_path: Path) -> None:
    made = [new_run_dir(tmp_path, None) for _ in range(3)]
    assert len(set(made)) == 3 and all(p.is_dir() for p in made)
    assert all(p.name[:8].isdigit() and p.name[8] == "-" for p in made)


@pytest.mark.parametrize("run", ["../escape", "a/b", ".", "", "-x"])
def test_bad_run_names_are_user_errors(tmp_path: Path, run: str) -> None:
    with pytest.raises(UserError, match="run name"):
        new_run_dir(tmp_path, run)


def _truth_and_results(seed: int = 0, n: int = 200) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(5000, 5000 + n))
    truth = pd.DataFrame({"image_id": ids, "class_id": rng.integers(-1, 10, n)})
    pred = np.where(rng.random(n) < 0.6, truth["class_id"].clip(lower=0), rng.integers(0, 10, n))
    score = rng.standard_normal(n) + (truth["class_id"] >= 0) * 1.0
    results = pd.DataFrame({"image_id": truth["image_id"], "class_id": pred, "score": score})
    return truth, results.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # another row order


def test_scorer_matches_sklearn() -> None:
    truth, results = _truth_and_results()
    report = score_submission(results, truth)
    merged = truth.merge(results, on="image_id", suffixes=("_true", "_pred"))
    in_dist = merged["class_id_true"] >= 0
    acc = accuracy_score(merged.loc[in_dist, "class_id_true"], merged.loc[in_dist, "class_id_pred"])
    auc = roc_auc_score(in_dist, merged["score"])
    assert report["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert report["auroc"] == pytest.approx(auc, abs=1e-12)
    assert report["competition_score"] == pytest.approx(0.75 * acc + 0.25 * auc, abs=1e-12)
    assert report["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(merged.loc[in_dist, "class_id_true"], merged.loc[in_dist, "class_id_pred"])
    )
    cm = np.array(report["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == in_dist.sum()
    n_in = int(in_dist.sum())
    assert report["counts"] == {"scored": 200, "in_distribution": n_in, "ood": 200 - n_in, "unscored": 0}


def test_scorer_on_a_tiny_hand_made_case() -> None:
    truth = pd.DataFrame({"image_id": [1, 2, 3, 4, 5], "class_id": [0, 1, 1, -1, -1]})
    results = pd.DataFrame(
        {"image_id": [5, 4, 3, 2, 1, 9], "class_id": [0, 0, 1, 0, 0, 3], "score": [0.1, 0.5, 0.9, 0.4, 0.8, 0.0]}
    )
    report = score_submission(results, truth)
    # in-distribution: 1 ok, 2 wrong, 3 ok -> 2/3; scores ID {0.8, 0.4, 0.9} vs OOD {0.5, 0.1}: 5 of 6 pairs
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert report["auroc"] == pytest.approx(5 / 6)
    assert report["competition_score"] == pytest.approx(0.75 * 2 / 3 + 0.25 * 5 / 6)
    assert report["per_class_recall"][:3] == [1.0, 0.5, None]
    assert report["counts"]["unscored"] == 1


def test_scorer_needs_every_truth_id() -> None:
    truth, results = _truth_and_results(n=20)
    with pytest.raises(UserError, match="lacks 2 image"):
        score_submission(results.iloc[2:], truth)


def test_read_truth(tmp_path: Path) -> None:
    good = tmp_path / "truth.csv"
    good.write_text("image_id,class_id,name\n7,3,van\n8,-1,unknown\n")
    truth = read_truth(good)
    assert truth["image_id"].tolist() == [7, 8] and truth["class_id"].tolist() == [3, -1]
    for text, match in [
        ("id,class\n1,2\n", "lacks column"),
        ("image_id,class_id\n1,12\n", "class_id not an integer in -1..9"),
        ("image_id,class_id\n1,2\n1,3\n", "duplicate image_id 1"),
        ("image_id,class_id\nx,2\n", "image_id not a non-negative integer in data row\\(s\\) 1"),
        ("", "not a readable CSV"),
    ]:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(UserError, match=match):
            read_truth(bad)
    with pytest.raises(UserError, match="not found"):
        read_truth(tmp_path / "absent.csv")


def _printed_rows(text: str, title: str) -> list[list[str]]:
    """The rows of the table titled `title` in printed `text`, split into words (box lines skipped)."""
    rows = []
    for line in text[text.index(title) + len(title):].splitlines()[1:]:
        if not line.strip() or line.strip()[0] == "└":
            break  # the table's bottom border (or a blank line) ends it
        words = re.sub(r"[│┃|]", " ", line).split()
        if words and not re.fullmatch(r"[┏┓┡┩━─┳╇╈┼+=-]+", "".join(words)):
            rows.append(words)
    return rows


def test_print_score_report() -> None:
    """Asymmetric confusion: 5 sedans called van, 2 vans and 1 bus right, so a transposed matrix shows."""
    truth = pd.DataFrame({"image_id": np.arange(10), "class_id": [0, 0, 0, 0, 0, 3, 3, 7, -1, -1]})
    results = pd.DataFrame(
        {"image_id": np.arange(10), "class_id": [3, 3, 3, 3, 3, 3, 3, 7, 1, 2], "score": [1.0] * 8 + [0.0, 2.0]}
    )
    report = score_submission(results, truth)
    assert report["confusion_matrix"][0][3] == 5 and report["confusion_matrix"][3][0] == 0
    console = Console(file=io.StringIO(), width=200)
    print_score_report(report, list(OFFICIAL_NAMES), console)
    text = console.file.getvalue()
    assert "competition score" in text and "pickup_truck_w_trailer" in text

    head = _printed_rows(text, "Local score")
    assert head[0][:2] == ["competition", "score"]
    assert head[-1][:5] == ["0.4062", "0.3750", "0.5000", "0.6667", "0.4815"]  # 0.75·3/8 + 0.25·0.5

    recall = {row[1]: row[2:] for row in _printed_rows(text, "Per-class recall (in-distribution)") if row[0].isdigit()}
    assert recall["sedan"] == ["5", "0.000"] and recall["van"] == ["2", "1.000"] and recall["bus"] == ["1", "1.000"]
    assert recall["SUV"] == ["0", "-"]

    assert "rows: true, columns: predicted" in text
    matrix = _printed_rows(text, "Confusion matrix (rows: true, columns: predicted)")
    header = matrix[0]
    assert header[header.index("pred") + 1:] == [str(c) for c in range(10)]
    body = {int(row[0]): row[2:] for row in matrix[1:] if row[0].isdigit()}
    assert sorted(body) == list(range(10))
    assert [row[1] for row in matrix[1:] if row[0].isdigit()] == list(OFFICIAL_NAMES)
    for true_class, cells in body.items():  # row = true class, column = predicted class
        expected = ["."] * 10
        expected[3] = {0: "5", 3: "2"}.get(true_class, ".")
        if true_class == 7:
            expected[7] = "1"
        assert cells == expected, f"row {true_class} {OFFICIAL_NAMES[true_class]}: {cells}"

"""stages.ensemble: several submission runs of one test set averaged into a new submission."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from pipeline.inference import prediction_tables
from pipeline.metrics import auroc
from pipeline.submission import HEADLINE, score_submission, write_submission
from stages import ensemble

N_IN, N_OOD, CLASSES = 30, 6, 3


def _member(folder: Path, wrong: range, scale: float, seed: int, ids: np.ndarray | None = None,
            classes: int = CLASSES, names: tuple[str, ...] = ("a", "b", "c")) -> Path:
    """A submission folder as stages.infer writes it: right with probability 0.9 except on the chips `wrong`
    (0.6 on the next class), OOD chips scored lower than known ones on the member's own scale."""
    truth = np.r_[np.arange(N_IN) % CLASSES, -np.ones(N_OOD, int)]
    ids = np.arange(100, 100 + N_IN + N_OOD) if ids is None else ids
    probs = np.full((len(ids), classes), 0.05)
    for i, t in enumerate(truth):
        t = t % classes if t >= 0 else i % classes
        probs[i, t] = 0.9
        if i in wrong:
            probs[i, t], probs[i, (t + 1) % classes] = 0.2, 0.6
    probs /= probs.sum(axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    score = scale * (np.where(truth >= 0, 1.0, 0.0) + rng.normal(0, 0.6, len(ids)))
    voting = SimpleNamespace(labels=probs.argmax(1), changed=np.zeros(len(ids), bool), cluster=-np.ones(len(ids), int))
    out = SimpleNamespace(voting=voting, probs=probs, logits=np.log(probs), score=score, energy=score)
    results, predictions = prediction_tables(ids, np.array([f"c/{i}.png" for i in ids]), out)
    folder.mkdir(parents=True)
    truth_table = pd.DataFrame({"image_id": ids, "class_id": truth})
    truth_table.to_csv(folder / "truth.csv", index=False)
    score = score_submission(results, truth_table, num_classes=classes) if classes == CLASSES else {}
    write_submission(folder, results, predictions, {"dataset": {"classes": list(names)},
                                                    "score": {k: score.get(k) for k in HEADLINE}},
                     expected_ids=ids, num_classes=classes)
    return folder


def test_the_mean_probability_corrects_each_members_own_errors_and_scores_are_standardised(tmp_path, capsys):
    runs = [_member(tmp_path / f"m{k}", range(10 * k, 10 * k + 10), scale=1000.0 ** k, seed=k) for k in range(3)]
    assert ensemble.main([*map(str, runs), "--submissions", str(tmp_path / "out"), "--run", "e"]) == 0
    table = capsys.readouterr().out.split("members and their ensemble", 1)[1]  # each member's accuracy, then its own
    rows = [line.split("│")[1:-1] for line in table.splitlines() if line.startswith("│")]
    assert [row[1].strip() for row in rows] == ["0.6667"] * 3 + ["1.0000"] and rows[-1][0].strip() == "ensemble"
    out = tmp_path / "out" / "e"
    results = pd.read_csv(out / "results.csv")
    truth = pd.read_csv(out / "truth.csv")
    known = truth["class_id"] >= 0
    members = [pd.read_csv(r / "results.csv") for r in runs]
    assert all((m["class_id"][known] == truth["class_id"][known]).mean() == pytest.approx(20 / 30) for m in members)
    assert (results["class_id"][known] == truth["class_id"][known]).all()  # every error outvoted
    z = [(m["score"] - m["score"].mean()) / m["score"].std(ddof=0) for m in members]
    assert np.allclose(results["score"], np.mean(z, axis=0))  # scales of 1 to 1e6 weigh the same
    assert auroc(known.to_numpy(), results["score"].to_numpy()) > 0.5
    score = json.loads((out / "score.json").read_text())
    assert score["accuracy"] == 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ensemble"]["members"] == [str(r.resolve()) for r in runs] and summary["score"]["accuracy"] == 1.0
    assert not (tmp_path / "out" / "latest.txt").exists()  # a tool's output, not the newest stage run


def test_a_confident_member_outvotes_two_unsure_ones():
    """Probabilities are averaged, not votes: two members a little wrong lose to one sure and right."""
    ids = np.arange(3)
    sure = pd.DataFrame({"image_id": ids, "score": [1.0, 2.0, 3.0], "prob_0": 0.98, "prob_1": 0.02})
    unsure = pd.DataFrame({"image_id": ids, "score": [3.0, 2.0, 1.0], "prob_0": 0.45, "prob_1": 0.55})
    results, predictions = ensemble.average_members([sure, unsure, unsure.copy()])
    assert (results["class_id"] == 0).all()
    assert np.allclose(predictions["prob_0"], (0.98 + 0.45 + 0.45) / 3)
    assert np.allclose(results["score"], np.array([1.0, 0.0, -1.0]) / np.std([1.0, 2.0, 3.0]) / 3)  # z-scores
    flat = sure.assign(score=5.0)  # a member with one score for every chip adds nothing to the ranking
    assert np.allclose(ensemble.average_members([flat, sure])[0]["score"], ensemble.average_members([sure])[0]["score"] / 2)


def test_bad_member_sets_are_one_clear_error_and_nothing_is_overwritten(tmp_path, capsys):
    a = _member(tmp_path / "a", range(0), 1.0, 0)
    b = _member(tmp_path / "b", range(0), 1.0, 1)
    other_ids = _member(tmp_path / "c", range(0), 1.0, 2, ids=np.arange(500, 500 + N_IN + N_OOD))
    other_classes = _member(tmp_path / "d", range(0), 1.0, 3, classes=4)
    unfinished = tmp_path / "u"
    unfinished.mkdir()
    (unfinished / "predictions.csv").write_text((a / "predictions.csv").read_text())
    cases = [([a], "two or more"), ([a, other_ids], "other test chips"), ([a, other_classes], "other classes"),
             ([a, unfinished], "not a finished submission folder"), ([a, tmp_path / "nope"], "not a finished")]
    for runs, message in cases:
        with pytest.raises(SystemExit) as stop:
            ensemble.main([*map(str, runs), "--submissions", str(tmp_path / "out")])
        assert stop.value.code == 2
        assert message in capsys.readouterr().err
    (a / "predictions.csv").write_text("image_id,path\n1,x\n")
    with pytest.raises(SystemExit):
        ensemble.main([str(a), str(b), "--submissions", str(tmp_path / "out")])
    assert "lacks score" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    (a / "predictions.csv").unlink()
    _member(tmp_path / "a2", range(0), 1.0, 0)
    assert ensemble.main([str(tmp_path / "a2"), str(b), "--submissions", str(tmp_path / "out"), "--run", "e"]) == 0
    before = (tmp_path / "out" / "e" / "results.csv").read_bytes()
    with pytest.raises(SystemExit):
        ensemble.main([str(tmp_path / "a2"), str(b), "--submissions", str(tmp_path / "out"), "--run", "e"])
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "e" / "results.csv").read_bytes() == before


def test_late_problems_stop_before_any_folder_is_made_and_an_unlabelled_set_is_not_scored(tmp_path, capsys):
    a = _member(tmp_path / "a", range(0), 1.0, 0)
    b = _member(tmp_path / "b", range(0), 1.0, 1)
    renamed = _member(tmp_path / "r", range(0), 1.0, 2, names=("a", "b", "z"))
    nan = _member(tmp_path / "n", range(0), 1.0, 3)
    table = pd.read_csv(nan / "predictions.csv")
    table.loc[4, "prob_1"] = np.nan
    table.to_csv(nan / "predictions.csv", index=False)
    extra_truth = _member(tmp_path / "t", range(0), 1.0, 4)
    truth = pd.read_csv(extra_truth / "truth.csv")
    pd.concat([truth, pd.DataFrame({"image_id": [7], "class_id": [0]})]).to_csv(extra_truth / "truth.csv", index=False)
    for runs, message in (([a, renamed], "other classes"), ([a, nan], "finite numbers"),
                          ([extra_truth, b], "submission lacks 1 image")):
        with pytest.raises(SystemExit):
            ensemble.main([*map(str, runs), "--submissions", str(tmp_path / "out"), "--run", "e"])
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out" / "e").exists()  # nothing half written: the same --run works once fixed
    (b / "summary.json").write_text("[]")
    with pytest.raises(SystemExit):
        ensemble.main([str(a), str(b), "--submissions", str(tmp_path / "out"), "--run", "e"])
    assert "not a JSON object" in capsys.readouterr().err and not (tmp_path / "out" / "e").exists()
    (b / "summary.json").write_text('{"dataset": null}')  # no class names recorded: numbers
    (a / "truth.csv").unlink()
    assert ensemble.main([str(a), str(b), "--submissions", str(tmp_path / "out"), "--run", "e"]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "e").iterdir()) == ["predictions.csv", "results.csv", "summary.json"]


def test_a_submissions_folder_stands_for_its_latest_run(tmp_path):
    for seed in range(2):
        _member(tmp_path / f"seed{seed}" / "old", range(0, 30), 1.0, seed)  # every known chip wrong
        _member(tmp_path / f"seed{seed}" / "new", range(0), 1.0, seed)
        (tmp_path / f"seed{seed}" / "latest.txt").write_text("new\n")
    assert ensemble.main([str(tmp_path / "seed0"), str(tmp_path / "seed1"), "--submissions", str(tmp_path / "out"),
                          "--run", "e"]) == 0
    assert json.loads((tmp_path / "out" / "e" / "score.json").read_text())["accuracy"] == 1.0
    members = json.loads((tmp_path / "out" / "e" / "summary.json").read_text())["ensemble"]["members"]
    assert members == [str((tmp_path / f"seed{s}" / "new").resolve()) for s in range(2)]


def test_latest_and_skip_fresh_reuse_an_ensemble_only_of_the_same_member_runs(tmp_path):
    runs = [_member(tmp_path / f"m{k}", range(k, k + 3), 1.0, seed=k) for k in range(2)]
    out = tmp_path / "out"
    args = [*map(str, runs), "--submissions", str(out), "--latest", "--skip-fresh"]
    assert ensemble.main(args) == 0
    (first,) = [p for p in out.iterdir() if p.is_dir()]
    assert (out / "latest.txt").read_text().strip() == first.name
    (out / "latest.txt").write_text("elsewhere\n")
    assert ensemble.main(args) == 0  # same members: reused, marked latest again, nothing new
    assert [p for p in out.iterdir() if p.is_dir()] == [first]
    assert (out / "latest.txt").read_text().strip() == first.name
    assert ensemble.main([*map(str, runs), "--submissions", str(out), "--run", "forced"]) == 0  # no --skip-fresh
    assert (out / "forced" / "results.csv").is_file() and (out / "latest.txt").read_text().strip() == first.name
    third = _member(tmp_path / "m2", range(5), 1.0, seed=2)  # another member set: a new ensemble
    assert ensemble.main([str(runs[0]), str(third), "--submissions", str(out), "--latest", "--skip-fresh"]) == 0
    newest = (out / "latest.txt").read_text().strip()
    assert newest not in (first.name, "forced") and (out / newest / "results.csv").is_file()
    # a member folder whose predictions changed is not the same member: the earlier ensemble is not reused
    table = pd.read_csv(runs[1] / "predictions.csv")
    table.loc[0, "prob_0"] += 0.01
    table.to_csv(runs[1] / "predictions.csv", index=False)
    assert ensemble.main(args) == 0
    assert len([p for p in out.iterdir() if p.is_dir()]) == 4
    latest = (out / "latest.txt").read_text()
    (out / "latest.txt").write_text("elsewhere\n")
    assert ensemble.main([*args[:-2], "--skip-fresh"]) == 0  # reused, and without --latest latest.txt is left alone
    assert len([p for p in out.iterdir() if p.is_dir()]) == 4 and (out / "latest.txt").read_text() == "elsewhere\n"
    # a folder left unfinished (summary.json written, results.csv not) is never reused as the submission
    (out / latest.strip() / "results.csv").unlink()
    assert ensemble.main(args) == 0
    newest = (out / "latest.txt").read_text().strip()
    assert newest != latest.strip() and (out / newest / "results.csv").is_file()

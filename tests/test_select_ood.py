"""OOD selection with classes left out: the library on toy embeddings, the stage on tiny data."""

from __future__ import annotations

import numpy as np
import pytest

from fake_data import toy_clusters

from pipeline.config import OODConfig, SelectOODConfig
from pipeline.errors import UserError
from pipeline.metrics import auroc
from pipeline.ood.knn import capped_rows
from pipeline.ood.select import (
    Candidate, best, candidates, choose, leave_one_class_out, proxy_groups, refit_head, score_unseen_classes,
)

D = 8


def _toy(seed: int = 0, n_per_class: int = 30):
    emb, labels, _, _ = toy_clusters(seed, n_per_class, D)
    return emb, labels


def test_refit_head_is_a_linear_head_on_raw_embeddings() -> None:
    emb, labels = _toy(seed=5)
    for keep in ([0, 1, 2], [0, 2]):  # three classes and the two-class special case
        rows = np.isin(labels, keep)
        weight, bias, classes = refit_head(emb[rows], labels[rows])
        assert weight.shape == (len(keep), D) and list(classes) == keep
        predicted = classes[(emb[rows] @ weight.T + bias).argmax(axis=1)]
        assert (predicted == labels[rows]).mean() > 0.95


def test_leave_one_class_out_measures_auroc_on_validation_and_picks_the_best() -> None:
    rng = np.random.default_rng(6)
    centres = rng.normal(0.0, 4.0, (4, D))
    tr_y, va_y = np.repeat(np.arange(4), 25), np.repeat(np.arange(4), 10)
    tr_x = centres[tr_y] + rng.normal(0.0, 0.5, (len(tr_y), D))
    va_x = centres[va_y] + rng.normal(0.0, 0.5, (len(va_y), D))
    cands = candidates(SelectOODConfig(candidates=["energy", "msp", "knn", "mahalanobis", "vim"], knn_k=[1, 3]))
    assert [c.label for c in cands] == ["energy", "msp", "knn(k=1)", "knn(k=3)", "mahalanobis", "vim"]
    results = leave_one_class_out(tr_x, tr_y, va_x, va_y, cands, OODConfig(), max_per_class=20)
    for r in results:
        assert sorted(r.per_class) == [0, 1, 2, 3]
    by_label = {r.candidate.label: r for r in results}
    # well-separated clusters: a left-out class is far from the others' training embeddings
    assert by_label["knn(k=1)"].mean > 0.95 and by_label["mahalanobis"].mean > 0.95
    # by hand for one left-out class: knn(k=1) refitted without class 2, class 2's chips as OOD
    tr = np.flatnonzero(tr_y != 2)
    kept = capped_rows(tr_y, 20, 0)
    kept = kept[tr_y[kept] != 2]
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    score = (unit(va_x) @ unit(tr_x[kept]).T).max(axis=1)
    assert by_label["knn(k=1)"].per_class[2] == pytest.approx(auroc(va_y != 2, score), abs=1e-9)
    assert len(tr) > len(kept)  # the cap was applied
    assert best(results) is max(results, key=lambda r: r.mean)
    tie = [type(results[0])(Candidate("a", "energy"), {0: 0.7}), type(results[0])(Candidate("b", "msp"), {0: 0.7})]
    assert best(tie).candidate.label == "a"
    result = type(results[0])
    close = [result(Candidate("knn", "knn"), {0: 0.96, 1: 0.98}), result(Candidate("maha", "mahalanobis"), {0: 0.97, 1: 0.985}),
             result(Candidate("sphere", "hypersphere"), {0: 0.975, 1: 0.985})]  # best mean 0.98 ± 0.005
    assert choose(close, "best").candidate.label == "sphere"
    assert choose(close, "one_se").candidate.label == "maha"  # floor 0.975: knn (0.97) below it, maha (0.9775) within
    far = [result(Candidate("knn", "knn"), {0: 0.80, 1: 0.82}), close[2]]
    assert choose(far, "one_se").candidate.label == "sphere"  # a clearly better later candidate still wins
    single = [result(Candidate("a", "energy"), {0: 0.7}), result(Candidate("b", "msp"), {0: 0.8})]
    assert choose(single, "one_se").candidate.label == "b"  # one left-out class: no s.e., the best mean
    with pytest.raises(UserError, match="at least 3"):
        leave_one_class_out(tr_x[tr_y < 2], tr_y[tr_y < 2], va_x, va_y, cands, OODConfig())


def test_proxy_groups_are_disjoint_seeded_and_leave_two_classes_known() -> None:
    groups = proxy_groups(list(range(8)), folds=2, left_out=2, seed=3)
    assert len(groups) == 2 and all(len(g) == 2 for g in groups)
    assert not set(groups[0]) & set(groups[1])
    assert groups == proxy_groups(list(range(8)), folds=2, left_out=2, seed=3)
    assert groups != proxy_groups(list(range(8)), folds=2, left_out=2, seed=4)
    assert [len(g) for g in proxy_groups([0, 1, 2, 3], folds=5, left_out=3, seed=0)] == [2, 2]  # all but 2, as many as fit
    with pytest.raises(UserError, match="at least 3"):
        proxy_groups([0, 1], folds=1, left_out=1)


def test_score_unseen_classes_fits_on_seen_training_rows_and_scores_each_unseen_class_alone() -> None:
    rng = np.random.default_rng(7)
    centres = rng.normal(0.0, 4.0, (5, D))
    tr_y, va_y = np.repeat([0, 1, 2], 25), np.repeat(np.arange(5), 10)  # classes 3 and 4 never in training
    tr_x = centres[tr_y] + rng.normal(0.0, 0.5, (len(tr_y), D))
    va_x = centres[va_y] + rng.normal(0.0, 0.5, (len(va_y), D))
    cands = [Candidate("knn(k=1)", "knn", {"k": 1}), Candidate("mahalanobis", "mahalanobis")]
    zeros = lambda x: np.zeros((len(x), 5))  # noqa: E731  (knn and mahalanobis read embeddings only)
    per = score_unseen_classes(zeros(tr_x), tr_x, tr_y, zeros(va_x), va_x, va_y, [3, 4], cands, OODConfig())
    assert [sorted(p) for p in per] == [[3, 4], [3, 4]]
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    score = (unit(va_x) @ unit(tr_x).T).max(axis=1)
    rows = va_y != 4  # class 3 against the seen classes only: class 4's chips take no part
    assert per[0][3] == pytest.approx(auroc(va_y[rows] != 3, score[rows]), abs=1e-12)
    assert min(per[1].values()) > 0.95
    with pytest.raises(ValueError, match="unseen"):
        score_unseen_classes(zeros(tr_x), tr_x, tr_y, zeros(va_x), va_x, va_y, [2], cands, OODConfig())


# ----------------------------------------------------------------------------- stages on tiny data


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny synthetic data WITHOUT test_truth.csv, and the three training stages run on it."""
    from pipeline.data.synth import generate
    from stages import distill_sar, finetune_head, pretrain_eo

    root = tmp_path_factory.mktemp("ood_stages")
    generate(root / "data", "tiny", seed=5)
    (root / "data" / "test_truth.csv").unlink()  # no test labels anywhere from here on
    for stage in (pretrain_eo, distill_sar, finetune_head):
        assert stage.main(_argv(root)) == 0
    return root


def _argv(root, *extra: str) -> list[str]:
    return ["--data", str(root / "data"), "--profile", "tiny", "--weights", str(root / "weights"),
            "--cache-dir", str(root / "cache"), *extra]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ")
    return err[-1]


def test_infer_with_knn_scores_equal_a_detector_refitted_by_hand(trained, capsys):
    import json

    import pandas as pd
    import torch
    from safetensors.torch import load_file

    from pipeline.data.datasets import ChipDataset
    from pipeline.models import model_from_spec
    from pipeline.ood import load_detector
    from pipeline.stage import build_parser, prepare_stage
    from pipeline.tta import predict_tta
    from stages import infer

    subs = trained / "subs"
    assert infer.main(_argv(trained, "--submissions", str(subs), "--run", "knn",
                            "--set", "infer.ood.method=knn", "--set", "infer.ood.knn_k=2")) == 0
    run = subs / "knn"
    results = pd.read_csv(run / "results.csv")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ood"]["detector"] == "knn" and summary["ood"]["params"]["k"] == 2
    assert summary["ood"]["state_file"] == "ood_detector.npz"

    # by hand: the final model, the training split, TTA-averaged embeddings, brute-force 2-NN cosine
    weights = trained / "weights"
    spec = json.loads((weights / "sar_final.json").read_text())["model"]
    model = model_from_spec(spec)
    model.load_state_dict(load_file(str(weights / "sar_final.safetensors")))
    model.eval()
    ctx = prepare_stage("infer", build_parser("infer", None).parse_args(_argv(trained)))
    train_rows, _ = ctx.data.train_val_rows("sar")
    assert summary["ood"]["fitted_on_chips"] == len(train_rows)
    tta = ctx.cfg.infer.tta
    norm = (spec["norm"]["mean"], spec["norm"]["std"])

    def embed(images, rows):
        ds = ChipDataset(images, rows, np.zeros(len(rows), np.int64), norm=norm)
        x = torch.stack([ds[i]["image"] for i in range(len(ds))])
        return predict_tta(model, x, tta.views, tta.scales, tta.average).embeddings.numpy()

    bank = embed(ctx.packed.train_sar, ctx.packed.train_index["sar_row"].to_numpy()[train_rows])
    test = embed(ctx.packed.test_sar, ctx.packed.test_index["sar_row"].to_numpy())
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    expected = np.sort(unit(test) @ unit(bank).T, axis=1)[:, -2]
    by_id = results.set_index("image_id")["score"]
    np.testing.assert_allclose(by_id.loc[ctx.packed.test_index["image_id"].to_numpy()].to_numpy(), expected, atol=1e-4)
    assert np.ptp(expected) > 1e-3  # the comparison is not between constants
    saved = load_detector(run / "ood_detector.npz")
    np.testing.assert_allclose(saved.score(embeddings=test), expected, atol=1e-4)


def test_select_ood_runs_without_test_labels_and_infer_auto_uses_its_choice(trained, capsys):
    import json

    from pipeline.ood import DETECTORS
    from stages import infer, select_ood

    assert not (trained / "data" / "test_truth.csv").exists()
    fewer = ("--set", "select_ood.candidates=[energy,knn]")  # every detector: the toy test above; here the plumbing
    assert select_ood.main(_argv(trained, *fewer)) == 0
    out = capsys.readouterr().out
    assert "mean AUROC" in out and "TTA views" in out and "proxy model 1/" in out
    with np.load(trained / "weights" / "ood_embeddings.npz", allow_pickle=False) as cache:
        assert "train_emb" not in cache.files  # with proxies, the final model's splits are not embedded (only the views)
    choice = json.loads((trained / "weights" / "ood_choice.json").read_text())
    assert choice["method"] in DETECTORS
    labels = [row["label"] for row in choice["table"]]
    assert labels == ["energy", "knn(k=1)", "knn(k=2)"]
    assert len(choice["left_out"]) >= 3
    for row in choice["table"]:
        assert set(row["per_class"]) == set(choice["left_out"])
    assert choice["mean_auroc"] == max(row["mean_auroc"] for row in choice["table"])

    assert select_ood.main(_argv(trained, *fewer)) == 0  # the second run reads the cached embeddings
    second = capsys.readouterr().out
    assert "TTA views" not in second and "proxy model 1/" not in second

    subs = trained / "subs"
    assert infer.main(_argv(trained, "--submissions", str(subs), "--run", "auto", "--set", "infer.ood.method=auto")) == 0
    summary = json.loads((subs / "auto" / "summary.json").read_text())
    assert summary["ood"]["detector"] == choice["method"]
    assert summary["ood"]["method"] == "auto" and summary["inputs"]["ood_choice"]["method"] == choice["method"]
    for key, value in choice["params"].items():
        assert summary["ood"]["params"][key] == value

    (trained / "weights" / "ood_choice.json").write_text(json.dumps({**choice, "model_sha256": "0" * 64}))
    with pytest.raises(SystemExit):
        infer.main(_argv(trained, "--submissions", str(subs), "--set", "infer.ood.method=auto"))
    line = _error_line(capsys)
    assert "another sar_final" in line and "stages.select_ood" in line


def test_select_ood_and_infer_fit_the_hypersphere_on_virtual_anomalies(trained, capsys):
    import json

    from pipeline.ood import load_detector
    from stages import infer, select_ood

    assert not (trained / "data" / "test_truth.csv").exists()
    fast = ("--set", "infer.ood.hypersphere_steps=30")
    loo = ("--set", "select_ood.proxy_folds=0")  # the final model's embeddings, one class left out at a time
    assert select_ood.main(_argv(trained, "--set", "select_ood.candidates=[energy,hypersphere]", *loo, *fast)) == 0
    out = capsys.readouterr().out
    assert "virtual anomalies" in out
    choice = json.loads((trained / "weights" / "ood_choice.json").read_text())
    assert [row["label"] for row in choice["table"]] == ["energy", "hypersphere"]
    row = choice["table"][1]
    assert set(row["per_class"]) == set(choice["left_out"]) and all(0.0 <= a <= 1.0 for a in row["per_class"].values())
    with np.load(trained / "weights" / "ood_embeddings.npz", allow_pickle=False) as cache:
        assert len(cache["anomaly_emb"]) == len(cache["train_emb"])  # anomalies_per_chip 1.0
        assert cache["anomaly_source_labels"].shape == (len(cache["train_emb"]), 2)

    subs = trained / "subs"
    assert infer.main(_argv(trained, "--submissions", str(subs), "--run", "hyper", "--set", "infer.ood.method=hypersphere", *fast)) == 0
    summary = json.loads((subs / "hyper" / "summary.json").read_text())
    assert summary["ood"]["detector"] == "hypersphere" and summary["ood"]["params"]["steps"] == 30
    detector = load_detector(subs / "hyper" / "ood_detector.npz")
    assert detector.w1.shape[1] == detector.params()["hidden"]


def test_run_all_runs_select_ood_before_infer_when_the_method_is_auto(trained, tmp_path):
    import json
    import shutil

    from pipeline import run_all

    parse = run_all.build_parser().parse_args
    assert run_all.selected_stages(parse(["--profile", "tiny"])) == ["pretrain_eo", "distill_sar", "finetune_head", "infer"]
    auto = ["--profile", "tiny", "--set", "infer.ood.method=auto"]
    assert run_all.selected_stages(parse(auto)) == ["pretrain_eo", "distill_sar", "finetune_head", "select_ood", "infer"]
    assert run_all.selected_stages(parse([*auto, "--only", "infer"])) == ["select_ood", "infer"]
    assert "select_ood" not in run_all.selected_stages(parse([*auto, "--only", "distill_sar"]))

    weights = tmp_path / "weights"  # the trained model without any ood_choice.json
    shutil.copytree(trained / "weights", weights, ignore=shutil.ignore_patterns("ood_*"))
    subs = tmp_path / "subs"
    argv = ["--data", str(trained / "data"), "--weights", str(weights), "--cache-dir", str(trained / "cache"),
            "--submissions", str(subs), *auto, "--set", "select_ood.candidates=[energy,msp]", "--only", "infer"]
    assert run_all.main(argv) == 0
    choice = json.loads((weights / "ood_choice.json").read_text())
    summary = json.loads(run_all.latest_submission(subs).joinpath("summary.json").read_text())
    assert choice["method"] in ("energy", "msp") and summary["ood"]["detector"] == choice["method"]


def test_select_ood_embeds_with_the_views_infer_chooses(trained, capsys):
    """infer.tta.views auto: select_ood resolves the views on validation as infer does, and records them."""
    import json

    from stages import infer, select_ood

    auto = ("--set", "infer.tta.views=auto", "--set", "select_ood.candidates=[energy]")
    assert select_ood.main(_argv(trained, *auto)) == 0
    assert "chosen on validation" in capsys.readouterr().out
    choice = json.loads((trained / "weights" / "ood_choice.json").read_text())
    subs = trained / "subs"
    assert infer.main(_argv(trained, *auto, "--submissions", str(subs), "--run", "tta-auto")) == 0
    summary = json.loads((subs / "tta-auto" / "summary.json").read_text())
    assert summary["tta"]["auto"] and choice["tta_views"] == summary["tta"]["views"]
    with np.load(trained / "weights" / "ood_embeddings.npz", allow_pickle=False) as cache:
        assert list(cache["views"]) == summary["tta"]["views"]


def test_select_ood_with_proxy_folds_scores_classes_its_proxy_models_never_saw(trained, capsys, monkeypatch):
    import json

    from stages import select_ood

    seen_in_training: list[set[int]] = []  # labels of each proxy's training and epoch-selection batches
    real_fit = select_ood.fit

    def recording_fit(task, train_loader, val_loader, *args, **kwargs):
        seen_in_training.append({int(y) for loader in (train_loader, val_loader) for b in loader for y in b["label"]})
        return real_fit(task, train_loader, val_loader, *args, **kwargs)

    monkeypatch.setattr(select_ood, "fit", recording_fit)

    proxy = ("--set", "select_ood.candidates=[energy,knn,hypersphere]", "--set", "select_ood.knn_k=[1]",
             "--set", "select_ood.proxy_folds=2", "--set", "select_ood.proxy_left_out=1",
             "--set", "select_ood.proxy_epochs=1", "--set", "infer.ood.hypersphere_steps=20")
    assert select_ood.main(_argv(trained, *proxy)) == 0
    out = capsys.readouterr().out
    assert "proxy model 1/2 without" in out and "proxy model 2/2 without" in out and "proxy models, each trained without" in out
    choice = json.loads((trained / "weights" / "ood_choice.json").read_text())
    assert choice["validation"] == "proxy_folds"
    groups = choice["proxy_groups"]
    assert len(groups) == 2 and all(len(g) == 1 for g in groups) and groups[0] != groups[1]
    assert sorted(choice["left_out"]) == sorted(g[0] for g in groups)
    for row in choice["table"]:
        assert set(row["per_class"]) == set(choice["left_out"]) and all(0.0 <= a <= 1.0 for a in row["per_class"].values())
    assert choice["mean_auroc"] == max(row["mean_auroc"] for row in choice["table"])
    names = json.loads((trained / "weights" / "sar_final.json").read_text())["dataset"]["classes"]
    with np.load(trained / "weights" / "ood_proxy_embeddings.npz", allow_pickle=False) as cache:
        for f, group in enumerate(groups):
            unseen = names.index(group[0])
            assert unseen not in cache[f"fold{f}_train_labels"]  # the proxy never trained on its unseen class
            assert unseen in cache[f"fold{f}_val_labels"]  # ... whose validation chips it scores
            assert len(cache[f"fold{f}_anomaly_emb"]) == len(cache[f"fold{f}_train_labels"])
    assert not list((trained / "weights").glob(".ood_proxy_*"))  # the proxies' training files are gone
    assert len(seen_in_training) == 2
    for labels, group in zip(seen_in_training, groups):
        assert names.index(group[0]) not in labels and len(labels) >= 2

    fewer = (*proxy, "--set", "select_ood.candidates=[energy,hypersphere]")  # other candidates, same proxies
    assert select_ood.main(_argv(trained, *fewer)) == 0  # the second run reads the cached proxy embeddings
    assert "proxy model 1/2" not in capsys.readouterr().out
    assert [row["label"] for row in json.loads((trained / "weights" / "ood_choice.json").read_text())["table"]] == ["energy", "hypersphere"]
    # what the proxies never read does not retrain them; what changes their outputs does
    assert select_ood.main(_argv(trained, *fewer, "--set", "distill_sar.distill.kd_weight=0.25")) == 0
    assert "proxy model 1/2" not in capsys.readouterr().out and len(seen_in_training) == 2
    assert select_ood.main(_argv(trained, *fewer, "--set", "infer.tta.scales=[1.0,0.9]")) == 0
    assert "proxy model 1/2" in capsys.readouterr().out and len(seen_in_training) == 4

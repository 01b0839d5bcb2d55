"""Stage scripts in-process on tiny data: manifests, parent checks, frozen parts, SAR-only path."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline.data.synth import generate
from stages import distill_sar, finetune_head, infer, pretrain_eo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    generate(root / "data", "tiny", seed=5)
    return root


@pytest.fixture(scope="module")
def teacher_weights(tiny) -> Path:
    """The EO teacher of the `tiny` dataset, trained once for this module (weights in tiny/weights)."""
    assert pretrain_eo.main(argv(tiny)) == 0
    return tiny / "weights"


def argv(root: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["--data", str(data or root / "data"), "--profile", "tiny", "--weights", str(root / "weights"),
            "--cache-dir", str(root / "cache"), *extra]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ")
    return err[-1]


def test_distill_without_teacher_names_pretrain_eo(tiny, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        distill_sar.main(argv(tiny, "--weights", str(tmp_path / "empty")))
    assert exc.value.code == 2
    assert "stages.pretrain_eo" in error_line(capsys)


def test_without_kd_and_features_no_teacher_is_trained_or_read(tiny, capsys, tmp_path):
    """kd_weight and feature_weight 0: pretrain_eo trains nothing and distill_sar trains on SAR labels alone."""
    off = ("--weights", str(tmp_path / "w"), "--set", "distill_sar.distill.kd_weight=0",
           "--set", "distill_sar.distill.feature_weight=0")
    assert pretrain_eo.main(argv(tiny, *off)) == 0
    assert "no term reads an EO teacher" in capsys.readouterr().out
    assert not (tmp_path / "w" / "eo_teacher.safetensors").exists()
    assert distill_sar.main(argv(tiny, *off)) == 0  # no eo_teacher needed (with KD on it stops, test above)
    assert "no teacher; training the SAR model on labels alone" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "w" / "sar_student.json").read_text())
    assert manifest["parents"] == {} and not manifest["distilled"]


def assert_plain_log(out: str, epochs: int) -> None:
    """stdout is not a terminal here: one plain line per epoch, no blank lines, no table cell cut short."""
    lines = out.splitlines()
    assert all(line.strip() for line in lines), "blank lines in the log"
    assert "…" not in out
    epochs_logged = [m.group(1) for line in lines if (m := re.search(r"INFO pipeline\.train: epoch +(\d+/\d+) ", line))]
    assert epochs_logged == [f"{e}/{epochs}" for e in range(1, epochs + 1)]


@pytest.mark.parametrize("resident", [False, True])
def test_min_steps_per_epoch_lowers_the_batch_so_an_epoch_takes_that_many_steps(tiny, tmp_path, caplog, resident):
    import logging

    import torch

    def steps(weights: Path, stage, artifact: str, *extra: str) -> int:
        sar_only = ("--weights", str(weights), "--set", "distill_sar.distill.kd_weight=0", "--set",
                    "distill_sar.distill.feature_weight=0", "--set", "distill_sar.batch_size=40",
                    "--set", f"data.resident={str(resident).lower()}", *extra)
        assert stage.main(argv(tiny, *sar_only)) == 0
        return int(torch.load(weights / f"{artifact}.resume.pt", weights_only=False)["global_step"])

    assert steps(tmp_path / "plain", distill_sar, "sar_student") == 1  # ~60 training chips, batch 40: one step
    capped = ("--set", "distill_sar.min_steps_per_epoch=3")
    with caplog.at_level(logging.INFO, logger="pipeline.data.module"):
        assert steps(tmp_path / "capped", distill_sar, "sar_student", *capped) == 3
    assert "batch size 40 -> 20" in caplog.text
    if not resident:  # finetune_head's fast path trains on cached embeddings through its own loader
        head = ("--set", "finetune_head.batch_size=64")
        assert steps(tmp_path / "capped", finetune_head, "sar_final", *capped, *head) == 1
        assert steps(tmp_path / "capped", finetune_head, "sar_final", *capped, *head, "--set", "finetune_head.min_steps_per_epoch=3") == 3


def test_train_batch_size_never_goes_below_16_and_leaves_fixed_step_epochs_alone() -> None:
    from pipeline.config import TrainConfig
    from pipeline.data.module import train_batch_size

    assert train_batch_size(TrainConfig(batch_size=512), 2000) == 512
    assert train_batch_size(TrainConfig(batch_size=512, min_steps_per_epoch=50), 2000) == 40
    assert train_batch_size(TrainConfig(batch_size=512, min_steps_per_epoch=50), 100_000) == 512
    assert train_batch_size(TrainConfig(batch_size=512, min_steps_per_epoch=50), 300) == 16
    assert train_batch_size(TrainConfig(batch_size=8, min_steps_per_epoch=50), 300) == 8
    assert train_batch_size(TrainConfig(batch_size=512, min_steps_per_epoch=50, steps_per_epoch=10), 2000) == 512


def test_stage_chain_manifests_and_frozen_parts(tiny, teacher_weights, capsys):
    weights = teacher_weights
    teacher = json.loads((weights / "eo_teacher.json").read_text())
    for field in ("stage", "config", "model", "dataset_fingerprint", "parents", "metrics", "code_version", "time", "weights_sha256", "split_sha256"):
        assert field in teacher
    assert teacher["model"]["timm_name"] == "resnet10t" and teacher["model"]["in_chans"] == 1
    assert set(teacher["config"]) == {"seed", "data", "augment", "model", "pretrain_eo"}
    assert (weights / "eo_teacher.metrics.csv").read_text().count("\n") >= 2
    teacher_bytes = (weights / "eo_teacher.safetensors").read_bytes()

    capsys.readouterr()
    assert distill_sar.main(argv(tiny, "--set", "distill_sar.epochs=2")) == 0
    assert_plain_log(capsys.readouterr().out, epochs=2)
    student = json.loads((weights / "sar_student.json").read_text())
    assert student["parents"] == {"eo_teacher": teacher["weights_sha256"]}
    assert student["distilled"] is True
    assert (weights / "eo_teacher.safetensors").read_bytes() == teacher_bytes

    assert finetune_head.main(argv(tiny)) == 0
    final = json.loads((weights / "sar_final.json").read_text())
    assert final["backbone_unchanged"] is True
    s, f = load_file(str(weights / "sar_student.safetensors")), load_file(str(weights / "sar_final.safetensors"))
    backbone = [k for k in s if not k.startswith("classifier.")]
    assert any("running_mean" in k for k in backbone)
    assert all(torch.equal(s[k], f[k]) for k in backbone)
    assert not torch.equal(s["classifier.weight"], f["classifier.weight"])

    capsys.readouterr()
    assert infer.main(argv(tiny, "--submissions", str(tiny / "subs"), "--run", "first")) == 0
    run = tiny / "subs" / "first"
    assert {"results.csv", "predictions.csv", "summary.json", "score.json"} <= {p.name for p in run.iterdir()}
    with pytest.raises(SystemExit) as exc:  # an existing submission folder is never overwritten
        infer.main(argv(tiny, "--submissions", str(tiny / "subs"), "--run", "first"))
    assert exc.value.code == 2 and "first" in error_line(capsys)


def test_foreign_teacher_is_refused(tiny, teacher_weights, capsys, tmp_path):
    other = tmp_path / "other"
    generate(other, "tiny", seed=6)
    weights = tmp_path / "w"
    weights.mkdir()
    for suffix in (".safetensors", ".json"):  # a teacher trained on `tiny`, intact
        shutil.copy(teacher_weights / f"eo_teacher{suffix}", weights)
    with pytest.raises(SystemExit) as exc:
        distill_sar.main(argv(tiny, "--weights", str(weights), data=other))
    assert exc.value.code == 2
    line = error_line(capsys)
    assert "another dataset" in line and "stages.pretrain_eo" in line


def test_missing_sar_final_names_finetune_head(tiny, capsys, tmp_path):
    with pytest.raises(SystemExit):
        infer.main(argv(tiny, "--weights", str(tmp_path / "none"), "--submissions", str(tmp_path / "s")))
    assert "stages.finetune_head" in error_line(capsys)


def test_sar_only_path_on_mstar(mstar_subset, tmp_path, capsys):
    args = ["--data", str(mstar_subset), "--profile", "tiny", "--weights", str(tmp_path / "w"),
            "--cache-dir", str(tmp_path / "cache"), "--holdout-classes", "BTR60,ZIL131",
            "--set", "pretrain_eo.steps_per_epoch=2", "--set", "distill_sar.steps_per_epoch=4"]
    assert pretrain_eo.main(args) == 0
    assert "no EO" in capsys.readouterr().out
    assert not (tmp_path / "w" / "eo_teacher.json").exists()
    assert distill_sar.main(args) == 0
    student = json.loads((tmp_path / "w" / "sar_student.json").read_text())
    assert student["distilled"] is False and student["parents"] == {}
    assert student["config"]["data"]["holdout_classes"] == ["BTR60", "ZIL131"]
    assert finetune_head.main(args) == 0
    assert infer.main(args + ["--submissions", str(tmp_path / "s"), "--run", "m"]) == 0
    score = json.loads((tmp_path / "s" / "m" / "score.json").read_text())
    assert np.isfinite(score["auroc"])  # held-out classes are the OOD rows


FAST = ("--set", "pretrain_eo.steps_per_epoch=2", "--set", "distill_sar.steps_per_epoch=2")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Its own data and weights (no other test's leftovers): eo_teacher, sar_student and sar_final, umask 022."""
    root = tmp_path_factory.mktemp("split_chain")
    generate(root / "data", "tiny", seed=5)
    old = os.umask(0o022)
    try:
        assert pretrain_eo.main(argv(root, *FAST)) == 0
        assert distill_sar.main(argv(root, *FAST)) == 0
        assert finetune_head.main(argv(root, *FAST)) == 0
    finally:
        os.umask(old)
    return root


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".lock")}


def test_every_artifact_file_gets_the_umask_mode(chain):
    files = [p for p in (chain / "weights").iterdir() if p.is_file()]
    assert {"eo_teacher.safetensors", "sar_student.safetensors", "sar_final.split.csv"} <= {p.name for p in files}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o644" for p in files}


@pytest.mark.parametrize(
    "stage, parent, producer, change",
    [
        (finetune_head, "sar_student", "distill_sar", ("--seed", "1")),
        (finetune_head, "sar_student", "distill_sar", ("--set", "data.val_fraction=0.5")),
        (distill_sar, "eo_teacher", "pretrain_eo", ("--seed", "1")),
    ],
    ids=["finetune_head-seed", "finetune_head-val_fraction", "distill_sar-seed"],
)
def test_a_parent_trained_on_another_split_is_refused(chain, capsys, stage, parent, producer, change):
    before = _snapshot(chain / "weights")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        stage.main(argv(chain, *FAST, *change))
    assert exc.value.code == 2
    line = error_line(capsys)
    assert f"{parent} was trained on another train/validation split" in line
    assert f"stages.{producer}" in line
    assert _snapshot(chain / "weights") == before  # nothing written, the split files of the artifacts included


def test_infer_on_a_flat_2022_style_folder_outside_the_data_root(chain, tmp_path, capsys):
    """Real 2022 test chips: SAR_<id>.png of 56-59 px (one blank), in a folder beside no training data."""
    import cv2

    from pipeline.data import transfer

    real = tmp_path / "mavoc2022" / "SAR"
    real.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [100578, 10079, 1066, 7]
    for image_id, side in zip(ids, (56, 57, 58, 59)):
        chip = rng.integers(40, 200, (side, side)).astype(np.uint8) if image_id != 7 else np.zeros((side, side), np.uint8)
        cv2.imwrite(str(real / f"SAR_{image_id}.png"), chip)
    (real.parent / "EO").mkdir()  # the sample's EO folder beside it is not read
    assert infer.main(argv(chain, "--test-dir", str(real), "--run", "real2022", "--submissions", str(tmp_path / "subs"),
                           *FAST)) == 0
    results = (tmp_path / "subs" / "real2022" / "results.csv").read_text().splitlines()
    assert results[0] == "image_id,class_id,score" and sorted(int(r.split(",")[0]) for r in results[1:]) == sorted(ids)
    shares = transfer.class_shares(tmp_path / "subs" / "real2022")
    assert shares.sum() == pytest.approx(1.0) and len(shares) == 10
    capsys.readouterr()
    transfer.main([str(tmp_path / "subs" / "real2022")])
    assert "predicted class shares" in capsys.readouterr().out


def test_infer_chooses_tta_views_on_validation_and_stays_fresh(chain, tmp_path, capsys):
    """infer.tta.views auto: the choice and every candidate's validation score in summary.json; a rerun with
    --skip-fresh is skipped (the config, not the choice, is the input)."""
    subs = tmp_path / "subs"
    flags = ("--set", "infer.tta.views=auto", "--set", "infer.cluster.enabled=false", "--submissions", str(subs))
    assert infer.main(argv(chain, *flags, "--run", "auto", *FAST)) == 0
    out = capsys.readouterr().out
    tta = json.loads((subs / "auto" / "summary.json").read_text())["tta"]
    assert tta["auto"] and "chosen on validation" in out
    rows = {r["views"]: r for r in tta["validation"]}
    assert set(rows) == {"identity", "identity+hflip", "identity+vflip", "identity+hflip+vflip+rot180",
                         "identity+shift_up+shift_down+shift_left+shift_right"}
    chosen = [name for name, r in rows.items() if r["chosen"]]
    assert chosen == ["+".join(tta["views"])]
    best = max(r["balanced_accuracy"] for r in rows.values())
    assert rows[chosen[0]]["balanced_accuracy"] == best and all(0 <= r["se"] < 1 and r["gain_se"] >= 0 for r in rows.values())
    assert infer.main(argv(chain, *flags, "--run", "again", "--skip-fresh", *FAST)) == 0
    assert "up to date" in capsys.readouterr().out and not (subs / "again").exists()

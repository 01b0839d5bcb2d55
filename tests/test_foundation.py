"""Class table, config profiles and overrides, metrics, artifact contract."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from pipeline import artifacts, classes, config, metrics
from pipeline.errors import UserError


def test_official_class_table_matches_design():
    assert classes.OFFICIAL_NAMES[0] == "sedan" and classes.OFFICIAL_NAMES[9] == "semi_w_trailer"
    assert sum(classes.OFFICIAL_COUNTS) == 455_635
    assert classes.official_class_id("Pickup-Truck") == 2
    assert classes.official_class_id("pickup truck w trailer") == 8
    assert classes.official_class_id("7") == 7
    assert classes.official_class_id("12") is None
    assert classes.official_class_id("tank") is None


def test_generic_class_table_ids_follow_names():
    table = classes.ClassTable(names=("2S1", "BMP2", "BTR_60"), official=False)
    assert table.id_of("bmp2") == 1 and table.id_of("btr-60") == 2 and table.id_of("T72") is None


@pytest.mark.parametrize("profile", ["quick", "full", "tiny"])
def test_profiles_share_one_schema(profile):
    def keys(d, p=""):
        return {p + k for k in d} | {x for k, v in d.items() if isinstance(v, dict) for x in keys(v, p + k + ".")}

    assert keys(config.load_config(profile)) == keys(config.load_config("quick"))


def test_overrides_parse_yaml_values_and_reject_unknown_keys():
    cfg = config.load_config("quick", ["pretrain_eo.epochs=7", "infer.tta.scales=[0.9, 1.0]", "model.init_weights=/x.safetensors"])
    assert cfg["pretrain_eo"]["epochs"] == 7
    assert cfg["infer"]["tta"]["scales"] == [0.9, 1.0]
    assert cfg["model"]["init_weights"] == "/x.safetensors"
    with pytest.raises(UserError, match="did you mean pretrain_eo.epochs"):
        config.load_config("quick", ["pretrain_eo.epoch=3"])
    with pytest.raises(UserError, match="key=value"):
        config.load_config("quick", ["pretrain_eo.epochs"])
    with pytest.raises(UserError, match="section"):
        config.load_config("quick", ["pretrain_eo.loss=3"])
    with pytest.raises(UserError, match="profile 'nope' not found"):
        config.load_config("nope")


def test_stage_config_holds_common_sections_and_own():
    sc = config.stage_config(config.load_config("quick"), "distill_sar")
    assert set(sc) == {"seed", "data", "augment", "model", "distill_sar"}


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    p = np.where(rng.random(300) < 0.6, y, rng.integers(0, 5, 300))
    m = metrics.classification_metrics(y, p, num_classes=6)  # class 5 absent: ignored
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", labels=range(5)))
    assert m["per_class_recall"][5] is None
    ind = rng.random(100) < 0.8
    s = rng.normal(size=100) + ind
    assert metrics.auroc(ind, s) == pytest.approx(roc_auc_score(ind, s))
    assert np.isnan(metrics.auroc(np.ones(4, bool), np.arange(4.0)))
    assert metrics.competition_score(0.6, 0.8) == pytest.approx(0.65)


def _manifest(fp="fp1", parents=None):
    return artifacts.make_manifest(
        "pretrain_eo", {"seed": 0}, {"timm_name": "resnet18"}, fp, parents or {}, {"balanced_accuracy": 0.5}
    )


def test_artifact_roundtrip_and_fields(tmp_path):
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    artifacts.save_artifact(tmp_path, "eo_teacher", sd, _manifest())
    loaded, man = artifacts.load_artifact(tmp_path, "eo_teacher", "fp1")
    assert torch.equal(loaded["w"], sd["w"])
    for field in ("stage", "config", "model", "dataset_fingerprint", "parents", "metrics", "code_version", "time", "weights_sha256"):
        assert field in man
    assert man["weights_sha256"] == artifacts.sha256_file(tmp_path / "eo_teacher.safetensors")
    assert not list(tmp_path.glob(".*tmp*"))


def test_missing_foreign_and_damaged_artifacts_name_the_stage(tmp_path):
    with pytest.raises(UserError, match=r"stages\.pretrain_eo"):
        artifacts.load_artifact(tmp_path, "eo_teacher")
    artifacts.save_artifact(tmp_path, "eo_teacher", {"w": torch.zeros(2)}, _manifest())
    with pytest.raises(UserError, match=r"another dataset.*stages\.pretrain_eo"):
        artifacts.load_artifact(tmp_path, "eo_teacher", "other-fp")
    (tmp_path / "eo_teacher.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="does not match its manifest"):
        artifacts.load_artifact(tmp_path, "eo_teacher")


def test_saving_again_keeps_previous_artifact(tmp_path):
    first = {"w": torch.arange(4.0), "b": torch.tensor([7.0])}
    artifacts.save_artifact(tmp_path, "sar_final", first, _manifest(fp="first"))
    first_sha = artifacts.sha256_file(tmp_path / "sar_final.safetensors")
    artifacts.save_artifact(tmp_path, "sar_final", {"w": torch.ones(4), "b": torch.zeros(1)}, _manifest(fp="second"))

    prev = load_file(str(tmp_path / "sar_final.prev.safetensors"))
    assert set(prev) == set(first) and all(torch.equal(prev[k], first[k]) for k in first)
    prev_manifest = json.loads((tmp_path / "sar_final.prev.json").read_text())
    assert prev_manifest["dataset_fingerprint"] == "first" and prev_manifest["weights_sha256"] == first_sha
    current, manifest = artifacts.load_artifact(tmp_path, "sar_final", "second")
    assert torch.equal(current["w"], torch.ones(4)) and manifest["dataset_fingerprint"] == "second"


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640)], ids=["umask022", "umask027"])
def test_artifact_files_get_the_umask_mode(tmp_path, mask, expected):
    old = os.umask(mask)
    try:
        artifacts.save_artifact(tmp_path, "eo_teacher", {"w": torch.zeros(2)}, _manifest())
        artifacts.save_artifact(tmp_path, "eo_teacher", {"w": torch.ones(2)}, _manifest())  # and the .prev pair
        artifacts.atomic_write(tmp_path / "eo_teacher.split.csv", "name,class_id\n")
        artifacts.atomic_write(tmp_path / "eo_teacher.resume.pt", lambda fh: torch.save({"epoch": 1}, fh))
    finally:
        os.umask(old)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["eo_teacher.json", "eo_teacher.prev.json", "eo_teacher.prev.safetensors",
                     "eo_teacher.resume.pt", "eo_teacher.safetensors", "eo_teacher.split.csv"]
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in tmp_path.iterdir()} == {f: oct(expected) for f in files}


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    artifacts.atomic_write(target, "old")

    def boom(fh):
        fh.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        artifacts.atomic_write(target, boom)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_freshness_by_content(tmp_path):
    cfg = {"seed": 0}
    artifacts.save_artifact(tmp_path, "eo_teacher", {"w": torch.zeros(2)}, _manifest(parents={"a": "1"}))
    assert artifacts.is_fresh(tmp_path, "eo_teacher", cfg, "fp1", {"a": "1"})
    assert not artifacts.is_fresh(tmp_path, "eo_teacher", {"seed": 1}, "fp1", {"a": "1"})
    assert not artifacts.is_fresh(tmp_path, "eo_teacher", cfg, "fp2", {"a": "1"})
    assert not artifacts.is_fresh(tmp_path, "eo_teacher", cfg, "fp1", {"a": "2"})
    assert not artifacts.is_fresh(tmp_path, "sar_student", cfg, "fp1", {})

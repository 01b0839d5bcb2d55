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
def test_profiles_resolve_to_the_one_schema(profile):
    cfg = config.load_config(profile)
    assert isinstance(cfg, config.Config) and isinstance(cfg.distill_sar.distill, config.DistillConfig)
    assert set(cfg.to_dict()) == set(config.Config.model_fields)


def test_defaults_live_in_the_schema_and_profiles_only_say_what_differs(tmp_path):
    assert config.load_config("quick") == config.Config()  # quick is the defaults
    assert config.Config().distill_sar.distill.feature_weight == 0.0  # one default, no second copy in code
    full = config.load_config("full")
    assert full.distill_sar.epochs == 40 and full.data.resident and full.model == config.Config().model
    described = config.describe(full)
    assert "epochs: 40" in described and "# KD temperature T" in described  # every key with its meaning


def test_overrides_parse_yaml_values_and_reject_unknown_keys():
    cfg = config.load_config("quick", ["pretrain_eo.epochs=7", "infer.tta.scales=[0.9, 1.0]", "model.init_weights=/x.safetensors"])
    assert cfg.pretrain_eo.epochs == 7
    assert cfg.infer.tta.scales == [0.9, 1.0]
    assert cfg.model.init_weights == "/x.safetensors"
    with pytest.raises(UserError, match="did you mean pretrain_eo.epochs"):
        config.load_config("quick", ["pretrain_eo.epoch=3"])
    with pytest.raises(UserError, match="key=value"):
        config.load_config("quick", ["pretrain_eo.epochs"])
    with pytest.raises(UserError, match="section"):
        config.load_config("quick", ["pretrain_eo.loss=3"])
    with pytest.raises(UserError, match="profile 'nope' not found"):
        config.load_config("nope")


@pytest.mark.parametrize(("override", "key"), [
    ("pretrain_eo.lr=fast", "pretrain_eo.lr"),  # wrong type
    ("data.eo_size=true", "data.eo_size"),  # a bool is not a size
    ("pretrain_eo.epochs=0", "pretrain_eo.epochs"),  # out of range
    ("augment.scale=1.5", "augment.scale"),
    ("infer.cluster.tau=2", "infer.cluster.tau"),
    ("infer.tta.views=[identity, spin]", "infer.tta.views"),
    ("infer.ood.method=openmax", "infer.ood.method"),
    ("data.sar_fit=stretch", "data.sar_fit"),
    ("distill_sar.loss.alpha=[1, -2]", "distill_sar.loss.alpha"),
])
def test_bad_values_stop_at_load_with_their_dotted_key(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        config.load_config("quick", [override])


def test_a_profile_file_is_checked_like_overrides(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("distill_sar:\n  epochs: 3\n  distill: {kd_weight: 0}\n")
    cfg = config.load_config(good)
    assert cfg.distill_sar.epochs == 3 and cfg.distill_sar.distill.kd_weight == 0 and cfg.distill_sar.distill.temperature == 2.0
    typo = tmp_path / "typo.yaml"
    typo.write_text("infer:\n  tta:\n    view: [identity]\n")
    with pytest.raises(UserError, match="infer.tta.view: no such config key.*did you mean infer.tta.views"):
        config.load_config(typo)
    assert config.with_overrides(cfg, {"seed": 3}).seed == 3
    with pytest.raises(UserError, match="seed"):
        config.with_overrides(cfg, {"seed": -1})


def test_stage_config_holds_common_sections_and_own():
    sc = config.stage_config(config.load_config("quick"), "distill_sar")
    assert set(sc) == {"seed", "data", "augment", "model", "distill_sar"}
    assert sc["distill_sar"]["distill"]["temperature"] == 2.0  # plain data, as manifests store it


def test_stage_registry_is_the_one_stage_graph():
    from pipeline import artifacts, registry, run_all

    assert registry.PIPELINE == ("pretrain_eo", "distill_sar", "finetune_head", "infer")
    for name in registry.PIPELINE[1:]:
        parents = registry.STAGES[name].parents
        assert parents and all(p in registry.STAGE_OF_ARTIFACT for p in parents)  # every parent is written upstream
    assert artifacts.ARTIFACT_OF_STAGE is registry.ARTIFACT_OF_STAGE
    assert run_all.build_parser().parse_args(["--from", "finetune_head"]).from_stage == "finetune_head"
    assert run_all.selected_stages(run_all.build_parser().parse_args(["--from", "finetune_head"])) == ["finetune_head", "select_ood", "infer"]


def test_shared_flags_are_declared_once_and_forwarded_exactly(tmp_path):
    import argparse

    from pipeline import cli, run_all

    argv = ["--data", str(tmp_path), "--profile", "tiny", "--set", "seed=2", "--set", "data.val_fraction=0.3",
            "--holdout-classes", "a,b", "--skip-bad", "--cache-dir", str(tmp_path / "c")]
    stage_args = cli.add_run_flags(argparse.ArgumentParser()).parse_args(argv)
    forwarded = cli.forward_run_flags(stage_args)
    assert cli.add_run_flags(argparse.ArgumentParser()).parse_args(forwarded) == stage_args
    cmd = run_all.stage_command("distill_sar", run_all.build_parser().parse_args(argv), tmp_path)
    assert cmd[cmd.index("stages.distill_sar") + 1:][:len(forwarded)] == forwarded


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

"""stages.robustness and adversarial distill_sar on tiny synthetic data; run_all's robustness hook."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from pipeline.data.synth import generate
from pipeline.run_all import build_parser as run_all_parser
from pipeline.run_all import selected_stages
from stages import distill_sar, finetune_head, pretrain_eo, robustness

FAST = ("--set", "pretrain_eo.steps_per_epoch=2", "--set", "distill_sar.steps_per_epoch=2")


def argv(root: Path, *extra: str) -> list[str]:
    return ["--data", str(root / "data"), "--profile", "tiny", "--weights", str(root / "weights"),
            "--cache-dir", str(root / "cache"), *FAST, *extra]


@pytest.fixture(scope="module")
def adversarial_chain(tmp_path_factory) -> Path:
    """eo_teacher, then a sar_student distilled with PGD adversarial training, then sar_final."""
    root = tmp_path_factory.mktemp("robust")
    generate(root / "data", "tiny", seed=5)
    assert pretrain_eo.main(argv(root)) == 0
    assert distill_sar.main(argv(root, "--set", "distill_sar.adversarial.kind=pgd", "--set", "distill_sar.adversarial.steps=2")) == 0
    assert finetune_head.main(argv(root)) == 0
    return root


def test_robustness_stage_writes_csv_plot_and_skips_when_fresh(adversarial_chain, capsys) -> None:
    root = adversarial_chain
    assert robustness.main(argv(root)) == 0
    table = pd.read_csv(root / "weights" / "sar_final.robustness.csv")
    assert set(table["split"]) == {"validation", "test"}
    for split, part in table.groupby("split"):
        assert list(part["attack"].unique()) == ["clean", "fgsm", "pgd-2", "pgd-3"]
        assert sorted(part.loc[part["attack"] != "clean", "eps_255"].unique()) == [2.0, 8.0]
        assert part["chips"].max() <= 8 and part["accuracy"].between(0, 1).all()
    assert (root / "weights" / "sar_final.robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "accuracy under L-inf attacks" in out and "pgd-3" in out
    assert robustness.main(argv(root, "--skip-fresh")) == 0
    assert "up to date" in capsys.readouterr().out
    assert robustness.main(argv(root, "--artifact", "sar_student", "--set", "robustness.pgd_steps=[1]")) == 0
    assert set(pd.read_csv(root / "weights" / "sar_student.robustness.csv")["attack"]) == {"clean", "fgsm", "pgd-1"}


def test_bad_settings_stop_with_one_line(adversarial_chain, capsys) -> None:
    root = adversarial_chain
    with pytest.raises(SystemExit) as exit_info:
        distill_sar.main(argv(root, "--set", "distill_sar.adversarial.kind=trades"))
    assert exit_info.value.code == 2
    assert "distill_sar.adversarial.kind" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        robustness.main(argv(root, "--set", "robustness.eps=[0]"))
    assert "robustness.eps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        robustness.main(argv(root, "--artifact", "nothing_here"))
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit):
        distill_sar.main(argv(root, "--set", "distill_sar.freeze_layers=1"))
    assert "model.init_weights" in capsys.readouterr().err


def test_distill_from_a_timm_checkpoint_with_frozen_stem(adversarial_chain, tmp_path) -> None:
    root = adversarial_chain
    rgb = timm.create_model("resnet10t", pretrained=False, in_chans=3, num_classes=1000).state_dict()
    checkpoint = tmp_path / "resnet10t_rgb.safetensors"
    save_file(rgb, str(checkpoint))
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in ("eo_teacher.safetensors", "eo_teacher.json", "eo_teacher.split.csv"):
        (weights / name).write_bytes((root / "weights" / name).read_bytes())
    args = ["--data", str(root / "data"), "--profile", "tiny", "--weights", str(weights), "--cache-dir", str(root / "cache"),
            *FAST, "--set", f"model.init_weights={checkpoint}", "--set", "distill_sar.freeze_layers=1",
            "--set", "distill_sar.adversarial.kind=euc_at"]
    assert distill_sar.main(args) == 0
    student = load_file(str(weights / "sar_student.safetensors"))
    assert torch.equal(student["backbone.conv1.0.weight"], rgb["conv1.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(student["backbone.conv1.1.running_var"], rgb["conv1.1.running_var"])
    assert not torch.equal(student["backbone.conv1.3.weight"], rgb["conv1.3.weight"])


def test_run_all_runs_robustness_after_infer_only_when_enabled() -> None:
    off = run_all_parser().parse_args(["--profile", "tiny"])
    assert selected_stages(off)[-1] == "infer"
    on = run_all_parser().parse_args(["--profile", "tiny", "--set", "robustness.enabled=true"])
    assert selected_stages(on)[-2:] == ["infer", "robustness"]
    assert "robustness" not in selected_stages(run_all_parser().parse_args(
        ["--profile", "tiny", "--set", "robustness.enabled=true", "--only", "distill_sar"]))

"""Ablation runner: variants x seeds through run_all, shared artifacts, paired differences, CSV + plot."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.ablate import FULL, VARIANTS, paired_difference, resolved_config, select_variants, summarise, weights_key
from pipeline.data.synth import generate
from pipeline.errors import UserError
from pipeline.experiment import RunOptions, mean_se

REPO = Path(__file__).resolve().parent.parent


def _row(variant: str, seed: int, val: float, score: float = 0.5) -> dict:
    return {"variant": variant, "seed": seed, "val_balanced_accuracy": val, "test_competition_score": score,
            "test_accuracy": 0.4, "test_auroc": 0.6, "student_val_balanced_accuracy": val, "seconds": 1.0,
            "exit": 0, "same_as": ""}


def test_paired_difference_uses_per_seed_differences() -> None:
    rows = [_row(FULL, 0, 0.50), _row(FULL, 1, 0.60), _row(FULL, 2, 0.70),
            _row("no-kd", 0, 0.52), _row("no-kd", 1, 0.61), _row("no-kd", 2, 0.73)]
    mean, se = paired_difference(rows, "no-kd", "val_balanced_accuracy")
    diffs = [0.02, 0.01, 0.03]
    assert mean == pytest.approx(sum(diffs) / 3)
    assert se == pytest.approx(mean_se(diffs)[1])
    # the unpaired s.e. would be ten times larger: seeds move both variants together
    assert se < 0.2 * mean_se([0.52, 0.61, 0.73])[1]
    summary = summarise(rows, [FULL, "no-kd"])
    assert summary[0]["val_balanced_accuracy_diff"] == 0.0
    assert summary[1]["val_balanced_accuracy_diff"] == pytest.approx(0.02)
    assert summary[1]["seeds"] == 3
    assert math.isnan(paired_difference(rows, "voting", "val_balanced_accuracy")[0])


def test_variant_selection_and_shared_weights_keys() -> None:
    options = RunOptions(data=Path("."), profile="tiny")
    base = resolved_config(options, [], 0)
    names, left_out = select_variants(["no-voting", "adv-fgsm", "no-kd"], base)
    assert names[0] == FULL and "no-voting" in names and "no-kd" in names
    assert left_out == []  # distill_sar.adversarial exists: the adversarial variants are offered
    with pytest.raises(UserError, match="unknown variant"):
        select_variants(["no-such-trick"], base)
    key = {n: weights_key(resolved_config(options, VARIANTS[n].overrides, 0)) for n in
           (FULL, "no-voting", "ood-msp", "pseudo-labels", "no-kd")}
    # infer / finetune-only variants share the full pipeline's weights; a distillation change does not
    assert key[FULL] == key["no-voting"] == key["ood-msp"] == key["pseudo-labels"] != key["no-kd"]
    assert weights_key(resolved_config(options, [], 1)) != key[FULL]  # one folder per seed


def test_ablate_smoke_tiny_two_seeds(tmp_path: Path) -> None:
    generate(tmp_path / "data", "tiny", seed=3)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "pipeline.ablate", "--data", str(tmp_path / "data"), "--profile", "tiny",
           "--seeds", "2", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
           "--variants", "full,no-voting,ood-energy"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with (out / "ablation.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["variant"], int(r["seed"])) for r in rows} == {
        (v, s) for v in (FULL, "no-voting", "ood-energy") for s in (0, 1)}
    for r in rows:
        assert r["exit"] == "0"
        for key in ("val_balanced_accuracy", "test_accuracy", "test_auroc", "test_competition_score", "seconds"):
            assert math.isfinite(float(r[key])), (r["variant"], key)
    by = {(r["variant"], int(r["seed"])): r for r in rows}
    for seed in (0, 1):
        assert by[(FULL, seed)]["stages_run"].split() == ["pretrain_eo", "distill_sar", "finetune_head", "infer"]
        assert by[("no-voting", seed)]["stages_run"] == "infer"  # trained stages reused
        assert by[("no-voting", seed)]["val_balanced_accuracy"] == by[(FULL, seed)]["val_balanced_accuracy"]
        assert by[("ood-energy", seed)]["same_as"] == FULL  # the tiny profile scores with energy already
    assert (out / "ablation.png").stat().st_size > 1000
    assert "ablation on data" in done.stdout and "Δ val vs full" in done.stdout
    with (out / "ablation_summary.csv").open() as fh:
        summary = {r["variant"]: r for r in csv.DictReader(fh)}
    assert set(summary) == {FULL, "no-voting", "ood-energy"}
    assert summary["no-voting"]["seeds"] == "2" and summary["no-voting"]["val_balanced_accuracy_diff"] == "0.0"
    # a rerun with the same --out finds every row done and runs nothing
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "ablate: full seed" not in again.stdout


def test_ablate_bad_input_is_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "pipeline.ablate", "--data", str(tmp_path / "nowhere"),
                           "--profile", "tiny", "--seeds", "1", "--out", str(tmp_path / "o")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: --data") and "Traceback" not in done.stderr


def test_experiment_runs_train_one_model_per_seed_whatever_the_profile_and_refuse_an_ensemble(tmp_path) -> None:
    """The full profile averages 3 seeds; an experiment's runs are seeds themselves, so each trains one model into
    weights/ (whose manifests it reads its validation figures from); a variant asking for more is refused."""
    from pipeline.config import load_config
    from pipeline.experiment import run_all_command
    from pipeline.run_all import build_parser, member_runs

    options = RunOptions(data=tmp_path, profile="full", overrides=["infer.batch_size=64"])
    assert load_config("full", []).ensemble.members == 3
    cmd = run_all_command(options, [], seed=1, weights=tmp_path / "w", submissions=tmp_path / "s", force=False)
    args = build_parser().parse_args(cmd[3:])
    assert load_config(args.profile, args.overrides).ensemble.members == 1
    (member,) = member_runs(args)
    assert member.weights == tmp_path / "w" and member.seed == 1
    for variant, extra in ((["ensemble.members=2"], []), ([], [" ensemble.members = 3"])):
        with pytest.raises(UserError, match="ensemble.members"):
            run_all_command(RunOptions(data=tmp_path, overrides=extra), variant, seed=1, weights=tmp_path / "w",
                            submissions=tmp_path / "s", force=False)

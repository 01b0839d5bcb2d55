"""End to end: run_all on a tiny synthetic dataset with the tiny profile (one epoch per stage)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import run_all as run_all_module
from pipeline.artifacts import make_manifest, save_artifact
from pipeline.data.synth import generate
from pipeline.errors import UserError
from pipeline.submission import read_truth, score_submission, validate_submission
from fake_data import make_generic

REPO = Path(__file__).resolve().parent.parent
MANIFESTS = ("eo_teacher", "sar_student", "sar_final")
STAGE_ARTIFACT = {"pretrain_eo": "eo_teacher", "distill_sar": "sar_student", "finetune_head": "sar_final"}


def run_all(*args: str, cwd: Path = REPO, pythonpath: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in (REPO, *pythonpath)))
    return subprocess.run(
        [sys.executable, "-m", "pipeline.run_all", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    generate(root / "data", "tiny", seed=3)
    return root


def flags(ws: Path) -> list[str]:
    return ["--data", str(ws / "data"), "--profile", "tiny", "--weights", str(ws / "weights"),
            "--submissions", str(ws / "subs"), "--cache-dir", str(ws / "cache")]


def manifest_times(ws: Path) -> dict[str, str]:
    return {n: json.loads((ws / "weights" / f"{n}.json").read_text())["time"] + str((ws / "weights" / f"{n}.json").stat().st_mtime_ns) for n in MANIFESTS}


def runs(ws: Path) -> list[str]:
    return sorted(p.name for p in (ws / "subs").iterdir() if p.is_dir())


def summary_rows(stdout: str) -> dict[str, list[str]]:
    """The run_all summary table as {stage: [status, seconds, val balanced acc]}."""
    table = stdout.split("run_all summary", 1)[1]
    rows = {}
    for line in table.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip().strip("│").split("│")]
            rows[cells[0]] = cells[1:]
    return rows


def manifest_metric(weights: Path, artifact: str) -> str:
    return f"{json.loads((weights / f'{artifact}.json').read_text())['metrics']['balanced_accuracy']:.3f}"


def assert_plain_log(stdout: str) -> None:
    """Output to a pipe reads like a log: no blank lines left by progress bars, no table cell cut short."""
    lines = stdout.splitlines()
    assert all(line.strip() for line in lines), "blank lines in the log"
    assert "…" not in stdout, "a table cell was cut"


def test_end_to_end_then_skip_then_force_infer(workspace):
    ws = workspace
    first = run_all(*flags(ws))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert_plain_log(first.stdout)
    rows = summary_rows(first.stdout)
    assert list(rows) == ["pretrain_eo", "distill_sar", "finetune_head", "infer", "total"]
    for stage, artifact in STAGE_ARTIFACT.items():  # every stage ran; its metric is its artifact's
        assert rows[stage][0] == "ran" and rows[stage][2] == manifest_metric(ws / "weights", artifact), stage
    assert rows["infer"][0] == "ran"
    (run,) = runs(ws)
    run_dir = ws / "subs" / run
    assert f"report: {run_dir / 'report.html'}" in first.stdout.split("run_all summary", 1)[1]  # linked from the summary
    assert (run_dir / "report.html").is_file() and (run_dir / "plots" / "confusion_counts.png").is_file()
    results = pd.read_csv(run_dir / "results.csv")
    truth = read_truth(ws / "data" / "test_truth.csv")
    test_images = sorted((ws / "data" / "SAR_Test").glob("*.png"))
    assert len(results) == len(test_images) == len(truth)
    assert sorted(results["image_id"]) == sorted(int(p.stem.removeprefix("Gotcha")) for p in test_images)
    validate_submission(results, truth["image_id"], num_classes=10)
    # score.json is the score of results.csv against the truth, and is what the summary line says
    score = json.loads((run_dir / "score.json").read_text())
    again = score_submission(results, truth, num_classes=10)
    for key in ("competition_score", "accuracy", "auroc", "balanced_accuracy"):
        assert score[key] == pytest.approx(again[key], abs=1e-12), key
    assert score["confusion_matrix"] == again["confusion_matrix"]
    assert (f"accuracy {score['accuracy']:.4f}  AUROC {score['auroc']:.4f}  "
            f"competition score {score['competition_score']:.4f}") in first.stdout
    assert json.loads((run_dir / "summary.json").read_text())["score"]["competition_score"] == pytest.approx(score["competition_score"])
    # results.csv is the per-image table: labels after voting, energy (T=1 in tiny) of the logits
    predictions = pd.read_csv(run_dir / "predictions.csv")
    assert predictions["image_id"].tolist() == results["image_id"].tolist()
    logits = predictions[[f"logit_{c}" for c in range(10)]].to_numpy()
    assert (predictions["label_before"] == logits.argmax(axis=1)).all()
    assert (predictions["label_after"] == results["class_id"]).all()
    assert (predictions["changed"] == (predictions["label_before"] != predictions["label_after"])).all()
    top = logits.max(axis=1)
    energy = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))  # T·logsumexp(logits/T), T = 1
    np.testing.assert_allclose(results["score"], energy, rtol=0, atol=1e-6)
    before = manifest_times(ws)

    second = run_all(*flags(ws))
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("skipped") >= 4
    summary = second.stdout.split("run_all summary", 1)[1]
    assert summary.count("up to date") == 4 and " ran " not in summary
    assert manifest_times(ws) == before and runs(ws) == [run]

    forced = run_all(*flags(ws), "--force", "--only", "infer")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert manifest_times(ws) == before and len(runs(ws)) == 2
    assert "│ ran " in forced.stdout.split("run_all summary", 1)[1]


def test_changed_training_image_reruns_everything_downstream(workspace):
    ws = workspace
    assert run_all(*flags(ws)).returncode == 0
    before = manifest_times(ws)
    chip = sorted((ws / "data" / "SAR_Train" / "bus").glob("*.png"))[0]
    image = cv2.imread(str(chip), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(chip), 255 - image)
    again = run_all(*flags(ws))
    assert again.returncode == 0, again.stderr[-3000:]
    after = manifest_times(ws)
    assert all(after[n] != before[n] for n in MANIFESTS)


# Loaded by every python process started with this folder on PYTHONPATH: in the finetune_head stage
# process, every training loss becomes NaN, so the stage fails inside its training loop (the guard
# in pipeline/train.py stops it), after its config, data and parent were all accepted.
NAN_LOSS_HOOK = """
import sys
if "stages.finetune_head" in sys.orig_argv:
    import pipeline.tasks as tasks
    for cls in (tasks.ClassifierTask, tasks.HeadTask):
        def loss(self, batch, module=None, _loss=cls.loss):
            total, parts = _loss(self, batch, module)
            return total * float("nan"), parts
        cls.loss = loss
"""


def weights_files(ws: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((ws / "weights").iterdir()) if p.is_file()}


def test_failure_in_stage_3_keeps_earlier_artifacts_and_rerun_continues(workspace, tmp_path):
    ws = workspace
    assert run_all(*flags(ws)).returncode == 0
    before = manifest_times(ws)
    files_before = weights_files(ws)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NAN_LOSS_HOOK)
    failed = run_all(*flags(ws), "--force", "--from", "finetune_head", pythonpath=(hook,))
    assert failed.returncode == 2, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "finetune_head failed" in failed.stdout
    rows = summary_rows(failed.stdout)  # the table so far, the failed stage saying so
    assert list(rows) == ["finetune_head", "total"] and rows["finetune_head"][0] == "failed (exit 2)"
    assert failed.stderr.strip().splitlines()[-1].startswith("error: training diverged: non-finite loss at epoch 1")
    assert "Traceback" not in failed.stderr
    # every artifact file is as it was, byte for byte: no partial sar_final, no temporary or .prev file
    assert weights_files(ws) == files_before
    assert manifest_times(ws) == before
    rerun = run_all(*flags(ws), "--force", "--from", "finetune_head")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    final = manifest_times(ws)
    assert final["eo_teacher"] == before["eo_teacher"] and final["sar_final"] != before["sar_final"]


def test_nonexistent_data_is_one_line_and_nonzero():
    result = run_all("--data", "/nonexistent/data")
    assert result.returncode != 0
    lines = [l for l in result.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and "/nonexistent/data" in lines[0]


def test_run_all_sh_help_works():
    result = subprocess.run(["bash", str(REPO / "run_all.sh"), "--help"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "--from" in result.stdout and "--gpus" in result.stdout


def fake_foreign_eo_teacher(weights: Path) -> None:
    """An eo_teacher as left in weights/ by an earlier run on another dataset (its metric 0.460)."""
    manifest = make_manifest("pretrain_eo", {}, {"timm_name": "resnet10t"}, "f" * 64, {}, {"balanced_accuracy": 0.4604})
    save_artifact(weights, "eo_teacher", {"w": torch.zeros(2)}, manifest)


def test_sar_only_labelled_test_without_ood_chips(tmp_path):
    """MSTAR-like: SAR only, labelled test split of training classes only; a foreign EO teacher in weights/."""
    data = make_generic(tmp_path / "data", train={"a_cls": 8, "b_cls": 8}, test={"a_cls": 3, "b_cls": 3},
                        shape=(24, 24), suffix=".png")
    fake_foreign_eo_teacher(tmp_path / "weights")
    result = run_all("--data", str(data), "--train-dir", "train", "--test-dir", "test", "--profile", "tiny",
                     "--weights", str(tmp_path / "weights"), "--submissions", str(tmp_path / "subs"),
                     "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert_plain_log(result.stdout)
    rows = summary_rows(result.stdout)
    assert rows["pretrain_eo"][0] == "skipped (no EO chips)" and rows["pretrain_eo"][2] in ("", "-")
    assert "0.460" not in result.stdout.split("run_all summary", 1)[1]
    for stage in ("distill_sar", "finetune_head"):
        assert rows[stage][0] == "ran" and rows[stage][2] == manifest_metric(tmp_path / "weights", STAGE_ARTIFACT[stage])
    run = tmp_path / "subs" / (tmp_path / "subs" / "latest.txt").read_text().strip()
    score = json.loads((run / "score.json").read_text())
    assert score["auroc"] is None and score["counts"]["ood"] == 0
    assert (f"submission: accuracy {score['accuracy']:.4f}  balanced accuracy {score['balanced_accuracy']:.4f}  "
            "AUROC n/a (no out-of-distribution test chips)") in result.stdout


def test_score_line_and_stage_metric_need_this_dataset(tmp_path):
    line = run_all_module.score_line({"accuracy": 0.5, "auroc": None, "competition_score": None, "balanced_accuracy": 0.25})
    assert line == "submission: accuracy 0.5000  balanced accuracy 0.2500  AUROC n/a (no out-of-distribution test chips)"
    fake_foreign_eo_teacher(tmp_path)
    assert run_all_module.stage_metric("pretrain_eo", tmp_path, "f" * 64) == "0.460"
    assert run_all_module.stage_metric("pretrain_eo", tmp_path, "0" * 64) == "-"  # made from another dataset
    assert run_all_module.stage_metric("pretrain_eo", tmp_path, None) == "-"  # the stage did not say


def test_more_gpus_than_visible_stops_before_torchrun(tmp_path, monkeypatch, capsys):
    data = make_generic(tmp_path / "data")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    def no_launch(*args, **kwargs):
        raise AssertionError(f"a stage was launched: {args[0]}")
    monkeypatch.setattr(subprocess, "call", no_launch)
    for device in ("auto", "cuda"):
        with pytest.raises(SystemExit) as exc:
            run_all_module.main(["--gpus", "4", "--device", device, "--data", str(data), "--weights", str(tmp_path / "w"),
                                 "--submissions", str(tmp_path / "subs")])
        assert exc.value.code == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --gpus 4: more processes than GPUs (1 CUDA device(s) visible)")
        assert "--device cpu" in lines[0]
    args = run_all_module.build_parser().parse_args(["--gpus", "4", "--device", "cpu"])
    run_all_module.check_gpus(args)  # N CPU processes (gloo) when asked for explicitly
    with pytest.raises(UserError, match="at least 1"):
        run_all_module.check_gpus(run_all_module.build_parser().parse_args(["--gpus", "0"]))


def test_more_gpus_than_visible_is_one_line_from_the_command_line(tmp_path):
    gpus = max(2, torch.cuda.device_count() + 1)
    result = run_all("--gpus", str(gpus), "--data", str(make_generic(tmp_path / "data")), "--weights", str(tmp_path / "w"),
                     "--submissions", str(tmp_path / "subs"), "--cache-dir", str(tmp_path / "cache"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "more processes than GPUs" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr and result.stdout == ""
    assert not any((tmp_path / d).exists() for d in ("w", "subs", "cache"))


def test_outdated_default_dataset_is_regenerated_and_user_data_never(tmp_path, monkeypatch):
    from rich.console import Console

    from pipeline.data import synth

    default = tmp_path / "data" / "synthetic"
    generate(default, "tiny", seed=0, workers=1)
    info_path = default / "synth_info.json"
    info = json.loads(info_path.read_text())
    del info["generator_version"]  # as written by generator version 1
    info_path.write_text(json.dumps(info))
    (default / "stale.txt").write_text("from the old generator")
    monkeypatch.setattr(run_all_module, "DEFAULT_DATA", default)
    console = Console(record=True, width=300)
    args = run_all_module.build_parser().parse_args(["--synth-scale", "tiny"])
    assert run_all_module.ensure_data(args, console) == default
    printed = console.export_text()
    assert "version 1" in printed and f"current one is {synth.GENERATOR_VERSION}" in printed
    assert len(printed.strip().splitlines()) == 1
    assert not (default / "stale.txt").exists()
    assert run_all_module.synthetic_version(default) == synth.GENERATOR_VERSION
    assert sorted(p.name for p in default.parent.iterdir()) == ["synthetic"]  # no temporary folder left
    again = Console(record=True, width=300)
    run_all_module.ensure_data(args, again)  # up to date: untouched, silent
    assert again.export_text() == ""
    user = tmp_path / "mine"
    generate(user, "tiny", seed=0, workers=1)
    (user / "synth_info.json").write_text(json.dumps(info))  # an old version, but the user's own --data
    mine = run_all_module.build_parser().parse_args(["--data", str(user)])
    assert run_all_module.ensure_data(mine, console) == user
    assert "generator_version" not in json.loads((user / "synth_info.json").read_text())


# In the finetune_head process of seed 4 only, every training loss becomes NaN (see NAN_LOSS_HOOK).
NAN_LOSS_HOOK_SEED_4 = NAN_LOSS_HOOK.replace(
    'if "stages.finetune_head" in sys.orig_argv:',
    'if "stages.finetune_head" in sys.orig_argv and sys.orig_argv[sys.orig_argv.index("--seed") + 1] == "4":')


def test_ensemble_members_train_one_model_per_seed_and_submit_their_average(tmp_path):
    """ensemble.members 2: seeds 3 and 4 each in weights/seed<S>, submissions/seed<S>; the submission is their
    average. A failure in the second model keeps the first, and the rerun picks up where it stopped."""
    data = make_generic(tmp_path / "data", train={"a_cls": 8, "b_cls": 8}, test={"a_cls": 3, "b_cls": 3},
                        shape=(24, 24), suffix=".png")
    weights, subs = tmp_path / "weights", tmp_path / "subs"
    argv = ("--data", str(data), "--train-dir", "train", "--test-dir", "test", "--profile", "tiny", "--seed", "3",
            "--set", "ensemble.members=2", "--weights", str(weights), "--submissions", str(subs),
            "--cache-dir", str(tmp_path / "cache"))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NAN_LOSS_HOOK_SEED_4)
    failed = run_all(*argv, pythonpath=(hook,))
    assert failed.returncode == 2, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "stage finetune_head (seed 4) failed" in failed.stdout and "Traceback" not in failed.stderr
    assert summary_rows(failed.stdout)["finetune_head (seed 4)"][0] == "failed (exit 2)"
    assert (weights / "seed3" / "sar_final.json").is_file() and not (weights / "seed4" / "sar_final.json").exists()
    assert (subs / "seed3" / "latest.txt").is_file() and not (subs / "latest.txt").exists()  # no ensemble of one
    first_member = (subs / "seed3" / "latest.txt").read_text()

    result = run_all(*argv)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_plain_log(result.stdout)
    rows = summary_rows(result.stdout)
    stages = ["pretrain_eo", "distill_sar", "finetune_head", "infer"]
    assert list(rows) == [f"{s} (seed {seed})" for seed in (3, 4) for s in stages] + ["ensemble", "total"]
    assert all(rows[f"{s} (seed 3)"][0] != "ran" for s in stages)  # the first model was kept
    assert rows["distill_sar (seed 4)"][0] == "up to date" and rows["finetune_head (seed 4)"][0] == "ran"
    assert rows["infer (seed 4)"][0] == "ran" and rows["ensemble"][0] == "ran"
    assert (subs / "seed3" / "latest.txt").read_text() == first_member
    for seed in (3, 4):  # each model trained with its own seed, in its own folder
        assert json.loads((weights / f"seed{seed}" / "sar_final.json").read_text())["config"]["seed"] == seed
        assert rows[f"finetune_head (seed {seed})"][2] == manifest_metric(weights / f"seed{seed}", "sar_final")
    members = [subs / f"seed{seed}" / (subs / f"seed{seed}" / "latest.txt").read_text().strip() for seed in (3, 4)]
    run = subs / (subs / "latest.txt").read_text().strip()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ensemble"]["members"] == [str(m.resolve()) for m in members]
    probs = np.mean([pd.read_csv(m / "predictions.csv")[["prob_0", "prob_1"]].to_numpy() for m in members], axis=0)
    results = pd.read_csv(run / "results.csv")
    assert (results["class_id"].to_numpy() == probs.argmax(axis=1)).all()
    score = json.loads((run / "score.json").read_text())
    assert f"balanced accuracy {score['balanced_accuracy']:.4f}" in result.stdout.split("run_all summary", 1)[1]
    assert f"results: {run / 'results.csv'}" in result.stdout
    assert sorted(p.name for p in subs.iterdir() if p.is_dir()) == sorted(["seed3", "seed4", run.name])


def test_ensemble_members_seeds_folders_and_command(tmp_path):
    """Seeds start at --seed, else at the config's seed (profile or --set); each member has its own folders; the
    ensemble reuses an earlier one of the same members unless --force."""
    parse = run_all_module.build_parser().parse_args
    base = ["--profile", "tiny", "--weights", str(tmp_path / "w"), "--submissions", str(tmp_path / "s")]
    assert run_all_module.member_runs(parse(base)) == [parse(base)]  # one model: the folders as given
    for extra, seeds in ((["--set", "ensemble.members=3"], [0, 1, 2]),
                         (["--set", "ensemble.members=2", "--set", "seed=7"], [7, 8]),
                         (["--set", "ensemble.members=2", "--set", "seed=7", "--seed", "2"], [2, 3])):
        args = parse([*base, *extra])
        members = run_all_module.member_runs(args)
        assert [m.seed for m in members] == seeds
        assert [m.weights for m in members] == [tmp_path / "w" / f"seed{s}" for s in seeds]
        assert [m.submissions for m in members] == [tmp_path / "s" / f"seed{s}" for s in seeds]
        assert all(m.profile == "tiny" and m.overrides == args.overrides for m in members)
        cmd = run_all_module.ensemble_command(args, members)
        assert cmd[3:] == [*(str(tmp_path / "s" / f"seed{s}") for s in seeds), "--submissions", str(tmp_path / "s"),
                           "--latest", "--skip-fresh"]
        assert "--skip-fresh" not in run_all_module.ensemble_command(parse([*base, *extra, "--force"]), members)

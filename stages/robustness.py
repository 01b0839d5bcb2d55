"""Accuracy of a stage artifact under FGSM and PGD attacks over an epsilon grid.

Loads weights/sar_final (or --artifact NAME) and measures clean, FGSM and PGD-k accuracy (k from
robustness.pgd_steps) at every robustness.eps (1/255 units of the [0, 1] chip) on the validation split
and, when its truth is known, the labelled test split (in-distribution chips only). Single views, model
in eval mode. Writes weights/<artifact>.robustness.csv, .robustness.png (accuracy vs epsilon per
attack) and .robustness.json (inputs, for --skip-fresh), and prints the table.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import numpy as np
from rich.table import Table

from pipeline import distributed
from pipeline.artifacts import atomic_write_text, code_version
from pipeline.data.datasets import ChipDataset
from pipeline.errors import UserError, exit_on_user_error
from pipeline.robust.evaluate import RobustnessSettings, evaluate_split, subsample, write_csv, write_plot
from pipeline.stage import build_parser, check_parent_split, holds_weights_lock, load_model, parent_digest, prepare_stage

STAGE = "robustness"
DEFAULT_ARTIFACT = "sar_final"


def output_paths(weights_dir: Path, artifact: str) -> dict[str, Path]:
    """The files this stage writes beside `artifact`."""
    return {ext: weights_dir / f"{artifact}.robustness.{ext}" for ext in ("csv", "png", "json")}


def results_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column in ("split", "attack", "eps", "accuracy", "chips", "s"):
        table.add_column(column, justify="left" if column in ("split", "attack") else "right")
    for r in rows:
        eps = "-" if r["attack"] == "clean" else f"{r['eps_255']:g}/255"
        table.add_row(r["split"], r["attack"], eps, f"{r['accuracy']:.4f}", str(r["chips"]), f"{r['seconds']:.1f}")
    return table


@exit_on_user_error
@holds_weights_lock
def main(argv: list[str] | None = None) -> int:
    parser = build_parser(STAGE, __doc__)
    parser.add_argument("--artifact", default=DEFAULT_ARTIFACT, help="name of the artifact in --weights to attack")
    args = parser.parse_args(argv)
    if distributed.is_distributed():
        raise UserError(f"{STAGE} runs as one process: python -m stages.{STAGE} (not torchrun)")
    ctx = prepare_stage(STAGE, args)
    settings = RobustnessSettings.from_config(ctx.stage_cfg.model_dump())
    name = args.artifact
    model_sha = parent_digest(ctx, name)
    model, manifest = load_model(ctx, name)
    split_sha = check_parent_split(ctx, name, manifest)  # attacking chips the model trained on would flatter it
    modality = str(manifest.get("modality", "sar"))
    paths = output_paths(ctx.weights_dir, name)
    inputs = {"artifact": name, "model_sha256": model_sha, "config": ctx.recorded_config, "split_sha256": split_sha,
              "test_fingerprint": ctx.packed.test_fingerprint}
    if ctx.skip_fresh and all(p.is_file() for p in paths.values()):
        try:
            if json.loads(paths["json"].read_text()).get("inputs") == json.loads(json.dumps(inputs)):
                ctx.console.print(f"[green]{STAGE}[/]: {paths['csv']} is up to date (same model, config and data), skipped")
                return 0
        except (OSError, json.JSONDecodeError):
            pass

    spec = manifest["model"]
    model.eval()
    norm = (float(spec["norm"]["mean"]), float(spec["norm"]["std"]))

    splits = []
    _, val_rows = ctx.data.train_val_rows(modality)
    val_rows = val_rows[subsample(len(val_rows), settings.max_chips, ctx.seed)]
    splits.append(("validation", ctx.data.chip_dataset(modality, val_rows, augment=False)))
    test = ctx.packed.test_index
    labelled = np.flatnonzero(test["class_id"].to_numpy() >= 0) if len(test) else np.zeros(0, np.int64)
    if modality == "sar" and len(labelled):
        labelled = labelled[subsample(len(labelled), settings.max_chips, ctx.seed)]
        part = test.iloc[labelled]
        splits.append(("test", ChipDataset(ctx.packed.test_sar, part["sar_row"].to_numpy(), part["class_id"].to_numpy(),
                                           norm=norm, augment=None, seed=ctx.seed)))
    else:
        ctx.console.print(f"{STAGE}: no labelled in-distribution {modality.upper()} test chips: validation split only")

    rows = []
    for split, dataset in splits:
        ctx.console.print(
            f"{STAGE}: {name} on {len(dataset)} {split} chips: clean, "
            + ", ".join(a if a == "fgsm" else f"pgd-{k}" for a, k in settings.attacks())
            + f" at eps {', '.join(f'{e * 255:g}' for e in settings.eps)} /255"
        )
        rows += evaluate_split(model, dataset, norm, settings, ctx.device, ctx.seed, split)

    title = f"{name}: accuracy under L-inf attacks"
    write_csv(paths["csv"], rows)
    write_plot(paths["png"], rows, title)
    atomic_write_text(paths["json"], json.dumps({
        "inputs": inputs, "rows": rows, "code_version": code_version(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }, indent=2))
    ctx.console.print(results_table(rows, title))
    ctx.console.print(f"[green]{STAGE}[/]: wrote {paths['csv']} and {paths['png']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

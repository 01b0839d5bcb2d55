"""The stage registry: name -> artifact it writes -> parents it reads -> what data it needs.

`run_all`, the freshness checks, `--from/--only`, the manifests and the tests all read this one table.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import UserError


@dataclass(frozen=True)
class StageSpec:
    """One stage: `python -m stages.<name>`."""

    name: str
    artifact: str | None  # what it writes to the weights folder (None: a submission folder / a report)
    parents: tuple[str, ...]  # artifacts it reads
    modality: str  # the chips it trains or predicts on: eo | sar
    needs_eo: bool  # needs EO chips (stage 1 only)
    paired: bool  # needs EO/SAR pairs
    training: bool  # trains (takes --resume)
    summary: str


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec("pretrain_eo", "eo_teacher", (), "eo", True, False, True, "EO teacher, focal loss, weighted sampling"),
        StageSpec("distill_sar", "sar_student", ("eo_teacher",), "sar", False, True, True, "KL distillation of the EO teacher into a SAR student"),
        StageSpec("finetune_head", "sar_final", ("sar_student",), "sar", False, False, True, "head-only, class-balanced fine-tuning"),
        StageSpec("infer", None, ("sar_final",), "sar", False, False, False, "TTA, cluster voting, OOD score, submission CSV"),
        StageSpec("select_ood", None, ("sar_final",), "sar", False, False, False, "choose infer.ood's detector on validation"),
        StageSpec("robustness", None, ("sar_final",), "sar", False, False, False, "FGSM/PGD accuracy over an epsilon grid"),
    )
}
# The four stages run_all runs, in order.
PIPELINE: tuple[str, ...] = ("pretrain_eo", "distill_sar", "finetune_head", "infer")
TRAINING_STAGES: tuple[str, ...] = tuple(name for name in PIPELINE if STAGES[name].training)
ARTIFACT_OF_STAGE: dict[str, str] = {s.name: s.artifact for s in STAGES.values() if s.artifact}
STAGE_OF_ARTIFACT: dict[str, str] = {artifact: stage for stage, artifact in ARTIFACT_OF_STAGE.items()}


def stage_spec(name: str) -> StageSpec:
    if name not in STAGES:
        raise UserError(f"unknown stage '{name}': expected one of {', '.join(STAGES)}")
    return STAGES[name]

"""The one config schema: typed sections with their defaults, loaded from a YAML profile plus `--set`.

Every default lives here (the profiles in `pipeline/profiles/` only say what differs from it), and
everything is validated once, at load: an unknown key (with a suggestion), a wrong type or an
out-of-range value stops with one line naming its dotted key. Stages and library functions receive
the typed sections (`cfg.data`, `cfg.distill_sar.loss`, ...). `python -m pipeline.config --profile P`
prints a profile resolved, one comment per key.

pydantic (not dataclasses) because it gives type coercion, range checks and the dotted location of
every error for free.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import UserError

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
NonNegative = Annotated[float, Field(ge=0.0)]
Positive = Annotated[float, Field(gt=0.0)]
Auto = Literal["auto"]

VIEWS = ("identity", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "transverse",
         "shift_up", "shift_down", "shift_left", "shift_right")
OOD_METHODS = ("energy", "msp", "maxlogit", "knn", "mahalanobis", "vim", "hypersphere")
ANOMALY_KINDS = ("cutpaste", "shuffle", "mix")  # pipeline/ood/anomalies.py


class Section(BaseModel):
    """A config section: unknown keys are errors; ints and floats are not taken from strings or bools."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


def _f(default: Any, description: str, **kw: Any) -> Any:
    return Field(default=default, description=description, **kw)


class DataConfig(Section):
    eo_size: Union[PositiveInt, Auto] = _f("auto", "EO model window in px, or auto (eo_auto_fraction x the median chip side)")
    eo_fit: Literal["resize", "crop", "pad"] = _f("crop", "resize | crop (centre-crop/reflect-pad, no resampling) | pad (black padding)")
    eo_margin: NonNegative = _f(0.1, "translation margin around the window: px, or a fraction of the window below 1")
    eo_auto_fraction: Annotated[float, Field(gt=0.0, le=1.5)] = _f(1.0, "auto window = this fraction of the median chip side")
    eo_auto_max: Union[Annotated[int, Field(ge=8)], None] = _f(None, "auto windows are at most this many px (null: no cap)")
    sar_size: Union[PositiveInt, Auto] = _f("auto", "SAR model window in px, or auto")
    sar_fit: Literal["resize", "crop", "pad"] = _f("crop", "as eo_fit")
    sar_margin: NonNegative = _f(0.07, "fraction of the window: 6 px each side of an 88-px window, 4 px of a 55-px one")
    sar_auto_fraction: Annotated[float, Field(gt=0.0, le=1.5)] = _f(1.0, "as eo_auto_fraction")
    sar_auto_max: Union[Annotated[int, Field(ge=8)], None] = _f(88, "MSTAR 128-px chips: the 88-px A-ConvNets window; 55-px competition chips: whole")
    intensity: Literal["none", "standardize", "log"] = _f("standardize", "per-chip intensity: none | standardize | log (log, then standardize)")
    interpolation: Literal["area", "bilinear", "nearest", "bicubic"] = _f("area", "resize interpolation")
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = _f(0.15, "stratified hold-out of training pairs, the same for every stage")
    val_min_per_class: Annotated[int, Field(ge=0)] = _f(20, "validation floor per class (at most a third of the class)")
    val_fold: Annotated[int, Field(ge=0)] = _f(
        0, "which block of each class's seeded permutation is the validation split (0: the default); with val_fraction "
        "1/k and val_min_per_class 0, folds 0..k-1 are k-fold cross-validation (python -m pipeline.bench models --folds k)"
    )
    holdout_classes: list[Union[str, int]] = _f([], "class names/ids removed from training and treated as OOD at test")
    resident: bool = _f(False, "hold packed training chips on the device and augment there (GPU)")
    num_workers: Annotated[int, Field(ge=0)] = _f(0, "DataLoader workers")

    def geometry_keys(self, modality: str) -> dict[str, Any]:
        """The `<modality>_*` chip-geometry settings without their prefix."""
        names = ("size", "fit", "margin", "auto_fraction", "auto_max")
        return {n: getattr(self, f"{modality}_{n}") for n in names}


class AugmentSection(Section):
    hflip: bool = _f(False, "flips and quarter turns: off (radar shadows fall one way; chosen on validation)")
    vflip: bool = _f(False, "vertical flips")
    rot90: bool = _f(False, "random quarter turns")
    shift: Fraction = _f(0.0, "max affine translation, fraction of the chip (the window crop translates already)")
    scale: Fraction = _f(0.0, "max relative zoom in/out (off: chips keep their physical scale)")
    rotate: NonNegative = _f(0.0, "max extra rotation in degrees (on top of 90-degree steps)")
    eo_brightness_contrast: Annotated[float, Field(ge=0.0, le=1.0)] = _f(0.2, "EO brightness/contrast jitter")
    eo_noise: NonNegative = _f(0.02, "std of additive Gaussian noise on [0,1] EO")
    sar_speckle: Fraction = _f(0.15, "std of multiplicative (speckle-like) noise on SAR")
    sar_gamma: Fraction = _f(0.2, "random gamma in [1-g, 1+g] on SAR")


class ModelConfig(Section):
    name: str = _f("aconvnet_fast", "any timm model name; aconvnet(_fast, _wide): compact nets for small chips (pipeline/nets.py)")
    small_input: bool = _f(False, "ResNet family only: replace the stride-4 stem by a stride-1 stem")
    drop_rate: Fraction = _f(0.1, "dropout before the classifier")
    init_weights: Union[str, None] = _f(None, "local .safetensors / timm checkpoint; nothing ever downloads")


class LossConfig(Section):
    kind: Literal["focal", "ce", "ice"] = _f("focal", "focal | ce | ice (improved cross-entropy: ce + (max_k p_k - p_y), Bahri et al. 2019)")
    gamma: NonNegative = _f(2.0, "focal exponent")
    alpha: Union[Literal["none", "inverse_freq", "effective_number"], list[NonNegative]] = _f(
        "none", "per-class weights: none | inverse_freq | effective_number | [a0, ..., aC-1] (the sampler already rebalances)"
    )
    beta: Fraction = _f(0.999, "effective-number beta (Cui et al.)")
    label_smoothing: Fraction = _f(0.0, "label smoothing of the target")
    logit_norm: Union[Positive, None] = _f(
        None, "LogitNorm (Wei et al. 2022): the loss reads logits / (tau * ||logits||); tau here (paper: 0.04), null = off"
    )


class SamplerConfig(Section):
    kind: Literal["weighted", "balanced", "uniform"] = _f("weighted", "weighted | balanced | uniform")
    power: NonNegative = _f(0.5, "weights = count^-power: 1 inverse frequency, 0.5 square root")


class TrainConfig(Section):
    """What every training stage reads: schedule, optimizer, loss and sampler."""

    epochs: PositiveInt = _f(8, "training epochs")
    batch_size: PositiveInt = _f(128, "batch size (per process)")
    optimizer: Literal["adamw", "sgd"] = _f("adamw", "adamw | sgd")
    lr: Positive = _f(0.002, "peak learning rate")
    weight_decay: NonNegative = _f(0.05, "weight decay (not on norms and biases)")
    warmup_epochs: NonNegative = _f(0.5, "linear warm-up, in epochs (fractions allowed)")
    ema: Fraction = _f(0.0, "EMA decay of weights; 0 = off")
    clip_grad: NonNegative = _f(5.0, "gradient-norm clipping; 0 = off")
    steps_per_epoch: Union[PositiveInt, None] = _f(None, "null = one pass over the sampled training set")
    min_steps_per_epoch: Union[PositiveInt, None] = _f(
        None, "with steps_per_epoch null: lower the batch size (not below 16) until one pass takes at least this many "
        "steps, so a large-batch profile still takes enough steps on a small data set; null = batch_size as given"
    )
    loss: LossConfig = Field(default_factory=LossConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)


class DistillConfig(Section):
    temperature: Positive = _f(2.0, "KD temperature T; the KL term is scaled by T^2")
    kd_weight: NonNegative = _f(
        0.0, "weight of T^2 * KL(teacher || student); 0 = off, the default: KD lowered validation balanced accuracy "
        "by 0.036 +- 0.009 over 3 seeds on the quick replica (README, Ablation); 0.5 with this recipe to turn it on"
    )
    gate: Literal["none", "correct", "confidence"] = _f(
        "confidence", "KD per pair gated by the teacher: none | correct (only where it is right) | confidence (its probability of the true class)"
    )
    feature_norm: Literal["none", "batch", "running"] = _f(
        "batch", "teacher features (and the projection) centred and standardised by batch or running statistics: no bias shortcut"
    )
    supervised_weight: NonNegative = _f(1.0, "weight of the supervised loss")
    feature_weight: NonNegative = _f(
        0.0, "weight of the feature-alignment term; 0 = off, the default: on the quick v2 replica over 3 seeds it changed validation "
        "balanced accuracy by +0.001 +- 0.008 (README, Ablation), no gain larger than its s.e.; 0.5 to turn it on. With kd_weight "
        "0 too, no term reads the EO teacher: pretrain_eo skips and distill_sar trains on SAR labels alone"
    )
    feature_loss: Literal["cosine", "mse"] = _f("cosine", "cosine | mse")

    @property
    def uses_teacher(self) -> bool:
        """Whether any term reads the EO teacher (KD or feature alignment)."""
        return self.kd_weight > 0 or self.feature_weight > 0


class OutlierExposureConfig(Section):
    weight: NonNegative = _f(0.0, "weight of KL(uniform || softmax) on virtual anomalies of the batch; 0 = off")
    per_batch: Annotated[float, Field(gt=0.0, le=1.0)] = _f(0.5, "anomalies made per step, as a fraction of the batch")
    kinds: Annotated[list[Literal[ANOMALY_KINDS]], Field(min_length=1)] = _f(  # type: ignore[valid-type]
        list(ANOMALY_KINDS), "virtual anomalies (pipeline/ood/anomalies.py): cutpaste | shuffle | mix"
    )


class AdversarialConfig(Section):
    """Adversarial training of the SAR student (pipeline.robust.training)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, populate_by_name=True)
    kind: Literal["none", "fgsm", "pgd", "euc_at", "lipschitz"] = _f(
        "none", "none | fgsm (random start) | pgd (Madry) | euc_at (Xue et al. 2025: + lambda * ||g(x) - g(x+d)||) | lipschitz (Chan-Hon-Tong et al.)"
    )
    eps: Annotated[float, Field(gt=0.0, le=255.0)] = _f(8.0, "L-inf radius in 1/255 units of the [0, 1] chip")
    steps: PositiveInt = _f(1, "attack steps (pgd, euc_at)")
    step_size: Union[Positive, Auto] = _f("auto", "step as a fraction of eps, or auto")
    fraction: Annotated[float, Field(gt=0.0, le=1.0)] = _f(1.0, "share of each batch attacked (or penalised)")
    lambda_: NonNegative = Field(0.8, alias="lambda", description="euc_at / lipschitz: weight of the extra term")
    ramp_epochs: Annotated[int, Field(ge=0)] = _f(
        0, "eps and lambda grow linearly over the first N epochs (epoch e of N uses (e+1)/N of them); 0 = full strength from the start"
    )


class DistillStageConfig(TrainConfig):
    epochs: PositiveInt = _f(
        32, "training epochs; 32 over 24: MSTAR 5-fold validation, balanced accuracy +0.0015 +- 0.0009 paired (README, Benchmarks)"
    )
    batch_size: PositiveInt = _f(
        32, "batch size (per process); 32 over 128: on MSTAR validation, 3 seeds, balanced accuracy +0.005 +- 0.003 and NLL -0.033 +- 0.001 (README, Benchmarks)"
    )
    loss: LossConfig = Field(
        default_factory=lambda: LossConfig(kind="ce", label_smoothing=0.1),
        description="supervised loss; default cross-entropy with label smoothing 0.1 (over focal: MSTAR validation, README, Benchmarks)",
    )
    distill: DistillConfig = Field(default_factory=DistillConfig)
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)
    freeze_layers: Annotated[int, Field(ge=0)] = _f(0, "keep the first N convolutions of a pretrained student (model.init_weights) fixed")
    outlier_exposure: OutlierExposureConfig = Field(default_factory=OutlierExposureConfig)


class PseudoLabelConfig(Section):
    enabled: bool = _f(False, "confident, in-distribution-looking test chips join the head's training (fast path only)")
    min_confidence: Union[Annotated[float, Field(ge=0.0, le=1.0)], Auto] = _f(
        "auto", "a probability, or auto: the lowest validation confidence whose precision reaches target_precision"
    )
    target_precision: Annotated[float, Field(gt=0.0, le=1.0)] = _f(0.9, "min_confidence auto: precision wanted on validation")
    ood_quantile: Fraction = _f(0.1, "energy floor: this quantile of validation energies; 0 = no floor")
    max_per_class: Union[PositiveInt, None] = _f(None, "at most this many pseudo-labelled chips per class; null = no cap")


class FinetuneStageConfig(TrainConfig):
    epochs: PositiveInt = _f(6, "training epochs")
    batch_size: PositiveInt = _f(256, "batch size (per process)")
    lr: Positive = _f(0.003, "peak learning rate")
    weight_decay: NonNegative = _f(0.0001, "weight decay (not on norms and biases)")
    warmup_epochs: NonNegative = _f(0.0, "linear warm-up, in epochs")
    loss: LossConfig = Field(default_factory=lambda: LossConfig(kind="ce"))
    sampler: SamplerConfig = Field(default_factory=lambda: SamplerConfig(kind="balanced", power=1.0))
    augment: bool = _f(False, "false = fast path: embed training chips once, train the head on the cache")
    aug_copies: Annotated[int, Field(ge=0)] = _f(0, "fast path: K extra augmented embeddings per chip")
    pseudo_labels: PseudoLabelConfig = Field(default_factory=PseudoLabelConfig)


ViewSet = Annotated[list[Literal[VIEWS]], Field(min_length=1)]  # type: ignore[valid-type]
SHIFT_VIEW_SET = ["identity", "shift_up", "shift_down", "shift_left", "shift_right"]
TTA_CANDIDATES = [["identity"], ["identity", "hflip"], ["identity", "vflip"], ["identity", "hflip", "vflip", "rot180"], SHIFT_VIEW_SET]


class TTAConfig(Section):
    views: Union[ViewSet, Auto] = _f(
        "auto", f"views averaged at test: a list of {' | '.join(VIEWS)} (only views the model was trained to see), or auto: "
        "the candidate set with the highest validation balanced accuracy (another set than infer.tta.baseline only if it beats it)"
    )
    candidates: Annotated[list[ViewSet], Field(min_length=1)] = _f(
        TTA_CANDIDATES, "views auto: the view sets compared on the validation split (identity alone and the baseline are always compared too)"
    )
    baseline: ViewSet = _f(
        ["identity"], "views auto: the set kept unless a candidate beats it on validation (and used without a validation split); "
        "identity alone: on the quick replica's validation the shift set was 0.010 +- 0.004 below it (3 seeds). On MSTAR, whose "
        "split saturates, the shift set gains +0.0018 +- 0.0005 for single models on a 3-fold CV, not for 3-seed ensembles (README, TTA)"
    )
    min_gain_se: NonNegative = _f(
        1.0, "views auto: a set replaces the baseline only if its validation gain exceeds this many paired standard errors (0: any gain)"
    )
    scales: Annotated[list[Positive], Field(min_length=1)] = _f([1.0], "rescaled views (1.0: chips keep their physical scale)")
    average: Literal["logits", "probs"] = _f("logits", "average logits or probabilities over views")


class ClusterConfig(Section):
    enabled: bool = _f(False, "winner-take-all voting; off by default (README: Ablation)")
    k: Union[PositiveInt, Literal["auto", "validation"]] = _f(
        "validation", "k-means clusters: an integer, auto (sqrt rule) or validation (mean cluster size chosen by simulated voting on the validation split)"
    )
    tau: Union[Annotated[float, Field(ge=0.0, le=1.0)], Auto] = _f("auto", "confidence needed to vote, or auto: tau_quantile of the validation confidences")
    tau_quantile: Annotated[float, Field(ge=0.0, le=1.0)] = _f(0.5, "tau auto: this quantile of validation confidences")
    ood_quantile: Fraction = _f(0.1, "chips scoring below this quantile of validation OOD scores are not clustered; 0 = all")
    cluster_sizes: Annotated[list[PositiveInt], Field(min_length=1)] = _f([5, 10, 20, 40], "k validation: candidate mean cluster sizes")
    require_gain: bool = _f(True, "vote only when simulated voting raises validation balanced accuracy")
    rho: Annotated[float, Field(gt=0.0, le=1.0)] = _f(0.6, "share the winning label needs among the voters")
    min_voters: PositiveInt = _f(3, "a cluster needs at least this many voters for its vote to count")
    min_voter_share: Annotated[float, Field(ge=0.0, le=1.0)] = _f(0.2, "... and voters must be at least this share of its members")
    top_k: PositiveInt = _f(2, "a chip only takes the cluster's label if it is among its own top_k classes")
    niter: PositiveInt = _f(25, "k-means iterations")


class OODConfig(Section):
    method: Literal[OOD_METHODS + ("auto",)] = _f(  # type: ignore[valid-type]
        "auto",
        "energy | msp | maxlogit (logits, no fitting) | knn | mahalanobis | vim (fitted on the training split's "
        "embeddings) | hypersphere (also on virtual anomalies of them) | auto (the default: the detector stages.select_ood "
        "chose on this model's validation split, weights/ood_choice.json; run_all runs select_ood first). "
        "Higher = more in-distribution",
    )
    temperature: Positive = _f(1.0, "energy and msp: T in T*logsumexp(logits/T) and softmax(logits/T)")
    knn_k: PositiveInt = _f(1, "knn: score = cosine similarity to the k-th nearest training embedding")
    knn_max_per_class: Union[PositiveInt, None] = _f(None, "knn: training embeddings kept per class (seeded); null = all")
    mahalanobis_shrinkage: Union[Annotated[float, Field(ge=0.0, le=1.0)], Auto] = _f("auto", "covariance shrinkage, or auto (Ledoit-Wolf)")
    vim_dim: Union[PositiveInt, Auto] = _f("auto", "vim: principal-subspace dimension, or auto")
    hypersphere_dim: PositiveInt = _f(32, "hypersphere: output width of the 2-layer projection (no biases) on the embedding")
    hypersphere_hidden: PositiveInt = _f(128, "hypersphere: hidden width of the projection")
    hypersphere_margin: Positive = _f(1.0, "hypersphere: virtual anomalies are pushed beyond this distance from the centre")
    hypersphere_steps: PositiveInt = _f(300, "hypersphere: Adam steps (256 training + 256 anomaly embeddings each, CPU)")
    hypersphere_lr: Positive = _f(0.003, "hypersphere: Adam learning rate")
    anomalies_per_chip: Annotated[float, Field(gt=0.0, le=8.0)] = _f(
        1.0, "hypersphere: virtual anomalies made per training chip (embedded with the same TTA)"
    )
    anomaly_kinds: Annotated[list[Literal[ANOMALY_KINDS]], Field(min_length=1)] = _f(  # type: ignore[valid-type]
        list(ANOMALY_KINDS), "hypersphere: virtual anomalies: cutpaste (part of a chip of another class) | shuffle (tile grid permuted) | mix (two classes blended)"
    )


class InferConfig(Section):
    batch_size: PositiveInt = _f(256, "inference batch size")
    tta: TTAConfig = Field(default_factory=TTAConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    ood: OODConfig = Field(default_factory=OODConfig)


class SelectOODConfig(Section):
    candidates: Annotated[list[Literal[OOD_METHODS]], Field(min_length=1)] = _f(  # type: ignore[valid-type]
        list(OOD_METHODS), "detectors compared by stages.select_ood on validation (proxy models or leave-one-class-out)"
    )
    knn_k: Annotated[list[PositiveInt], Field(min_length=1)] = _f([1, 5, 20], "knn is tried with each k")
    max_per_class: Union[PositiveInt, None] = _f(None, "training embeddings per class used to refit (speed); null = all")
    head_c: Positive = _f(1.0, "logistic-regression head refitted without the left-out class: inverse L2 strength")
    proxy_folds: NonNegativeInt = _f(
        2, "0: leave each class out of the final model's cached embeddings (head refitted); N: train N proxy SAR models, "
        "each without proxy_left_out training classes (the distill_sar recipe, proxy_epochs), and score those classes' "
        "validation chips as unseen: features that never saw the unseen class, as at test"
    )
    proxy_left_out: PositiveInt = _f(2, "proxy folds: training classes each proxy model leaves out (at most all but 2)")
    proxy_epochs: Union[PositiveInt, Auto] = _f("auto", "proxy folds: training epochs of each proxy model; auto = half of distill_sar.epochs")
    rule: Literal["one_se", "best"] = _f(
        "one_se", "one_se: the earliest candidate (simplest first) within one standard error of the best mean AUROC; "
        "best: the best mean AUROC"
    )


class RobustnessConfig(Section):
    """python -m stages.robustness (run by run_all after infer when enabled)."""

    enabled: bool = _f(False, "run_all runs stages.robustness after infer")
    eps: Annotated[list[Annotated[float, Field(gt=0.0, le=255.0)]], Field(min_length=1)] = _f([1.0, 2.0, 4.0, 8.0], "L-inf radii in 1/255 units")
    pgd_steps: Annotated[list[PositiveInt], Field(min_length=1)] = _f([10, 50], "PGD-k attacks evaluated")
    step_size: Union[Positive, Auto] = _f("auto", "auto (2.5 eps / steps) or a fraction of eps")
    max_chips: Union[PositiveInt, None] = _f(256, "chips attacked per split (seeded subsample); null = all")
    batch_size: PositiveInt = _f(128, "attack batch size")


class ReportConfig(Section):
    enabled: bool = _f(True, "infer writes submissions/<run>/report.html + plots/ after results.csv (a failing report is only a warning)")
    gallery_size: Annotated[int, Field(ge=0, le=64)] = _f(8, "thumbnails per gallery (most confident mistakes, most OOD-looking chips); 0 = no gallery")
    dpi: Annotated[int, Field(ge=40, le=300)] = _f(100, "resolution of the PNG plots")


class EnsembleConfig(Section):
    """run_all: train several seeds and average them (stages.ensemble)."""

    members: PositiveInt = _f(
        1, "models run_all trains (seeds seed, seed+1, ...; each in <weights>/seed<S>/ with its submissions in "
        "<submissions>/seed<S>/) and averages into the submission; 1 = one model in <weights>/. 3 in the full profile: "
        "on a 3-fold cross-validation of MSTAR's training chips, three seeds averaged gained +0.0025 +- 0.0009 "
        "balanced accuracy over one (README)"
    )


class Config(Section):
    """The whole resolved config of a run."""

    seed: Annotated[int, Field(ge=0)] = _f(0, "random seed")
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentSection = Field(default_factory=AugmentSection)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain_eo: TrainConfig = Field(default_factory=TrainConfig)
    distill_sar: DistillStageConfig = Field(default_factory=DistillStageConfig)
    finetune_head: FinetuneStageConfig = Field(default_factory=FinetuneStageConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    select_ood: SelectOODConfig = Field(default_factory=SelectOODConfig)
    robustness: RobustnessConfig = Field(default_factory=RobustnessConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)  # not recorded by infer: a report never makes a run stale
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig)  # read by run_all only

    @field_validator("data", mode="after")
    @classmethod
    def _holdout_names(cls, data: DataConfig) -> DataConfig:
        if len(set(map(str, data.holdout_classes))) != len(data.holdout_classes):
            raise ValueError("holdout_classes lists a class twice")
        return data

    def section(self, name: str) -> Section:
        """A top-level section by name (`cfg.section("distill_sar")`)."""
        if name not in type(self).model_fields or name == "seed":
            raise UserError(f"config has no section '{name}'")
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# Sections every stage reads besides its own; they decide whether an artifact is still fresh.
COMMON_SECTIONS = ("seed", "data", "augment", "model")


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(profile: str | Path) -> dict[str, Any]:
    """The raw mapping of a profile, by name (`quick`, `full`, `tiny`) or by path to a YAML file."""
    path = Path(profile)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILE_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise UserError(
            f"profile '{profile}' not found: expected one of {', '.join(available_profiles())} "
            f"or a path to a .yaml file"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"profile {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"profile {path} must be a YAML mapping")
    return raw


def _flat_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys.extend(_flat_keys(v, prefix + k + "."))
    return keys


def _unknown_key(key: str, defaults: dict[str, Any], where: str) -> UserError:
    close = difflib.get_close_matches(key, _flat_keys(defaults), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return UserError(f"{where}{key}: no such config key{hint}")


def _set_key(tree: dict[str, Any], defaults: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set dotted `key` in `tree`; the key must exist in the schema, and a section takes a mapping."""
    node, known = tree, defaults
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(known, dict) or part not in known:
            raise _unknown_key(key, defaults, where)
        if i == len(parts) - 1:
            if isinstance(known[part], dict) and not isinstance(value, dict):
                raise UserError(f"{where}{key}: '{key}' is a section; set one of its keys instead")
            if isinstance(value, dict) and isinstance(known[part], dict):
                for sub, sub_value in value.items():
                    _set_key(tree, defaults, f"{key}.{sub}", sub_value, where)
            else:
                node[part] = value
        else:
            node, known = node[part], known[part]


def _merge_profile(tree: dict[str, Any], defaults: dict[str, Any], raw: dict[str, Any], where: str) -> None:
    for key, value in raw.items():
        _set_key(tree, defaults, str(key), value, where)


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b.c=value` -> (key, value parsed as YAML)."""
    if "=" not in item:
        raise UserError(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _dotted(loc: tuple[Any, ...]) -> str:
    # union members show up in the location as type names ('int', 'literal[...]'): keep field names
    parts = [str(p) for p in loc if isinstance(p, str) and not any(c in p for c in "[]") and p not in (
        "int", "float", "str", "bool", "list", "none", "constrained-int", "constrained-float", "is-instance",
    )]
    return ".".join(parts)


def _config_error(err: ValidationError, source: str) -> UserError:
    lines = []
    seen = set()
    for e in err.errors():
        key = _dotted(e["loc"])
        if key in seen:
            continue  # a union reports once per member: the first message is enough
        seen.add(key)
        lines.append(f"config {key}: {e['msg'].rstrip('.')} (got {e.get('input')!r})")
    return UserError(f"{source}: " + "; ".join(lines))


def validate_config(tree: dict[str, Any], source: str = "config") -> Config:
    """A mapping (all sections) as the typed config; errors name their dotted keys."""
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise _config_error(err, source) from None


def load_config(profile: str | Path = "quick", overrides: list[str] | None = None) -> Config:
    """The resolved config: schema defaults, then the profile, then every `--set` in order."""
    defaults = Config().to_dict()
    tree = copy.deepcopy(defaults)
    _merge_profile(tree, defaults, load_profile(profile), where=f"profile {profile}: ")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_key(tree, defaults, key, value, where="--set ")
    return validate_config(tree, source=f"profile {profile}")


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A copy of `cfg` with dotted keys set (`{"data.val_fraction": 0.2}`), validated."""
    defaults = Config().to_dict()
    tree = cfg.to_dict()
    for key, value in overrides.items():
        _set_key(tree, defaults, key, value, where="")
    return validate_config(tree)


def stage_config(cfg: Config, stage: str) -> dict[str, Any]:
    """The part of the config a stage records in its manifest: the common sections plus its own."""
    tree = cfg.to_dict()
    if stage not in tree or stage in COMMON_SECTIONS:
        raise UserError(f"config has no section '{stage}'")
    return {key: tree[key] for key in (*COMMON_SECTIONS, stage)}


def describe(cfg: Config) -> str:
    """The config as YAML with each key's description as a comment (what `python -m pipeline.config` prints)."""
    lines: list[str] = []

    def walk(model: BaseModel, indent: str) -> None:
        for name, info in type(model).model_fields.items():
            value = getattr(model, name)
            key = info.alias or name
            if isinstance(value, BaseModel):
                lines.append(f"{indent}{key}:")
                walk(value, indent + "  ")
                continue
            text = yaml.safe_dump({key: value}, default_flow_style=True, width=1000).strip()
            text = text[1:-1] if text.startswith("{") else text
            comment = f"  # {info.description}" if info.description else ""
            lines.append(f"{indent}{text}{comment}")

    walk(cfg, "")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.config", description="Print a profile resolved, one comment per key.")
    parser.add_argument("--profile", default="quick", help="quick | full | tiny | path/to/profile.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(describe(load_config(args.profile, args.overrides)))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

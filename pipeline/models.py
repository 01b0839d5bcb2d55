"""Models: any timm backbone with one input channel, pooled embeddings and a separate linear head.

`create_model` builds a `ChipClassifier` from a timm name (never downloads anything). The
`small_input` option gives ResNet-family models a CIFAR-style stem (stride 1, no max-pool), which
suits 32-56 px chips far better than the ImageNet stride-4 stem. `init_weights` loads a local
checkpoint, summing a 3-channel first conv down to 1 channel (`timm.models.adapt_input_conv`). `model_spec` / `model_from_spec`
describe a model in an artifact manifest and rebuild it from there.
"""

from __future__ import annotations

import difflib
import pickle
import warnings
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import adapt_input_conv, clean_state_dict
from torch import Tensor, nn

from pipeline import nets  # noqa: F401  (registers the compact nets with timm)
from pipeline.errors import UserError
from pipeline.log import get_logger

log = get_logger(__name__)

IN_CHANS = 1
INTENSITIES = ("none", "standardize", "log")
_SMALL_INPUT_WARNED: set[str] = set()


class ChipInput(nn.Module):
    """What the model does to a normalised chip before the backbone: centre window, per-chip intensity.

    A chip larger than `window` is centre-cropped to it (evaluation gets packed chips with their
    translation margin; training batches already come as random windows). `intensity`: `none` keeps the
    dataset normalisation, `standardize` gives every chip zero mean and unit variance, `log` does that on
    log intensities (undoing the dataset normalisation `norm` first), which compresses radar's bright tail.
    """

    def __init__(self, window: int | None = None, intensity: str = "none", norm: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__()
        if intensity not in INTENSITIES:
            raise UserError(f"data.intensity '{intensity}' is unknown: expected one of {', '.join(INTENSITIES)}")
        self.window, self.intensity = window, intensity
        self.mean, self.std = float(norm[0]), float(norm[1])

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if self.window is not None and (h > self.window or w > self.window):
            top, left = max(h - self.window, 0) // 2, max(w - self.window, 0) // 2
            x = x[..., top : top + self.window, left : left + self.window]
        if self.intensity == "none":
            return x
        if self.intensity == "log":
            x = torch.log((x * self.std + self.mean).clamp(min=0) + 1 / 255)
        mean = x.mean(dim=(-2, -1), keepdim=True)
        # sqrt(var + 1e-6), not std + 1e-3: the same scale, but a finite input gradient on a blank (constant) chip,
        # where std's gradient is 0/0; EUC_AT and the Lipschitz penalty differentiate through clean chips
        return (x - mean) / (x.var(dim=(-2, -1), keepdim=True) + 1e-6).sqrt()


class ChipClassifier(nn.Module):
    """Input adapter, a timm backbone (features only), dropout and a linear head named `classifier`."""

    def __init__(
        self, backbone: nn.Module, num_classes: int, timm_name: str, small_input: bool, drop_rate: float,
        chip_input: ChipInput | None = None,
    ) -> None:
        super().__init__()
        self.input = chip_input or ChipInput()
        self.backbone = backbone
        self.dropout = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(self.embed_dim, num_classes)
        self.timm_name = timm_name
        self.small_input = small_input
        self.drop_rate = drop_rate

    @property
    def embed_dim(self) -> int:
        hidden = getattr(self.backbone, "head_hidden_size", None)
        return int(hidden or self.backbone.num_features)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def embed(self, x: Tensor) -> Tensor:
        """Pooled features (B, D) of normalised chips (centre window and intensity applied here)."""
        return self.backbone(self.input(x))

    def head(self, emb: Tensor) -> Tensor:
        """Logits (B, C) from pooled features."""
        return self.classifier(self.dropout(emb))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def _unknown_model_error(name: str) -> UserError:
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" (close matches: {', '.join(close)})" if close else " (see timm.list_models())"
    return UserError(f"unknown timm model '{name}'{hint}")


def _build_backbone(name: str, input_size: int | tuple[int, int] | None) -> nn.Module:
    kwargs: dict[str, Any] = dict(pretrained=False, num_classes=0, in_chans=IN_CHANS)
    if input_size is not None:
        try:  # models with a fixed input size (ViTs) need it; the rest reject the keyword
            return timm.create_model(name, img_size=input_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    return timm.create_model(name, **kwargs)


def _use_small_input_stem(backbone: nn.Module, name: str) -> None:
    """ResNet family: 3x3 stride-1 first conv (deep stems keep their convs at stride 1), no max-pool."""
    if not isinstance(backbone, timm.models.resnet.ResNet):
        if name not in _SMALL_INPUT_WARNED:
            _SMALL_INPUT_WARNED.add(name)
            warnings.warn(
                f"small_input has no effect on '{name}': only ResNet-family stems are adapted",
                UserWarning,
                stacklevel=3,
            )
        return
    conv1 = backbone.conv1
    if isinstance(conv1, nn.Conv2d):
        backbone.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
    else:  # deep stem (Sequential of 3x3 convs): run its first conv at stride 1
        first = next(m for m in conv1.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
    backbone.maxpool = nn.Identity()


def create_model(
    name: str = "resnet18",
    num_classes: int = 10,
    small_input: bool = False,
    drop_rate: float = 0.0,
    init_weights: str | Path | None = None,
    input_size: int | tuple[int, int] | None = None,
    window: int | None = None,
    intensity: str = "none",
    norm: dict[str, float] | None = None,
) -> ChipClassifier:
    """A 1-channel ChipClassifier over timm model `name`; `input_size` only matters to fixed-size models.

    `window`, `intensity` and `norm` configure the ChipInput adapter (see there)."""
    if not timm.is_model(name):
        raise _unknown_model_error(name)
    if num_classes < 1:
        raise UserError(f"num_classes must be at least 1, got {num_classes}")
    backbone = _build_backbone(name, input_size)
    if small_input:
        _use_small_input_stem(backbone, name)
    norm_pair = (float(norm["mean"]), float(norm["std"])) if norm else (0.0, 1.0)
    chip_input = ChipInput(window, intensity, norm_pair)
    model = ChipClassifier(backbone, num_classes, name, small_input, float(drop_rate), chip_input)
    if init_weights:
        load_init_weights(model, init_weights)
    return model


def _read_checkpoint(path: Path) -> dict[str, Tensor]:
    """The state dict in a local file, DDP/compile prefixes removed (`clean_state_dict`).

    Not `timm.models.load_state_dict`: it asserts or raises bare FileNotFoundError / unpickling errors,
    and prefers an EMA entry; here every failure is one UserError and the keys looked for are ours.
    """
    if not path.is_file():
        raise UserError(f"init_weights file {path} not found: give a local .safetensors or torch checkpoint")
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"init_weights file {path} could not be read: {first_line}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"init_weights file {path} holds no state dict of tensors")
    return clean_state_dict(state)


def _as_classifier_keys(state: dict[str, Tensor], model: ChipClassifier) -> dict[str, Tensor]:
    """Map a plain timm state dict (conv1.*, fc.*) onto ChipClassifier names (backbone.*, classifier.*)."""
    if any(k.startswith("backbone.") for k in state):
        return state
    timm_head = model.backbone.pretrained_cfg.get("classifier") or ""
    heads = [timm_head] if isinstance(timm_head, str) else list(timm_head)
    mapped = {}
    for key, value in state.items():
        head = next((h for h in heads if h and key.startswith(h + ".")), None)
        mapped[f"classifier.{key[len(head) + 1:]}" if head else f"backbone.{key}"] = value
    return mapped


def _summary(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def load_init_weights(model: ChipClassifier, path: str | Path) -> None:
    """Load a local checkpoint into `model`, adapting the first conv and dropping a mismatched head."""
    path = Path(path)
    state = _as_classifier_keys(_read_checkpoint(path), model)
    own = model.state_dict()
    first_conv = f"backbone.{model.backbone.pretrained_cfg.get('first_conv', '')}.weight"
    if first_conv in state and first_conv in own:
        weight = state[first_conv]
        if weight.ndim == 4 and weight.shape[1] != IN_CHANS and own[first_conv].shape[1] == IN_CHANS:
            state[first_conv] = adapt_input_conv(IN_CHANS, weight, base_chans=weight.shape[1])  # sum over channels
            log.info(f"init_weights: summed {first_conv} over {weight.shape[1]} input channels -> 1")
    head_keys = [k for k in state if k.startswith("classifier.")]
    if any(k in own and state[k].shape != own[k].shape for k in head_keys):
        log.info(
            f"init_weights: dropped the checkpoint classifier ({state['classifier.weight'].shape[0]} classes, "
            f"model has {model.num_classes}); the head starts from random init"
        )
        for k in head_keys:
            del state[k]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if mismatched:
        log.warning(f"init_weights: skipped shape-mismatched tensors {_summary(mismatched)}")
    loadable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    if not any(k.startswith("backbone.") for k in loadable):
        raise UserError(f"init_weights file {path} has no tensor that fits timm model '{model.timm_name}'")
    result = model.load_state_dict(loadable, strict=False)
    missing = [k for k in result.missing_keys if k not in mismatched]
    unexpected = [k for k in state if k not in own]
    if missing:
        log.warning(f"init_weights: missing (random init) {_summary(missing)}")
    if unexpected:
        log.info(f"init_weights: unexpected (ignored) {_summary(unexpected)}")
    log.info(f"init_weights: loaded {len(loadable)} tensors from {path}")


def freeze_early_layers(model: ChipClassifier, convolutions: int) -> list[str]:
    """Freeze the backbone's first `convolutions` conv layers and every layer before the next one.

    For transfer from `init_weights`: frozen parameters get no gradient, and frozen batch norms keep
    their running statistics (momentum 0; in train mode they still normalise with batch statistics).
    Returns the names of the frozen parameters.
    """
    if convolutions < 0:
        raise UserError(f"freeze_layers must be >= 0, got {convolutions}")
    leaves = [(name, m) for name, m in model.backbone.named_modules() if not list(m.children())]
    total = sum(isinstance(m, nn.Conv2d) for _, m in leaves)
    if convolutions > total:
        raise UserError(f"freeze_layers {convolutions}: '{model.timm_name}' has only {total} convolutions")
    frozen: list[str] = []
    seen = 0
    for name, module in leaves:
        if isinstance(module, nn.Conv2d):
            if seen == convolutions:
                break
            seen += 1
        for pname, param in module.named_parameters():
            param.requires_grad_(False)
            frozen.append(f"backbone.{name}.{pname}")
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0
    return frozen


def model_spec(model: ChipClassifier, input_size: int | tuple[int, int], norm: dict) -> dict[str, Any]:
    """What a manifest needs to rebuild the model and feed it: timm name, sizes, normalisation."""
    size = [int(input_size), int(input_size)] if isinstance(input_size, int) else [int(s) for s in input_size]
    return {
        "timm_name": model.timm_name,
        "num_classes": model.num_classes,
        "in_chans": IN_CHANS,
        "input_size": size,
        "small_input": model.small_input,
        "drop_rate": model.drop_rate,
        "embed_dim": model.embed_dim,
        "norm": {"mean": float(norm["mean"]), "std": float(norm["std"])},
        "window": model.input.window,
        "intensity": model.input.intensity,
    }


def model_from_spec(spec: dict[str, Any]) -> ChipClassifier:
    """Rebuild the (untrained) model a manifest's spec describes; load its weights afterwards."""
    missing = [k for k in ("timm_name", "num_classes", "input_size", "small_input") if k not in spec]
    if missing:
        raise UserError(f"model spec lacks {', '.join(missing)}: the manifest is from another version; rerun its stage")
    if int(spec.get("in_chans", IN_CHANS)) != IN_CHANS:
        raise UserError(f"model spec has in_chans={spec['in_chans']}; this pipeline uses {IN_CHANS}-channel chips")
    return create_model(
        spec["timm_name"],
        num_classes=int(spec["num_classes"]),
        small_input=bool(spec["small_input"]),
        drop_rate=float(spec.get("drop_rate", 0.0)),
        input_size=tuple(spec["input_size"]),
        window=spec.get("window"),
        intensity=str(spec.get("intensity", "none")),
        norm=spec.get("norm"),
    )

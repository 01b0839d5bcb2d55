"""Configuration: one YAML profile per use, dotted `--set key=value` overrides, saved resolved."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
STAGES = ("pretrain_eo", "distill_sar", "finetune_head", "infer")
# Sections every stage reads besides its own; they decide whether an artifact is still fresh.
COMMON_SECTIONS = ("seed", "data", "augment", "model")

Config = dict[str, Any]


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(profile: str | Path) -> Config:
    """Load a profile by name (`quick`, `full`, `tiny`) or by path to a YAML file."""
    path = Path(profile)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILE_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise UserError(
            f"profile '{profile}' not found: expected one of {', '.join(available_profiles())} "
            f"or a path to a .yaml file"
        )
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"profile {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"profile {path} must be a YAML mapping")
    return cfg


def _flat_keys(cfg: Config, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys.extend(_flat_keys(v, prefix + k + "."))
    return keys


def apply_override(cfg: Config, item: str) -> None:
    """Apply one `a.b.c=value` override in place; the key must exist, the value is parsed as YAML."""
    if "=" not in item:
        raise UserError(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            close = difflib.get_close_matches(key, _flat_keys(cfg), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(f"--set {key}: no such config key{hint}")
        if i == len(parts) - 1:
            if isinstance(node[part], dict) and not isinstance(value, dict):
                raise UserError(f"--set {key}: '{key}' is a section; set one of its keys instead")
            node[part] = value
        else:
            node = node[part]


def load_config(profile: str | Path = "quick", overrides: list[str] | None = None) -> Config:
    """The resolved config: the profile with every override applied in order."""
    cfg = copy.deepcopy(load_profile(profile))
    for item in overrides or []:
        apply_override(cfg, item)
    return cfg


def stage_config(cfg: Config, stage: str) -> Config:
    """The part of the config a stage reads: the common sections plus its own."""
    if stage not in cfg:
        raise UserError(f"config has no section '{stage}'")
    return {key: copy.deepcopy(cfg[key]) for key in (*COMMON_SECTIONS, stage)}

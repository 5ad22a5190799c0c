"""Job configuration: frozen dataclasses loaded from YAML presets or files, with `a.b=c` overrides.

Unknown keys are errors that name the key; values are checked against the field's type. The resolved
config travels with every artifact (`to_dict`), and `flatten` gives the dotted view MLflow logs.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from samsr.config_jobs import (RESOURCE_LIMITS, EvalConfig, JobConfig, ShardConfig,  # noqa: F401
                                UpscaleConfig, actor_pool)

METHODS = ("samdiffsr", "samsr-teacher", "samsr-student")
SEGMENTERS = ("sam", "tiny-sam", "superpixel")


class ConfigError(ValueError):
    """A config file, preset or override that cannot be applied."""


@dataclass(frozen=True)
class DataConfig:
    scale: int = 4                   # super-resolution factor
    hr_crop: int = 160               # HR training crop side (px), a multiple of `scale`
    max_pixels: int = 50_000_000     # decoded-size limit (header-checked): a shard decode task reserves ~3.2 GB for it
    min_lr_side: int = 8             # images whose LR would be smaller are rejected
    flips: bool = True               # random horizontal/vertical flips + transposes when cropping


@dataclass(frozen=True)
class SegmenterConfig:
    kind: str = "sam"                # sam | tiny-sam (random weights, tests) | superpixel (fallback)
    checkpoint: str = ""             # SAM checkpoint: local path or s3:// URI (kind=sam)
    model_type: str = "vit_h"        # vit_h | vit_l | vit_b
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    min_mask_region_area: int = 0
    tiny_seed: int = 0               # weight seed of the tiny random SAM
    tiny_image_size: int = 256       # input side of the tiny random SAM
    superpixel_segments: int = 64    # SLIC n_segments (fallback only)
    superpixel_compactness: float = 10.0


@dataclass(frozen=True)
class RRDBConfig:
    num_feat: int = 64
    num_block: int = 17
    grow: int = 32


@dataclass(frozen=True)
class UNetConfig:
    base: int = 64
    mults: tuple[int, ...] = (1, 2, 3, 4)
    blocks_per_level: int = 2
    dropout: float = 0.0
    norm_groups: int = 8             # GroupNorm groups (at most); 0 = no normalisation (SRDiff/SAM-DiffSR's UNet)


@dataclass(frozen=True)
class SamDiffSRConfig:
    """METHOD.md §A."""
    timesteps: int = 100
    cosine_s: float = 0.008
    max_beta: float = 0.999
    res_rescale: float = 2.0
    structure_modulation: bool = True   # False = plain SRDiff (E = 0)


@dataclass(frozen=True)
class ResShiftConfig:
    """METHOD.md §B."""
    timesteps: int = 15
    kappa: float = 2.0
    power: float = 0.3
    etas_end: float = 0.99
    min_noise_level: float = 0.04
    pixelwise: bool = True
    weight_divisor: float = 5.0         # w = W / weight_divisor
    soft_masks: bool = False            # segment at 2x and average-pool back
    loss_distill: float = 1.0
    loss_inverse: float = 1.0
    loss_gt: float = 1.0
    loss_semantic: float = 0.0          # 0 = off (the SAM image encoder is not loaded)
    teacher: str = ""                   # teacher checkpoint (student stage): path or s3:// URI
    space: str = "pixel"                # encoder/decoder pair the diffusion runs in (diffusion/space.py)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    batch_size: int = 64
    iterations: int = 400_000
    lr: float = 2e-4
    lr_decay_every: int = 200_000
    lr_decay_gamma: float = 0.5
    grad_clip: float = 10.0
    rrdb_iterations: int = 100_000      # RRDB pretraining (SAM-DiffSR conditioning encoder)
    rrdb_lr: float = 2e-4
    num_threads: int = 0                # torch threads per worker, 0 = torch default
    log_every: int = 100
    checkpoint_every: int = 5_000
    bf16: bool = False                  # autocast to bfloat16 on CUDA
    ema_decay: float = 0.999            # EMA of the weights used by validation, eval and the logged model; 0 = off
    eval_every: int = 5_000             # validation every N steps and at the last step (samsr train); 0 = off


@dataclass(frozen=True)
class InferConfig:
    tile: int = 0                       # LR tile side (px); 0 = auto: whole image up to auto_tile px a side
    auto_tile: int = 256                # tile side when tile=0 and the LR is larger; 0 = always one pass
    overlap: int = 8                    # LR overlap between tiles (px)
    tile_batch: int = 4                 # tiles per network call
    seed: int = 0


@dataclass(frozen=True)
class Config:
    method: str = "samdiffsr"
    name: str = "samdiffsr"
    data: DataConfig = field(default_factory=DataConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    rrdb: RRDBConfig = field(default_factory=RRDBConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    samdiffsr: SamDiffSRConfig = field(default_factory=SamDiffSRConfig)
    resshift: ResShiftConfig = field(default_factory=ResShiftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    job: JobConfig = field(default_factory=JobConfig)
    upscale: UpscaleConfig = field(default_factory=UpscaleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.segmenter.kind not in SEGMENTERS:
            raise ConfigError(f"segmenter.kind: {self.segmenter.kind!r} is not one of {', '.join(SEGMENTERS)}")
        if self.data.scale < 1 or self.data.hr_crop % self.data.scale:
            raise ConfigError(f"data.hr_crop={self.data.hr_crop} must be a multiple of data.scale={self.data.scale}")
        for section in ("shard", "job", "upscale", "eval"):      # Ray resources: rejected here, not by Ray mid-job
            for name, least, strict in RESOURCE_LIMITS:
                value = getattr(getattr(self, section), name, None)
                if value is not None and (value <= least if strict else value < least):
                    raise ConfigError(f"{section}.{name}={value} must be {'>' if strict else '>='} {least}")
        for section in ("upscale", "eval"):                       # the model actor pool: least <= most
            jobs = getattr(self, section)
            least, most = actor_pool(jobs)
            if least > most:
                which = f"min_actors={jobs.min_actors}" if jobs.min_actors else f"actors={jobs.actors}"
                raise ConfigError(f"{section}.{which} is above {section}.max_actors={jobs.max_actors}: the "
                                  f"autoscaling pool grows from its least size ({section}.min_actors, else "
                                  f"{section}.actors) up to max_actors; lower the one or raise the other")
        alias = self.job.register_alias         # MLflow reserves `latest` and v<number>
        if not re.fullmatch(r"[A-Za-z_][\w-]*", alias) or alias == "latest" or re.fullmatch(r"v\d+", alias):
            raise ConfigError(f"job.register_alias={alias!r}: letters, digits, _ and -, not `latest` or v<number>")


def presets() -> list[str]:
    """Names of the presets shipped in samsr/configs/."""
    return sorted(p.name[:-5] for p in resources.files("samsr.configs").iterdir() if p.name.endswith(".yaml"))


def _read_source(path_or_preset: str | Path) -> tuple[dict, str]:
    path = Path(path_or_preset)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return yaml.safe_load(path.read_text()) or {}, str(path)
    ref = resources.files("samsr.configs") / f"{path_or_preset}.yaml"
    if not ref.is_file():
        raise ConfigError(f"{str(path_or_preset)!r} is neither a config file nor a preset; presets: {', '.join(presets())}")
    return yaml.safe_load(ref.read_text()) or {}, f"preset:{path_or_preset}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_tp, key) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover - schema error


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`'train.lr=1e-4'` -> `('train.lr', 0.0001)`; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip(), value


def from_dict(data: Mapping[str, Any]) -> Config:
    """Build a Config from a (possibly partial) nested mapping; unknown keys are errors."""
    return _build(Config, data)


def load(path_or_preset: str | Path = "samdiffsr-tiny", overrides: Sequence[str] = ()) -> Config:
    """Load a preset name or YAML file, then apply `key.path=value` overrides in order."""
    tree, _ = _read_source(path_or_preset)
    if not isinstance(tree, dict):
        raise ConfigError(f"{path_or_preset}: top level must be a mapping")
    return load_tree(tree, overrides)


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """`cfg` with `key.path=value` overrides applied (e.g. to a checkpoint's own config)."""
    return load_tree(to_dict(cfg), overrides) if overrides else cfg


def load_tree(tree: dict, overrides: Sequence[str] = ()) -> Config:
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return from_dict(tree)


def to_dict(cfg: Any) -> dict:
    """Nested plain-python dict (tuples become lists) for YAML/JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def flatten(cfg: Config) -> dict[str, Any]:
    """Dotted keys -> scalar values (lists as strings), e.g. for MLflow params."""
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = ",".join(map(str, value)) if isinstance(value, list) else value

    walk(to_dict(cfg), "")
    return flat


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace, re-exported so callers need not import dataclasses."""
    return dataclasses.replace(cfg, **changes)


__all__ = ["Config", "ConfigError", "DataConfig", "SegmenterConfig", "RRDBConfig", "UNetConfig", "SamDiffSRConfig",
           "ResShiftConfig", "TrainConfig", "InferConfig", "ShardConfig", "JobConfig", "UpscaleConfig", "EvalConfig",
           "METHODS", "SEGMENTERS", "load", "from_dict", "to_dict", "flatten", "dump_yaml", "parse_override",
           "presets", "replace"]

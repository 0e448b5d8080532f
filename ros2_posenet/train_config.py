"""Training configuration: YAML files with ``key=value`` command-line overrides, validated.

The schema is :class:`TrainConfig` (pydantic, :mod:`ros2_posenet.config_base`): unknown keys,
wrong types and out-of-range values fail with the key's dotted path and a did-you-mean hint.
The rest of training reads the resolved config as a plain dict (``TrainConfig.to_dict``), the
form checkpoints store; a stored config written by an older version, which lacks the keys added
since, is completed with their defaults. See ``config/train_*.yaml`` for commented examples.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from .config_base import ConfigError, StrictModel, did_you_mean, parse_yaml
from .covariance import UNCERTAINTY_METHODS
from .data.augment import Augmentation
from .data.split import VAL_SPLITS
from .losses import build_loss
from .model import ModelConfig
from .preprocess import PreprocessConfig

__all__ = [
    "ConfigError", "TrainConfig", "apply_override", "augmentation", "did_you_mean", "load_config", "parse_yaml",
    "stage_epochs", "stage_lr", "validate_config",
]

_MODEL = ModelConfig()
_PREPROCESS = PreprocessConfig()


class DataSection(StrictModel):
    kind: str = Field(min_length=1, description="e.g. cambridge, 7scenes, bundler")  # as accepted by ros2_posenet.data.build_dataset
    root: str = Field(min_length=1, description="the scene folder")
    max_points: int = Field(256, ge=0)  # scene points per image for the reprojection loss
    # Training augmentation (ros2_posenet.data.augment), all off without `augment`:
    augment: bool = True
    random_crop: bool = True  # PoseNet's random crop (its label noise: see data/augment.py)
    rotation_deg: float = 0.0  # rotated views by homography, labels exact; 0 disables
    color_jitter: float = 0.0  # brightness/contrast/saturation strength
    # Validation (ros2_posenet.data.split): holdout (frames of the training split) | test | none.
    # val_split: sequences (whole held-out sequences) | blocks (blocks of consecutive frames,
    # frames within val_gap of a block dropped from both sets) | auto (sequences when there
    # are >= 3 training sequences, else blocks). It selects best.pt and calibrates the covariance.
    # Default: auto. Deployment asks about a new pass through the scene, and on the full demo
    # scene blocks of the training passes underestimated the test trajectory's errors by 2x
    # (over-confident covariance), a held-out sequence far less (bench/RESULTS.md).
    val: Literal["holdout", "test", "none"] = "holdout"
    val_split: Literal[VAL_SPLITS] = "auto"
    val_fraction: float = Field(0.1, gt=0, le=0.5)
    val_block: int = Field(10, ge=1)
    val_gap: int = Field(0, ge=0)
    # Loader-specific options, passed to the dataset (ros2_posenet.data.build_dataset), e.g.
    # Bundler: {split_file: list.query.txt, bundle: bundle/bundle.orig.out, image_list: ...};
    # Cambridge: {reconstruction: ..., reconstruction_width: 1920};
    # 7-Scenes: {camera: rgb (default) | depth | pgt, pose_file: pgt/sfm/7scenes/chess_{split}.txt}.
    # Free-form: the loader checks them.
    options: dict[str, Any] = {}

    @model_validator(mode="after")
    def _augmentation_bounds(self):
        # Augmentation owns the bounds. Checked even when augment is off, so a typo does not wait for the day it is on.
        _augmentation_of(self.model_dump())
        return self


class _CheckedSection(StrictModel):
    """A section whose defaults and bounds a class of its own module owns (``CHECKED_BY.from_dict``)."""

    CHECKED_BY: ClassVar[type]

    @model_validator(mode="after")
    def _accepted_by_owner(self):
        self.CHECKED_BY.from_dict(self.model_dump())
        return self


class ModelSection(_CheckedSection):
    """The network (:class:`~ros2_posenet.model.ModelConfig`)."""

    CHECKED_BY: ClassVar[type] = ModelConfig
    backbone: str = _MODEL.backbone
    hidden_dim: int = _MODEL.hidden_dim
    dropout: float = _MODEL.dropout
    pretrained: bool = _MODEL.pretrained
    variance_head: bool = _MODEL.variance_head


class UncertaintySection(StrictModel):
    # Per-frame covariance published with each pose (ros2_posenet.covariance): fixed (one
    # calibrated matrix), mc_dropout (spread of mc_samples dropout passes of the head) or
    # variance_head (needs model.variance_head). Every available method is calibrated on the
    # validation split and stored; this picks the one the node uses by default. fixed was the
    # best calibrated on the synthetic test trajectory (bench/RESULTS.md).
    method: Literal[UNCERTAINTY_METHODS] = "fixed"
    mc_samples: int = Field(32, ge=2)


class PreprocessSection(_CheckedSection):
    """The image size (:class:`~ros2_posenet.preprocess.PreprocessConfig`; mean and std are not configurable)."""

    CHECKED_BY: ClassVar[type] = PreprocessConfig
    resize: int = _PREPROCESS.resize
    crop: int = _PREPROCESS.crop


class OptimSection(StrictModel):
    # loss_lr: learning rate of ŝx, ŝq (null: the stage's lr). Adam moves a parameter by
    # about lr per step, so with short schedules a larger loss_lr lets the weighting adapt.
    # position_lr_scale: the position layer's lr is multiplied by this ("auto": the RMS
    # spread of the training positions in metres). Under Adam this equals predicting
    # positions in units of the scene's size, so a 50 m street and a 3 m office learn
    # their positions equally fast; 1 is the paper's plain setting.
    # schedule: constant (the paper) or cosine decay to lr·final_lr_fraction over each stage;
    # norm losses keep non-vanishing gradients near the optimum, so a decaying step size
    # lets Adam settle instead of hovering around it.
    # clip_grad_norm: rescale the gradient of all parameters to at most this norm (null: off).
    # Keeps one bad batch from undoing epochs of training; with the learned weighting the
    # loss is O(1) in any unit system, so one value suits every scene. Adam ignores a
    # constant gradient scale, so clipping below the typical norm is not a slowdown.
    lr: float = Field(1e-4, gt=0)
    loss_lr: float | None = Field(None, gt=0)
    position_lr_scale: Literal["auto"] | Annotated[float, Field(gt=0)] = "auto"
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1)
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["constant", "cosine"] = "cosine"
    final_lr_fraction: float = Field(0.01, ge=0, le=1)
    clip_grad_norm: float | None = Field(5.0, gt=0)


class StageSection(StrictModel):
    # freeze_batchnorm / dropout: how the network runs while this stage trains (see PoseNet).
    # null = by loss: a reprojection stage freezes BatchNorm statistics and switches dropout
    # off, so the pixel loss sees the network as it is deployed; other stages train normally.
    # stop_after: train only this many epochs of the stage's schedule (the learning rate still follows
    # the schedule of `epochs`); 0 keeps the starting weights. The refit pass sets it to the epoch
    # validation chose, so the refit model retraces the selected one on more frames.
    name: str | None = None  # names the stage's folder; null: the loss type
    loss: dict[str, Any] = Field(description="a mapping like {type: learned}")  # checked by losses.build_loss
    epochs: int | None = Field(None, ge=1)  # null: train.epochs
    lr: float | None = Field(None, gt=0)  # null: optim.lr
    init: str = Field("previous", min_length=1)  # previous, scratch or a checkpoint path
    freeze_batchnorm: bool | None = None
    dropout: bool | None = None
    stop_after: int | None = Field(None, ge=0)

    @field_validator("loss")
    @classmethod
    def _a_known_loss(cls, loss: dict) -> dict:
        build_loss(loss)
        return loss

    @model_validator(mode="after")
    def _resolve_by_loss(self):
        self.name = str(self.name or self.loss.get("type"))
        if not all(c.isalnum() or c in "-_" for c in self.name):
            raise ValueError(f"stage name '{self.name}' must be letters, digits, - or _ (it names a folder)")
        fine_tuning = self.loss.get("type") == "reprojection"
        self.freeze_batchnorm = fine_tuning if self.freeze_batchnorm is None else self.freeze_batchnorm
        self.dropout = (not fine_tuning) if self.dropout is None else self.dropout
        return self


class TrainSection(StrictModel):
    epochs: int = Field(100, ge=1)  # default for stages without their own `epochs`
    workers: int = Field(2, ge=0)
    seed: int = 0
    device: str = "auto"  # auto: CUDA when available
    amp: Literal["auto"] | bool = "auto"  # mixed precision: auto (on for CUDA) | true | false; never on CPU
    val_every: int = Field(1, ge=1)
    keep_every: int = Field(0, ge=0)  # also keep <stage>/epoch_NNN.pt (resumable) every N epochs; 0: only best and last
    out_dir: str = Field("runs/posenet", min_length=1)
    progress: bool = True
    test_at_end: bool = True  # report the final checkpoint's errors on the test split
    deterministic: bool = False
    # refit: after the stages ran with validation (which picks each stage's best epoch, whether a
    # fine-tuning stage is kept at all, and calibrates the covariance), train them again on every
    # training frame (validation and split-gap frames included) for the chosen epochs, into
    # <out_dir>/refit; the refit checkpoints keep the held-out covariance calibration.
    # Needs data.val: holdout. calibrate_from is set by the refit pass itself: the run folder
    # whose best.pt checkpoints hold the held-out validation metrics and covariance.
    refit: bool = False
    calibrate_from: str | None = Field(None, min_length=1)
    # ensemble: refit this many networks (seeds seed, seed + 1, ...; <out_dir>/refit, <out_dir>/refit-seed<N>)
    # and publish their mean pose, <out_dir>/ensemble.pt. Needs refit: the validated run chose the epochs
    # and calibrated the covariance (one network's: the mean of several errs less, so it is conservative).
    # An interrupted refit: --resume the network's <stage>/last.pt; the networks that did not finish follow.
    ensemble: int = Field(1, ge=1)

    @field_validator("device")
    @classmethod
    def _a_torch_device(cls, device: str) -> str:
        if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"must be auto, cpu or cuda[:N], got {device!r}")
        return device


DEFAULT_STAGES = (
    {"name": "learned", "loss": {"type": "learned", "sx": 0.0, "sq": -3.0}},
    {"name": "reprojection", "loss": {"type": "reprojection", "gamma": 1}},
)


class TrainConfig(StrictModel):
    """The training config; :func:`load_config` reads it from YAML and overrides."""

    map_frame: str = Field("map", min_length=1)
    data: DataSection = Field(default_factory=dict, validate_default=True)  # no data section: "data.kind is required"
    model: ModelSection = ModelSection()
    uncertainty: UncertaintySection = UncertaintySection()
    preprocess: PreprocessSection = PreprocessSection()
    optim: OptimSection = OptimSection()
    # Shortcut for a one-stage run: a loss dict here replaces `stages` (free-form: build_loss checks it).
    loss: dict[str, Any] | None = None
    stages: list[StageSection] = Field(
        default_factory=lambda: copy.deepcopy(list(DEFAULT_STAGES)), validate_default=True, min_length=1)
    train: TrainSection = TrainSection()

    @model_validator(mode="before")
    @classmethod
    def _loss_shortcut(cls, values):
        if isinstance(values, dict) and isinstance(values.get("loss"), dict):
            loss = values["loss"]
            values = {**values, "loss": None, "stages": [{"name": str(loss.get("type")), "loss": loss, "init": "scratch"}]}
        return values

    @field_validator("stages")
    @classmethod
    def _distinct_names(cls, stages: list[StageSection]) -> list[StageSection]:
        names = [s.name for s in stages]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"stage name '{name}' is used twice; give stages distinct names")
        return stages

    @model_validator(mode="after")
    def _sections_agree(self):
        if self.uncertainty.method == "mc_dropout" and self.model.dropout <= 0:
            raise ValueError("uncertainty.method mc_dropout needs model.dropout > 0 (or use fixed)")
        if self.uncertainty.method == "variance_head" and not self.model.variance_head:
            raise ValueError("uncertainty.method variance_head needs model.variance_head: true")
        if self.train.ensemble > 1 and not self.train.refit:
            raise ValueError(f"train.ensemble {self.train.ensemble} needs train.refit: true (the members retrace the "
                             "epochs the validated run chose, on every frame)")
        if self.train.refit and self.data.val != "holdout":
            raise ValueError("train.refit needs data.val: holdout (it refits on the frames validation held out), "
                             f"got {self.data.val!r}")
        return self


def _find_stage(stages: list, part: str, where: str) -> dict:
    if part.lstrip("-").isdigit():
        try:
            return stages[int(part)]
        except IndexError:
            raise ConfigError(f"'{where}': there are only {len(stages)} stages") from None
    names = [s.get("name") if isinstance(s, dict) else None for s in stages]
    if part not in names:
        raise ConfigError(f"'{where}': no stage named '{part}'" + did_you_mean(part, [n for n in names if n]))
    return stages[names.index(part)]


def apply_override(config: dict, override: str) -> None:
    """Apply one ``dotted.key=value`` override in place (value parsed as YAML).

    List entries of ``stages`` are addressed by index or by name
    (``stages.1.epochs=5`` or ``stages.reprojection.epochs=5``). Keys are checked when the
    config is validated (:func:`validate_config`), which names a misspelt one.
    """
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form key=value (e.g. train.epochs=3)")
    key, raw = override.split("=", 1)
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{override}': value is not valid YAML ({err})") from None
    parts = key.strip().split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = _find_stage(node, part, where)
            continue
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"config key '{where}' is a value, not a section")
    if isinstance(node, list):
        raise ConfigError(f"'{key}': name a field of the stage, e.g. {key}.epochs=3")
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> dict:
    """Read a YAML config, apply overrides, validate.

    Returns the resolved config (every key present, stages filled in).
    """
    config = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            config = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(config, dict):
            raise ConfigError(f"config file {path} must contain a mapping at the top level")
    # The default stages, so that overrides like stages.learned.epochs=3 find them.
    config.setdefault("stages", copy.deepcopy(list(DEFAULT_STAGES)))
    for override in overrides or []:
        apply_override(config, override)
    return validate_config(config)


def validate_config(config: dict) -> dict:
    """Check every value and fill in defaults; returns a new resolved config (plain dicts).

    A top-level ``loss`` dict turns the run into a single stage with that loss. Idempotent: a
    resolved config, such as the one a checkpoint stores, validates to itself.
    """
    return TrainConfig.from_dict(config).to_dict()


def stage_epochs(cfg: dict, stage: dict) -> int:
    return stage["epochs"] or cfg["train"]["epochs"]


def stage_lr(cfg: dict, stage: dict) -> float:
    return float(stage["lr"] or cfg["optim"]["lr"])


def _augmentation_of(data: dict) -> Augmentation:
    return Augmentation(random_crop=data["random_crop"], color_jitter=data["color_jitter"], rotation_deg=data["rotation_deg"])


def augmentation(data: dict) -> Augmentation | bool:
    """The training set's :class:`Augmentation` from the ``data`` section (False when off)."""
    return _augmentation_of(data) if data["augment"] else False

"""Training configuration: YAML files with ``key=value`` command-line overrides, validated.

Split from :mod:`ros2_posenet.train` so the schema and its error messages can be read
(and tested) on their own. See ``config/train_*.yaml`` for commented examples.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path

import yaml

from .covariance import UNCERTAINTY_METHODS
from .data.augment import Augmentation
from .data.split import VAL_SPLITS
from .losses import build_loss
from .model import ModelConfig
from .preprocess import PreprocessConfig

class ConfigError(ValueError):
    """The training config is invalid; the message names the key."""



# freeze_batchnorm / dropout: how the network runs while this stage trains (see PoseNet).
# null = by loss: a reprojection stage freezes BatchNorm statistics and switches dropout
# off, so the pixel loss sees the network as it is deployed; other stages train normally.
# stop_after: train only this many epochs of the stage's schedule (the learning rate still follows
# the schedule of `epochs`); 0 keeps the starting weights. The refit pass sets it to the epoch
# validation chose, so the refit model retraces the selected one on more frames.
STAGE_DEFAULTS = {
    "name": None, "loss": None, "epochs": None, "lr": None, "init": "previous", "freeze_batchnorm": None, "dropout": None,
    "stop_after": None,
}


DEFAULTS: dict = {
    "map_frame": "map",
    "data": {
        "kind": None,  # as accepted by ros2_posenet.data.build_dataset
        "root": None,
        "max_points": 256,  # scene points per image for the reprojection loss
        # Training augmentation (ros2_posenet.data.augment), all off without `augment`:
        "augment": True,
        "random_crop": True,  # PoseNet's random crop (its label noise: see data/augment.py)
        "rotation_deg": 0.0,  # rotated views by homography, labels exact; 0 disables
        "color_jitter": 0.0,  # brightness/contrast/saturation strength
        # Validation (ros2_posenet.data.split): holdout (frames of the training split) | test | none.
        # val_split: sequences (whole held-out sequences) | blocks (blocks of consecutive frames,
        # frames within val_gap of a block dropped from both sets) | auto (sequences when there
        # are >= 3 training sequences, else blocks). It selects best.pt and calibrates the covariance.
        # Default: auto. Deployment asks about a new pass through the scene, and on the full demo
        # scene blocks of the training passes underestimated the test trajectory's errors by 2x
        # (over-confident covariance), a held-out sequence far less (bench/RESULTS.md).
        "val": "holdout",
        "val_split": "auto",
        "val_fraction": 0.1,
        "val_block": 10,
        "val_gap": 0,
        # Loader-specific options, passed to the dataset (ros2_posenet.data.build_dataset), e.g.
        # Bundler: {split_file: list.query.txt, bundle: bundle/bundle.orig.out, image_list: ...};
        # Cambridge: {reconstruction: ..., reconstruction_width: 1920};
        # 7-Scenes: {camera: rgb (default) | depth | pgt, pose_file: pgt/sfm/7scenes/chess_{split}.txt}.
        "options": {},
    },
    "model": {"backbone": "googlenet", "hidden_dim": 2048, "dropout": 0.5, "pretrained": True, "variance_head": False},
    # Per-frame covariance published with each pose (ros2_posenet.covariance): fixed (one
    # calibrated matrix), mc_dropout (spread of mc_samples dropout passes of the head) or
    # variance_head (needs model.variance_head). Every available method is calibrated on the
    # validation split and stored; this picks the one the node uses by default. fixed was the
    # best calibrated on the synthetic test trajectory (bench/RESULTS.md).
    "uncertainty": {"method": "fixed", "mc_samples": 32},
    "preprocess": {"resize": 256, "crop": 224},
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
    "optim": {
        "lr": 1e-4, "loss_lr": None, "position_lr_scale": "auto", "weight_decay": 0.0, "batch_size": 32,
        "eps": 1e-8, "schedule": "cosine", "final_lr_fraction": 0.01, "clip_grad_norm": 5.0,
    },
    # Shortcut for a one-stage run: a loss dict here replaces `stages`.
    "loss": None,
    "stages": [
        {"name": "learned", "loss": {"type": "learned", "sx": 0.0, "sq": -3.0}, "epochs": None, "lr": None, "init": "previous"},
        {"name": "reprojection", "loss": {"type": "reprojection", "gamma": 1}, "epochs": None, "lr": None, "init": "previous"},
    ],
    "train": {
        "epochs": 100,  # default for stages without their own `epochs`
        "workers": 2,
        "seed": 0,
        "device": "auto",  # auto: CUDA when available
        "amp": "auto",  # mixed precision: auto (on for CUDA) | true | false; never on CPU
        "val_every": 1,
        "keep_every": 0,  # also keep <stage>/epoch_NNN.pt (resumable) every N epochs; 0: only best and last
        "out_dir": "runs/posenet",
        "progress": True,
        "test_at_end": True,  # report the final checkpoint's errors on the test split
        "deterministic": False,
        # refit: after the stages ran with validation (which picks each stage's best epoch, whether a
        # fine-tuning stage is kept at all, and calibrates the covariance), train them again on every
        # training frame (validation and split-gap frames included) for the chosen epochs, into
        # <out_dir>/refit; the refit checkpoints keep the held-out covariance calibration.
        # Needs data.val: holdout. calibrate_from is set by the refit pass itself: the run folder
        # whose best.pt checkpoints hold the held-out validation metrics and covariance.
        "refit": False,
        "calibrate_from": None,
    },
}

class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_YamlLoader)


# Dicts whose keys are free-form (checked by their consumer: build_loss, the dataset loader).
FREE_FORM = {"loss", "options"}


def did_you_mean(key: str, options, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, [str(o) for o in options], n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(sorted(map(str, options)))})"


def _merge(base, update, path: str = ""):
    """Deep-merge ``update`` into a copy of ``base``; unknown keys raise :class:`ConfigError`."""
    if not isinstance(update, dict):
        raise ConfigError(f"config key '{path}' must be a mapping, got {update!r}")
    merged = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in merged:
            raise ConfigError(f"unknown config key '{where}'" + did_you_mean(str(key), merged, f"{path}." if path else ""))
        if key == "stages":
            merged[key] = value  # validated stage by stage later
        elif isinstance(merged[key], dict) and key not in FREE_FORM and value is not None:
            merged[key] = _merge(merged[key], value, where)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


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
    (``stages.1.epochs=5`` or ``stages.reprojection.epochs=5``).
    """
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form key=value (e.g. train.epochs=3)")
    key, raw = override.split("=", 1)
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{override}': value is not valid YAML ({err})") from None
    parts = key.strip().split(".")
    node, free = config, False
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = _find_stage(node, part, where)
            continue
        if part not in node and not free:
            raise ConfigError(f"unknown config key '{where}'" + did_you_mean(part, node, where[: -len(part)]))
        free = free or part in FREE_FORM
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"config key '{where}' is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        raise ConfigError(f"'{key}': name a field of the stage, e.g. {key}.epochs=3")
    if last not in node and not free:
        raise ConfigError(f"unknown config key '{key}'" + did_you_mean(last, node, key[: -len(last)]))
    node[last] = value


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> dict:
    """Read a YAML config, merge it onto :data:`DEFAULTS`, apply overrides, validate.

    Returns the resolved config (every key present, stages filled in).
    """
    file_config = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            file_config = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(file_config, dict):
            raise ConfigError(f"config file {path} must contain a mapping at the top level")
    config = _merge(DEFAULTS, file_config)
    # Fill stage fields first so overrides like stages.learned.epochs=3 find their key.
    if isinstance(config["stages"], list):
        config["stages"] = [{**STAGE_DEFAULTS, **s} if isinstance(s, dict) else s for s in config["stages"]]
    for override in overrides or []:
        apply_override(config, override)
    return validate_config(config)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_config(config: dict) -> dict:
    """Check every value and fill stage defaults; returns a new resolved config.

    A top-level ``loss`` dict turns the run into a single stage with that loss.
    """
    cfg = _merge(DEFAULTS, {k: v for k, v in config.items() if k != "stages"})
    cfg["stages"] = copy.deepcopy(config.get("stages", DEFAULTS["stages"]))

    data = cfg["data"]
    _require(isinstance(data["kind"], str) and data["kind"], "data.kind is required (e.g. cambridge, 7scenes, bundler)")
    _require(isinstance(data["root"], str) and data["root"], "data.root is required: the scene folder")
    _require(_is_int(data["max_points"]) and data["max_points"] >= 0, f"data.max_points must be an integer >= 0, got {data['max_points']!r}")
    _require(isinstance(data["augment"], bool), f"data.augment must be true or false, got {data['augment']!r}")
    try:
        _augmentation_of(data)  # checked even when augment is off, so a typo does not wait for the day it is on
    except ValueError as err:
        raise ConfigError(f"data.{err}") from None
    _require(data["val"] in ("holdout", "test", "none"), f"data.val must be holdout, test or none, got {data['val']!r}")
    _require(_is_number(data["val_fraction"]) and 0 < data["val_fraction"] <= 0.5, f"data.val_fraction must be in (0, 0.5], got {data['val_fraction']!r}")
    _require(_is_int(data["val_block"]) and data["val_block"] >= 1, f"data.val_block must be an integer >= 1, got {data['val_block']!r}")
    _require(data["val_split"] in VAL_SPLITS, f"data.val_split must be one of {', '.join(VAL_SPLITS)}, got {data['val_split']!r}")
    _require(_is_int(data["val_gap"]) and data["val_gap"] >= 0, f"data.val_gap must be an integer >= 0, got {data['val_gap']!r}")
    _require(isinstance(data["options"], dict), f"data.options must be a mapping of loader options, got {data['options']!r}")

    try:
        ModelConfig.from_dict(cfg["model"])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from None
    try:
        PreprocessConfig.from_dict(cfg["preprocess"])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"preprocess: {err}") from None

    _validate_uncertainty(cfg)

    optim = cfg["optim"]
    _require(_is_number(optim["lr"]) and optim["lr"] > 0, f"optim.lr must be a positive number, got {optim['lr']!r}")
    _require(optim["loss_lr"] is None or (_is_number(optim["loss_lr"]) and optim["loss_lr"] > 0), f"optim.loss_lr must be a positive number or null, got {optim['loss_lr']!r}")
    _require(optim["position_lr_scale"] == "auto" or (_is_number(optim["position_lr_scale"]) and optim["position_lr_scale"] > 0), f"optim.position_lr_scale must be auto or a positive number, got {optim['position_lr_scale']!r}")
    _require(optim["schedule"] in ("constant", "cosine"), f"optim.schedule must be constant or cosine, got {optim['schedule']!r}")
    _require(_is_number(optim["final_lr_fraction"]) and 0 <= optim["final_lr_fraction"] <= 1, f"optim.final_lr_fraction must be in [0, 1], got {optim['final_lr_fraction']!r}")
    _require(_is_number(optim["weight_decay"]) and optim["weight_decay"] >= 0, f"optim.weight_decay must be >= 0, got {optim['weight_decay']!r}")
    _require(_is_int(optim["batch_size"]) and optim["batch_size"] >= 1, f"optim.batch_size must be an integer >= 1, got {optim['batch_size']!r}")
    _require(_is_number(optim["eps"]) and optim["eps"] > 0, f"optim.eps must be positive, got {optim['eps']!r}")
    _require(optim["clip_grad_norm"] is None or (_is_number(optim["clip_grad_norm"]) and optim["clip_grad_norm"] > 0), f"optim.clip_grad_norm must be a positive number or null, got {optim['clip_grad_norm']!r}")

    train = cfg["train"]
    _require(_is_int(train["epochs"]) and train["epochs"] >= 1, f"train.epochs must be an integer >= 1, got {train['epochs']!r}")
    _require(_is_int(train["workers"]) and train["workers"] >= 0, f"train.workers must be an integer >= 0, got {train['workers']!r}")
    _require(_is_int(train["seed"]), f"train.seed must be an integer, got {train['seed']!r}")
    _require(isinstance(train["device"], str), f"train.device must be auto, cpu or cuda[:N], got {train['device']!r}")
    _require(train["device"] in ("auto", "cpu", "cuda") or train["device"].startswith("cuda:"), f"train.device must be auto, cpu or cuda[:N], got {train['device']!r}")
    _require(train["amp"] in ("auto", True, False), f"train.amp must be auto, true or false, got {train['amp']!r}")
    _require(_is_int(train["val_every"]) and train["val_every"] >= 1, f"train.val_every must be an integer >= 1, got {train['val_every']!r}")
    _require(_is_int(train["keep_every"]) and train["keep_every"] >= 0, f"train.keep_every must be an integer >= 0, got {train['keep_every']!r}")
    _require(isinstance(train["out_dir"], str) and train["out_dir"], "train.out_dir must be a folder path")
    for flag in ("progress", "test_at_end", "deterministic", "refit"):
        _require(isinstance(train[flag], bool), f"train.{flag} must be true or false, got {train[flag]!r}")
    _require(train["calibrate_from"] is None or (isinstance(train["calibrate_from"], str) and train["calibrate_from"]),
             f"train.calibrate_from must be a run folder or null, got {train['calibrate_from']!r}")
    _require(not train["refit"] or cfg["data"]["val"] == "holdout",
             f"train.refit needs data.val: holdout (it refits on the frames validation held out), got {cfg['data']['val']!r}")
    _require(isinstance(cfg["map_frame"], str) and cfg["map_frame"], "map_frame must be a non-empty frame id")

    if cfg["loss"] is not None:
        _require(isinstance(cfg["loss"], dict), f"loss must be a mapping like {{type: beta, beta: 500}}, got {cfg['loss']!r}")
        cfg["stages"] = [{"name": str(cfg["loss"].get("type")), "loss": cfg["loss"], "init": "scratch"}]
        cfg["loss"] = None
    cfg["stages"] = _validate_stages(cfg["stages"])
    return cfg


def _validate_uncertainty(cfg: dict) -> None:
    unc = cfg["uncertainty"]
    _require(isinstance(unc, dict), f"uncertainty must be a mapping like {{method: mc_dropout}}, got {unc!r}")
    _require(unc["method"] in UNCERTAINTY_METHODS, f"uncertainty.method must be one of {', '.join(UNCERTAINTY_METHODS)}, got {unc['method']!r}")
    _require(_is_int(unc["mc_samples"]) and unc["mc_samples"] >= 2, f"uncertainty.mc_samples must be an integer >= 2, got {unc['mc_samples']!r}")
    if unc["method"] == "mc_dropout":
        _require(cfg["model"]["dropout"] > 0, "uncertainty.method mc_dropout needs model.dropout > 0 (or use fixed)")
    if unc["method"] == "variance_head":
        _require(cfg["model"]["variance_head"] is True, "uncertainty.method variance_head needs model.variance_head: true")


def _validate_stages(stages) -> list[dict]:
    _require(isinstance(stages, list) and stages, "stages must be a non-empty list of {name, loss, epochs, lr, init}")
    resolved, names = [], set()
    for i, stage in enumerate(stages):
        where = f"stages[{i}]"
        _require(isinstance(stage, dict), f"{where} must be a mapping, got {stage!r}")
        unknown = set(stage) - set(STAGE_DEFAULTS)
        _require(not unknown, f"unknown key '{where}.{next(iter(unknown), '')}'" + did_you_mean(next(iter(unknown), ""), STAGE_DEFAULTS))
        s = {**STAGE_DEFAULTS, **copy.deepcopy(stage)}
        _require(isinstance(s["loss"], dict), f"{where}.loss must be a mapping like {{type: learned}}")
        s["name"] = str(s["name"] or s["loss"].get("type"))
        _require(s["name"] not in names, f"stage name '{s['name']}' is used twice; give stages distinct names")
        _require(all(c.isalnum() or c in "-_" for c in s["name"]), f"stage name '{s['name']}' must be letters, digits, - or _ (it names a folder)")
        names.add(s["name"])
        try:
            build_loss(s["loss"])
        except ValueError as err:
            raise ConfigError(f"stages.{s['name']}.loss: {err}") from None
        _require(s["epochs"] is None or (_is_int(s["epochs"]) and s["epochs"] >= 1), f"stages.{s['name']}.epochs must be an integer >= 1 or null")
        _require(s["lr"] is None or (_is_number(s["lr"]) and s["lr"] > 0), f"stages.{s['name']}.lr must be a positive number or null")
        _require(isinstance(s["init"], str) and s["init"], f"stages.{s['name']}.init must be previous, scratch or a checkpoint path")
        _require(s["stop_after"] is None or (_is_int(s["stop_after"]) and s["stop_after"] >= 0),
                 f"stages.{s['name']}.stop_after must be an integer >= 0 or null, got {s['stop_after']!r}")
        fine_tuning = s["loss"].get("type") == "reprojection"
        s["freeze_batchnorm"] = fine_tuning if s["freeze_batchnorm"] is None else s["freeze_batchnorm"]
        s["dropout"] = (not fine_tuning) if s["dropout"] is None else s["dropout"]
        for key in ("freeze_batchnorm", "dropout"):
            _require(isinstance(s[key], bool), f"stages.{s['name']}.{key} must be true, false or null, got {s[key]!r}")
        resolved.append(s)
    return resolved


def stage_epochs(cfg: dict, stage: dict) -> int:
    return stage["epochs"] or cfg["train"]["epochs"]


def stage_lr(cfg: dict, stage: dict) -> float:
    return float(stage["lr"] or cfg["optim"]["lr"])


def _augmentation_of(data: dict) -> Augmentation:
    return Augmentation(random_crop=data["random_crop"], color_jitter=data["color_jitter"], rotation_deg=data["rotation_deg"])


def augmentation(data: dict) -> Augmentation | bool:
    """The training set's :class:`Augmentation` from the ``data`` section (False when off)."""
    return _augmentation_of(data) if data["augment"] else False

"""``run_training``: every stage of a config, then (``train.refit``) the same stages on every frame.

Validation needs frames the network does not train on, but once it has chosen each stage's
epoch, whether a fine-tuning stage is kept, and the covariance, those frames are wasted on a
final model. With ``train.refit`` the stages run a second time on *every* training frame
(validation and split-gap frames included) into ``<out_dir>/refit``, each for the epochs
validation chose on the same learning-rate schedule; the refit checkpoints carry the
held-out covariance calibration and validation metrics of the validated run. With
``train.ensemble: N`` the refit trains N networks (seeds ``seed`` .. ``seed + N - 1``; the
first in ``refit``, the others in ``refit-seed<S>``) and writes them as one checkpoint,
``<out_dir>/ensemble.pt``, whose pose is their mean (:class:`~ros2_posenet.model.PoseEnsemble`).
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
import yaml

from ..checkpoint import CheckpointError, load_checkpoint, save_ensemble
from ..metrics import METHOD_MEAN, METHOD_MODEL
from ..train_config import ConfigError, did_you_mean, stage_epochs, validate_config
from .runtime import Dist, seed_everything
from .trainer import Trainer

log = logging.getLogger(__name__)

REFIT_FOLDER = "refit"
ENSEMBLE_FILE = "ensemble.pt"


def selected_epochs(out_dir: Path, stage_names: list[str]) -> dict[str, int]:
    """Epoch of each stage's ``best.pt`` in a validated run (0: the stage kept its starting weights)."""
    return {name: int(load_checkpoint(out_dir / name / "best.pt")["epoch"]) for name in stage_names}


def refit_config(cfg: dict, epochs: dict[str, int], member: int = 0) -> dict:
    """The config of the refit pass of the validated run ``cfg`` whose stages chose ``epochs``
    (of its ensemble's ``member``-th network: seed ``train.seed + member``)."""
    refit = copy.deepcopy(cfg)
    out_dir = Path(cfg["train"]["out_dir"])
    seed = cfg["train"]["seed"] + member
    folder = REFIT_FOLDER if member == 0 else f"{REFIT_FOLDER}-seed{seed}"
    refit["data"]["val"] = "none"
    refit["train"].update(refit=False, ensemble=1, seed=seed, calibrate_from=str(out_dir), out_dir=str(out_dir / folder))
    for stage in refit["stages"]:
        stage["stop_after"] = epochs[stage["name"]]
    return validate_config(refit)


def _run_stages(cfg: dict, dist_info: Dist, resume_payload: dict | None, only_stage: str | None) -> tuple[Trainer, dict, str]:
    """Train the stages of ``cfg`` (all, or ``only_stage``); returns the trainer, per-stage results and the final best.pt."""
    names = [s["name"] for s in cfg["stages"]]
    seed_everything(cfg["train"]["seed"])
    trainer = Trainer(cfg, dist_info)
    if dist_info.main:
        trainer.out_dir.mkdir(parents=True, exist_ok=True)
        (trainer.out_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        trainer.say(f"scene {trainer.data.scene}: {trainer.data.frames_line()}; validation: {trainer.data.val_description}; "
                    f"device {dist_info.device}" + (f" x{dist_info.world_size} (DDP)" if dist_info.enabled else "")
                    + (f", autocast {trainer.amp_dtype}" if trainer.autocast else ""))
        if cfg["train"]["calibrate_from"]:
            trainer.say("refit on every training frame: epochs per stage "
                        + ", ".join(f"{s['name']} {s['stop_after']}" for s in cfg["stages"])
                        + f", covariance calibrated on {cfg['train']['calibrate_from']}'s held-out frames")
        warning = trainer.data.split.dropped_warning()
        if warning and not cfg["train"]["refit"]:  # a refit trains on the dropped frames after all
            log.warning("WARNING: %s", warning)
    indices = [names.index(only_stage)] if only_stage else list(range(len(names)))
    start_stage = resume_payload["stage_index"] if resume_payload is not None else indices[0]
    results = {}
    for i in indices:
        stage_dir = trainer.stage_dir(cfg["stages"][i])
        if i < start_stage:  # finished before the resumed stage
            results[names[i]] = {"best": str(stage_dir / "best.pt"), "last": str(stage_dir / "last.pt")}
            continue
        resumed = resume_payload if resume_payload is not None and i == start_stage else None
        results[names[i]] = trainer.run_stage(i, resumed)
    return trainer, results, results[names[indices[-1]]]["best"]


def _refit(cfg: dict, trainer: Trainer, dist_info: Dist, epochs: dict[str, int], test_at_end: bool) -> tuple[dict, str]:
    """The refit of the validated run ``cfg`` (each of its ensemble's networks): the first network's
    per-stage results and the final checkpoint (the ensemble's, where there are several)."""
    first_results, finals = _refit_networks(cfg, epochs, dist_info, trainer)
    if len(finals) == 1:
        return first_results, finals[0]
    if test_at_end:
        _report_test(trainer, finals[0], " (the ensemble's first network)")
    return first_results, _write_ensemble(cfg, finals, trainer, dist_info)


def _refit_networks(cfg: dict, epochs: dict[str, int], dist_info: Dist, trainer: Trainer,
                    keep_finished: bool = False) -> tuple[dict, list[str]]:
    """Refit each network of the validated run ``cfg``'s ensemble (``keep_finished``: not those that finished
    already, :func:`_finished`); the first trained network's per-stage results and every final checkpoint."""
    first_results, finals = {}, []
    for member in range(cfg["train"]["ensemble"]):
        member_cfg = refit_config(cfg, epochs, member)
        final = _finished(member_cfg) if keep_finished else None
        if final is None:
            if keep_finished:
                trainer.say(f"the ensemble's network {member_cfg['train']['out_dir']} did not finish: training it")
            _, results, final = _run_stages(member_cfg, dist_info, None, None)
            first_results = first_results or results
        finals.append(final)
    return first_results, finals


def _write_ensemble(cfg: dict, finals: list[str], trainer: Trainer, dist_info: Dist) -> str:
    """``<out_dir>/ensemble.pt`` of the validated run ``cfg`` from its networks' final checkpoints."""
    ensemble = Path(cfg["train"]["out_dir"]) / ENSEMBLE_FILE
    if dist_info.main:
        save_ensemble(ensemble, finals)
        seeds = f"{cfg['train']['seed']}..{cfg['train']['seed'] + len(finals) - 1}"
        trainer.say(f"ensemble of {len(finals)} networks (seeds {seeds}), their mean pose -> {ensemble}")
    dist_info.barrier()
    return str(ensemble)


def _finished(cfg: dict) -> str | None:
    """The final checkpoint of the run ``cfg`` if its last stage trained to its end with this very config
    (not a stale folder of another run), else None."""
    stage = cfg["stages"][-1]
    best = Path(cfg["train"]["out_dir"]) / stage["name"] / "best.pt"
    if not best.is_file():
        return None
    end = stage_epochs(cfg, stage) if stage["stop_after"] is None else min(stage["stop_after"], stage_epochs(cfg, stage))
    payload = load_checkpoint(best)
    return str(best) if payload.get("epoch") == end and payload.get("train_config") == cfg else None


def _complete_ensemble(cfg: dict, trainer: Trainer, dist_info: Dist) -> str | None:
    """After one network of an ensemble's refit was resumed on its own (an interrupted run): the networks that
    did not finish are trained again, and the ensemble's checkpoint written. None: ``cfg`` is no ensemble's."""
    validated_dir = Path(cfg["train"]["calibrate_from"])
    if not (validated_dir / "config.yaml").is_file():
        return None
    validated = validate_config(yaml.safe_load((validated_dir / "config.yaml").read_text()))
    if validated["train"]["ensemble"] == 1:
        return None
    epochs = selected_epochs(validated_dir, [s["name"] for s in validated["stages"]])
    _, finals = _refit_networks(validated, epochs, dist_info, trainer, keep_finished=True)
    return _write_ensemble(validated, finals, trainer, dist_info)


def _report_test(trainer: Trainer, checkpoint: str, label: str) -> dict | None:
    test = trainer.test_report(checkpoint)
    if test is not None:
        m, b = test[METHOD_MODEL], test[METHOD_MEAN]
        trainer.say(f"test split{label}: median {m['median_position_m']:.3f} m {m['median_rotation_deg']:.2f}° "
                    f"(mean-pose baseline {b['median_position_m']:.3f} m {b['median_rotation_deg']:.2f}°) -> {checkpoint}")
    return test


def run_training(config: dict, resume: str | os.PathLike | None = None, only_stage: str | None = None) -> dict:
    """Train every stage of ``config`` (or only ``only_stage``); continue a run with ``resume``.

    Args:
        config: a config as returned by :func:`ros2_posenet.train_config.load_config` (it is validated again).
        resume: a ``last.pt`` checkpoint; training continues exactly where it stopped.
        only_stage: name of the single stage to run.

    Returns:
        ``{"out_dir", "checkpoint" (best of the final stage), "stages": {name: {"best", "last",
        "best_epoch", "val", "epochs"}}, "val_split", "val_mean_pose", "test"}`` — ``test``
        holds the final checkpoint's test-split errors and the mean-pose baseline's (rank 0
        with ``train.test_at_end``; else None). With ``train.refit`` also ``"validated"``: the
        validated run's ``{"checkpoint", "stages", "test"}``; ``checkpoint``, ``stages`` and
        ``test`` are then the refit's (``checkpoint``: ``<out_dir>/ensemble.pt`` with ``train.ensemble`` > 1,
        ``stages``: its first network's). Resuming one network of an interrupted ensemble refit trains
        the others that did not finish and returns the ensemble's checkpoint.
    """
    cfg = validate_config(config)
    names = [s["name"] for s in cfg["stages"]]
    if only_stage is not None and only_stage not in names:
        raise ConfigError(f"no stage named '{only_stage}'" + did_you_mean(only_stage, names))
    if only_stage is not None and cfg["train"]["refit"]:
        raise ConfigError("train.refit refits every stage; run it without --stage")
    resume_payload = load_checkpoint(resume) if resume is not None else None
    if resume_payload is not None and "resume" not in resume_payload:
        raise CheckpointError(f"{resume} has no training state; resume from a stage's last.pt, not best.pt")
    dist_info = Dist(cfg["train"]["device"])
    try:
        if cfg["train"]["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
        elif dist_info.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        trainer, results, final = _run_stages(cfg, dist_info, resume_payload, only_stage)
        test_at_end = dist_info.main and cfg["train"]["test_at_end"]
        validated = None
        if cfg["train"]["refit"]:
            test = _report_test(trainer, final, " (validated run)") if test_at_end else None
            validated = {"checkpoint": final, "stages": results, "test": test}
            dist_info.barrier()  # every rank reads the chosen epochs from rank 0's checkpoints
            results, final = _refit(cfg, trainer, dist_info, selected_epochs(trainer.out_dir, names), test_at_end)
        elif resume_payload is not None and cfg["train"]["calibrate_from"] and only_stage is None:
            final = _complete_ensemble(cfg, trainer, dist_info) or final  # one network of an interrupted ensemble
        members = cfg["train"]["ensemble"]
        label = "" if validated is None else " (refit on every frame)" if members == 1 else f" (ensemble of {members} refits)"
        test = _report_test(trainer, final, label) if test_at_end else None
        dist_info.barrier()
        result = {
            "out_dir": str(trainer.out_dir), "checkpoint": final, "stages": results,
            "val_split": trainer.data.val_description, "val_mean_pose": trainer.reference, "test": test,
        }
        if validated is not None:
            result["validated"] = validated
        return result
    finally:
        dist_info.close()

"""Train PoseNet: the paper's two-stage schedule, checkpoints, resume and multi-GPU.

``train --config config/train_synthetic.yaml [key=value ...] [--stage NAME] [--resume last.pt]``

Kendall & Cipolla (CVPR 2017) recommend training first with the learned
homoscedastic weighting of position and rotation losses (no β to tune), then
fine-tuning those weights with the reprojection loss. The default config runs both
stages one after the other; ``--stage`` runs a single one, starting from the
previous stage's best checkpoint in the same output folder (or ``--init PATH``).

Everything is in one YAML config (see ``config/``) whose keys can be overridden on
the command line (``train.epochs=3``, ``stages.learned.lr=1e-4``, ``loss.type=beta``,
values parsed as YAML). Output folder layout::

    <train.out_dir>/config.yaml        resolved config of the run
    <train.out_dir>/metrics.jsonl      one JSON record per epoch (losses, ŝx, ŝq, val errors)
    <train.out_dir>/<stage>/best.pt    best validation checkpoint of the stage
    <train.out_dir>/<stage>/last.pt    latest checkpoint, with optimiser and RNG state for --resume

Validation: unless ``data.val`` says otherwise, a held-out subset of the *training*
images, so the test split stays untouched for the final report: whole training
sequences, or blocks of consecutive frames with a gap of ``data.val_gap`` frames
dropped on both sides (``data.val_split``, see :mod:`ros2_posenet.data.split`).
Neighbouring video frames are near-duplicates; validation on them would measure
interpolation and look better than deployment. The same held-out predictions select
``best.pt`` and calibrate every per-frame covariance method stored in checkpoints
(``uncertainty`` in the config, :mod:`ros2_posenet.covariance`).

With ``train.refit: true`` the validated run is followed by a refit on every training
frame (``<train.out_dir>/refit/``), each stage stopped at the epoch validation chose and
keeping the held-out covariance calibration, so no frame is lost to validation in the final
model; ``train.ensemble: N`` refits N networks of successive seeds and writes them as one
checkpoint, ``<train.out_dir>/ensemble.pt``, that publishes their mean pose (see
:mod:`ros2_posenet.training.run`).

Under ``torchrun --nproc_per_node=N`` the same script trains with
DistributedDataParallel (NCCL on GPUs, gloo on CPU); rank 0 validates and writes.

The code lives in :mod:`ros2_posenet.training` (runtime, loaders, optim, trainer, run, cli);
this module is the entry point and keeps the names other code imports from it.
"""
from __future__ import annotations

import sys

from .train_config import ConfigError, apply_override, did_you_mean, load_config, validate_config
from .training.cli import build_parser, main
from .training.loaders import (
    DataBundle, build_dataset, holdout_split, make_loader, move_batch, sequence_ids, validation_split,
)
from .training.optim import build_optimizer, build_scheduler, position_lr_scale
from .training.run import refit_config, run_training
from .training.runtime import Dist, TrainingError, amp_settings, epoch_seed, seed_everything
from .training.trainer import Trainer, TrainStep, train_one_epoch, validate, validation_score

__all__ = [
    "ConfigError", "DataBundle", "Dist", "TrainStep", "Trainer", "TrainingError", "amp_settings", "apply_override",
    "build_dataset", "build_optimizer", "build_parser", "build_scheduler", "did_you_mean", "epoch_seed",
    "holdout_split", "load_config", "main", "make_loader", "move_batch", "position_lr_scale", "refit_config",
    "run_training", "seed_everything", "sequence_ids", "train_one_epoch", "validate", "validate_config",
    "validation_score", "validation_split",
]

if __name__ == "__main__":
    sys.exit(main())

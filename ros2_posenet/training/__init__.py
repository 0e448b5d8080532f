"""Training PoseNet, in the order a run sets itself up.

* :mod:`.runtime` — process group (DDP), seeds, random state, mixed precision, :class:`TrainingError`.
* :mod:`.loaders` — the held-out validation split, the datasets and the per-epoch loaders.
* :mod:`.optim` — Adam with its parameter groups and the learning-rate schedule.
* :mod:`.trainer` — one training step, one epoch, validation, checkpoints: :class:`Trainer`.
* :mod:`.run` — :func:`run_training`: the stages, then the optional refit on every frame.
* :mod:`.cli` — the ``train`` command (``python -m ros2_posenet.train``).

The config schema is :mod:`ros2_posenet.train_config`; the metrics shared with evaluation are
:mod:`ros2_posenet.metrics`.
"""

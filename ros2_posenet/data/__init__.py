"""Pose datasets: Cambridge Landmarks, 7-Scenes, Bundler reconstructions (Dubrovnik 6K),
posed photographs without depth (Strecha format) and the synthetic scene that writes the first three.

``build_dataset(kind, root, split, preprocess, augment, ...)`` is the one entry
point of the trainer and tools; items and batches follow the contract in
:mod:`ros2_posenet.data.common`.
"""
from __future__ import annotations

from pathlib import Path

from ..preprocess import PreprocessConfig, Preprocessor
from .cambridge import CambridgeLandmarks, NvmReconstruction, read_nvm
from .augment import Augmentation, color_jitter
from .bundler import BundleReconstruction, BundlerScene, read_bundle
from .common import DatasetError, PoseDataset, PoseRecord, build_item, collate_pose_batch
from .posed_images import PosedImage, PosedImageSet, read_strecha_camera
from .seven_scenes import SevenScenes

DATASET_KINDS = {"cambridge": CambridgeLandmarks, "7scenes": SevenScenes, "posed": PosedImageSet, "bundler": BundlerScene}
_ALIASES = {"strecha": "posed", "7-scenes": "7scenes", "seven_scenes": "7scenes", "sevenscenes": "7scenes", "cambridge_landmarks": "cambridge",
            "dubrovnik": "bundler", "dubrovnik6k": "bundler"}

__all__ = [
    "Augmentation",
    "BundleReconstruction",
    "BundlerScene",
    "CambridgeLandmarks",
    "DATASET_KINDS",
    "DatasetError",
    "NvmReconstruction",
    "PoseDataset",
    "PoseRecord",
    "PosedImage",
    "PosedImageSet",
    "SevenScenes",
    "build_dataset",
    "build_item",
    "collate_pose_batch",
    "color_jitter",
    "read_bundle",
    "read_nvm",
    "read_strecha_camera",
]


def build_dataset(
    kind: str,
    root: str | Path,
    split: str,
    preprocess: PreprocessConfig | Preprocessor | None = None,
    augment: bool | Augmentation = False,
    max_points: int = 256,
    seed: int = 0,
    **options,
) -> PoseDataset:
    """Open a scene as a torch Dataset.

    Args:
        kind: ``"cambridge"``, ``"7scenes"`` (``"7-scenes"`` also accepted), ``"bundler"``
            (``"dubrovnik"`` also accepted) or ``"posed"`` (Strecha-format posed
            photographs, ``"strecha"`` also accepted).
        root: scene folder.
        split: ``"train"`` or ``"test"``.
        preprocess: resize/crop settings (the checkpoint's PreprocessConfig).
        augment: training augmentation: an :class:`Augmentation` (random crop, colour
            jitter, rotated views), ``True`` for PoseNet's random crop alone, or
            ``False`` (evaluation: centre crop). Point subsets are random with it.
        max_points: 3D points per item for the reprojection loss (0: none).
        seed: base seed of the per-item random draws.
        **options: loader-specific options (Cambridge: ``reconstruction``,
            ``reconstruction_width``, ``focal``; 7-Scenes: ``camera`` (``rgb`` default, ``depth``,
            ``pgt``) and ``pose_file`` (with ``pgt``); Bundler: ``bundle``, ``image_list``,
            ``split_file``, ``image_root``, ``test_fraction``, ``test_block``; posed: ``held_out``).

    Raises:
        ValueError: unknown kind or split. DatasetError: missing or malformed files.
    """
    key = _ALIASES.get(str(kind).lower(), str(kind).lower())
    if key not in DATASET_KINDS:
        raise ValueError(f"dataset kind must be one of {sorted(DATASET_KINDS)}, got {kind!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return DATASET_KINDS[key](
        root, split=split, preprocess=preprocess, augment=augment, max_points=max_points,
        seed=seed, **options,
    )

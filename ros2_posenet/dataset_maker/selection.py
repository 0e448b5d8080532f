"""Which recorded frames become dataset frames, and which of them are held out (ROS-free).

* near-duplicates: a robot standing still records the same view for minutes; a frame is
  kept only when ``min_interval`` seconds have passed since the last kept one *and* the
  camera has moved ``min_translation`` metres or turned ``min_rotation`` degrees (the
  pose test is skipped when there is no pose yet, e.g. before SfM);
* blur: variance of the Laplacian of the grey image (Pech-Pacheco et al. 2000); a frame
  is dropped below ``blur_threshold`` or below ``blur_relative`` × the median of the
  recent frames (the relative test adapts to the scene's texture);
* cap: at most ``max_frames``, spread evenly over the recording;
* split: the recording is cut into blocks of ``block_seconds``; evenly spaced blocks are
  the test set, and frames within ``gap_seconds`` of a train/test boundary are dropped.
  Never single interleaved frames: that measures interpolation (issue #14).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

from ..geometric.features import to_gray
from ..geometry import matrix_to_pose, rotation_angle_deg_np

NANOSECONDS = 1_000_000_000


@dataclass(frozen=True)
class SelectionConfig:
    min_interval: float = 0.1  # s between kept frames
    min_translation: float = 0.05  # m moved, or ...
    min_rotation: float = 2.0  # ... degrees turned since the last kept frame
    blur_threshold: float = 0.0  # absolute Laplacian variance (0: off)
    blur_relative: float = 0.4  # fraction of the recent median (0: off)
    blur_window: int = 25  # frames in that median
    max_frames: int = 0  # 0: no cap

    def __post_init__(self):
        for name in ("min_interval", "min_translation", "min_rotation", "blur_threshold", "blur_relative"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number >= 0")
        if self.blur_relative >= 1:
            raise ValueError("blur_relative must be below 1 (a fraction of the recent median sharpness)")
        if self.max_frames < 0 or self.blur_window < 1:
            raise ValueError("max_frames must be >= 0 and blur_window >= 1")


def sharpness(rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image: low for blurred (or textureless) frames."""
    return float(cv2.Laplacian(to_gray(rgb), cv2.CV_64F).var())


class FrameSelector:
    """Decides frame by frame, in recording order, what to keep; the reason for a drop is returned."""

    def __init__(self, config: SelectionConfig):
        self.config = config
        self._last_stamp: int | None = None
        self._last_pose: np.ndarray | None = None
        self._recent = deque(maxlen=config.blur_window)

    def duplicate(self, stamp_ns: int, pose: np.ndarray | None) -> str | None:
        """``"near-duplicate (time)"``/``"(pose)"`` when too close to the last kept frame, else None."""
        c = self.config
        if self._last_stamp is None:
            return None
        if stamp_ns - self._last_stamp < c.min_interval * NANOSECONDS:
            return "near-duplicate (time)"
        if pose is not None and self._last_pose is not None and (c.min_translation > 0 or c.min_rotation > 0):
            moved = np.linalg.norm(pose[:3, 3] - self._last_pose[:3, 3])
            turned = rotation_angle_deg_np(matrix_to_pose(pose)[1], matrix_to_pose(self._last_pose)[1])
            if moved < c.min_translation and turned < c.min_rotation:
                return "near-duplicate (pose)"
        return None

    def blurred(self, rgb: np.ndarray) -> str | None:
        """``"blurred"`` when the image is less sharp than the thresholds allow, else None."""
        c = self.config
        value = sharpness(rgb)
        median = float(np.median(self._recent)) if self._recent else None
        self._recent.append(value)
        if value < c.blur_threshold:
            return "blurred"
        if c.blur_relative > 0 and median is not None and len(self._recent) > 3 and value < c.blur_relative * median:
            return "blurred"
        return None

    def keep(self, stamp_ns: int, pose: np.ndarray | None) -> None:
        self._last_stamp, self._last_pose = stamp_ns, pose


def cap_indices(count: int, max_frames: int) -> np.ndarray:
    """Indices of at most ``max_frames`` of ``count`` frames, evenly spread (all when 0 or enough)."""
    if max_frames <= 0 or count <= max_frames:
        return np.arange(count)
    return np.unique(np.round(np.linspace(0, count - 1, max_frames)).astype(int))


@dataclass(frozen=True)
class SplitConfig:
    test_fraction: float = 0.2
    block_seconds: float = 20.0
    gap_seconds: float = 1.0

    def __post_init__(self):
        if not 0 <= self.test_fraction < 1:
            raise ValueError("test fraction must be in [0, 1)")
        if not self.block_seconds > 0 or not self.gap_seconds >= 0:
            raise ValueError("block seconds must be > 0 and gap seconds >= 0")


def time_block_split(stamps_ns: np.ndarray, config: SplitConfig) -> tuple[list[str | None], int]:
    """``"train"``/``"test"``/None (dropped in a gap) per frame, and the number of blocks.

    Blocks of ``block_seconds`` from the first stamp; ``round(blocks · test_fraction)``
    (at least one when the fraction is > 0) evenly spaced blocks are the test set.
    """
    stamps_ns = np.asarray(stamps_ns, dtype=np.int64)
    if config.test_fraction == 0 or len(stamps_ns) == 0:
        return ["train"] * len(stamps_ns), 1
    block_ns = int(config.block_seconds * NANOSECONDS)
    block_of = (stamps_ns - stamps_ns[0]) // block_ns
    n_blocks = int(block_of[-1]) + 1
    if n_blocks < 2:
        duration = (stamps_ns[-1] - stamps_ns[0]) / NANOSECONDS
        raise ValueError(
            f"the selected frames span {duration:.1f} s, one block of {config.block_seconds:g} s: "
            "pass a smaller --block-seconds or a separate --test-bag"
        )
    n_test = min(n_blocks - 1, max(1, round(n_blocks * config.test_fraction)))
    test_blocks = {int((i + 0.5) * n_blocks / n_test) for i in range(n_test)}
    labels = ["test" if b in test_blocks else "train" for b in block_of.tolist()]
    gap_ns = int(config.gap_seconds * NANOSECONDS)
    boundaries = [int(stamps_ns[0]) + b * block_ns for b in range(1, n_blocks)
                  if (b in test_blocks) != (b - 1 in test_blocks)]
    if gap_ns and boundaries:
        near = np.min(np.abs(stamps_ns[:, None] - np.asarray(boundaries, dtype=np.int64)[None, :]), axis=1) < gap_ns
        labels = [None if n else label for label, n in zip(labels, near.tolist())]
    return labels, n_blocks


def sequences_of(labels: list[str | None]) -> list[tuple[str, list[int]]]:
    """Runs of consecutive frames of one split (frames dropped in a gap end a run): ``[(split, indices), ...]``."""
    runs: list[tuple[str, list[int]]] = []
    previous = None
    for i, label in enumerate(labels):
        if label is None:
            previous = None
            continue
        if label != previous:
            runs.append((label, []))
        runs[-1][1].append(i)
        previous = label
    return runs

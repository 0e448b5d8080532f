"""Microsoft 7-Scenes (Shotton et al., CVPR 2013) and scenes written in its layout.

Scene folder::

    TrainSplit.txt / TestSplit.txt     one sequence per line: "sequence1", "sequence2", ...
    seq-01/frame-000000.color.png      RGB
    seq-01/frame-000000.depth.png      uint16 depth in millimetres; 0 and 65535 = invalid
    seq-01/frame-000000.pose.txt       4x4 camera-to-world matrix (optical camera frame)
    intrinsics.txt                     optional: "fx fy cx cy width height"

Intrinsics: the published Kinect values ``fx = fy = 585, cx = 320, cy = 240`` at
640×480, unless the scene folder holds ``intrinsics.txt`` (written by the synthetic
scene generator, or by you for your own recordings); either is scaled to the
stored image size. The same intrinsics back-project the depth images (scaled to
their size). In the real 7-Scenes the depth camera is not registered to the colour
camera, so points from depth are only approximately where the colour image sees them.

Points for the reprojection loss come from depth: each item back-projects up to
``max_points`` valid depth pixels to world points (a random subset while
augmenting, a fixed one per image otherwise).
"""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from ..geometry import backproject_pixels, matrix_to_pose
from ..preprocess import PreprocessConfig, Preprocessor
from .augment import Augmentation
from .common import DatasetError, PoseDataset, PoseRecord, parse_floats, scale_intrinsics

KINECT_INTRINSICS = (585.0, 585.0, 320.0, 240.0, 640, 480)  # fx fy cx cy width height
INTRINSICS_FILE = "intrinsics.txt"
SPLIT_FILES = {"train": "TrainSplit.txt", "test": "TestSplit.txt"}
DEPTH_INVALID = 65535
ROTATION_TOLERANCE = 1e-2  # max |R Rᵀ - I| entry accepted in pose files
_SEQUENCE_LINE = re.compile(r"^(?:sequence|seq-?)(\d+)$", re.IGNORECASE)


def sequence_folder(number: int) -> str:
    """7-Scenes folder name of sequence ``number`` (1 -> ``seq-01``)."""
    return f"seq-{number:02d}"


def read_split_file(path: Path) -> list[str]:
    """Sequence folder names listed in a split file (``sequence1`` -> ``seq-01``)."""
    if not path.is_file():
        raise DatasetError("split file not found", path)
    folders = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        text = text.strip()
        if not text:
            continue
        match = _SEQUENCE_LINE.match(text)
        if not match:
            raise DatasetError(f"expected a line like 'sequence1', got {text!r}", path, number)
        folder = sequence_folder(int(match.group(1)))
        if not (path.parent / folder).is_dir():
            raise DatasetError(f"sequence folder {path.parent / folder} not found", path, number)
        folders.append(folder)
    if not folders:
        raise DatasetError("no sequences listed", path)
    return folders


def read_intrinsics_file(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """``(K, (width, height))`` from an ``intrinsics.txt`` holding ``fx fy cx cy width height``."""
    tokens, first_line = [], 1
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        text = text.split("#", 1)[0]
        if text.split() and not tokens:
            first_line = number
        tokens += text.split()
    if len(tokens) != 6:
        raise DatasetError(f"expected 6 values 'fx fy cx cy width height', got {len(tokens)}", path, first_line)
    fx, fy, cx, cy, width, height = parse_floats(tokens, path, first_line, "intrinsics")
    if fx <= 0 or fy <= 0 or width < 1 or height < 1 or width != int(width) or height != int(height):
        raise DatasetError("focal lengths must be positive and width/height positive integers", path, first_line)
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]), (int(width), int(height))


def scene_intrinsics(root: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """The scene's ``intrinsics.txt`` if present, else the published Kinect intrinsics."""
    path = root / INTRINSICS_FILE
    if path.is_file():
        return read_intrinsics_file(path)
    fx, fy, cx, cy, width, height = KINECT_INTRINSICS
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]), (width, height)


def read_pose_file(path: Path) -> np.ndarray:
    """4x4 camera-to-world matrix from a ``frame-*.pose.txt`` (validated rigid transform)."""
    if not path.is_file():
        raise DatasetError("pose file not found", path)
    rows = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        tokens = text.split()
        if not tokens:
            continue
        if len(tokens) != 4:
            raise DatasetError(f"expected 4 values per row of the 4x4 pose, got {len(tokens)}", path, number)
        if len(rows) == 4:
            raise DatasetError("more than 4 rows in a 4x4 pose", path, number)
        rows.append(parse_floats(tokens, path, number, "pose row"))
    if len(rows) != 4:
        raise DatasetError(f"expected 4 rows of a 4x4 pose, got {len(rows)}", path)
    T = np.array(rows)
    if not np.allclose(T[3], [0, 0, 0, 1], atol=1e-6):
        raise DatasetError(f"last row must be '0 0 0 1', got {T[3].tolist()}", path)
    R = T[:3, :3]
    if np.abs(R @ R.T - np.eye(3)).max() > ROTATION_TOLERANCE or np.linalg.det(R) <= 0:
        raise DatasetError("upper-left 3x3 block is not a rotation matrix", path)
    return T


def backproject_depth(
    depth_mm: np.ndarray, K: np.ndarray, T_world_camera: np.ndarray, max_points: int, rng: np.random.Generator
) -> np.ndarray:
    """World points (N, 3), N <= ``max_points``, from a subset of valid depth pixels.

    Args:
        depth_mm: (H, W) uint16 depth in millimetres (0 and 65535 invalid).
        K: (3, 3) intrinsics of the depth image.
        T_world_camera: (4, 4) camera-to-world pose.
    """
    valid = np.flatnonzero((depth_mm > 0) & (depth_mm != DEPTH_INVALID))
    if len(valid) > max_points:
        valid = np.sort(rng.choice(valid, size=max_points, replace=False))
    v, u = np.divmod(valid, depth_mm.shape[1])
    z = depth_mm.reshape(-1)[valid].astype(np.float64) / 1000.0
    return backproject_pixels(np.stack((u, v), axis=1), z, K, T_world_camera)


def read_depth(path: Path) -> np.ndarray:
    """(H, W) uint16 depth image in millimetres."""
    depth = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if depth is None:
        raise DatasetError("depth image missing or unreadable", path)
    if depth.ndim != 2 or depth.dtype != np.uint16:
        raise DatasetError(f"depth must be single-channel 16-bit, got {depth.dtype} {depth.shape}", path)
    return depth


class SevenScenes(PoseDataset):
    """7-Scenes scene as a torch Dataset (items: see :mod:`.common`).

    Args:
        root: scene folder (holding ``TrainSplit.txt`` ...).
        split: ``"train"`` or ``"test"`` -> sequences of ``TrainSplit.txt`` / ``TestSplit.txt``.
        preprocess: preprocessing (resize shorter side, random/centre crop).
        augment: an :class:`~.augment.Augmentation` (``True``: PoseNet's random crop)
            plus random point subsets (training); ``False`` for evaluation.
        max_points: depth points per item (0 disables them and depth is not needed).
        seed: base seed of the per-item random draws.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        preprocess: PreprocessConfig | Preprocessor | None = None,
        augment: bool | Augmentation = False,
        max_points: int = 256,
        seed: int = 0,
    ):
        root = Path(root)
        super().__init__(preprocess, augment, max_points, seed, scene_name=root.resolve().name)
        if split not in SPLIT_FILES:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not root.is_dir():
            raise DatasetError("scene folder not found", root)
        self.root = root
        self.split = split
        self.K, self.intrinsics_size = scene_intrinsics(root)
        self.sequences = read_split_file(root / SPLIT_FILES[split])
        self._matrices: list[np.ndarray] = []
        for folder in self.sequences:
            self._add_sequence(folder)

    def _add_sequence(self, folder: str) -> None:
        colour_files = sorted((self.root / folder).glob("frame-*.color.png"))
        if not colour_files:
            raise DatasetError("no frame-*.color.png images", self.root / folder)
        for colour in colour_files:
            stem = colour.name[: -len(".color.png")]
            pose_path = colour.with_name(stem + ".pose.txt")
            depth_path = colour.with_name(stem + ".depth.png")
            if self.max_points > 0 and not depth_path.is_file():
                raise DatasetError("depth image not found (needed for points; use max_points=0 without depth)", depth_path)
            T = read_pose_file(pose_path)
            t, q = matrix_to_pose(T)
            self._matrices.append(T)
            self.samples.append(
                PoseRecord(colour, t, q, f"{folder}/{colour.name}", folder, depth_path, str(pose_path))
            )

    def raw_intrinsics(self, index: int, width: int, height: int) -> np.ndarray:
        return scale_intrinsics(self.K, self.intrinsics_size, (width, height))

    def pose_matrix(self, index: int) -> np.ndarray:
        """(4, 4) camera-to-world matrix of sample ``index`` as read from its pose file."""
        return self._matrices[index].copy()

    def visible_points(self, index: int, rng: np.random.Generator) -> np.ndarray:
        depth = read_depth(self.samples[index].depth_path)
        K_depth = scale_intrinsics(self.K, self.intrinsics_size, (depth.shape[1], depth.shape[0]))
        return backproject_depth(depth, K_depth, self._matrices[index], self.max_points, rng)

"""Microsoft 7-Scenes (Shotton et al., CVPR 2013) and scenes written in its layout.

Scene folder::

    TrainSplit.txt / TestSplit.txt     one sequence per line: "sequence1", "sequence2", ...
    seq-01/frame-000000.color.png      RGB (``.color.jpg`` also accepted)
    seq-01/frame-000000.depth.png      uint16 depth in millimetres; 0 and 65535 = invalid
    seq-01/frame-000000.pose.txt       4x4 camera-to-world matrix (optical camera frame)
    intrinsics.txt                     optional: "fx fy cx cy width height"

The camera model (``camera``, ``data.options.camera`` in a training config):

* **Official layout** (no ``intrinsics.txt``): a Kinect v1. Its pose files hold the
  poses of the *depth* sensor, and the published 585 px focal length is the depth
  camera's; the colour camera (525 px, principal point at the centre) sits about
  2.6 cm beside it. ``camera: rgb`` (default) reads it as the colour camera that took
  the picture, as DSAC* and ACE do: colour intrinsics, poses moved to the colour camera
  (``T_world_colour = T_world_depth · inv(KINECT_DEPTH_TO_COLOUR)``, the LIRIS
  calibration) and depth registered into the colour image (:func:`register_depth`)
  wherever depth is used (reprojection-loss points, depth maps). ``camera: depth`` keeps
  the published convention (depth intrinsics and poses, depth taken as if registered:
  the colour image then disagrees with them by the rig's offset, ~1° on real scenes).
  ``camera: pgt`` reads the colour camera's poses and focal length from the SfM pseudo
  ground truth of Brachmann et al. (ICCV 2021, tsattler/visloc_pseudo_gt_limitations),
  a ``pose_file`` with lines ``seq-03/frame-000844.color.png qw qx qy qz tx ty tz f``
  (world-to-camera, as COLMAP); depth is registered as with ``rgb``.
* **``intrinsics.txt`` present** (the synthetic scene, hololens-office, your own
  recordings): the pose files and those intrinsics are the colour camera's and depth is
  already registered to it. ``camera: rgb`` reads it as is; ``pgt`` takes poses and
  focal length from the pose file; ``depth`` is refused.

Intrinsics are scaled to the stored image size (OpenCV's pixel-centre convention,
:func:`ros2_posenet.geometry.resized_intrinsics`).

Points for the reprojection loss come from depth: each item back-projects up to
``max_points`` valid depth pixels to world points (a random subset while
augmenting, a fixed one per image otherwise).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import transforms3d.quaternions as t3q

from ..geometry import backproject_pixels, invert_matrix, matrix_to_pose, scale_intrinsics
from ..preprocess import PreprocessConfig, Preprocessor
from .augment import Augmentation
from .common import (
    DatasetError, PoseDataset, PoseRecord, checked_unit_quaternion, parse_floats, subsample_points,
)

# Kinect v1 as 7-Scenes recorded it (fx fy cx cy width height) and the LIRIS depth -> colour
# calibration that DSAC* and ACE use (nianticlabs/ace datasets/setup_7scenes.py).
KINECT_DEPTH_INTRINSICS = (585.0, 585.0, 320.0, 240.0, 640, 480)
KINECT_COLOUR_INTRINSICS = (525.0, 525.0, 320.0, 240.0, 640, 480)
KINECT_DEPTH_TO_COLOUR = np.array([
    [0.99996518012567637, 0.0026765126468950343, -0.0079041012313000904, -0.025558943178152542],
    [-0.0027409311281316700, 0.99996302803027592, -0.0081504520778013286, 0.00010109636268061706],
    [0.0078819942130445332, 0.0081718328771890631, 0.99993554558014031, 0.0020318321729487039],
    [0.0, 0.0, 0.0, 1.0],
])
CAMERAS = ("rgb", "depth", "pgt")
INTRINSICS_FILE = "intrinsics.txt"
SPLIT_FILES = {"train": "TrainSplit.txt", "test": "TestSplit.txt"}
DEPTH_INVALID = 65535
DEPTH_SCALE = 1000.0  # depth PNGs hold millimetres
ROTATION_TOLERANCE = 1e-2  # max |R Rᵀ - I| entry accepted in pose files
COLOUR_SUFFIXES = (".color.png", ".color.jpg")  # hololens-office and other re-encoded scenes ship JPEG
_SEQUENCE_LINE = re.compile(r"^(?:sequence|seq-?)(\d+)$", re.IGNORECASE)


def intrinsics_matrix(values) -> tuple[np.ndarray, tuple[int, int]]:
    """``(K, (width, height))`` of ``(fx, fy, cx, cy, width, height)``."""
    fx, fy, cx, cy, width, height = values
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]), (int(width), int(height))


@dataclass(frozen=True)
class DepthRegistration:
    """A depth camera beside the colour camera: its intrinsics and ``T_colour_depth`` (depth -> colour coordinates)."""

    K_depth: np.ndarray
    depth_size: tuple[int, int]
    T_colour_depth: np.ndarray


KINECT_REGISTRATION = DepthRegistration(*intrinsics_matrix(KINECT_DEPTH_INTRINSICS), KINECT_DEPTH_TO_COLOUR)


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


def colour_frames(folder: Path) -> list[tuple[str, Path]]:
    """``(stem, colour image)`` of every ``frame-*.color.png`` / ``.color.jpg`` in ``folder``, by name.

    A frame stored in both formats is ambiguous and rejected.
    """
    frames: dict[str, Path] = {}
    for suffix in COLOUR_SUFFIXES:
        for path in folder.glob(f"frame-*{suffix}"):
            stem = path.name[: -len(suffix)]
            if stem in frames:
                raise DatasetError(f"frame stored twice ({frames[stem].name} and {path.name})", path)
            frames[stem] = path
    if not frames:
        raise DatasetError("no frame-*.color.png or frame-*.color.jpg images", folder)
    return sorted(frames.items())


def backproject_depth(
    depth_m: np.ndarray, K: np.ndarray, T_world_camera: np.ndarray, max_points: int, rng: np.random.Generator
) -> np.ndarray:
    """World points (N, 3), N <= ``max_points``, from a subset of valid depth pixels.

    Args:
        depth_m: (H, W) depth in metres, 0 = invalid (:func:`depth_in_metres`).
        K: (3, 3) intrinsics of the depth image.
        T_world_camera: (4, 4) camera-to-world pose.
    """
    valid = np.flatnonzero(depth_m > 0)
    if len(valid) > max_points:
        valid = np.sort(rng.choice(valid, size=max_points, replace=False))
    v, u = np.divmod(valid, depth_m.shape[1])
    return backproject_pixels(np.stack((u, v), axis=1), depth_m.reshape(-1)[valid], K, T_world_camera)


def read_depth(path: Path) -> np.ndarray:
    """(H, W) uint16 depth image in millimetres."""
    depth = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if depth is None:
        raise DatasetError("depth image missing or unreadable", path)
    if depth.ndim != 2 or depth.dtype != np.uint16:
        raise DatasetError(f"depth must be single-channel 16-bit, got {depth.dtype} {depth.shape}", path)
    return depth


def depth_in_metres(depth_mm: np.ndarray) -> np.ndarray:
    """(H, W) float32 metres of a millimetre depth image; the invalid values 0 and 65535 become 0."""
    return np.where(depth_mm == DEPTH_INVALID, 0, depth_mm).astype(np.float32) / np.float32(DEPTH_SCALE)


def register_depth(depth_m: np.ndarray, registration: DepthRegistration, K_colour: np.ndarray,
                   colour_size: tuple[int, int]) -> np.ndarray:
    """Depth of a depth camera re-rendered into the colour image: (h, w) float32 metres, 0 = no depth.

    Each valid depth pixel is lifted with the depth intrinsics (scaled to ``depth_m``'s
    size), moved into the colour camera by ``T_colour_depth``, projected with
    ``K_colour`` (intrinsics at ``colour_size``) to its nearest pixel; where several
    land on one pixel the nearest surface wins (z-buffer). As DSAC*/ACE register 7-Scenes.
    """
    K_depth = scale_intrinsics(registration.K_depth, registration.depth_size, (depth_m.shape[1], depth_m.shape[0]))
    v, u = np.nonzero(depth_m > 0)
    points = backproject_pixels(np.stack((u, v), axis=1), depth_m[v, u], K_depth, registration.T_colour_depth)
    width, height = colour_size
    z = points[:, 2]
    front = z > 1e-6
    uv = np.round(points[front, :2] / z[front, None] @ K_colour[:2, :2].T + K_colour[:2, 2]).astype(np.int64)
    inside = (uv[:, 0] >= 0) & (uv[:, 0] < width) & (uv[:, 1] >= 0) & (uv[:, 1] < height)
    nearest = np.full(height * width, np.inf, np.float32)
    np.minimum.at(nearest, uv[inside, 1] * width + uv[inside, 0], z[front][inside].astype(np.float32))
    return np.where(np.isfinite(nearest), nearest, 0.0).astype(np.float32).reshape(height, width)


def frame_key(name: str) -> str:
    """``seq-01/frame-000000`` of a frame named with either colour suffix."""
    for suffix in COLOUR_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_pgt_file(path: Path) -> dict[str, tuple[np.ndarray, float]]:
    """SfM pseudo ground truth (Brachmann et al. 2021): ``{frame key: (T camera-to-world, focal)}``.

    Lines: ``seq-03/frame-000844.color.png qw qx qy qz tx ty tz f``, the pose mapping
    world to camera coordinates (``p_cam = R(q) p_world + t``, COLMAP's convention).
    """
    if not path.is_file():
        raise DatasetError("pseudo ground truth pose file not found", path)
    poses = {}
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        tokens = text.split("#", 1)[0].split()
        if not tokens:
            continue
        if len(tokens) != 9:
            raise DatasetError(f"expected 'image qw qx qy qz tx ty tz f' (9 fields), got {len(tokens)}", path, number)
        values = parse_floats(tokens[1:], path, number, "pose")
        if values[7] <= 0:
            raise DatasetError(f"focal length must be positive, got {values[7]:g}", path, number)
        T_camera_world = np.eye(4)
        T_camera_world[:3, :3] = t3q.quat2mat(checked_unit_quaternion(values[:4], path, number))
        T_camera_world[:3, 3] = values[4:7]
        key = frame_key(tokens[0])
        if key in poses:
            raise DatasetError(f"frame {tokens[0]} listed twice", path, number)
        poses[key] = (invert_matrix(T_camera_world), float(values[7]))
    if not poses:
        raise DatasetError("no poses listed", path)
    return poses


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
        camera: ``"rgb"`` (default), ``"depth"`` or ``"pgt"``: which camera the poses and
            intrinsics describe (see the module text).
        pose_file: with ``camera: pgt``, the pseudo ground truth file (relative to ``root``
            unless absolute; ``{split}`` is replaced by ``train``/``test``, e.g.
            ``pgt/sfm/7scenes/chess_{split}.txt``).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        preprocess: PreprocessConfig | Preprocessor | None = None,
        augment: bool | Augmentation = False,
        max_points: int = 256,
        seed: int = 0,
        camera: str = "rgb",
        pose_file: str | Path | None = None,
    ):
        root = Path(root)
        super().__init__(preprocess, augment, max_points, seed, scene_name=root.resolve().name)
        if split not in SPLIT_FILES:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if camera not in CAMERAS:
            raise ValueError(f"camera must be one of {', '.join(CAMERAS)}, got {camera!r}")
        if (pose_file is None) != (camera != "pgt"):
            raise ValueError("camera 'pgt' needs a pose_file, and a pose_file is only read with camera 'pgt'")
        if not root.is_dir():
            raise DatasetError("scene folder not found", root)
        self.root = root
        self.split = split
        self.camera = camera
        self.K, self.intrinsics_size, self.registration = self._camera_model(root, camera)
        pgt = read_pgt_file(self._pose_file_path(pose_file)) if camera == "pgt" else None
        self.sequences = read_split_file(root / SPLIT_FILES[split])
        self._matrices: list[np.ndarray] = []
        self._focals: list[float] = []
        for folder in self.sequences:
            self._add_sequence(folder, pgt)

    @staticmethod
    def _camera_model(root: Path, camera: str) -> tuple[np.ndarray, tuple[int, int], DepthRegistration | None]:
        """``(K, its image size, depth registration or None)`` of the scene read as ``camera``."""
        path = root / INTRINSICS_FILE
        if path.is_file():
            if camera == "depth":
                raise DatasetError("depth is registered to the colour camera these intrinsics describe; "
                                   "camera 'depth' applies only to the official Kinect layout (no intrinsics.txt)", path)
            return (*read_intrinsics_file(path), None)
        if camera == "depth":
            return (*intrinsics_matrix(KINECT_DEPTH_INTRINSICS), None)
        return (*intrinsics_matrix(KINECT_COLOUR_INTRINSICS), KINECT_REGISTRATION)

    def _pose_file_path(self, pose_file: str | Path) -> Path:
        path = Path(str(pose_file).replace("{split}", self.split))
        return path if path.is_absolute() else self.root / path

    def _add_sequence(self, folder: str, pgt: dict | None) -> None:
        for stem, colour in colour_frames(self.root / folder):
            pose_path = colour.with_name(stem + ".pose.txt")
            depth_path = colour.with_name(stem + ".depth.png")
            if self.max_points > 0 and not depth_path.is_file():
                raise DatasetError("depth image not found (needed for points; use max_points=0 without depth)", depth_path)
            if pgt is not None:
                if f"{folder}/{stem}" not in pgt:
                    raise DatasetError(f"no pseudo ground truth pose for {folder}/{colour.name}", pose_path)
                T, focal = pgt[f"{folder}/{stem}"]
                source = f"pseudo ground truth of {folder}/{stem}"
            else:
                T, focal, source = read_pose_file(pose_path), float(self.K[0, 0]), str(pose_path)
                if self.registration is not None:  # the file holds the depth sensor's pose
                    T = T @ invert_matrix(self.registration.T_colour_depth)
            t, q = matrix_to_pose(T)
            self._matrices.append(T)
            self._focals.append(focal)
            self.samples.append(PoseRecord(colour, t, q, f"{folder}/{colour.name}", folder, depth_path, source))

    def raw_intrinsics(self, index: int, width: int, height: int) -> np.ndarray:
        K = self.K.copy()
        K[1, 1] *= self._focals[index] / K[0, 0]  # pgt: the pose file's focal length, same aspect
        K[0, 0] = self._focals[index]
        return scale_intrinsics(K, self.intrinsics_size, (width, height))

    def pose_matrix(self, index: int) -> np.ndarray:
        """(4, 4) camera-to-world matrix of sample ``index`` (of the camera chosen by ``camera``)."""
        return self._matrices[index].copy()

    def depth_metres(self, index: int) -> np.ndarray:
        """(h, w) float32 depth in metres of sample ``index`` seen by its colour camera (0 = invalid).

        Registered into the colour image when the scene's depth is not (official layout
        read as ``rgb``/``pgt``); back-project with :meth:`raw_intrinsics` at its size.
        """
        depth = depth_in_metres(read_depth(self.samples[index].depth_path))
        if self.registration is None:
            return depth
        size = self.image_size(index)
        return register_depth(depth, self.registration, self.raw_intrinsics(index, *size), size)

    def visible_points(self, index: int, rng: np.random.Generator) -> np.ndarray:
        if self.registration is None:
            depth = self.depth_metres(index)
            K = self.raw_intrinsics(index, depth.shape[1], depth.shape[0])
            return backproject_depth(depth, K, self._matrices[index], self.max_points, rng)
        return self._points_seen_by_depth_camera(index, rng)

    def _points_seen_by_depth_camera(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """Loss points of an unregistered rig: depth pixels lifted by the depth camera itself, kept where
        the colour camera sees them (the exact points, without re-rendering the whole depth image:
        a quarter of the cost of :meth:`depth_metres` per item)."""
        depth = depth_in_metres(read_depth(self.samples[index].depth_path))
        reg = self.registration
        K_depth = scale_intrinsics(reg.K_depth, reg.depth_size, (depth.shape[1], depth.shape[0]))
        T_world_depth = self._matrices[index] @ reg.T_colour_depth
        candidates = backproject_depth(depth, K_depth, T_world_depth, 2 * self.max_points, rng)
        width, height = self.image_size(index)
        K = self.raw_intrinsics(index, width, height)
        cam = (candidates - self._matrices[index][:3, 3]) @ self._matrices[index][:3, :3]
        uv = cam[:, :2] / np.maximum(cam[:, 2:], 1e-9) @ K[:2, :2].T + K[:2, 2]
        seen = (cam[:, 2] > 0) & np.all((uv > -0.5) & (uv < [width - 0.5, height - 0.5]), axis=1)
        return subsample_points(candidates[seen], self.max_points, rng)

"""Cambridge Landmarks (Kendall et al., ICCV 2015) and scenes written in its layout.

Scene folder::

    dataset_train.txt / dataset_test.txt   3 header lines, then "ImageFile X Y Z W P Q R"
    reconstruction.nvm                      VisualSFM NVM_V3 model: per-image focal + 3D points
    reconstruction_size.txt                 optional "width height" (see below)
    seq1/frame00001.png ...                 the images, paths relative to the scene folder

Pose convention of the files (converted in :func:`cambridge_to_project_pose`, the
only place that knows it): ``X Y Z`` is the camera centre in the world, ``W P Q R``
the quaternion (w, x, y, z) of the **world-to-camera** rotation as stored in the
VisualSFM reconstruction, camera frame optical (x right, y down, z forward). The
project uses camera-to-world, so the rotation is conjugated; the centre is kept.

NVM_V3 camera line: ``<file> <focal> <qw qx qy qz> <cx cy cz> <radial distortion> 0``
(the same world-to-camera quaternion and camera centre). Point line:
``<X Y Z> <R G B> <n> n × (<image index> <feature index> <x> <y>)`` with ``x, y`` the
measurement's pixel offset from the image centre. Radial distortion is ignored (the
reprojection loss uses a pinhole model).

Intrinsics: focal length per image from the NVM, principal point at the geometric
image centre ``((W-1)/2, (H-1)/2)`` in the pixel-centre convention of
:func:`ros2_posenet.geometry.project_points`, so an NVM measurement ``(x, y)`` is the
pixel ``(x + (W-1)/2, y + (H-1)/2)``. The NVM focal is in pixels of the images the
reconstruction was computed from; it is scaled by ``image width / reconstruction
width``. That width is, in order: the ``reconstruction_width`` argument, the first
number of ``reconstruction_size.txt`` in the scene folder, or 1920 (the published
Cambridge reconstructions were computed on 1920×1080 video frames). Images whose
aspect ratio differs from the reconstruction's (when its height is known) are
rejected: they were cropped, not scaled, and the principal point would be wrong.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ..preprocess import PreprocessConfig, Preprocessor
from .augment import Augmentation
from .common import DatasetError, PoseDataset, PoseRecord, checked_unit_quaternion, parse_floats, subsample_points

HEADER_LINES = 3
DEFAULT_RECONSTRUCTION_SIZE = (1920, 1080)
SIZE_FILE = "reconstruction_size.txt"
DATASET_HEADER = ("Visual Landmark Dataset V1", "ImageFile, Camera Position [X Y Z W P Q R]", "")


# ----------------------------------------------------------------------------- convention


def cambridge_to_project_pose(centre, q_world_to_camera) -> tuple[np.ndarray, np.ndarray]:
    """Cambridge/NVM ``(X Y Z, W P Q R)`` -> project ``(t, q)`` camera-to-world, ``w >= 0``."""
    q = np.asarray(q_world_to_camera, dtype=np.float64)
    q = q / np.linalg.norm(q)
    q_c2w = np.array([q[0], -q[1], -q[2], -q[3]])  # conjugate = inverse rotation
    return np.asarray(centre, dtype=np.float64).copy(), (-q_c2w if q_c2w[0] < 0 else q_c2w)


def project_to_cambridge_pose(t, q) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`cambridge_to_project_pose`: ``(centre, q_world_to_camera)`` for writers."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q)
    q_w2c = np.array([q[0], -q[1], -q[2], -q[3]])
    return np.asarray(t, dtype=np.float64).copy(), (-q_w2c if q_w2c[0] < 0 else q_w2c)


def centred_intrinsics(focal: float, width: int, height: int) -> np.ndarray:
    """Pinhole K (3, 3) with principal point at the geometric image centre."""
    return np.array([[focal, 0.0, (width - 1) / 2.0], [0.0, focal, (height - 1) / 2.0], [0.0, 0.0, 1.0]])


def image_key(name: str) -> str:
    """Match key of an image name: POSIX relative path without extension.

    The published NVM files name images ``seq1/frame00001.jpg`` while the dataset
    files list ``seq1/frame00001.png``.
    """
    name = name.replace("\\", "/")
    if name.startswith("./"):
        name = name[2:]
    return str(PurePosixPath(name).with_suffix(""))


# ----------------------------------------------------------------------------- NVM


@dataclass
class NvmCamera:
    """One NVM camera line (world-to-camera quaternion as stored)."""

    name: str
    focal: float
    q_world_to_camera: np.ndarray
    centre: np.ndarray
    distortion: float
    line: int


@dataclass
class NvmReconstruction:
    """First model of an NVM_V3 file.

    Attributes:
        cameras: camera lines in file order (NVM image index = list index).
        points: (P, 3) float64 world points.
        colors: (P, 3) uint8.
        obs_point, obs_camera: (M,) int64 point and camera index of each measurement.
        obs_xy: (M, 2) float64 pixel offsets from the image centre.
    """

    path: Path
    cameras: list[NvmCamera]
    points: np.ndarray
    colors: np.ndarray
    obs_point: np.ndarray
    obs_camera: np.ndarray
    obs_xy: np.ndarray
    _by_camera: list[np.ndarray] = field(default_factory=list, repr=False)

    def observations(self, camera: int) -> tuple[np.ndarray, np.ndarray]:
        """Point indices (n,) and measured centre offsets (n, 2) seen by ``camera``."""
        if not self._by_camera:
            order = np.argsort(self.obs_camera, kind="stable")
            bounds = np.searchsorted(self.obs_camera[order], np.arange(len(self.cameras) + 1))
            self._by_camera = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        rows = self._by_camera[camera]
        return self.obs_point[rows], self.obs_xy[rows]


def _content_lines(lines: list[str]):
    """Yield ``(line_number, tokens)`` of the non-empty, non-comment lines."""
    for number, text in enumerate(lines, start=1):
        tokens = text.split()
        if tokens and not tokens[0].startswith("#"):
            yield number, tokens


def _read_count(lines_iter, path: Path, what: str) -> int:
    try:
        number, tokens = next(lines_iter)
    except StopIteration:
        if what == "points":
            return 0  # a model with cameras only
        raise DatasetError(f"file ends before the number of {what}", path) from None
    if len(tokens) != 1 or not tokens[0].isdigit():
        raise DatasetError(f"expected the number of {what}, got {' '.join(tokens)!r}", path, number)
    return int(tokens[0])


def read_nvm(path: str | Path) -> NvmReconstruction:
    """Parse the first model of a VisualSFM NVM_V3 file (raises :class:`DatasetError`)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError("reconstruction file not found", path)
    lines_iter = _content_lines(path.read_text().splitlines())
    first = next(lines_iter, None)
    if first is None or not first[1][0].startswith("NVM_V3"):
        raise DatasetError("not an NVM_V3 file (first line must start with 'NVM_V3')", path, first[0] if first else 1)

    cameras = []
    for _ in range(_read_count(lines_iter, path, "cameras")):
        number, tokens = next(lines_iter, (None, None))
        if number is None:
            raise DatasetError(f"file ends after {len(cameras)} camera lines", path)
        if len(tokens) not in (10, 11):
            raise DatasetError(
                "camera line must be '<file> <focal> <qw qx qy qz> <cx cy cz> <distortion> 0' "
                f"(10–11 values), got {len(tokens)}", path, number,
            )
        values = parse_floats(tokens[1:10], path, number, "camera line")
        q = checked_unit_quaternion(values[1:5], path, number)
        cameras.append(NvmCamera(tokens[0], float(values[0]), q, values[5:8], float(values[8]), number))

    n_points = _read_count(lines_iter, path, "points")
    numbers, tokens_all, counts = [], [], np.zeros(n_points, np.int64)
    for p in range(n_points):
        number, tokens = next(lines_iter, (None, None))
        if number is None:
            raise DatasetError(f"file ends after {p} of {n_points} point lines", path)
        if len(tokens) < 7 or not tokens[6].isdigit() or len(tokens) != 7 + 4 * int(tokens[6]):
            raise DatasetError(
                "point line must be '<X Y Z> <R G B> <n> n×(<image> <feature> <x> <y>)', "
                f"got {len(tokens)} values", path, number,
            )
        numbers.append(number)
        counts[p] = int(tokens[6])
        tokens_all.extend(tokens)
    starts = np.concatenate([[0], np.cumsum(7 + 4 * counts)[:-1]]).astype(np.int64)
    values = _point_values(tokens_all, starts, numbers, path)
    points = values[starts[:, None] + np.arange(3)]
    colors = np.clip(values[starts[:, None] + np.arange(3, 6)], 0, 255).astype(np.uint8)
    # Measurement m of point p starts at starts[p] + 7 + 4·(m - first measurement of p).
    obs_point = np.repeat(np.arange(n_points), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    at = starts[obs_point] + 7 + 4 * (np.arange(len(obs_point)) - first[obs_point])
    obs_camera = values[at]
    bad = np.flatnonzero((obs_camera < 0) | (obs_camera >= len(cameras)) | (obs_camera != np.round(obs_camera)))
    if len(bad):
        raise DatasetError(f"measurement refers to an image index outside 0..{len(cameras) - 1}",
                           path, numbers[obs_point[bad[0]]])
    return NvmReconstruction(
        path=path,
        cameras=cameras,
        points=points,
        colors=colors,
        obs_point=obs_point.astype(np.int64),
        obs_camera=obs_camera.astype(np.int64),
        obs_xy=np.stack((values[at + 2], values[at + 3]), axis=1),
    )


def _point_values(tokens: list[str], starts: np.ndarray, numbers: list[int], path: Path) -> np.ndarray:
    """All point-line tokens as floats in one pass; on failure, find and report the bad line."""
    try:
        values = np.fromiter(map(float, tokens), np.float64, len(tokens))
        if np.all(np.isfinite(values)):
            return values
    except ValueError:
        pass
    ends = list(starts[1:]) + [len(tokens)]
    for start, end, number in zip(starts, ends, numbers):
        parse_floats(tokens[start:end], path, number, "point line")  # raises on the first bad line
    raise AssertionError("unreachable: a bad value was found above")


# ----------------------------------------------------------------------------- dataset files


def read_dataset_file(path: Path, root: Path) -> list[PoseRecord]:
    """Parse ``dataset_<split>.txt`` into records (poses converted to the project convention)."""
    if not path.is_file():
        raise DatasetError(f"split file not found (expected the Cambridge layout in {root})", path)
    lines = path.read_text().splitlines()
    for number, text in enumerate(lines[:HEADER_LINES], start=1):
        if _looks_like_pose_line(text):
            raise DatasetError(f"expected {HEADER_LINES} header lines before the poses, found a pose line", path, number)
    records = []
    for number, text in enumerate(lines[HEADER_LINES:], start=HEADER_LINES + 1):
        tokens = text.split()
        if not tokens:
            continue
        if len(tokens) != 8:
            raise DatasetError(f"expected 'ImageFile X Y Z W P Q R' (8 values), got {len(tokens)}", path, number)
        values = parse_floats(tokens[1:], path, number, "pose")
        q_w2c = checked_unit_quaternion(values[3:7], path, number)
        t, q = cambridge_to_project_pose(values[:3], q_w2c)
        image_path = root / tokens[0]
        if not image_path.is_file():
            raise DatasetError(f"image not found: {image_path}", path, number)
        sequence = PurePosixPath(tokens[0].replace("\\", "/")).parts[0] if "/" in tokens[0] else ""
        records.append(PoseRecord(image_path, t, q, tokens[0], sequence, None, f"{path}:{number}"))
    if not records:
        raise DatasetError("no poses listed", path)
    return records


def _looks_like_pose_line(text: str) -> bool:
    tokens = text.split()
    if len(tokens) != 8:
        return False
    try:
        [float(tok) for tok in tokens[1:]]
    except ValueError:
        return False
    return True


def read_reconstruction_size(root: Path) -> tuple[float, float | None] | None:
    """``(width, height or None)`` from ``reconstruction_size.txt``, or None if absent."""
    path = root / SIZE_FILE
    if not path.is_file():
        return None
    entries = list(_content_lines(path.read_text().splitlines()))
    if len(entries) != 1 or len(entries[0][1]) not in (1, 2):
        raise DatasetError("expected one line 'width [height]'", path, entries[0][0] if entries else 1)
    values = parse_floats(entries[0][1], path, entries[0][0], "reconstruction size")
    if np.any(values <= 0):
        raise DatasetError("sizes must be positive", path, entries[0][0])
    return float(values[0]), (float(values[1]) if len(values) > 1 else None)


# ----------------------------------------------------------------------------- dataset


class CambridgeLandmarks(PoseDataset):
    """Cambridge Landmarks scene as a torch Dataset (items: see :mod:`.common`).

    Args:
        root: scene folder (holding ``dataset_train.txt`` ...).
        split: ``"train"`` or ``"test"`` -> ``dataset_<split>.txt``.
        preprocess: preprocessing (resize shorter side, random/centre crop).
        augment: an :class:`~.augment.Augmentation` (``True``: PoseNet's random crop)
            plus random point subsets (training); ``False`` for evaluation.
        max_points: visible NVM points per item (0 disables them).
        seed: base seed of the per-item random draws.
        reconstruction: NVM file name in ``root``. Without it, points are empty and
            ``focal`` must be given.
        reconstruction_width: width (pixels) the NVM focal lengths refer to; see the
            module docstring for the default.
        focal: focal length (pixels at ``reconstruction_width``) for images that are
            not in the NVM; default: the median NVM focal.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        preprocess: PreprocessConfig | Preprocessor | None = None,
        augment: bool | Augmentation = False,
        max_points: int = 256,
        seed: int = 0,
        reconstruction: str = "reconstruction.nvm",
        reconstruction_width: float | None = None,
        focal: float | None = None,
    ):
        root = Path(root)
        super().__init__(preprocess, augment, max_points, seed, scene_name=root.resolve().name)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not root.is_dir():
            raise DatasetError("scene folder not found", root)
        self.root = root
        self.split = split
        self.samples = read_dataset_file(root / f"dataset_{split}.txt", root)
        self._init_reconstruction_size(reconstruction_width)
        self._init_points_and_focals(root / reconstruction, focal)

    def _init_reconstruction_size(self, reconstruction_width: float | None) -> None:
        size = read_reconstruction_size(self.root)
        if reconstruction_width is not None:
            self.reconstruction_size = (float(reconstruction_width), None)
        elif size is not None:
            self.reconstruction_size = size
        else:
            self.reconstruction_size = tuple(float(v) for v in DEFAULT_RECONSTRUCTION_SIZE)

    def _init_points_and_focals(self, nvm_path: Path, focal: float | None) -> None:
        """Per sample: NVM focal (reconstruction pixels) and the indices of the points it sees."""
        n = len(self.samples)
        self._point_ids: list[np.ndarray] = [np.zeros(0, np.int64)] * n
        if not nvm_path.is_file():
            if focal is None:
                raise DatasetError("reconstruction not found: pass focal= to use the scene without its NVM", nvm_path)
            self.reconstruction = None
            self.points = np.zeros((0, 3))
            self._focals = np.full(n, float(focal))
            return
        self.reconstruction = nvm = read_nvm(nvm_path)
        self.points = nvm.points
        index = {image_key(cam.name): i for i, cam in enumerate(nvm.cameras)}
        fallback = float(focal) if focal is not None else float(np.median([c.focal for c in nvm.cameras] or [np.nan]))
        self._focals = np.full(n, fallback)
        missing = []
        for i, record in enumerate(self.samples):
            cam = index.get(image_key(record.name))
            if cam is None:
                missing.append(record.name)
                continue
            self._focals[i] = nvm.cameras[cam].focal
            self._point_ids[i] = np.unique(nvm.observations(cam)[0])
        if missing and not np.isfinite(fallback):
            raise DatasetError(f"{len(missing)} images (e.g. {missing[0]}) not in the reconstruction and it has no cameras", nvm_path)
        if missing:
            warnings.warn(
                f"{nvm_path}: {len(missing)} of {n} {self.split} images are not in the reconstruction "
                f"(e.g. {missing[0]}): they get focal {fallback:.1f} and no points",
                stacklevel=3,
            )

    def raw_intrinsics(self, index: int, width: int, height: int) -> np.ndarray:
        rec_w, rec_h = self.reconstruction_size
        if rec_h is not None and abs(width / height - rec_w / rec_h) > 0.01 * rec_w / rec_h:
            raise DatasetError(
                f"image is {width}x{height} but the reconstruction's images are {rec_w:g}x{rec_h:g}: "
                "a different aspect ratio means a crop, so the NVM intrinsics do not apply "
                f"(if the reconstruction used other images, give their size in {SIZE_FILE} "
                "or pass reconstruction_width)",
                self.samples[index].image_path,
            )
        return centred_intrinsics(self._focals[index] * width / rec_w, width, height)

    def visible_point_ids(self, index: int) -> np.ndarray:
        """Indices into ``self.points`` of all reconstruction points observed in image ``index``."""
        return self._point_ids[index]

    def visible_points(self, index: int, rng: np.random.Generator) -> np.ndarray:
        ids = subsample_points(self._point_ids[index], self.max_points, rng)
        return self.points[ids]

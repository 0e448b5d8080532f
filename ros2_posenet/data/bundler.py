"""Bundler reconstructions (``bundle.out`` v0.3 + ``list.txt``): Dubrovnik 6K, Photo Tourism, old SfM exports.

Scene folder (the first layout whose bundle file exists is used; ``bundle=`` /
``image_list=`` name other files)::

    bundle.out + list.txt                          a reconstruction as one folder
    bundle/bundle.out + list.txt                   what Bundler itself writes
    bundle/bundle.orig.out + bundle/list.orig.txt  Dubrovnik 6K / Rome 16K (Cornell 3D location
                                                   recognition data: all database and query images)
    list.query.txt                                 optional split file: the test images
    db/..., query/..., seq-01/...                  images, named in list.txt relative to the scene folder

``list.txt``: one line per camera of ``bundle.out`` (same order), ``<image> [0 <focal>]``;
the optional focal is the EXIF prior, not used (the bundle's focal is).

``bundle.out`` (v0.3): a ``# Bundle file v0.3`` line, ``<num_cameras> <num_points>``, per
camera ``<f> <k1> <k2>``, three rows of ``R`` and ``t`` (five lines), then per point its
position, colour and view list ``<n> n × (<camera> <key> <x> <y>)`` (three lines).

Conventions, all converted here and nowhere else:

* ``R, t`` map world to the Bundler camera: ``X_cam = R X + t``; the centre is ``-Rᵀ t``.
* The Bundler camera looks down its **-z** axis with **y up**; the project's optical frame
  (z forward, y down) is it turned 180° about x: ``X_optical = diag(1, -1, -1) X_cam``.
* Projection: ``p = -X_cam[:2] / X_cam[2]`` (normalised, y up), ``x = f (1 + k1 |p|² + k2 |p|⁴) p``:
  radial distortion on normalised coordinates, i.e. OpenCV's model with
  ``(k1, k2, 0, 0)`` (it is radial, so the y flip does not change it).
* View-list ``x, y`` are measured from the image centre with y **up**. Bundler puts that
  centre at pixel ``((W-1)/2, (H-1)/2)`` (pixel-centre convention, as
  :func:`ros2_posenet.geometry.project_points`), so pixel ``u = (W-1)/2 + x, v = (H-1)/2 - y``.
* Cameras with ``f = 0`` were not registered by Bundler: they are skipped and counted
  (logged), also when the split file lists them.

Distortion: the items must be exact pinhole views because the reprojection loss projects
3D points with ``K`` alone. The loader therefore **undistorts the images** (OpenCV,
same ``K``, so no pixels move at the centre) and hands out the pinhole ``K``; the
observations are not needed for training, and :meth:`BundlerScene.undistorted_observations`
gives them in the same undistorted pixels. The images must be the ones the
reconstruction was computed from (Bundler does not record image sizes: images whose
measurements fall outside them are rejected as resized).

Split: with a split file (``list.query.txt``, Dubrovnik's query list; same line format as
``list.txt``) its images are the test split and every other registered camera trains.
Without one the split is deterministic: of each image folder's registered images, in
list order, every 10th block of 10 (``test_fraction``, ``test_block``) is test, via the
same block rule as the validation split (:func:`ros2_posenet.data.split.block_split`).

Points for the reprojection loss: the reconstruction points in each image's view list.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from ..geometry import matrix_to_pose, pose_to_matrix
from ..preprocess import PreprocessConfig, Preprocessor
from .augment import Augmentation
from .cambridge import NvmReconstruction, _point_values, centred_intrinsics, image_key
from .common import DatasetError, PoseDataset, PoseRecord, parse_floats, subsample_points
from .split import block_split

LOGGER = logging.getLogger(__name__)

BUNDLE_HEADER = "# Bundle file v0.3"
# (bundle file, image list) tried in this order under the scene folder.
LAYOUTS = (
    ("bundle.out", "list.txt"),
    ("bundle/bundle.out", "list.txt"),
    ("bundle/bundle.orig.out", "bundle/list.orig.txt"),
)
SPLIT_FILE = "list.query.txt"
# Bundler camera (x right, y up, looking down -z) -> optical (x right, y down, z forward).
BUNDLER_TO_OPTICAL = np.diag([1.0, -1.0, -1.0])
ROTATION_TOLERANCE = 1e-3  # max |R Rᵀ - I| entry of a registered camera
OUTSIDE_TOLERANCE_PX = 2.0  # measurements may lie this far outside the image before it counts as resized
_CHUNK_POINTS = 20_000  # point entries parsed at a time (bounds the memory of big files)


# ----------------------------------------------------------------------------- conventions


def bundler_to_project_pose(R, t) -> tuple[np.ndarray, np.ndarray]:
    """Bundler ``R, t`` (world -> camera looking down -z) -> project ``(position, q)`` camera-to-world, optical."""
    R = np.asarray(R, dtype=np.float64)
    T = np.eye(4)
    T[:3, :3] = (BUNDLER_TO_OPTICAL @ R).T
    T[:3, 3] = -R.T @ np.asarray(t, dtype=np.float64)
    return matrix_to_pose(T)


def project_to_bundler_pose(position, q) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`bundler_to_project_pose`: Bundler ``(R (3, 3), t (3,))`` for writers."""
    T = pose_to_matrix(position, q)
    R = BUNDLER_TO_OPTICAL @ T[:3, :3].T
    return R, -R @ T[:3, 3]


def distortion_coefficients(k1: float, k2: float) -> np.ndarray:
    """OpenCV ``(k1, k2, p1, p2)`` of Bundler's radial model (no tangential terms)."""
    return np.array([k1, k2, 0.0, 0.0])


def distort_normalised(xy: np.ndarray, k1: float, k2: float) -> np.ndarray:
    """Bundler's radial distortion of normalised coordinates (N, 2): ``p (1 + k1 |p|² + k2 |p|⁴)``."""
    r2 = np.sum(np.square(xy), axis=-1, keepdims=True)
    return xy * (1.0 + k1 * r2 + k2 * r2 * r2)


def undistort_normalised(xy: np.ndarray, k1: float, k2: float) -> np.ndarray:
    """Inverse of :func:`distort_normalised` (N, 2), solved iteratively by OpenCV."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 1, 2)
    if k1 == 0 and k2 == 0:
        return xy.reshape(-1, 2).copy()
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-12)
    out = cv2.undistortPoints(xy, np.eye(3), distortion_coefficients(k1, k2), None, None, None, criteria)
    return out.reshape(-1, 2)


def centre_offsets_to_pixels(xy: np.ndarray, width: int, height: int) -> np.ndarray:
    """View-list ``(x, y)`` (origin at the image centre, y up) -> pixels ``(u, v)`` (N, 2)."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return np.stack(((width - 1) / 2.0 + xy[:, 0], (height - 1) / 2.0 - xy[:, 1]), axis=1)


def pixels_to_centre_offsets(uv: np.ndarray, width: int, height: int) -> np.ndarray:
    """Inverse of :func:`centre_offsets_to_pixels`, for writers."""
    uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
    return np.stack((uv[:, 0] - (width - 1) / 2.0, (height - 1) / 2.0 - uv[:, 1]), axis=1)


# ----------------------------------------------------------------------------- files


@dataclass
class BundlerCamera:
    """One camera of ``bundle.out`` as stored (world -> Bundler camera)."""

    focal: float
    k1: float
    k2: float
    R: np.ndarray
    t: np.ndarray
    line: int  # line of its "f k1 k2"

    @property
    def registered(self) -> bool:
        """Bundler writes ``f = 0`` (and zeros throughout) for images it could not register."""
        return self.focal != 0.0


@dataclass
class BundleReconstruction(NvmReconstruction):
    """A parsed ``bundle.out``: cameras in file order (index = ``list.txt`` line order), points and
    view lists; ``obs_xy`` are the stored offsets from the image centre, y up (see module docstring)."""


@dataclass(frozen=True)
class ListEntry:
    """One line of ``list.txt`` (or a split file)."""

    name: str
    focal: float | None  # the EXIF focal prior in pixels, if listed
    line: int


def read_image_list(path: str | Path) -> list[ListEntry]:
    """Parse a Bundler image list: ``<image>`` or ``<image> 0 <focal>`` per line."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError("image list not found", path)
    entries = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        tokens = text.split()
        if not tokens:
            continue
        if len(tokens) not in (1, 3):
            raise DatasetError(f"expected '<image> [0 <focal>]' (1 or 3 values), got {len(tokens)}", path, number)
        focal = float(parse_floats(tokens[1:], path, number, "focal")[1]) if len(tokens) == 3 else None
        entries.append(ListEntry(tokens[0], focal, number))
    return entries


def write_image_list(path: str | Path, names: list[str], focals: list[float | None] | None = None) -> None:
    """Write a Bundler image list (``<image> 0 <focal>`` where a focal is given)."""
    focals = focals or [None] * len(names)
    Path(path).write_text("".join(n + ("" if f is None else f" 0 {f:.6f}") + "\n" for n, f in zip(names, focals)))


def _next_entry(entries, path: Path, what: str) -> tuple[int, list[str]]:
    entry = next(entries, None)
    if entry is None:
        raise DatasetError(f"file ends before {what} (do the header's counts match the file?)", path)
    return entry


def _three_values(entries, path: Path, what: str) -> tuple[int, np.ndarray]:
    number, tokens = _next_entry(entries, path, what)
    if len(tokens) != 3:
        raise DatasetError(f"{what}: expected 3 values, got {len(tokens)} (do the header's counts match the file?)",
                           path, number)
    return number, parse_floats(tokens, path, number, what)


def _read_camera(entries, path: Path, index: int) -> BundlerCamera:
    line, (focal, k1, k2) = _three_values(entries, path, f"camera {index}: 'f k1 k2'")
    rows = [_three_values(entries, path, f"camera {index}: row {r + 1} of R") for r in range(3)]
    _, t = _three_values(entries, path, f"camera {index}: t")
    R = np.stack([row for _, row in rows])
    camera = BundlerCamera(float(focal), float(k1), float(k2), R, t, line)
    if focal < 0:
        raise DatasetError(f"camera {index}: negative focal length {focal:g}", path, line)
    if camera.registered and (np.abs(R @ R.T - np.eye(3)).max() > ROTATION_TOLERANCE or np.linalg.det(R) <= 0):
        raise DatasetError(f"camera {index}: R is not a rotation matrix", path, rows[0][0])
    return camera


def read_bundle(path: str | Path) -> BundleReconstruction:
    """Parse a Bundler v0.3 ``bundle.out`` (raises :class:`DatasetError` naming file and line).

    The result is kept per process for the file's current size and modification time:
    a training run opens the same reconstruction for its train, validation and test sets,
    and parsing Dubrovnik 6K's millions of observations takes a while.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError("bundle file not found", path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _PARSED:
        _PARSED.clear()  # one reconstruction at a time: they can be large
        _PARSED[key] = _parse_bundle(path)
    return _PARSED[key]


_PARSED: dict[tuple, BundleReconstruction] = {}


def _parse_bundle(path: Path) -> BundleReconstruction:
    with path.open() as handle:
        first = handle.readline()
        if not first.startswith(BUNDLE_HEADER):
            raise DatasetError(f"not a Bundler v0.3 file (first line must be '{BUNDLE_HEADER}')", path, 1)
        # (line number, tokens) of the non-blank lines after the header (line 1).
        entries = ((number, tokens) for number, text in enumerate(handle, start=2) if (tokens := text.split()))
        number, tokens = _next_entry(entries, path, "the counts line")
        if len(tokens) != 2 or not all(tok.isdigit() for tok in tokens):
            raise DatasetError(f"expected '<num_cameras> <num_points>', got {' '.join(tokens)!r}", path, number)
        n_cameras, n_points = int(tokens[0]), int(tokens[1])
        cameras = [_read_camera(entries, path, c) for c in range(n_cameras)]
        values, starts, view_lines = _read_points(entries, path, n_points)
        extra = next(entries, None)
        if extra is not None:
            raise DatasetError(f"unexpected content after the {n_points} points the header announces", path, extra[0])
    return _assemble(path, cameras, values, starts, view_lines)


def _read_points(entries, path: Path, n_points: int):
    """All point entries as one float array, ``starts`` (P, 3): offset of each entry's three lines
    in it, and the line number of each view list. Read in chunks of points so a file of millions
    of points never holds more than one chunk as text."""
    values, starts, view_lines, offset = [], [], [], 0
    for first in range(0, n_points, _CHUNK_POINTS):
        count = min(_CHUNK_POINTS, n_points - first)
        lines = list(islice(entries, 3 * count))
        if len(lines) < 3 * count:
            raise DatasetError(f"file ends before point {first + len(lines) // 3} of {n_points} "
                               "(do the header's counts match the file?)", path)
        _check_point_lines(lines, first, path)
        numbers = [number for number, _ in lines]
        lengths = np.fromiter((len(tokens) for _, tokens in lines), np.int64, len(lines))
        line_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        tokens = [token for _, line_tokens in lines for token in line_tokens]
        values.append(_point_values(tokens, line_starts, numbers, path))
        starts.append(line_starts.reshape(-1, 3) + offset)
        view_lines += numbers[2::3]
        offset += len(tokens)
    if not values:
        return np.zeros(0), np.zeros((0, 3), np.int64), np.zeros(0, np.int64)
    return np.concatenate(values), np.concatenate(starts), np.array(view_lines, np.int64)


def _check_point_lines(lines: list[tuple[int, list[str]]], first: int, path: Path) -> None:
    """Each point is a 3-value position line, a 3-value colour line and a view list of 1 + 4n values."""
    for k in range(0, len(lines), 3):
        for part, what in ((0, "position"), (1, "colour")):
            number, tokens = lines[k + part]
            if len(tokens) != 3:
                raise DatasetError(f"point {first + k // 3}: {what}: expected 3 values, got {len(tokens)}", path, number)
        number, tokens = lines[k + 2]
        if not tokens[0].isdigit() or len(tokens) != 1 + 4 * int(tokens[0]):
            raise DatasetError(
                f"point {first + k // 3}: view list must be '<n>' then n × '<camera> <key> <x> <y>', "
                f"got {len(tokens)} values" + (f" for n = {tokens[0]}" if tokens[0].isdigit() else ""), path, number,
            )


def _assemble(path: Path, cameras: list[BundlerCamera], values: np.ndarray, starts: np.ndarray,
              view_lines: np.ndarray) -> BundleReconstruction:
    points = values[starts[:, :1] + np.arange(3)].reshape(-1, 3)
    colors = np.clip(values[starts[:, 1:2] + np.arange(3)], 0, 255).astype(np.uint8).reshape(-1, 3)
    counts = values[starts[:, 2]].astype(np.int64)
    obs_point = np.repeat(np.arange(len(counts)), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    at = starts[obs_point, 2] + 1 + 4 * (np.arange(len(obs_point)) - first[obs_point])
    obs_camera = values[at]
    bad = np.flatnonzero((obs_camera < 0) | (obs_camera >= len(cameras)) | (obs_camera != np.round(obs_camera)))
    if len(bad):
        raise DatasetError(f"view list refers to a camera outside 0..{len(cameras) - 1}", path,
                           int(view_lines[obs_point[bad[0]]]))
    return BundleReconstruction(
        path=path, cameras=cameras, points=points, colors=colors, obs_point=obs_point.astype(np.int64),
        obs_camera=obs_camera.astype(np.int64), obs_xy=np.stack((values[at + 2], values[at + 3]), axis=1),
    )


def write_bundle(path: str | Path, cameras: list[tuple[float, float, float, np.ndarray, np.ndarray]],
                 points: np.ndarray, colors: np.ndarray,
                 observations: list[tuple[np.ndarray, np.ndarray]]) -> int:
    """Write a Bundler v0.3 file; returns the number of measurements.

    Args:
        cameras: per camera ``(f, k1, k2, R (3, 3), t (3,))`` (world -> Bundler camera).
        points, colors: (P, 3) positions and uint8 colours.
        observations: per camera ``(point ids (n,), xy (n, 2))`` with ``xy`` offsets from the
            image centre, y up (:func:`pixels_to_centre_offsets`).
    """
    lines = [BUNDLE_HEADER, f"{len(cameras)} {len(points)}"]
    for f, k1, k2, R, t in cameras:
        lines.append(f"{f:.12g} {k1:.12g} {k2:.12g}")
        lines += [" ".join(f"{v:.15g}" for v in row) for row in np.asarray(R)]
        lines.append(" ".join(f"{v:.15g}" for v in np.asarray(t)))
    views: list[list[str]] = [[] for _ in range(len(points))]
    for cam, (ids, xy) in enumerate(observations):
        for key, (pid, (x, y)) in enumerate(zip(np.asarray(ids).tolist(), np.asarray(xy).tolist())):
            views[pid].append(f"{cam} {key} {x:.6f} {y:.6f}")
    for (X, Y, Z), (r, g, b), view in zip(np.asarray(points).tolist(), np.asarray(colors).tolist(), views):
        lines += [f"{X:.12g} {Y:.12g} {Z:.12g}", f"{r} {g} {b}", " ".join([str(len(view))] + view)]
    Path(path).write_text("\n".join(lines) + "\n")
    return sum(len(v) for v in views)


# ----------------------------------------------------------------------------- dataset


def find_layout(root: Path, bundle: str | None, image_list: str | None) -> tuple[Path, Path]:
    """The bundle file and image list of a scene folder (explicit names win over :data:`LAYOUTS`)."""
    if bundle is not None:
        bundle_path = root / bundle
        default_list = next((lst for b, lst in LAYOUTS if b == bundle), "list.txt")
    else:
        found = next(((b, lst) for b, lst in LAYOUTS if (root / b).is_file()), None)
        if found is None:
            raise DatasetError(f"no Bundler reconstruction found (looked for {', '.join(b for b, _ in LAYOUTS)})", root)
        bundle_path, default_list = root / found[0], found[1]
    return bundle_path, root / (image_list or default_list)


class BundlerScene(PoseDataset):
    """A Bundler reconstruction (e.g. Dubrovnik 6K) as a torch Dataset (items: see :mod:`.common`).

    Args:
        root: scene folder; image names in the list are relative to it (or to ``image_root``).
        split: ``"train"`` or ``"test"`` (see the module docstring for how they are chosen).
        preprocess, augment, max_points, seed: as for the other datasets.
        bundle, image_list: file names relative to ``root`` (default: the first of :data:`LAYOUTS`).
        split_file: the test images' list relative to ``root`` (default ``list.query.txt`` if present).
        image_root: folder the image names are relative to (default ``root``).
        test_fraction, test_block: the deterministic split used without a split file.

    Attributes:
        reconstruction: the parsed ``bundle.out``.
        unregistered: names of the listed images of this split's candidates that Bundler
            did not register (``f = 0``), skipped.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        preprocess: PreprocessConfig | Preprocessor | None = None,
        augment: bool | Augmentation = False,
        max_points: int = 256,
        seed: int = 0,
        bundle: str | None = None,
        image_list: str | None = None,
        split_file: str | None = None,
        image_root: str | Path | None = None,
        test_fraction: float = 0.1,
        test_block: int = 10,
    ):
        root = Path(root)
        super().__init__(preprocess, augment, max_points, seed, scene_name=root.resolve().name)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not (0 < test_fraction <= 0.5 and int(test_block) == test_block >= 1):
            raise ValueError(f"test_fraction must be in (0, 0.5] and test_block an integer >= 1, got {test_fraction}, {test_block}")
        if not root.is_dir():
            raise DatasetError("scene folder not found", root)
        self.root, self.split = root, split
        self.bundle_path, self.list_path = find_layout(root, bundle, image_list)
        self.entries = read_image_list(self.list_path)
        self.reconstruction = recon = read_bundle(self.bundle_path)
        if len(self.entries) != len(recon.cameras):
            raise DatasetError(
                f"{len(self.entries)} images listed but {self.bundle_path.name} has {len(recon.cameras)} cameras "
                "(the list needs one line per camera, in the same order)", self.list_path,
            )
        self.points = recon.points
        cameras, self.unregistered, self.split_description = self._split_cameras(split_file, test_fraction, test_block)
        if self.unregistered:
            LOGGER.warning("%s: %d of %d %s images are unregistered in %s (f = 0) and skipped (e.g. %s)",
                           root, len(self.unregistered), len(cameras) + len(self.unregistered), split,
                           self.bundle_path.name, self.unregistered[0])
        image_root = root if image_root is None else Path(image_root)
        self._cameras = np.array(cameras, dtype=np.int64)
        self._point_ids = [np.unique(recon.observations(c)[0]) for c in cameras]
        self.samples = [self._record(c, image_root) for c in cameras]

    def _split_cameras(self, split_file: str | None, fraction: float, block: int) -> tuple[list[int], list[str], str]:
        """Cameras of this split (list order), the unregistered images it skipped, and how it was chosen."""
        cameras = self.reconstruction.cameras
        path = self.root / (split_file or SPLIT_FILE)
        if split_file is not None or path.is_file():
            find = _name_index([e.name for e in self.entries])
            test = set()
            for entry in read_image_list(path):
                camera = find(entry.name)
                if camera is None:
                    raise DatasetError(f"image {entry.name!r} is not in {self.list_path.name}", path, entry.line)
                test.add(camera)
            candidates = sorted(test) if self.split == "test" else [i for i in range(len(cameras)) if i not in test]
            how = f"split file {path.name}: {len(test)} test images"
        else:
            registered = [i for i, cam in enumerate(cameras) if cam.registered]
            ids = [_folder(self.entries[i].name) for i in registered]
            chosen = block_split(ids, fraction, block)
            candidates = [registered[k] for k in (chosen.val if self.split == "test" else chosen.train)]
            how = f"no {SPLIT_FILE}: every {max(2, round(1 / fraction))}th block of {block} registered images is test"
        keep = [i for i in candidates if cameras[i].registered]
        unregistered = [self.entries[i].name for i in candidates if not cameras[i].registered]
        return keep, unregistered, how

    def _record(self, camera: int, image_root: Path) -> PoseRecord:
        entry, cam = self.entries[camera], self.reconstruction.cameras[camera]
        image_path = image_root / entry.name
        if not image_path.is_file():
            raise DatasetError(f"image not found: {image_path}", self.list_path, entry.line)
        position, q = bundler_to_project_pose(cam.R, cam.t)
        return PoseRecord(image_path, position, q, entry.name, _folder(entry.name), None, f"{self.bundle_path}:{cam.line}")

    def camera(self, index: int) -> BundlerCamera:
        """The ``bundle.out`` camera of sample ``index``."""
        return self.reconstruction.cameras[self._cameras[index]]

    def raw_intrinsics(self, index: int, width: int, height: int) -> np.ndarray:
        self._check_size(index, width, height)
        return centred_intrinsics(self.camera(index).focal, width, height)

    def _check_size(self, index: int, width: int, height: int) -> None:
        _, xy = self.measurements(index)
        if len(xy) and (np.abs(xy[:, 0]).max() > width / 2 + OUTSIDE_TOLERANCE_PX
                        or np.abs(xy[:, 1]).max() > height / 2 + OUTSIDE_TOLERANCE_PX):
            raise DatasetError(
                f"the reconstruction measured points up to ({np.abs(xy[:, 0]).max():.0f}, {np.abs(xy[:, 1]).max():.0f}) px "
                f"from the centre, outside this {width}x{height} image: use the images the reconstruction was "
                "computed from (Bundler's focal and distortion are in their pixels)", self.samples[index].image_path,
            )

    def load_image(self, index: int) -> np.ndarray:
        """Image ``index`` undistorted to the pinhole camera of :meth:`intrinsics` (HxWx3 uint8 RGB)."""
        image = super().load_image(index)
        cam = self.camera(index)
        if cam.k1 == 0 and cam.k2 == 0:
            return image
        K = self.raw_intrinsics(index, image.shape[1], image.shape[0])
        return cv2.undistort(image, K, distortion_coefficients(cam.k1, cam.k2))

    def measurements(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Point ids (n,) and view-list ``(x, y)`` (n, 2) of image ``index`` as stored (centre origin, y up, distorted)."""
        return self.reconstruction.observations(int(self._cameras[index]))

    def undistorted_observations(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Point ids (n,) and their measured pixels (n, 2) in the undistorted image ``index``."""
        ids, xy = self.measurements(index)
        width, height = self.image_size(index)
        cam, K = self.camera(index), self.intrinsics(index)
        distorted = (centre_offsets_to_pixels(xy, width, height) - K[:2, 2]) / cam.focal
        return ids, undistort_normalised(distorted, cam.k1, cam.k2) * cam.focal + K[:2, 2]

    def visible_point_ids(self, index: int) -> np.ndarray:
        """Indices into ``self.points`` of all reconstruction points in image ``index``'s view lists."""
        return self._point_ids[index]

    def visible_points(self, index: int, rng: np.random.Generator) -> np.ndarray:
        return self.points[subsample_points(self._point_ids[index], self.max_points, rng)]


def _folder(name: str) -> str:
    """Folder part of an image name (its ``sequence``: ``db``, ``query``, ``seq-01`` ...)."""
    parent = PurePosixPath(image_key(name)).parent.as_posix()
    return "" if parent == "." else parent


def _name_index(names: list[str]):
    """Lookup ``name -> position in names``: by relative path without extension, else by a unique file name.

    Split files may name images with another folder prefix or extension than the list does.
    """
    by_path = {image_key(n): i for i, n in enumerate(names)}
    counts = Counter(PurePosixPath(key).name for key in by_path)
    by_stem = {PurePosixPath(key).name: i for key, i in by_path.items() if counts[PurePosixPath(key).name] == 1}

    def find(name: str) -> int | None:
        key = image_key(name)
        return by_path.get(key, by_stem.get(PurePosixPath(key).name))

    return find

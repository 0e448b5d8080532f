"""Posed image sets without depth: photographs with known cameras (Strecha format).

The layout of the EPFL multi-view benchmark (Strecha et al., CVPR 2008), as
redistributed with openMVG's SfM_quality_evaluation::

    ROOT/images/NNNN.jpg
    ROOT/gt_dense_cameras/NNNN.jpg.camera

Each ``.camera`` file holds, whitespace-separated, K (3 lines), the radial
distortion (1 line, must be zero: the images are undistorted), R (3 lines,
camera-to-world: its columns are the camera axes in the world), the camera centre
C (1 line, metres) and the image width and height (1 line). Projection:
``x ~ K [Rᵀ | −Rᵀ C] X``, optical camera frame (z forward, x right, y down) — the
project's convention (:mod:`ros2_posenet.geometry`) without conversion.

Such a set has no depth: a scene map is built from it by triangulating feature
matches (:mod:`ros2_posenet.geometric.triangulation`, ``build-map --points triangulate``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ..geometry import canonical_quat_np, matrix_to_pose, scale_intrinsics
from ..preprocess import PreprocessConfig, Preprocessor
from .augment import Augmentation
from .common import DatasetError, PoseDataset, PoseRecord, parse_floats, read_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
# Rounding in the text files: R may deviate this much from orthonormal before it is rejected.
ROTATION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class PosedImage:
    """One photograph with its camera.

    Attributes:
        name: file name of the image (e.g. ``0004.jpg``).
        image_path: absolute path of the image.
        pose: (4, 4) camera-to-world, optical frame.
        K: (3, 3) intrinsics at the full image size.
        size: (width, height) in pixels, as the camera file states.
        source: the camera file, for messages.
    """

    name: str
    image_path: Path
    pose: np.ndarray
    K: np.ndarray
    size: tuple[int, int]
    source: str


def read_strecha_camera(path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Read one ``.camera`` file: (K (3, 3), camera-to-world pose (4, 4), (width, height)).

    Raises:
        DatasetError: missing file, wrong line count or width, non-numbers, non-zero
            distortion, a rotation that is not orthonormal with determinant +1, or a
            non-positive focal length or image size; the message names file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError("camera file not found", path)
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    if len(lines) != 9:
        raise DatasetError(f"expected 9 non-empty lines (K, distortion, R, centre, size), got {len(lines)}", path)
    widths = {0: 3, 1: 3, 2: 3, 3: 3, 4: 3, 5: 3, 6: 3, 7: 3, 8: 2}
    for i, tokens in enumerate(lines):
        if len(tokens) != widths[i]:
            raise DatasetError(f"expected {widths[i]} numbers, got {len(tokens)}", path, i + 1)
    rows = [parse_floats(tokens, path, i + 1, "camera") for i, tokens in enumerate(lines)]
    K = np.stack(rows[0:3])
    if K[0, 0] <= 0 or K[1, 1] <= 0 or not np.allclose(K[2], [0, 0, 1]):
        raise DatasetError(f"K must have positive focal lengths and last row 0 0 1, got {K.tolist()}", path, 1)
    if np.any(rows[3] != 0):
        raise DatasetError(
            f"non-zero radial distortion {rows[3].tolist()}: undistort the images first", path, 4
        )
    R = np.stack(rows[4:7])
    if np.max(np.abs(R @ R.T - np.eye(3))) > ROTATION_TOLERANCE or np.linalg.det(R) <= 0:
        raise DatasetError("R is not a rotation (orthonormal, determinant +1)", path, 5)
    u, _, vt = np.linalg.svd(R)  # nearest exact rotation: the file rounds to 6 digits
    pose = np.eye(4)
    pose[:3, :3] = u @ vt
    pose[:3, 3] = rows[7]
    width, height = rows[8]
    if width <= 0 or height <= 0 or width != int(width) or height != int(height):
        raise DatasetError(f"image size must be two positive integers, got {rows[8].tolist()}", path, 9)
    return K, pose, (int(width), int(height))


class PosedImageSet(PoseDataset):
    """The photographs of a Strecha-format folder with their cameras, sorted by name.

    A :class:`~.common.PoseDataset` (``build_dataset("posed", root, split)``), so
    ``build-map``, ``evaluate`` and training read it like the other formats; it has no
    depth, so items carry no 3D points and ``build-map`` triangulates them.

    Splits: the images named in ``held_out`` (or, without it, one name per line in
    ``ROOT/test.txt``) are the ``test`` split, all others ``train``; with neither, every
    image is ``train`` and asking for ``test`` is an error saying how to make one.

    Besides the dataset API: ``s.images[i]`` (:class:`PosedImage`), :meth:`load` (RGB at
    a scale with the matching K), :meth:`poses` and :meth:`intrinsics_at` (stacked).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        preprocess: PreprocessConfig | Preprocessor | None = None,
        augment: bool | Augmentation = False,
        max_points: int = 0,
        seed: int = 0,
        held_out: Sequence[str] | None = None,
        cameras_dir: str = "gt_dense_cameras",
        images_dir: str = "images",
    ):
        root = Path(root)
        super().__init__(preprocess, augment, max_points, seed, scene_name=root.resolve().name)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.root = root
        image_dir, camera_dir = root / images_dir, root / cameras_dir
        for folder in (image_dir, camera_dir):
            if not folder.is_dir():
                raise DatasetError(
                    f"folder not found; a posed image set has {images_dir}/ and {cameras_dir}/", folder
                )
        paths = sorted(p for p in image_dir.iterdir() if p.suffix in IMAGE_SUFFIXES)
        if not paths:
            raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES[:3])}) in the folder", image_dir)
        test_names = self._test_names(root, held_out, {p.name for p in paths})
        if split == "test" and not test_names:
            raise DatasetError(
                "no test split: name the held-out images in test.txt (one per line) or pass held_out=[...]", root
            )
        self.images: list[PosedImage] = []
        for path in paths:
            if (path.name in test_names) != (split == "test"):
                continue
            camera = camera_dir / f"{path.name}.camera"
            K, pose, size = read_strecha_camera(camera)
            self.images.append(PosedImage(path.name, path.resolve(), pose, K, size, str(camera)))
            position, rotation = matrix_to_pose(pose)
            self.samples.append(PoseRecord(path.resolve(), position, canonical_quat_np(rotation), path.name,
                                           source=str(camera)))

    @staticmethod
    def _test_names(root: Path, held_out: Sequence[str] | None, names: set[str]) -> set[str]:
        source = "held_out"
        if held_out is None:
            split_file = root / "test.txt"
            if not split_file.is_file():
                return set()
            held_out = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
            source = str(split_file)
        unknown = sorted(set(held_out) - names)
        if unknown:
            raise DatasetError(f"{source} names images that are not in images/: {unknown}", root)
        return set(held_out)

    # -- PoseDataset -----------------------------------------------------------------
    def raw_intrinsics(self, index: int, width: int, height: int) -> np.ndarray:
        image = self.images[index]
        return scale_intrinsics(image.K, image.size, (width, height))

    def visible_points(self, index: int, rng: np.random.Generator) -> np.ndarray:
        return np.zeros((0, 3))  # no depth: points come from triangulation (build-map)

    def load_image(self, index: int) -> np.ndarray:
        rgb, _ = self.load(index)
        return rgb

    # -- posed-set helpers -----------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [image.name for image in self.images]

    def poses(self) -> np.ndarray:
        """(M, 4, 4) camera-to-world poses, exactly as the camera files give them."""
        return np.stack([image.pose for image in self.images])

    def intrinsics_at(self, scale: float = 1.0) -> np.ndarray:
        """(M, 3, 3) K of the images resized by ``scale``."""
        return np.stack([scale_intrinsics(im.K, im.size, scaled_size(im.size, scale)) for im in self.images])

    def load(self, index: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Image ``index`` as HxWx3 uint8 RGB resized by ``scale`` (area filter), with its K.

        Raises:
            DatasetError: unreadable image, or its size differs from its camera file.
        """
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        image = self.images[index]
        rgb = read_rgb(image.image_path)
        if (rgb.shape[1], rgb.shape[0]) != image.size:
            raise DatasetError(
                f"image is {rgb.shape[1]}x{rgb.shape[0]} but its camera file says {image.size[0]}x{image.size[1]}",
                image.image_path,
            )
        self._sizes[index] = image.size
        size = scaled_size(image.size, scale)
        if size != image.size:
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        return rgb, scale_intrinsics(image.K, image.size, size)


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(width, height) of an image of ``size`` resized by ``scale``."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))

"""Shared pieces of the pose datasets: records, errors, item building and batching.

Every loader (Cambridge Landmarks, 7-Scenes) turns its files into a list of
:class:`PoseRecord` in the project convention (camera-to-world, optical camera
frame, ``q = (w, x, y, z)`` with ``w >= 0``; see :mod:`ros2_posenet.geometry`) and
subclasses :class:`PoseDataset`, which builds the items of the batch contract::

    {"image": float (3, crop, crop), "position": float32 (3,), "rotation": float32 (4,),
     "K": float32 (3, 3) of the preprocessed image, "points": float32 (N, 3) world points
     visible in the image (N <= max_points, may be 0), "index": int}

:func:`collate_pose_batch` stacks items and pads the point sets to ``(B, Nmax, 3)``
with a boolean ``points_mask`` (B, Nmax).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..preprocess import PreprocessConfig, Preprocessor
from .augment import Augmentation, as_augmentation, color_jitter, random_rotation, rotate_view

# |q| may deviate this much from 1 (rounding in text files) before a quaternion is rejected.
QUAT_NORM_TOLERANCE = 1e-3


class DatasetError(ValueError):
    """Malformed or missing dataset input; the message names the file and line.

    Attributes:
        path: the offending file (or folder), if known.
        line: 1-based line number in ``path``, if the problem is on one line.
    """

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path = None if path is None else Path(path)
        self.line = line
        where = "" if path is None else (f"{path}:{line}: " if line is not None else f"{path}: ")
        super().__init__(where + message)


@dataclass(frozen=True)
class PoseRecord:
    """One image of a dataset with its pose in the project convention.

    Attributes:
        image_path: absolute path of the RGB image.
        position: (3,) camera centre in the world frame.
        rotation: (4,) unit quaternion (w, x, y, z), ``w >= 0``, camera-to-world.
        name: the image's name as written in the dataset files (relative path).
        sequence: sequence / folder the image belongs to (e.g. ``seq-01``).
        depth_path: depth image (7-Scenes), if any.
        source: ``"file:line"`` the record was read from, for messages.
    """

    image_path: Path
    position: np.ndarray
    rotation: np.ndarray
    name: str
    sequence: str = ""
    depth_path: Path | None = None
    source: str = ""


def parse_floats(tokens: Sequence[str], path: str | Path, line: int, what: str) -> np.ndarray:
    """Parse ``tokens`` as finite floats or raise :class:`DatasetError` naming ``path:line``."""
    try:
        values = np.array([float(tok) for tok in tokens], dtype=np.float64)
    except ValueError:
        raise DatasetError(f"{what}: expected numbers, got {' '.join(tokens)!r}", path, line) from None
    if not np.all(np.isfinite(values)):
        raise DatasetError(f"{what}: non-finite value in {' '.join(tokens)!r}", path, line)
    return values


def checked_unit_quaternion(q, path: str | Path, line: int | None, tolerance: float = QUAT_NORM_TOLERANCE) -> np.ndarray:
    """Return ``q`` (4,) normalised into the ``w >= 0`` hemisphere.

    Text files round quaternions, so ``| |q| - 1 | <= tolerance`` is accepted and
    normalised; anything further from unit length (including zero) means the line
    is not a rotation and raises :class:`DatasetError`.
    """
    q = np.asarray(q, dtype=np.float64)
    norm = float(np.linalg.norm(q))
    if abs(norm - 1.0) > tolerance:
        raise DatasetError(f"quaternion {q.tolist()} has norm {norm:.6g}, expected 1 (±{tolerance:g})", path, line)
    q = q / norm
    return -q if q[0] < 0 else q


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB; raise :class:`DatasetError` if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError("image file not found", path)
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError("cannot decode image", path)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return int(img.width), int(img.height)
    except FileNotFoundError:
        raise DatasetError("image file not found", path) from None
    except OSError as err:
        raise DatasetError(f"cannot read image header: {err}", path) from None


def subsample_points(points: np.ndarray, max_points: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``max_points`` rows of ``points`` (N, 3), drawn without replacement."""
    if len(points) <= max_points:
        return points
    keep = np.sort(rng.choice(len(points), size=max_points, replace=False))
    return points[keep]


def build_item(
    image: np.ndarray,
    K: np.ndarray,
    position: np.ndarray,
    rotation: np.ndarray,
    points: np.ndarray,
    preprocessor: Preprocessor,
    index: int,
    augmentation: Augmentation | None = None,
    rng: np.random.Generator | None = None,
) -> dict:
    """One dataset item of the batch contract from a raw image and its geometry.

    Args:
        image: HxWx3 uint8 RGB, as stored.
        K: (3, 3) intrinsics of ``image``; updated through resize and crop.
        position, rotation: (3,), (4,) camera-to-world pose.
        points: (N, 3) world points visible in ``image`` (already subsampled).
        augmentation: what to do to a training item (None: centre crop, nothing else).
        rng: random source of the augmentation (required with one).
    """
    resized, K_resized = preprocessor.resize(image, K)
    crop_rng = None
    if augmentation is not None:
        if rng is None:
            raise ValueError("augmentation needs a random generator")
        crop_rng = rng if augmentation.random_crop else None
        if augmentation.rotation_deg > 0:
            R_delta = random_rotation(augmentation.rotation_deg, rng)
            resized, rotation = rotate_view(resized, K_resized, rotation, R_delta)
    cropped, K_new = preprocessor.crop(resized, K_resized, crop_rng)
    if augmentation is not None and augmentation.color_jitter > 0:
        cropped = color_jitter(cropped, augmentation.color_jitter, rng)
    return {
        "image": preprocessor.normalize(cropped),
        "position": torch.as_tensor(np.asarray(position, dtype=np.float32)),
        "rotation": torch.as_tensor(np.asarray(rotation, dtype=np.float32)),
        "K": torch.as_tensor(np.asarray(K_new, dtype=np.float32)),
        "points": torch.as_tensor(np.asarray(points, dtype=np.float32).reshape(-1, 3)),
        "index": int(index),
    }


def collate_pose_batch(items: Sequence[dict]) -> dict:
    """Stack dataset items into a batch; pad the point sets.

    Returns a dict with ``image`` (B, 3, H, W), ``position`` (B, 3), ``rotation`` (B, 4),
    ``K`` (B, 3, 3), ``index`` (B,) long, ``points`` (B, Nmax, 3) zero-padded and
    ``points_mask`` (B, Nmax) bool, where ``Nmax = max(1, max_i N_i)`` so the tensors
    are never empty.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    counts = [int(item["points"].shape[0]) for item in items]
    n_max = max(1, max(counts))
    points = torch.zeros(len(items), n_max, 3, dtype=torch.float32)
    mask = torch.zeros(len(items), n_max, dtype=torch.bool)
    for b, (item, n) in enumerate(zip(items, counts)):
        points[b, :n] = item["points"]
        mask[b, :n] = True
    return {
        "image": torch.stack([item["image"] for item in items]),
        "position": torch.stack([item["position"] for item in items]),
        "rotation": torch.stack([item["rotation"] for item in items]),
        "K": torch.stack([item["K"] for item in items]),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "points": points,
        "points_mask": mask,
    }


class PoseDataset(Dataset):
    """Base class of the pose datasets: records + raw image/intrinsics/points -> items.

    Subclasses fill ``self.samples`` and implement :meth:`raw_intrinsics` and
    :meth:`visible_points`.

    ``augment``: an :class:`~.augment.Augmentation`, ``True`` for the default one
    (PoseNet's random crop) or ``False`` for none.

    Randomness: with ``augment`` the augmentation and point subset are drawn
    from generators seeded by ``(seed, index, a draw from torch's RNG)``, so they
    change every epoch yet are reproducible under ``torch.manual_seed`` (DataLoader
    workers get distinct torch seeds). Without ``augment`` the crop is centred, there
    is no jitter and the point subset depends only on ``(seed, index)``.
    """

    def __init__(
        self,
        preprocess: PreprocessConfig | Preprocessor | None = None,
        augment: bool | Augmentation = False,
        max_points: int = 256,
        seed: int = 0,
        scene_name: str = "",
    ):
        if max_points < 0:
            raise ValueError(f"max_points must be >= 0, got {max_points}")
        self.preprocessor = preprocess if isinstance(preprocess, Preprocessor) else Preprocessor(preprocess)
        self.augmentation = as_augmentation(augment)
        self.max_points = int(max_points)
        self.seed = int(seed)
        self.scene_name = scene_name
        self.samples: list[PoseRecord] = []
        self._sizes: dict[int, tuple[int, int]] = {}

    # -- to implement -------------------------------------------------------------
    def raw_intrinsics(self, index: int, width: int, height: int) -> np.ndarray:
        """(3, 3) intrinsics of image ``index`` stored at ``width`` x ``height``."""
        raise NotImplementedError

    def visible_points(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """(N, 3) float world points visible in image ``index``, N <= ``max_points``."""
        raise NotImplementedError

    # -- public API ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> np.ndarray:
        """Raw (not preprocessed) HxWx3 uint8 RGB image ``index``."""
        image = read_rgb(self.samples[index].image_path)
        self._sizes[index] = (image.shape[1], image.shape[0])
        return image

    def image_size(self, index: int) -> tuple[int, int]:
        """(width, height) of the stored image ``index`` (read from the file header once)."""
        if index not in self._sizes:
            self._sizes[index] = image_size(self.samples[index].image_path)
        return self._sizes[index]

    def intrinsics(self, index: int) -> np.ndarray:
        """(3, 3) float64 intrinsics of the raw image ``index``."""
        return self.raw_intrinsics(index, *self.image_size(index))

    def positions(self) -> np.ndarray:
        """(N, 3) camera centres of all samples."""
        return np.array([s.position for s in self.samples], dtype=np.float64).reshape(-1, 3)

    def rotations(self) -> np.ndarray:
        """(N, 4) camera-to-world quaternions (w, x, y, z) of all samples."""
        return np.array([s.rotation for s in self.samples], dtype=np.float64).reshape(-1, 4)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index = index % len(self)
        record = self.samples[index]
        image = self.load_image(index)
        K = self.raw_intrinsics(index, image.shape[1], image.shape[0])
        if self.augment:
            rng = np.random.default_rng([self.seed, index, int(torch.randint(0, 2**62, (1,)).item())])
            augment_rng, points_rng = rng.spawn(2)
        else:
            augment_rng = None
            points_rng = np.random.default_rng([self.seed, index])
        points = self.visible_points(index, points_rng) if self.max_points > 0 else np.zeros((0, 3))
        return build_item(
            image, K, record.position, record.rotation, points, self.preprocessor, index,
            augmentation=self.augmentation, rng=augment_rng,
        )

    @property
    def augment(self) -> bool:
        """Whether items are augmented (training)."""
        return self.augmentation is not None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(scene={self.scene_name!r}, samples={len(self)}, augment={self.augment}, "
            f"max_points={self.max_points}, crop={self.preprocessor.config.crop})"
        )

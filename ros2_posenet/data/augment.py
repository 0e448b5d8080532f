"""Training-time augmentation that keeps every label exact.

Three kinds, chosen by :class:`Augmentation`:

* ``random_crop``: PoseNet's random crop. A shifted crop looks like a slightly
  rotated camera, but the label is left unchanged, so it adds rotation label noise
  of up to ``atan(margin / f)`` (several degrees at small resolutions).
* ``rotation_deg``: a synthetic view from a camera rotated about its own centre by
  a random angle. A pure rotation ``R`` maps pixels through the homography
  ``K Rᵀ K⁻¹`` whatever the scene depth, so the warped image and the rotated pose
  are an exact new training pair (position, intrinsics and 3D points unchanged).
  Areas the original camera did not see are filled with the normalisation mean.
* ``color_jitter``: brightness, contrast and saturation; geometry untouched.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Real

import cv2
import numpy as np
import transforms3d.axangles as t3a
import transforms3d.quaternions as t3q

from ..geometry import canonical_quat_np
from ..preprocess import IMAGENET_MEAN

# Border fill of rotated views: the mean colour normalises to zero.
FILL_RGB = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)


@dataclass(frozen=True)
class Augmentation:
    """What a training dataset does to each item (see the module docstring)."""

    random_crop: bool = True
    color_jitter: float = 0.0
    rotation_deg: float = 0.0

    def __post_init__(self):
        # The one place these bounds live: the training config reports them as data.<field>.
        if not isinstance(self.random_crop, bool):
            raise ValueError(f"random_crop must be true or false, got {self.random_crop!r}")
        if not (_is_number(self.color_jitter) and 0.0 <= self.color_jitter < 1.0):
            raise ValueError(f"color_jitter must be in [0, 1), got {self.color_jitter!r}")
        if not (_is_number(self.rotation_deg) and 0.0 <= self.rotation_deg <= 30.0):
            raise ValueError(f"rotation_deg must be in [0, 30] degrees, got {self.rotation_deg!r}")


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def as_augmentation(augment) -> Augmentation | None:
    """``True`` -> default :class:`Augmentation`, ``False``/``None`` -> None, instances pass through."""
    if isinstance(augment, Augmentation):
        return augment
    if augment is None or augment is False:
        return None
    if augment is True:
        return Augmentation()
    raise TypeError(f"augment must be a bool or an Augmentation, got {augment!r}")


def color_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast and saturation factors in ``[1 - s, 1 + s]`` (uint8 HxWx3 RGB).

    Geometry is untouched, so poses, intrinsics and points stay valid.
    """
    if strength <= 0:
        return image
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    brightness, contrast, saturation = rng.uniform(lo, hi, size=3)
    img = image.astype(np.float32) * brightness
    gray = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    img = (img - gray.mean()) * contrast + gray.mean()
    gray = (img @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    img = gray + (img - gray) * saturation
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def random_rotation(max_deg: float, rng: np.random.Generator) -> np.ndarray:
    """(3, 3) rotation about a uniformly random axis by an angle uniform in ``[0, max_deg]``."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    return t3a.axangle2mat(axis, np.deg2rad(rng.uniform(0.0, max_deg)))


def rotate_view(image: np.ndarray, K: np.ndarray, rotation: np.ndarray, R_delta: np.ndarray):
    """The view of a camera turned by ``R_delta`` (expressed in its own optical frame).

    Args:
        image: HxWx3 uint8 image taken with intrinsics ``K`` (3, 3).
        rotation: (4,) camera-to-world quaternion (w, x, y, z) of ``image``.
        R_delta: (3, 3) rotation of the new camera frame in the old one.

    Returns:
        ``(warped, new_rotation)``: the same-size image the turned camera sees and its
        camera-to-world quaternion ``q ⊗ q_delta`` (``w >= 0``).
    """
    H = K @ R_delta.T @ np.linalg.inv(K)
    h, w = image.shape[:2]
    warped = cv2.warpPerspective(
        image, H, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=FILL_RGB
    )
    new_rotation = canonical_quat_np(t3q.qmult(np.asarray(rotation, dtype=np.float64), t3q.mat2quat(R_delta)))
    return warped, new_rotation

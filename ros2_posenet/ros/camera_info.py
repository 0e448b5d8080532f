"""``sensor_msgs/CameraInfo`` -> intrinsics for the geometric refinement stage.

The node pairs every image with the CameraInfo of the same stamp (or the latest
one, for drivers that publish it once), because the refinement's PnP needs the
calibration of the image as received. Kept apart from the node so the pairing and
the checks are testable on their own.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..geometry import resized_intrinsics
from .messages import stamp_to_seconds


class CameraInfoError(ValueError):
    """A CameraInfo message that cannot serve as a calibration (zeros, NaN, no size)."""


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole calibration of one image stream."""

    K: np.ndarray  # (3, 3)
    distortion: np.ndarray  # OpenCV order (k1, k2, p1, p2[, k3, ...]); empty: none
    width: int
    height: int

    def for_image(self, width: int, height: int) -> "CameraIntrinsics":
        """The calibration of an image of ``width``×``height`` px taken by this camera.

        A resized image stream (image_proc's resize) keeps the CameraInfo of the
        original size: scale the focal lengths and principal point with the image
        (OpenCV's pixel-centre convention, as cv2.resize makes the image: cx' = (cx + 0.5)·s − 0.5).
        Different aspect ratios mean a crop, which cannot be inferred: an error.
        """
        if (width, height) == (self.width, self.height):
            return self
        sx, sy = width / self.width, height / self.height
        if abs(sx - sy) > 0.01 * max(sx, sy):
            raise CameraInfoError(
                f"image is {width}x{height} but CameraInfo describes {self.width}x{self.height} (another aspect ratio); "
                "publish the CameraInfo of the image topic itself"
            )
        return CameraIntrinsics(resized_intrinsics(self.K, sx, sy), self.distortion, int(width), int(height))


# Distortion coefficients each CameraInfo model has (sensor_msgs/distortion_models.hpp). OpenCV's
# undistortion asserts on any length but 4, 5, 8, 12 or 14: a wrong length must be refused where the
# message arrives, once, rather than fail every frame's refinement. rational_polynomial also takes
# OpenCV's 12/14-coefficient extensions of the same model (thin prism, tilt).
DISTORTION_LENGTHS = {"plumb_bob": (5,), "rational_polynomial": (8, 12, 14), "equidistant": (4,), "": (4, 5, 8, 12, 14)}
UNDISTORTED_MODELS = ("", "plumb_bob", "rational_polynomial")  # the models the refinement undistorts (OpenCV's pinhole)


def intrinsics_from_camera_info(msg) -> CameraIntrinsics:
    """Calibration of a ``sensor_msgs/CameraInfo``; raises :class:`CameraInfoError` when unusable.

    Uses ``k`` (the raw image's camera matrix) and ``d``, since the node receives
    the raw image; ``plumb_bob``/``rational_polynomial`` coefficients are OpenCV's order.
    An empty ``d`` means no distortion; otherwise its length must be its model's.
    """
    K = np.asarray(msg.k, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0 or K[2, 2] != 1.0:
        raise CameraInfoError(f"CameraInfo on frame '{msg.header.frame_id}' has no valid camera matrix k={list(msg.k)} (uncalibrated camera?)")
    if msg.width <= 0 or msg.height <= 0:
        raise CameraInfoError(f"CameraInfo on frame '{msg.header.frame_id}' has no image size ({msg.width}x{msg.height})")
    distortion = np.asarray(msg.d, dtype=float)
    if not np.all(np.isfinite(distortion)):
        raise CameraInfoError(f"CameraInfo on frame '{msg.header.frame_id}' has non-finite distortion {list(msg.d)}")
    lengths = DISTORTION_LENGTHS.get(msg.distortion_model)
    if distortion.size and lengths is not None and distortion.size not in lengths:
        raise CameraInfoError(
            f"CameraInfo on frame '{msg.header.frame_id}' has {distortion.size} distortion coefficients for model "
            f"'{msg.distortion_model}', which has {' or '.join(map(str, lengths))}"
        )
    if msg.distortion_model not in UNDISTORTED_MODELS and np.any(distortion):
        raise CameraInfoError(f"distortion model '{msg.distortion_model}' is not supported (plumb_bob, rational_polynomial)")
    return CameraIntrinsics(K, distortion, int(msg.width), int(msg.height))


def stamp_gap_problem(age: float, max_age: float, max_ahead: float) -> str | None:
    """Why a CameraInfo ``age`` s old on arrival (negative: ahead of the clock) is suspect; ``None``: fine.

    The same limits as for images (``max_image_age``, ``future_stamp_tolerance``; 0: no
    limit). Checked on arrival, not per frame, so a driver that publishes its calibration
    once is not reported for every image after.
    """
    if max_age > 0 and age > max_age:
        return f"stamped {age:.3f} s before its arrival (more than {max_age:g} s)"
    if max_ahead > 0 and -age > max_ahead:
        return f"stamped {-age:.3f} s ahead of its arrival (more than {max_ahead:g} s)"
    return None


class CameraInfoBuffer:
    """The most recently received CameraInfo messages (thread-safe: filled by a callback, read by the worker).

    Kept in arrival order: "latest" is the latest received, as a driver that changes
    its calibration means it, whatever the stamps say (a stamp an hour ahead must not
    pin an old calibration); the oldest received is forgotten first.
    """

    def __init__(self, max_messages: int = 100):
        self._items: deque[tuple[float, CameraIntrinsics]] = deque(maxlen=max_messages)
        self._lock = threading.Lock()
        self.received = 0  # usable messages stored since start (the buffer keeps max_messages)

    def add(self, msg) -> CameraIntrinsics:
        """Store a message; raises :class:`CameraInfoError` (nothing stored) when unusable."""
        intrinsics = intrinsics_from_camera_info(msg)
        stamp = stamp_to_seconds(msg.header.stamp)
        with self._lock:
            self._items.append((stamp, intrinsics))
            self.received += 1
        return intrinsics

    def lookup(self, stamp: float, tolerance: float) -> CameraIntrinsics | None:
        """The calibration stamped closest to ``stamp`` within ``tolerance`` s.

        ``tolerance < 0`` takes the latest message received whatever its stamp (drivers
        that latch one CameraInfo). ``None`` when there is none. Among equally close
        stamps the latest received wins.
        """
        with self._lock:
            if not self._items:
                return None
            if tolerance < 0:
                return self._items[-1][1]
            items = self._items
            best = min(range(len(items)), key=lambda i: (abs(items[i][0] - stamp), -i))
            closest, intrinsics = items[best]
            return intrinsics if abs(closest - stamp) <= tolerance else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def intrinsics_mismatch(live: CameraIntrinsics, reference_K: np.ndarray, reference_size: tuple[int, int], rtol: float = 0.05) -> str | None:
    """Why ``live`` differs from the calibration a model or map was made with (``None``: close enough).

    Compared at the reference's image size, so a camera streaming at another
    resolution but with the same field of view is not flagged.
    """
    try:
        scaled = live.for_image(*reference_size)
    except CameraInfoError as err:
        return str(err)
    ref = np.asarray(reference_K, dtype=float)
    terms = {"fx": (scaled.K[0, 0], ref[0, 0]), "fy": (scaled.K[1, 1], ref[1, 1]), "cx": (scaled.K[0, 2], ref[0, 2]), "cy": (scaled.K[1, 2], ref[1, 2])}
    scale = max(reference_size)
    off = [f"{name} {a:.1f} vs {b:.1f}" for name, (a, b) in terms.items() if abs(a - b) > rtol * (b if name in ("fx", "fy") else scale)]
    if not off:
        return None
    return f"camera intrinsics differ from those the model/map was made with at {reference_size[0]}x{reference_size[1]} px: " + ", ".join(off)

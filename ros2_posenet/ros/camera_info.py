"""``sensor_msgs/CameraInfo`` -> intrinsics for the geometric refinement stage.

The node pairs every image with the CameraInfo of the same stamp (or the latest
one, for drivers that publish it once), because the refinement's PnP needs the
calibration of the image as received. Kept apart from the node so the pairing and
the checks are testable on their own.
"""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

import numpy as np

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
        original size: scale the focal lengths and principal point with the image.
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
        K = self.K.copy()
        K[0, :] *= sx
        K[1, :] *= sy
        return CameraIntrinsics(K, self.distortion, int(width), int(height))


def intrinsics_from_camera_info(msg) -> CameraIntrinsics:
    """Calibration of a ``sensor_msgs/CameraInfo``; raises :class:`CameraInfoError` when unusable.

    Uses ``k`` (the raw image's camera matrix) and ``d``, since the node receives
    the raw image; ``plumb_bob``/``rational_polynomial`` coefficients are OpenCV's order.
    """
    K = np.asarray(msg.k, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0 or K[2, 2] != 1.0:
        raise CameraInfoError(f"CameraInfo on frame '{msg.header.frame_id}' has no valid camera matrix k={list(msg.k)} (uncalibrated camera?)")
    if msg.width <= 0 or msg.height <= 0:
        raise CameraInfoError(f"CameraInfo on frame '{msg.header.frame_id}' has no image size ({msg.width}x{msg.height})")
    distortion = np.asarray(msg.d, dtype=float)
    if not np.all(np.isfinite(distortion)):
        raise CameraInfoError(f"CameraInfo on frame '{msg.header.frame_id}' has non-finite distortion {list(msg.d)}")
    if msg.distortion_model not in ("", "plumb_bob", "rational_polynomial") and np.any(distortion):
        raise CameraInfoError(f"distortion model '{msg.distortion_model}' is not supported (plumb_bob, rational_polynomial)")
    return CameraIntrinsics(K, distortion, int(msg.width), int(msg.height))


class CameraInfoBuffer:
    """Recent CameraInfo messages by stamp (thread-safe: filled by a callback, read by the worker)."""

    def __init__(self, max_messages: int = 100):
        self._stamps: list[float] = []
        self._values: list[CameraIntrinsics] = []
        self._max = max_messages
        self._lock = threading.Lock()

    def add(self, msg) -> CameraIntrinsics:
        """Store a message; raises :class:`CameraInfoError` (nothing stored) when unusable."""
        intrinsics = intrinsics_from_camera_info(msg)
        stamp = stamp_to_seconds(msg.header.stamp)
        with self._lock:
            i = bisect.bisect_right(self._stamps, stamp)
            self._stamps.insert(i, stamp)
            self._values.insert(i, intrinsics)
            if len(self._stamps) > self._max:
                del self._stamps[0], self._values[0]
        return intrinsics

    def lookup(self, stamp: float, tolerance: float) -> CameraIntrinsics | None:
        """The calibration stamped closest to ``stamp`` within ``tolerance`` s.

        ``tolerance < 0`` takes the latest message whatever its stamp (drivers that
        latch one CameraInfo). ``None`` when there is none.
        """
        with self._lock:
            if not self._stamps:
                return None
            if tolerance < 0:
                return self._values[-1]
            i = bisect.bisect_left(self._stamps, stamp)
            candidates = [j for j in (i - 1, i) if 0 <= j < len(self._stamps)]
            best = min(candidates, key=lambda j: abs(self._stamps[j] - stamp))
            return self._values[best] if abs(self._stamps[best] - stamp) <= tolerance else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._stamps)


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

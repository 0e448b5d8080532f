"""Tracking: the last verified pose, grown by how far the camera can have moved since, as the next frame's prior.

A regressor's prior on real images is often a metre and tens of degrees off, with a covariance
as wide; such a prior cannot vouch for a pose of few inliers, so frames that see little of the map
fall back. A camera moves continuously: a pose verified a moment ago is a far better prior, and
its keyframes are the ones the next frame sees. :class:`Track` turns the last verified pose and
its stamp into that prior; the refiner tries it before the regressor's (``Refiner.refine``'s
``tracked``), gated by the same rules as any prior, so a track that is lost (a jump, a kidnapped
robot) only costs one attempt.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class TrackedPrior:
    T: np.ndarray  # (4, 4) camera-to-world, the last verified pose
    covariance: np.ndarray  # (6, 6) its covariance grown by the motion bound
    age_s: float


class Track:
    """The last verified pose of one image stream (not thread-safe: one per stream).

    Args:
        max_gap_s: the last verified pose is used while at most this old (0: tracking off).
        speed_m_s, turn_deg_s: the fastest the camera is expected to move and turn; the prior's
            standard deviation grows by these times the time since the verified pose.
    (``RefinementConfig.tracking_*``.)
    """

    def __init__(self, max_gap_s: float = 1.0, speed_m_s: float = 1.5, turn_deg_s: float = 90.0):
        if not (max_gap_s >= 0 and speed_m_s > 0 and turn_deg_s > 0 and math.isfinite(max_gap_s + speed_m_s + turn_deg_s)):
            raise ValueError(f"tracking needs max_gap_s >= 0 and positive speed and turn rates, got "
                             f"{max_gap_s}, {speed_m_s}, {turn_deg_s}")
        self.max_gap_s, self.speed_m_s, self.turn_deg_s = float(max_gap_s), float(speed_m_s), float(turn_deg_s)
        self._last: tuple[np.ndarray, np.ndarray, float] | None = None

    @classmethod
    def for_config(cls, config) -> "Track":
        """From a ``RefinementConfig``'s ``tracking_*`` fields."""
        return cls(config.tracking_max_gap_s, config.tracking_speed_m_s, config.tracking_turn_deg_s)

    def prior(self, stamp_s: float) -> TrackedPrior | None:
        """The prior for a frame at ``stamp_s``, or None (off, nothing verified yet, too old, or an earlier stamp)."""
        if self._last is None or not self.max_gap_s:
            return None
        T, covariance, stamp = self._last
        age = float(stamp_s) - stamp
        if not (0.0 <= age <= self.max_gap_s):
            return None
        motion = np.diag([(self.speed_m_s * age) ** 2] * 3 + [math.radians(self.turn_deg_s * age) ** 2] * 3)
        return TrackedPrior(T.copy(), covariance + motion, age)

    def update(self, stamp_s: float, T: np.ndarray, covariance: np.ndarray) -> None:
        """Record a verified pose. One slightly older than the pose held is ignored (frames may finish out of
        order); one older by more than ``max_gap_s`` means the clock went back (a bag replayed again): a new track."""
        if self._last is not None and 0.0 < self._last[2] - float(stamp_s) <= self.max_gap_s:
            return
        self._last = (np.array(T, np.float64), np.array(covariance, np.float64), float(stamp_s))

    def refine(self, refiner, stamp_s: float, rgb: np.ndarray, K: np.ndarray, prior_T=None, prior_covariance=None):
        """``refiner.refine`` (a :class:`~.refiner.Refiner` or :class:`~.refiner_process.RefinerProcess`) of the
        frame at ``stamp_s`` with this track's prior; a refined pose becomes the track's."""
        result = refiner.refine(rgb, K, prior_T, prior_covariance, self.prior(stamp_s))
        if result.refined:
            self.update(stamp_s, result.T, result.covariance)
        return result

    def reset(self) -> None:
        """Forget the track (a new map, a new trajectory, a pose set by hand)."""
        self._last = None


def replay_stamps(sequences, rate_hz: float) -> np.ndarray:
    """Stamps (s) of recorded frames replayed in order as a camera stream at ``rate_hz``.

    ``sequences``: each frame's sequence name; a new sequence starts an hour later, so no
    track crosses from one recording into another.
    """
    if not (rate_hz > 0 and math.isfinite(rate_hz)):
        raise ValueError(f"the replay rate must be a positive number of frames per second, got {rate_hz}")
    stamps, t, previous = [], 0.0, None
    for name in sequences:
        t += 3600.0 if previous is not None and name != previous else 1.0 / rate_hz
        stamps.append(t)
        previous = name
    return np.array(stamps)

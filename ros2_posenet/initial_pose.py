"""ROS-free rules for handing a relocalised pose to a 2-D localiser, and for capping the inference rate.

* :func:`planar_initial_pose` turns the base pose and its 6×6 covariance (x y z roll pitch yaw,
  map axes) into what Nav2's AMCL reads from ``/initialpose``: x, y and yaw only (z, roll and
  pitch zeroed), the x-y-yaw block of the covariance kept, the rest zero.
* :class:`InitialPoseGate` decides whether a pose is confident enough to seed a localiser: the
  standard deviation along the worst horizontal direction and about yaw must be below limits.
* :class:`RateLimiter` admits at most ``max_rate_hz`` frames per second on a fixed grid, so a
  30 Hz camera capped at 10 Hz gives 10 Hz, not the 7.5 Hz that "at least 0.1 s since the
  last frame" gives with jittery arrivals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .geometry import matrix_to_rpy, rpy_to_matrix

INITIAL_POSE_MODES = ("off", "once", "on_request")
PLANAR_AXES = (0, 1, 5)  # x, y, yaw in the ROS covariance order x y z roll pitch yaw


def planar_initial_pose(T_map_base: np.ndarray, covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(4×4 pose at z = 0 with yaw only, 6×6 covariance with only the x-y-yaw block) for AMCL."""
    _, _, yaw = matrix_to_rpy(T_map_base[:3, :3])
    T = np.eye(4)
    T[:3, :3] = rpy_to_matrix(0.0, 0.0, yaw)
    T[:2, 3] = T_map_base[:2, 3]
    planar = np.zeros((6, 6))
    block = np.ix_(PLANAR_AXES, PLANAR_AXES)
    planar[block] = np.asarray(covariance, dtype=float)[block]
    return T, planar


def horizontal_std(covariance: np.ndarray) -> float:
    """Standard deviation (m) along the worst horizontal direction: sqrt of the x-y block's largest eigenvalue."""
    xy = np.asarray(covariance, dtype=float)[:2, :2]
    return math.sqrt(max(float(np.linalg.eigvalsh(0.5 * (xy + xy.T))[-1]), 0.0))


def yaw_std(covariance: np.ndarray) -> float:
    """Standard deviation of yaw (rad)."""
    return math.sqrt(max(float(np.asarray(covariance, dtype=float)[5, 5]), 0.0))


@dataclass(frozen=True)
class InitialPoseGate:
    """Confidence limits a pose must meet before it may seed a localiser."""

    max_position_std: float  # m, worst horizontal direction
    max_yaw_std: float  # rad

    def rejection(self, covariance: np.ndarray) -> str | None:
        """Why ``covariance`` is not confident enough (``None``: it passes)."""
        if not np.all(np.isfinite(covariance)):
            return "covariance is not finite"
        position, yaw = horizontal_std(covariance), yaw_std(covariance)
        problems = []
        if position > self.max_position_std:
            problems.append(f"position std {position:.3f} m > initial_pose_max_position_std {self.max_position_std:g} m")
        if yaw > self.max_yaw_std:
            problems.append(f"yaw std {math.degrees(yaw):.1f}° > initial_pose_max_yaw_std {self.max_yaw_std:g} rad")
        return "; ".join(problems) or None


class RateLimiter:
    """Admit at most ``max_rate_hz`` events per second (0: all), on a fixed time grid.

    An event is admitted when it arrives at or after the next slot; the slot after it is one
    period later, counted from the slot (not from the arrival) unless the arrival was more than
    a period late. Over any long window no more than ``max_rate_hz`` events pass.
    """

    def __init__(self, max_rate_hz: float = 0.0):
        self.max_rate_hz = float(max_rate_hz)
        self._next: float | None = None

    def admit(self, now: float) -> bool:
        if self.max_rate_hz <= 0:
            return True
        period = 1.0 / self.max_rate_hz
        if self._next is not None and now < self._next:
            return False
        on_grid = self._next is not None and now - self._next < period
        self._next = (self._next if on_grid else now) + period
        return True

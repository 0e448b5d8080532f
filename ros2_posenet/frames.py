"""Frame bookkeeping between the network's camera pose and a ROS robot (ROS-free).

The network predicts ``T_map_optical``: the pose of the camera's *optical* frame
(z forward, x right, y down) in the map, see :mod:`ros2_posenet.geometry`. A robot
wants instead, following REP-103/REP-105:

* the camera's body frame (``camera_link``: x forward, y left, z up) in the map;
* the robot base in the map, through the camera→base extrinsic
  ``T_base_camera`` (the pose of ``camera_link`` in ``base_link``, as in a URDF);
* the ``map → odom`` correction, given the odometry's current ``odom → base``.

All poses here are 4×4 homogeneous matrices ``T_a_b`` mapping frame-``b`` coordinates
into frame ``a`` (``X_a = T_a_b X_b``), i.e. the pose of ``b`` in ``a``. The node,
the bag tool and the tests share these functions so the conventions live in one place.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
import transforms3d.quaternions as t3q

from .geometry import (
    body_pose_to_optical,
    invert_matrix,
    matrix_to_pose,
    optical_pose_to_body,
    pose_to_matrix,
    rpy_to_matrix,
    skew,
)


def extrinsic_matrix(xyz_rpy) -> np.ndarray:
    """4×4 ``T_base_camera`` from ``[x, y, z, roll, pitch, yaw]`` (metres, radians).

    The values are the camera's REP-103 body frame (``camera_link``) in the base
    frame, exactly as a URDF joint ``<origin xyz rpy>`` writes them.
    """
    values = np.asarray(xyz_rpy, dtype=float).reshape(-1)
    if values.shape != (6,) or not np.all(np.isfinite(values)):
        raise ValueError(f"camera_to_base must be 6 finite numbers [x, y, z, roll, pitch, yaw], got {list(xyz_rpy)}")
    T = np.eye(4)
    T[:3, :3] = rpy_to_matrix(*values[3:])
    T[:3, 3] = values[:3]
    return T


@dataclass(frozen=True)
class CameraMount:
    """Where the camera sits on the robot; converts camera poses to base poses.

    ``T_base_camera`` is the pose of the camera's body frame in the base frame
    (identity: the camera *is* the base, e.g. a hand-held camera).
    """

    T_base_camera: np.ndarray = field(default_factory=lambda: np.eye(4))

    @classmethod
    def from_xyz_rpy(cls, xyz_rpy) -> "CameraMount":
        return cls(extrinsic_matrix(xyz_rpy))

    @property
    def T_base_optical(self) -> np.ndarray:
        """Pose of the optical frame in the base frame."""
        return body_pose_to_optical(self.T_base_camera)

    def camera_pose(self, T_map_optical: np.ndarray) -> np.ndarray:
        """Pose of the camera body frame (x fwd, z up) in the map from the optical pose."""
        return optical_pose_to_body(T_map_optical)

    def base_pose(self, T_map_optical: np.ndarray) -> np.ndarray:
        """Pose of the robot base in the map: ``T_map_optical · inv(T_base_optical)``."""
        return np.asarray(T_map_optical, dtype=float) @ invert_matrix(self.T_base_optical)


def map_to_odom(T_map_base: np.ndarray, T_odom_base: np.ndarray) -> np.ndarray:
    """REP-105 correction ``T_map_odom`` such that ``T_map_odom · T_odom_base = T_map_base``."""
    return np.asarray(T_map_base, dtype=float) @ invert_matrix(T_odom_base)


def transport_covariance(cov: np.ndarray, lever_arm) -> np.ndarray:
    """Covariance (6×6, x y z roll pitch yaw about the map axes) of a rigidly attached frame.

    If the camera pose has position error ``δt`` and rotation error ``δθ`` (about
    the map axes), a frame offset by ``lever_arm`` (map-frame vector from the
    camera to it) moves by ``δt + δθ × lever_arm``; its rotation error is the same
    ``δθ``. First-order propagation ``J Σ Jᵀ`` with ``J = [[I, -[a]×], [0, I]]``.
    """
    J = np.eye(6)
    J[:3, 3:] = -skew(lever_arm)
    out = J @ np.asarray(cov, dtype=float) @ J.T
    return 0.5 * (out + out.T)  # exact symmetry for consumers that check it


def base_covariance(cov_camera: np.ndarray, T_map_optical: np.ndarray, T_map_base: np.ndarray) -> np.ndarray:
    """Camera pose covariance carried over to the base pose (see :func:`transport_covariance`)."""
    lever_arm = np.asarray(T_map_base, dtype=float)[:3, 3] - np.asarray(T_map_optical, dtype=float)[:3, 3]
    return transport_covariance(cov_camera, lever_arm)


@dataclass(frozen=True)
class RelocalizedPoses:
    """Everything the node publishes for one prediction, as matrices (ROS-free).

    The node and ``relocalize-bag`` both build their messages from this, so the
    same image gives the same poses, frames and covariance in both.
    """

    T_map_optical: np.ndarray  # the network's camera pose (optical frame)
    T_map_camera: np.ndarray  # camera body frame (REP-103) in the map
    T_map_base: np.ndarray  # robot base in the map
    base_covariance: np.ndarray  # 6×6 x y z roll pitch yaw of the base pose

    @classmethod
    def from_prediction(cls, position, quaternion, covariance, mount: CameraMount) -> "RelocalizedPoses":
        T_map_optical = pose_to_matrix(position, quaternion)
        T_map_base = mount.base_pose(T_map_optical)
        return cls(
            T_map_optical=T_map_optical,
            T_map_camera=mount.camera_pose(T_map_optical),
            T_map_base=T_map_base,
            base_covariance=base_covariance(covariance, T_map_optical, T_map_base),
        )

    @property
    def is_finite(self) -> bool:
        return is_finite_pose(self.T_map_base) and bool(np.all(np.isfinite(self.base_covariance)))


def interpolate_pose(T0: np.ndarray, T1: np.ndarray, alpha: float) -> np.ndarray:
    """Pose a fraction ``alpha`` ∈ [0, 1] of the way from ``T0`` to ``T1`` (lerp + slerp)."""
    t0, q0 = matrix_to_pose(T0)
    t1, q1 = matrix_to_pose(T1)
    if np.dot(q0, q1) < 0:  # take the short way round
        q1 = -q1
    axis, angle = t3q.quat2axangle(t3q.qmult(t3q.qinverse(q0), q1))
    q = t3q.qmult(q0, t3q.axangle2quat(axis, angle * alpha)) if angle > 1e-12 else q0
    return pose_to_matrix((1.0 - alpha) * t0 + alpha * t1, q)


class PoseHistory:
    """A short time-ordered buffer of poses (e.g. odom→base from an Odometry topic).

    :meth:`lookup` interpolates between the samples around the requested time, or
    returns the nearest one when the time lies outside them by at most ``tolerance``.
    """

    def __init__(self, max_samples: int = 400):
        self.max_samples = int(max_samples)
        self._stamps: list[float] = []
        self._poses: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self._stamps)

    def add(self, stamp: float, T: np.ndarray) -> None:
        """Insert a pose at ``stamp`` seconds (out-of-order samples are placed in order)."""
        i = bisect.bisect_right(self._stamps, stamp)
        self._stamps.insert(i, float(stamp))
        self._poses.insert(i, np.asarray(T, dtype=float))
        if len(self._stamps) > self.max_samples:
            del self._stamps[0], self._poses[0]

    def latest_stamp(self) -> float | None:
        return self._stamps[-1] if self._stamps else None

    def lookup(self, stamp: float, tolerance: float) -> np.ndarray | None:
        """Pose at ``stamp``; ``None`` when no sample lies within ``tolerance`` seconds."""
        if not self._stamps:
            return None
        i = bisect.bisect_left(self._stamps, stamp)
        if 0 < i < len(self._stamps):
            s0, s1 = self._stamps[i - 1], self._stamps[i]
            if min(stamp - s0, s1 - stamp) <= tolerance:
                alpha = 0.0 if s1 == s0 else (stamp - s0) / (s1 - s0)
                return interpolate_pose(self._poses[i - 1], self._poses[i], alpha)
            return None
        j = 0 if i == 0 else len(self._stamps) - 1
        return self._poses[j].copy() if abs(self._stamps[j] - stamp) <= tolerance else None


def is_finite_pose(T: np.ndarray) -> bool:
    """True when every entry of the matrix is finite."""
    return bool(np.all(np.isfinite(np.asarray(T, dtype=float))))


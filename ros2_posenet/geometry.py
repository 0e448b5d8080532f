"""Pose conventions and batched pose geometry: the one geometry module of the project.

Convention used everywhere (datasets, model, losses, node, tools):

* A pose is **camera-to-world**: ``t`` (…, 3) is the camera centre in the world/map
  frame and ``q`` (…, 4) is the unit quaternion ``(w, x, y, z)`` of the rotation
  ``R`` that maps camera-frame vectors into the world: ``X_world = R @ X_cam + t``.
* Quaternions are kept in the hemisphere ``w >= 0`` (``q`` and ``-q`` are the same rotation).
* Camera frames are *optical*: z forward, x right, y down. ROS body frames (REP-103)
  are x forward, y left, z up; :data:`R_BODY_FROM_OPTICAL` converts between them.
* ROS messages order quaternions ``(x, y, z, w)``; :func:`wxyz_to_xyzw` and
  :func:`xyzw_to_wxyz` are the only place that knows this.

Torch functions are batch-first and differentiable; numpy helpers wrap transforms3d.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import transforms3d.quaternions as t3q

# Optical (z fwd, x right, y down) -> body (x fwd, y left, z up): columns are the
# optical axes expressed in the body frame.
R_BODY_FROM_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


# ----------------------------------------------------------------------------- torch


def quat_normalize(q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale quaternions (…, 4) to unit length."""
    return q / q.norm(dim=-1, keepdim=True).clamp_min(eps)


def quat_canonical(q: torch.Tensor) -> torch.Tensor:
    """Flip quaternions (…, 4, w first) into the ``w >= 0`` hemisphere."""
    sign = torch.where(q[..., :1] < 0, -1.0, 1.0).to(q.dtype)
    return q * sign


def quat_mean(q: torch.Tensor) -> torch.Tensor:
    """Chordal mean of quaternions (M, …, 4) over the first axis: each turned into the first's hemisphere
    (``q`` and ``-q`` are one rotation), averaged, normalised; (…, 4) in the ``w >= 0`` hemisphere."""
    sign = torch.where((q * q[:1]).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(q.dtype)
    return quat_canonical(quat_normalize((q * sign).mean(0)))


def quat_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product ``a ⊗ b`` of (…, 4) quaternions (w, x, y, z)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        (
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ),
        dim=-1,
    )


def quat_conjugate(q: torch.Tensor) -> torch.Tensor:
    """Conjugate (= inverse for unit quaternions) of (…, 4) quaternions."""
    return q * q.new_tensor([1.0, -1.0, -1.0, -1.0])


def quat_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (…, 3, 3) from quaternions (…, 4); ``q`` need not be unit."""
    w, x, y, z = quat_normalize(q).unbind(-1)
    return torch.stack(
        (
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ),
        dim=-1,
    ).reshape(q.shape[:-1] + (3, 3))


def matrix_to_quat(R: torch.Tensor) -> torch.Tensor:
    """Quaternions (…, 4), ``w >= 0``, from rotation matrices (…, 3, 3).

    Uses the numerically stable branch per element (largest diagonal term).
    """
    m = R
    trace = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    candidates = torch.stack(
        (
            torch.stack((1 + trace, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]), -1),
            torch.stack((m[..., 2, 1] - m[..., 1, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2], m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]), -1),
            torch.stack((m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], m[..., 1, 2] + m[..., 2, 1]), -1),
            torch.stack((m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1], 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]), -1),
        ),
        dim=-2,
    )  # (…, 4, 4): row i is 4*q*q_i, best conditioned where q_i is largest
    best = torch.stack(
        (trace, m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2], m[..., 1, 1] - m[..., 0, 0] - m[..., 2, 2], m[..., 2, 2] - m[..., 0, 0] - m[..., 1, 1]), -1
    ).argmax(-1)
    q = torch.gather(candidates, -2, best[..., None, None].expand(best.shape + (1, 4))).squeeze(-2)
    return quat_canonical(quat_normalize(q))


def pose_compose(t_ab: torch.Tensor, q_ab: torch.Tensor, t_bc: torch.Tensor, q_bc: torch.Tensor):
    """Compose ``T_ab ∘ T_bc`` -> ``T_ac``; translations (…, 3), quaternions (…, 4)."""
    t_ac = t_ab + (quat_to_matrix(q_ab) @ t_bc.unsqueeze(-1)).squeeze(-1)
    return t_ac, quat_canonical(quat_normalize(quat_multiply(q_ab, q_bc)))


def pose_inverse(t: torch.Tensor, q: torch.Tensor):
    """Invert poses: camera-to-world <-> world-to-camera. Returns ``(t_inv, q_inv)``."""
    q_inv = quat_conjugate(quat_normalize(q))
    t_inv = -(quat_to_matrix(q_inv) @ t.unsqueeze(-1)).squeeze(-1)
    return t_inv, quat_canonical(q_inv)


def world_to_camera(points: torch.Tensor, t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Express world points (B, N, 3) in the optical camera frame of poses ``t`` (B, 3), ``q`` (B, 4)."""
    R = quat_to_matrix(q)  # camera -> world
    return (points - t.unsqueeze(1)) @ R  # == R^T (X - t), row-vector form


def project_points(
    points: torch.Tensor, t: torch.Tensor, q: torch.Tensor, K: torch.Tensor, min_depth: float = 1e-3
):
    """Pinhole projection of world points with camera-to-world poses.

    Args:
        points: (B, N, 3) world points.
        t, q: (B, 3), (B, 4) camera-to-world poses.
        K: (B, 3, 3) intrinsics.
        min_depth: depths are clamped to this before division, so points behind the
            camera give large but finite pixels (callers mask them with ``depth``).

    Returns:
        ``(uv, depth)``: (B, N, 2) pixel coordinates and (B, N) optical-axis depths.

    Example:
        >>> K = torch.tensor([[[100., 0, 50], [0, 100., 40], [0, 0, 1]]])
        >>> uv, z = project_points(torch.tensor([[[0., 0, 2]]]), torch.zeros(1, 3), torch.tensor([[1., 0, 0, 0]]), K)
        >>> uv.tolist(), z.tolist()
        ([[[50.0, 40.0]]], [[2.0]])
    """
    cam = world_to_camera(points, t, q)
    depth = cam[..., 2]
    xy = cam[..., :2] / depth.clamp_min(min_depth).unsqueeze(-1)
    uv = xy @ K[:, :2, :2].transpose(-1, -2) + K[:, None, :2, 2]
    return uv, depth


def position_error(t_pred: torch.Tensor, t_true: torch.Tensor) -> torch.Tensor:
    """Euclidean distance (…,) between positions (…, 3), in the dataset's units (metres)."""
    return (t_pred - t_true).norm(dim=-1)


def rotation_error_deg(q_pred: torch.Tensor, q_true: torch.Tensor) -> torch.Tensor:
    """Geodesic angle in degrees between rotations: ``2·acos|<q1, q2>|`` (sign-invariant).

    The dot product is clamped to [0, 1] so rounding never yields NaN.
    """
    dot = (quat_normalize(q_pred) * quat_normalize(q_true)).sum(-1).abs().clamp(0.0, 1.0)
    return torch.rad2deg(2.0 * torch.acos(dot))


# ----------------------------------------------------------------------------- numpy


def wxyz_to_xyzw(q) -> np.ndarray:
    """Project order (w, x, y, z) -> ROS message order (x, y, z, w)."""
    q = np.asarray(q, dtype=float)
    return np.concatenate((q[..., 1:], q[..., :1]), axis=-1)


def xyzw_to_wxyz(q) -> np.ndarray:
    """ROS message order (x, y, z, w) -> project order (w, x, y, z)."""
    q = np.asarray(q, dtype=float)
    return np.concatenate((q[..., 3:], q[..., :3]), axis=-1)


def canonical_quat_np(q) -> np.ndarray:
    """Unit quaternion (4,) in the ``w >= 0`` hemisphere."""
    q = np.asarray(q, dtype=float)
    norm = np.linalg.norm(q)
    if not np.isfinite(norm) or norm < 1e-9:
        raise ValueError(f"not a valid quaternion: {q.tolist()}")
    q = q / norm
    return -q if q[0] < 0 else q


def pose_to_matrix(t, q) -> np.ndarray:
    """4x4 homogeneous camera-to-world matrix from position (3,) and quaternion (4,) w,x,y,z."""
    T = np.eye(4)
    T[:3, :3] = t3q.quat2mat(canonical_quat_np(q))
    T[:3, 3] = np.asarray(t, dtype=float)
    return T


def matrix_to_pose(T) -> tuple[np.ndarray, np.ndarray]:
    """Position (3,) and canonical quaternion (4,) w,x,y,z from a 4x4 (or 3x4) pose matrix."""
    T = np.asarray(T, dtype=float)
    return T[:3, 3].copy(), canonical_quat_np(t3q.mat2quat(T[:3, :3]))


def rpy_to_matrix(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Rotation matrix of ROS fixed-axis roll/pitch/yaw (R = Rz(yaw) Ry(pitch) Rx(roll))."""
    import transforms3d.euler as t3e

    return t3e.euler2mat(roll, pitch, yaw, axes="sxyz")


def matrix_to_rpy(R) -> tuple[float, float, float]:
    """Inverse of :func:`rpy_to_matrix`."""
    import transforms3d.euler as t3e

    return tuple(float(a) for a in t3e.mat2euler(np.asarray(R, dtype=float), axes="sxyz"))


def optical_pose_to_body(T_world_optical: np.ndarray) -> np.ndarray:
    """Pose of the camera's ROS body frame (x fwd, z up) from its optical-frame pose (4x4)."""
    T = np.array(T_world_optical, dtype=float, copy=True)
    T[:3, :3] = T[:3, :3] @ R_BODY_FROM_OPTICAL.T
    return T


def body_pose_to_optical(T_world_body: np.ndarray) -> np.ndarray:
    """Inverse of :func:`optical_pose_to_body`."""
    T = np.array(T_world_body, dtype=float, copy=True)
    T[:3, :3] = T[:3, :3] @ R_BODY_FROM_OPTICAL
    return T


def backproject_pixels(pixels: np.ndarray, depth: np.ndarray, K: np.ndarray, T_world_camera: np.ndarray) -> np.ndarray:
    """World points (N, 3) of pixels (N, 2) seen at depths (N,) (optical z) by a pinhole camera-to-world pose."""
    pixels = np.asarray(pixels, dtype=np.float64).reshape(-1, 2)
    z = np.asarray(depth, dtype=np.float64).reshape(-1)
    cam = np.stack(((pixels[:, 0] - K[0, 2]) / K[0, 0] * z, (pixels[:, 1] - K[1, 2]) / K[1, 1] * z, z), axis=1)
    return cam @ T_world_camera[:3, :3].T + T_world_camera[:3, 3]


def resized_pixel_coords(pixels, scale) -> np.ndarray:
    """Where pixel coordinates land when their image is resized by ``scale`` (a number or per-axis (sx, sy)).

    The project's one convention for scaled images, OpenCV's (``cv2.resize``): pixel
    centres sit at integers and pixel u covers [u − 0.5, u + 0.5], so the image edge
    −0.5 stays at −0.5 and ``u ↦ (u + 0.5)·s − 0.5``. (``u·s`` would put the content
    (s − 1)/2 px off: a quarter pixel at half size.)
    """
    return (np.asarray(pixels, dtype=np.float64) + 0.5) * np.asarray(scale, dtype=np.float64) - 0.5


def resized_intrinsics(K: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """Intrinsics (3, 3) of an image resized by (``scale_x``, ``scale_y``), see :func:`resized_pixel_coords`."""
    K2 = np.array(K, dtype=np.float64, copy=True)
    K2[0, :2] *= scale_x  # fx and skew
    K2[1, 1] *= scale_y
    K2[:2, 2] = resized_pixel_coords(K2[:2, 2], (scale_x, scale_y))
    return K2


def scale_intrinsics(K: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Intrinsics (3, 3) of an image resized from ``from_size`` to ``to_size`` (width, height)."""
    return resized_intrinsics(K, to_size[0] / from_size[0], to_size[1] / from_size[1])


def invert_matrix(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 transform."""
    T = np.asarray(T, dtype=float)
    inv = np.eye(4)
    inv[:3, :3] = T[:3, :3].T
    inv[:3, 3] = -T[:3, :3].T @ T[:3, 3]
    return inv


def rotation_angle_deg_np(q1, q2) -> float:
    """Geodesic angle in degrees between two quaternions (numpy, sign-invariant)."""
    dot = abs(float(np.dot(canonical_quat_np(q1), canonical_quat_np(q2))))
    return math.degrees(2.0 * math.acos(min(1.0, dot)))


def skew(v) -> np.ndarray:
    """Cross-product matrices ``[v]×`` (``[v]× w = v × w``): (…, 3, 3) of vectors (…, 3)."""
    v = np.asarray(v, dtype=float)
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    zero = np.zeros_like(x)
    return np.stack((np.stack((zero, -z, y), -1), np.stack((z, zero, -x), -1), np.stack((-y, x, zero), -1)), -2)

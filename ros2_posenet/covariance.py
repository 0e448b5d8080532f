"""Pose covariance calibrated from held-out residuals, for PoseWithCovarianceStamped.

Stored in checkpoints as per-axis variances: position (x, y, z in the map frame, m²)
and rotation (small-angle rotation vector about the map axes, rad²). The 6×6 matrix
is row-major in x, y, z, roll, pitch, yaw as ROS and robot_localization expect.
"""
from __future__ import annotations

import numpy as np
import torch

from .geometry import quat_multiply, quat_conjugate, quat_canonical, quat_normalize

# Never claim more certainty than this, even on a perfect validation set.
MIN_POSITION_STD = 0.01  # m
MIN_ROTATION_STD = np.deg2rad(0.5)  # rad


def rotation_residuals(pred_q: torch.Tensor, true_q: torch.Tensor) -> torch.Tensor:
    """Rotation vectors (B, 3) of ``R_pred · R_trueᵀ`` (error expressed about the world axes)."""
    dq = quat_canonical(quat_multiply(quat_normalize(pred_q), quat_conjugate(true_q)))
    sin_half = dq[:, 1:].norm(dim=-1, keepdim=True)
    angle = 2.0 * torch.atan2(sin_half, dq[:, :1])
    axis = dq[:, 1:] / sin_half.clamp_min(1e-12)
    return axis * angle


def calibrate(pred_t: torch.Tensor, pred_q: torch.Tensor, true_t: torch.Tensor, true_q: torch.Tensor) -> dict:
    """Per-axis residual variances (mean squared residual, so bias counts as error)."""
    pos = (pred_t - true_t).double()
    rot = rotation_residuals(pred_q.double(), true_q.double())
    return {
        "position_var": pos.pow(2).mean(0).tolist(),
        "rotation_var": rot.pow(2).mean(0).tolist(),
        "samples": int(pos.shape[0]),
    }


def covariance_matrix(calibration: dict | None, default_position_std: float = 1.0, default_rotation_std: float = 0.5) -> np.ndarray:
    """6×6 covariance from a calibration dict; generous defaults when there is none."""
    if calibration:
        pos_var = np.asarray(calibration["position_var"], dtype=float)
        rot_var = np.asarray(calibration["rotation_var"], dtype=float)
    else:
        pos_var = np.full(3, default_position_std**2)
        rot_var = np.full(3, default_rotation_std**2)
    pos_var = np.maximum(pos_var, MIN_POSITION_STD**2)
    rot_var = np.maximum(rot_var, MIN_ROTATION_STD**2)
    return np.diag(np.concatenate([pos_var, rot_var]))

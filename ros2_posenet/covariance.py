"""Pose covariance for PoseWithCovarianceStamped: per-frame estimates calibrated on held-out frames.

A pose residual is the 6-vector (position error x, y, z in the map frame in m; small-angle
rotation vector of ``R_pred · R_trueᵀ`` about the map axes in rad); covariances are 6×6 in
that order, which is ROS's x, y, z, roll, pitch, yaw for small angles.

Methods (:data:`UNCERTAINTY_METHODS`), each giving an *unscaled* per-frame covariance:

* ``fixed``: one diagonal matrix, the mean squared residual per axis on the validation split;
* ``mc_dropout``: second moment of the Monte-Carlo dropout samples about the deterministic
  prediction (Bayesian PoseNet); grows for images unlike the training set;
* ``variance_head``: the model's predicted log-variances (Gaussian NLL trained).

Calibration multiplies the position and rotation blocks by scales fitted on the held-out
split so that the share of frames inside every chi-square bound matches its level
(:func:`fit_scale`); :func:`calibration_metrics` reports NEES and coverage.

Checkpoints store the ``fixed`` per-axis variances (scale included) under ``covariance`` and
the default method, MC sample count and the other methods' scales under
``covariance["uncertainty"]`` (see :func:`calibrate_methods`); checkpoints without it are ``fixed``.
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


UNCERTAINTY_METHODS = ("fixed", "mc_dropout", "variance_head")
# Expected-vs-observed coverage is matched at these chi-square levels when fitting a scale.
FIT_LEVELS = tuple(np.round(np.arange(0.05, 0.951, 0.05), 2)) + (0.99,)
REPORT_LEVELS = (0.68, 0.95, 0.99)


def pose_residuals(pred_t: torch.Tensor, pred_q: torch.Tensor, true_t: torch.Tensor, true_q: torch.Tensor) -> torch.Tensor:
    """(B, 6) float64 residuals: position error and rotation vector of ``R_pred · R_trueᵀ``."""
    return torch.cat((pred_t.double() - true_t.double(), rotation_residuals(pred_q.double(), true_q.double())), dim=-1)


def mc_dropout_covariance(t: torch.Tensor, q: torch.Tensor, t_samples: torch.Tensor, q_samples: torch.Tensor) -> torch.Tensor:
    """(B, 6, 6) second moment of the samples' residuals about the published pose ``(t, q)``.

    About the published pose rather than the samples' mean, so a shift of the samples away
    from it counts as uncertainty too. ``t_samples`` (B, S, 3), ``q_samples`` (B, S, 4).
    """
    batch, samples = t_samples.shape[:2]
    r = pose_residuals(
        t_samples.reshape(-1, 3), q_samples.reshape(-1, 4),
        t.repeat_interleave(samples, 0), q.repeat_interleave(samples, 0),
    ).view(batch, samples, 6)
    return r.transpose(1, 2) @ r / samples


def variance_head_covariance(log_variance: torch.Tensor) -> torch.Tensor:
    """(B, 6, 6) diagonal covariance from predicted log-variances (B, 6)."""
    return torch.diag_embed(log_variance.double().clamp(-30.0, 30.0).exp())


def fixed_covariance(calibration: dict, batch: int) -> torch.Tensor:
    """(B, 6, 6) copies of the diagonal of per-axis variances (``position_var``, ``rotation_var``)."""
    diag = torch.tensor(list(calibration["position_var"]) + list(calibration["rotation_var"]), dtype=torch.float64)
    return torch.diag_embed(diag).expand(batch, 6, 6).clone()


def available_methods(dropout: float, variance_head: bool) -> tuple[str, ...]:
    """The uncertainty methods a model with this dropout and head can give."""
    return ("fixed",) + (("mc_dropout",) if dropout > 0 else ()) + (("variance_head",) if variance_head else ())


def unit_covariances(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unscaled (B, 6, 6) covariances of the per-frame methods present in :meth:`PoseNet.uncertainty_outputs`."""
    covs = {}
    if "t_samples" in outputs:
        covs["mc_dropout"] = mc_dropout_covariance(outputs["t"], outputs["q"], outputs["t_samples"], outputs["q_samples"])
    if "log_variance" in outputs:
        covs["variance_head"] = variance_head_covariance(outputs["log_variance"])
    return covs


def scale_covariance(cov: torch.Tensor, position_scale: float, rotation_scale: float) -> torch.Tensor:
    """``D Σ D`` with ``D = diag(√sp ×3, √sr ×3)``: the blocks scaled, cross terms consistently."""
    d = torch.tensor([position_scale] * 3 + [rotation_scale] * 3, dtype=cov.dtype, device=cov.device).sqrt()
    return cov * d[:, None] * d[None, :]


def with_floor(cov: torch.Tensor) -> torch.Tensor:
    """Raise diagonal entries to the minimum standard deviations (adding a diagonal keeps it PSD)."""
    floor = torch.tensor([MIN_POSITION_STD**2] * 3 + [MIN_ROTATION_STD**2] * 3, dtype=cov.dtype, device=cov.device)
    diag = torch.diagonal(cov, dim1=-2, dim2=-1)
    return cov + torch.diag_embed((floor - diag).clamp_min(0.0))


def nees(residuals: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Normalised estimation error squared ``rᵀ Σ⁻¹ r`` per frame: (B, k), (B, k, k) -> (B,)."""
    r = residuals.double().unsqueeze(-1)
    return (r.transpose(-1, -2) @ torch.linalg.solve(cov.double(), r)).reshape(-1)


def chi2_cdf(x, dof: int) -> np.ndarray:
    """Chi-square CDF (regularised lower incomplete gamma)."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float64))
    return torch.special.gammainc(torch.tensor(dof / 2.0, dtype=torch.float64), x.clamp_min(0) / 2.0).numpy()


def chi2_ppf(p, dof: int) -> np.ndarray:
    """Chi-square quantile by bisection of :func:`chi2_cdf` (p in (0, 1))."""
    p = np.asarray(p, dtype=np.float64)
    lo, hi = np.zeros_like(p), np.full_like(p, 10.0 * dof + 100.0)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        below = chi2_cdf(mid, dof) < p
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def coverage(nees_values, dof: int, levels=REPORT_LEVELS) -> np.ndarray:
    """Observed share of frames inside each chi-square bound ``NEES <= chi2_ppf(level, dof)``."""
    values = np.asarray(nees_values, dtype=np.float64)
    return np.array([float(np.mean(values <= b)) if len(values) else float("nan") for b in chi2_ppf(np.asarray(levels), dof)])


def fit_scale(unit_nees, dof: int, levels=FIT_LEVELS) -> float:
    """Scale ``s`` of the covariance that best matches expected and observed coverage.

    ``unit_nees``: NEES of held-out frames under the unscaled covariance. Scaling the
    covariance by ``s`` divides the NEES by ``s``; ``s`` minimises the mean absolute gap
    between each level and the share of frames inside its bound (the reliability curve),
    which, unlike matching the mean NEES, is not dominated by a few gross errors.
    """
    e = np.sort(np.asarray(unit_nees, dtype=np.float64))
    e = e[np.isfinite(e)]
    if len(e) == 0:
        raise ValueError("cannot fit a covariance scale without held-out frames")
    levels = np.asarray(levels, dtype=np.float64)
    bounds = chi2_ppf(levels, dof)
    lo = max(np.min(e) / bounds.max(), 1e-12)
    hi = max(np.max(e) / bounds.min(), lo * 10)
    grid = np.geomspace(lo, hi, 4000)
    observed = np.searchsorted(e, grid[:, None] * bounds[None, :], side="right") / len(e)
    gap = np.abs(observed - levels[None, :]).mean(-1)
    best = np.flatnonzero(gap <= gap.min() + 1e-12)
    return float(np.sqrt(grid[best[0]] * grid[best[-1]]))  # middle of the flat optimum


def block_nees(residuals: torch.Tensor, cov: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-frame NEES of the position and rotation blocks (3 dof each): ``{"position", "rotation"}``."""
    return {name: nees(residuals[:, sl], cov[:, sl, sl]).numpy() for name, sl in (("position", slice(0, 3)), ("rotation", slice(3, 6)))}


def calibration_metrics(residuals: torch.Tensor, cov: torch.Tensor, levels=REPORT_LEVELS) -> dict:
    """NEES medians and chi-square coverage of position and rotation (3 dof each).

    Ideal: median NEES = chi2_ppf(0.5, 3) ≈ 2.37 and the share inside each bound = its level.
    """
    out: dict = {}
    for name, values in block_nees(residuals, cov).items():
        out[f"nees_{name}_median"] = float(np.median(values)) if len(values) else float("nan")
        for level, share in zip(levels, coverage(values, 3, levels)):
            out[f"{name}_within_{round(level * 100)}"] = float(share)
    out["nees_ideal_median"] = float(chi2_ppf(0.5, 3))
    return out


def fit_block_scales(residuals: torch.Tensor, unit_cov: torch.Tensor) -> tuple[float, float]:
    """``(position_scale, rotation_scale)`` of an unscaled per-frame covariance on held-out residuals."""
    return tuple(
        fit_scale(nees(residuals[:, sl], unit_cov[:, sl, sl]).numpy(), 3) for sl in (slice(0, 3), slice(3, 6))
    )


def calibrate(pred_t: torch.Tensor, pred_q: torch.Tensor, true_t: torch.Tensor, true_q: torch.Tensor) -> dict:
    """Per-axis residual variances (mean squared residual, so bias counts as error)."""
    pos = (pred_t - true_t).double()
    rot = rotation_residuals(pred_q.double(), true_q.double())
    return {
        "position_var": pos.pow(2).mean(0).tolist(),
        "rotation_var": rot.pow(2).mean(0).tolist(),
        "samples": int(pos.shape[0]),
    }


def calibrate_methods(
    pred_t: torch.Tensor, pred_q: torch.Tensor, true_t: torch.Tensor, true_q: torch.Tensor,
    unit_covariances: dict[str, torch.Tensor], method: str, mc_samples: int,
) -> tuple[dict, dict]:
    """Calibrate every available method on held-out predictions.

    Args:
        unit_covariances: method -> unscaled (N, 6, 6) per-frame covariance, for the methods
            other than ``fixed`` that the model offers.
        method: the default method to store; ``mc_samples``: samples it was computed with.

    Returns:
        ``(covariance, uncertainty)`` for the checkpoint: the ``fixed`` calibration (per-axis
        variances with their scale folded in, as older checkpoints store it) and
        ``{"method", "mc_samples", "scales": {method: [position_scale, rotation_scale]},
        "val_metrics": {method: calibration_metrics on the held-out frames}}``.
    """
    fixed = calibrate(pred_t, pred_q, true_t, true_q)
    residuals = pose_residuals(pred_t, pred_q, true_t, true_q)
    scales, metrics = {}, {}
    for name, unit in {"fixed": fixed_covariance(fixed, len(residuals)), **unit_covariances}.items():
        sp, sr = fit_block_scales(residuals, unit)
        scales[name] = [sp, sr]
        metrics[name] = calibration_metrics(residuals, with_floor(scale_covariance(unit, sp, sr)))
    sp, sr = scales.pop("fixed")
    fixed = {**fixed, "position_var": [v * sp for v in fixed["position_var"]],
             "rotation_var": [v * sr for v in fixed["rotation_var"]], "scale": [sp, sr]}
    return fixed, {"method": method, "mc_samples": int(mc_samples), "scales": scales, "val_metrics": metrics}


def standard_deviations(cov: np.ndarray) -> dict[str, float]:
    """One frame's σ for diagnostics: worst-direction position σ (m) and rotation σ (degrees), and yaw σ.

    ``cov``: (6, 6) in x, y, z, roll, pitch, yaw order (as published).
    """
    cov = np.asarray(cov, dtype=float)
    return {
        "position_std_m": float(np.sqrt(max(np.linalg.eigvalsh(cov[:3, :3]).max(), 0.0))),
        "rotation_std_deg": float(np.degrees(np.sqrt(max(np.linalg.eigvalsh(cov[3:, 3:]).max(), 0.0)))),
        "yaw_std_deg": float(np.degrees(np.sqrt(max(cov[5, 5], 0.0)))),
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

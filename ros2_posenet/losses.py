"""The PoseNet losses of Kendall & Cipolla (CVPR 2017), one module for trainer and tools.

Every criterion is called as ``criterion(pred_t, pred_q, batch)`` where ``pred_t`` (B, 3)
and ``pred_q`` (B, 4) are the network's camera-to-world pose and ``batch`` is the
dataset's collated dict with at least ``position`` (B, 3) and ``rotation`` (B, 4);
the reprojection loss also reads ``K`` (B, 3, 3), ``points`` (B, N, 3) and
``points_mask`` (B, N). It returns ``(loss, stats)`` where ``stats`` holds detached
scalars for logging.

* :class:`BetaLoss` — ``Lx + β·Lq`` with a hand-tuned β.
* :class:`LearnedWeightingLoss` — ``Lx·exp(-ŝx) + ŝx + Lq·exp(-ŝq) + ŝq`` with learnable
  ŝx, ŝq (homoscedastic uncertainty). It **can be negative**: ŝ terms are log
  variances, so once the residuals get small the optimum has ŝ < 0.
* :class:`ReprojectionLoss` — mean γ-norm pixel distance between the scene points
  projected with the true and with the predicted pose.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .geometry import project_points, quat_normalize

NORMS = ("l1", "l2")


def regression_norm(residual: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample norm (B,) of residuals (B, D): L1 (sum of |·|) or L2 (Euclidean)."""
    if norm == "l1":
        return residual.abs().sum(-1)
    if norm == "l2":
        # sqrt has an infinite gradient at 0; the epsilon keeps perfect predictions finite.
        return (residual.pow(2).sum(-1) + 1e-12).sqrt()
    raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")


def position_loss(pred_t: torch.Tensor, true_t: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """Batch mean of ``||x - x̂||``."""
    return regression_norm(pred_t - true_t, norm).mean()


def rotation_loss(pred_q: torch.Tensor, true_q: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """Batch mean of ``||q - q̂/|q̂|||``, invariant to the sign of either quaternion.

    q and -q are the same rotation: the residual is taken against whichever of
    ±q̂ lies in the true quaternion's hemisphere.
    """
    q_hat = quat_normalize(pred_q)
    sign = torch.where((q_hat * true_q).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(q_hat.dtype)
    return regression_norm(q_hat * sign - true_q, norm).mean()


def _check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
    return norm


class BetaLoss(nn.Module):
    """``||x - x̂|| + β·||q - q̂/|q̂|||`` (β ~120–750 indoors, 250–2000 outdoors)."""

    def __init__(self, beta: float = 500.0, norm: str = "l2"):
        super().__init__()
        if not beta > 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.beta = float(beta)
        self.norm = _check_norm(norm)

    def forward(self, pred_t, pred_q, batch):
        lx = position_loss(pred_t, batch["position"], self.norm)
        lq = rotation_loss(pred_q, batch["rotation"], self.norm)
        loss = lx + self.beta * lq
        return loss, {"loss": loss.detach(), "loss_position": lx.detach(), "loss_rotation": lq.detach()}


class LearnedWeightingLoss(nn.Module):
    """Homoscedastic-uncertainty weighting ``Lx·e^{-ŝx} + ŝx + Lq·e^{-ŝq} + ŝq``.

    ŝx and ŝq are ``nn.Parameter`` s of this module: give them to the optimiser
    *without* weight decay (see :func:`parameter_groups`) and save them with it.
    """

    def __init__(self, sx: float = 0.0, sq: float = -3.0, norm: str = "l2"):
        super().__init__()
        self.sx = nn.Parameter(torch.tensor(float(sx)))
        self.sq = nn.Parameter(torch.tensor(float(sq)))
        self.norm = _check_norm(norm)

    def forward(self, pred_t, pred_q, batch):
        lx = position_loss(pred_t, batch["position"], self.norm)
        lq = rotation_loss(pred_q, batch["rotation"], self.norm)
        loss = lx * torch.exp(-self.sx) + self.sx + lq * torch.exp(-self.sq) + self.sq
        return loss, {
            "loss": loss.detach(),
            "loss_position": lx.detach(),
            "loss_rotation": lq.detach(),
            "sx": self.sx.detach(),
            "sq": self.sq.detach(),
        }


def reprojection_residuals(pred_t: torch.Tensor, pred_q: torch.Tensor, batch: dict, min_depth: float = 1e-2):
    """Pixel offsets of the batch's scene points between the predicted and the true pose.

    Args:
        pred_t, pred_q: (B, 3), (B, 4) predicted camera-to-world poses.
        batch: ``points`` (B, N, 3), ``points_mask`` (B, N), ``K`` (B, 3, 3), true ``position``/``rotation``.
        min_depth: points closer than this to the true camera are invalid; depths behind the
            predicted camera are clamped to it (finite, large residuals).

    Returns:
        ``(residual (B, N, 2), valid (B, N) bool)``.
    """
    points, K = batch["points"], batch["K"]
    uv_true, depth_true = project_points(points, batch["position"], batch["rotation"], K, min_depth)
    uv_pred, _ = project_points(points, pred_t, pred_q, K, min_depth)
    return uv_pred - uv_true, batch["points_mask"].bool() & (depth_true > min_depth)


class ReprojectionLoss(nn.Module):
    """Mean γ-norm pixel distance of visible scene points under true vs predicted pose.

    Points behind the true camera or masked out are ignored; points behind the
    predicted camera are clamped to ``min_depth`` (finite, large residual) and each
    residual is capped at ``max_pixel_error`` so a few wild points cannot dominate.
    Images without any valid point contribute nothing (no NaN).
    """

    def __init__(self, gamma: float = 1.0, max_pixel_error: float = 200.0, min_depth: float = 1e-2):
        super().__init__()
        if gamma not in (1.0, 2.0, 1, 2):
            raise ValueError(f"gamma must be 1 or 2, got {gamma}")
        if not max_pixel_error > 0:
            raise ValueError(f"max_pixel_error must be positive, got {max_pixel_error}")
        self.gamma = float(gamma)
        self.max_pixel_error = float(max_pixel_error)
        self.min_depth = float(min_depth)

    def forward(self, pred_t, pred_q, batch):
        residual, valid = reprojection_residuals(pred_t, pred_q, batch, self.min_depth)
        per_point = regression_norm(residual, "l1" if self.gamma == 1.0 else "l2")
        per_point = per_point.clamp_max(self.max_pixel_error)
        count = valid.sum()
        loss = (per_point * valid).sum() / count.clamp_min(1)
        return loss, {"loss": loss.detach(), "loss_reprojection": loss.detach(), "points": count.detach().float()}


LOSSES = {"beta": BetaLoss, "learned": LearnedWeightingLoss, "reprojection": ReprojectionLoss}


def build_loss(config: dict) -> nn.Module:
    """Build a criterion from ``{"type": "beta"|"learned"|"reprojection", **kwargs}``.

    >>> build_loss({"type": "beta", "beta": 250, "norm": "l1"}).beta
    250.0
    """
    config = dict(config)
    kind = config.pop("type", None)
    if kind not in LOSSES:
        raise ValueError(f"loss type must be one of {sorted(LOSSES)}, got {kind!r}")
    try:
        return LOSSES[kind](**config)
    except TypeError as err:
        raise ValueError(f"bad options for loss {kind!r}: {err}") from None


def variance_head_nll(
    log_variance: torch.Tensor, pred_t: torch.Tensor, pred_q: torch.Tensor, true_t: torch.Tensor, true_q: torch.Tensor
) -> torch.Tensor:
    """Gaussian negative log-likelihood (without its constant) of the pose residuals under the
    predicted diagonal variances: mean over the batch of ``0.5 · Σ_k (r_k² e^{-s_k} + s_k)``.

    The residuals (position, rotation vector; see :func:`ros2_posenet.covariance.pose_residuals`)
    are detached: this term trains only the variance head, never the pose.
    """
    from .covariance import pose_residuals

    r = pose_residuals(pred_t.detach(), pred_q.detach(), true_t, true_q).to(log_variance.dtype)
    return 0.5 * (r.pow(2) * torch.exp(-log_variance) + log_variance).sum(-1).mean()


def parameter_groups(model: nn.Module, criterion: nn.Module, weight_decay: float) -> list[dict]:
    """Optimiser groups: model weights with weight decay, loss parameters (ŝx, ŝq) without."""
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    loss_params = [p for p in criterion.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "weight_decay": 0.0})
    return groups

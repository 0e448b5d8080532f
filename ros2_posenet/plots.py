"""PNG plots for evaluation: error CDFs and a top-down trajectory (matplotlib, Agg backend)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: robots and CI machines have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _cdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.sort(np.asarray(values, dtype=float))
    return x, np.arange(1, len(x) + 1) / max(len(x), 1)


def plot_error_cdfs(errors: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "") -> Path:
    """Cumulative distributions of position (m) and rotation (°) errors, one curve per method.

    Args:
        errors: method name -> (position errors (N,), rotation errors in degrees (N,)).
        path: PNG file to write.
    """
    fig, (ax_pos, ax_rot) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, (pos, rot) in errors.items():
        ax_pos.plot(*_cdf(pos), label=name)
        ax_rot.plot(*_cdf(rot), label=name)
    for ax, unit in ((ax_pos, "position error (m)"), (ax_rot, "rotation error (°)")):
        ax.set_xlabel(unit)
        ax.set_ylabel("fraction of frames")
        ax.set_ylim(0, 1.01)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(title or "error CDF")
    fig.tight_layout()
    return _save(fig, path)


def top_down_axes(positions: np.ndarray) -> np.ndarray:
    """(3, 2) projection onto the two principal directions of ``positions`` (N, 3).

    Datasets disagree on which world axis is "up" (SfM frames are arbitrary), but a
    camera carried through a scene moves least along the vertical, so the plane of
    the two largest principal directions is the top-down view.
    """
    centred = np.asarray(positions, dtype=float) - np.mean(positions, axis=0)
    if len(centred) < 2:
        return np.eye(3)[:, :2]
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[:2].T


def plot_trajectory(
    true_t: np.ndarray, pred_t: np.ndarray, path: str | Path, title: str = "", max_error_lines: int = 400
) -> Path:
    """Top-down view of ground-truth vs predicted camera positions (N, 3), with error segments."""
    true_t, pred_t = np.asarray(true_t, dtype=float), np.asarray(pred_t, dtype=float)
    axes = top_down_axes(true_t)
    origin = true_t.mean(0)
    gt2, pr2 = (true_t - origin) @ axes, (pred_t - origin) @ axes
    fig, ax = plt.subplots(figsize=(6.5, 6))
    step = max(1, len(gt2) // max_error_lines)
    for a, b in zip(gt2[::step], pr2[::step]):
        ax.plot([a[0], b[0]], [a[1], b[1]], color="0.75", linewidth=0.6, zorder=1)
    ax.plot(gt2[:, 0], gt2[:, 1], ".-", color="tab:green", markersize=3, linewidth=0.8, label="ground truth", zorder=2)
    ax.scatter(pr2[:, 0], pr2[:, 1], s=6, color="tab:red", label="predicted", zorder=3)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("principal axis 1 (m)")
    ax.set_ylabel("principal axis 2 (m)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    ax.set_title(title or "top-down trajectory")
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(nees_by_block: dict[str, np.ndarray], path: str | Path, title: str = "", dof: int | None = None) -> Path:
    """Reliability diagram of a covariance: expected vs observed share of frames inside each
    chi-square bound (the diagonal is perfect calibration; below it: over-confident).

    Args:
        nees_by_block: name (position, rotation, joint) -> per-frame NEES (N,). Each curve uses its
            block's degrees of freedom (:data:`ros2_posenet.covariance.BLOCKS`: 3, 3 and 6), or ``dof``
            when given; the 95 % bound is marked.
    """
    from .covariance import BLOCKS, chi2_ppf

    levels = np.linspace(0.01, 0.99, 99)
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
    ax.axvline(0.95, color="0.8", linewidth=0.8)
    for name, values in nees_by_block.items():
        values = np.asarray(values, dtype=float)
        k = dof or BLOCKS.get(name, (None, 3))[1]
        observed = (values[:, None] <= chi2_ppf(levels, k)[None, :]).mean(0) if len(values) else np.full_like(levels, np.nan)
        inside = float((values <= chi2_ppf(0.95, k)).mean()) if len(values) else float("nan")
        ax.plot(levels, observed, label=f"{name} ({k} dof): NEES median {np.median(values) if len(values) else np.nan:.2f} "
                                        f"(ideal {float(chi2_ppf(0.5, k)):.2f}), {inside:.0%} in 95 %")
    ax.set_xlabel("expected share inside the chi-square bound")
    ax.set_ylabel("observed share of frames")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title("\n".join(textwrap.wrap(title or "covariance reliability", 60)), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Absolute pose from 2D–3D correspondences, its covariance, and the focal-length check of a calibration.

* :func:`solve_absolute_pose`: LO-RANSAC + non-linear refinement by pycolmap (default), poselib
  or OpenCV USAC + LM (``solver``), solved again without the inliers the others do not predict
  (:func:`unsupported_inliers`).
* :func:`reprojection_jacobian`, :func:`geometric_covariance`: the pose covariance ``σ² (JᵀJ)⁻¹``
  in the order and convention of :mod:`ros2_posenet.covariance` (camera centre in the map frame,
  rotation about the map axes).
* :func:`estimate_focal_ratio`, :class:`FocalHistory`: the focal length the matches imply
  (pose and focal estimated together), and the rule that tells a wrong calibration from noise.

Used by :class:`ros2_posenet.geometric.refiner.Refiner`; ROS-free.
"""
from __future__ import annotations

import logging
import math

import cv2
import numpy as np

from ..geometry import invert_matrix, skew

log = logging.getLogger(__name__)

SOLVERS = ("pycolmap", "poselib", "opencv")
# Inliers that together carry more than this share of some pose direction count only when the other inliers
# predict them (:func:`unsupported_inliers`): left out together are those of leverage above GROUP_LEVERAGE within
# GROUP_ANGLE_DEG of each other; rounds of posing again without the unsupported ones.
MAX_INLIER_LEVERAGE = 0.5
GROUP_LEVERAGE = 0.2
GROUP_ANGLE_DEG = 3.0
MAX_UNSUPPORTED_ROUNDS = 3


# ----------------------------------------------------------------------------- pose solvers


def _solve_pycolmap(p2d, p3d, K, size, threshold):
    import pycolmap

    camera = pycolmap.Camera(model="PINHOLE", width=int(size[0]), height=int(size[1]),
                             params=[K[0, 0], K[1, 1], K[0, 2], K[1, 2]])
    options = pycolmap.AbsolutePoseEstimationOptions()
    options.ransac.max_error = float(threshold)
    options.ransac.random_seed = 0  # reproducible answers
    answer = pycolmap.estimate_and_refine_absolute_pose(p2d, p3d, camera, options)
    if answer is None:
        return None, np.zeros(len(p2d), bool)
    return answer["cam_from_world"].matrix(), np.asarray(answer["inlier_mask"], bool)


def _solve_poselib(p2d, p3d, K, size, threshold):
    import poselib

    camera = {"model": "PINHOLE", "width": int(size[0]), "height": int(size[1]),
              "params": [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]}
    pose, info = poselib.estimate_absolute_pose(p2d, p3d, camera, {"max_reproj_error": float(threshold), "seed": 0}, {})
    inliers = np.asarray(info.get("inliers", []), bool)
    if inliers.sum() < 4:
        return None, np.zeros(len(p2d), bool)
    return np.hstack([pose.R, np.asarray(pose.t).reshape(3, 1)]), inliers


def _solve_opencv(p2d, p3d, K, size, threshold):
    params = cv2.UsacParams()
    params.sampler = cv2.SAMPLING_UNIFORM
    params.score = cv2.SCORE_METHOD_MAGSAC
    params.loMethod = cv2.LOCAL_OPTIM_SIGMA
    params.threshold = float(threshold)
    params.confidence = 0.9999
    params.maxIterations = 10000
    params.randomGeneratorState = 0
    ok, _, rvec, tvec, inliers = cv2.solvePnPRansac(p3d, p2d, K, None, params=params)
    if not ok or inliers is None or len(inliers) < 4:
        return None, np.zeros(len(p2d), bool)
    mask = np.zeros(len(p2d), bool)
    mask[inliers.ravel()] = True
    rvec, tvec = cv2.solvePnPRefineLM(p3d[mask], p2d[mask], K, None, rvec, tvec)
    return np.hstack([cv2.Rodrigues(rvec)[0], tvec.reshape(3, 1)]), mask


def require_solver(solver: str) -> None:
    """Raise ValueError, saying what to install, when ``solver``'s library is missing."""
    if solver == "opencv":
        return
    try:
        __import__(solver)
    except ImportError:
        raise ValueError(f"refinement solver {solver!r} is not installed: pip install -r requirements.txt "
                         "(or use solver: opencv)") from None


_SOLVER_FUNCTIONS = {"pycolmap": _solve_pycolmap, "poselib": _solve_poselib, "opencv": _solve_opencv}


def solve_absolute_pose(points2d: np.ndarray, points3d: np.ndarray, K: np.ndarray, image_size: tuple[int, int],
                        threshold_px: float = 4.0, solver: str = "pycolmap") -> tuple[np.ndarray | None, np.ndarray]:
    """Camera pose from 2D–3D correspondences by RANSAC + non-linear refinement.

    Inliers the pose is fitted to but the other inliers do not predict (:func:`unsupported_inliers`)
    are left out and the pose is estimated again without them (up to ``MAX_UNSUPPORTED_ROUNDS`` times).

    Args:
        points2d: (N, 2) pixels; points3d: (N, 3) world points; K: (3, 3); image_size: (w, h).

    Returns:
        ``(T (4, 4) camera-to-world or None, inlier mask (N,) bool)``.
    """
    if solver not in _SOLVER_FUNCTIONS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    p2d = np.ascontiguousarray(points2d, np.float64).reshape(-1, 2)
    p3d = np.ascontiguousarray(points3d, np.float64).reshape(-1, 3)
    K = np.asarray(K, np.float64)
    usable = np.ones(len(p2d), bool)  # correspondences not found to be unsupported inliers
    for _ in range(MAX_UNSUPPORTED_ROUNDS + 1):
        candidates = np.flatnonzero(usable)
        T, inliers = _solve_once(solver, p2d[candidates], p3d[candidates], K, image_size, threshold_px)
        if T is None:
            return None, np.zeros(len(p2d), bool)
        inlier_indices = candidates[inliers]
        unsupported = unsupported_inliers(T, K, p2d[inlier_indices], p3d[inlier_indices], threshold_px)
        usable[inlier_indices[unsupported]] = False  # posed again without them: the others decide
        if not unsupported.any():
            break
    mask = np.zeros(len(p2d), bool)
    mask[inlier_indices[~unsupported]] = True  # any left after the last round are not counted
    return T, mask


def _solve_once(solver, p2d, p3d, K, image_size, threshold_px) -> tuple[np.ndarray | None, np.ndarray]:
    if len(p2d) < 6:
        return None, np.zeros(len(p2d), bool)
    try:
        cam_from_world, inliers = _SOLVER_FUNCTIONS[solver](p2d, p3d, K, image_size, threshold_px)
    except (RuntimeError, ValueError, cv2.error) as err:  # degenerate input inside the library: no pose, not a crash
        log.debug("absolute pose solver %s failed: %s", solver, err)
        return None, np.zeros(len(p2d), bool)
    if cam_from_world is None or not np.all(np.isfinite(cam_from_world)):
        return None, np.zeros(len(p2d), bool)
    T = np.eye(4)
    T[:3, :4] = cam_from_world
    return invert_matrix(T), np.asarray(inliers, bool)


def unsupported_inliers(T_world_camera: np.ndarray, K: np.ndarray, points2d: np.ndarray, points3d: np.ndarray,
                        threshold_px: float) -> np.ndarray:
    """(N,) bool: inliers that the pose is fitted *to* rather than checked *by*.

    A few points that alone carry most of what the pose knows in some direction (their block of
    the hat matrix ``J (JᵀJ)⁻¹ Jᵀ`` has an eigenvalue above ``MAX_INLIER_LEVERAGE``) have small
    residuals whatever they are, because the pose follows them. They count only when the pose of
    the *other* inliers predicts them too: their leave-out residuals ``(I − H_gg)⁻¹ r_g``
    (linearised) within ``threshold_px``. The points left out together are those of high leverage
    (above ``GROUP_LEVERAGE``) within ``GROUP_ANGLE_DEG`` of each other in the image: wrong matches
    that agree with each other come in such clusters, and a cluster cannot vouch for itself. On
    hololens-office two wrong matches 0.9 m from the camera, 6 px apart, among 49 right ones on a
    wall 4 m away, turned a 4 cm pose into one 0.56 m / 8° off along the wall's rotation–translation
    ambiguity, every residual under a pixel and a covariance of 1 cm (issue 24): leverage 0.5 each,
    1.0 together, and the wall's pose misses them by 200 px.

    ``T_world_camera`` is the pose fitted to these inliers (a least-squares optimum, as the solvers'
    refinement gives: the leave-out formula holds there).
    """
    uv, J = reprojection_jacobian(T_world_camera, K, points3d)
    residuals = uv - np.asarray(points2d, np.float64)
    unsupported = np.zeros(len(residuals), bool)
    if len(residuals) <= 6:
        return unsupported
    H_inverse = np.linalg.pinv(J.reshape(-1, 6).T @ J.reshape(-1, 6))
    hat = J @ H_inverse @ J.transpose(0, 2, 1)  # (N, 2, 2) diagonal blocks of the hat matrix
    leverage = np.linalg.eigvalsh(0.5 * (hat + hat.transpose(0, 2, 1)))[:, -1]
    high = np.flatnonzero(leverage > GROUP_LEVERAGE)
    radius = float(K[0, 0]) * math.tan(math.radians(GROUP_ANGLE_DEG))
    for i in high:
        group = high[np.linalg.norm(points2d[high] - points2d[i], axis=1) <= radius]
        J_group = J[group].reshape(-1, 6)
        H_group = J_group @ H_inverse @ J_group.T
        H_group = 0.5 * (H_group + H_group.T)
        values, vectors = np.linalg.eigh(H_group)
        if values[-1] <= MAX_INLIER_LEVERAGE:
            continue
        if values[-1] > 1.0 - 1e-9:  # the group alone fixes a direction: the others cannot predict it at all
            unsupported[group] = True
            continue
        left_out = vectors @ ((vectors.T @ residuals[group].reshape(-1)) / (1.0 - values))  # (I − H_gg)⁻¹ r_g
        unsupported[group[np.linalg.norm(left_out.reshape(-1, 2), axis=1) > threshold_px]] = True
    return unsupported


def estimate_focal_ratio(points2d: np.ndarray, points3d: np.ndarray, K: np.ndarray, image_size: tuple[int, int],
                         threshold_px: float = 4.0) -> tuple[float, float, int]:
    """The focal length the correspondences imply, as a ratio to ``K``'s: ``(ratio, its std, inliers)``.

    Pose and one common focal scale are estimated together (pycolmap: P4Pf LO-RANSAC +
    Ceres refinement; the principal point and ``fy/fx`` are kept from ``K``). The
    standard deviation comes from the 7-parameter normal equations of the inliers'
    pixel residuals. ``(nan, nan, 0)`` when no pose is found.
    """
    import pycolmap

    p2d = np.array(points2d, np.float64).reshape(-1, 2)
    p3d = np.ascontiguousarray(points3d, np.float64).reshape(-1, 3)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    p2d[:, 1] = cy + (p2d[:, 1] - cy) * fx / fy  # square pixels: one focal length to estimate
    camera = pycolmap.Camera(model="SIMPLE_PINHOLE", width=int(image_size[0]), height=int(image_size[1]), params=[fx, cx, cy])
    options = pycolmap.AbsolutePoseEstimationOptions()
    options.estimate_focal_length = True
    options.ransac.max_error = float(threshold_px)
    options.ransac.random_seed = 0
    refinement = pycolmap.AbsolutePoseRefinementOptions()
    refinement.refine_focal_length = True
    try:
        answer = pycolmap.estimate_and_refine_absolute_pose(p2d, p3d, camera, options, refinement)
    except (RuntimeError, ValueError) as err:
        log.debug("focal length estimate failed: %s", err)
        answer = None
    if answer is None or len(p2d) < 7:
        return float("nan"), float("nan"), 0
    inliers = np.asarray(answer["inlier_mask"], bool)
    focal = float(camera.params[0])  # refined in place
    T = np.eye(4)
    T[:3, :4] = answer["cam_from_world"].matrix()
    K_est = np.array([[focal, 0, cx], [0, focal, cy], [0, 0, 1]])
    uv, J = reprojection_jacobian(invert_matrix(T), K_est, p3d[inliers])
    J = np.concatenate((J, (uv - K_est[:2, 2])[:, :, None]), axis=2).reshape(-1, 7)  # d pixel / d log(focal)
    residuals = (uv - p2d[inliers]).reshape(-1)
    sigma2 = max(float(residuals @ residuals) / max(1, len(residuals) - 7), 1e-4)
    log_std = math.sqrt(max(0.0, sigma2 * float(np.linalg.pinv(J.T @ J)[6, 6])))
    ratio = focal / fx
    return ratio, ratio * log_std, int(inliers.sum())


# ----------------------------------------------------------------------------- covariance and gate


def reprojection_jacobian(T_world_camera: np.ndarray, K: np.ndarray, points3d: np.ndarray):
    """Pixels (N, 2), and their Jacobian (N, 2, 6) with respect to the pose.

    Pose perturbation (map frame, the order of :mod:`ros2_posenet.covariance`):
    ``t ← t + δt`` (camera centre) and ``R ← exp([δθ]×) R`` (rotation about the map
    axes), parameters ``(δt, δθ)``. With ``X_c = Rᵀ (X − t)``: ``∂X_c/∂δt = −Rᵀ`` and
    ``∂X_c/∂δθ = Rᵀ [X − t]×``.
    """
    R, t = T_world_camera[:3, :3], T_world_camera[:3, 3]
    d = np.asarray(points3d, np.float64) - t
    Xc = d @ R
    x, y, z = Xc[:, 0], Xc[:, 1], Xc[:, 2]
    fx, fy = K[0, 0], K[1, 1]
    uv = np.stack((fx * x / z + K[0, 2], fy * y / z + K[1, 2]), axis=1)
    zero = np.zeros_like(z)
    d_uv_d_xc = np.stack((np.stack((fx / z, zero, -fx * x / z**2), -1),
                          np.stack((zero, fy / z, -fy * y / z**2), -1)), -2)  # (N, 2, 3)
    d_xc = np.concatenate((np.broadcast_to(-R.T, (len(d), 3, 3)), R.T @ skew(d)), axis=2)  # (N, 3, 6)
    return uv, d_uv_d_xc @ d_xc


def geometric_covariance(T_world_camera: np.ndarray, K: np.ndarray, points2d: np.ndarray, points3d: np.ndarray) -> np.ndarray:
    """Unscaled pose covariance ``σ² (JᵀJ)⁻¹`` (6, 6) from the inlier correspondences."""
    uv, J = reprojection_jacobian(T_world_camera, K, points3d)
    residuals = (uv - points2d).reshape(-1)
    J = J.reshape(-1, 6)
    dof = max(1, len(residuals) - 6)
    sigma2 = max(float(residuals @ residuals) / dof, 1e-4)  # never below (0.01 px)²
    return sigma2 * np.linalg.pinv(J.T @ J)


def rotation_vector(R: np.ndarray) -> np.ndarray:
    """Axis × angle (3,) of a rotation matrix."""
    return cv2.Rodrigues(np.asarray(R, np.float64))[0].ravel()


def pose_difference(T_a: np.ndarray, T_b: np.ndarray) -> np.ndarray:
    """(6,) ``(t_a − t_b, rotvec(R_a R_bᵀ))``: position and rotation about the map axes."""
    return np.concatenate((T_a[:3, 3] - T_b[:3, 3], rotation_vector(T_a[:3, :3] @ T_b[:3, :3].T)))


def mahalanobis(delta: np.ndarray, covariance: np.ndarray) -> float:
    """``sqrt(δᵀ Σ⁻¹ δ)`` (pseudo-inverse, so a singular Σ does not crash)."""
    return float(math.sqrt(max(0.0, float(delta @ np.linalg.pinv(covariance) @ delta))))


class FocalHistory:
    """The focal ratios of the recent frames per camera (K): what a wrong calibration looks like over time.

    One frame's estimate (pose and focal together) is precise on clean data (±0.3 % on
    the synthetic room) but wanders by a few per cent on real frames whose residuals are
    not independent (depth noise, the ground truth's own ±1.5 px), far beyond its formal
    standard deviation: on hololens-office, right poses (2 cm) come with ratios of
    0.88-1.08 at a formal ±0.2-4 %, and the first frames of a walk can sit at 1.02 together.
    A wrong K is off for every frame alike. So:

    * a frame is refused when its ratio is off by more than ``tolerance`` *and* by more than
      ``sigmas`` of its standard deviation as the recent frames say it is to be read: inflated by
      their spread (robust: 1.4826 × MAD), or scaled by the spread of their deviations in units
      of their own σ (a formal σ that real frames exceed fivefold is worth a fifth), whichever
      is larger; none before ``min_frames`` frames, so a frame alone is judged by its own σ;
    * once the recent frames are enough to read by, a frame's σ is at least its own combined with ``scatter``, how
      far right poses' estimates scatter from place to place on this map (the map's calibration measures it:
      ``focal_scatter``). A stream's recent frames share their map points, so they cannot show it: on hololens-office
      they sat within ±1-2 % of each other, while right poses elsewhere on the walk implied 0.92-0.96 and were refused;
    * every frame is refused while the median of the recent frames is off by more than
      ``tolerance`` plus ``sigmas`` standard errors of that median (1.2533 × scatter / √n,
      the scatter being the larger of the frames' spread and their median σ): a consistent
      offset beyond the tolerance, not a stretch of noisy frames of one place that happen to
      agree near it (consecutive real frames share their map points, and so their error).

    Thread-safe.
    """

    def __init__(self, window: int = 30, min_frames: int = 5):
        import threading

        self.window, self.min_frames = window, min_frames
        self._ratios: dict[tuple, list[tuple[float, float]]] = {}
        self._lock = threading.Lock()

    def verdict(self, K: np.ndarray, ratio: float, std: float, inliers: int, tolerance: float, sigmas: float,
                scatter: float = 0.0) -> str:
        """Why this frame's focal ratio says K is wrong ("" if it does not); records the ratio. ``scatter``: the
        place-to-place scatter of right poses' ratios on this map (0: unknown)."""
        key = tuple(np.round(np.asarray(K, np.float64)[[0, 1, 0, 1], [0, 1, 2, 2]], 3))
        with self._lock:
            recent = self._ratios.setdefault(key, [])
            previous = np.array(recent).reshape(-1, 2)
            recent.append((float(ratio), float(std)))
            del recent[:-self.window]
            ratios, stds = np.array(recent).T
        std_read = std
        if len(previous) >= self.min_frames:
            z_spread = _robust_spread((previous[:, 0] - 1) / np.maximum(previous[:, 1], 1e-6))
            std_read = max(math.hypot(std, max(_robust_spread(previous[:, 0]), scatter)), std * max(1.0, z_spread))
        deviation = abs(ratio - 1)
        fx = float(K[0, 0])
        if deviation > tolerance and deviation > sigmas * std_read:
            return (f"calibration: this image's {inliers} matches imply a focal length of {ratio * fx:.1f} px "
                    f"(±{std_read * fx:.1f}), {ratio:.3f}× the camera's fx {fx:.1f} (max_focal_error "
                    f"{tolerance:.0%}): check the CameraInfo K, and that it belongs to these images")
        if len(ratios) < self.min_frames:
            return ""
        consensus = float(np.median(ratios))
        standard_error = 1.2533 * max(_robust_spread(ratios), float(np.median(stds))) / math.sqrt(len(ratios))
        if abs(consensus - 1) > tolerance + sigmas * standard_error:
            return (f"calibration: the last {len(ratios)} frames imply a focal length {consensus:.3f}× the camera's fx "
                    f"{fx:.1f} (median ±{standard_error:.3f}; max_focal_error {tolerance:.0%}): check the CameraInfo K")
        return ""


def focal_scatter(ratios: np.ndarray) -> float:
    """How far right poses' focal ratios scatter (:func:`estimate_focal_ratio` of frames refined against a map): the
    standard deviation a normal law needs to hold 90 % of them within it of their median. Their tails are heavy on
    real maps (hololens-office: 0.87-1.19 for poses right to a few cm), which the median absolute deviation misses."""
    ratios = np.asarray(ratios, np.float64)
    ratios = ratios[np.isfinite(ratios)]
    if len(ratios) == 0:
        return float("nan")
    return float(np.quantile(np.abs(ratios - np.median(ratios)), 0.9)) / 1.6449


def _robust_spread(values: np.ndarray) -> float:
    """1.4826 × the median absolute deviation: the standard deviation of the normal part of ``values``."""
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))

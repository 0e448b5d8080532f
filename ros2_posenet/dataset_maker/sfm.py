"""Poses for a recording without any: pycolmap SfM, then metric scale and gravity (ROS-free).

pycolmap (``extract_features``, ``match_sequential`` or ``match_exhaustive``,
``incremental_mapping``, or ``global_mapping``) runs on the selected, undistorted
frames with the CameraInfo intrinsics fixed (one ``PINHOLE`` camera, never refined).
SfM poses have an arbitrary scale and orientation; they are brought into a metric,
gravity-aligned frame by

* a similarity (Umeyama, ``pycolmap.estimate_sim3d``) from the SfM camera centres to
  the centres a pose source gives at the same stamps (odometry, any pose topic, TF), or
* a known distance between two frames (scale only; gravity is then taken as the mean
  "down" axis of the cameras, which holds for a level robot camera),

and the alignment's residual is reported. Frames SfM did not register are dropped.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("make-dataset")

MIN_FRAMES = 5  # fewer cannot give a reconstruction worth training on
MATCHERS = ("auto", "sequential", "exhaustive")
EXHAUSTIVE_UP_TO = 250  # frames: "auto" matches every pair below this, neighbours in time above
MAPPERS = ("incremental", "global")


class SfmError(ValueError):
    """SfM could not give poses (too few frames, nothing registered, no scale)."""


@dataclass
class Similarity:
    """``x_metric = scale · R · x_sfm + t``."""

    scale: float
    R: np.ndarray
    t: np.ndarray

    def apply_to_pose(self, T_sfm_camera: np.ndarray) -> np.ndarray:
        T = np.eye(4)
        T[:3, :3] = self.R @ T_sfm_camera[:3, :3]
        T[:3, 3] = self.scale * self.R @ T_sfm_camera[:3, 3] + self.t
        return T

    def apply_to_points(self, points: np.ndarray) -> np.ndarray:
        return self.scale * points @ self.R.T + self.t


def reconstruct(image_dir: Path, names: list[str], K: np.ndarray, workspace: Path, matcher: str = "sequential",
                mapper: str = "incremental", overlap: int = 10, max_features: int = 4096,
                seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Camera-to-world poses (SfM frame) of the registered images of ``names``, and a summary.

    ``seed``: of the two-view RANSAC and the mapper, so with the incremental mapper the same frames give the
    same reconstruction and another seed another. The global mapper (GLOMAP) still varies from run to run
    whatever the seed: on hololens-office's 373-frame walk 3 of 11 runs came out right (11-14 cm) and 8 bent,
    which make-dataset's alignment check refused (bench/RESULTS.md, fifth pass).
    """
    import pycolmap

    if len(names) < MIN_FRAMES:
        raise SfmError(f"too few frames for SfM: {len(names)} selected, at least {MIN_FRAMES} needed")
    start = time.perf_counter()
    database = workspace / "database.db"
    database.unlink(missing_ok=True)
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = "PINHOLE"
    # COLMAP puts the centre of the top-left pixel at (0.5, 0.5), OpenCV (and CameraInfo) at (0, 0).
    reader.camera_params = ",".join(f"{v:.9f}" for v in (K[0, 0], K[1, 1], K[0, 2] + 0.5, K[1, 2] + 0.5))
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.sift.max_num_features = max_features
    extraction.use_gpu = False
    pycolmap.extract_features(database, image_dir, image_names=names, camera_mode=pycolmap.CameraMode.SINGLE,
                              reader_options=reader, extraction_options=extraction, device=pycolmap.Device.cpu)
    matching = pycolmap.FeatureMatchingOptions()
    matching.use_gpu = False
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = seed  # COLMAP's default (-1) seeds every run anew: 30 frames registered 14-16, aligned to 5-46 mm
    if matcher == "auto":
        matcher = "exhaustive" if len(names) <= EXHAUSTIVE_UP_TO else "sequential"
    if matcher == "sequential":
        pairing = pycolmap.SequentialPairingOptions()
        pairing.overlap = overlap
        pycolmap.match_sequential(database, matching_options=matching, pairing_options=pairing, verification_options=verification,
                                  device=pycolmap.Device.cpu)
    else:
        pycolmap.match_exhaustive(database, matching_options=matching, verification_options=verification, device=pycolmap.Device.cpu)
    output = workspace / "sparse"
    output.mkdir(exist_ok=True)
    if mapper == "global":
        models = pycolmap.global_mapping(database, image_dir, output, _global_options(pycolmap, seed))
    else:
        models = pycolmap.incremental_mapping(database, image_dir, output, _incremental_options(pycolmap, seed))
    if not models:
        raise SfmError(f"SfM registered no frame of {len(names)} (too little texture or overlap?)")
    model = max(models.values(), key=lambda m: m.num_reg_images())
    poses = {}
    for image in model.images.values():
        if image.has_pose:
            poses[image.name] = np.linalg.inv(_homogeneous(image.cam_from_world().matrix()))
    summary = {"frames": len(names), "registered": len(poses), "models": len(models), "matcher": matcher, "mapper": mapper, "seed": seed,
               "points": model.num_points3D(), "mean_reprojection_error_px": round(float(model.compute_mean_reprojection_error()), 3),
               "seconds": round(time.perf_counter() - start, 1)}
    return poses, summary


def _homogeneous(matrix_3x4) -> np.ndarray:
    T = np.eye(4)
    T[:3, :] = np.asarray(matrix_3x4, dtype=float)
    return T


def _incremental_options(pycolmap, seed: int):
    """Intrinsics fixed: the CameraInfo's are the calibration, and free ones would absorb pose errors."""
    options = pycolmap.IncrementalPipelineOptions()
    options.ba_refine_focal_length = False
    options.ba_refine_principal_point = False
    options.ba_refine_extra_params = False
    options.random_seed = seed
    # One thread: with more, the seed does not make COLMAP's incremental mapper reproducible; the 30-frame synthetic
    # loop of test_make_dataset came out bent (0.46 m alignment residual, refused) in 1 of 2 runs, and in none of 4 with one.
    options.num_threads = 1
    options.multiple_models = True
    return options


def _global_options(pycolmap, seed: int):
    """Intrinsics fixed as for the incremental mapper (pycolmap 4 keeps the switches in ``mapper.bundle_adjustment``)."""
    options = pycolmap.GlobalPipelineOptions()
    options.random_seed = options.mapper.random_seed = seed  # not reproducible all the same (bench/RESULTS.md, fifth pass)
    bundle_adjustment = options.mapper.bundle_adjustment
    for name in ("refine_focal_length", "refine_principal_point", "refine_extra_params"):
        setattr(bundle_adjustment, name, False)
    return options


def similarity_to(sfm_centres: np.ndarray, metric_centres: np.ndarray) -> tuple[Similarity, np.ndarray]:
    """Least-squares similarity taking SfM camera centres onto metric ones, and the residual per frame (m)."""
    import pycolmap

    if len(sfm_centres) < 3:
        raise SfmError(f"alignment needs at least 3 frames with both an SfM pose and a reference pose, got {len(sfm_centres)}")
    spread = np.linalg.svd(metric_centres - metric_centres.mean(0), compute_uv=False)
    if spread[1] < 1e-3 * max(spread[0], 1e-9) or spread[0] < 1e-3:
        raise SfmError("the reference positions lie on a line or a point: they cannot fix the SfM frame's orientation and scale")
    sim = pycolmap.estimate_sim3d(np.asarray(sfm_centres, float), np.asarray(metric_centres, float))
    if sim is None:
        raise SfmError("the similarity between the SfM and reference positions could not be estimated")
    matrix = np.asarray(sim.matrix(), dtype=float)  # 3x4: [scale · R | t]
    scale = float(sim.scale)
    result = Similarity(scale, matrix[:, :3] / scale, matrix[:, 3])
    residuals = np.linalg.norm(result.apply_to_points(sfm_centres) - metric_centres, axis=1)
    return result, residuals


def similarity_with_rotations(sfm_poses: np.ndarray, metric_poses: np.ndarray) -> tuple[Similarity, np.ndarray]:
    """Like :func:`similarity_to`, with the rotation from the cameras' orientations (chordal mean of ``R_metric · R_sfmᵀ``).

    For references that pose the camera itself: orientations fix gravity far better than
    the centres of a nearly planar robot path, whose tilt a few cm of SfM drift can turn by a degree.
    """
    if len(sfm_poses) < 3:
        raise SfmError(f"alignment needs at least 3 frames with both an SfM pose and a reference pose, got {len(sfm_poses)}")
    U, _, Vt = np.linalg.svd(np.einsum("nij,nkj->ik", metric_poses[:, :3, :3], sfm_poses[:, :3, :3]))
    R = U @ np.diag([1.0, 1.0, np.linalg.det(U @ Vt)]) @ Vt
    c, p = sfm_poses[:, :3, 3], metric_poses[:, :3, 3]
    c_mean, p_mean = c.mean(0), p.mean(0)
    rotated = (c - c_mean) @ R.T
    scale = float(np.sum(rotated * (p - p_mean)) / np.sum(rotated ** 2))
    if not scale > 0:
        raise SfmError("the SfM and reference trajectories do not agree (negative scale)")
    result = Similarity(scale, R, p_mean - scale * R @ c_mean)
    return result, np.linalg.norm(result.apply_to_points(c) - p, axis=1)


def similarity_from_distance(poses: list[np.ndarray], a: int, b: int, metres: float) -> Similarity:
    """Scale from a known distance between frames ``a`` and ``b``; gravity from the cameras' mean down axis."""
    distance = float(np.linalg.norm(poses[a][:3, 3] - poses[b][:3, 3]))
    if distance < 1e-9:
        raise SfmError("the two frames of --known-distance have the same SfM position")
    down = np.mean([T[:3, 1] for T in poses], axis=0)  # optical y points down in the image
    R = _rotation_between(down / np.linalg.norm(down), np.array([0.0, 0.0, -1.0]))
    scale = metres / distance
    return Similarity(scale, R, -scale * R @ poses[0][:3, 3])


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smallest rotation taking unit vector ``a`` onto unit vector ``b``."""
    v, c = np.cross(a, b), float(np.dot(a, b))
    if c < -1 + 1e-12:
        axis = np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 1.0, 0.0])
        axis /= np.linalg.norm(axis)
        return 2 * np.outer(axis, axis) - np.eye(3)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1 + c)

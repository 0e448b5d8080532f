"""Depth-free scene points: triangulate feature matches between images with known poses.

(About 660 lines: pairs, epipolar checks, tracks, DLT + least squares and the filters are
the steps of one pipeline with one config, read top to bottom.)

What a user with posed photographs and no depth sensor (a Cambridge-style
reconstruction, a calibrated rig, the Strecha fountain) needs for a scene map:

1. **Pairs** (:func:`select_pairs`): each keyframe is matched with its nearest
   keyframes (camera centres) that look the same way (optical axes within
   ``max_pair_axis_angle_deg``) and stand at least ``min_baseline_m`` apart.
2. **Matches**, guided by the *known* relative pose (:func:`epipolar_guided_matches`:
   ratio test + mutual check among the features near each epipolar line, which
   resolves repeated texture; ``guided_matching=False``: among all features,
   :func:`ros2_posenet.features.match_features`), kept where the symmetric
   distance to the epipolar lines is at most ``max_epipolar_px``. A pair whose
   matched rays meet at a median angle below ``min_pair_angle_deg`` has too little
   baseline for the scene's depth (e.g. a camera that only turned; its epipolar
   check is then nearly void) and is not used.
3. **Tracks**: matches are chained across images (union-find); a track that
   holds two different features of one image is ambiguous there and loses that
   image's observations.
4. **Points**: multi-view linear triangulation (DLT, normalised coordinates), then
   Gauss–Newton on the pixel reprojection error of all observations with the poses
   held fixed (the multi-view least squares); observations behind the camera or
   beyond ``max_reproj_px`` are dropped and the point re-estimated.
5. **Filters**: a point is kept when every remaining observation reprojects within
   ``max_reproj_px``, it lies in front of every camera that sees it, its largest
   angle between two viewing rays is at least ``min_angle_deg``, one pixel of
   noise in its observations moves it along its viewing direction by at most
   ``max_range_uncertainty`` of its distance (what the angle means for the images'
   focal length and the number of views), and it is seen in
   at least ``min_track_length`` images; a point seen in two images only is dropped
   where their rays meet at more than ``max_two_view_angle_deg`` (usually a mismatch).
   With ``min_track_length`` 3, a keyframe that would keep fewer than
   ``min_points_per_keyframe`` points keeps its 2-view points that pass the same checks.

   The defaults keep weak points: no angle or range-uncertainty floor, two-view points
   kept. A point with a small angle has an uncertain depth, but it still reprojects
   right into views near the keyframes that made it, which is where the refiner uses
   it (a depth map keeps every feature with depth): on hololens-office's two validation
   splits (priors 0.3 m / 10°) the former filters (2°, 5 %, three views) refined 70.7 /
   85.6 % of the frames, these 72.0 / 94.4 %, the depth map 76.0 / 96.7 % (h15 report).

Every kept point records how it was made: its track length, its largest
triangulation angle, its RMS reprojection error, and ``method`` (one string for
the whole run, :data:`TRIANGULATION_METHOD`). Poses follow the project convention
(:mod:`ros2_posenet.geometry`): camera-to-world 4x4, optical camera frame.

The geometry is plain batched numpy (tracks are short and the poses fixed, so each
point is an independent 3-parameter problem); features and matching are OpenCV's,
through :mod:`ros2_posenet.features`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from pydantic import ConfigDict, Field

from ..geometry import skew
from .settings import GeometricSettings

log = logging.getLogger(__name__)

TRIANGULATION_METHOD = (
    "multi-view DLT on known poses + Gauss-Newton reprojection refinement (poses fixed); "
    "matches guided and verified by the known epipolar geometry"
)

Matcher = Callable[[np.ndarray, np.ndarray], np.ndarray]
# (desc_a, desc_b, keypoints_a, keypoints_b, F with x_b^T F x_a = 0) -> (K, 2) index pairs
PairMatcher = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class TriangulationError(ValueError):
    """Inputs that cannot be triangulated (shapes, non-finite poses, bad parameters)."""


class TriangulationConfig(GeometricSettings):
    """Thresholds of the depth-free map (pixels are those of the images given).

    Attributes:
        pairs_per_image: each keyframe is matched with this many nearest keyframes.
        max_pair_axis_angle_deg: pairs whose optical axes differ by more share too little view.
        min_baseline_m: pairs whose camera centres are closer than this are skipped
            (no parallax; keyframe selection by pose spacing usually ensures it).
        max_epipolar_px: symmetric epipolar distance for a match to agree with the known poses.
        guided_matching: match each feature only among the features near its epipolar line
            (:func:`epipolar_guided_matches`) instead of among all features of the other image.
        min_pair_angle_deg: a pair is used only when the median angle between its
            matched viewing rays (the two-view triangulation angle) reaches this (0: all pairs).
        min_angle_deg: a point's largest angle between two viewing rays (depth uncertainty; 0: any).
        max_range_uncertainty: largest standard deviation of a point's distance to its
            cameras, relative to that distance, for 1 px of noise on its observations
            (from the refinement's normal equations; 0 disables).
        max_reproj_px: every kept observation reprojects within this after refinement.
        min_track_length: images a point must be seen in (2 by default; 3: only points a
            third view checks, for scenes where every place is seen from many views).
        max_two_view_angle_deg: a point seen in only two images is dropped when their rays meet at a
            larger angle (0: no limit): two far-apart keyframes that match a feature no keyframe
            between them matched are usually a mismatch (hololens-office: 32 % of such points off by
            more than 10 % of their distance above 5°, against 14 % at 2–5°).
        min_points_per_keyframe: with ``min_track_length`` 3, below this count of multi-view
            points a keyframe keeps its 2-view points as well (0 disables).
        refine_iterations: Gauss–Newton iterations per round.
    """

    model_config = ConfigDict(title="triangulation config")  # the prefix of from_dict's errors

    pairs_per_image: int = Field(5, ge=1)
    max_pair_axis_angle_deg: float = Field(60.0, gt=0.0, le=180.0)
    min_baseline_m: float = Field(0.0, ge=0.0)
    max_epipolar_px: float = Field(2.0, gt=0.0)
    guided_matching: bool = True
    min_pair_angle_deg: float = Field(0.0, ge=0.0, lt=180.0)
    min_angle_deg: float = Field(0.0, ge=0.0, lt=180.0)
    max_range_uncertainty: float = Field(0.0, ge=0.0)
    max_reproj_px: float = Field(2.0, gt=0.0)
    min_track_length: int = Field(2, ge=2)
    max_two_view_angle_deg: float = Field(5.0, ge=0.0, le=180.0)
    min_points_per_keyframe: int = Field(200, ge=0)
    refine_iterations: int = Field(10, ge=0)


@dataclass
class Triangulation:
    """Result of :func:`triangulate_map`.

    Attributes:
        points3d: (P, 3) float64 world points.
        track_length: (P,) int32 images each point is observed in (after filtering).
        angle_deg: (P,) float32 largest angle between two of its viewing rays.
        range_uncertainty: (P,) float32 relative std of its distance for 1 px of noise.
        reproj_error_px: (P,) float32 RMS reprojection error over its observations.
        point_index: per keyframe, (N_i,) int32 point of each feature, -1 for none.
        pairs: (K, 2) int32 keyframe pairs that were matched.
        stats: counts of every stage (matches, verified, tracks, rejections by reason).
        method: how the points were made (:data:`TRIANGULATION_METHOD`).
        config: the thresholds used.
    """

    points3d: np.ndarray
    track_length: np.ndarray
    angle_deg: np.ndarray
    range_uncertainty: np.ndarray
    reproj_error_px: np.ndarray
    point_index: list[np.ndarray]
    pairs: np.ndarray
    stats: dict = field(default_factory=dict)
    method: str = TRIANGULATION_METHOD
    config: TriangulationConfig = field(default_factory=TriangulationConfig)

    def keyframe_points(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Features of keyframe ``i`` with a 3D point: (feature indices (n,), point ids (n,))."""
        feats = np.flatnonzero(self.point_index[i] >= 0)
        return feats, self.point_index[i][feats]

    def point_info(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Per-point records of points ``ids``, named as a scene map stores them."""
        return {
            "track_length": self.track_length[ids],
            "angle_deg": self.angle_deg[ids],
            "range_uncertainty": self.range_uncertainty[ids],
            "reproj_error_px": self.reproj_error_px[ids],
        }


def triangulate_map(
    features: Sequence[tuple[np.ndarray, np.ndarray]],
    intrinsics: np.ndarray,
    poses: np.ndarray,
    config: TriangulationConfig | None = None,
    feature_config=None,
    matcher: Matcher | None = None,
    pair_matcher: PairMatcher | None = None,
) -> Triangulation:
    """Triangulate 3D points for the features of images with known poses.

    Args:
        features: per keyframe ``(keypoints (N_i, 2) px, descriptors (N_i, D))``, as
            :func:`ros2_posenet.features.detect_features` returns them.
        intrinsics: (M, 3, 3) pinhole K of each keyframe (undistorted images).
        poses: (M, 4, 4) camera-to-world, optical camera frame.
        config: thresholds (defaults: :class:`TriangulationConfig`).
        feature_config: the :class:`ros2_posenet.features.FeatureConfig` the features
            were detected with (ratio test etc.); used by the default matcher.
        matcher: ``f(desc_a, desc_b) -> (K, 2)`` index pairs; defaults to
            ``features.match_features(desc_a, desc_b, feature_config)``.
        pair_matcher: ``f(desc_a, desc_b, kp_a, kp_b, F) -> (K, 2)``, the matches of one pair
            (``F``: its fundamental matrix from the poses); overrides ``matcher`` and the guided
            default (:func:`make_pair_matcher`), e.g. to reuse matches across runs on the same features.

    Returns:
        :class:`Triangulation`: the points, per-point track length / angle / range
        uncertainty / reprojection error, counts of every stage in ``stats``, and for
        each keyframe which of its features has which point.

    Raises:
        TriangulationError: inconsistent shapes, non-finite or non-rigid poses, bad K.
    """
    config = config or TriangulationConfig()
    intrinsics, poses = _checked_cameras(features, intrinsics, poses)
    stats: dict = {"keyframes": len(features)}
    pairs = select_pairs(poses, config)
    stats["pairs"] = len(pairs)
    edges = _verified_matches(features, intrinsics, poses, pairs, pair_matcher or make_pair_matcher(matcher, feature_config, config),
                              config, stats)
    sizes = [len(kp) for kp, _ in features]
    tracks = build_tracks(edges, sizes)
    stats.update(tracks=tracks.count, ambiguous_observations_dropped=tracks.ambiguous)

    keypoints = [np.asarray(kp, dtype=np.float64).reshape(-1, 2) for kp, _ in features]
    obs_xy = np.zeros((len(tracks.cams), 2))
    for cam in range(len(features)):
        sel = tracks.cams == cam
        obs_xy[sel] = keypoints[cam][tracks.feats[sel]]
    points, used, errors, angles, uncertainty, reasons = _estimate_all(tracks, obs_xy, intrinsics, poses, config)
    stats.update(reasons)

    t = tracks.track_of
    lengths = np.bincount(t[used], minlength=tracks.count)
    bad_obs = np.bincount(t[used & (errors > config.max_reproj_px)], minlength=tracks.count)
    good = np.all(np.isfinite(points), axis=1) & (lengths >= 2) & (bad_obs == 0)
    stats["rejected_small_angle"] = int(np.sum(good & (angles < config.min_angle_deg)))
    good &= angles >= config.min_angle_deg
    wide_pair = (lengths == 2) & (angles > config.max_two_view_angle_deg) & (config.max_two_view_angle_deg > 0)
    stats["rejected_wide_two_view"] = int(np.sum(good & wide_pair))
    good &= ~wide_pair
    if config.max_range_uncertainty > 0:
        stats["rejected_range_uncertainty"] = int(np.sum(good & (uncertainty > config.max_range_uncertainty)))
        good &= uncertainty <= config.max_range_uncertainty
    keep = _keep_by_track_length(good, lengths, tracks, used, len(features), config)
    stats["rejected_short_track"] = int(np.sum(good & ~keep))

    ids = np.flatnonzero(keep)
    sq = np.bincount(t[used], weights=errors[used] ** 2, minlength=tracks.count)
    rms = np.sqrt(sq / np.maximum(lengths, 1))
    new_id = np.cumsum(keep) - 1
    kept_obs = used & keep[t]
    point_index = [np.full(n, -1, dtype=np.int32) for n in sizes]
    for cam in range(len(features)):
        sel = kept_obs & (tracks.cams == cam)
        point_index[cam][tracks.feats[sel]] = new_id[t[sel]]
    stats["points"] = len(ids)
    stats["points_multi_view"] = int(np.sum(lengths[ids] >= 3))
    log.info("triangulation: %s", stats)
    return Triangulation(
        points3d=points[ids],
        track_length=lengths[ids].astype(np.int32),
        angle_deg=angles[ids].astype(np.float32),
        range_uncertainty=uncertainty[ids].astype(np.float32),
        reproj_error_px=rms[ids].astype(np.float32),
        point_index=point_index,
        pairs=np.asarray(pairs, dtype=np.int32).reshape(-1, 2),
        stats=stats,
        config=config,
    )


# --------------------------------------------------------------------------- pairs and epipolar checks
def _verified_matches(features, intrinsics, poses, pairs, matcher: PairMatcher, config, stats) -> np.ndarray:
    """Matches of every pair that agree with the known poses, as edges (K, 4)
    ``(cam_a, feat_a, cam_b, feat_b)``; pairs without parallax are left out. Counts go to ``stats``."""
    edges = []
    n_matches = n_verified = low_parallax = 0
    for i, j in pairs:
        (kp_i, desc_i), (kp_j, desc_j) = features[i], features[j]
        if len(kp_i) == 0 or len(kp_j) == 0:
            continue
        F = fundamental_from_poses(intrinsics[i], poses[i], intrinsics[j], poses[j])
        matches = np.asarray(matcher(desc_i, desc_j, kp_i, kp_j, F), dtype=np.int64).reshape(-1, 2)
        n_matches += len(matches)
        if len(matches) == 0:
            continue
        distance = symmetric_epipolar_distance(F, kp_i[matches[:, 0]], kp_j[matches[:, 1]])
        good = matches[distance <= config.max_epipolar_px]
        if len(good) == 0:
            continue
        angles = ray_angles_deg(intrinsics[i], poses[i], kp_i[good[:, 0]], intrinsics[j], poses[j], kp_j[good[:, 1]])
        if np.median(angles) < config.min_pair_angle_deg:
            low_parallax += 1
            continue
        n_verified += len(good)
        edges.append(np.column_stack([np.full(len(good), i), good[:, 0], np.full(len(good), j), good[:, 1]]))
    stats.update(matches=n_matches, verified_matches=n_verified, pairs_low_parallax=low_parallax)
    return np.concatenate(edges) if edges else np.zeros((0, 4), np.int64)


def make_pair_matcher(matcher: Matcher | None, feature_config, config: TriangulationConfig) -> PairMatcher:
    """The given descriptor matcher, else epipolar-guided matching (``config.guided_matching``) or plain matching."""
    if matcher is not None:
        return lambda desc_a, desc_b, kp_a, kp_b, F: matcher(desc_a, desc_b)
    if not config.guided_matching:
        from .features import match_features

        return lambda desc_a, desc_b, kp_a, kp_b, F: match_features(desc_a, desc_b, feature_config)
    return lambda desc_a, desc_b, kp_a, kp_b, F: epipolar_guided_matches(
        desc_a, desc_b, kp_a, kp_b, F, feature_config, config.max_epipolar_px)


def epipolar_guided_matches(desc_a, desc_b, kp_a, kp_b, F, feature_config=None, max_epipolar_px: float = 2.0) -> np.ndarray:
    """Matches ``(K, 2)`` of two images with known relative pose (``x_b^T F x_a = 0``).

    Each feature is compared only with the features of the other image near its epipolar
    line (within ``max_epipolar_px``): the ratio test and mutual check run among those
    candidates, so a feature whose look-alikes lie elsewhere in the image (repeated
    texture, indoor scenes) is no longer ambiguous. The band's best must also be one of the
    two nearest descriptors in the whole image: a feature whose true match was not detected
    would otherwise take the least bad candidate of its band, a wrong point that two views
    cannot expose.
    """
    from .features import FeatureConfig, descriptor_distances, match_from_distances

    feature_config = feature_config or FeatureConfig()
    if len(desc_a) < 1 or len(desc_b) < 2:
        return np.zeros((0, 2), np.int64)
    distances, ratio = descriptor_distances(desc_a, desc_b, feature_config)
    second_overall = np.partition(distances, 1, axis=1)[:, 1]
    distances[epipolar_distance_matrix(F, kp_a, kp_b) > max_epipolar_px] = np.inf
    best = distances.min(axis=1)
    matches = match_from_distances(distances, ratio, feature_config.mutual)
    return matches[best[matches[:, 0]] <= second_overall[matches[:, 0]]]


def select_pairs(poses: np.ndarray, config: TriangulationConfig) -> list[tuple[int, int]]:
    """Keyframe pairs (i < j) to match: each keyframe's nearest views that look the same way."""
    centres = poses[:, :3, 3]
    axes = poses[:, :3, 2]
    dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    cos_axes = np.clip(axes @ axes.T, -1.0, 1.0)
    usable = (cos_axes >= math.cos(math.radians(config.max_pair_axis_angle_deg))) & (dist >= config.min_baseline_m)
    usable &= dist > 0.0
    pairs = set()
    for i in range(len(poses)):
        candidates = np.flatnonzero(usable[i])
        for j in candidates[np.argsort(dist[i, candidates], kind="stable")][: config.pairs_per_image]:
            pairs.add((min(i, int(j)), max(i, int(j))))
    return sorted(pairs)


def fundamental_from_poses(K_a: np.ndarray, T_a: np.ndarray, K_b: np.ndarray, T_b: np.ndarray) -> np.ndarray:
    """F with ``x_b^T F x_a = 0`` for two cameras given as K and camera-to-world poses."""
    R_ba = T_b[:3, :3].T @ T_a[:3, :3]
    t_ba = T_b[:3, :3].T @ (T_a[:3, 3] - T_b[:3, 3])
    return np.linalg.inv(K_b).T @ skew(t_ba) @ R_ba @ np.linalg.inv(K_a)


def epipolar_distance_matrix(F: np.ndarray, x_a: np.ndarray, x_b: np.ndarray) -> np.ndarray:
    """(Na, Nb) float32 symmetric epipolar distance (px) of every point of image a with every point
    of image b (float32 and in place: 4000 x 4000 features stay at a few 64 MB matrices)."""
    ha = np.column_stack([x_a, np.ones(len(x_a))])
    hb = np.column_stack([x_b, np.ones(len(x_b))])
    line_b = ha @ F.T  # epipolar lines of x_a in image b
    line_a = hb @ F  # epipolar lines of x_b in image a
    num = np.abs(line_b.astype(np.float32) @ hb.T.astype(np.float32))
    d_a = num / np.maximum(np.hypot(line_a[:, 0], line_a[:, 1]), 1e-12).astype(np.float32)[None, :]
    num /= np.maximum(np.hypot(line_b[:, 0], line_b[:, 1]), 1e-12).astype(np.float32)[:, None]
    return np.maximum(num, d_a, out=num)


def symmetric_epipolar_distance(F: np.ndarray, x_a: np.ndarray, x_b: np.ndarray) -> np.ndarray:
    """Larger of the two point-to-epipolar-line distances (px) of matched points (N, 2)."""
    ha = np.column_stack([x_a, np.ones(len(x_a))])
    hb = np.column_stack([x_b, np.ones(len(x_b))])
    line_b = ha @ F.T  # epipolar lines of x_a in image b
    line_a = hb @ F  # epipolar lines of x_b in image a
    num = np.abs(np.sum(hb * line_b, axis=1))
    d_b = num / np.maximum(np.hypot(line_b[:, 0], line_b[:, 1]), 1e-12)
    d_a = num / np.maximum(np.hypot(line_a[:, 0], line_a[:, 1]), 1e-12)
    return np.maximum(d_a, d_b)


def ray_angles_deg(K_a, T_a, x_a, K_b, T_b, x_b) -> np.ndarray:
    """Angle (degrees) between the world viewing rays of matched pixels (N, 2): for a
    correct match, the angle at which the two rays meet at the point (its two-view
    triangulation angle), known without triangulating."""
    def rays(K, T, x):
        h = np.column_stack([np.asarray(x, np.float64), np.ones(len(x))]) @ np.linalg.inv(K).T @ T[:3, :3].T
        return h / np.linalg.norm(h, axis=1, keepdims=True)

    cos = np.sum(rays(K_a, T_a, x_a) * rays(K_b, T_b, x_b), axis=1)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


# --------------------------------------------------------------------------- tracks
@dataclass
class Tracks:
    """Observations chained across keyframes, flat and grouped by track.

    Attributes:
        track_of, cams, feats: (K,) int64 per observation: its track, keyframe and
            feature index, sorted by track (then keyframe); at most one per keyframe
            and track, at least two per track.
        count: number of tracks.
        ambiguous: observations dropped because their keyframe had two features in the track.
    """

    track_of: np.ndarray
    cams: np.ndarray
    feats: np.ndarray
    count: int
    ambiguous: int

    def starts(self) -> np.ndarray:
        """(count,) index of each track's first observation."""
        return np.searchsorted(self.track_of, np.arange(self.count))

    def lengths(self) -> np.ndarray:
        return np.bincount(self.track_of, minlength=self.count)


def build_tracks(edges: np.ndarray, sizes: Sequence[int]) -> Tracks:
    """Chain matches ``(cam_a, feat_a, cam_b, feat_b)`` (K, 4) into :class:`Tracks` (union-find).

    A keyframe with two different features in one track is ambiguous there: all its
    observations of that track are dropped. Tracks left with fewer than two are omitted.
    """
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    parent = np.arange(offsets[-1], dtype=np.int64)

    def find(node: int) -> int:
        root = node
        while parent[root] != root:
            root = parent[root]
        while parent[node] != root:  # path compression
            parent[node], node = root, parent[node]
        return root

    for cam_a, feat_a, cam_b, feat_b in edges:
        ra, rb = find(offsets[cam_a] + feat_a), find(offsets[cam_b] + feat_b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    nodes = np.unique(np.concatenate([offsets[edges[:, 0]] + edges[:, 1], offsets[edges[:, 2]] + edges[:, 3]]))
    roots = np.array([find(int(n)) for n in nodes], dtype=np.int64)
    cams = np.searchsorted(offsets, nodes, side="right") - 1
    feats = nodes - offsets[cams]

    order = np.lexsort((cams, roots))
    roots, cams, feats = roots[order], cams[order], feats[order]
    _, first, counts = np.unique(roots * len(sizes) + cams, return_index=True, return_counts=True)
    single = first[counts == 1]
    ambiguous = int(np.sum(counts[counts > 1]))
    roots, cams, feats = roots[single], cams[single], feats[single]
    _, track_of, per_track = np.unique(roots, return_inverse=True, return_counts=True)
    enough = per_track[track_of] >= 2
    _, track_of = np.unique(track_of[enough], return_inverse=True)
    return Tracks(track_of.astype(np.int64), cams[enough], feats[enough], int(track_of.max(initial=-1)) + 1, ambiguous)


# --------------------------------------------------------------------------- points
def triangulate_dlt(
    obs_xy: np.ndarray, cams: np.ndarray, mask: np.ndarray, intrinsics: np.ndarray, poses: np.ndarray
) -> np.ndarray:
    """Linear multi-view triangulation of P tracks: (P, 3) points (NaN at infinity).

    ``obs_xy`` (P, L, 2) pixels, ``cams`` (P, L) keyframe indices, ``mask`` (P, L) valid.
    Rows are written in normalised camera coordinates relative to the mean camera
    centre, which keeps the SVD well conditioned at any image size and world offset.
    """
    if len(obs_xy) == 0:
        return np.zeros((0, 3))
    origin = poses[:, :3, 3].mean(axis=0)
    safe = np.where(mask, cams, 0)
    K_inv = np.linalg.inv(intrinsics)[safe]  # (P, L, 3, 3)
    rays = np.einsum("plij,plj->pli", K_inv, np.concatenate([obs_xy, np.ones(obs_xy.shape[:-1] + (1,))], -1))
    xn = rays[..., :2] / rays[..., 2:3]
    R_wc = np.transpose(poses[:, :3, :3], (0, 2, 1))[safe]  # world-to-camera rotation (P, L, 3, 3)
    t_wc = -np.einsum("plij,plj->pli", R_wc, poses[:, :3, 3][safe] - origin)
    Pm = np.concatenate([R_wc, t_wc[..., None]], axis=-1)  # (P, L, 3, 4)
    rows = np.stack(
        [xn[..., 0:1] * Pm[..., 2, :] - Pm[..., 0, :], xn[..., 1:2] * Pm[..., 2, :] - Pm[..., 1, :]], axis=2
    )  # (P, L, 2, 4)
    rows = rows * mask[..., None, None]
    A = rows.reshape(len(obs_xy), -1, 4)
    _, _, vt = np.linalg.svd(A)
    X = vt[:, -1, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        points = X[:, :3] / X[:, 3:4]
    points[np.abs(X[:, 3]) < 1e-12] = np.nan
    return points + origin


def reprojection(points: np.ndarray, cams: np.ndarray, intrinsics: np.ndarray, poses: np.ndarray):
    """Project points (P, 3) into cameras ``cams`` (P, L): (pixels (P, L, 2), depth (P, L), J (P, L, 2, 3)).

    ``J`` is the Jacobian of the pixel with respect to the world point.
    """
    safe = np.maximum(cams, 0)
    R_wc = np.transpose(poses[:, :3, :3], (0, 2, 1))[safe]
    Xc = np.einsum("plij,plj->pli", R_wc, points[:, None, :] - poses[:, :3, 3][safe])
    KX = np.einsum("plij,plj->pli", intrinsics[safe], Xc)
    z = KX[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_z = 1.0 / z
        pixels = KX[..., :2] * inv_z[..., None]
        d_pix = np.zeros(z.shape + (2, 3))
        d_pix[..., 0, 0] = inv_z
        d_pix[..., 1, 1] = inv_z
        d_pix[..., :, 2] = -pixels * inv_z[..., None]
    J = d_pix @ intrinsics[safe] @ R_wc
    return pixels, Xc[..., 2], J


def refine_points(
    points: np.ndarray, obs_xy: np.ndarray, cams: np.ndarray, mask: np.ndarray,
    intrinsics: np.ndarray, poses: np.ndarray, iterations: int,
) -> np.ndarray:
    """Gauss–Newton (Levenberg–Marquardt damped) on the pixel reprojection error, poses fixed."""
    points = points.copy()
    for _ in range(iterations):
        pixels, depth, J = reprojection(points, cams, intrinsics, poses)
        valid = mask & (depth > 0) & np.all(np.isfinite(pixels), axis=-1)
        r = np.where(valid[..., None], pixels - obs_xy, 0.0)
        J = np.where(valid[..., None, None], J, 0.0)
        H = np.einsum("plki,plkj->pij", J, J)
        g = np.einsum("plki,plk->pi", J, r)
        H = H + 1e-6 * np.trace(H, axis1=1, axis2=2)[:, None, None] * np.eye(3) + 1e-12 * np.eye(3)
        step = np.linalg.solve(H, -g[..., None])[..., 0]
        ok = np.all(np.isfinite(step), axis=1) & (valid.sum(axis=1) >= 2)
        points[ok] += step[ok]
        if np.max(np.abs(step[ok]), initial=0.0) < 1e-10:
            break
    return points


def max_ray_angle_deg(points: np.ndarray, cams: np.ndarray, mask: np.ndarray, poses: np.ndarray) -> np.ndarray:
    """Largest angle (degrees) between two viewing rays of each point."""
    rays = points[:, None, :] - poses[:, :3, 3][np.maximum(cams, 0)]
    rays /= np.maximum(np.linalg.norm(rays, axis=-1, keepdims=True), 1e-12)
    cos = np.einsum("pai,pbi->pab", rays, rays)
    both = mask[:, :, None] & mask[:, None, :]
    cos = np.where(both, cos, 1.0)
    return np.degrees(np.arccos(np.clip(cos.min(axis=(1, 2)), -1.0, 1.0)))


# Tracks are processed in blocks of equal length, at most this many (track x view x view)
# elements at a time: memory stays bounded whatever the number of keyframes and points.
_BLOCK_ELEMENTS = 2_000_000


def range_uncertainty(points, cams, mask, intrinsics, poses) -> np.ndarray:
    """Relative std of each point's distance to its cameras for 1 px of observation noise.

    The point's covariance for unit pixel noise is ``(JᵀJ)⁻¹`` (the refinement's normal
    equations, poses fixed); its spread along the direction from the mean camera centre,
    divided by that distance. Small angles, short focal lengths and few views all raise it.
    """
    _, depth, J = reprojection(points, cams, intrinsics, poses)
    J = np.where((mask & (depth > 0))[..., None, None], J, 0.0)
    H = np.einsum("plki,plkj->pij", J, J)
    centre = np.einsum("pl,pli->pi", mask, poses[:, :3, 3][np.maximum(cams, 0)]) / np.maximum(mask.sum(1), 1)[:, None]
    ray = points - centre
    distance = np.linalg.norm(ray, axis=1)
    u = ray / np.maximum(distance, 1e-12)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        # uᵀ H⁻¹ u via a solve; a singular H (a point on a line through the centres) is unbounded.
        ok = np.abs(np.linalg.det(H)) > 1e-300
        var = np.full(len(points), np.inf)
        if np.any(ok):
            var[ok] = np.einsum("pi,pi->p", u[ok], np.linalg.solve(H[ok], u[ok][..., None])[..., 0])
        rel = np.sqrt(np.maximum(var, 0.0)) / distance
    return np.where(np.isfinite(rel), rel, np.inf)


def _estimate_all(tracks: Tracks, obs_xy, intrinsics, poses, config):
    """Points of all tracks: (points (T, 3), observation kept (K,), error px (K,), angle (T,), counts)."""
    points = np.full((tracks.count, 3), np.nan)
    angles = np.zeros(tracks.count)
    uncertainty = np.full(tracks.count, np.inf)
    used = np.zeros(len(tracks.cams), bool)
    errors = np.full(len(tracks.cams), np.inf)
    reasons = {"dropped_outlier_observations": 0, "rejected_reprojection_or_cheirality": 0}
    starts, lengths = tracks.starts(), tracks.lengths()
    for length in np.unique(lengths):
        same = np.flatnonzero(lengths == length)
        for block in np.array_split(same, max(1, len(same) * length * length // _BLOCK_ELEMENTS)):
            flat = starts[block][:, None] + np.arange(length)  # (n, L) observation indices
            cams = tracks.cams[flat]
            p, mask, err, counts = _estimate_points(cams, obs_xy[flat], np.ones(cams.shape, bool),
                                                    intrinsics, poses, config)
            points[block], used[flat], errors[flat] = p, mask, err
            angles[block] = max_ray_angle_deg(p, cams, mask, poses)
            uncertainty[block] = range_uncertainty(p, cams, mask, intrinsics, poses)
            for key, value in counts.items():
                reasons[key] += value
    return points, used, errors, angles, uncertainty, reasons


def _estimate_points(cams, obs_xy, mask, intrinsics, poses, config, rounds: int = 3):
    """DLT + refinement of tracks (P, L); after each round the worst observation of every
    point that has one behind the camera or off by more than the threshold is dropped and
    the point estimated again (one at a time: a single outlier drags the point and makes
    its good observations look bad too)."""
    mask = mask.copy()
    dropped = 0
    for round_ in range(rounds):
        points = triangulate_dlt(obs_xy, cams, mask, intrinsics, poses)
        points = refine_points(points, obs_xy, cams, mask, intrinsics, poses, config.refine_iterations)
        pixels, depth, _ = reprojection(points, cams, intrinsics, poses)
        errors = np.linalg.norm(pixels - obs_xy, axis=-1)
        errors = np.where((depth > 0) & np.isfinite(errors), errors, np.inf)
        bad = np.any(mask & (errors > config.max_reproj_px), axis=1) & (mask.sum(axis=1) > 2)
        if round_ == rounds - 1 or not np.any(bad):
            break
        worst = np.argmax(np.where(mask, errors, -1.0), axis=1)
        mask[np.flatnonzero(bad), worst[bad]] = False
        dropped += int(bad.sum())
    reasons = {
        "dropped_outlier_observations": dropped,
        "rejected_reprojection_or_cheirality": int(
            np.sum(np.any(mask & (errors > config.max_reproj_px), axis=1) | (mask.sum(axis=1) < 2))
        ),
    }
    return points, mask, errors, reasons


def _keep_by_track_length(good, lengths, tracks: Tracks, used, n_keyframes, config) -> np.ndarray:
    """Points seen in ≥ ``min_track_length`` images, plus shorter ones where a keyframe needs them."""
    keep = good & (lengths >= config.min_track_length)
    if config.min_points_per_keyframe == 0:
        return keep
    t = tracks.track_of
    per_keyframe = np.bincount(tracks.cams[used & keep[t]], minlength=n_keyframes)
    needy = per_keyframe < config.min_points_per_keyframe
    short = good & ~keep
    rescued = np.unique(t[used & short[t] & needy[tracks.cams]])
    keep[rescued] = True
    return keep


def _checked_cameras(features, intrinsics, poses) -> tuple[np.ndarray, np.ndarray]:
    intrinsics = np.asarray(intrinsics, dtype=np.float64)
    poses = np.asarray(poses, dtype=np.float64)
    m = len(features)
    if m < 2:
        raise TriangulationError(f"triangulation needs at least 2 posed images, got {m}")
    if intrinsics.shape != (m, 3, 3) or poses.shape != (m, 4, 4):
        raise TriangulationError(
            f"expected intrinsics ({m}, 3, 3) and poses ({m}, 4, 4) for {m} images, "
            f"got {intrinsics.shape} and {poses.shape}"
        )
    if not (np.all(np.isfinite(intrinsics)) and np.all(np.isfinite(poses))):
        raise TriangulationError("intrinsics and poses must be finite")
    R = poses[:, :3, :3]
    if np.max(np.abs(R @ np.transpose(R, (0, 2, 1)) - np.eye(3)), initial=0.0) > 1e-4 or np.any(np.linalg.det(R) < 0):
        raise TriangulationError("pose rotations must be orthonormal with determinant +1 (camera-to-world)")
    if np.any(intrinsics[:, 0, 0] <= 0) or np.any(intrinsics[:, 1, 1] <= 0):
        raise TriangulationError("intrinsics must have positive focal lengths")
    for i, (kp, desc) in enumerate(features):
        kp = np.asarray(kp)
        if kp.ndim != 2 or kp.shape[1] != 2 or len(desc) != len(kp):
            raise TriangulationError(
                f"keyframe {i}: keypoints must be (N, 2) with N descriptors, got {kp.shape} and {len(desc)}"
            )
    return intrinsics, poses

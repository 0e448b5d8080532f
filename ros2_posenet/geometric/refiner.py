"""Geometric refinement of a pose prior against a scene map: features -> 2D–3D matches -> PnP-RANSAC.

(About 1030 lines: the refiner's attempts — prior, guided, retrieval, confirmations — share its
state and gate; the pose solvers, the geometric covariance and the focal check live in :mod:`.pnp`.)

The regressor says *where to look*; this stage makes the answer precise and knows
when it is wrong (ROS-free; shared by the node, ``evaluate --map`` and
``relocalize-bag --map``)::

    refiner = Refiner(SceneMap.load("scene.npz"), RefinementConfig())
    result = refiner.refine(rgb, K, prior_T, prior_covariance)   # RefinementResult
    if result.status == "refined": use result.T, result.covariance

Steps: the ``keyframes`` map keyframes nearest to the prior (position + viewing
direction) -> the query's local features (the map's own feature config) matched
to each keyframe's (ratio test + mutual check) -> 2D–3D correspondences ->
absolute pose by LO-RANSAC + non-linear refinement (``solver``: pycolmap by
default, poselib or OpenCV USAC) -> covariance from the geometry -> gate against
the prior. Without a prior, or when the prior's keyframes give too few inliers,
keyframes are retrieved (``retrieval``: the bag of visual words of the image's features,
the best candidates re-ranked by their matches with it, as hloc does). A pose the gate refused is
kept only when keyframes that did not produce it give the same pose on their own:
first those around the refused pose (``neighbourhood_confirms``), then those
retrieved by appearance (``retrieval_confirms``). A regressor's errors are
heavy-tailed and its covariance is over-confident on the tail (Sattler et al., CVPR
2019), so the gate alone would throw away right answers exactly where the prior
needs them most; an independent second estimate tells a wrong prior from wrong
geometry. A pose that stands but was made by keyframes other than those nearest it is
solved again with their points too, matched where it projects them (``local_refinement``).

``status`` is ``refined`` or ``fallback``; a fallback returns the prior's pose and
covariance unchanged, says why in ``reason`` (for people) and ``failure`` (one of
:data:`FAILURES`, for counters).

A wrong calibration makes a confident, wrong pose: a focal length 3 % too long moves
the camera ~17 cm along its axis with every inlier still within a pixel, and the
covariance, which trusts K, says 5 mm. So every pose is also estimated with the focal
length unknown (P4Pf LO-RANSAC + refinement, pycolmap); when the focal length the
image's matches imply differs from K's by more than ``max_focal_error`` (and by more
than ``gate_sigma`` of its own uncertainty), the frame falls back with failure
``calibration`` and ``focal_ratio`` says by how much (bench/RESULTS.md).

Covariance: the unit covariance ``σ² (JᵀJ)⁻¹``, with ``J`` the Jacobian of the inliers'
pixel residuals with respect to the camera centre (map frame) and a small rotation about
the map axes (the order and convention of :mod:`ros2_posenet.covariance`: x, y, z,
roll, pitch, yaw) and ``σ²`` the inliers' residual variance, put through the map's
:class:`~ros2_posenet.covariance.CovarianceModel` (scale + floor per block, cross terms
weighted), calibrated on held-out images when the map is built (:func:`calibrate_covariance`).
"""
from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Annotated, Iterable, Literal

import cv2
import numpy as np
from pydantic import ConfigDict, Field

from ..config_base import parse_yaml
from ..covariance import CovarianceModel, calibration_metrics, fit_covariance_model
from ..geometry import matrix_to_pose
from ..preprocess import check_rgb_image
from .features import FeatureConfig, detect_features, match_features, query_feature_config
from .matching import guided_matches
from .views import QueryView, view_agreement
from .pnp import (
    SOLVERS, FocalHistory, estimate_focal_ratio, focal_scatter, geometric_covariance, mahalanobis, pose_difference,
    require_solver, solve_absolute_pose,
)
from .scene_map import SceneMap
from .settings import GeometricSettings
from .tracking import TrackedPrior

log = logging.getLogger(__name__)

STATUS_REFINED = "refined"
STATUS_FALLBACK = "fallback"
# RefinementResult.failure of a fallback (the node counts them; "" when refined).
FAILURE_NO_KEYFRAMES = "no_keyframes"        # no keyframe looks the way the prior does (or none retrieved)
FAILURE_NO_FEATURES = "no_features"          # fewer than 6 features in the image
FAILURE_TOO_FEW_INLIERS = "too_few_inliers"  # below min_inliers (retrieval: retrieval_min_inliers)
FAILURE_INLIER_RATIO = "inlier_ratio"        # enough inliers, but below min_inlier_ratio of the matches
FAILURE_GATE = "gate"                        # disagrees with the prior and nothing else confirmed it
FAILURE_MAX_CORRECTION = "max_correction"    # beyond max_correction_m / max_correction_deg
FAILURE_CALIBRATION = "calibration"          # the image's matches imply another focal length than K's
FAILURES = (FAILURE_NO_KEYFRAMES, FAILURE_NO_FEATURES, FAILURE_TOO_FEW_INLIERS, FAILURE_INLIER_RATIO,
            FAILURE_GATE, FAILURE_MAX_CORRECTION, FAILURE_CALIBRATION)


# An inlier count: a pose has 6 degrees of freedom.
_PoseInliers = Annotated[int, Field(ge=6)]


class RefinementConfig(GeometricSettings):
    """Settings of the geometric stage (node parameters ``refine.<field>``).

    Attributes:
        keyframes: keyframes matched per attempt.
        metres_per_radian: keyframe distance = centre distance + this × angle between views.
        max_keyframe_angle_deg: keyframes looking further away from the prior are not used.
        solver: ``pycolmap`` (LO-RANSAC + Ceres refinement), ``poselib`` or ``opencv``
            (USAC MAGSAC++ + Levenberg–Marquardt); see bench/RESULTS.md for why the default.
        ransac_threshold_px: inlier reprojection threshold in query pixels.
        min_inliers: fewer inliers -> fallback.
        min_inlier_ratio: inliers / correspondences below this -> fallback.
        gate_sigma: the refined pose may differ from the prior by at most this many
            standard deviations of (prior + refined) covariance, in position and in
            rotation (Mahalanobis distance, 3 dof each).
        max_correction_m, max_correction_deg: absolute caps on the correction (0: none).
        default_prior_std_m, default_prior_std_deg: prior uncertainty assumed when the
            caller gives no prior covariance.
        retrieval: when the prior's keyframes fail (or there is no prior), try the
            keyframes most similar in appearance. A pose found this way is not gated
            by the prior (the prior was wrong) and has ``source = 'retrieval'``.
        retrieval_keyframes: keyframes retrieved per attempt.
        retrieval_candidates: the keyframes ranked best by the bag of visual words of the
            image's features (:meth:`SceneMap.retrieve_keyframes`) that are matched with the
            image to re-rank them by their number of matches, of which the best
            ``retrieval_keyframes`` are tried (0: no re-ranking).
        retrieval_min_inliers: the inliers a pose needs where nothing vouches for fewer: a retrieval
            answer (no prior to agree with), and one from the keyframes of a prior wider than
            ``default_prior_std_m`` / ``default_prior_std_deg`` in some direction (a regressor's
            covariance on real data, 1.7 m / 48° on hololens-office, lets the gate pass any pose,
            and it passed one 1 m off made of 38 chance inliers).
        neighbourhood_confirms: a pose the gate refused is accepted (``source =
            'neighbourhood'``) when the ``keyframes`` keyframes nearest to *it*, none of
            those that produced it, give the same pose on their own (``min_inliers``,
            agreement within ``gate_sigma`` of the two covariances): then the prior, not
            the geometry, was wrong (a regressor's gross errors often come with an
            over-confident covariance). A pose made by chance matches elsewhere has no
            keyframes around it that see the query. Never past ``max_correction_m/deg``.
        retrieval_confirms: the same with keyframes retrieved by appearance
            (``source = 'retrieval'``, ``retrieval_min_inliers``), tried when the
            neighbourhood did not confirm. Both off: every gated pose is a fallback. It also
            lets the next best searched keyframes confirm a searched pose (``search_candidates``).
        search_candidates: the last resort when every attempt failed: the next best keyframes by
            the bag of words, up to this many (a small map's all), are re-ranked by their matches
            with the image and the best ``retrieval_keyframes`` tried (``source = 'search'``). The
            right keyframes of a hard real image can rank 20th-180th by the bag of words and 1st by
            matches. A pose found this way is accepted only when independent keyframes give the
            same pose (as ``confirm_few_inliers``: the next ``retrieval_keyframes`` by their matches
            if ``retrieval_confirms``, else the keyframes around it), whatever its inliers (unless it
            stands alone, ``search_alone_inliers``): so wide a search meets chance poses of 50 inliers
            (bench/RESULTS.md). 0 or ``retrieval`` off: no
            search; each keyframe costs ~1.5 ms (2 cores).
        search_alone_inliers: a searched pose of at least this many inliers stands without that
            confirmation when the keyframes around it give no pose at all (they see too little of the
            image: the searched keyframes were the only ones that do) and no other searched keyframes
            gave another pose; keyframes that give another pose still refuse it (a misregistered part
            of the map). 1.5× ``retrieval_min_inliers``: the most inliers a wrong searched pose had on
            hololens-office's validation blocks was 53 (bench/RESULTS.md). 0: every searched pose needs
            its confirmation; needs ``neighbourhood_confirms``.
        wide_prior_cross_check: a pose from the keyframes of a prior too wide for the gate to
            vouch for it (:meth:`Refiner._prior_is_wide`, a regressor's on real data) is compared
            with retrieval's; where the two disagree, the pose of more inliers stands. Repeated
            structure (two identical doors 1 m apart) gives a wrong pose of 81 inliers from the
            keyframes that see the other door, where the right keyframes give 223
            (bench/RESULTS.md). Costs a retrieval on such frames (~50 ms on 2 cores with a 2000-feature
            depth map, ~350 ms with a 4000-feature triangulated one); needs ``retrieval``.
        confirm_few_inliers: a pose with at least ``min_inliers`` but fewer than
            ``retrieval_min_inliers`` inliers, where only those would do (retrieval, a wide
            prior), is accepted when an independent set of keyframes gives the same pose
            (the other attempt's, else the ``keyframes`` keyframes around it; agreement
            within ``gate_sigma``): chance poses of 26-38 inliers exist on real data, two
            that agree do not (bench/RESULTS.md).
        covariance_scale: factor on the geometric covariance instead of the map's calibration
            (no floor); 0 = the map's calibrated model (the unit covariance without one).
        min_position_std, min_rotation_std_deg: floors of the reported standard deviations.
        max_focal_error: largest relative difference between the focal length the matches
            imply (pose and focal estimated together) and K's before the frame falls back
            with failure ``calibration`` (it must also exceed ``gate_sigma`` standard
            deviations of that estimate, inflated by the spread of the recent frames'
            estimates and, once there are enough of them, at least the place-to-place scatter of
            right poses' estimates that the map's calibration measured (``focal_scatter``),
            :class:`FocalHistory`); 0: no check. Needs pycolmap.
        guided_matching: when a pose is found with at least ``guided_min_inliers`` but
            fewer than the inliers needed, the 3D points of the ``2 × keyframes`` keyframes
            nearest to it are projected into the image and matched within
            ``guided_window_px`` of their projection (ratio test ``guided_ratio`` among
            those), and the pose is solved again; the result passes every check as usual.
        local_refinement: a pose that keyframes other than the ``keyframes`` nearest it made
            (far keyframes of a wrong prior, retrieval's, the search's) is solved again from its
            inliers and those nearest keyframes' points, matched where it projects them (guided
            matching); it stands with more inliers and within ``gate_sigma`` of the first.
            Chosen on hololens-office's validation blocks: triangulated map p90 0.069 → 0.060 m,
            depth map median 0.023 m / 0.46° → 0.022 m / 0.42°; the synthetic room (exact truth)
            5.6 → 5.0 mm (depth map), 5.8 → 4.9 mm (triangulated) (bench/RESULTS.md).
        photometric_min_ncc: a pose of fewer inliers than its source needs (down to
            ``photometric_min_inliers``) becomes a candidate when the image looks like the map there:
            the keyframe views nearest the pose (``photometric_keyframes``), moved into the
            image by their depth (a triangulated map's: around its points), correlate with it at least this much (normalised cross-correlation,
            the best keyframe's; :mod:`.views`). Like a pose of ``confirm_few_inliers``, other keyframes
            that give the same pose confirm it and keyframes that give another refuse it; where the
            keyframes around it see too little to do either, its look vouches for it. It then passes
            the focal check. Chosen on hololens-office's validation blocks: right poses reach 0.8-0.96,
            chance poses metres away at most 0.75; poses 0.2-0.4 m off can look right too, which is why
            keyframes that disagree still decide (bench/RESULTS.md). 0, or a map without views
            (reconstruction, older maps): off.
        query_max_image_size: the query image is shrunk to at most this many pixels on its
            longer side before its features are detected (keypoints scaled back; 0: as the
            map's ``FeatureConfig.max_image_size``). SIFT's time follows the pixel count: 560
            (the default) makes a 640x480 frame ~1.15x faster (>= 15 Hz on 2 cores) at the same
            accuracy; 480 ~1.4x, less accurate; larger images lose more (bench/RESULTS.md, issue 24 item 8).
        retry_contrast_threshold: the last resort of a frame that saw the map with too few matches
            or inliers (low texture, blur, dim light): its SIFT features are detected again at this
            lower contrast threshold (more, weaker features) and every attempt, confirmation and the
            search is made again from the same keyframes; the pose passes every check as usual. Not
            after the gate or the focal check refused the frame (more features would
            not change that). 0 (or ORB, or not below the map's threshold): off. Costs a second pass
            on such frames only (about 1 s on 2 cores on hololens-office, search included).
        tracking_max_gap_s: an image stream's last verified pose is the first prior of its
            frames for this long (:class:`~.tracking.Track`, the node and relocalize-bag; 0: off).
        tracking_speed_m_s, tracking_turn_deg_s: the fastest the camera is expected to move and
            turn: that prior's standard deviation grows by these times its age.
    """

    model_config = ConfigDict(title="refinement config")  # the prefix of from_dict's errors

    keyframes: int = Field(4, ge=1)
    metres_per_radian: float = Field(1.0, gt=0)
    max_keyframe_angle_deg: float = Field(60.0, gt=0, le=180)
    solver: Literal[SOLVERS] = "pycolmap"
    ransac_threshold_px: float = Field(4.0, gt=0)
    min_inliers: _PoseInliers = 30
    min_inlier_ratio: float = Field(0.15, ge=0, le=1)
    gate_sigma: float = Field(4.0, gt=0)
    max_correction_m: float = Field(0.0, ge=0)
    max_correction_deg: float = Field(0.0, ge=0)
    default_prior_std_m: float = Field(0.5, gt=0)
    default_prior_std_deg: float = Field(10.0, gt=0)
    retrieval: bool = True
    retrieval_keyframes: int = Field(8, ge=1)
    retrieval_candidates: int = Field(20, ge=0)
    retrieval_min_inliers: _PoseInliers = 50
    search_candidates: int = Field(250, ge=0)
    search_alone_inliers: int = Field(75, ge=0)
    neighbourhood_confirms: bool = True
    retrieval_confirms: bool = True
    confirm_few_inliers: bool = True
    wide_prior_cross_check: bool = True
    covariance_scale: float = Field(0.0, ge=0)
    min_position_std: float = Field(0.002, ge=0)
    min_rotation_std_deg: float = Field(0.05, ge=0)
    max_focal_error: float = Field(0.02, ge=0)
    guided_matching: bool = True
    guided_min_inliers: _PoseInliers = 8
    guided_window_px: float = Field(12.0, gt=0)
    guided_ratio: float = Field(0.9, gt=0, le=1)
    local_refinement: bool = True
    photometric_min_ncc: float = Field(0.85, ge=0, le=1)
    photometric_min_inliers: _PoseInliers = 12
    photometric_keyframes: int = Field(3, ge=1)
    query_max_image_size: int = Field(560, ge=0)
    retry_contrast_threshold: float = Field(0.01, ge=0, lt=1)
    tracking_max_gap_s: float = Field(1.0, ge=0)
    tracking_speed_m_s: float = Field(1.5, gt=0)
    tracking_turn_deg_s: float = Field(90.0, gt=0)

    @classmethod
    def from_yaml(cls, path) -> "RefinementConfig":
        """From a YAML mapping of the fields (config/refine.yaml), read as the configs are (``2e-3`` is a number);
        ``ValueError`` names the file."""
        import yaml

        try:
            data = parse_yaml(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"cannot read refinement config {path}: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of RefinementConfig fields")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None


@dataclass
class RefinementResult:
    """Outcome of :meth:`Refiner.refine`.

    Attributes:
        status: ``refined`` or ``fallback``.
        reason: why (always set; for ``refined``, how: e.g. "120 inliers from 4 keyframes").
        T: (4, 4) camera-to-world pose (the prior's on fallback; without a prior, the
            best retrieved keyframe's).
        covariance: (6, 6) x y z roll pitch yaw (map axes), the prior's on fallback
            (None if none was given).
        inliers: RANSAC inliers of the estimate (0 if none).
        matches: 2D–3D correspondences tried.
        keyframes_used: map keyframe indices matched, in order.
        source: which keyframes gave the pose: ``prior`` (near the prior), ``neighbourhood``
            (near a pose the gate refused, confirming it) or ``retrieval`` (by appearance).
        timing_ms: ``features``, ``matching``, ``pose``, ``total``.
        correction: position (m) and rotation (deg) difference refined vs prior (NaN without prior / estimate).
        failure: for a fallback, what failed (one of :data:`FAILURES`); ``""`` when refined.
        focal_ratio: focal length the matches imply ÷ K's (NaN when not checked): 0.91 means
            K's focal length is 10 % too long.
        attempts: ``(source, keyframes)`` of every matching attempt, in order.
    """

    status: str
    reason: str
    T: np.ndarray
    covariance: np.ndarray | None
    inliers: int = 0
    matches: int = 0
    keyframes_used: list[int] = field(default_factory=list)
    source: str = "prior"
    timing_ms: dict = field(default_factory=dict)
    correction: tuple[float, float] = (float("nan"), float("nan"))
    failure: str = ""
    focal_ratio: float = float("nan")
    attempts: list[tuple[str, list[int]]] = field(default_factory=list)

    @property
    def refined(self) -> bool:
        return self.status == STATUS_REFINED

    @property
    def position(self) -> np.ndarray:
        """(3,) camera centre in the map frame."""
        return self.T[:3, 3].copy()

    @property
    def quaternion(self) -> np.ndarray:
        """(4,) w, x, y, z camera-to-world, ``w >= 0`` (as :class:`~ros2_posenet.inference.PosePrediction`)."""
        return matrix_to_pose(self.T)[1]


# ----------------------------------------------------------------------------- the refiner


def _check_inputs(rgb, K, prior_T, prior_covariance):
    check_rgb_image(rgb)
    K = np.asarray(K, np.float64)
    if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"K must be a finite 3x3 intrinsics matrix with positive focal lengths, got {K.tolist()}")
    if prior_T is not None:
        prior_T = np.asarray(prior_T, np.float64)
        R = prior_T[:3, :3] if prior_T.shape == (4, 4) else None
        if R is None or not np.all(np.isfinite(prior_T)) or np.abs(R @ R.T - np.eye(3)).max() > 1e-3:
            raise ValueError("prior_T must be a finite rigid 4x4 camera-to-world matrix")
    if prior_covariance is not None:
        prior_covariance = np.asarray(prior_covariance, np.float64)
        if prior_covariance.shape != (6, 6) or not np.all(np.isfinite(prior_covariance)):
            raise ValueError("prior_covariance must be a finite 6x6 matrix (x y z roll pitch yaw)")
    return K, prior_T, prior_covariance


class Refiner:
    """Refines pose priors against one :class:`SceneMap` (thread-safe; its one state is the recent focal ratios, :class:`FocalHistory`).

    ``prepare``: learn what retrieval needs (the map's bag of visual words, ~10 s on 2 cores for a
    1000-keyframe map) now rather than in the first frame that retrieves; False leaves it to
    :meth:`prepare_retrieval` (the node's refiner process: it reports ready first).
    """

    def __init__(self, scene_map: SceneMap, config: RefinementConfig | None = None, prepare: bool = True):
        self.map = scene_map
        self.config = config or RefinementConfig()
        require_solver(self.config.solver)
        self.covariance_model = map_covariance_model(scene_map, self.config)
        self._focal_check = bool(self.config.max_focal_error)
        self._focal_history = FocalHistory()
        # How far right poses' focal estimates scatter on this map (its calibration measured it; 0: an older map).
        self._focal_scatter = float((scene_map.metadata.get("calibration") or {}).get("focal_scatter") or 0.0)
        self._query_features = query_feature_config(scene_map.feature_config, self.config.query_max_image_size)
        self._retry_features = retry_feature_config(self._query_features, self.config.retry_contrast_threshold)
        if prepare:
            self.prepare_retrieval()
        if self._focal_check and self.config.solver != "pycolmap":
            try:
                import pycolmap  # noqa: F401 - the focal check's P4Pf solver
            except ImportError:
                log.warning("max_focal_error: pycolmap is not installed, the camera's focal length is not checked")
                self._focal_check = False

    def prepare_retrieval(self) -> None:
        """Learn the map's bag of visual words now if retrieval will need it (once per map)."""
        if self.config.retrieval and self.map.num_points >= 2:
            self.map.visual_words  # noqa: B018 - a cached property: learned here, not by the first frame that retrieves

    def refine(self, rgb: np.ndarray, K: np.ndarray, prior_T: np.ndarray | None = None,
               prior_covariance: np.ndarray | None = None, tracked: TrackedPrior | None = None) -> RefinementResult:
        """Refine ``prior_T`` (camera-to-world, optical frame, map frame) for image ``rgb``.

        Args:
            rgb: HxWx3 uint8 RGB query image.
            K: (3, 3) intrinsics of ``rgb``.
            prior_T: (4, 4) prior pose (e.g. the regressor's); None = retrieval only.
            prior_covariance: (6, 6) x y z roll pitch yaw of the prior; None = the
                config's default prior std for the gate, and None on fallback.
            tracked: the stream's last verified pose as a prior (:class:`~.tracking.Track`),
                tried first, with its own gate; failing that, ``prior_T`` as usual.

        Raises:
            ValueError: malformed arguments only. Data-dependent failures (no features,
            too few inliers, disagreement) return ``status='fallback'``.
        """
        start = time.perf_counter()
        K, prior_T, prior_covariance = _check_inputs(rgb, K, prior_T, prior_covariance)
        cfg = self.config
        if prior_T is None and not cfg.retrieval:
            raise ValueError("refine needs a prior pose when retrieval is off (RefinementConfig.retrieval)")
        timing = {"features": 0.0, "matching": 0.0, "pose": 0.0}
        size = (rgb.shape[1], rgb.shape[0])

        tried: list[int] = []
        attempts: list[tuple[str, list[int]]] = []
        outcome = self._refine_with(self._query_features, rgb, K, size, prior_T, prior_covariance, tracked, timing, tried, attempts)
        if self._retry_features is not None and _weaker_features_may_help(outcome):
            # The last resort: the image's weaker features too (low texture, blur), every attempt again, from the
            # same keyframes (their matches change with the features).
            tried_again: list[int] = []
            again = self._refine_with(self._retry_features, rgb, K, size, prior_T, prior_covariance, tracked, timing,
                                      tried_again, attempts)
            tried.extend(tried_again)
            retry = f"SIFT contrast threshold {self.config.retry_contrast_threshold:g}"
            outcome = ({**again, "reason": f"{again['reason']} (features again at the {retry})"} if again["ok"] else
                       {**outcome, "reason": f"{outcome['reason']}; features again at the {retry}: {again['reason']}"})
        timing["total"] = (time.perf_counter() - start) * 1e3
        return self._result(outcome, prior_T, prior_covariance, timing, tried, attempts)

    # ---- internals

    def _refine_with(self, features, rgb, K, size, prior_T, prior_covariance, tracked, timing, tried, attempts) -> dict:
        """Every attempt, confirmation and the search on ``rgb``'s features detected with ``features``: the outcome."""
        cfg = self.config
        t0 = time.perf_counter()
        query = _Query(*detect_features(rgb, features), image=rgb, K=K)
        timing["features"] += (time.perf_counter() - t0) * 1e3
        retrieve = lambda candidates=None: self._retrieve(rgb, query, tried, timing, candidates)  # noqa: E731
        attempt = lambda source, keyframes, previous=None: self._attempt(  # noqa: E731
            source, keyframes, query, K, size, prior_T, prior_covariance, timing, tried, previous, attempts)
        followed = self._follow(tracked, query, K, size, timing, tried, attempts)
        outcomes = [followed]
        if followed is not None and followed["ok"]:
            outcome = followed
        elif prior_T is not None:
            outcome = attempt("prior", self.map.nearest_keyframes(
                prior_T, cfg.keyframes, cfg.metres_per_radian, cfg.max_keyframe_angle_deg), previous=followed)
            outcomes.append(outcome)
            if outcome.get("gated") and not outcome.get("capped"):
                outcome = self._confirm_refused(outcome, attempt, retrieve, tried)
            elif cfg.retrieval and _other_keyframes_may_help(outcome):
                outcome = attempt("retrieval", retrieve(), previous=outcome)
                outcomes.append(outcome)
            elif outcome["ok"] and cfg.retrieval and cfg.wide_prior_cross_check and self._prior_is_wide(prior_covariance):
                outcome = self._cross_check(outcome, attempt, retrieve)
        else:
            outcome = attempt("retrieval", retrieve())
            outcomes.append(outcome)
        candidates = [o for o in outcomes if o is not None and o.get("unvouched") is not None]
        if not outcome["ok"] and not outcome.get("gated") and candidates:
            outcome = self._confirm_candidates(candidates, outcome, attempt, tried, K, size)
        if cfg.retrieval and cfg.search_candidates and _other_keyframes_may_help(outcome):
            outcome = self._search(outcome, attempt, retrieve, tried, K, size)
        if outcome["ok"] and cfg.local_refinement and outcome.get("support") is not None:
            outcome = self._refine_locally(outcome, query, K, size, timing, tried)
        return outcome

    def _refine_locally(self, outcome: dict, query: "_Query", K, size, timing, tried: list[int]) -> dict:
        """``outcome``'s pose solved again with the points of the ``keyframes`` keyframes nearest it
        (``local_refinement``), where other keyframes made it (far keyframes of a wrong prior, retrieval's).

        Those keyframes' points are matched where the pose projects them (guided matching) and
        joined to the pose's own inliers: far keyframes see the place at a slant, and a
        triangulated map's points seen from afar are its least precise. The new pose stands only
        with more inliers, and where it agrees with the first within ``gate_sigma``.
        """
        cfg = self.config
        near = self.map.nearest_keyframes(outcome["T"], cfg.keyframes, cfg.metres_per_radian, cfg.max_keyframe_angle_deg)
        if {int(k) for k in near} <= set(outcome["keyframes"]):
            return outcome
        tried.extend(int(k) for k in near)
        g2d, g3d = self._guided_correspondences(outcome["T"], K, size, near, query, timing)
        own2d, own3d = outcome["support"]
        t0 = time.perf_counter()
        fresh = _not_in(g2d, own2d)  # a feature keeps its own match
        p2d, p3d = np.concatenate([own2d, g2d[fresh]]), np.concatenate([own3d, g3d[fresh]])
        T, inliers = solve_absolute_pose(p2d, p3d, K, size, cfg.ransac_threshold_px, cfg.solver)
        timing["pose"] += (time.perf_counter() - t0) * 1e3
        n_in = int(inliers.sum())
        if T is None or n_in <= outcome["inliers"]:
            return outcome
        local = {"T": T, "covariance": self._covariance(T, K, p2d[inliers], p3d[inliers])}
        if not self._agree(outcome, local):
            return outcome
        return {**outcome, **local, "inliers": n_in, "matches": len(p2d),
                "reason": f"{outcome['reason']}; {n_in} inliers with the {len(near)} keyframes nearest the pose too"}

    def _follow(self, tracked: TrackedPrior | None, query: "_Query", K, size, timing, tried, attempts) -> dict | None:
        """The pose from the keyframes nearest the tracked prior, gated by it (None without a track)."""
        if tracked is None:
            return None
        cfg = self.config
        keyframes = self.map.nearest_keyframes(tracked.T, cfg.keyframes, cfg.metres_per_radian, cfg.max_keyframe_angle_deg)
        # Refused by its gate, or too few inliers: the track is lost, and the regressor's prior decides.
        return self._attempt("tracking", keyframes, query, K, size, tracked.T, tracked.covariance, timing, tried,
                             attempts=attempts)

    def _matches(self, query: "_Query", keyframe: int) -> np.ndarray:
        """The query's matches with ``keyframe`` (:func:`match_features`), computed once per image: retrieval's
        re-ranking, the attempts and the confirmations ask for the same keyframes again."""
        keyframe = int(keyframe)
        if keyframe not in query.matches:
            query.matches[keyframe] = match_features(query.descriptors, self.map.descriptors[keyframe], self.map.feature_config)
        return query.matches[keyframe]

    def _retrieve(self, rgb: np.ndarray, query: "_Query", exclude: list[int], timing: dict,
                  candidates: int | None = None) -> np.ndarray:
        """The ``retrieval_keyframes`` keyframes most likely to see ``rgb`` that are not in ``exclude``.

        Ranked by the bag of visual words of the image's features, then the best
        ``candidates`` (default ``retrieval_candidates``) re-ranked by how many of the image's
        features they match (what the pose will be made of: hloc's retrieval + matching, with
        the matches as the verification of the ranking).
        """
        cfg = self.config
        candidates = cfg.retrieval_candidates if candidates is None else candidates
        k = max(cfg.retrieval_keyframes, candidates)
        if query.ranking is None:  # once per image: retrieval, its confirmations and the search all ask
            query.ranking = self.map.retrieve_keyframes(rgb, len(self.map), query.descriptors)
        ranked = _untried(query.ranking, exclude, k)
        if candidates > cfg.retrieval_keyframes and len(query.descriptors):
            t0 = time.perf_counter()
            counts = [len(self._matches(query, i)) for i in ranked]
            ranked = ranked[np.argsort(-np.array(counts), kind="stable")]
            timing["matching"] += (time.perf_counter() - t0) * 1e3
        return ranked[:cfg.retrieval_keyframes]

    def _guided_correspondences(self, T, K, size, keyframes, query: "_Query", timing):
        """2D–3D correspondences found where a pose says they must be (guided matching).

        The 3D points of ``keyframes`` are projected into the query with ``T``; each query
        feature is matched among the projections within ``guided_window_px`` of it (ratio
        test ``guided_ratio`` among those, mutual check). The window replaces most of the
        ratio test's work, so far more correct matches survive than by appearance alone.
        """
        t0 = time.perf_counter()
        cfg = self.config
        if len(keyframes) == 0:  # a wild intermediate pose can look away from every keyframe
            return np.zeros((0, 2)), np.zeros((0, 3))
        points = np.concatenate([self.map.points3d[k] for k in keyframes]).astype(np.float64)
        map_desc = np.concatenate([self.map.descriptors[k] for k in keyframes])
        cam = (points - T[:3, 3]) @ T[:3, :3]
        z = cam[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = cam[:, :2] / z[:, None] @ np.diag([K[0, 0], K[1, 1]]) + K[:2, 2]
        visible = (z > 0.05) & np.all((uv > -0.5) & (uv < np.array(size) - 0.5), axis=1)
        points, map_desc, uv = points[visible], map_desc[visible], uv[visible]
        if len(points) < 2 or len(query.keypoints) == 0:
            timing["matching"] += (time.perf_counter() - t0) * 1e3
            return np.zeros((0, 2)), np.zeros((0, 3))
        pairs = guided_matches(query.keypoints, query.descriptors, uv, map_desc, cfg.guided_window_px, self.map.feature_config,
                               cfg.guided_ratio)
        timing["matching"] += (time.perf_counter() - t0) * 1e3
        return query.keypoints[pairs[:, 0]].astype(np.float64), points[pairs[:, 1]]

    def _correspondences(self, keyframes, query: "_Query", timing):
        """2D–3D correspondences: each query feature's match in the first keyframe that has one."""
        t0 = time.perf_counter()
        used_query = np.zeros(len(query.keypoints), bool)
        p2d, p3d = [], []
        for kf in keyframes:
            pairs = self._matches(query, kf)
            pairs = pairs[~used_query[pairs[:, 0]]] if len(pairs) else pairs
            used_query[pairs[:, 0]] = True
            p2d.append(query.keypoints[pairs[:, 0]])
            p3d.append(self.map.points3d[kf][pairs[:, 1]])
        timing["matching"] += (time.perf_counter() - t0) * 1e3
        if not p2d:
            return np.zeros((0, 2)), np.zeros((0, 3))
        return np.concatenate(p2d).astype(np.float64), np.concatenate(p3d).astype(np.float64)

    def _attempt(self, source, keyframes, query: "_Query", K, size, prior_T, prior_cov, timing, tried,
                 previous=None, attempts=None):
        cfg = self.config
        outcome = {"ok": False, "source": source, "keyframes": [], "inliers": 0, "matches": 0, "T": None, "failure": ""}
        if len(keyframes) == 0:
            outcome["reason"] = {"prior": "no keyframe of the map looks the way the prior does",
                                 "tracking": "no keyframe of the map looks the way the last verified pose does",
                                 "neighbourhood": "no other keyframe around the refused pose",
                                 "retrieval": "no keyframe retrieved", "search": "no keyframe left to search"}[source]
            outcome["failure"] = FAILURE_NO_KEYFRAMES
            return outcome if previous is None else {**previous, "reason": previous["reason"] + "; " + outcome["reason"]}
        tried.extend(int(k) for k in keyframes)
        outcome["keyframes"] = [int(k) for k in keyframes]
        if attempts is not None:
            attempts.append((source, outcome["keyframes"]))
        if len(query.keypoints) < 6:
            outcome.update(reason=f"only {len(query.keypoints)} features in the image", failure=FAILURE_NO_FEATURES)
            return outcome if previous is None else {**previous, "reason": outcome["reason"], "failure": FAILURE_NO_FEATURES}
        p2d, p3d = self._correspondences(keyframes, query, timing)
        outcome["matches"] = len(p2d)
        t0 = time.perf_counter()
        # A pose needs retrieval_min_inliers where nothing can vouch for fewer: no prior, or one too wide for the gate.
        wide = source in ("prior", "tracking") and self._prior_is_wide(prior_cov)
        min_inliers = cfg.retrieval_min_inliers if source in ("retrieval", "search") or wide else cfg.min_inliers
        T, inliers = solve_absolute_pose(p2d, p3d, K, size, cfg.ransac_threshold_px, cfg.solver)
        n_in = int(inliers.sum())
        if cfg.guided_matching and T is not None and cfg.guided_min_inliers <= n_in < min_inliers:
            # A pose from few matches is often right: matching again where it says the points are rescues it.
            timing["pose"] += (time.perf_counter() - t0) * 1e3
            near = self.map.nearest_keyframes(T, 2 * cfg.keyframes, cfg.metres_per_radian, cfg.max_keyframe_angle_deg)
            g2d, g3d = self._guided_correspondences(T, K, size, near, query, timing)
            t0 = time.perf_counter()
            T2, inliers2 = solve_absolute_pose(g2d, g3d, K, size, cfg.ransac_threshold_px, cfg.solver)
            if T2 is not None and int(inliers2.sum()) > n_in:
                T, inliers, p2d, p3d, n_in = T2, inliers2, g2d, g3d, int(inliers2.sum())
                outcome["matches"], outcome["guided"] = len(p2d), True
        outcome["inliers"] = n_in
        enough_ratio = n_in >= cfg.min_inlier_ratio * max(1, len(p2d))
        looks = self._looks_right(T, n_in, query) if T is not None and n_in < min_inliers and enough_ratio else ""
        # Between min_inliers and what this source needs, or fewer where the image looks like the map there: kept as
        # a candidate that other keyframes may confirm (a look vouches only where no keyframes contradict it).
        unvouched = T is not None and n_in < min_inliers and (
            bool(looks) or (cfg.confirm_few_inliers and cfg.min_inliers <= n_in))
        if T is None or (n_in < min_inliers and not unvouched) or not enough_ratio:
            timing["pose"] += (time.perf_counter() - t0) * 1e3
            what = {"prior": "keyframes near the prior", "tracking": "keyframes near the last verified pose",
                    "neighbourhood": "keyframes around the refused pose",
                    "retrieval": "retrieved keyframes", "search": "keyframes searched by their matches"}[source]
            outcome["reason"] = (f"too few inliers with the {what}: {n_in} of {len(p2d)} matches "
                                 f"(need {min_inliers} and {cfg.min_inlier_ratio:.0%}"
                                 f"{'; the prior is too wide for the gate to vouch for fewer' if wide else ''})")
            outcome["failure"] = FAILURE_TOO_FEW_INLIERS if T is None or n_in < min_inliers else FAILURE_INLIER_RATIO
            if previous is not None:
                outcome["reason"] = previous["reason"] + "; " + outcome["reason"]
            return outcome
        # An unconfirmed candidate's focal length is checked only if it is confirmed: a chance pose's would
        # mislead the recent frames' history.
        calibration = "" if unvouched else self._check_focal(p2d, p3d, K, size, outcome)
        timing["pose"] += (time.perf_counter() - t0) * 1e3
        if calibration:
            outcome.update(reason=calibration, failure=FAILURE_CALIBRATION)
            return outcome
        t0 = time.perf_counter()
        covariance = self._covariance(T, K, p2d[inliers], p3d[inliers])
        timing["pose"] += (time.perf_counter() - t0) * 1e3
        outcome.update(T=T, covariance=covariance, ok=True, support=(p2d[inliers], p3d[inliers]),
                       reason=f"{n_in} inliers of {len(p2d)} matches from {len(keyframes)} {source} keyframes")
        if unvouched:
            outcome.update(ok=False, unvouched=(p2d, p3d), failure=FAILURE_TOO_FEW_INLIERS, looks=looks,
                           reason=outcome["reason"] + f" (fewer than {min_inliers}: other keyframes must give the same pose)")
        if prior_T is not None:
            delta = pose_difference(T, prior_T)
            outcome["correction"] = _correction(delta)
            if source in ("prior", "tracking"):
                gate, capped = self._gate(delta, covariance, prior_cov)
                if gate and unvouched:  # too few inliers and off the prior: nothing to confirm
                    outcome.update(unvouched=None, reason=f"{outcome['reason']}; {gate}")
                elif gate:
                    outcome.update(ok=False, gated=True, capped=capped, reason=gate,
                                   failure=FAILURE_MAX_CORRECTION if capped else FAILURE_GATE)
            else:
                outcome["reason"] += (f"; the prior was {outcome['correction'][0]:.2f} m, "
                                      f"{outcome['correction'][1]:.1f}° away")
        return outcome

    def _looks_right(self, T: np.ndarray, inliers: int, query: "_Query") -> str:
        """A note that the image looks like the map at ``T``, a pose of few inliers ("" if it does not, or cannot
        be checked): ``photometric_min_ncc``, :mod:`.views`."""
        cfg = self.config
        if not cfg.photometric_min_ncc or not self.map.has_views or inliers < cfg.photometric_min_inliers:
            return ""
        best, keyframe = float("nan"), -1
        for k in self.map.nearest_keyframes(T, cfg.photometric_keyframes, cfg.metres_per_radian, cfg.max_keyframe_angle_deg):
            ncc = view_agreement(query.view, T, self.map.view_grey[k], self.map.view_depth[k], self.map.view_intrinsics(k),
                                 self.map.poses[k])
            if np.isfinite(ncc) and not ncc <= best:
                best, keyframe = ncc, int(k)
        if not best >= cfg.photometric_min_ncc:
            return ""
        return f" (keyframe {keyframe}'s view: NCC {best:.2f}, photometric_min_ncc {cfg.photometric_min_ncc:g})"

    def _prior_is_wide(self, prior_cov: np.ndarray | None) -> bool:
        """Whether the prior is less certain, in its widest direction, than ``default_prior_std_m`` / ``_deg``.

        A regressor's covariance on real data can be metres and tens of degrees wide: the gate
        then passes any pose, so it cannot vouch for one made of a few inliers.
        """
        if prior_cov is None:
            return False
        cfg = self.config
        position, rotation = (math.sqrt(max(0.0, float(np.linalg.eigvalsh(prior_cov[b, b])[-1])))
                              for b in (slice(0, 3), slice(3, 6)))
        return position > cfg.default_prior_std_m or math.degrees(rotation) > cfg.default_prior_std_deg

    def _check_focal(self, p2d, p3d, K, size, outcome: dict) -> str:
        """Why K's focal length disagrees with the one the matches imply ("" if it agrees or is not checked).

        Sets ``outcome["focal_ratio"]``. A wrong focal length is absorbed by the pose
        (mostly a shift along the optical axis) with every residual small, so only an
        estimate that frees it can tell.
        """
        cfg = self.config
        if not cfg.max_focal_error or not self._focal_check:
            return ""
        ratio, std, inliers = estimate_focal_ratio(p2d, p3d, K, size, cfg.ransac_threshold_px)
        outcome["focal_ratio"] = ratio
        if not math.isfinite(ratio):
            return ""
        return self._focal_history.verdict(K, ratio, std, inliers, cfg.max_focal_error, cfg.gate_sigma, self._focal_scatter)

    def _confirm_refused(self, gated: dict, attempt, retrieve, tried: list[int]) -> dict:
        """Accept a pose the gate refused when keyframes that did not produce it give the same pose.

        Two independent keyframe sets agreeing (within ``gate_sigma`` of their summed
        covariances) mean the prior was wrong, not the geometry. The keyframes around
        the refused pose are tried first (they see what the query sees if the pose is
        right), then those retrieved by appearance.
        """
        cfg = self.config
        checks = []
        if cfg.neighbourhood_confirms:
            checks.append(("keyframes around it", lambda: attempt("neighbourhood", self._around(gated["T"], tried))))
        if cfg.retrieval and cfg.retrieval_confirms:
            checks.append(("retrieved keyframes", lambda: attempt("retrieval", retrieve())))
        notes = []
        for what, run in checks:
            other = run()
            if not other["ok"]:
                notes.append(f"{what} did not confirm it ({other['reason']})")
                continue
            if self._agree(other, gated):
                return {**other, "reason": f"{other['reason']}; confirms the pose the gate refused: {gated['reason']}"}
            notes.append(f"{what} gave another pose, {np.linalg.norm(pose_difference(other['T'], gated['T'])[:3]):.2f} m away")
        return {**gated, "reason": "; ".join([gated["reason"], *notes])}

    def _cross_check(self, found: dict, attempt, retrieve) -> dict:
        """``found`` (from the keyframes of a prior too wide to vouch for it), or retrieval's pose where the
        two disagree and retrieval's has more inliers (``wide_prior_cross_check``)."""
        other = attempt("retrieval", retrieve())
        if not other["ok"] or self._agree(found, other) or other["inliers"] <= found["inliers"]:
            return found
        moved = np.linalg.norm(pose_difference(other["T"], found["T"])[:3])
        return {**other, "reason": f"{other['reason']}; it replaces the pose of the prior's keyframes, {moved:.2f} m away "
                                   f"with {found['inliers']} inliers (repeated structure)"}

    def _search(self, failed: dict, attempt, retrieve, tried: list[int], K, size) -> dict:
        """The last resort (``search_candidates``): the untried keyframes that match the image best; the
        pose they give stands only if independent keyframes give the same pose (:meth:`_confirm_candidates`):
        the next best by their matches (``retrieval_confirms``), else the keyframes around it; or, from
        ``search_alone_inliers``, where nothing can confirm or contradict it (:meth:`_stands_alone`)."""
        found = attempt("search", retrieve(self.config.search_candidates), previous=failed)
        if not found["ok"] and found.get("unvouched") is None:
            return found
        candidates = [found]
        if self.config.retrieval_confirms:
            again = attempt("search", retrieve(self.config.search_candidates))
            if again["ok"] or again.get("unvouched") is not None:
                candidates.append(again)
        failed = {**failed, "reason": f"{failed['reason']}; the search found a pose ({found['reason']})"}
        return self._confirm_candidates(candidates, failed, attempt, tried, K, size)

    def _confirm_candidates(self, candidates: list[dict], failed: dict, attempt, tried: list[int], K, size) -> dict:
        """Accept a pose of fewer inliers than its source needs when independent keyframes give the same pose.

        First two candidates from different keyframes that agree; else the keyframes around the
        best candidate (none tried yet). A confirmed pose still passes the focal-length check. A searched
        pose that those keyframes neither confirm nor contradict may stand alone (:meth:`_stands_alone`).
        """
        candidates = sorted(candidates, key=lambda o: -o["inliers"])
        best, confirmed, how = candidates[0], None, ""
        for other in candidates[1:]:
            if not set(other["keyframes"]) & set(best["keyframes"]) and self._agree(best, other):
                confirmed, how = other, f"the {other['source']} keyframes give the same pose ({other['reason']})"
                break
        if confirmed is None and self.config.neighbourhood_confirms:
            around = attempt("neighbourhood", self._around(best["T"], tried))
            if (around["ok"] or around.get("unvouched") is not None) and self._agree(best, around):
                confirmed, how = around, f"the keyframes around it give the same pose ({around['reason']})"
            elif self._stands_alone(best, candidates, around):
                return {**best, "reason": f"{best['reason']}; it stands alone: {best['inliers']} inliers "
                                          f"(search_alone_inliers {self.config.search_alone_inliers}), and the keyframes "
                                          f"around it see too little to confirm or contradict it ({around['reason']})"}
            elif self._uncontradicted(best, candidates, around) and best.get("looks"):
                confirmed, how = best, (f"the image looks like the map there{best['looks']}, and the keyframes around it "
                                        f"see too little to contradict it ({around['reason']})")
            else:
                found = (f"gave another pose, {np.linalg.norm(pose_difference(around['T'], best['T'])[:3]):.2f} m away"
                         if around.get("T") is not None else f"did not confirm it ({around['reason']})")
                return {**failed, "reason": failed["reason"] + f"; the keyframes around the best pose {found}"}
        elif confirmed is None and best.get("looks") and self._candidates_agree(best, candidates):
            confirmed, how = best, f"the image looks like the map there{best['looks']} (neighbourhood_confirms off)"
        if confirmed is None:
            return failed
        chosen = max((best, confirmed), key=lambda o: o["inliers"])
        calibration = "" if chosen["ok"] else self._check_focal(*chosen["unvouched"], K, size, chosen)
        if calibration:
            return {**chosen, "ok": False, "reason": calibration, "failure": FAILURE_CALIBRATION}
        return {**chosen, "ok": True, "failure": "", "reason": f"{best['reason']}; {how}"}

    def _stands_alone(self, best: dict, candidates: list[dict], around: dict) -> bool:
        """Whether a searched pose of ``search_alone_inliers`` or more stands unconfirmed: the keyframes around it
        found no pose (too few inliers, or none left) and every other candidate that found one agrees with it."""
        alone = self.config.search_alone_inliers
        return (best["ok"] and best["source"] == "search" and 0 < alone <= best["inliers"]
                and self._uncontradicted(best, candidates, around))

    def _uncontradicted(self, best: dict, candidates: list[dict], around: dict) -> bool:
        """Whether the keyframes around ``best`` found no pose (too few inliers, or none left) and every other
        candidate that found one agrees with it."""
        return (around.get("T") is None and around["failure"] in (FAILURE_TOO_FEW_INLIERS, FAILURE_NO_KEYFRAMES)
                and self._candidates_agree(best, candidates))

    def _candidates_agree(self, best: dict, candidates: list[dict]) -> bool:
        """Whether every other candidate that found a pose agrees with ``best``."""
        return all(other.get("T") is None or self._agree(best, other) for other in candidates[1:])

    def _agree(self, a: dict, b: dict) -> bool:
        """Whether two poses are the same within ``gate_sigma`` of their summed covariances."""
        delta = pose_difference(a["T"], b["T"])
        total = a["covariance"] + b["covariance"]
        return max(mahalanobis(delta[:3], total[:3, :3]), mahalanobis(delta[3:], total[3:, 3:])) <= self.config.gate_sigma

    def _around(self, T: np.ndarray, exclude: list[int]) -> np.ndarray:
        """The ``keyframes`` keyframes nearest to ``T`` that are not in ``exclude`` (an independent set)."""
        cfg = self.config
        ranked = self.map.nearest_keyframes(T, cfg.keyframes + len(exclude), cfg.metres_per_radian, cfg.max_keyframe_angle_deg)
        return _untried(ranked, exclude, cfg.keyframes)

    def _gate(self, delta: np.ndarray, covariance: np.ndarray, prior_cov: np.ndarray | None) -> tuple[str, bool]:
        """``("", False)`` if the refined pose agrees with the prior, else ``(why not, whether an absolute cap was hit)``."""
        cfg = self.config
        if prior_cov is None:
            prior_cov = np.diag([cfg.default_prior_std_m**2] * 3 + [np.radians(cfg.default_prior_std_deg) ** 2] * 3)
        total = prior_cov + covariance
        d_pos, d_rot = mahalanobis(delta[:3], total[:3, :3]), mahalanobis(delta[3:], total[3:, 3:])
        metres, degrees = float(np.linalg.norm(delta[:3])), float(np.degrees(np.linalg.norm(delta[3:])))
        why = []
        if d_pos > cfg.gate_sigma or d_rot > cfg.gate_sigma:
            why.append(f"{d_pos:.1f}σ in position, {d_rot:.1f}σ in rotation (gate {cfg.gate_sigma:g}σ)")
        if cfg.max_correction_m and metres > cfg.max_correction_m:
            why.append(f"{metres:.2f} m > max_correction_m {cfg.max_correction_m:g}")
        if cfg.max_correction_deg and degrees > cfg.max_correction_deg:
            why.append(f"{degrees:.1f}° > max_correction_deg {cfg.max_correction_deg:g}")
        if not why:
            return "", False
        capped = any("max_correction" in w for w in why)
        return f"refined pose disagrees with the prior by {metres:.2f} m, {degrees:.1f}°: " + "; ".join(why), capped

    def _covariance(self, T, K, p2d, p3d) -> np.ndarray:
        cfg = self.config
        cov = self.covariance_model.apply(geometric_covariance(T, K, p2d, p3d))
        floor = np.array([cfg.min_position_std**2] * 3 + [np.radians(cfg.min_rotation_std_deg) ** 2] * 3)
        cov[np.diag_indices(6)] = np.maximum(np.diag(cov), floor)
        return 0.5 * (cov + cov.T)

    def _result(self, outcome, prior_T, prior_cov, timing, tried, attempts) -> RefinementResult:
        correction = outcome.get("correction", (float("nan"), float("nan")))
        if outcome["ok"]:  # against the caller's prior: a tracked pose's attempt measured it against the track
            correction = _correction(pose_difference(outcome["T"], prior_T)) if prior_T is not None else (float("nan"),) * 2
        common = dict(inliers=outcome["inliers"], matches=outcome["matches"], keyframes_used=list(dict.fromkeys(tried)),
                      source=outcome["source"], timing_ms=timing, attempts=attempts, correction=correction,
                      focal_ratio=float(outcome.get("focal_ratio", float("nan"))))
        if outcome["ok"]:
            return RefinementResult(STATUS_REFINED, outcome["reason"], outcome["T"], outcome["covariance"], **common)
        common["failure"] = outcome["failure"]
        if prior_T is not None:
            return RefinementResult(STATUS_FALLBACK, outcome["reason"], prior_T.copy(),
                                    None if prior_cov is None else prior_cov.copy(), **common)
        if not tried:  # an empty map cannot be built, so retrieval always returns keyframes
            raise AssertionError("no keyframe was tried")
        return RefinementResult(STATUS_FALLBACK, outcome["reason"] + "; answering the best retrieved keyframe's pose",
                                self.map.poses[tried[0]].copy(), None, **common)


@dataclass
class _Query:
    """One image's features, its matches with the keyframes asked for so far (keyframe index -> pairs), and
    every keyframe ranked by appearance once retrieval has asked (:meth:`SceneMap.retrieve_keyframes`)."""

    keypoints: np.ndarray
    descriptors: np.ndarray
    matches: dict[int, np.ndarray] = field(default_factory=dict)
    ranking: np.ndarray | None = None
    image: np.ndarray | None = field(default=None, repr=False)
    K: np.ndarray | None = None

    @functools.cached_property
    def view(self) -> QueryView:
        """The image as keyframe views are compared with it (made on first use)."""
        return QueryView.of(self.image, self.K)


def _not_in(points: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """(N,) bool: which of the (N, 2) ``points`` are none of the (M, 2) ``taken`` (the same query keypoints)."""
    taken_set = {tuple(p) for p in np.asarray(taken, np.float64).reshape(-1, 2).tolist()}
    return np.array([tuple(p) not in taken_set for p in np.asarray(points, np.float64).reshape(-1, 2).tolist()], bool)


def _other_keyframes_may_help(outcome: dict) -> bool:
    """Whether an attempt that failed leaves room for other keyframes: not refused by the gate (its own
    confirmations decide) nor by the focal check (K is wrong for every keyframe alike)."""
    return not outcome["ok"] and not outcome.get("gated") and outcome["failure"] != FAILURE_CALIBRATION


def _weaker_features_may_help(outcome: dict) -> bool:
    """Whether a failed frame may refine with more, weaker features: it saw the map with too few matches or
    inliers (not refused by the gate or the focal check, which more features would not change)."""
    return not outcome["ok"] and outcome["failure"] in (FAILURE_TOO_FEW_INLIERS, FAILURE_NO_FEATURES)


def retry_feature_config(query_features: FeatureConfig, contrast_threshold: float) -> FeatureConfig | None:
    """The query's features at a lower SIFT contrast threshold for a last try (None: off, not SIFT, or not lower)."""
    if not contrast_threshold or query_features.type != "sift" or contrast_threshold >= query_features.contrast_threshold:
        return None
    return query_features.replace(contrast_threshold=contrast_threshold)


def _correction(delta: np.ndarray) -> tuple[float, float]:
    """Metres and degrees of a :func:`pose_difference`."""
    return float(np.linalg.norm(delta[:3])), float(np.degrees(np.linalg.norm(delta[3:])))


def _untried(ranked: np.ndarray, exclude: list[int], k: int) -> np.ndarray:
    """The first ``k`` of ``ranked`` keyframe indices that are not in ``exclude``, in order."""
    excluded = set(exclude)
    return np.array([i for i in ranked if int(i) not in excluded][:k], np.int64)


# ----------------------------------------------------------------------------- calibration


def perturb_pose(T_world_camera: np.ndarray, metres: float, degrees: float, rng: np.random.Generator) -> np.ndarray:
    """The pose moved by exactly ``metres`` and turned by exactly ``degrees`` in random directions (priors for tests)."""
    direction = rng.normal(size=3)
    axis = rng.normal(size=3)
    T = np.array(T_world_camera, np.float64, copy=True)
    T[:3, 3] += metres * direction / np.linalg.norm(direction)
    R_delta = cv2.Rodrigues(np.radians(degrees) * axis / np.linalg.norm(axis))[0]
    T[:3, :3] = R_delta @ T[:3, :3]
    return T


def map_covariance_model(scene_map: SceneMap, config: RefinementConfig) -> CovarianceModel:
    """The covariance model refined poses are published with.

    ``config.covariance_scale`` > 0 overrides (a plain factor); else the map's calibrated model,
    or its single scale (maps calibrated before the model existed); else the unit covariance.
    """
    if config.covariance_scale > 0:
        return CovarianceModel(config.covariance_scale, config.covariance_scale)
    calibration = scene_map.metadata.get("calibration") or {}
    if calibration.get("model"):
        return CovarianceModel.from_dict(calibration["model"])
    scale = float(calibration.get("covariance_scale") or 1.0)
    return CovarianceModel(scale, scale)


def calibration_residuals(scene_map: SceneMap, samples: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
                          config: RefinementConfig | None = None, prior_metres: float | None = None,
                          prior_degrees: float | None = None, seed: int = 0) -> dict:
    """Refine held-out images against ``scene_map``: errors and unit covariances of the refined ones.

    For each ``(rgb, K, T_true)`` the true pose, perturbed, is refined (retrieval off, so a
    pose is only found where the map explains the image); the refiner's covariance is the
    unit one (:func:`geometric_covariance`, no floors). The prior is moved by ``prior_metres``
    and turned by ``prior_degrees``; where None, by a draw of the prior error the refiner assumes
    (``default_prior_std_m`` / ``_deg`` per axis). Priors as wrong as deployment's matter: a prior
    0.5–1 m off picks keyframes farther from the image than one 0.3 m off, and the errors grow
    (synthetic 600-frame scene, regressor priors: keyframes 0.55 m away instead of 0.27 m, 88 %
    of refined frames inside the 6-DoF 95 % bound of a map calibrated with 0.3 m priors).

    The focal length each refined pose's matches imply is estimated as the focal check does, but
    never refused (these images share the map's own K): how far it scatters on right poses is what
    the check must read a frame by (:func:`~.pnp.focal_scatter`).

    Returns:
        ``{"frames": int, "residuals": (M, 6) pose_difference(refined, true), "unit": (M, 6, 6),
        "focal_ratios": (M,)}`` (NaN where the focal check is off or found no estimate).
    """
    base = config or RefinementConfig()
    refiner = Refiner(scene_map, base.replace(min_position_std=0.0, min_rotation_std_deg=0.0, retrieval=False,
                                              max_focal_error=1e9 if base.max_focal_error else 0.0))  # estimated, never refused
    refiner.covariance_model = CovarianceModel()
    rng = np.random.default_rng(seed)
    residuals, unit, ratios, frames = [], [], [], 0
    for rgb, K, T_true in samples:
        frames += 1
        metres = prior_metres if prior_metres is not None else base.default_prior_std_m * float(np.linalg.norm(rng.normal(size=3)))
        degrees = prior_degrees if prior_degrees is not None else base.default_prior_std_deg * float(np.linalg.norm(rng.normal(size=3)))
        result = refiner.refine(rgb, K, perturb_pose(T_true, metres, degrees, rng), None)
        if result.refined:
            residuals.append(pose_difference(result.T, T_true))
            unit.append(result.covariance)
            ratios.append(result.focal_ratio)
    return {"frames": frames, "residuals": np.array(residuals).reshape(-1, 6), "unit": np.array(unit).reshape(-1, 6, 6),
            "focal_ratios": np.array(ratios, np.float64)}


def calibrate_covariance(residuals: np.ndarray, unit: np.ndarray, frames: int, method: str = "held-out images",
                         focal_ratios: np.ndarray | None = None) -> dict:
    """The map's ``calibration``: a :class:`CovarianceModel` fitted on held-out refinements.

    Args:
        residuals, unit: (M, 6), (M, 6, 6) of the refined held-out frames (:func:`calibration_residuals`).
        frames: held-out frames tried (refined or not); method: how they were held out (stored).
        focal_ratios: the focal ratios of the refined frames (``calibration_residuals``), if any.

    Returns:
        ``{"method", "frames", "refined", "model", "covariance_scale", "median_position_m",
        "median_rotation_deg", "fit"}``, and ``"focal_scatter"``, ``"median_focal_ratio"`` where at least 10
        ratios were estimated (the focal check reads a frame by that scatter): ``fit`` holds the coverage of the fitted model on these
        frames (:func:`~ros2_posenet.covariance.calibration_metrics`); without a refined frame the
        model is the unit covariance. ``covariance_scale`` (the position scale) is kept for readers
        of older maps.
    """
    residuals, unit = np.asarray(residuals, np.float64).reshape(-1, 6), np.asarray(unit, np.float64).reshape(-1, 6, 6)
    model = fit_covariance_model(residuals, unit) if len(residuals) else CovarianceModel()
    pos, rot = np.linalg.norm(residuals[:, :3], axis=1), np.degrees(np.linalg.norm(residuals[:, 3:], axis=1))
    fit = calibration_metrics(residuals, model.apply(unit)) if len(residuals) else {}
    return {
        "method": method, "frames": int(frames), "refined": len(residuals), "model": model.to_dict(),
        "covariance_scale": model.position_scale,
        "median_position_m": float(np.median(pos)) if len(pos) else float("nan"),
        "median_rotation_deg": float(np.median(rot)) if len(rot) else float("nan"),
        "fit": fit,
        **_focal_calibration(focal_ratios),
    }


def _focal_calibration(ratios: np.ndarray | None) -> dict:
    ratios = np.asarray([] if ratios is None else ratios, np.float64)
    ratios = ratios[np.isfinite(ratios)]
    if len(ratios) < 10:  # too few to say how they scatter: the check reads frames by their own σ
        return {}
    return {"focal_scatter": focal_scatter(ratios), "median_focal_ratio": float(np.median(ratios))}

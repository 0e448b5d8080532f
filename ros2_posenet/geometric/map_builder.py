"""The scene map of the geometric stage, built from a posed dataset's training images.

Keyframes are training images chosen by pose spacing; their local features get 3D
world points from the scene's own source: ``depth`` (7-Scenes layout: depth images),
``reconstruction`` (Cambridge: the NVM points observed in each image) or
``triangulation`` (matches between keyframes with their known poses, no depth,
:mod:`ros2_posenet.geometric.triangulation`). ``build-map`` (:mod:`ros2_posenet.tools.build_map`)
is the command line over this module.

The covariance of refined poses is calibrated where the robot will be, not between keyframes:
a frame between two keyframes of the same pass is explained better by the map than a new run
will be (test errors 3x the calibration errors, issue 22). :func:`calibrate_held_out` leaves
part of the trajectory out of the map in turn (whole training sequences where there are at
least three, as ``data/split.py`` does for the regressor, else blocks of consecutive frames),
refines that part's frames against the rest and fits the
:class:`~ros2_posenet.covariance.CovarianceModel` on all of them. "The rest" is the map built
without that part (:class:`LeaveOut`): a triangulated map is triangulated again, as its points
were placed by every keyframe that saw them.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from ..data.split import MIN_SEQUENCES_FOR_SEQUENCE_SPLIT
from ..geometry import pose_to_matrix
from .features import FeatureConfig, detect_features
from .refiner import RefinementConfig, calibrate_covariance, calibration_residuals
from .retrieval import tiny_image_descriptor
from .scene_map import SceneMap, SceneMapBuilder, depth_lift, observation_lift
from .triangulation import TriangulationConfig, make_pair_matcher, triangulate_map
from .views import grey, map_view_size, point_view_depth

log = logging.getLogger(__name__)

POINT_CHOICES = ("auto", "depth", "reconstruction", "triangulation")

# A depth-free map keeps only the features that other keyframes see too (about a fifth of them on real
# indoor images), so it starts from more, weaker ones: on hololens-office's validation split this took the
# refined share from 61 % to 71 % (bench/bench_real.py --split validation; h10 report). Given settings win.
TRIANGULATION_FEATURES = {"max_features": 4000, "contrast_threshold": 0.005}
# A depth map keeps every feature with depth; twice FeatureConfig's 1000 gives the query more of them to match from
# a new viewpoint: on the same validation split, with 0.1 m / 5° keyframes, 74.7 -> 76.0 % refined from
# 0.3 m / 10° priors and 60.0 -> 71.1 % from the regressor's, and no refined frame wrong (bench/RESULTS.md).
DEPTH_FEATURES = {"max_features": 2000}
SOURCE_FEATURES = {"triangulation": TRIANGULATION_FEATURES, "depth": DEPTH_FEATURES}

# (dataset, index, rgb, K, T) -> lift
LiftFactory = Callable[[object, int, np.ndarray, np.ndarray, np.ndarray], Callable]


def map_feature_config(points: str, **given) -> FeatureConfig:
    """The features of a map whose points come from ``points``: ``given`` settings (None: not given)
    over that source's defaults (:data:`SOURCE_FEATURES`, else :class:`FeatureConfig`'s)."""
    defaults = SOURCE_FEATURES.get(points, {})
    return FeatureConfig.from_dict({**defaults, **{k: v for k, v in given.items() if v is not None}})


def open_dataset(kind: str, root: str | Path, split: str = "train"):
    """The scene's split through the project's loaders (no preprocessing needed: raw images are used)."""
    from ..data import build_dataset

    return build_dataset(kind, root, split, augment=False, max_points=0)


def pose_matrix(dataset, index: int) -> np.ndarray:
    """(4, 4) camera-to-world pose of sample ``index``."""
    record = dataset.samples[index]
    return pose_to_matrix(record.position, record.rotation)


def default_point_source(dataset) -> str:
    """``depth`` for 7-Scenes layouts with depth images, ``reconstruction`` for Cambridge with an NVM."""
    from ..data import CambridgeLandmarks, SevenScenes

    if isinstance(dataset, SevenScenes) and all(r.depth_path is not None and r.depth_path.is_file() for r in dataset.samples[:1]):
        return "depth"
    if isinstance(dataset, CambridgeLandmarks) and dataset.reconstruction is not None:
        return "reconstruction"
    return "triangulation"


def read_depth_m(dataset, index: int) -> np.ndarray:
    """(H, W) float32 metres of a 7-Scenes sample seen by its colour camera (0 = invalid; registered by the loader)."""
    return dataset.depth_metres(index)


def depth_lift_factory(dataset, index, rgb, K, T):
    return depth_lift(read_depth_m(dataset, index), K, T)


def reconstruction_lift_factory(dataset, index, rgb, K, T):
    """Cambridge: the NVM measurements of this image (offsets from the centre, scaled to the image)."""
    from ..data.cambridge import image_key

    nvm = dataset.reconstruction
    if not hasattr(dataset, "_nvm_index"):
        dataset._nvm_index = {image_key(cam.name): i for i, cam in enumerate(nvm.cameras)}
    cam = dataset._nvm_index.get(image_key(dataset.samples[index].name))
    if cam is None:
        return observation_lift(np.zeros((0, 2)), np.zeros((0, 3)))
    point_ids, offsets = nvm.observations(cam)
    scale = rgb.shape[1] / dataset.reconstruction_size[0]  # NVM pixels -> image pixels
    xy = offsets * scale + K[:2, 2]
    return observation_lift(xy, nvm.points[point_ids], radius_px=max(1.5, 2.0 * scale))


def shifted_depth_lift_factory(dx: int, dy: int) -> LiftFactory:
    """Depth read ``(dx, dy)`` pixels off the colour image, as from an unregistered depth camera
    (benchmarks and tests of misregistered maps)."""
    def factory(dataset, index, rgb, K, T):
        depth = read_depth_m(dataset, index)
        shifted = np.zeros_like(depth)
        h, w = depth.shape
        shifted[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = depth[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
        return depth_lift(shifted, K, T)
    return factory


LIFT_FACTORIES = {"depth": depth_lift_factory, "reconstruction": reconstruction_lift_factory}


def build_scene_map(
    dataset,
    keyframes: np.ndarray,
    feature_config: FeatureConfig,
    points: str,
    map_frame: str = "map",
    lift_factory: LiftFactory | None = None,
    progress: bool = False,
    triangulation: TriangulationConfig | None = None,
) -> SceneMap:
    """Detect, lift and store the features of ``dataset``'s images ``keyframes``.

    ``points``: ``depth``, ``reconstruction`` or ``triangulation``; ``lift_factory``
    overrides how depth/reconstruction points are made (benchmarks use it to misregister depth);
    ``triangulation`` the thresholds of triangulated points (default :class:`TriangulationConfig`).
    """
    if points == "triangulation":
        return _triangulated_map(dataset, keyframes, feature_config, map_frame, progress, triangulation)
    factory = lift_factory or LIFT_FACTORIES[points]
    builder = SceneMapBuilder(feature_config, points, map_frame)
    for i in tqdm(keyframes, desc="build-map", unit="keyframe", disable=not progress, file=sys.stderr):
        rgb = dataset.load_image(int(i))
        K, T = dataset.intrinsics(int(i)), pose_matrix(dataset, int(i))
        builder.add_image(dataset.samples[int(i)].name, rgb, K, T, factory(dataset, int(i), rgb, K, T))
    return builder.build()


def _triangulated_map(dataset, keyframes, feature_config, map_frame, progress, config=None) -> SceneMap:
    """Depth-free points: triangulate matches between keyframes with their known poses."""
    views = _keyframe_views(dataset, keyframes, feature_config, progress)
    return _triangulate_views(views, feature_config, map_frame, config or TriangulationConfig())


def _keyframe_views(dataset, keyframes, feature_config: FeatureConfig, progress: bool = False) -> list[dict]:
    """Per keyframe what triangulation needs: name, features, global descriptor, K, pose, image size, and its
    grey view (:func:`~.views.map_view_size`)."""
    views = []
    for i in tqdm(keyframes, desc="build-map features", unit="keyframe", disable=not progress, file=sys.stderr):
        rgb = dataset.load_image(int(i))
        size = (rgb.shape[1], rgb.shape[0])
        views.append({"name": dataset.samples[int(i)].name, "features": detect_features(rgb, feature_config),
                      "global": tiny_image_descriptor(rgb), "K": dataset.intrinsics(int(i)), "T": pose_matrix(dataset, int(i)),
                      "size": size, "grey": grey(rgb, map_view_size(views[0]["grey"] if views else None, size))})
    return views


def _triangulate_views(views: list[dict], feature_config: FeatureConfig, map_frame: str,
                       config: TriangulationConfig, pair_matcher=None) -> SceneMap:
    """A triangulated map of ``views`` (:func:`_keyframe_views`): each keyframe keeps its features that got a point,
    and its view with the depth of those points (:func:`~.views.point_view_depth`)."""
    tri = triangulate_map([v["features"] for v in views], np.stack([v["K"] for v in views]),
                          np.stack([v["T"] for v in views]), config, feature_config=feature_config,
                          pair_matcher=pair_matcher)
    builder = SceneMapBuilder(feature_config, "triangulation", map_frame)
    for k, view in enumerate(views):
        feats, ids = tri.keyframe_points(k)
        keypoints, descriptors = view["features"]
        depth = point_view_depth(keypoints[feats], tri.points3d[ids], view["T"], view["size"], view["grey"].shape[::-1])
        builder.add_keyframe(view["name"], view["K"], view["T"], view["size"], keypoints[feats], descriptors[feats],
                             tri.points3d[ids], point_info=tri.point_info(ids), global_descriptor=view["global"],
                             view=(view["grey"], depth))
    scene_map = builder.build()
    scene_map.metadata["triangulation"] = {"stats": tri.stats, "method": tri.method, "config": tri.config.to_dict()}
    return scene_map


def held_out_indices(n: int, keyframes: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Up to ``count`` training images that are not keyframes, spread evenly (calibration ``between-keyframes``)."""
    others = np.setdiff1d(np.arange(n), keyframes)
    if count <= 0 or len(others) == 0:
        return np.zeros(0, np.int64)
    return others[np.linspace(0, len(others) - 1, min(count, len(others))).round().astype(np.int64)]


CALIBRATION_SPLITS = ("auto", "sequences", "blocks", "between-keyframes")


def calibration_folds(ids: list[str], split: str = "auto", folds: int = 5, block: int = 15) -> tuple[str, list[np.ndarray]]:
    """Parts of the training trajectory to leave out of the map in turn: ``(split used, [frame indices])``.

    ``ids``: the sequence of every frame, in dataset order (capture order within a sequence).
    ``sequences``: up to ``folds`` whole sequences, evenly spaced in name order (``auto`` picks it
    when there are at least three); ``blocks``: ``folds`` blocks of ``block`` consecutive frames of
    one sequence, evenly spaced along the trajectory (shorter blocks when it is too short).
    """
    if split not in CALIBRATION_SPLITS[:3]:
        raise ValueError(f"calibration split must be one of {CALIBRATION_SPLITS[:3]}, got {split!r}")
    if folds < 1 or block < 1:
        raise ValueError(f"calibration folds and block must be >= 1, got {folds} and {block}")
    ids = [str(i) for i in ids]
    names = sorted(set(ids))
    if split == "auto":
        split = "sequences" if len(names) >= MIN_SEQUENCES_FOR_SEQUENCE_SPLIT else "blocks"
    frames = np.arange(len(ids))
    if split == "sequences":
        if len(names) < 2:
            raise ValueError(f"calibration by sequences needs at least two training sequences, the scene has {len(names)}")
        count = min(folds, len(names) - 1)
        held = [names[min(len(names) - 1, int(len(names) / count * (k + 0.5)))] for k in range(count)]
        return split, [frames[np.asarray(ids) == name] for name in held]
    folds = min(folds, len(ids))
    block = max(1, min(block, len(ids) // (2 * folds)))
    parts = []
    for centre in ((np.arange(folds) + 0.5) * len(ids) / folds).astype(int):
        same = frames[np.asarray(ids) == ids[centre]]  # a block stays inside one sequence
        first = int(np.clip(centre - block // 2, same[0], same[-1] + 1 - block)) if len(same) >= block else int(same[0])
        parts.append(frames[first:first + min(block, len(same))])
    return split, parts


def _kept_keyframes(count: int, drop) -> np.ndarray:
    """The positions of ``count`` keyframes not in ``drop``; at least one must stay."""
    keep = np.setdiff1d(np.arange(count), np.asarray(drop, np.int64))
    if len(keep) == 0:
        raise ValueError("cannot leave every keyframe out of the map")
    return keep


def without_keyframes(scene_map: SceneMap, drop) -> SceneMap:
    """A copy of ``scene_map`` without the keyframes at positions ``drop`` (their features and points).

    Triangulated points seen by a dropped keyframe stay in the others, where it helped place them
    (:class:`LeaveOut` triangulates them again for calibration).
    """
    keep = _kept_keyframes(len(scene_map), drop)
    pick = lambda values: [values[i] for i in keep]  # noqa: E731
    return SceneMap(
        names=pick(scene_map.names), poses=scene_map.poses[keep], intrinsics=scene_map.intrinsics[keep],
        image_sizes=scene_map.image_sizes[keep], keypoints=pick(scene_map.keypoints),
        descriptors=pick(scene_map.descriptors), points3d=pick(scene_map.points3d),
        point_source=scene_map.point_source, feature_config=scene_map.feature_config,
        point_info={name: pick(values) for name, values in scene_map.point_info.items()},
        global_descriptors=scene_map.global_descriptors[keep], map_frame=scene_map.map_frame,
        view_grey=scene_map.view_grey[keep] if scene_map.has_views else None,
        view_depth=scene_map.view_depth[keep] if scene_map.has_views else None,
        metadata=dict(scene_map.metadata),
    )


class LeaveOut:
    """The map as it would be had the keyframes at ``drop`` never been in it (``leave_out(drop)``).

    Depth and reconstruction points belong to their keyframe: :func:`without_keyframes`. A
    triangulated point was placed by every keyframe that saw it, so a calibration frame that was
    itself a keyframe (most of them at the default spacing) would be refined against points its
    own observations fitted, and the calibration would flatter the map (hololens-office: errors
    0.012 m / 0.18° on the calibration frames, 0.019 m / 0.33° on the test split, 55 % of test
    frames inside the 6-DoF 95 % bound). So a triangulated map is triangulated again without
    them, from the same keyframes' features (detected once), the map's triangulation thresholds and
    each pair's matches computed once for all folds (hololens-office, 214 keyframes, 2 cores: build-map
    62 s without the re-triangulation, 123 s with it, 248 s if every fold matched its pairs again).
    """

    def __init__(self, scene_map: SceneMap, dataset, keyframes: np.ndarray):
        self.scene_map, self.dataset, self.keyframes = scene_map, dataset, np.asarray(keyframes, np.int64)
        self.triangulated = scene_map.point_source == "triangulation"
        if len(self.keyframes) != len(scene_map):
            raise ValueError(f"the map has {len(scene_map)} keyframes but {len(self.keyframes)} dataset images were given "
                             "as its keyframes: calibrate a map with the keyframes it was built from")
        settings = (scene_map.metadata.get("triangulation") or {}).get("config")
        self.config = TriangulationConfig.from_dict(settings) if settings else TriangulationConfig()
        self._views: list[dict] | None = None
        self._matches: dict = {}  # (id(desc_a), id(desc_b)) -> matches; the views hold the arrays for its lifetime
        self._match = make_pair_matcher(None, scene_map.feature_config, self.config)

    def _pair_matches(self, desc_a, desc_b, kp_a, kp_b, F) -> np.ndarray:
        key = (id(desc_a), id(desc_b))  # a pair's features and poses are the same in every fold
        if key not in self._matches:
            self._matches[key] = self._match(desc_a, desc_b, kp_a, kp_b, F)
        return self._matches[key]

    def __call__(self, drop) -> SceneMap:
        if not self.triangulated:
            return without_keyframes(self.scene_map, drop)
        if self._views is None:
            self._views = _keyframe_views(self.dataset, self.keyframes, self.scene_map.feature_config)
            if [v["name"] for v in self._views] != list(self.scene_map.names):
                raise ValueError("the map's keyframes are not these dataset images: calibrate a map with the dataset "
                                 "and keyframes it was built from")
        keep = _kept_keyframes(len(self._views), drop)
        reduced = _triangulate_views([self._views[i] for i in keep], self.scene_map.feature_config,
                                     self.scene_map.map_frame, self.config, self._pair_matches)
        reduced.metadata = {**self.scene_map.metadata, "triangulation": reduced.metadata["triangulation"]}
        return reduced


def _samples(dataset, indices):
    return ((dataset.load_image(int(i)), dataset.intrinsics(int(i)), pose_matrix(dataset, int(i))) for i in indices)


def calibrate(scene_map: SceneMap, dataset, indices: np.ndarray, config: RefinementConfig | None = None) -> dict:
    """The covariance model fitted on dataset images ``indices`` refined against the whole map
    (``between-keyframes``: flattering, as those images lie between the map's keyframes)."""
    data = calibration_residuals(scene_map, _samples(dataset, indices), config)
    return calibrate_covariance(data["residuals"], data["unit"], data["frames"], "between-keyframes", data["focal_ratios"])


def calibrate_held_out(scene_map: SceneMap, dataset, keyframes: np.ndarray, count: int, split: str = "auto",
                       folds: int = 5, block: int = 15, config: RefinementConfig | None = None,
                       progress: bool = False) -> dict:
    """The covariance model fitted on parts of the trajectory each left out of the map in turn.

    ``keyframes``: the dataset index of each map keyframe (map order). Per fold
    (:func:`calibration_folds`), the fold's keyframes leave the map and up to ``count / folds``
    of its frames, evenly spaced, are refined against the rest. ``split`` ``between-keyframes``
    is :func:`calibrate` on ``count`` non-keyframes (the old way). The result (the map's
    ``calibration``) also says how: ``method``, ``folds``, ``frames`` tried and ``refined``.
    """
    from ..train import sequence_ids

    keyframes = np.asarray(keyframes, np.int64)
    if split == "between-keyframes":
        return calibrate(scene_map, dataset, held_out_indices(len(dataset), keyframes, count), config)
    used, parts = calibration_folds(sequence_ids(dataset), split, max(1, min(folds, count)), block)
    shares = np.diff(np.linspace(0, count, len(parts) + 1).round().astype(int))  # frames per fold, ``count`` in all
    residuals, unit, ratios, frames = [], [], [], 0
    leave_out = LeaveOut(scene_map, dataset, keyframes)
    for part, share in tqdm(list(zip(parts, shares)), desc="calibrate", unit="fold", disable=not progress, file=sys.stderr):
        drop = np.flatnonzero(np.isin(keyframes, part))
        if len(drop) == len(scene_map):  # the whole map is in this part: nothing to refine against
            continue
        reduced = leave_out(drop)
        chosen = part[np.unique(np.linspace(0, len(part) - 1, max(1, min(len(part), share))).round().astype(int))]
        data = calibration_residuals(reduced, _samples(dataset, chosen), config)
        residuals.append(data["residuals"])
        unit.append(data["unit"])
        ratios.append(data["focal_ratios"])
        frames += data["frames"]
    calibration = calibrate_covariance(np.concatenate(residuals) if residuals else np.zeros((0, 6)),
                                       np.concatenate(unit) if unit else np.zeros((0, 6, 6)), frames, f"leave-{used}-out",
                                       np.concatenate(ratios) if ratios else None)
    return {**calibration, "folds": len(residuals), **({"block": int(max(len(p) for p in parts))} if used == "blocks" else {})}

"""The scene map of the geometric stage, built from a posed dataset's training images.

Keyframes are training images chosen by pose spacing; their local features get 3D
world points from the scene's own source: ``depth`` (7-Scenes layout: depth images),
``reconstruction`` (Cambridge: the NVM points observed in each image) or
``triangulation`` (matches between keyframes with their known poses, no depth,
:mod:`ros2_posenet.geometric.triangulation`). The covariance scale is calibrated on
held-out training images (not keyframes). ``build-map`` (:mod:`ros2_posenet.tools.build_map`)
is the command line over this module.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from ..geometry import pose_to_matrix
from .features import FeatureConfig, detect_features
from .refiner import RefinementConfig, calibrate_covariance_scale
from .retrieval import tiny_image_descriptor
from .scene_map import SceneMap, SceneMapBuilder, depth_lift, observation_lift
from .triangulation import triangulate_map

log = logging.getLogger(__name__)

POINT_CHOICES = ("auto", "depth", "reconstruction", "triangulation")
DEPTH_SCALE = 1000.0  # 7-Scenes depth PNGs hold millimetres

# (dataset, index, rgb, K, T) -> lift
LiftFactory = Callable[[object, int, np.ndarray, np.ndarray, np.ndarray], Callable]


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
    """(H, W) float32 metres of a 7-Scenes sample (0 = invalid)."""
    from ..data.seven_scenes import DEPTH_INVALID, read_depth

    depth = read_depth(dataset.samples[index].depth_path)
    return np.where(depth == DEPTH_INVALID, 0, depth).astype(np.float32) / DEPTH_SCALE


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


LIFT_FACTORIES = {"depth": depth_lift_factory, "reconstruction": reconstruction_lift_factory}


def build_scene_map(
    dataset,
    keyframes: np.ndarray,
    feature_config: FeatureConfig,
    points: str,
    map_frame: str = "map",
    lift_factory: LiftFactory | None = None,
    progress: bool = False,
) -> SceneMap:
    """Detect, lift and store the features of ``dataset``'s images ``keyframes``.

    ``points``: ``depth``, ``reconstruction`` or ``triangulation``; ``lift_factory``
    overrides how depth/reconstruction points are made (benchmarks use it to misregister depth).
    """
    if points == "triangulation":
        return _triangulated_map(dataset, keyframes, feature_config, map_frame, progress)
    factory = lift_factory or LIFT_FACTORIES[points]
    builder = SceneMapBuilder(feature_config, points, map_frame)
    for i in tqdm(keyframes, desc="build-map", unit="keyframe", disable=not progress, file=sys.stderr):
        rgb = dataset.load_image(int(i))
        K, T = dataset.intrinsics(int(i)), pose_matrix(dataset, int(i))
        builder.add_image(dataset.samples[int(i)].name, rgb, K, T, factory(dataset, int(i), rgb, K, T))
    return builder.build()


def _triangulated_map(dataset, keyframes, feature_config, map_frame, progress) -> SceneMap:
    """Depth-free points: triangulate matches between keyframes with their known poses."""
    features, globals_, Ks, Ts, sizes = [], [], [], [], []
    for i in tqdm(keyframes, desc="build-map features", unit="keyframe", disable=not progress, file=sys.stderr):
        rgb = dataset.load_image(int(i))
        features.append(detect_features(rgb, feature_config))
        globals_.append(tiny_image_descriptor(rgb))
        Ks.append(dataset.intrinsics(int(i)))
        Ts.append(pose_matrix(dataset, int(i)))
        sizes.append((rgb.shape[1], rgb.shape[0]))
    tri = triangulate_map(features, np.stack(Ks), np.stack(Ts), feature_config=feature_config)
    builder = SceneMapBuilder(feature_config, "triangulation", map_frame)
    for k, i in enumerate(keyframes):
        feats, ids = tri.keyframe_points(k)
        keypoints, descriptors = features[k]
        builder.add_keyframe(dataset.samples[int(i)].name, Ks[k], Ts[k], sizes[k], keypoints[feats], descriptors[feats],
                             tri.points3d[ids], point_info=tri.point_info(ids), global_descriptor=globals_[k])
    scene_map = builder.build()
    scene_map.metadata["triangulation"] = {"stats": tri.stats, "method": tri.method, "config": tri.config.to_dict()}
    return scene_map


def held_out_indices(n: int, keyframes: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Up to ``count`` training images that are not keyframes, spread evenly."""
    others = np.setdiff1d(np.arange(n), keyframes)
    if count <= 0 or len(others) == 0:
        return np.zeros(0, np.int64)
    return others[np.linspace(0, len(others) - 1, min(count, len(others))).round().astype(np.int64)]


def calibrate(scene_map: SceneMap, dataset, indices: np.ndarray, config: RefinementConfig | None = None) -> dict:
    """:func:`calibrate_covariance_scale` on dataset images ``indices``."""
    samples = ((dataset.load_image(int(i)), dataset.intrinsics(int(i)), pose_matrix(dataset, int(i))) for i in indices)
    return calibrate_covariance_scale(scene_map, samples, config)

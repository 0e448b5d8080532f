"""``build-map``: the scene map of the geometric stage from a posed dataset's training images.

    build-map --dataset 7scenes --root data/synthetic --out maps/synthetic.npz
    build-map --dataset cambridge --root /data/KingsCollege --out maps/kings.npz
    build-map --dataset 7scenes --root /data/7scenes/chess --out maps/chess.npz --points triangulation

Keyframes are training images chosen by pose spacing (``--min-distance``,
``--min-angle``); their local features (``--features sift|orb``, at most
``--max-features`` each) get 3D world points from the scene's own source:
``depth`` (7-Scenes layout: depth images), ``reconstruction`` (Cambridge: the NVM
points observed in each image) or ``triangulation`` (matches between keyframes
with their known poses; needs no depth, :mod:`ros2_posenet.triangulation`).
``--agreement N`` keeps only points that N keyframes place at the same spot. For depth
not exactly registered to colour (the real 7-Scenes) use ``--points triangulation``:
bench/RESULTS.md measures both on a deliberately shifted depth. The covariance
scale is calibrated on ``--calibrate`` held-out training images (not keyframes).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from ..features import FEATURE_TYPES, FeatureConfig, detect_features
from ..geometry import pose_to_matrix
from ..refine import RefinementConfig, calibrate_covariance_scale
from ..scene_map import (
    MapError, SceneMap, SceneMapBuilder, depth_lift, filter_by_agreement, observation_lift, select_keyframes,
)

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
    from ..baselines import tiny_image_descriptor
    from ..triangulation import triangulate_map

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


def build_parser() -> argparse.ArgumentParser:
    f = FeatureConfig()
    p = argparse.ArgumentParser(prog="build-map", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="dataset kind: 7scenes (synthetic scenes too), cambridge, bundler or posed "
                   "(photographs with known cameras and no depth, Strecha format)")
    p.add_argument("--root", required=True, type=Path, help="scene folder")
    p.add_argument("--out", required=True, type=Path, help="map file to write (.npz)")
    p.add_argument("--split", default="train", help="split whose images become keyframes (default: train)")
    p.add_argument("--points", choices=POINT_CHOICES, default="auto",
                   help="where 3D points come from (auto: depth for 7-Scenes, the NVM for Cambridge, "
                        "triangulation for a posed image set without depth)")
    p.add_argument("--features", choices=FEATURE_TYPES, default=f.type)
    p.add_argument("--max-features", type=int, default=f.max_features, help="features per keyframe (map size)")
    p.add_argument("--max-image-size", type=int, default=f.max_image_size,
                   help="shrink images whose longer side exceeds this before detection (0: never)")
    p.add_argument("--min-distance", type=float, default=0.25, help="keyframe spacing in metres ...")
    p.add_argument("--min-angle", type=float, default=15.0, help="... or degrees of viewing direction")
    p.add_argument("--agreement", type=int, default=1,
                   help="keep points that this many keyframes agree on (1: all; 2-3 for misregistered depth)")
    p.add_argument("--calibrate", type=int, default=40, help="held-out training images for the covariance scale (0: none)")
    p.add_argument("--map-frame", default="map", help="frame id of the map (the checkpoint's map frame)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    start = time.perf_counter()
    try:
        if args.out.suffix != ".npz":
            raise ValueError(f"--out must end in .npz, got {args.out}")
        if args.agreement < 1 or args.calibrate < 0:
            raise ValueError("--agreement must be >= 1 and --calibrate >= 0")
        features = FeatureConfig(type=args.features, max_features=args.max_features, max_image_size=args.max_image_size)
        dataset = open_dataset(args.dataset, args.root, args.split)
        points = default_point_source(dataset) if args.points == "auto" else args.points
        poses = np.stack([pose_matrix(dataset, i) for i in range(len(dataset))])
        keyframes = select_keyframes(poses, args.min_distance, args.min_angle)
        print(f"build-map: {len(keyframes)} keyframes of {len(dataset)} {args.split} images, "
              f"{features.type} features, points from {points}", flush=True)
        scene_map = build_scene_map(dataset, keyframes, features, points, args.map_frame, progress=not args.quiet)
        if args.agreement > 1:
            scene_map = filter_by_agreement(scene_map, min_views=args.agreement)
        build_seconds = time.perf_counter() - start
        calibration = {}
        if args.calibrate:
            calibration = calibrate(scene_map, dataset, held_out_indices(len(dataset), keyframes, args.calibrate))
        scene_map.metadata.update({
            "dataset": args.dataset, "root": str(args.root), "split": args.split,
            "keyframe_spacing": {"min_distance_m": args.min_distance, "min_angle_deg": args.min_angle},
            "build_seconds": round(build_seconds, 2), "calibration": calibration,
        })
        path = scene_map.save(args.out)
    except (MapError, ValueError, FileNotFoundError, OSError) as err:  # DatasetError is a ValueError
        print(f"build-map: error: {err}", file=sys.stderr)
        return 2
    s = scene_map.summary()
    print(f"wrote {path}: {s['keyframes']} keyframes, {s['points']} points "
          f"({s['points_per_keyframe_median']:.0f} per keyframe), {path.stat().st_size / 1e6:.1f} MB, "
          f"built in {build_seconds:.1f} s" + (f"; covariance scale {calibration['covariance_scale']:.2f} from "
                                              f"{calibration['refined']}/{calibration['frames']} held-out images"
                                              if calibration else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

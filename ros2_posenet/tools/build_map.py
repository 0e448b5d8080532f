"""``build-map``: the scene map of the geometric stage from a posed dataset's training images.

    build-map --dataset 7scenes --root data/synthetic --out maps/synthetic.npz
    build-map --dataset cambridge --root /data/KingsCollege --out maps/kings.npz
    build-map --dataset 7scenes --root /data/7scenes/chess --out maps/chess.npz --points triangulation

Keyframes are training images chosen by pose spacing (``--min-distance``,
``--min-angle``); their local features (``--features sift|orb``, at most
``--max-features`` each, ``--contrast-threshold``; a triangulated map starts from more,
weaker features by default: ``map_builder.TRIANGULATION_FEATURES``) get 3D world points
from the scene's own source:
``depth`` (7-Scenes layout: depth images), ``reconstruction`` (Cambridge: the NVM
points observed in each image) or ``triangulation`` (matches between keyframes
with their known poses; needs no depth, :mod:`ros2_posenet.geometric.triangulation`).
``--triangulation KEY=VALUE ...`` sets the thresholds of triangulated points
(:class:`~ros2_posenet.geometric.triangulation.TriangulationConfig`). ``--agreement N`` keeps
only points that N keyframes place at the same spot. For depth
not exactly registered to colour (the real 7-Scenes) use ``--points triangulation``:
bench/RESULTS.md measures both on a deliberately shifted depth.

The covariance of refined poses is calibrated on ``--calibrate`` training images refined
against a map that does not contain their part of the trajectory (``--calibrate-split``:
whole training sequences left out in turn where there are at least three, else
``--calibrate-folds`` blocks of ``--calibrate-block`` consecutive frames; ``between-keyframes``
is the old, flattering choice), so it describes a new run rather than the frames between
keyframes. The map stores the fitted model and how it was calibrated (``calibration``).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from ..config_base import ConfigError, key_value
from ..geometric.features import FEATURE_TYPES, FeatureConfig
from ..geometric.map_builder import (
    CALIBRATION_SPLITS, POINT_CHOICES, SOURCE_FEATURES, build_scene_map, calibrate_held_out, default_point_source,
    map_feature_config, open_dataset, pose_matrix,
)
from ..geometric.scene_map import MapError, filter_by_agreement, select_keyframes
from ..geometric.triangulation import TriangulationConfig


def build_parser() -> argparse.ArgumentParser:
    f = FeatureConfig()
    p = argparse.ArgumentParser(prog="posenet-build-map", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="dataset kind: 7scenes (synthetic scenes too), cambridge, bundler or posed "
                   "(photographs with known cameras and no depth, Strecha format)")
    p.add_argument("--root", required=True, type=Path, help="scene folder")
    p.add_argument("--out", required=True, type=Path, help="map file to write (.npz)")
    p.add_argument("--split", default="train", help="split whose images become keyframes (default: train)")
    p.add_argument("--points", choices=POINT_CHOICES, default="auto",
                   help="where 3D points come from (auto: depth for 7-Scenes, the NVM for Cambridge, "
                        "triangulation for a posed image set without depth)")
    p.add_argument("--features", choices=FEATURE_TYPES, default=f.type)
    p.add_argument("--max-features", type=int, help=f"features per keyframe (map size; default {f.max_features}, "
                   f"{SOURCE_FEATURES['depth']['max_features']} for depth, "
                   f"{SOURCE_FEATURES['triangulation']['max_features']} for triangulation)")
    p.add_argument("--contrast-threshold", type=float, help=f"SIFT contrast threshold (lower: more, weaker features; "
                   f"default {f.contrast_threshold:g}, {SOURCE_FEATURES['triangulation']['contrast_threshold']:g} for triangulation)")
    p.add_argument("--max-image-size", type=int, default=f.max_image_size,
                   help="shrink images whose longer side exceeds this before detection (0: never)")
    # Dense keyframes: real test walks see places from viewpoints between the training ones (hololens-office,
    # validation split: with 2000 features 0.25 m / 15° refined 74.7 % and 66.7 %, with wrong frames; 0.1 m / 5° 76.0 %
    # and 71.1 %, none wrong). hloc keeps every database image.
    p.add_argument("--min-distance", type=float, default=0.1, help="keyframe spacing in metres ...")
    p.add_argument("--min-angle", type=float, default=5.0, help="... or degrees of viewing direction")
    p.add_argument("--triangulation", nargs="*", type=setting, default=[], metavar="KEY=VALUE",
                   help="--points triangulation: TriangulationConfig settings (YAML values) over its defaults, e.g. "
                        "min_track_length=3 min_angle_deg=2 max_range_uncertainty=0.05 for the older map of fewer, "
                        "checked points (half the size, fewer real frames refined: bench/RESULTS.md)")
    p.add_argument("--agreement", type=int, default=1,
                   help="keep points that this many keyframes agree on (1: all; 2-3 for misregistered depth)")
    p.add_argument("--calibrate", type=int, default=60,
                   help="training images refined against the map without their part of the trajectory, to "
                        "calibrate the covariance (0: none)")
    p.add_argument("--calibrate-split", choices=CALIBRATION_SPLITS, default="auto",
                   help="what is left out of the map in turn: whole sequences (auto: with >= 3) or blocks of "
                        "consecutive frames; between-keyframes: non-keyframes against the whole map (flattering)")
    p.add_argument("--calibrate-folds", type=int, default=5, help="sequences or blocks left out in turn")
    p.add_argument("--calibrate-block", type=int, default=15, help="consecutive frames per block (split blocks)")
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
        if args.agreement < 1 or args.calibrate < 0 or args.calibrate_folds < 1 or args.calibrate_block < 1:
            raise ValueError("--agreement, --calibrate-folds and --calibrate-block must be >= 1 and --calibrate >= 0")
        dataset = open_dataset(args.dataset, args.root, args.split)
        points = default_point_source(dataset) if args.points == "auto" else args.points
        if args.triangulation and points != "triangulation":
            raise ValueError(f"--triangulation applies to --points triangulation, not to {points} points")
        features = map_feature_config(  # from_dict: its errors read "feature config: <key> must be ..."
            points, type=args.features, max_features=args.max_features, contrast_threshold=args.contrast_threshold,
            max_image_size=args.max_image_size)
        poses = np.stack([pose_matrix(dataset, i) for i in range(len(dataset))])
        keyframes = select_keyframes(poses, args.min_distance, args.min_angle)
        print(f"build-map: {len(keyframes)} keyframes of {len(dataset)} {args.split} images, "
              f"{features.type} features, points from {points}", flush=True)
        scene_map = build_scene_map(dataset, keyframes, features, points, args.map_frame, progress=not args.quiet,
                                    triangulation=TriangulationConfig.from_dict(dict(args.triangulation)))
        if args.agreement > 1:
            scene_map = filter_by_agreement(scene_map, min_views=args.agreement)
        build_seconds = time.perf_counter() - start
        calibration = {}
        if args.calibrate:
            calibration = calibrate_held_out(scene_map, dataset, keyframes, args.calibrate, args.calibrate_split,
                                             args.calibrate_folds, args.calibrate_block, progress=not args.quiet)
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
          f"built in {build_seconds:.1f} s" + (f"; {describe_calibration(calibration)}" if calibration else ""))
    return 0


def setting(item: str) -> tuple[str, object]:
    """One ``KEY=VALUE`` argument (:func:`~ros2_posenet.config_base.key_value`; argparse reports a malformed one)."""
    try:
        return key_value(item)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def describe_calibration(calibration: dict) -> str:
    """One line: the fitted covariance model, on what, and its coverage there."""
    m, fit = calibration["model"], calibration.get("fit") or {}
    line = (f"covariance calibrated {calibration['method']} on {calibration['refined']}/{calibration['frames']} refined "
            f"images: scale {m['position_scale']:.3g}/{m['rotation_scale']:.3g} + floor {m['position_floor_m'] * 100:.2g} cm/"
            f"{np.degrees(m['rotation_floor_rad']):.2g}°, cross terms x{m['cross']:.2f}")
    if fit:
        line += (f"; inside the 95 % bound there: position {fit['position_within_95']:.0%}, rotation "
                 f"{fit['rotation_within_95']:.0%}, 6-DoF {fit['joint_within_95']:.0%}")
    if "focal_scatter" in calibration:
        line += (f"; their focal estimates {calibration['median_focal_ratio']:.3f}x K's, scattering "
                 f"±{calibration['focal_scatter']:.1%} (the focal check reads a frame by that)")
    return line


if __name__ == "__main__":
    sys.exit(main())

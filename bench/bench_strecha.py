#!/usr/bin/env python3
"""The geometric stage on real photographs: a map triangulated from known poses, held-out views relocalised.

Data: the Strecha fountain-P11 set (11 photographs, 3072x2048, ground-truth cameras;
``../shared/data/strecha-fountain-P11`` from the project root, README there). It has
no depth, so the map's 3D points come from triangulating SIFT matches between the
8 map images with their known poses (``build-map --points triangulation``,
:mod:`ros2_posenet.geometric.triangulation`); the 3 other views (0002, 0005, 0008 by default,
each between two map views) are relocalised by :class:`ros2_posenet.geometric.refiner.Refiner`
from priors moved by 0.5–1 m and turned by 10°, and once from a prior 5 m away
(which must fall back, or be recovered by retrieval and say so).

Per detection scale (``FeatureConfig.max_image_size``; 1 = 3072 px, 0.5 = 1536 px,
0.25 = 768 px; K stays that of the full image) it prints the map's build time and
size, and per held-out view the worst position / rotation error over the priors,
inliers and the refinement's time per frame (features + matching + pose; image
decoding excluded).

    python bench/bench_strecha.py                      # scales 1, 0.5, 0.25
    python bench/bench_strecha.py --scales 0.5 --priors 5
    python bench/bench_strecha.py --scales 0.25 --held-out 0000.jpg 0005.jpg 0010.jpg   # end views
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ros2_posenet.data import build_dataset  # noqa: E402
from ros2_posenet.geometric.features import FeatureConfig  # noqa: E402
from ros2_posenet.geometric.refiner import RefinementConfig, Refiner, pose_difference, perturb_pose  # noqa: E402
from ros2_posenet.geometric.map_builder import build_scene_map  # noqa: E402

DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "strecha-fountain-P11"
HELD_OUT = ("0002.jpg", "0005.jpg", "0008.jpg")
FULL_WIDTH = 3072


def open_split(root: Path, held_out=HELD_OUT):
    """(map images, held-out images) of the posed set."""
    train = build_dataset("posed", root, "train", held_out=list(held_out))
    test = build_dataset("posed", root, "test", held_out=list(held_out))
    return train, test


def build_map(train, scale: float, max_features: int):
    """The triangulated map of all ``train`` images at detection scale ``scale``; (map, seconds)."""
    config = FeatureConfig(max_features=max_features, max_image_size=0 if scale >= 1 else round(FULL_WIDTH * scale))
    start = time.perf_counter()
    scene_map = build_scene_map(train, np.arange(len(train)), config, "triangulation")
    return scene_map, time.perf_counter() - start


def errors(T, T_true) -> tuple[float, float]:
    delta = pose_difference(T, T_true)
    return float(np.linalg.norm(delta[:3])), float(np.degrees(np.linalg.norm(delta[3:])))


def relocalise(refiner: Refiner, test, priors: int, far_m: float, seed: int = 0) -> list[dict]:
    """Per held-out view: refinements from ``priors`` perturbed priors and one ``far_m`` away."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(len(test)):
        rgb, K = test.load(i)
        T_true = test.images[i].pose
        runs = []
        for _ in range(priors):
            prior = perturb_pose(T_true, float(rng.uniform(0.5, 1.0)), 10.0, rng)
            result = refiner.refine(rgb, K, prior, None)
            pos, rot = errors(result.T, T_true)
            runs.append({"status": result.status, "pos_m": pos, "rot_deg": rot, "inliers": result.inliers,
                         "matches": result.matches, "ms": result.timing_ms["total"], "timing": result.timing_ms})
        far = refiner.refine(rgb, K, perturb_pose(T_true, far_m, 10.0, rng), None)
        far_pos, far_rot = errors(far.T, T_true)
        rows.append({
            "view": test.names[i], "runs": runs,
            "refined": sum(r["status"] == "refined" for r in runs),
            "worst_pos_m": max(r["pos_m"] for r in runs), "worst_rot_deg": max(r["rot_deg"] for r in runs),
            "median_inliers": float(np.median([r["inliers"] for r in runs])),
            "median_ms": float(np.median([r["ms"] for r in runs])),
            "far": {"status": far.status, "source": far.source, "reason": far.reason,
                    "pos_m": far_pos, "rot_deg": far_rot},
        })
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=DEFAULT_DATA)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    p.add_argument("--max-features", type=int, default=4000, help="SIFT features per image (map and query)")
    p.add_argument("--priors", type=int, default=3, help="perturbed priors per held-out view")
    p.add_argument("--far", type=float, default=5.0, help="metres of the prior that must not be trusted")
    p.add_argument("--solver", default=RefinementConfig().solver)
    p.add_argument("--held-out", nargs="+", default=list(HELD_OUT), help="images left out of the map")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if not args.root.is_dir():  # optional real data: `make bench` goes on without it
        print(f"bench_strecha: skipped, {args.root} not found (the Strecha fountain-P11 set beside the project)")
        return 0
    train, test = open_split(args.root, args.held_out)
    print(f"map: {len(train)} images {train.names}; held out: {test.names}; {args.priors} priors "
          f"(0.5-1 m, 10 deg) each + one {args.far:g} m off; solver {args.solver}")
    report = []
    for scale in args.scales:
        scene_map, seconds = build_map(train, scale, args.max_features)
        stats = scene_map.metadata["triangulation"]["stats"]
        tracks = np.concatenate(scene_map.point_info["track_length"])
        reproj = np.concatenate(scene_map.point_info["reproj_error_px"])
        print(f"\nscale {scale:g} ({round(FULL_WIDTH * scale)} px wide): map built in {seconds:.1f} s, "
              f"{stats['points']} points ({stats['points_multi_view']} in >= 3 views), "
              f"{scene_map.num_points} keyframe observations, median track {np.median(tracks):.0f}, "
              f"median reprojection {np.median(reproj):.2f} px (full-res px), pairs {stats['pairs']}")
        refiner = Refiner(scene_map, RefinementConfig(solver=args.solver))
        rows = relocalise(refiner, test, args.priors, args.far)
        print(f"  {'view':9} {'refined':>8} {'worst pos':>10} {'worst rot':>10} {'inliers':>8} {'ms/frame':>9}  "
              f"{args.far:g} m prior")
        for row in rows:
            far = row["far"]
            print(f"  {row['view']:9} {row['refined']:>4}/{args.priors:<3} {row['worst_pos_m'] * 100:8.2f} cm "
                  f"{row['worst_rot_deg']:9.3f}° {row['median_inliers']:8.0f} {row['median_ms']:9.0f}  "
                  f"{far['status']} ({far['source']}): {far['reason']}")
        report.append({"scale": scale, "build_s": seconds, "map": scene_map.summary(), "triangulation": stats,
                       "views": rows})
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Geometric refinement on the synthetic scene: accuracy, fallbacks, solvers, misregistered depth, time at 640x480.

    .venv/bin/python bench/bench_refine.py                        # all sections (≈15 min on 2 busy cores)
    .venv/bin/python bench/bench_refine.py --sections accuracy solvers

Sections (each prints its table):

* ``accuracy``: the default scene's 200 test frames, priors = ground truth moved
  0.5 m and turned 10° in random directions (the regressor's typical error is of
  that order, bench/RESULTS.md); the output is the refined pose, or the prior on
  fallback. Also: no prior (retrieval + refinement), and grossly wrong priors (3 m, 90°).
  "worse" counts refined frames whose error exceeds the prior's: a silent worsening.
* ``solvers``: pycolmap / poselib / OpenCV USAC on the same map and priors.
* ``misregistered``: maps whose depth image is shifted against the colour image
  (``--depth-shift`` px, as a depth camera beside the colour camera gives):
  raw depth, the agreement filter (``build-map --agreement``), triangulation
  without depth, compared on the same test frames.
* ``timing``: a 640x480 rendering of the room (own small scene): ms per frame by
  part, wall clock and process CPU time, for SIFT, SIFT on the half-size image and ORB.
* ``speed`` (issue 24 item 8): the same 640x480 scene and map, ms per part and accuracy per
  speed option: the dense guided-matching window matrix against the grid index (also with
  guided matching forced on every frame), OpenCV threads, fewer query features,
  ``query_max_image_size`` values, a map detected at a reduced size; with ``--speed-detectors``
  each detector alone (OpenCV SIFT variants, ORB, pycolmap's SIFT).

Maps and scenes are cached under ``--work`` (default /tmp/bench_refine).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ros2_posenet.data.synthetic import SyntheticSceneConfig, generate_scene  # noqa: E402
from ros2_posenet.geometric.features import FeatureConfig  # noqa: E402
from ros2_posenet.geometric.pnp import mahalanobis  # noqa: E402
from ros2_posenet.geometric.refiner import RefinementConfig, Refiner, perturb_pose, pose_difference  # noqa: E402
from ros2_posenet.geometric.scene_map import SceneMap, filter_by_agreement, select_keyframes  # noqa: E402
from ros2_posenet.geometric.map_builder import (  # noqa: E402
    build_scene_map, calibrate_held_out, open_dataset, pose_matrix, shifted_depth_lift_factory,
)

SECTIONS = ("accuracy", "solvers", "misregistered", "timing", "speed")


def ensure_scene(root: Path, config: SyntheticSceneConfig) -> Path:
    if not (root / "scene.yaml").is_file():
        print(f"rendering {root} ({config.frames_train} + {config.frames_test} frames at {config.width}x{config.height}) ...", flush=True)
        generate_scene(root, config, overwrite=True)
    return root


def cached_map(path: Path, root: Path, features: FeatureConfig, points="depth", lift_factory=None, agreement=1,
               calibrate_frames=40, base: Path | None = None, spacing: tuple[float, float] = (0.25, 15.0),
               allowed: np.ndarray | None = None, calibrate_split: str = "between-keyframes") -> tuple[SceneMap, dict]:
    """Build (or reload) a map of ``root``'s training images; returns it and its build figures.

    With ``base`` (a cached map file) and ``agreement`` > 1 the map is that one, filtered.
    ``spacing``: keyframe spacing (metres, degrees); ``allowed``: the training images that may become keyframes (default: all).
    ``calibrate_split``: how the covariance is calibrated (:func:`calibrate_held_out`; build-map's default is ``auto``).
    """
    if path.is_file():
        scene_map = SceneMap.load(path)
        return scene_map, scene_map.metadata["bench"]
    train = open_dataset("7scenes", root, "train")
    poses = np.stack([pose_matrix(train, i) for i in range(len(train))])
    allowed = np.arange(len(train)) if allowed is None else np.asarray(allowed, np.int64)
    keyframes = allowed[select_keyframes(poses[allowed], *spacing)]
    start = time.perf_counter()
    if base is not None and base.is_file():
        scene_map = SceneMap.load(base)
        start -= scene_map.metadata["bench"]["build_s"]
    else:
        scene_map = build_scene_map(train, keyframes, features, points, lift_factory=lift_factory)
    if agreement > 1:
        scene_map = filter_by_agreement(scene_map, min_views=agreement)
    seconds = time.perf_counter() - start
    calibration = (calibrate_held_out(scene_map, train, keyframes, calibrate_frames, calibrate_split) if calibrate_frames
                   else {})
    scene_map.metadata["calibration"] = calibration
    scene_map.save(path)
    figures = {"keyframes": len(scene_map), "points": scene_map.num_points, "build_s": round(seconds, 1),
               "mb": round(path.stat().st_size / 1e6, 1), "covariance_scale": calibration.get("covariance_scale", 1.0)}
    scene_map.metadata["bench"] = figures
    scene_map.save(path)
    return scene_map, figures


def test_frames(root: Path, count: int | None, split: str = "test", indices=None):
    """``(rgb, K, T)`` of ``count`` evenly spaced frames of ``split`` (0/None: all), or of ``indices``."""
    data = open_dataset("7scenes", root, split)
    if indices is None:
        indices = np.arange(len(data)) if not count else np.linspace(0, len(data) - 1, count).round().astype(int)
    return [(data.load_image(int(i)), data.intrinsics(int(i)), pose_matrix(data, int(i))) for i in indices]


def errors(T, T_true) -> tuple[float, float]:
    d = pose_difference(T, T_true)
    return float(np.linalg.norm(d[:3])), float(np.degrees(np.linalg.norm(d[3:])))


def run(refiner: Refiner, frames, prior_m: float | None, prior_deg: float, seed: int = 0) -> dict:
    """Refine every frame from a perturbed ground truth (None: no prior); figures of the outputs."""
    rng = np.random.default_rng(seed)
    rows = []
    prior_cov = None if prior_m is None else np.diag([prior_m**2] * 3 + [np.radians(prior_deg) ** 2] * 3)
    for rgb, K, T_true in frames:
        prior = None if prior_m is None else perturb_pose(T_true, prior_m, prior_deg, rng)
        cpu = time.process_time()
        result = refiner.refine(rgb, K, prior, prior_cov)
        cpu_ms = (time.process_time() - cpu) * 1e3
        out_err = errors(result.T, T_true)
        prior_err = errors(prior, T_true) if prior is not None else (np.nan, np.nan)
        covariance = result.covariance if result.refined else None
        nees = mahalanobis(pose_difference(result.T, T_true), covariance) ** 2 if covariance is not None else np.nan
        rows.append({"refined": result.refined, "source": result.source, "failure": result.failure, "pos": out_err[0], "rot": out_err[1],
                     "prior_pos": prior_err[0], "prior_rot": prior_err[1], "inliers": result.inliers,
                     "nees": nees, "cpu_ms": cpu_ms, **{f"{k}_ms": v for k, v in result.timing_ms.items()}})
    return summarize(rows)


def summarize(rows: list[dict]) -> dict:
    col = lambda k: np.array([r[k] for r in rows], float)  # noqa: E731
    refined = col("refined").astype(bool)
    pos, rot, ppos, prot = col("pos"), col("rot"), col("prior_pos"), col("prior_rot")
    fine = lambda p, r: float(np.mean((p <= 0.25) & (r <= 2.0)))  # noqa: E731
    worse = refined & ((pos > ppos + 1e-9) | (rot > prot + 1e-9)) if np.all(np.isfinite(ppos)) else np.zeros_like(refined)
    return {
        "frames": len(rows), "refined": float(refined.mean()),
        "retrieval": float(np.mean([r["source"] == "retrieval" and r["refined"] for r in rows])),
        "neighbourhood": float(np.mean([r["source"] == "neighbourhood" and r["refined"] for r in rows])),
        "median_pos": float(np.median(pos)), "median_rot": float(np.median(rot)),
        "refined_median_pos": float(np.median(pos[refined])) if refined.any() else np.nan,
        "refined_median_rot": float(np.median(rot[refined])) if refined.any() else np.nan,
        "p90_pos": float(np.percentile(pos, 90)), "p90_rot": float(np.percentile(rot, 90)), "fine": fine(pos, rot),
        "fallbacks": dict(Counter(r["failure"] for r in rows if not r["refined"]).most_common()),
        "prior_fine": fine(ppos, prot) if np.all(np.isfinite(ppos)) else np.nan,
        "worse": int(worse.sum()), "inliers": float(np.median(col("inliers"))),
        "nees": float(np.nanmean(col("nees"))) if refined.any() else np.nan,
        **{k: float(np.median(col(k))) for k in ("features_ms", "matching_ms", "pose_ms", "total_ms", "cpu_ms")},
    }


def print_table(title: str, results: dict[str, dict]) -> None:
    print(f"\n## {title}\n")
    print("| run | frames | refined | of which by retrieval / confirmed around a refused pose | median pos (m) | median rot (°) | p90 pos (m) | ≤0.25 m,2° (prior) | worse than prior | median inliers | NEES/6 | ms features / matching / pose / total (CPU) |")
    print("|" + " --- |" * 12)
    for name, s in results.items():
        print(f"| {name} | {s['frames']} | {s['refined']:.1%} | {s['retrieval']:.1%} / {s['neighbourhood']:.1%} | {s['median_pos']:.4f} | {s['median_rot']:.3f} | "
              f"{s['p90_pos']:.3f} | {s['fine']:.1%} ({s['prior_fine']:.1%}) | {s['worse']} | {s['inliers']:.0f} | "
              f"{s['nees'] / 6:.2f} | {s['features_ms']:.0f} / {s['matching_ms']:.0f} / {s['pose_ms']:.0f} / "
              f"{s['total_ms']:.0f} ({s['cpu_ms']:.0f}) |", flush=True)


def print_maps(maps: dict[str, dict]) -> None:
    print("\n| map | keyframes | points | MB | build s | covariance scale |\n| --- | --- | --- | --- | --- | --- |")
    for name, m in maps.items():
        print(f"| {name} | {m['keyframes']} | {m['points']} | {m['mb']} | {m['build_s']} | {m['covariance_scale']:.2f} |")


def section_accuracy(args, work: Path) -> None:
    scene_map, figures = cached_map(work / "default_sift.npz", args.scene, FeatureConfig())
    print_maps({"default scene, SIFT, depth": figures})
    frames = test_frames(args.scene, args.frames)
    refiner = Refiner(scene_map)
    print_table("accuracy (default scene, test trajectory)", {
        f"prior = truth + ({args.prior_m} m, {args.prior_deg}°)": run(refiner, frames, args.prior_m, args.prior_deg),
        "same, retrieval off": run(Refiner(scene_map, RefinementConfig(retrieval=False)), frames, args.prior_m, args.prior_deg),
        "no prior (retrieval + refinement)": run(refiner, frames, None, 0.0),
        "grossly wrong prior (3 m, 90°)": run(refiner, frames, 3.0, 90.0, seed=1),
    })


def section_solvers(args, work: Path) -> None:
    scene_map, _ = cached_map(work / "default_sift.npz", args.scene, FeatureConfig())
    frames = test_frames(args.scene, args.frames)
    print_table("solvers (same map and priors)", {
        solver: run(Refiner(scene_map, RefinementConfig(solver=solver)), frames, args.prior_m, args.prior_deg)
        for solver in ("pycolmap", "poselib", "opencv")
    })


def section_misregistered(args, work: Path) -> None:
    dx, dy = args.depth_shift
    lift = shifted_depth_lift_factory(dx, dy)
    tag = f"shift{dx}_{dy}"
    maps, figures = {}, {}
    maps["registered depth"], figures["registered depth"] = cached_map(work / "default_sift.npz", args.scene, FeatureConfig())
    maps[f"depth shifted ({dx}, {dy}) px"], figures[f"depth shifted ({dx}, {dy}) px"] = cached_map(
        work / f"{tag}.npz", args.scene, FeatureConfig(), lift_factory=lift)
    for views in (2, 3):
        name = f"shifted + agreement of {views} keyframes"
        maps[name], figures[name] = cached_map(work / f"{tag}_agree{views}.npz", args.scene, FeatureConfig(), lift_factory=lift,
                                               agreement=views, base=work / f"{tag}.npz")
    try:
        maps["triangulation (no depth)"], figures["triangulation (no depth)"] = cached_map(
            work / "triangulation.npz", args.scene, FeatureConfig(), points="triangulation")
    except Exception as err:  # noqa: BLE001 - the depth-free mode is optional here
        print(f"(triangulation map skipped: {err})")
    print_maps(figures)
    frames = test_frames(args.scene, args.frames)
    print_table(f"misregistered depth (depth image shifted by ({dx}, {dy}) px at {frames[0][0].shape[1]}x{frames[0][0].shape[0]})",
                {name: run(Refiner(m), frames, args.prior_m, args.prior_deg) for name, m in maps.items()})


def section_timing(args, work: Path) -> None:
    root = ensure_scene(work / "scene_640", SyntheticSceneConfig(width=640, height=480, frames_train=400, frames_test=40,
                                                                 train_sequences=2))
    variants = {
        "SIFT (full 640x480)": FeatureConfig(),
        "SIFT on the half-size image (max_image_size 320)": FeatureConfig(max_image_size=320),
        "ORB (full 640x480)": FeatureConfig(type="orb"),
    }
    maps, results = {}, {}
    frames = test_frames(root, None)
    for i, (name, features) in enumerate(variants.items()):
        scene_map, maps[name] = cached_map(work / f"640_{i}.npz", root, features, calibrate_frames=20)
        results[name] = run(Refiner(scene_map), frames, args.prior_m, args.prior_deg)
    print_maps(maps)
    print_table("time per frame at 640x480 (own 640x480 scene: 400 training frames, 40 test frames)", results)


def section_speed(args, work: Path) -> None:
    """Item 8 of issue 24: ms per part at 640x480 for each speed option, accuracy alongside, same map and priors."""
    import copy

    import cv2

    from ros2_posenet.geometric import refiner as refiner_module
    from ros2_posenet.geometric.matching import guided_matches, guided_matches_dense

    root = ensure_scene(work / "scene_640", SyntheticSceneConfig(width=640, height=480, frames_train=400, frames_test=40,
                                                                 train_sequences=2))
    frames = test_frames(root, None)
    maps = {"full": cached_map(work / "640_0.npz", root, FeatureConfig(), calibrate_frames=20)}
    if args.speed_map_sizes:
        for size in args.speed_map_sizes:
            maps[f"map@{size}"] = cached_map(work / f"640_map{size}.npz", root, FeatureConfig(max_image_size=size), calibrate_frames=20)
    print_maps({name: figures for name, (_, figures) in maps.items()})

    def timed(name, scene_map, threads=2, kernel=guided_matches, **config):
        cv2.setNumThreads(threads)
        refiner_module.guided_matches = kernel
        try:
            results[name] = run(Refiner(scene_map, RefinementConfig(**config)), frames, args.prior_m, args.prior_deg)
        finally:
            refiner_module.guided_matches = guided_matches
            cv2.setNumThreads(2)

    def with_query_features(scene_map, **change):
        """The map as it is, its queries detected with ``change`` (what a query-time option does)."""
        query_map = copy.copy(scene_map)
        query_map.feature_config = FeatureConfig.from_dict({**scene_map.feature_config.to_dict(), **change})
        return query_map

    results: dict = {}
    full = maps["full"][0]
    before = dict(query_max_image_size=0)  # the defaults before issue 24 item 8
    timed("before: full-size query, dense guided window matrix", full, kernel=guided_matches_dense, **before)
    timed("full-size query, grid-indexed guided matching", full, **before)
    forced = dict(before, guided_min_inliers=6, min_inliers=10**6)
    timed("grid, guided matching forced on every frame", full, **forced)
    timed("dense, guided matching forced on every frame", full, kernel=guided_matches_dense, **forced)
    timed("full-size query, grid, OpenCV 1 thread", full, threads=1, **before)
    for n in args.speed_query_features:
        timed(f"full-size query, grid, {n} query features", with_query_features(full, max_features=n), **before)
    for size in args.speed_query_sizes:
        timed(f"query_max_image_size {size} (map full size), grid", full, query_max_image_size=size)
    timed("query_max_image_size 480, grid, OpenCV 1 thread", full, threads=1, query_max_image_size=480)
    for name, (scene_map, _) in maps.items():
        if name != "full":
            timed(f"{name} (queries as the map), grid", scene_map)
    timed("before (again, for the noise)", full, kernel=guided_matches_dense, **before)
    print_table(f"speed options at 640x480 ({len(frames)} test frames, priors {args.prior_m} m / {args.prior_deg}°; "
                f"'forced' rows: min_inliers unreachable, so all fall back; machine shared)", results)
    if args.speed_detectors:
        print_detector_times([rgb for rgb, _, _ in frames])


def detector_variants() -> dict:
    """Detectors the query could use, as ``name -> f(grey) -> keypoint count`` (issue 24 item 8: what each costs)."""
    import cv2

    def opencv_sift(layers=3, contrast=FeatureConfig().contrast_threshold, scale=1.0):
        sift = cv2.SIFT_create(FeatureConfig().max_features, layers, contrast, 10, 1.6)

        def detect(grey):
            if scale != 1.0:
                grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            return len(sift.detectAndCompute(grey, None)[0])
        return detect

    orb = cv2.ORB_create(FeatureConfig().max_features, 1.2, 8, fastThreshold=12, scoreType=cv2.ORB_HARRIS_SCORE)
    variants = {
        "OpenCV SIFT (the map's: 3 layers per octave, contrast 0.02, image doubled)": opencv_sift(),
        "OpenCV SIFT, 2 layers per octave": opencv_sift(layers=2),
        "OpenCV SIFT, contrast 0.04": opencv_sift(contrast=0.04),
        "OpenCV SIFT on the 0.875x image (query_max_image_size 560)": opencv_sift(scale=0.875),
        "OpenCV SIFT on the 0.75x image (480)": opencv_sift(scale=0.75),
        "OpenCV SIFT on the 0.5x image (the doubled octave = full size, as first octave 0)": opencv_sift(scale=0.5),
        "OpenCV ORB": lambda grey: len(orb.detectAndCompute(grey, None)[0]),
    }
    try:
        import pycolmap
    except ImportError:
        return variants
    for first_octave in (-1, 0):
        options = pycolmap.FeatureExtractionOptions()
        options.num_threads, options.sift.max_num_features, options.sift.first_octave = 2, FeatureConfig().max_features, first_octave
        options.sift.peak_threshold = FeatureConfig().contrast_threshold / 3  # OpenCV divides its threshold by the layers
        extractor = pycolmap.Sift(options, pycolmap.Device.cpu)
        variants[f"pycolmap SIFT (CPU), first octave {first_octave}"] = (
            lambda grey, extractor=extractor: len(extractor.extract(np.ascontiguousarray(grey))[0]))
    return variants


def print_detector_times(images) -> None:
    """Median ms of each detector alone (features and descriptors, OpenCV and pycolmap on 2 threads) and its keypoints."""
    import cv2

    cv2.setNumThreads(2)
    greys = [cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) for rgb in images]
    print("\n| detector (640x480, 2 threads) | ms | keypoints |\n| --- | --- | --- |")
    for name, detect in detector_variants().items():
        detect(greys[0])  # first call: allocations
        times, counts = [], []
        for grey in greys:
            start = time.perf_counter()
            counts.append(detect(grey))
            times.append((time.perf_counter() - start) * 1e3)
        print(f"| {name} | {np.median(times):.0f} | {np.median(counts):.0f} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scene", type=Path, default=Path("/tmp/scene_default"), help="default synthetic scene (rendered if missing)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_refine"), help="cache of maps and the 640x480 scene")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--frames", type=int, default=0, help="test frames per run (0: all)")
    p.add_argument("--prior-m", type=float, default=0.5)
    p.add_argument("--prior-deg", type=float, default=10.0)
    p.add_argument("--depth-shift", type=int, nargs=2, default=(4, 3), metavar=("DX", "DY"))
    p.add_argument("--speed-query-sizes", type=int, nargs="*", default=[560, 480, 400, 320], help="speed: query_max_image_size values")
    p.add_argument("--speed-query-features", type=int, nargs="*", default=[500], help="speed: query feature caps")
    p.add_argument("--speed-map-sizes", type=int, nargs="*", default=[], help="speed: maps detected at these sizes too")
    p.add_argument("--speed-detectors", action="store_true", help="speed: also time each detector alone (OpenCV SIFT "
                   "variants, ORB, pycolmap SIFT)")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    ensure_scene(args.scene, SyntheticSceneConfig())
    import os

    print(f"bench_refine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    for section in args.sections:
        start = time.perf_counter()
        globals()[f"section_{section}"](args, args.work)
        print(f"({section}: {time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

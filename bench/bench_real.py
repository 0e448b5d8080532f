#!/usr/bin/env python3
"""The geometric stage on real images: hololens-office (RGB-D walk) and the Strecha fountain.

    .venv/bin/python bench/bench_real.py                                   # both data sets, default maps
    .venv/bin/python bench/bench_real.py --datasets hololens --maps depth --set keyframes=6
    .venv/bin/python bench/bench_real.py --datasets hololens --maps depth --split validation --recall --vocabulary 1024:30000

* ``hololens``: ``../shared/data/hololens-office`` (7-Scenes layout, 540x360 JPEG, depth
  registered to colour). Maps of its training split (``depth``: points from depth;
  ``triangulation``: from matches between keyframes with their known poses, no depth);
  its 90 test frames are refined from priors = ground truth moved ``--prior-m`` (0.3 m)
  and turned ``--prior-deg`` (10°) in random directions (the regressor's typical real-data
  error), prior covariance = that size. The output is the refined pose, or the prior on fallback.
* ``fountain``: ``../shared/data/strecha-fountain-P11`` (11 photographs, ground-truth
  cameras): a triangulated map of 8 images at ``--fountain-scale`` of full size, the 3
  held-out views from ``--fountain-priors`` priors each 0.5–1 m and 10° off (bench_strecha.py
  has the per-scale study).

``--priors regressor --checkpoint CKPT``: the priors (and their covariances) are a trained regressor's
instead (cached under ``--work``); with ``--split validation`` the queries are the regressor's own
held-out blocks (``train_7scenes_cpu.yaml``: every 7th block of 15 training frames) and the map is
built without them, so ``CKPT`` must be the validated model (``RUN/<stage>/best.pt``, not the refit).
Refined frames that are wrong (> 0.25 m or > 5°) are counted, and every fallback is listed with its reason.

A data set that is absent is skipped with a line saying so. Per map it prints: refined share,
median position / rotation over all frames and over the refined ones, p90, refined frames
worse than their prior, fallbacks by ``RefinementResult.failure``, median inliers, the share of refined
frames inside the 95 % bound of their published covariance (position / rotation / 6-DoF; ideal 95 %) and ms
per frame by part (features / matching / pose / total, wall; CPU time of the process in brackets).
Maps are cached under ``--work``, triangulated ones per triangulation defaults (delete it after changing other map code).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_refine import cached_map, errors, print_maps, summarize, test_frames  # noqa: E402
from ros2_posenet.config_base import key_value  # noqa: E402
from ros2_posenet.geometric.features import FeatureConfig  # noqa: E402
from ros2_posenet.geometric.map_builder import CALIBRATION_SPLITS, map_feature_config, open_dataset  # noqa: E402
from ros2_posenet.tools.build_map import build_parser as build_map_parser  # noqa: E402
from ros2_posenet.covariance import calibration_metrics  # noqa: E402
from ros2_posenet.geometric.pnp import mahalanobis  # noqa: E402
from ros2_posenet.geometric.refiner import RefinementConfig, Refiner, perturb_pose, pose_difference  # noqa: E402
from ros2_posenet.geometric.retrieval import VisualWords  # noqa: E402
from ros2_posenet.geometric.tracking import Track, replay_stamps  # noqa: E402

DATA = ROOT / ".." / "shared" / "data"
HOLOLENS = DATA / "hololens-office"
FOUNTAIN = DATA / "strecha-fountain-P11"
MAPS = ("depth", "triangulation")


def print_results(title: str, results: dict[str, dict]) -> None:
    print(f"\n## {title}\n")
    print("| map | frames | refined | median all (m / °) | median refined (m / °) | p90 all (m / °) | worse than prior "
          "| fallbacks by failure | inliers | refined inside the 95 % bound (pos / rot / 6-DoF) "
          "| ms features / matching / pose / total (CPU) |")
    print("|" + " --- |" * 11)
    for name, s in results.items():
        fallbacks = ", ".join(f"{k} {v}" for k, v in s["fallbacks"].items()) or "–"
        wrong = f" (wrong by > 0.25 m / 5°: {s['wrong']})" if "wrong" in s else ""
        print(f"| {name} | {s['frames']} | {s['refined']:.1%} | {s['median_pos']:.4f} / {s['median_rot']:.3f} | "
              f"{s['refined_median_pos']:.4f} / {s['refined_median_rot']:.3f} | {s['p90_pos']:.3f} / {s['p90_rot']:.2f} | "
              f"{s['worse']}{wrong} | {fallbacks} | {s['inliers']:.0f} | {s.get('coverage', '–')} | "
              f"{s['features_ms']:.0f} / {s['matching_ms']:.0f} / "
              f"{s['pose_ms']:.0f} / {s['total_ms']:.0f} ({s['cpu_ms']:.0f}) |", flush=True)


def refinement_config(args) -> RefinementConfig:
    """The defaults, then ``--refine-config``, then ``--set key=value`` (YAML values)."""
    fields = RefinementConfig().to_dict()
    if args.refine_config:
        fields.update(RefinementConfig.from_yaml(args.refine_config).to_dict())
    fields.update(key_value(item) for item in args.set)
    return RefinementConfig.from_dict(fields)


def map_features(args, points: str) -> FeatureConfig:
    """build-map's features for ``points`` (its per-source defaults), with the given options over them."""
    return map_feature_config(points, max_features=args.max_features, max_image_size=args.max_image_size,
                              contrast_threshold=args.contrast_threshold)


def bench_hololens(args, config: RefinementConfig) -> None:
    if not HOLOLENS.is_dir():
        print(f"bench_real: hololens skipped, {HOLOLENS} not found")
        return
    spacing = (args.min_distance, args.min_angle)
    suffix, allowed, split, indices = "", None, "test", None
    if args.split == "validation":  # blocks of the training walk left out of the map, as the test split is built
        n = len(open_dataset("7scenes", HOLOLENS, "train"))
        # the regressor's own held-out blocks (block_split, fraction 0.15 -> k = 7, block k // 2), else every 4th
        every = args.validation_every
        held = (np.arange(n) // 15) % 7 == 3 if args.priors == "regressor" else (np.arange(n) // 15) % every == 1
        allowed, split, indices = np.flatnonzero(~held), "train", np.flatnonzero(held)
        suffix = "_val7" if args.priors == "regressor" else "_val" if every == 4 else f"_val{every}"
    frames = test_frames(HOLOLENS, 0 if args.priors == "regressor" else args.frames, split, indices)
    priors = regressor_priors(args, split, indices) if args.priors == "regressor" else None
    what = f"priors {args.prior_m} m / {args.prior_deg}° off" if priors is None else f"priors from {args.checkpoint}"
    maps, figures, results = {}, {}, {}
    for points in args.maps:
        features = map_features(args, points)
        tag = (f"f{features.max_features}_s{features.max_image_size}_c{features.contrast_threshold:g}"
               f"_d{args.min_distance:g}_a{args.min_angle:g}{suffix}")
        name = f"{points} ({tag})"
        maps[name], figures[name] = cached_map(args.work / f"hololens_{points}_{tag}{map_code_tag(points)}.npz", HOLOLENS, features, points,
                                               calibrate_frames=args.calibrate, spacing=spacing, allowed=allowed,
                                               calibrate_split=args.calibrate_split)
        if args.vocabulary or args.recall:
            start = time.perf_counter()
            if args.vocabulary:  # instead of the package's
                words, sample = (int(v) for v in args.vocabulary.split(":"))
                maps[name].visual_words = VisualWords(maps[name].descriptors, words=words, sample=sample)
            else:
                maps[name].visual_words  # noqa: B018 - the package's vocabulary, learned here to time it
            learned_s = time.perf_counter() - start
            if args.recall:
                print_retrieval_recall(name, maps[name], frames, learned_s, config)
        if priors is None:  # the same priors as bench_refine.run draws
            rng, cov = np.random.default_rng(0), np.diag([args.prior_m**2] * 3 + [np.radians(args.prior_deg) ** 2] * 3)
            drawn = np.stack([perturb_pose(T, args.prior_m, args.prior_deg, rng) for _, _, T in frames])
            results[name] = run_with_priors(Refiner(maps[name], config), frames, drawn, np.broadcast_to(cov, (len(frames), 6, 6)),
                                            args.stream_rate)
        else:
            results[name] = run_with_priors(Refiner(maps[name], config), frames, *priors, args.stream_rate)
    print_maps(figures)
    print_results(f"hololens-office {args.split} split ({len(frames)} frames), {what}", results)


def print_retrieval_recall(name: str, scene_map, frames, learned_s: float, config: RefinementConfig) -> None:
    """How often the bag of visual words ranks a keyframe near the truth (<= 0.75 m, among the ``keyframes`` an exact prior would try) among its
    best 20 / 40 for the queried frames: the bound on what retrieval can find (issue 21)."""
    from ros2_posenet.geometric.features import detect_features, query_feature_config

    query_features = query_feature_config(scene_map.feature_config, config.query_max_image_size)
    words = scene_map.visual_words
    found, reachable = Counter(), 0
    for rgb, _, T in frames:
        near = {int(i) for i in scene_map.nearest_keyframes(T, config.keyframes, config.metres_per_radian, config.max_keyframe_angle_deg)
                if np.linalg.norm(scene_map.poses[i][:3, 3] - T[:3, 3]) <= 0.75}
        reachable += bool(near)
        ranked = np.argsort(-words.similarities(detect_features(rgb, query_features)[1]), kind="stable")
        found.update(k for k in (20, 40) if near & {int(i) for i in ranked[:k]})
    n = len(frames)
    print(f"{name}: vocabulary of {len(words.centres)} words learned in {learned_s:.1f} s; a keyframe near the truth exists "
          f"for {reachable}/{n} frames, is among the best 20 for {found[20] / n:.1%}, the best 40 for {found[40] / n:.1%}",
          flush=True)


def map_code_tag(points: str) -> str:
    """A cache-name part that changes with the triangulation's defaults, so a cached map built before they changed
    is not reused (depth maps have no such settings)."""
    if points != "triangulation":
        return ""
    import hashlib
    import json

    from ros2_posenet.geometric.triangulation import TriangulationConfig

    return "_t" + hashlib.sha1(json.dumps(TriangulationConfig().to_dict(), sort_keys=True).encode()).hexdigest()[:6]


def regressor_priors(args, split: str, indices) -> tuple[np.ndarray, np.ndarray]:
    """The regressor's poses (N, 4, 4) and covariances (N, 6, 6) for the queried frames (cached under ``--work``)."""
    import hashlib

    import torch

    from ros2_posenet.data import build_dataset
    from ros2_posenet.evaluate import covariance_forward
    from ros2_posenet.geometry import pose_to_matrix
    from ros2_posenet.inference import Relocalizer
    from ros2_posenet.metrics import predict_poses

    key = hashlib.sha1(f"{Path(args.checkpoint).resolve()}:{split}:{indices if indices is None else list(indices)}".encode())
    cache = args.work / f"priors_{key.hexdigest()[:12]}.npz"
    if not cache.is_file():
        reloc = Relocalizer(str(args.checkpoint), device="cpu")
        dataset = build_dataset("7scenes", HOLOLENS, split, reloc.preprocessor.config, augment=False, max_points=0)
        if indices is not None:
            dataset = torch.utils.data.Subset(dataset, [int(i) for i in indices])
        covariances: list[torch.Tensor] = []
        pred = predict_poses(covariance_forward(reloc, covariances), dataset, 32, 0)
        poses = np.stack([pose_to_matrix(t.double().numpy(), q.double().numpy())
                          for t, q in zip(pred["pred_t"], pred["pred_q"])])
        np.savez(cache, poses=poses, covariances=torch.cat(covariances).double().numpy())
    data = np.load(cache)
    return data["poses"], data["covariances"]


def run_with_priors(refiner: Refiner, frames, priors: np.ndarray, covariances: np.ndarray, stream_rate: float = 0.0) -> dict:
    """Refine every frame from the given priors; figures of the outputs, wrong refined frames counted, fallbacks listed.

    ``stream_rate`` > 0: the frames, in order, are one camera stream at that rate, tracked as the node does.
    """
    rows = []
    track = Track.for_config(refiner.config) if stream_rate else None
    stamps = replay_stamps([""] * len(frames), stream_rate) if track else np.zeros(len(frames))
    for (rgb, K, T_true), prior, prior_cov, stamp in zip(frames, priors, covariances, stamps):
        cpu = time.process_time()
        result = track.refine(refiner, stamp, rgb, K, prior, prior_cov) if track else refiner.refine(rgb, K, prior, prior_cov)
        cpu_ms = (time.process_time() - cpu) * 1e3
        out_err, prior_err = errors(result.T, T_true), errors(prior, T_true)
        residual = pose_difference(result.T, T_true)
        nees = mahalanobis(residual, result.covariance) ** 2 if result.refined else np.nan
        rows.append({"refined": result.refined, "source": result.source, "failure": result.failure,
                     "pos": out_err[0], "rot": out_err[1], "prior_pos": prior_err[0], "prior_rot": prior_err[1],
                     "inliers": result.inliers, "nees": nees, "cpu_ms": cpu_ms, "reason": result.reason,
                     "residual": residual, "covariance": result.covariance,
                     **{f"{k}_ms": v for k, v in result.timing_ms.items()}})
    summary = summarize(rows)
    summary["coverage"] = refined_coverage(rows)
    summary["wrong"] = sum(r["refined"] and (r["pos"] > 0.25 or r["rot"] > 5.0) for r in rows)
    print(f"\nrefined frames wrong by > 0.25 m or > 5°: {summary['wrong']}; refined by source: "
          f"{dict(Counter(r['source'] for r in rows if r['refined']))}; fallbacks "
          f"(prior error m / °: failure: reason):", flush=True)
    for r in rows:
        if not r["refined"]:
            print(f"  {r['prior_pos']:.2f} / {r['prior_rot']:.1f}: {r['failure']}: {r['reason'][:300]}")
        elif r["pos"] > 0.25 or r["rot"] > 5.0:
            print(f"  WRONG {r['pos']:.2f} m / {r['rot']:.1f}° (prior {r['prior_pos']:.2f} / {r['prior_rot']:.1f}), "
                  f"{r['source']}: {r['reason'][:300]}")
    return summary


def refined_coverage(rows: list[dict]) -> str:
    """``pos / rot / 6-DoF`` shares of the refined frames inside the 95 % bound of their published (geometric)
    covariance, what the verified pose topic tells an EKF ("–" without refined frames)."""
    refined = [r for r in rows if r["refined"] and r["covariance"] is not None]
    if not refined:
        return "–"
    metrics = calibration_metrics(torch.from_numpy(np.stack([r["residual"] for r in refined])),
                                  torch.from_numpy(np.stack([r["covariance"] for r in refined])))
    return " / ".join(f"{metrics[f'{block}_within_95']:.0%}" for block in ("position", "rotation", "joint"))


def bench_fountain(args, config: RefinementConfig) -> None:
    if not FOUNTAIN.is_dir():
        print(f"bench_real: fountain skipped, {FOUNTAIN} not found")
        return
    from bench_strecha import build_map, open_split, relocalise

    train, test = open_split(FOUNTAIN)
    scene_map, seconds = build_map(train, args.fountain_scale, 4000)
    rows = relocalise(Refiner(scene_map, config), test, args.fountain_priors, far_m=5.0)
    runs = [r for row in rows for r in row["runs"]]
    refined = [r for r in runs if r["status"] == "refined"]
    pos = np.array([r["pos_m"] for r in refined]) if refined else np.array([np.nan])
    rot = np.array([r["rot_deg"] for r in refined]) if refined else np.array([np.nan])
    print(f"\n## fountain (map of {len(train)} images at scale {args.fountain_scale:g}, built in {seconds:.0f} s, "
          f"{scene_map.num_points} observations)\n")
    print(f"refined {len(refined)}/{len(runs)} from priors 0.5-1 m, 10°; median {np.median(pos) * 1e3:.1f} mm / "
          f"{np.median(rot):.3f}°, worst {pos.max() * 1e3:.1f} mm / {rot.max():.3f}°; "
          f"ms/frame {np.median([r['ms'] for r in runs]):.0f}; 5 m priors: "
          + "; ".join(f"{row['view']} {row['far']['status']} ({row['far']['source']})" for row in rows), flush=True)


def main(argv=None) -> int:
    build_map_cli = build_map_parser()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", choices=("hololens", "fountain"), default=["hololens", "fountain"])
    p.add_argument("--maps", nargs="+", choices=MAPS, default=list(MAPS))
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_real"), help="map cache")
    p.add_argument("--frames", type=int, default=0, help="hololens test frames (0: all 90)")
    p.add_argument("--split", choices=("test", "validation"), default="test",
                   help="validation: every 4th block of 15 training frames is left out of the map and queried (for tuning)")
    p.add_argument("--validation-every", type=int, default=4, choices=(3, 4),
                   help="--split validation with perturbed priors: every Nth block is held out (3: the middle block of each "
                        "run of 45 training frames, so a held-out block has map frames on both sides, as a test block has)")
    p.add_argument("--priors", choices=("perturbed", "regressor"), default="perturbed",
                   help="hololens priors: the truth moved --prior-m / --prior-deg, or a regressor's (--checkpoint)")
    p.add_argument("--checkpoint", type=Path, help="regressor checkpoint for --priors regressor")
    p.add_argument("--stream-rate", type=float, default=0.0,
                   help="hololens: > 0 replays the queried frames in order as one stream at this rate (Hz), tracked as the "
                        "node does (the blocks of a split jump: the track must recover); 0: every frame alone")
    p.add_argument("--prior-m", type=float, default=0.3)
    p.add_argument("--prior-deg", type=float, default=10.0)
    p.add_argument("--max-features", type=int, default=None, help="default: build-map's for the map's point source")
    p.add_argument("--max-image-size", type=int, default=0)
    p.add_argument("--contrast-threshold", type=float, default=None, help="default: build-map's for the map's point source")
    p.add_argument("--min-distance", type=float, default=build_map_cli.get_default("min_distance"), help="keyframe spacing (m), as build-map")
    p.add_argument("--min-angle", type=float, default=build_map_cli.get_default("min_angle"), help="keyframe spacing (deg), as build-map")
    p.add_argument("--calibrate", type=int, default=build_map_cli.get_default("calibrate"),
                   help="training frames that calibrate the map's covariance and focal scatter, as build-map")
    p.add_argument("--calibrate-split", default=build_map_cli.get_default("calibrate_split"),
                   choices=CALIBRATION_SPLITS, help="as build-map's")
    p.add_argument("--refine-config", type=Path, help="RefinementConfig YAML (default: the defaults)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="RefinementConfig overrides")
    p.add_argument("--vocabulary", metavar="WORDS:SAMPLE",
                   help="hololens: retrieval's bag of visual words with this many words learned from this many descriptors "
                        "(default: the package's, geometric/retrieval.py)")
    p.add_argument("--recall", action="store_true",
                   help="hololens: also print how often the bag of words ranks a keyframe near the truth among its best 20 / 40")
    p.add_argument("--fountain-scale", type=float, default=0.25)
    p.add_argument("--fountain-priors", type=int, default=3)
    args = p.parse_args(argv)
    if args.priors == "regressor" and not (args.checkpoint and args.checkpoint.is_file()):
        p.error("--priors regressor needs --checkpoint FILE (a trained regressor)")
    args.work.mkdir(parents=True, exist_ok=True)
    config = refinement_config(args)
    print(f"bench_real: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; refinement "
          f"{ {k: v for k, v in config.to_dict().items() if v != RefinementConfig().to_dict()[k]} or 'defaults'}")
    for name in args.datasets:
        start = time.perf_counter()
        {"hololens": bench_hololens, "fountain": bench_fountain}[name](args, config)
        print(f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Does the published covariance cover the errors on frames of a new run? Refined poses, and the regressor's.

Per case the map is built from the training split (cached under ``--work``), calibrated two ways,
and the test frames are refined from priors = truth moved ``--prior-m`` / turned ``--prior-deg``
(the geometric covariance does not depend on the prior):

* ``old``: the calibration before issue 22: images between the keyframes (``held_out_indices``),
  one scale = mean NEES / 6;
* ``new``: :func:`~ros2_posenet.geometric.map_builder.calibrate_held_out` (parts of the trajectory
  left out of the map in turn, refined from priors drawn from the refiner's prior model, scale + floor +
  cross-term model fitted on coverage; ``build-map``'s default).

Cases: ``synthetic`` (the default synthetic scene, ``--scene``), ``misregistered`` (the same with
its depth read ``--depth-shift`` px off the colour image), ``hololens`` (hololens-office, test split:
every fourth 15-frame block of the walk), ``fountain`` (Strecha fountain-P11: 8 map views triangulated,
the 3 held-out views; calibration leaves each map view out in turn). Printed per case and
calibration: refined share, median errors, NEES (joint 6-DoF median / mean), share of frames
inside the 68/95/99 % bounds (position / rotation / joint), frames with joint NEES > 50, and for
``new`` the share of calibration frames the σ-gate would pass (the gate's ``gate_sigma`` per block).
A reliability plot per case goes to ``--out``.

Cases ``regressor`` (``--checkpoint``, a regressor trained on ``--scene``) and ``regressor-hololens``
(``--hololens-checkpoint``) give the regressor's covariance on the test split: as stored at
training time, and recalibrated now by :func:`ros2_posenet.covariance.calibrate_methods` on the
same validation split (predicted by the validated run where the checkpoint is a refit). The
fountain has no regressor case: 11 photos cannot train and validate one. Every run ends with a
summary of all cases in ``--out/results.json`` (earlier runs' included): regressor and refined,
position / rotation / 6-DoF.

    .venv/bin/python bench/bench_covariance.py --cases synthetic misregistered hololens fountain
    .venv/bin/python bench/bench_covariance.py --cases regressor --checkpoint runs/synthetic/best.pt
    .venv/bin/python bench/bench_covariance.py --cases regressor-hololens --hololens-checkpoint runs/holo/refit/reprojection/best.pt
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ros2_posenet.covariance import (  # noqa: E402
    REPORT_LEVELS, block_nees, calibration_metrics, covariance_matrix, nees, within_bounds,
)
from ros2_posenet.data import build_dataset  # noqa: E402
from ros2_posenet.geometric.features import FeatureConfig  # noqa: E402
from ros2_posenet.geometric.map_builder import (  # noqa: E402
    build_scene_map, calibrate_held_out, held_out_indices, map_feature_config, open_dataset, pose_matrix,
    shifted_depth_lift_factory,
)
from ros2_posenet.geometric.refiner import (  # noqa: E402
    Refiner, calibration_residuals, perturb_pose, pose_difference,
)
from ros2_posenet.geometric.scene_map import SceneMap, select_keyframes  # noqa: E402
from ros2_posenet.plots import plot_reliability  # noqa: E402

DATA = ROOT / ".." / "shared" / "data"
CASES = ("synthetic", "misregistered", "hololens", "fountain", "fountain-loo", "regressor", "regressor-hololens",
         "synthetic-triangulated", "hololens-triangulated")
# Refined cases and regressor cases of the same data, for the summary table.
SUMMARY = (("synthetic", "synthetic", "regressor"), ("hololens-office test split", "hololens", "regressor-hololens"),
           ("fountain, 3 held-out views", "fountain", None), ("fountain, each view held out", "fountain-loo", None),
           ("synthetic, depth misregistered", "misregistered", None), ("synthetic, triangulated map", "synthetic-triangulated", None),
           ("hololens-office test split, triangulated map", "hololens-triangulated", None))
NO_FOUNTAIN_REGRESSOR = "not measured: 11 photos (8 map views) cannot train and validate a regressor"
FOUNTAIN_HELD_OUT = ("0002.jpg", "0005.jpg", "0008.jpg")


def old_calibration(scene_map: SceneMap, dataset, keyframes: np.ndarray, count: int = 40) -> dict:
    """The calibration before issue 22: non-keyframes against the whole map, one scale = mean NEES / 6."""
    idx = held_out_indices(len(dataset), keyframes, count)
    data = calibration_residuals(scene_map, ((dataset.load_image(int(i)), dataset.intrinsics(int(i)), pose_matrix(dataset, int(i)))
                                             for i in idx), prior_metres=0.3, prior_degrees=5.0)
    scale = float(np.mean(nees(torch.from_numpy(data["residuals"]), torch.from_numpy(data["unit"])).numpy()) / 6) \
        if len(data["residuals"]) else 1.0
    errors = np.linalg.norm(data["residuals"][:, :3], axis=1), np.degrees(np.linalg.norm(data["residuals"][:, 3:], axis=1))
    return {"method": "between-keyframes, mean NEES", "frames": data["frames"], "refined": len(data["residuals"]),
            "covariance_scale": scale, "median_position_m": float(np.median(errors[0])) if len(errors[0]) else np.nan,
            "median_rotation_deg": float(np.median(errors[1])) if len(errors[1]) else np.nan}


def refine_test(scene_map: SceneMap, frames, prior_m: float, prior_deg: float, seed: int = 0) -> dict:
    """Refine every test frame (default settings, the map's calibration); published poses and covariances."""
    refiner = Refiner(scene_map)
    rng = np.random.default_rng(seed)
    rows = {"refined": [], "residual": [], "covariance": [], "prior_residual": []}
    for rgb, K, T_true in frames:
        prior = perturb_pose(T_true, prior_m, prior_deg, rng)
        result = refiner.refine(rgb, K, prior, None)
        rows["refined"].append(result.refined)
        rows["residual"].append(pose_difference(result.T, T_true))
        rows["covariance"].append(result.covariance if result.refined else np.full((6, 6), np.nan))
    return {k: np.array(v) for k, v in rows.items() if v}


def summarize(test: dict) -> dict:
    refined = test["refined"].astype(bool)
    residuals, cov = test["residual"][refined], test["covariance"][refined]
    pos, rot = np.linalg.norm(residuals[:, :3], axis=1), np.degrees(np.linalg.norm(residuals[:, 3:], axis=1))
    out = {"frames": int(len(refined)), "refined": float(refined.mean()),
           "median_position_m": float(np.median(pos)) if len(pos) else np.nan,
           "median_rotation_deg": float(np.median(rot)) if len(rot) else np.nan}
    if len(residuals):
        out.update(calibration_metrics(torch.from_numpy(residuals), torch.from_numpy(cov)))
        out["joint_nees_over_50"] = int((block_nees(residuals, cov)["joint"] > 50).sum())
    return out


def with_calibration(scene_map: SceneMap, calibration: dict) -> SceneMap:
    scene_map.metadata = {**scene_map.metadata, "calibration": calibration}
    return scene_map


def run_case(name: str, scene_map: SceneMap, train, keyframes, frames, args, split: str = "auto", folds: int = 5,
             old: bool = True) -> dict:
    start = time.perf_counter()
    calibrations = {}
    if old:
        calibrations["old"] = old_calibration(scene_map, train, keyframes)
    calibrations["new"] = calibrate_held_out(scene_map, train, keyframes, args.calibrate, split, folds, 15)
    calibration_s = time.perf_counter() - start
    results = {}
    for which, calibration in calibrations.items():
        test = refine_test(with_calibration(scene_map, calibration), frames, args.prior_m, args.prior_deg)
        results[which] = {"calibration": calibration, "test": summarize(test)}
        refined = test["refined"].astype(bool)
        if refined.any():
            plot_reliability(block_nees(test["residual"][refined], test["covariance"][refined]),
                             args.out / f"reliability_{name}_{which}.png",
                             f"{name}: refined test frames, {which} calibration ({calibration['method']})")
    results["calibration_s"] = calibration_s
    print_case(name, results)
    return results


def print_case(name: str, results: dict) -> None:
    levels = "/".join(str(round(p * 100)) for p in REPORT_LEVELS)
    print(f"\n## {name}\n")
    print(f"| calibration | on (refined/tried, their median error) | model | test frames | refined | median pos (m) / rot (°) | "
          f"NEES 6-DoF median / mean (ideal 5.35 / 6) | inside {levels} %: position | rotation | 6-DoF | 6-DoF NEES > 50 |")
    print("|" + " --- |" * 11)
    for which in ("old", "new"):
        if which not in results:
            continue
        c, t = results[which]["calibration"], results[which]["test"]
        model = c.get("model") or {"position_scale": c["covariance_scale"], "rotation_scale": c["covariance_scale"],
                                   "position_floor_m": 0.0, "rotation_floor_rad": 0.0, "cross": 1.0}
        described = (f"x{model['position_scale']:.3g}/{model['rotation_scale']:.3g} + {model['position_floor_m'] * 100:.2g} cm/"
                     f"{np.degrees(model['rotation_floor_rad']):.2g}°, cross x{model['cross']:.2f}")
        on = f"{c['refined']}/{c['frames']}" + (f", median {c['median_position_m']:.3f} m / {c['median_rotation_deg']:.2f}°"
                                                 if "median_position_m" in c else "")
        print(f"| {which}: {c['method']} | {on} | {described} | {t['frames']} | {t['refined']:.1%} | "
              f"{t['median_position_m']:.4f} / {t['median_rotation_deg']:.3f} | "
              f"{t.get('nees_joint_median', np.nan):.2f} / {t.get('nees_joint_mean', np.nan):.1f} | {within(t, 'position')} | "
              f"{within(t, 'rotation')} | {within(t, 'joint')} | {t.get('joint_nees_over_50', '-')} |", flush=True)
    fit = results["new"]["calibration"].get("fit") or {}
    if fit:
        print(f"\nnew calibration on its own frames: inside 95 % position {fit['position_within_95']:.0%}, rotation "
              f"{fit['rotation_within_95']:.0%}, 6-DoF {fit['joint_within_95']:.0%}; calibration took {results['calibration_s']:.0f} s")


# ----------------------------------------------------------------------------- cases


def seven_scenes_case(name: str, root: Path, work: Path, args, lift_factory=None, points: str = "depth") -> dict:
    path = work / f"{name}.npz"
    train = open_dataset("7scenes", root, "train")
    poses = np.stack([pose_matrix(train, i) for i in range(len(train))])
    keyframes = select_keyframes(poses, 0.25, 15.0)
    if path.is_file():
        scene_map = SceneMap.load(path)
    else:
        scene_map = build_scene_map(train, keyframes, FeatureConfig() if points == "depth" else map_feature_config(points), points,
                                    lift_factory=lift_factory)
        scene_map.save(path)
    test = open_dataset("7scenes", root, "test")
    idx = np.arange(len(test)) if not args.frames else np.linspace(0, len(test) - 1, args.frames).round().astype(int)
    frames = [(test.load_image(int(i)), test.intrinsics(int(i)), pose_matrix(test, int(i))) for i in idx]
    print(f"\n{name}: {len(keyframes)} keyframes of {len(train)} training images, {len(frames)} test frames", flush=True)
    return run_case(name, scene_map, train, keyframes, frames, args)


def fountain_split(held_out: list[str], path: Path, args):
    """(map images, held-out frames, the triangulated map of the map images, cached at ``path``)."""
    root = DATA / "strecha-fountain-P11"
    train = build_dataset("posed", root, "train", held_out=held_out)
    test = build_dataset("posed", root, "test", held_out=held_out)
    if path.is_file():
        scene_map = SceneMap.load(path)
    else:
        features = FeatureConfig(max_features=4000, max_image_size=args.fountain_size)
        scene_map = build_scene_map(train, np.arange(len(train)), features, "triangulation")
        scene_map.save(path)
    frames = [(test.load_image(i), test.intrinsics(i), pose_matrix(test, i)) for i in range(len(test))]
    return train, frames, scene_map


def fountain_case(work: Path, args) -> dict:
    train, frames, scene_map = fountain_split(list(FOUNTAIN_HELD_OUT), work / "fountain.npz", args)
    keyframes = np.arange(len(train))
    print(f"\nfountain: {len(train)} map views, {len(frames)} held-out views, detection at {args.fountain_size} px", flush=True)
    # No image lies between the map views: the old calibration had nothing to calibrate on (scale 1).
    return run_case("fountain", scene_map, train, keyframes, frames, args, split="blocks", folds=len(train))


def fountain_leave_one_out_case(work: Path, args) -> dict:
    """Every fountain view held out in turn: map of the other 10, calibrated by leaving each of them out."""
    names = build_dataset("posed", DATA / "strecha-fountain-P11", "train", held_out=[]).names
    tests = {"old": [], "new": []}
    calibrations = {}
    for view in names:
        train, frames, scene_map = fountain_split([view], work / f"fountain_without_{Path(view).stem}.npz", args)
        keyframes = np.arange(len(train))
        calibrations[view] = calibrate_held_out(scene_map, train, keyframes, len(train), "blocks", len(train), 1)
        for which, calibration in (("old", {"method": "none (no image between the map views)", "covariance_scale": 1.0}),
                                   ("new", calibrations[view])):
            tests[which].append(refine_test(with_calibration(scene_map, calibration), frames, args.prior_m, args.prior_deg))
    results = {}
    for which, parts in tests.items():
        test = {k: np.concatenate([t[k] for t in parts]) for k in parts[0]}
        refined = test["refined"].astype(bool)
        plot_reliability(block_nees(test["residual"][refined], test["covariance"][refined]),
                         args.out / f"reliability_fountain_leave_one_out_{which}.png",
                         f"fountain: each of the 11 views held out, {which} calibration")
        calibration = calibrations[names[0]] if which == "new" else {"method": "none", "frames": 0, "refined": 0,
                                                                     "covariance_scale": 1.0}
        results[which] = {"calibration": {**calibration, "method": calibration["method"] + " (first view's map shown)"
                                          if which == "new" else calibration["method"]}, "test": summarize(test)}
    results["calibration_s"] = float("nan")
    print_case("fountain, each view held out in turn (11 maps of 10 views)", results)
    return results


def regressor_predictions(payload: dict, dataset) -> tuple[dict, dict]:
    """The eval-mode regressor of ``payload`` on ``dataset``: ``predict_poses``' dict and each per-frame method's unit covariance."""
    from ros2_posenet.checkpoint import model_from_checkpoint
    from ros2_posenet.covariance import unit_covariances
    from ros2_posenet.metrics import predict_poses

    model = model_from_checkpoint(payload).eval()
    unc = payload["train_config"]["uncertainty"]
    samples = unc["mc_samples"] if model.config.dropout > 0 else 0
    covs: dict[str, list] = {}

    def forward(images):
        out = model.uncertainty_outputs(images, samples)
        for k, v in unit_covariances(out).items():
            covs.setdefault(k, []).append(v)
        return out["t"].float(), out["q"].float()

    return predict_poses(forward, dataset, 64), {k: torch.cat(v) for k, v in covs.items()}


def validated_checkpoint(payload: dict) -> dict:
    """The checkpoint whose validation split calibrates ``payload``: itself, or for a refit (``train.refit``:
    trained on every frame, validation frames included) the validated run's same stage."""
    from ros2_posenet.checkpoint import load_checkpoint

    source = payload["train_config"]["train"].get("calibrate_from")
    return load_checkpoint(Path(source) / payload["stage"] / "best.pt") if source else payload


def regressor_case(name: str, checkpoint: Path, scene: Path, args) -> dict:
    """The regressor's published covariance on the test split: as stored at training, and recalibrated
    now (:func:`~ros2_posenet.covariance.calibrate_methods`) on the same validation frames, predicted
    by the validated model (a refit checkpoint saw them in training)."""
    from ros2_posenet.checkpoint import load_checkpoint, preprocess_from_checkpoint
    from ros2_posenet.covariance import calibrate_methods, pose_residuals
    from ros2_posenet.train import sequence_ids, validation_split

    payload = load_checkpoint(checkpoint)
    validated = validated_checkpoint(payload)
    cfg, unc = validated["train_config"], validated["train_config"]["uncertainty"]
    full = build_dataset(cfg["data"]["kind"], scene, "train", preprocess_from_checkpoint(validated), augment=False, max_points=0)
    val = torch.utils.data.Subset(full, validation_split(sequence_ids(full), cfg["data"]).val)
    test = build_dataset(cfg["data"]["kind"], scene, "test", preprocess_from_checkpoint(payload), augment=False, max_points=0)
    (val_pred, val_units), (test_pred, test_units) = regressor_predictions(validated, val), regressor_predictions(payload, test)
    fixed, uncertainty = calibrate_methods(val_pred["pred_t"], val_pred["pred_q"], val_pred["true_t"], val_pred["true_q"],
                                           val_units, unc["method"], unc["mc_samples"], val_pred["index"].numpy())
    residuals = pose_residuals(test_pred["pred_t"], test_pred["pred_q"], test_pred["true_t"], test_pred["true_q"])
    if args.write_recalibrated:  # for evaluate --map with today's calibration
        args.write_recalibrated.mkdir(parents=True, exist_ok=True)
        torch.save({**payload, "covariance": {**fixed, "uncertainty": uncertainty}},
                   args.write_recalibrated / f"{name}_recalibrated.pt")
    rows = {}
    for label, calibration in (("stored at training", payload["covariance"]), ("recalibrated now", {**fixed, "uncertainty": uncertainty})):
        for method, c in regressor_covariances(calibration, test_units, len(residuals)).items():
            rows[f"{method}, {label}"] = calibration_metrics(residuals, c)
            if label == "recalibrated now" and method == payload["train_config"]["uncertainty"]["method"]:
                plot_reliability(block_nees(residuals, c), args.out / f"reliability_regressor_{name}.png",
                                 f"regressor ({method}) on {name}'s test frames")
    pos = residuals[:, :3].norm(dim=1).median().item()
    rot = np.degrees(residuals[:, 3:].norm(dim=1).median().item())
    print(f"\n## regressor: {name} ({checkpoint}; {len(residuals)} test frames; median {pos:.3f} m, {rot:.2f}°; "
          f"validation {len(val)} frames{', predicted by the validated run' if validated is not payload else ''}; "
          f"fixed scales recalibrated {fixed['scale_fit']})\n")
    levels = "/".join(str(round(p * 100)) for p in REPORT_LEVELS)
    print(f"| covariance | NEES 6-DoF median / mean | inside {levels} %: position | rotation | 6-DoF |\n|" + " --- |" * 5)
    for label, m in rows.items():
        print(f"| {label} | {m['nees_joint_median']:.2f} / {m['nees_joint_mean']:.1f} | {within(m, 'position')} | "
              f"{within(m, 'rotation')} | {within(m, 'joint')} |")
    return {"rows": rows, "method": payload["train_config"]["uncertainty"]["method"], "median_position_m": pos,
            "median_rotation_deg": rot, "frames": len(residuals)}


def within(metrics: dict, block: str) -> str:
    """``68/95/99`` shares of ``block`` inside its bounds, as percentages ("-" without them)."""
    if f"{block}_within_95" not in metrics:
        return "-"
    return within_bounds(metrics, block)


def regressor_covariances(calibration: dict, units: dict, n: int) -> dict:
    """Per method, the (n, 6, 6) covariance ``Relocalizer`` would publish with ``calibration``."""
    from ros2_posenet.covariance import scale_covariance, with_floor

    out = {"fixed": torch.from_numpy(np.broadcast_to(covariance_matrix(calibration), (n, 6, 6)).copy())}
    for method, scales in calibration.get("uncertainty", {}).get("scales", {}).items():
        if method in units:
            out[method] = with_floor(scale_covariance(units[method], *scales))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES[:5]))
    p.add_argument("--scene", type=Path, default=Path("/tmp/scene_default"), help="default synthetic scene (synth-scene --out)")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_covariance"), help="cache of maps")
    p.add_argument("--out", type=Path, default=Path("runs/bench_covariance"), help="plots and results.json")
    p.add_argument("--frames", type=int, default=0, help="test frames per case (0: all)")
    p.add_argument("--calibrate", type=int, default=60, help="calibration images (build-map --calibrate)")
    p.add_argument("--prior-m", type=float, default=0.3)
    p.add_argument("--prior-deg", type=float, default=10.0)
    p.add_argument("--depth-shift", type=int, nargs=2, default=(4, 3), metavar=("DX", "DY"))
    p.add_argument("--fountain-size", type=int, default=1024, help="longer image side for detection on the fountain")
    p.add_argument("--checkpoint", type=Path, help="regressor trained on --scene (case regressor)")
    p.add_argument("--hololens-checkpoint", type=Path, help="regressor trained on hololens-office (case regressor-hololens)")
    p.add_argument("--write-recalibrated", type=Path, metavar="DIR",
                   help="regressor cases: also save each checkpoint with the recalibrated covariance as DIR/<data>_recalibrated.pt")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for case in args.cases:
        start = time.perf_counter()
        if case == "synthetic":
            results[case] = seven_scenes_case("synthetic", args.scene, args.work, args)
        elif case == "misregistered":
            results[case] = seven_scenes_case(f"misregistered_{args.depth_shift[0]}_{args.depth_shift[1]}", args.scene,
                                              args.work, args, shifted_depth_lift_factory(*args.depth_shift))
        elif case == "hololens":
            results[case] = seven_scenes_case("hololens", DATA / "hololens-office", args.work, args)
        elif case in ("synthetic-triangulated", "hololens-triangulated"):
            root = args.scene if case.startswith("synthetic") else DATA / "hololens-office"
            results[case] = seven_scenes_case(case, root, args.work, args, points="triangulation")
        elif case == "fountain":
            results[case] = fountain_case(args.work, args)
        elif case == "fountain-loo":
            results[case] = fountain_leave_one_out_case(args.work, args)
        elif case == "regressor":
            if args.checkpoint is None:
                p.error("case regressor needs --checkpoint")
            results[case] = regressor_case("synthetic", args.checkpoint, args.scene, args)
        elif case == "regressor-hololens":
            if args.hololens_checkpoint is None:
                p.error("case regressor-hololens needs --hololens-checkpoint")
            results[case] = regressor_case("hololens", args.hololens_checkpoint, DATA / "hololens-office", args)
        print(f"({case}: {time.perf_counter() - start:.0f} s)", flush=True)
    path = args.out / "results.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    results = {**previous, **results}
    path.write_text(json.dumps(results, indent=1, default=float))
    print_summary(results)
    return 0


def print_summary(results: dict) -> None:
    """One table of every case in ``results`` (this run's and earlier runs' into the same ``--out``)."""
    print("\n## summary: share of test frames inside the 95 % bound (ideal 95 %, band 90–98 %)\n")
    print("| data | poses | frames | position | rotation | 6-DoF |\n|" + " --- |" * 6)
    for label, refined_case, regressor in SUMMARY:
        if regressor in results:
            r = results[regressor]
            for which in ("stored at training", "recalibrated now"):
                m = r["rows"][f"{r['method']}, {which}"]
                print(f"| {label} | regressor ({r['method']}, {which}) | {r['frames']} | {m['position_within_95']:.0%} | "
                      f"{m['rotation_within_95']:.0%} | {m['joint_within_95']:.0%} |")
        elif refined_case.startswith("fountain") and refined_case in results:
            print(f"| {label} | regressor | - | {NO_FOUNTAIN_REGRESSOR} | | |")
        if refined_case in results:
            for which in ("old", "new"):
                t = results[refined_case].get(which, {}).get("test", {})
                if "joint_within_95" in t:
                    print(f"| {label} | refined ({which} calibration) | {t['frames']} × {t['refined']:.0%} | "
                          f"{t['position_within_95']:.0%} | {t['rotation_within_95']:.0%} | {t['joint_within_95']:.0%} |")


if __name__ == "__main__":
    sys.exit(main())

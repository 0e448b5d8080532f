"""Evaluate a checkpoint: pose error statistics, baselines for context, tables and plots.

``evaluate --checkpoint runs/synthetic/reprojection/best.pt --dataset synthetic --root data/synthetic``

Errors: position error is the Euclidean distance in metres; rotation error is the
geodesic angle ``2·acos|<q̂, q>|`` in degrees (never a difference of Euler angles).
Per scene we report median and mean errors and the share of frames within
(0.25 m, 2°), (0.5 m, 5°) and (5 m, 10°), next to two baselines: the training
set's mean pose, and nearest-neighbour image retrieval over the training images.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .baselines import MeanPoseBaseline, NearestNeighbourBaseline
from .checkpoint import CheckpointError
from .config_base import ConfigError, key_value
from .covariance import REPORT_LEVELS, UNCERTAINTY_METHODS, block_nees, calibration_metrics, pose_residuals, within_bounds
from .geometric.refiner import RefinementConfig, Refiner
from .geometric.retrieval import tiny_image_descriptor
from .geometric.scene_map import MapError
from .geometric.tracking import Track, replay_stamps
from .inference import Relocalizer
from .metrics import (
    METHOD_MEAN, METHOD_MODEL, METHOD_NN, METHOD_REFINED, METHOD_RETRIEVAL_REFINED, THRESHOLDS, Forward, dataset_poses,
    pose_errors, predict_poses, record_field, summarize_errors, threshold_key, unwrap_subset,
)

log = logging.getLogger(__name__)


def covariance_forward(reloc: Relocalizer, sink: list) -> Forward:
    """:meth:`Relocalizer.forward_batch_with_covariance` as a :data:`Forward`; each batch's
    per-frame covariances (B, 6, 6) are appended to ``sink`` (in dataset order)."""

    def forward(images: torch.Tensor):
        t, q, cov = reloc.forward_batch_with_covariance(images)
        sink.append(cov.cpu())
        return t.float(), q.float()

    return forward


def image_descriptors(dataset, progress: bool = False, desc: str = "descriptors") -> torch.Tensor:
    """Tiny-image descriptors (N, D) of a dataset's raw images (``dataset.load_image``)."""
    base, indices = unwrap_subset(dataset)
    rows = [tiny_image_descriptor(base.load_image(i)) for i in tqdm(indices, desc=desc, leave=False, disable=not progress)]
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, 1)


# ----------------------------------------------------------------------------- evaluation


def evaluate_checkpoint(
    checkpoint: str | Path,
    dataset_kind: str,
    root: str | Path,
    split: str = "test",
    out_dir: str | Path | None = None,
    baselines: bool = True,
    train_root: str | Path | None = None,
    batch_size: int = 32,
    workers: int = 0,
    device: str = "auto",
    plots: bool = True,
    progress: bool = False,
    map_file: str | Path | None = None,
    refine_config=None,
    uncertainty: str | None = None,
    data_options: dict | None = None,
    stream_rate_hz: float = 0.0,
) -> dict:
    """Errors of a checkpoint on one scene's split, with baselines; optionally writes files.

    ``data_options``: loader-specific options, as ``data.options`` in training (e.g. Bundler's ``split_file``).

    ``calibration`` holds how well the published per-frame covariance (``uncertainty``; None:
    the checkpoint's method) fits the model's errors: NEES medians and chi-square coverage of
    position, rotation and the joint 6-DoF pose (what robot_localization's Mahalanobis gate sees;
    :func:`ros2_posenet.covariance.calibration_metrics`); with plots, ``reliability.png`` (and
    ``reliability_refined.png`` with a map, for ``calibration_refined``).

    With ``map_file`` (a :class:`~ros2_posenet.geometric.scene_map.SceneMap` from ``build-map``)
    two more rows: the regressor's poses refined against the map, and retrieval +
    refinement without the regressor (:func:`refinement_predictions`); rows then carry
    ``ms_per_frame`` (and the refined ones ``refined_share``, ``median_inliers``): for the
    regressor its batched prediction time per frame (image decoding included), for a
    refinement row the mean wall time of ``Refiner.refine`` (plus the regressor's, for
    ``posenet + refinement``). ``stream_rate_hz`` > 0: the split's frames, in order, are a camera
    stream at that rate, and each frame's first prior is the last verified pose (the node's
    tracking, :class:`~ros2_posenet.geometric.tracking.Track`); 0: every frame alone.

    Returns a dict with ``scene``, ``split``, ``checkpoint``, ``methods`` (method name ->
    :func:`summarize_errors` dict) and ``files`` (written paths). With ``out_dir`` it
    writes ``results.json``, ``results.csv``, ``frames.csv`` (per-frame predictions and
    errors) and, with ``plots``, ``error_cdf.png`` and ``trajectory.png``.
    """
    from .data import build_dataset

    reloc = Relocalizer(str(checkpoint), device=device, uncertainty=uncertainty, checkpoint_setting="--checkpoint")
    preprocess = reloc.preprocessor.config
    data_options = data_options or {}
    dataset = build_dataset(dataset_kind, root, split, preprocess, augment=False, max_points=0, **data_options)
    if len(dataset) == 0:
        raise ValueError(f"the {split} split of {root} has no images")
    scene = getattr(dataset, "scene_name", Path(root).name)
    scene_map = None
    if map_file is not None:
        from .geometric.scene_map import SceneMap

        scene_map = SceneMap.load(map_file)  # fail before the long part
    started = time.perf_counter()
    covariances: list[torch.Tensor] = []
    pred = predict_poses(covariance_forward(reloc, covariances), dataset, batch_size, workers, progress, desc=f"{scene} {split}")
    model_ms = (time.perf_counter() - started) * 1e3 / len(dataset)
    per_method = {METHOD_MODEL: (pred["pred_t"], pred["pred_q"])}
    residuals = pose_residuals(pred["pred_t"], pred["pred_q"], pred["true_t"], pred["true_q"])
    covariance = torch.cat(covariances)
    extras = {}
    if scene_map is not None:
        refined, extras, refined_covariance = refinement_predictions(scene_map, dataset, pred["pred_t"], pred["pred_q"],
                                                                     covariance.numpy(), refine_config, progress,
                                                                     stream_rate_hz)
        per_method.update(refined)
        extras[METHOD_MODEL] = {"ms_per_frame": model_ms}
        extras[METHOD_REFINED]["ms_per_frame"] += model_ms  # the refinement runs after the regressor

    if baselines:
        train_set = build_dataset(dataset_kind, train_root or root, "train", preprocess, augment=False, max_points=0, **data_options)
        per_method.update(baseline_predictions(train_set, dataset, progress))

    errors = {name: pose_errors(t, q, pred["true_t"], pred["true_q"]) for name, (t, q) in per_method.items()}
    result = {
        "scene": scene,
        "split": split,
        "checkpoint": str(checkpoint),
        "map_frame": reloc.map_frame,
        "methods": {name: {**summarize_errors(*err), **extras.get(name, {})} for name, err in errors.items()},
        "calibration": {"uncertainty": reloc.uncertainty, **calibration_metrics(residuals, covariance)},
        "files": {},
    }
    published = {"": (residuals, covariance, f"{reloc.uncertainty} covariance")}
    if scene_map is not None:  # refined frames carry the geometric covariance, fallbacks the regressor's
        t, q = per_method[METHOD_REFINED]
        refined_residuals = pose_residuals(t, q, pred["true_t"], pred["true_q"])
        result["calibration_refined"] = {
            "uncertainty": f"{METHOD_REFINED}: geometric / {reloc.uncertainty}",
            **calibration_metrics(refined_residuals, refined_covariance),
        }
        published["_refined"] = (refined_residuals, refined_covariance, f"{METHOD_REFINED} (geometric / {reloc.uncertainty})")
    if out_dir is not None:
        result["files"] = write_scene_outputs(Path(out_dir), result, dataset, pred, per_method, errors, plots)
        if plots:
            from .plots import plot_reliability

            for suffix, (res, cov, what) in published.items():
                result["files"][f"reliability{suffix}"] = str(plot_reliability(
                    block_nees(res, cov), Path(out_dir) / f"{scene}_reliability{suffix}.png", f"{scene} ({split}): {what}",
                ))
    return result


def baseline_predictions(train_set, query_set, progress: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean-pose and nearest-neighbour predictions for every image of ``query_set``."""
    train_t, train_q = dataset_poses(train_set)
    mean_pose = MeanPoseBaseline(train_t, train_q)
    retrieval = NearestNeighbourBaseline(image_descriptors(train_set, progress, "train descriptors"), train_t, train_q)
    return {
        METHOD_MEAN: mean_pose.predict(len(query_set)),
        METHOD_NN: retrieval.predict(image_descriptors(query_set, progress, "query descriptors")),
    }


def refinement_predictions(scene_map, dataset, prior_t: torch.Tensor, prior_q: torch.Tensor, prior_covariance,
                           config=None, progress: bool = False, stream_rate_hz: float = 0.0) -> tuple[dict, dict, torch.Tensor]:
    """The regressor's poses refined against ``scene_map``, and retrieval + refinement (no prior).

    Args:
        prior_t, prior_q: (N, 3), (N, 4) the regressor's poses, in dataset order.
        prior_covariance: (6, 6) or per frame (N, 6, 6): the regressor's covariance (the gate's prior uncertainty).
        config: :class:`~ros2_posenet.geometric.refiner.RefinementConfig` (default settings if None).
        stream_rate_hz: > 0: the frames in order are a camera stream at this rate; the regressor
            + refinement row tracks (:class:`~ros2_posenet.geometric.tracking.Track`).

    Returns:
        ``({method: (t (N, 3), q (N, 4))}, {method: {"ms_per_frame", "refined_share", "median_inliers"}}, covariance)``;
        a fallback frame keeps the prior (retrieval + refinement: the best retrieved keyframe's pose).
        ``covariance`` (N, 6, 6): what the node publishes with the regressor + refinement poses, the
        geometric covariance of refined frames and the prior's of fallback ones.
    """
    from .geometry import matrix_to_pose, pose_to_matrix

    refiner = Refiner(scene_map, config)
    base, indices = unwrap_subset(dataset)
    track = Track.for_config(refiner.config) if stream_rate_hz else None
    if track:
        from .train import sequence_ids  # the training split's reading of a frame's sequence

        sequences = sequence_ids(base)
        stamps = replay_stamps([sequences[i] for i in indices], stream_rate_hz)
    prior_covariance = np.asarray(prior_covariance, dtype=float)
    if prior_covariance.shape == (6, 6):
        prior_covariance = np.broadcast_to(prior_covariance, (len(indices), 6, 6))
    poses = {METHOD_REFINED: [], METHOD_RETRIEVAL_REFINED: []}
    stats = {name: {"ms": [], "refined": [], "inliers": [], "tracked": []} for name in poses}
    published_covariance = []
    for k, i in enumerate(tqdm(indices, desc="refine", leave=False, disable=not progress)):
        rgb, K = base.load_image(i), base.intrinsics(i)
        prior = pose_to_matrix(prior_t[k].double().numpy(), prior_q[k].double().numpy())
        for name, args in ((METHOD_REFINED, (prior, prior_covariance[k])), (METHOD_RETRIEVAL_REFINED, (None, None))):
            if track and name == METHOD_REFINED:
                result = track.refine(refiner, stamps[k], rgb, K, *args)
            else:
                result = refiner.refine(rgb, K, *args)
            poses[name].append(np.concatenate(matrix_to_pose(result.T)))
            stats[name]["ms"].append(result.timing_ms["total"])
            stats[name]["refined"].append(result.refined)
            stats[name]["inliers"].append(result.inliers)
            stats[name]["tracked"].append(result.refined and result.source == "tracking")
            if name == METHOD_REFINED:
                published_covariance.append(result.covariance)
    predictions = {
        name: (torch.tensor(np.array(rows)[:, :3], dtype=torch.float32), torch.tensor(np.array(rows)[:, 3:], dtype=torch.float32))
        for name, rows in poses.items()
    }
    extras = {
        name: {"ms_per_frame": float(np.mean(s["ms"])), "refined_share": float(np.mean(s["refined"])),
               "median_inliers": float(np.median(s["inliers"])),
               **({"tracked_share": float(np.mean(s["tracked"]))} if track and name == METHOD_REFINED else {})}
        for name, s in stats.items()
    }
    return predictions, extras, torch.as_tensor(np.array(published_covariance), dtype=torch.float64)


def write_scene_outputs(out_dir: Path, result: dict, dataset, pred: dict, per_method: dict, errors: dict, plots: bool) -> dict:
    """Per-frame CSV and PNG plots of one scene; returns the written paths."""
    from .plots import plot_error_cdfs, plot_trajectory

    out_dir.mkdir(parents=True, exist_ok=True)
    scene = result["scene"]
    files = {"frames": str(write_frames_csv(out_dir / f"{scene}_frames.csv", dataset, pred, errors[METHOD_MODEL]))}
    if plots:
        title = f"{scene} ({result['split']}, {len(pred['true_t'])} frames)"
        files["error_cdf"] = str(plot_error_cdfs(errors, out_dir / f"{scene}_error_cdf.png", title))
        files["trajectory"] = str(
            plot_trajectory(pred["true_t"].numpy(), per_method[METHOD_MODEL][0].numpy(), out_dir / f"{scene}_trajectory.png", title)
        )
    return files


def write_frames_csv(path: Path, dataset, pred: dict, model_errors) -> Path:
    """One row per frame: image, true and predicted pose (w,x,y,z), errors."""
    base, indices = unwrap_subset(dataset)
    names = [str(record_field(base.samples[i], "image_path")) if _has_field(base.samples[i], "image_path") else str(i) for i in indices]
    axes = ("x", "y", "z")
    quat = ("qw", "qx", "qy", "qz")
    header = ["index", "image", *(f"true_{a}" for a in axes + quat), *(f"pred_{a}" for a in axes + quat), "position_error_m", "rotation_error_deg"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for k in range(len(pred["true_t"])):
            i = int(pred["index"][k])
            writer.writerow(
                [i, names[k] if k < len(names) else i]
                + [f"{v:.6f}" for v in pred["true_t"][k].tolist() + pred["true_q"][k].tolist()]
                + [f"{v:.6f}" for v in pred["pred_t"][k].tolist() + pred["pred_q"][k].tolist()]
                + [f"{model_errors[0][k]:.6f}", f"{model_errors[1][k]:.6f}"]
            )
    return path


def _has_field(record, name: str) -> bool:
    return name in record if isinstance(record, dict) else hasattr(record, name)


# ----------------------------------------------------------------------------- reporting

TABLE_COLUMNS = (
    ("median_position_m", "med pos (m)", "{:.3f}"),
    ("median_rotation_deg", "med rot (°)", "{:.2f}"),
    ("mean_position_m", "mean pos (m)", "{:.3f}"),
    ("mean_rotation_deg", "mean rot (°)", "{:.2f}"),
) + tuple((threshold_key(m, d), f"≤{m:g}m,{d:g}°", "{:.1%}") for m, d in THRESHOLDS)


def result_rows(results: list[dict]) -> list[dict]:
    """Flatten scene results into one row per (scene, method)."""
    return [
        {"scene": r["scene"], "split": r["split"], "method": method, **summary}
        for r in results
        for method, summary in r["methods"].items()
    ]


# Shown only when some row has them (evaluate --map).
OPTIONAL_COLUMNS = (("ms_per_frame", "ms/frame", "{:.1f}"), ("refined_share", "refined", "{:.1%}"))


def format_calibration(results: list[dict]) -> str:
    """One line per scene: NEES medians and chi-square coverage of the published covariance
    (position, rotation: 3 dof; 6-DoF: the whole pose with its cross terms, as an EKF gates it)."""
    lines = []
    for r, c in ((r, c) for r in results for c in (r["calibration"], r.get("calibration_refined")) if c):
        lines.append(
            f"{r['scene']} covariance ({c['uncertainty']}): NEES median position {c['nees_position_median']:.2f}, "
            f"rotation {c['nees_rotation_median']:.2f} (ideal {c['nees_ideal_median']:.2f}), 6-DoF "
            f"{c['nees_joint_median']:.2f} (ideal {c['nees_ideal_median_joint']:.2f}, mean {c['nees_joint_mean']:.1f}); "
            f"inside the {'/'.join(str(round(p * 100)) for p in REPORT_LEVELS)} % bounds: position {within_bounds(c, 'position')}, "
            f"rotation {within_bounds(c, 'rotation')}, 6-DoF {within_bounds(c, 'joint')}"
        )
    return "\n".join(lines)


def format_table(results: list[dict]) -> str:
    """Fixed-width text table, one row per scene and method."""
    rows = result_rows(results)
    columns = TABLE_COLUMNS + tuple(c for c in OPTIONAL_COLUMNS if any(c[0] in row for row in rows))
    header = ["scene", "method", "frames"] + [title for _, title, _ in columns]
    lines = [
        [row["scene"], row["method"], str(row["frames"])]
        + [fmt.format(row[key]) if key in row else "" for key, _, fmt in columns]
        for row in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    render = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([render(header), "  ".join("-" * w for w in widths)] + [render(line) for line in lines])


def write_results(results: list[dict], out_dir: str | Path) -> dict[str, Path]:
    """``results.json`` (everything) and ``results.csv`` (one row per scene and method)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / "results.json", out_dir / "results.csv"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    rows = result_rows(results)
    with open(csv_path, "w", newline="") as f:
        fields = list(dict.fromkeys(key for row in rows for key in row)) or ["scene"]  # rows may differ (--map)
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return {"json": json_path, "csv": csv_path}


# ----------------------------------------------------------------------------- CLI


def parse_options(items: list[str]) -> dict:
    """``["key=value", ...]`` -> dict, values read as YAML scalars (numbers, booleans, strings)."""
    options = {}
    for item in items:
        try:
            key, value = key_value(item)
        except ConfigError as err:
            raise ValueError(f"--data-option: {err}") from None
        options[key] = value
    return options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posenet-evaluate",
        description="Pose errors of PoseNet checkpoints per scene, beside mean-pose and image-retrieval baselines.",
    )
    p.add_argument("--checkpoint", action="append", required=True, help="checkpoint .pt (repeat, paired with --root, for several scenes)")
    p.add_argument("--dataset", required=True, help="dataset kind, as for training (e.g. cambridge, 7scenes, bundler)")
    p.add_argument("--root", action="append", required=True, help="scene folder (repeat for several scenes)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                   help="loader option, as data.options in training (e.g. split_file=list.query.txt for bundler); repeatable")
    p.add_argument("--train-root", default=None, help="scene folder holding the training split for the baselines (default: --root)")
    p.add_argument("--out", default=None, help="folder for results.json, results.csv, per-frame CSVs and plots")
    p.add_argument("--no-baselines", action="store_true", help="skip the mean-pose and nearest-neighbour baselines")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--uncertainty", choices=UNCERTAINTY_METHODS, default=None,
                   help="per-frame covariance to assess (default: the checkpoint's method)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--map", action="append", default=None, metavar="FILE",
                   help="scene map from build-map (repeat, paired with --root): adds the rows "
                        "'posenet + refinement' and 'retrieval + refinement' with time per frame")
    p.add_argument("--refine-config", type=Path, default=None, metavar="YAML",
                   help="refinement settings (RefinementConfig fields, e.g. config/refine.yaml)")
    p.add_argument("--stream-rate", type=float, default=0.0, metavar="HZ",
                   help="with --map: replay the split's frames in order as a camera stream at HZ, each frame's first "
                        "prior the last verified pose, as the node tracks (default 0: every frame alone, as the paper)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    checkpoints, roots = args.checkpoint, args.root
    if len(checkpoints) == 1 and len(roots) > 1:
        checkpoints = checkpoints * len(roots)
    if len(checkpoints) != len(roots):
        print(f"evaluate: give one --checkpoint per --root (got {len(args.checkpoint)} and {len(roots)})", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.workers < 0:
        print("evaluate: --batch-size must be >= 1 and --workers >= 0", file=sys.stderr)
        return 2
    maps = args.map or [None] * len(roots)
    if len(maps) != len(roots):
        print(f"evaluate: give one --map per --root (got {len(maps)} and {len(roots)})", file=sys.stderr)
        return 2
    results = []
    try:
        refine_config = RefinementConfig.from_yaml(args.refine_config) if args.refine_config else None
        for ckpt, root, map_file in zip(checkpoints, roots, maps):
            results.append(
                evaluate_checkpoint(
                    ckpt, args.dataset, root, split=args.split, out_dir=args.out, baselines=not args.no_baselines,
                    train_root=args.train_root, batch_size=args.batch_size, workers=args.workers,
                    device=args.device, plots=not args.no_plots, progress=sys.stderr.isatty(), uncertainty=args.uncertainty,
                    map_file=map_file, refine_config=refine_config, data_options=parse_options(args.data_option),
                    stream_rate_hz=args.stream_rate,
                )
            )
    except (CheckpointError, MapError, ValueError, TypeError, FileNotFoundError) as err:  # DatasetError is a ValueError; TypeError: a bad --data-option
        print(f"evaluate: {err}", file=sys.stderr)
        return 2
    print(format_table(results))
    print(format_calibration(results))
    if args.out:
        paths = write_results(results, args.out)
        print(f"wrote {paths['json']}, {paths['csv']}" + ("" if args.no_plots else " and plots") + f" in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The main job end to end (`make demo`): synthetic scene -> two-stage training -> evaluation ->
the real ROS 2 node relocalising the held-out images replayed over topics -> report.

Everything lands in one run folder (default ``runs/demo-<time>``): the scene, checkpoints,
evaluation tables and plots, the node's answers (``node_poses.csv``) and ``report.md``.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from ..covariance import REPORT_LEVELS, within_bounds
from ..evaluate import METHOD_REFINED
from ..data.synthetic import SyntheticSceneConfig
from ..geometry import matrix_to_pose, optical_pose_to_body, pose_to_matrix, rotation_angle_deg_np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "config" / "train_synthetic.yaml"
SCENE_DEFAULTS = SyntheticSceneConfig()


def say(message: str) -> None:
    print(f"[demo {datetime.now():%H:%M:%S}] {message}", flush=True)


def make_scene(scene_dir: Path, frames_train: int, frames_test: int, train_sequences: int, seed: int) -> dict:
    """Generate the synthetic scene once; reuse it when the same one is already there."""
    import yaml

    from ..data.synthetic import generate_scene

    config = SyntheticSceneConfig(seed=seed, frames_train=frames_train, frames_test=frames_test, train_sequences=train_sequences)
    summary_file = scene_dir / "scene.yaml"
    if summary_file.is_file():
        summary = yaml.safe_load(summary_file.read_text())
        if summary.get("config") == config.to_dict():
            say(f"reusing the synthetic scene in {scene_dir}")
            return summary
    say(f"step 1/4: rendering the synthetic scene ({frames_train} training frames in {train_sequences} sequences + {frames_test} test frames) -> {scene_dir}")
    return generate_scene(scene_dir, config, overwrite=True, progress=True)


def train(config_path: Path, scene_dir: Path, out_dir: Path, overrides: list[str]) -> dict:
    from ..train import load_config, run_training

    cfg = load_config(config_path, [f"data.root={scene_dir}", f"train.out_dir={out_dir}", *overrides])
    stages = " then ".join(f"{s['name']} ({s.get('epochs')} epochs)" for s in cfg["stages"])
    say(f"step 2/4: training {cfg['model']['backbone']} on the CPU/GPU: {stages}")
    return run_training(cfg)


def build_map(scene_dir: Path, map_file: Path) -> Path:
    """The scene map of the geometric stage (keyframes of the training images, SIFT, points from depth)."""
    from . import build_map as tool

    say(f"step 3/4: building the scene map of the training images for the geometric refinement -> {map_file}")
    if tool.main(["--dataset", "7scenes", "--root", str(scene_dir), "--out", str(map_file), "--quiet"]) != 0:
        raise RuntimeError("build-map failed (see the message above)")
    return map_file


def evaluate(checkpoint: str, kind: str, scene_dir: Path, out_dir: Path, map_file: Path | None = None) -> dict:
    from ..evaluate import evaluate_checkpoint, format_table, write_results

    say("step 3/4: evaluating on the held-out test sequence, with mean-pose and retrieval baselines"
        + (" and the geometric refinement (regressor + refinement, retrieval + refinement)" if map_file else ""))
    result = evaluate_checkpoint(checkpoint, kind, scene_dir, "test", out_dir=out_dir, progress=True, map_file=map_file)
    print(format_table([result]), flush=True)
    write_results([result], out_dir)  # results.json / results.csv beside the plots
    return result


def replay_through_node(checkpoint: str, kind: str, scene_dir: Path, rate_hz: float | None, map_file: Path | None = None) -> tuple[dict, list]:
    """Start the real node in-process, publish the test images, compare its poses with ground truth.

    With ``map_file`` the node refines against the map, and each image goes out with its CameraInfo.
    """
    import rclpy
    from rclpy.parameter import Parameter

    from ..data import build_dataset
    from ..ros.node import PoseNetNode
    from ..ros.replay import ensure_rclpy, replay_images

    dataset = build_dataset(kind, scene_dir, "test", augment=False, max_points=0)
    say(f"step 4/4: starting posenet_node{' with the scene map' if map_file else ''} and replaying {len(dataset)} test images "
        f"over ROS 2 ({'as fast as it answers' if not rate_hz else f'{rate_hz:g} Hz'})")
    owns_rclpy = ensure_rclpy()
    node = PoseNetNode(parameter_overrides=[
        Parameter("checkpoint", value=str(checkpoint)),
        Parameter("image_topic", value="/demo/camera/image_raw"),
        Parameter("image_qos", value="reliable"),
        Parameter("max_image_age", value=0.0),
        Parameter("log_period", value=0.0),
        Parameter("map_file", value=str(map_file or "")),
    ])
    try:
        images = (dataset.load_image(i) for i in range(len(dataset)))
        ticks = max(1, len(dataset) // 10)
        result = replay_images(
            [node], images, "/demo/camera/image_raw", node.resolve_topic_name("posenet/camera_pose"),
            # 60 s: with a map the first frame also waits for the map's vocabulary (~10 s here, more on a slow machine).
            rate_hz=rate_hz, timeout_s=60.0,
            on_progress=lambda i: (i + 1) % ticks == 0 and say(f"  replayed {i + 1}/{len(dataset)}"),
            intrinsics=(dataset.intrinsics(i) for i in range(len(dataset))) if map_file else None,
            camera_info_topic="/demo/camera/camera_info" if map_file else None,
            # The map-verified poses have their own topic; each image waits until the refiner is done with it.
            verified_topic=node.resolve_topic_name("posenet/verified/pose_with_covariance") if map_file else None,
            settled=(lambda n, result: refiner_done(node, n, result)) if map_file else None,
        )
        counts = node.counters()
    finally:
        node.destroy_node()
        if owns_rclpy:
            rclpy.shutdown()
    summary, rows = compare_with_ground_truth(result, dataset)
    if map_file:
        summary["refined"] = counts.get("refine_refined", 0)
        summary["fallback"] = counts.get("refine_fallback", 0) + counts.get("refine_no_camera_info", 0) + counts.get("refine_error", 0)
    return summary, rows


# Every frame the node's refiner finished with ends in one of these counters.
REFINE_OUTCOMES = ("refine_refined", "refine_fallback", "refine_no_camera_info", "refine_error", "refine_skipped")


def refiner_done(node, n: int, result) -> bool:
    """The node's refiner finished the first ``n`` images, and their verified poses arrived."""
    counts = node.counters()
    return sum(counts.get(k, 0) for k in REFINE_OUTCOMES) >= n and len(result.verified) >= counts.get("verified_published", 0)


def compare_with_ground_truth(result, dataset) -> tuple[dict, list]:
    """Errors of the node's camera poses (REP-103 body frame; identity camera_to_base, so also its base
    poses) against the dataset's poses: the map-verified pose where there is one, else the regressor's."""
    rows, pos_err, rot_err = [], [], []
    for i, key in enumerate(sorted(result.sent)):
        record = dataset.samples[i]
        true_body = optical_pose_to_body(pose_to_matrix(record.position, record.rotation))
        got = result.verified.get(key) or result.received.get(key)
        if got is None:
            rows.append({"frame": i, "answered": False})
            continue
        t_true, q_true = matrix_to_pose(true_body)
        t_got, q_got = matrix_to_pose(got.pose)
        pos_err.append(float(np.linalg.norm(t_got - t_true)))
        rot_err.append(rotation_angle_deg_np(q_got, q_true))
        rows.append({"frame": i, "answered": True, "x": t_got[0], "y": t_got[1], "z": t_got[2],
                     "position_error_m": pos_err[-1], "rotation_error_deg": rot_err[-1], "latency_ms": got.latency_s * 1e3,
                     "frame_id": got.frame_id})
    latencies = result.latencies() * 1e3
    summary = {
        "sent": len(result.sent),
        "answered": len(result.received),
        "median_position_m": float(np.median(pos_err)) if pos_err else float("nan"),
        "median_rotation_deg": float(np.median(rot_err)) if rot_err else float("nan"),
        "latency_median_ms": float(np.median(latencies)) if len(latencies) else float("nan"),
        "latency_p95_ms": float(np.percentile(latencies, 95)) if len(latencies) else float("nan"),
        "rate_hz": result.rate_hz,
    }
    return summary, rows


def write_rows(path: Path, rows: list[dict]) -> None:
    fields = sorted({k for row in rows for k in row}, key=lambda k: (k != "frame", k))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def covariance_lines(evaluation: dict) -> list[str]:
    """The report's covariance section: how often the truth lies inside the published covariance's bounds on the
    test frames (what robot_localization's Mahalanobis gate sees), for the regressor and for the refined poses."""
    rows = [(label, evaluation[key]) for label, key in (("posenet", "calibration"), (METHOD_REFINED, "calibration_refined"))
            if evaluation.get(key)]
    if not rows:
        return []
    levels = "/".join(str(round(p * 100)) for p in REPORT_LEVELS)
    lines = ["", "## Covariance on the test frames (what an EKF is told)", "",
             f"Share of test frames inside the published covariance's {levels} % bounds (ideal: the levels themselves; "
             "6-DoF is the whole pose with its cross terms, as robot_localization's Mahalanobis gate reads it).", "",
             f"| poses | covariance | position | rotation | 6-DoF | 6-DoF NEES median (ideal {rows[0][1]['nees_ideal_median_joint']:.2f}) |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {label} | {c['uncertainty'].split(': ', 1)[-1]} | {within_bounds(c, 'position')} | {within_bounds(c, 'rotation')} | {within_bounds(c, 'joint')} | "
              f"{c['nees_joint_median']:.2f} |" for label, c in rows]
    return lines


def write_report(run_dir: Path, scene: dict, training: dict, evaluation: dict, node: dict, seconds: dict,
                 node_refined: dict | None = None) -> Path:
    methods = evaluation["methods"]
    frames = scene.get("frames", {})
    lines = [
        "# ros2_posenet demo run", "",
        f"Run folder `{run_dir}`, {datetime.now():%Y-%m-%d %H:%M}. Scene: synthetic room, "
        f"{frames.get('train')} training + {frames.get('test')} test frames at {scene.get('width')}×{scene.get('height')}. "
        f"Checkpoint `{training['checkpoint']}` (validation: {training.get('val_split')}).", "",
        "## Offline evaluation (test sequence, never seen in training)", "",
        "| method | median position (m) | median rotation (°) | within 0.25 m, 2° | refined | ms/frame |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in methods.items():
        share = next((v for k, v in m.items() if k.startswith("within_0.25")), float("nan"))
        refined = f"{m['refined_share']:.1%}" if "refined_share" in m else ""
        ms = f"{m['ms_per_frame']:.1f}" if "ms_per_frame" in m else ""
        lines.append(f"| {name} | {m['median_position_m']:.3f} | {m['median_rotation_deg']:.2f} | {share:.1%} | {refined} | {ms} |")
    lines += [
        *covariance_lines(evaluation),
        "", "## The ROS 2 node, fed the test images over topics", "",
        f"- answered {node['answered']} of {node['sent']} images",
        f"- median error of the published camera pose: {node['median_position_m']:.3f} m, {node['median_rotation_deg']:.2f}°",
        f"- latency image publish → PoseStamped: median {node['latency_median_ms']:.1f} ms, p95 {node['latency_p95_ms']:.1f} ms; "
        f"{node['rate_hz']:.1f} answers/s",
        *([] if node_refined is None else [
            "", "## The node with the scene map (geometric refinement, CameraInfo beside each image)", "",
            f"- answered {node_refined['answered']} of {node_refined['sent']} images, {node_refined['refined']} refined, "
            f"{node_refined['fallback']} fell back to the regressor",
            f"- median error of the published camera pose: {node_refined['median_position_m']:.3f} m, {node_refined['median_rotation_deg']:.2f}°",
            f"- latency: median {node_refined['latency_median_ms']:.1f} ms, p95 {node_refined['latency_p95_ms']:.1f} ms",
        ]),
        "", "## Time", "",
        *[f"- {k}: {v:.0f} s" for k, v in seconds.items()],
        "", *[f"![{png.stem}]({png.relative_to(run_dir)})\n" for png in sorted((run_dir / "eval").glob("*.png"))],
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posenet-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="run folder (default runs/demo-<time>)")
    p.add_argument("--scene", type=Path, default=REPO / "runs" / "scene-synthetic", help="synthetic scene folder (reused if present)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training config")
    # Positions only generalise to a new trajectory with a few thousand views of the room
    # (config/train_synthetic.yaml); a few hundred suffice for rotation alone.
    p.add_argument("--frames-train", type=int, default=SCENE_DEFAULTS.frames_train)
    p.add_argument("--train-sequences", type=int, default=SCENE_DEFAULTS.train_sequences)
    p.add_argument("--frames-test", type=int, default=SCENE_DEFAULTS.frames_test)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rate", type=float, default=0.0, help="replay rate in Hz (0: send each image once the previous is answered)")
    p.add_argument("overrides", nargs="*", help="training config overrides, e.g. stages.learned.epochs=4")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.frames_train < 20 or args.frames_test < 5:
        print("demo: need at least 20 training and 5 test frames", file=sys.stderr)
        return 2
    run_dir = args.out or REPO / "runs" / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir.mkdir(parents=True, exist_ok=True)
    seconds, start = {}, time.perf_counter()
    try:
        scene = make_scene(args.scene, args.frames_train, args.frames_test, args.train_sequences, args.seed)
        seconds["scene"] = time.perf_counter() - start
        training = train(args.config, args.scene, run_dir / "train", args.overrides)
        seconds["training"] = time.perf_counter() - start - sum(seconds.values())
        import yaml

        kind = yaml.safe_load(Path(training["out_dir"], "config.yaml").read_text())["data"]["kind"]
        map_file = None
        if kind == "7scenes":  # the synthetic scene's 7-Scenes reading has depth for the map's points
            map_file = build_map(args.scene, run_dir / "map" / "scene.npz")
            seconds["map"] = time.perf_counter() - start - sum(seconds.values())
        evaluation = evaluate(training["checkpoint"], kind, args.scene, run_dir / "eval", map_file)
        seconds["evaluation"] = time.perf_counter() - start - sum(seconds.values())
        node_summary, rows = replay_through_node(training["checkpoint"], kind, args.scene, args.rate or None)
        seconds["node replay"] = time.perf_counter() - start - sum(seconds.values())
        refined_summary, refined_rows = (None, None)
        if map_file:
            refined_summary, refined_rows = replay_through_node(training["checkpoint"], kind, args.scene, args.rate or None, map_file)
            seconds["node replay with the map"] = time.perf_counter() - start - sum(seconds.values())
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"demo: {err}", file=sys.stderr)
        return 2
    write_rows(run_dir / "node_poses.csv", rows)
    (run_dir / "node_summary.json").write_text(json.dumps(node_summary, indent=2))
    if refined_summary is not None:
        write_rows(run_dir / "node_poses_refined.csv", refined_rows)
        (run_dir / "node_summary_refined.json").write_text(json.dumps(refined_summary, indent=2))
    report = write_report(run_dir, scene, training, evaluation, node_summary, seconds, refined_summary)
    say(f"node: {node_summary['answered']}/{node_summary['sent']} answered, median {node_summary['median_position_m']:.3f} m "
        f"{node_summary['median_rotation_deg']:.2f}°, latency {node_summary['latency_median_ms']:.1f} ms")
    if refined_summary is not None:
        say(f"node with the map: {refined_summary['refined']}/{refined_summary['sent']} refined, median "
            f"{refined_summary['median_position_m']:.3f} m {refined_summary['median_rotation_deg']:.2f}°, "
            f"latency {refined_summary['latency_median_ms']:.1f} ms")
    say(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

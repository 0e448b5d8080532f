"""The node with a map at a 30 Hz 640x480 camera: answers/s and latency of the regressor's and of the verified poses, refine on / off.

    .venv/bin/python bench/bench_node_refine.py [--rate 30] [--duration 20] [--driver-process] [--backend onnxruntime]
        [--work /tmp/bench_node_refine] [--json out.json]

The real ``PoseNetNode`` runs in this process with rclpy (one SingleThreadedExecutor spinning it
and, by default, the driver node; ``--driver-process``: the driver is a separate process, as a
camera driver is on a robot, and switches ``refine`` through SetParameters); the driver publishes ``sensor_msgs/Image`` (rgb8, 640x480) of a synthetic
640x480 scene at ``--rate`` Hz with fresh stamps, and its ``CameraInfo``, and records every
``posenet/pose_with_covariance`` (the regressor) and ``posenet/verified/pose_with_covariance``
(the map-verified poses) by stamp. Latency = publish of the image -> receipt of the pose.

The map: full-size SIFT on the scene's training images (``bench_refine.cached_map``); the
regressor: a resnet18 PoseNet at resize 256 / crop 224 (a real forward's cost). It is untrained,
so its *pose* is replaced by the frame's true pose moved 0.3 m / turned 5° (a trained
regressor's typical error) with a matching covariance: the refinement then works as it does
behind a trained network (refines, not falls back), and costs what it costs. Both settings run
on the same node and machine: ``refine: false`` keeps the map loaded and only the regressor
publishes. Target (issue 24 item 7): regressor rate with refine on >= 95 % of refine off.
The node refines in a child process (``ros2_posenet.geometric.refiner_process``); ``--refiner-nice``,
``--refiner-threads``, ``--refiner-idle`` and ``--switch-interval`` try other settings of it (and of the
GIL hand-over). The load average at the start is printed: the ratio means little on a busy machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from bench_forward import machine_description  # noqa: E402
from bench_refine import cached_map, ensure_scene, test_frames  # noqa: E402

IMAGE_TOPIC = "/bench_refine/camera/image_raw"
PRIOR_M, PRIOR_DEG = 0.3, 5.0


def build_checkpoint(path: Path) -> Path:
    import torch

    from ros2_posenet.checkpoint import save_checkpoint
    from ros2_posenet.model import ModelConfig, PoseNet
    from ros2_posenet.preprocess import PreprocessConfig

    torch.manual_seed(0)
    model = PoseNet(ModelConfig(backbone="resnet18", pretrained=False))
    cov = {"position_var": [PRIOR_M**2] * 3, "rotation_var": [np.radians(PRIOR_DEG) ** 2] * 3, "samples": 10}
    return save_checkpoint(path, model, PreprocessConfig(resize=256, crop=224), map_frame="map", covariance=cov)


def with_true_priors(node, frames) -> None:
    """The regressor's forward runs as usual; its pose is the frame's true pose, perturbed (see the module doc)."""
    from ros2_posenet.geometric.refiner import perturb_pose
    from ros2_posenet.geometry import matrix_to_pose
    from ros2_posenet.inference import PosePrediction

    by_key = {rgb[::97, ::89].tobytes(): T for rgb, _, T in frames}
    rng = np.random.default_rng(0)
    real_predict = node.relocalizer.predict

    def predict(rgb):
        p = real_predict(rgb)
        T = by_key.get(rgb[::97, ::89].tobytes())
        if T is None:
            return p
        t, q = matrix_to_pose(perturb_pose(T, PRIOR_M, PRIOR_DEG, rng))
        return PosePrediction(position=t, quaternion=q, covariance=p.covariance)

    node.relocalizer.predict = predict


def run_phase(driver, frames, rate: float, duration: float, counters=dict) -> dict:
    """Publish ``frames`` at ``rate`` for ``duration`` s; ``counters()``: the node's counters (in its process only)."""
    from ros2_posenet.ros.replay import camera_info_msg, rgb_image_msg

    driver.sent.clear(), driver.regressed.clear(), driver.verified.clear()
    counts_before = counters()
    period, start, i = 1.0 / rate, time.perf_counter(), 0
    while time.perf_counter() - start < duration:
        rgb, K, _ = frames[i % len(frames)]
        stamp_ns = driver.node.get_clock().now().nanoseconds
        driver.info_pub.publish(camera_info_msg(K, rgb.shape[1], rgb.shape[0], stamp_ns, "camera"))
        driver.sent[stamp_ns] = time.perf_counter()
        driver.image_pub.publish(rgb_image_msg(rgb, stamp_ns, "camera"))
        i += 1
        time.sleep(max(0.0, start + i * period - time.perf_counter()))
    time.sleep(1.0)  # the last answers
    counts = {k: v - counts_before.get(k, 0) for k, v in counters().items()}

    def stream(received: dict) -> dict:
        lat = np.array([received[k] - driver.sent[k] for k in received if k in driver.sent]) * 1e3
        return {"per_s": len(received) / duration, "p50_ms": float(np.median(lat)) if len(lat) else float("nan"),
                "p90_ms": float(np.percentile(lat, 90)) if len(lat) else float("nan")}

    return {"sent_per_s": len(driver.sent) / duration, "regressor": stream(driver.regressed), "verified": stream(driver.verified),
            "refined": counts.get("refine_refined", 0), "fallback": counts.get("refine_fallback", 0),
            "skipped": counts.get("refine_skipped", 0), "superseded": counts.get("superseded", 0)}


class Driver:
    def __init__(self, node):
        from geometry_msgs.msg import PoseWithCovarianceStamped
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image

        self.node = node
        self.sent, self.regressed, self.verified = {}, {}, {}
        qos = QoSProfile(depth=2, reliability=ReliabilityPolicy.RELIABLE)
        self.image_pub = node.create_publisher(Image, IMAGE_TOPIC, qos)
        self.info_pub = node.create_publisher(CameraInfo, "/bench_refine/camera/camera_info", qos)
        record = lambda into: lambda m: into.__setitem__(m.header.stamp.sec * 10**9 + m.header.stamp.nanosec, time.perf_counter())  # noqa: E731
        node.create_subscription(PoseWithCovarianceStamped, "/bench_refine/posenet/pose_with_covariance", record(self.regressed), 100)
        node.create_subscription(PoseWithCovarianceStamped, "/bench_refine/posenet/verified/pose_with_covariance", record(self.verified), 100)


def run_phases(driver, frames, args, set_refine, counters=dict) -> dict:
    """Warm-up, then refine off / on twice, interleaved (drifting load on the machine hits both alike)."""
    while driver.image_pub.get_subscription_count() == 0:
        time.sleep(0.05)
    run_phase(driver, frames, args.rate, 3.0, counters)  # warm-up (first forwards, SIFT, CameraInfo)
    results: dict = {}
    for refine in (False, True, False, True):
        set_refine(refine)
        results.setdefault("on" if refine else "off", []).append(run_phase(driver, frames, args.rate, args.duration / 2, counters))
    return results


def drive_from_here(args, root: Path) -> int:
    """``--as-driver``: the camera as its own process (as on a robot): publish, record, switch ``refine`` by SetParameters."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.parameter_client import AsyncParameterClient

    rclpy.init()
    node = rclpy.create_node("bench_refine_driver")
    driver = Driver(node)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    client = AsyncParameterClient(node, "/bench_refine/posenet_node")
    client.wait_for_services(timeout_sec=60.0)

    def set_refine(value: bool) -> None:
        future = client.set_parameters([Parameter("refine", value=value)])
        while not future.done():
            time.sleep(0.01)

    results = run_phases(driver, test_frames(root, None), args, set_refine)
    print(json.dumps(results), flush=True)
    executor.shutdown()
    rclpy.try_shutdown()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=30.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--cpu-threads", type=int, default=1, help="the node's cpu_threads (inference)")
    parser.add_argument("--backend", default="torch", help="the node's inference backend (torch, onnxruntime, ...)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_node_refine"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--driver-process", action="store_true", help="publish the images from a separate process (a camera driver node), not from the node's")
    parser.add_argument("--refiner-nice", type=int, help="niceness added to the refinement thread (default: the node's)")
    parser.add_argument("--refiner-threads", type=int, help="OpenCV threads of the refinement process (default: its module's)")
    parser.add_argument("--refiner-idle", type=int, choices=(0, 1), help="1/0: the refinement process under SCHED_IDLE or not "
                        "(default: its module's)")
    parser.add_argument("--switch-interval", type=float, help="sys.setswitchinterval (s) of the node's process (GIL hand-over)")
    parser.add_argument("--as-driver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root = args.work / "scene_640"
    if args.as_driver:
        return drive_from_here(args, root)

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    from ros2_posenet.data.synthetic import SyntheticSceneConfig
    from ros2_posenet.geometric.features import FeatureConfig
    from ros2_posenet.ros.node import PoseNetNode

    import os

    load_at_start = os.getloadavg()[0]
    args.work.mkdir(parents=True, exist_ok=True)
    root = ensure_scene(root, SyntheticSceneConfig(width=640, height=480, frames_train=160, frames_test=30, train_sequences=1))
    map_path = args.work / "map_640_sift.npz"
    cached_map(map_path, root, FeatureConfig(), calibrate_frames=0)
    checkpoint = build_checkpoint(args.work / "resnet18_224.pt")
    frames = test_frames(root, None)

    import ros2_posenet.geometric.refiner_process as refiner_process

    if args.refiner_nice is not None:
        import ros2_posenet.ros.node as node_module

        node_module.REFINER_NICE = refiner_process.REFINER_PROCESS_NICE = args.refiner_nice
    if args.refiner_threads is not None:
        refiner_process.REFINER_PROCESS_THREADS = args.refiner_threads
    if args.refiner_idle is not None:
        refiner_process.REFINER_PROCESS_IDLE = bool(args.refiner_idle)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    rclpy.init()
    node = PoseNetNode(namespace="bench_refine", parameter_overrides=[
        Parameter("checkpoint", value=str(checkpoint)), Parameter("map_file", value=str(map_path)), Parameter("device", value="cpu"),
        Parameter("cpu_threads", value=args.cpu_threads), Parameter("backend", value=args.backend), Parameter("image_topic", value=IMAGE_TOPIC), Parameter("image_qos", value="reliable"),
        Parameter("max_image_age", value=0.0), Parameter("log_period", value=0.0), Parameter("tf_mode", value="map_to_camera"),
    ])
    with_true_priors(node, frames)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    driver_node = None
    try:
        if args.driver_process:
            threading.Thread(target=executor.spin, daemon=True).start()
            command = [sys.executable, __file__, "--as-driver", "--rate", str(args.rate), "--duration", str(args.duration), "--work", str(args.work)]
            answer = subprocess.run(command, capture_output=True, text=True, timeout=600)
            results = json.loads(answer.stdout.strip().splitlines()[-1])
            counts = node.counters()  # whole run (warm-up included): the driver process cannot read them per phase
            print("node counters, whole run: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("refine_refined", "refine_fallback", "refine_skipped", "superseded")))
            for rows in results.values():
                for row in rows:
                    row.update(refined=0, fallback=0, skipped=0, superseded=0)
        else:
            driver_node = rclpy.create_node("bench_refine_driver")
            driver = Driver(driver_node)
            executor.add_node(driver_node)
            threading.Thread(target=executor.spin, daemon=True).start()
            results = run_phases(driver, frames, args, lambda refine: node.set_parameters([Parameter("refine", value=refine)]), node.counters)
    finally:
        executor.shutdown()
        node.destroy_node()
        if driver_node is not None:
            driver_node.destroy_node()
        rclpy.try_shutdown()

    def mean(rows, *path):
        values = [r[path[0]][path[1]] if len(path) == 2 else r[path[0]] for r in rows]
        return float(np.mean(values))

    print(f"machine: {machine_description()}; load average {load_at_start:.2f} at start, {os.getloadavg()[0]:.2f} at the end "
          "(this run's own load included)")
    print(f"camera {args.rate:g} Hz, 640x480, {args.duration:g} s per setting (two interleaved halves), node backend {args.backend}, "
          f"cpu_threads {args.cpu_threads}, "
          f"images from {'a separate driver process' if args.driver_process else 'a driver node in the node process'}")
    print("| refine | sent/s | regressor poses/s | regressor p50 / p90 ms | verified poses/s | verified p50 / p90 ms | refined | fallback | skipped by refiner | superseded |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, rows in results.items():
        print(f"| {name} | {mean(rows, 'sent_per_s'):.1f} | {mean(rows, 'regressor', 'per_s'):.1f} | {mean(rows, 'regressor', 'p50_ms'):.0f} / {mean(rows, 'regressor', 'p90_ms'):.0f} "
              f"| {mean(rows, 'verified', 'per_s'):.1f} | {mean(rows, 'verified', 'p50_ms'):.0f} / {mean(rows, 'verified', 'p90_ms'):.0f} "
              f"| {sum(r['refined'] for r in rows)} | {sum(r['fallback'] for r in rows)} | {sum(r['skipped'] for r in rows)} | {sum(r['superseded'] for r in rows)} |")
    ratio = mean(results["on"], "regressor", "per_s") / max(mean(results["off"], "regressor", "per_s"), 1e-9)
    print(f"regressor rate, refine on / off: {100 * ratio:.1f} % (target >= 95 %)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_description(), "args": {k: str(v) for k, v in vars(args).items()}, "results": results, "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

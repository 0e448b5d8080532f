"""Node overhead: Image publish -> PoseStamped receipt vs the raw forward on the same input, same run.

    python bench/bench_node_latency.py [--backbone googlenet] [--variants torch onnxruntime] [--size 224]
                                       [--frames 40] [--rate 30] [--duration 10] [--device cpu] [--json out.json]

Runs the real ``PoseNetNode`` in this process with rclpy, plus a driver node that
publishes ``sensor_msgs/Image`` (rgb8, size×size, checkpoint preprocessing
resize=crop=size so nothing is resized) and subscribes to the node's PoseStamped.
For each variant (backend):

1. raw: ``Relocalizer.forward_crops`` on the crop of the same image, timed right before each frame of 2.;
2. latency: one frame at a time, publish -> PoseStamped receipt (no queueing);
3. sustained: frames at ``--rate`` Hz for ``--duration`` s; poses received per second.

Targets (issue 7): end-to-end / raw ≤ 1.05 at 224×224; ≥ 15 Hz sustained on 2 CPU cores with GoogLeNet.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from bench_forward import VARIANTS, latencies_ms, machine_description, make_checkpoint  # noqa: E402

IMAGE_TOPIC = "/bench/image_raw"
POSE_TOPIC = "/bench/pose"


@dataclass
class NodeResult:
    variant: str
    precision: str
    size: int
    raw_ms: float = float("nan")  # median forward_crops
    e2e_ms: float = float("nan")  # median publish -> PoseStamped receipt, one frame in flight
    e2e_p90_ms: float = float("nan")
    ratio: float = float("nan")
    sustained_hz: float = float("nan")
    offered_hz: float = float("nan")
    sustained_e2e_ms: float = float("nan")
    lost: int = 0  # latency-phase frames whose pose never came
    injected: str = ""  # Relocalizer options set by swapping node.relocalizer (no node parameter yet)
    skipped: str = ""

    def row(self) -> str:
        head = f"{self.variant:<16} {self.precision:<5} {self.size:>4}"
        if self.skipped:
            return f"{head} skipped: {self.skipped}"
        return (f"{head} {self.raw_ms:8.2f} {self.e2e_ms:8.2f} {self.e2e_p90_ms:8.2f} {self.ratio:6.3f} "
                f"{self.sustained_hz:7.1f}/{self.offered_hz:<5.0f} {self.sustained_e2e_ms:9.1f} {self.lost:4d}"
                + (f"  (injected: {self.injected})" if self.injected else ""))


HEADER = (f"{'variant':<16} {'prec':<5} {'size':>4} {'raw ms':>8} {'e2e ms':>8} {'e2e p90':>8} {'ratio':>6} "
          f"{'Hz/offered':>13} {'sust. ms':>9} {'lost':>4}")


def isolate_ros_domain() -> None:
    """Keep this benchmark's DDS traffic away from other ROS processes on the machine."""
    os.environ.setdefault("ROS_DOMAIN_ID", str(150 + os.getpid() % 80))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


class Driver:
    """Publishes Images with unique stamps and records when each one's pose arrives."""

    def __init__(self, node, image_msg):
        from geometry_msgs.msg import PoseStamped
        from rclpy.qos import qos_profile_sensor_data

        self.node = node
        self.msg = image_msg
        self.pub = node.create_publisher(type(image_msg), IMAGE_TOPIC, qos_profile_sensor_data)
        self.sub = node.create_subscription(PoseStamped, POSE_TOPIC, self._on_pose, 50)
        self.sent: dict[tuple[int, int], float] = {}
        self.latencies: dict[tuple[int, int], float] = {}
        self.arrived = threading.Event()

    def _on_pose(self, msg) -> None:
        now = time.perf_counter()
        key = (msg.header.stamp.sec, msg.header.stamp.nanosec)
        if key in self.sent:
            self.latencies[key] = 1e3 * (now - self.sent[key])
            self.arrived.set()

    def publish(self) -> tuple[int, int]:
        self.msg.header.stamp = self.node.get_clock().now().to_msg()
        key = (self.msg.header.stamp.sec, self.msg.header.stamp.nanosec)
        self.arrived.clear()
        self.sent[key] = time.perf_counter()
        self.pub.publish(self.msg)
        return key

    def reset(self) -> None:
        self.sent.clear()
        self.latencies.clear()


def image_message(rgb: np.ndarray):
    from sensor_msgs.msg import Image

    h, w = rgb.shape[:2]
    msg = Image(height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3)
    msg.header.frame_id = "camera_optical_frame"
    msg.data = rgb.tobytes()
    return msg


def wait_for_connection(driver: Driver, node, timeout: float = 10.0) -> bool:
    """Both directions matched (DDS discovery), so the first frames are not lost."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.pub.get_subscription_count() > 0 and node.count_publishers(POSE_TOPIC) > 0:
            return True
        time.sleep(0.05)
    return False


def latency_phase(driver: Driver, frames: int, timeout: float, raw_forward=None) -> tuple[list[float], list[float], int]:
    """One frame in flight at a time: publish -> receipt latency, each paired with a raw forward.

    The raw forward (``raw_forward``, timed in this thread while the node is idle) runs
    right before each frame, so both see the same load on a shared machine.
    """
    driver.reset()
    raw, lost = [], 0
    for _ in range(frames):
        if raw_forward is not None:
            raw += latencies_ms(raw_forward, 1)
        key = driver.publish()
        if not driver.arrived.wait(timeout) or key not in driver.latencies:
            lost += 1
        time.sleep(0.005)  # let the node's worker settle back to waiting
    return raw, list(driver.latencies.values()), lost


def sustained_phase(driver: Driver, rate: float, duration: float) -> tuple[float, list[float]]:
    """Frames at ``rate`` Hz for ``duration`` s: poses received per second (the node drops superseded frames)."""
    driver.reset()
    period, start = 1.0 / rate, time.perf_counter()
    next_time = start
    while next_time - start < duration:
        driver.publish()
        next_time += period
        time.sleep(max(0.0, next_time - time.perf_counter()))
    time.sleep(0.5)  # the last frame's pose
    received = [lat for key, lat in driver.latencies.items() if driver.sent[key] - start < duration]
    return len(received) / duration, received


def node_parameters(checkpoint: Path, device: str, variant: str, precision: str) -> tuple[list, dict]:
    """Parameter overrides for the node, and the Relocalizer options the node has no parameter for.

    Options the node cannot take yet are applied by swapping ``node.relocalizer``
    after construction (same per-frame code path, reported as "injected").
    """
    from rclpy.parameter import Parameter

    from ros2_posenet.ros.node import PARAMETER_NAMES

    params = {"checkpoint": str(checkpoint), "device": device, "image_topic": IMAGE_TOPIC, "pose_topic": POSE_TOPIC,
              "max_image_age": 0.0, "log_period": 0.0}
    wanted = {**VARIANTS[variant], "precision": precision}
    missing = {name: value for name, value in wanted.items() if name not in PARAMETER_NAMES}
    params.update({name: value for name, value in wanted.items() if name in PARAMETER_NAMES})
    if "precision" in missing and "half" in PARAMETER_NAMES:
        params["half"] = precision == "fp16"
        del missing["precision"]
    if missing.get("backend") == "torch":  # a node without the parameter runs torch
        del missing["backend"]
    return [Parameter(name, value=value) for name, value in params.items()], missing


def bench_variant(checkpoint: Path, rgb: np.ndarray, variant: str, precision: str, args) -> NodeResult:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from ros2_posenet.ros.node import PoseNetNode

    from ros2_posenet.inference import Relocalizer

    result = NodeResult(variant, precision, rgb.shape[0])
    params, missing = node_parameters(checkpoint, args.device, variant, precision)
    try:
        node = PoseNetNode(parameter_overrides=params)
    except Exception as err:  # backend unavailable, bad device, ...
        result.skipped = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return result
    if missing:
        result.injected = ", ".join(f"{k}={v}" for k, v in missing.items())
        try:
            node.relocalizer = Relocalizer(str(checkpoint), device=args.device, precision=precision, **VARIANTS[variant])
        except Exception as err:
            node.destroy_node()
            result.skipped = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            return result
    driver_node = rclpy.create_node("posenet_bench_driver")
    driver = Driver(driver_node, image_message(rgb))
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    executor.add_node(driver_node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        reloc = node.relocalizer
        crop = reloc.crop(rgb)[None]
        if not wait_for_connection(driver, driver_node):
            result.skipped = "driver and node did not discover each other"
            return result
        latency_phase(driver, 3, args.timeout)  # warm the DDS path
        raw, e2e, result.lost = latency_phase(driver, args.frames, args.timeout, lambda: reloc.forward_crops(crop))
        result.offered_hz = args.rate
        result.sustained_hz, sustained = sustained_phase(driver, args.rate, args.duration)
        fill(result, raw, e2e, sustained)
    finally:
        executor.shutdown()
        node.destroy_node()
        driver_node.destroy_node()
    return result


def fill(result: NodeResult, raw: list[float], e2e: list[float], sustained: list[float]) -> None:
    result.raw_ms = statistics.median(raw)
    if e2e:
        result.e2e_ms = statistics.median(e2e)
        result.e2e_p90_ms = sorted(e2e)[int(0.9 * (len(e2e) - 1))]
        result.ratio = result.e2e_ms / result.raw_ms
    if sustained:
        result.sustained_e2e_ms = statistics.median(sustained)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="googlenet")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["torch", "onnxruntime"])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "fp16"], default=["fp32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--frames", type=int, default=40, help="frames of the latency phase (each paired with a raw forward)")
    parser.add_argument("--rate", type=float, default=30.0, help="camera rate of the sustained phase (Hz)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of the sustained phase")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for one pose")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    isolate_ros_domain()
    import rclpy

    rgb = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    print(f"node latency, {args.backbone} {args.size}x{args.size}, on {machine_description()}, load average {os.getloadavg()[0]:.2f}")
    print(HEADER)
    results = []
    rclpy.init()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = make_checkpoint(args.backbone, args.size, tmp)
            for variant in args.variants:
                for precision in args.precisions:
                    result = bench_variant(checkpoint, rgb, variant, precision, args)
                    print(result.row(), flush=True)
                    results.append(result)
    finally:
        rclpy.try_shutdown()
    if args.json:
        payload = {"machine": machine_description(), "backbone": args.backbone, "results": [asdict(r) for r in results]}
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0 if any(not r.skipped for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

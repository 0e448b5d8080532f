"""Node overhead: Image publish -> PoseStamped receipt, against the raw forward and a bare ROS node, same run.

    python bench/bench_node_latency.py [--backbone googlenet] [--variants torch onnxruntime]
                                       [--images 224 640x480] [--executors single events]
                                       [--frames 40] [--rate 30] [--duration 10] [--device cpu] [--json out.json]

Runs the real ``PoseNetNode`` in this process with rclpy, a driver node that publishes
``sensor_msgs/Image`` (rgb8) and subscribes to the node's PoseStamped, and the *floor*: a
bare rclpy node that receives the same Image and publishes one PoseStamped with its stamp,
no model (the cost any ROS node pays: two DDS hops, deserialising the image, one publish).
All three spin in one executor, rclpy's ``SingleThreadedExecutor`` (``single``) or
``rclpy.experimental.EventsExecutor`` (``events``). The events executor is first checked in a
subprocess: in rclpy 9.1 a ``publish`` from another thread to a subscription it spins blocks
forever (the node's worker publishes from its own thread, and e.g. tf2's listener subscribes
/tf in the same process), so its rows are skipped with that reason while the check fails. Images:

* ``224``: 224×224, checkpoint preprocessing resize = crop = 224 (nothing is resized);
* ``640x480``: a real camera's size, checkpoint resize 256 / crop 224 as in the paper, so the
  node resizes (INTER_AREA) and crops every frame: that is part of the node's share.

For each (image, backend, executor):

1. latency: one frame in flight; each frame is preceded by a raw ``forward_crops`` on the
   same crop and followed by one floor frame, so all three see the same load;
2. sustained: frames at ``--rate`` Hz for ``--duration`` s; poses received per second.

``own ms`` = node latency − forward − floor (medians): what the node itself adds; ``own min`` the
same from the three minima, which other load on the machine disturbs less. ``resize ms``
is the node's resize + crop alone (``Relocalizer.crop``), part of ``own``; ``own−rsz`` is ``own``
without it, i.e. node − (forward + resize) − floor: the issue's "forward, resize included".
Targets (issue 13): own ≤ 0.5 ms at 640×480; ≥ 29 Hz at a 30 Hz camera with onnxruntime on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from bench_forward import VARIANTS, latencies_ms, machine_description  # noqa: E402

IMAGE_TOPIC = "/bench/image_raw"
POSE_TOPIC = "/bench/pose"
FLOOR_IMAGE_TOPIC = "/bench/floor/image_raw"
FLOOR_POSE_TOPIC = "/bench/floor/pose"
IMAGES = {"224": ((224, 224), 224, 224), "640x480": ((480, 640), 256, 224)}  # name -> ((h, w), resize, crop)
EXECUTORS = ("single", "events")


@dataclass
class NodeResult:
    variant: str
    precision: str
    size: int  # crop size
    image: str = ""
    executor: str = "single"
    raw_ms: float = float("nan")  # median forward_crops
    resize_ms: float = float("nan")  # median Relocalizer.crop (resize + centre crop) of the image
    floor_ms: float = float("nan")  # median publish -> PoseStamped receipt through the bare node
    e2e_ms: float = float("nan")  # median publish -> PoseStamped receipt through PoseNetNode, one frame in flight
    e2e_p90_ms: float = float("nan")
    own_ms: float = float("nan")  # e2e - raw - floor (medians)
    own_min_ms: float = float("nan")  # the same with minima: less sensitive to other load on the machine
    ratio: float = float("nan")  # e2e / raw
    sustained_hz: float = float("nan")
    offered_hz: float = float("nan")
    sustained_e2e_ms: float = float("nan")
    lost: int = 0  # latency-phase frames whose pose never came
    injected: str = ""  # Relocalizer options set by swapping node.relocalizer (no node parameter yet)
    skipped: str = ""

    def row(self) -> str:
        head = f"{self.image or self.size:<8} {self.variant:<12} {self.executor:<7}"
        if self.skipped:
            return f"{head} skipped: {self.skipped}"
        return (f"{head} {self.raw_ms:8.2f} {self.resize_ms:7.2f} {self.floor_ms:7.2f} {self.e2e_ms:8.2f} {self.e2e_p90_ms:8.2f} "
                f"{self.own_ms:7.2f} {self.own_ms - self.resize_ms:7.2f} {self.own_min_ms:7.2f} {self.sustained_hz:6.1f}/{self.offered_hz:<4.0f} {self.sustained_e2e_ms:8.1f} {self.lost:4d}"
                + (f"  (injected: {self.injected})" if self.injected else ""))


HEADER = (f"{'image':<8} {'backend':<12} {'exec':<7} {'fwd ms':>8} {'resize':>7} {'floor':>7} {'node ms':>8} {'node p90':>8} "
          f"{'own ms':>7} {'own−rsz':>7} {'own min':>7} {'Hz/offered':>11} {'sust. ms':>8} {'lost':>4}")


def isolate_ros_domain() -> None:
    """Keep this benchmark's DDS traffic away from other ROS processes on the machine."""
    os.environ.setdefault("ROS_DOMAIN_ID", str(150 + os.getpid() % 80))
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


def make_checkpoint(backbone: str, resize: int, crop: int, directory: str | Path) -> Path:
    """Random-weight checkpoint (latency does not depend on the weights) with the given preprocessing."""
    import torch

    from ros2_posenet.checkpoint import save_checkpoint
    from ros2_posenet.model import ModelConfig, PoseNet
    from ros2_posenet.preprocess import PreprocessConfig

    torch.manual_seed(0)
    model = PoseNet(ModelConfig(backbone=backbone, pretrained=False))
    return save_checkpoint(Path(directory) / f"{backbone}_{resize}_{crop}.pt", model, PreprocessConfig(resize=resize, crop=crop))


class Driver:
    """Publishes Images with unique stamps on one topic and records when each one's pose arrives on another."""

    def __init__(self, node, image_msg, image_topic: str = IMAGE_TOPIC, pose_topic: str = POSE_TOPIC):
        from geometry_msgs.msg import PoseStamped
        from rclpy.qos import qos_profile_sensor_data

        self.node = node
        self.msg = image_msg
        self.pose_topic = pose_topic
        self.pub = node.create_publisher(type(image_msg), image_topic, qos_profile_sensor_data)
        self.sub = node.create_subscription(PoseStamped, pose_topic, self._on_pose, 50)
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

    def one_frame(self, timeout: float) -> float | None:
        """Publish one frame and wait for its pose; its latency (ms) or None when lost."""
        key = self.publish()
        if not self.arrived.wait(timeout) or key not in self.latencies:
            return None
        return self.latencies[key]

    def reset(self) -> None:
        self.sent.clear()
        self.latencies.clear()


class FloorNode:
    """The floor: receive the Image, publish one PoseStamped with its stamp. No model, no thread hand-off."""

    def __init__(self, node):
        from geometry_msgs.msg import PoseStamped
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import Image

        self._PoseStamped = PoseStamped
        self.pub = node.create_publisher(PoseStamped, FLOOR_POSE_TOPIC, 10)
        self.sub = node.create_subscription(Image, FLOOR_IMAGE_TOPIC, self._on_image, qos_profile_sensor_data)

    def _on_image(self, msg) -> None:
        pose = self._PoseStamped()
        pose.header.stamp, pose.header.frame_id = msg.header.stamp, "map"
        pose.pose.orientation.w = 1.0
        self.pub.publish(pose)


def image_message(rgb: np.ndarray):
    from sensor_msgs.msg import Image

    h, w = rgb.shape[:2]
    msg = Image(height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3)
    msg.header.frame_id = "camera_optical_frame"
    msg.data = rgb.tobytes()
    return msg


def make_executor(kind: str):
    if kind == "events":
        from rclpy.experimental import EventsExecutor

        return EventsExecutor()
    from rclpy.executors import SingleThreadedExecutor

    return SingleThreadedExecutor()


def events_executor_selftest() -> None:
    """Publish from the main thread to a subscription spun by an EventsExecutor in another thread."""
    import rclpy
    from rclpy.experimental import EventsExecutor
    from std_msgs.msg import String

    rclpy.init()
    node, received = rclpy.create_node("events_check"), []
    node.create_subscription(String, "/bench/events_check", received.append, 10)
    publisher = node.create_publisher(String, "/bench/events_check", 10)
    executor = EventsExecutor()
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    while publisher.get_subscription_count() == 0:
        time.sleep(0.05)
    for i in range(100):
        publisher.publish(String(data=str(i)))
        time.sleep(0.002)
    time.sleep(0.5)
    print(f"received {len(received)} of 100")
    os._exit(0 if received else 1)


def events_executor_problem(timeout: float = 30.0) -> str:
    """'' when the EventsExecutor survives a cross-thread publish (checked in a subprocess), else why not."""
    try:
        done = subprocess.run([sys.executable, __file__, "--events-selftest"], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"EventsExecutor deadlocks: a publish from another thread to a subscription it spins blocked > {timeout:.0f} s"
    if done.returncode != 0:
        return f"EventsExecutor check failed: {(done.stdout + done.stderr).strip().splitlines()[-1:]}"
    return ""


def wait_for_connection(drivers: list[Driver], node, timeout: float = 10.0) -> bool:
    """Every driver matched both ways (DDS discovery), so the first frames are not lost."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(d.pub.get_subscription_count() > 0 and node.count_publishers(d.pose_topic) > 0 for d in drivers):
            return True
        time.sleep(0.05)
    return False


def latency_phase(driver: Driver, frames: int, timeout: float, raw_forward=None, floor: Driver | None = None):
    """One frame in flight at a time: node latencies, each with a raw forward before and a floor frame after.

    Returns (raw ms, node ms, floor ms, lost node frames).
    """
    raw, node, floor_ms, lost = [], [], [], 0
    for _ in range(frames):
        if raw_forward is not None:
            raw += latencies_ms(raw_forward, 1)
        latency = driver.one_frame(timeout)
        if latency is None:
            lost += 1
        else:
            node.append(latency)
        time.sleep(0.005)  # let the node's worker settle back to waiting
        if floor is not None:
            latency = floor.one_frame(timeout)
            if latency is not None:
                floor_ms.append(latency)
            time.sleep(0.005)
    return raw, node, floor_ms, lost


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
    if missing.get("backend") == "torch":  # a node without the parameter runs torch
        del missing["backend"]
    return [Parameter(name, value=value) for name, value in params.items()], missing


def bench_variant(checkpoint: Path, rgb: np.ndarray, variant: str, precision: str, args, executor_kind: str | None = None) -> NodeResult:
    import rclpy

    from ros2_posenet.inference import Relocalizer
    from ros2_posenet.ros.node import PoseNetNode

    executor_kind = executor_kind or getattr(args, "executor", "single")
    h, w = rgb.shape[:2]
    result = NodeResult(variant, precision, 0, image=f"{w}x{h}" if h != w else str(h), executor=executor_kind)
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
    floor_node = rclpy.create_node("posenet_bench_floor")
    message = image_message(rgb)
    driver = Driver(driver_node, message)
    floor_driver = Driver(driver_node, message, FLOOR_IMAGE_TOPIC, FLOOR_POSE_TOPIC)
    floor = FloorNode(floor_node)  # noqa: F841 - spins in the executor
    executor = make_executor(executor_kind)
    for n in (node, driver_node, floor_node):
        executor.add_node(n)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        reloc = node.relocalizer
        result.size = reloc.crop_size
        crop = reloc.crop(rgb)[None]
        if not wait_for_connection([driver, floor_driver], driver_node):
            result.skipped = "driver and node did not discover each other"
            return result
        latency_phase(driver, 3, args.timeout, floor=floor_driver)  # warm the DDS paths
        raw, e2e, floor_ms, result.lost = latency_phase(driver, args.frames, args.timeout, lambda: reloc.forward_crops(crop), floor_driver)
        result.resize_ms = statistics.median(latencies_ms(lambda: reloc.crop(rgb), max(10, args.frames // 2)))
        result.offered_hz = args.rate
        result.sustained_hz, sustained = sustained_phase(driver, args.rate, args.duration)
        fill(result, raw, e2e, floor_ms, sustained)
    finally:
        executor.shutdown()
        spinner.join(timeout=5)
        node.destroy_node()
        driver_node.destroy_node()
        floor_node.destroy_node()
    return result


def fill(result: NodeResult, raw: list[float], e2e: list[float], floor: list[float], sustained: list[float]) -> None:
    result.raw_ms = statistics.median(raw)
    if floor:
        result.floor_ms = statistics.median(floor)
    if e2e:
        result.e2e_ms = statistics.median(e2e)
        result.e2e_p90_ms = sorted(e2e)[int(0.9 * (len(e2e) - 1))]
        result.ratio = result.e2e_ms / result.raw_ms
        result.own_ms = result.e2e_ms - result.raw_ms - result.floor_ms
        if floor:
            result.own_min_ms = min(e2e) - min(raw) - min(floor)
    if sustained:
        result.sustained_e2e_ms = statistics.median(sustained)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="googlenet")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["torch", "onnxruntime"])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "fp16"], default=["fp32"])
    parser.add_argument("--images", nargs="+", choices=list(IMAGES), default=list(IMAGES))
    parser.add_argument("--executors", nargs="+", choices=EXECUTORS, default=list(EXECUTORS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", type=int, default=40, help="frames of the latency phase (each paired with a raw forward and a floor frame)")
    parser.add_argument("--rate", type=float, default=30.0, help="camera rate of the sustained phase (Hz)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of the sustained phase")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for one pose")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--events-selftest", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    isolate_ros_domain()
    if args.events_selftest:
        events_executor_selftest()
    import rclpy

    events_problem = events_executor_problem() if "events" in args.executors else ""

    print(f"node latency, {args.backbone}, on {machine_description()}, load average {os.getloadavg()[0]:.2f}")
    print("own = node − forward − floor (medians, ms; own min: from the minima); resize is part of own")
    print(HEADER)
    results = []
    rclpy.init()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for image in args.images:
                (h, w), resize, crop = IMAGES[image]
                rgb = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
                checkpoint = make_checkpoint(args.backbone, resize, crop, tmp)
                for variant in args.variants:
                    for precision in args.precisions:
                        for executor in args.executors:
                            if executor == "events" and events_problem:
                                result = NodeResult(variant, precision, crop, image=image, executor=executor, skipped=events_problem)
                            else:
                                result = bench_variant(checkpoint, rgb, variant, precision, args, executor)
                            print(result.row(), flush=True)
                            results.append(result)
    finally:
        rclpy.try_shutdown()
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        payload = {"machine": machine_description(), "backbone": args.backbone, "results": [asdict(r) for r in results]}
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0 if any(not r.skipped for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

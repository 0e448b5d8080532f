"""Replay posed images to a running relocalisation node over real ROS 2 topics and collect its answers.

Used by the end-to-end demo and the latency benchmark: a publisher node sends
``sensor_msgs/Image`` messages (one at a time, or at a fixed rate) and a listener
records every ``PoseStamped`` the relocalisation node publishes, matched back to
the image by its header stamp.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import rclpy
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image

from .messages import matrix_from_pose_msg


def rgb_image_msg(image: np.ndarray, stamp_ns: int, frame_id: str) -> Image:
    """sensor_msgs/Image (rgb8) from an HxWx3 uint8 array."""
    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
    msg.header.frame_id = frame_id
    msg.height, msg.width = image.shape[:2]
    msg.encoding = "rgb8"
    msg.step = msg.width * 3
    msg.data = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    return msg


def camera_info_msg(K: np.ndarray, width: int, height: int, stamp_ns: int, frame_id: str) -> CameraInfo:
    """sensor_msgs/CameraInfo of an undistorted pinhole camera."""
    msg = CameraInfo(width=int(width), height=int(height), distortion_model="plumb_bob", d=[0.0] * 5)
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
    msg.header.frame_id = frame_id
    msg.k = [float(v) for v in np.asarray(K, dtype=float).reshape(9)]
    return msg


def stamp_ns(msg_stamp) -> int:
    return msg_stamp.sec * 1_000_000_000 + msg_stamp.nanosec


@dataclass
class Received:
    """One relocalisation answer: the pose and when it arrived after its image was published."""

    pose: np.ndarray  # 4x4 in the message's frame
    frame_id: str
    latency_s: float


@dataclass
class ReplayResult:
    sent: dict[int, float] = field(default_factory=dict)  # stamp_ns -> publish time (perf_counter)
    received: dict[int, Received] = field(default_factory=dict)
    verified: dict[int, Received] = field(default_factory=dict)  # the map-verified poses (verified_topic), by stamp
    duration_s: float = 0.0

    @property
    def rate_hz(self) -> float:
        return len(self.received) / self.duration_s if self.duration_s > 0 else 0.0

    def latencies(self) -> np.ndarray:
        return np.array([r.latency_s for r in self.received.values()])


class ImageReplayer(Node):
    """Publishes images and listens for the relocalisation node's PoseStamped answers."""

    def __init__(self, image_topic: str, pose_topic: str, frame_id: str = "camera_optical", camera_info_topic: str | None = None,
                 verified_topic: str | None = None):
        super().__init__("posenet_image_replayer")
        self.frame_id = frame_id
        self.result = ReplayResult()
        self._arrived = threading.Condition()
        # Reliable publishers match both reliable and best-effort (sensor-data) subscribers.
        self.publisher = self.create_publisher(Image, image_topic, QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        self.create_subscription(PoseStamped, pose_topic, self._on_pose, 10)
        if verified_topic is not None:
            self.create_subscription(PoseWithCovarianceStamped, verified_topic, self._on_verified, 10)
        self.camera_info_publisher = None if camera_info_topic is None else self.create_publisher(
            CameraInfo, camera_info_topic, QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        )

    def _on_pose(self, msg: PoseStamped) -> None:
        now = time.perf_counter()
        key = stamp_ns(msg.header.stamp)
        sent = self.result.sent.get(key)
        if sent is None:
            return  # not one of ours (e.g. another publisher on the topic)
        with self._arrived:
            self.result.received[key] = Received(matrix_from_pose_msg(msg.pose), msg.header.frame_id, now - sent)
            self._arrived.notify_all()

    def _on_verified(self, msg: PoseWithCovarianceStamped) -> None:
        key = stamp_ns(msg.header.stamp)
        sent = self.result.sent.get(key)
        if sent is not None:
            self.result.verified[key] = Received(matrix_from_pose_msg(msg.pose.pose), msg.header.frame_id, time.perf_counter() - sent)

    def wait_for_subscriber(self, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.publisher.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.publisher.get_subscription_count() > 0

    def send(self, image: np.ndarray, key_ns: int, K: np.ndarray | None = None) -> None:
        """Publish ``image`` stamped ``key_ns``, after its CameraInfo when ``K`` is given."""
        if K is not None and self.camera_info_publisher is not None:
            self.camera_info_publisher.publish(camera_info_msg(K, image.shape[1], image.shape[0], key_ns, self.frame_id))
        msg = rgb_image_msg(image, key_ns, self.frame_id)
        self.result.sent[key_ns] = time.perf_counter()
        self.publisher.publish(msg)

    def wait_for(self, key_ns: int, timeout_s: float) -> bool:
        with self._arrived:
            return self._arrived.wait_for(lambda: key_ns in self.result.received, timeout_s)


def replay_images(
    nodes: list[Node],
    images,
    image_topic: str,
    pose_topic: str,
    rate_hz: float | None = None,
    timeout_s: float = 10.0,
    on_progress=None,
    first_stamp_ns: int = 1_700_000_000_000_000_000,
    intrinsics=None,
    camera_info_topic: str | None = None,
    verified_topic: str | None = None,
    settled=None,
) -> ReplayResult:
    """Send ``images`` (an iterable of HxWx3 uint8 RGB) and collect the answers.

    ``intrinsics`` (an iterable of 3×3 K, one per image) go out as CameraInfo on
    ``camera_info_topic`` with each image's stamp, for a node that refines against a map.

    ``nodes`` (e.g. the relocalisation node) are spun together with the replayer in
    one multi-threaded executor. With ``rate_hz`` None each image waits for its
    answer (latency without queueing); otherwise images are sent at that rate and
    the node is free to drop frames it cannot keep up with. ``verified_topic``: also record the
    node's map-verified poses (``ReplayResult.verified``); ``settled(n, result)``: with ``rate_hz`` None,
    also wait until it is true for the n images sent so far (e.g. the node's refiner is done with them).
    """
    replayer = ImageReplayer(image_topic, pose_topic, camera_info_topic=camera_info_topic, verified_topic=verified_topic)
    intrinsics = iter(intrinsics) if intrinsics is not None else None
    # One executor thread: callbacks here are tiny, and more Python threads only fight the
    # node's inference worker for the GIL and the two cores.
    executor = SingleThreadedExecutor()
    for node in [*nodes, replayer]:
        executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        if not replayer.wait_for_subscriber(timeout_s):
            raise RuntimeError(f"nothing subscribes to {image_topic}; is the relocalisation node running?")
        start = time.perf_counter()
        period = 1.0 / rate_hz if rate_hz else 0.0
        for i, image in enumerate(images):
            key = first_stamp_ns + i * 100_000_000  # 10 Hz stamps: unique and realistic
            replayer.send(image, key, next(intrinsics) if intrinsics is not None else None)
            if rate_hz:
                time.sleep(max(0.0, start + (i + 1) * period - time.perf_counter()))
            else:
                replayer.wait_for(key, timeout_s)
                deadline = time.monotonic() + timeout_s
                while settled is not None and not settled(i + 1, replayer.result) and time.monotonic() < deadline:
                    time.sleep(0.005)
            if on_progress:
                on_progress(i)
        if rate_hz and replayer.result.sent:
            replayer.wait_for(max(replayer.result.sent), min(timeout_s, 2.0))
        replayer.result.duration_s = time.perf_counter() - start
        return replayer.result
    finally:
        executor.shutdown()
        spinner.join(timeout=5.0)
        for node in nodes:
            executor.remove_node(node)
        replayer.destroy_node()


def ensure_rclpy() -> bool:
    """Initialise rclpy if needed; returns True if this call did (and so should shut it down)."""
    if rclpy.ok():
        return False
    rclpy.init()
    return True

"""Helpers for the ROS tests: a tiny rendered scene, a model overfitted on it, ROS isolation.

``tiny_trained_checkpoint(tmp_path_factory)`` renders a textured wall seen by a
camera at known poses, overfits a small resnet18 PoseNet on those frames with the
project's loss, calibrates its covariance and saves it with ``save_checkpoint``.
The result is memoised per pytest session so every ROS test module shares it.

The scene is rendered here (a planar homography, no dependency on the data
package) so the ROS tests do not depend on the synthetic-data generator.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from ros2_posenet.checkpoint import save_checkpoint
from ros2_posenet.covariance import calibrate
from ros2_posenet.geometry import R_BODY_FROM_OPTICAL, matrix_to_pose, rpy_to_matrix
from ros2_posenet.losses import build_loss
from ros2_posenet.model import ModelConfig, PoseNet
from ros2_posenet.preprocess import PreprocessConfig, Preprocessor


from ros_domain import isolate_ros_domain  # noqa: E402,F401  (light module: no torch import)


# ----------------------------------------------------------------------------- scene

IMAGE_WIDTH, IMAGE_HEIGHT = 96, 72
INTRINSICS = np.array([[80.0, 0.0, 47.5], [0.0, 80.0, 35.5], [0.0, 0.0, 1.0]])
WALL_X = 4.0  # the textured wall is the plane x = 4 m of the map, facing the camera
WALL_HALF_SIZE = (6.0, 4.0)  # metres along map y and z
TEXTURE_PX_PER_M = 40


def wall_texture(seed: int = 0) -> np.ndarray:
    """RGB texture of the wall: smooth colour gradients plus coarse random blobs."""
    rng = np.random.default_rng(seed)
    width, height = (int(2 * s * TEXTURE_PX_PER_M) for s in WALL_HALF_SIZE)
    coarse = rng.integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    blobs = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    v, u = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = np.stack((255 * u / width, 255 * v / height, 128 + 0 * u), axis=-1)
    texture = 0.5 * blobs + 0.5 * gradient
    texture[..., 0] *= 0.66  # red stays below 170, so these images never trip overflow_checkpoint
    return np.clip(texture, 0, 255).astype(np.uint8)


def camera_optical_pose(x: float, y: float, z: float, yaw: float) -> np.ndarray:
    """4×4 ``T_map_optical`` of a level camera at (x, y, z) looking along map +x rotated by ``yaw``."""
    T = np.eye(4)
    T[:3, :3] = rpy_to_matrix(0.0, 0.0, yaw) @ R_BODY_FROM_OPTICAL  # body = yaw only, optical from body
    T[:3, 3] = (x, y, z)
    return T


def render(T_map_optical: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """Image (IMAGE_HEIGHT, IMAGE_WIDTH, 3) uint8 RGB of the wall seen from ``T_map_optical``.

    Texture pixel (a, b) is the wall point (WALL_X, Y0 − a/s, Z0 − b/s); the homography
    texture→image is ``K Rᵀ (M − t e₃ᵀ)`` with M that affine map.
    """
    s = TEXTURE_PX_PER_M
    M = np.array([[0.0, 0.0, WALL_X], [-1.0 / s, 0.0, WALL_HALF_SIZE[0]], [0.0, -1.0 / s, WALL_HALF_SIZE[1]]])
    R, t = T_map_optical[:3, :3], T_map_optical[:3, 3]
    H = INTRINSICS @ R.T @ (M - np.outer(t, [0.0, 0.0, 1.0]))
    return cv2.warpPerspective(texture, H, (IMAGE_WIDTH, IMAGE_HEIGHT), flags=cv2.INTER_LINEAR)


def scene_poses(count: int, seed: int = 1) -> list[np.ndarray]:
    """Camera poses spread over ±0.8 m in x and y, 0.8–1.2 m high, ±25° yaw."""
    rng = np.random.default_rng(seed)
    return [
        camera_optical_pose(rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.8), rng.uniform(0.8, 1.2), math.radians(rng.uniform(-25, 25)))
        for _ in range(count)
    ]


@dataclass
class TinyScene:
    checkpoint: Path
    poses: list  # 4×4 T_map_optical of each frame
    images: list  # uint8 RGB (IMAGE_HEIGHT, IMAGE_WIDTH, 3)

    @property
    def position_spread(self) -> float:
        """RMS distance of the frame positions from their mean, metres."""
        positions = np.array([T[:3, 3] for T in self.poses])
        return float(np.sqrt(((positions - positions.mean(0)) ** 2).sum(1).mean()))


PREPROCESS = PreprocessConfig(resize=54, crop=48)
_SCENE_CACHE: dict[str, TinyScene] = {}


def _recalibrate_batchnorm(model: PoseNet, images: torch.Tensor) -> None:
    """Set BatchNorm running statistics to the exact statistics of ``images``.

    After a few dozen steps the running averages still lag the weights; without
    this the eval-mode network would not reproduce what it was trained to output.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass gives the batch statistics
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()


def train_tiny_model(images: list, poses: list, steps: int = 60, seed: int = 0) -> tuple[PoseNet, dict]:
    """Overfit a small resnet18 PoseNet on (image, pose) pairs; returns (model, covariance calibration).

    Runs single-threaded: on a shared 2-core machine oversubscribed OpenMP threads
    made this ~8x slower. With the cosine schedule the median position error ends
    well under 10% of the pose spread (seeds 0-3).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_tiny_model(images, poses, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train_tiny_model(images: list, poses: list, steps: int, seed: int) -> tuple[PoseNet, dict]:
    torch.manual_seed(seed)
    preprocessor = Preprocessor(PREPROCESS)
    batch_images = torch.stack([preprocessor(img)[0] for img in images])
    pose_pairs = [matrix_to_pose(T) for T in poses]
    batch = {
        "position": torch.tensor(np.array([t for t, _ in pose_pairs]), dtype=torch.float32),
        "rotation": torch.tensor(np.array([q for _, q in pose_pairs]), dtype=torch.float32),
    }
    model = PoseNet(ModelConfig(backbone="resnet18", hidden_dim=128, dropout=0.0, pretrained=False))
    model.set_position_offset(batch["position"].mean(0))
    criterion = build_loss({"type": "beta", "beta": 10.0})
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    # Decaying to zero lets the last steps settle instead of ending on a noisy step.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    for _ in range(steps):
        pred_t, pred_q = model(batch_images)
        loss, _ = criterion(pred_t, pred_q, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    _recalibrate_batchnorm(model, batch_images)
    with torch.no_grad():
        pred_t, pred_q = model(batch_images)
    return model, calibrate(pred_t, pred_q, batch["position"], batch["rotation"])


def tiny_trained_checkpoint(tmp_path_factory, frames: int = 12, steps: int = 60) -> TinyScene:
    """Render ``frames`` views of the wall, overfit a model on them, save the checkpoint (memoised)."""
    key = f"{frames}-{steps}"
    if key not in _SCENE_CACHE:
        texture = wall_texture()
        poses = scene_poses(frames)
        images = [render(T, texture) for T in poses]
        model, covariance = train_tiny_model(images, poses, steps=steps)
        path = tmp_path_factory.mktemp("tiny_posenet") / "tiny.pt"
        save_checkpoint(path, model, PREPROCESS, loss_config={"type": "beta", "beta": 10.0}, map_frame="map", covariance=covariance)
        _SCENE_CACHE[key] = TinyScene(path, poses, images)
    return _SCENE_CACHE[key]


def overflow_checkpoint(path: Path, map_frame: str = "map") -> Path:
    """A hand-set PoseNet whose output is finite for dark images and infinite for bright-red ones.

    All weights are non-negative and every BatchNorm is the identity, except the
    first, which subtracts 1: the first layer's response (the local mean of the
    normalised red channel) is cut to zero unless red exceeds ~0.7·255 somewhere.
    Zero features give the head's biases (position 0, identity rotation); any
    positive feature meets position weights of 1e38 and overflows float32 to inf.
    """
    model = PoseNet(ModelConfig(backbone="resnet18", hidden_dim=16, dropout=0.0, pretrained=False))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.abs_()
                if module.bias is not None:
                    module.bias.zero_()
        conv1 = model.backbone.conv1
        conv1.weight.zero_()
        conv1.weight[:, 0] = 1.0 / conv1.weight[0, 0].numel()
        model.backbone.bn1.bias.fill_(-1.0)
        model.fc_position.weight.fill_(1e38)
        model.fc_rotation.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    return save_checkpoint(path, model, PREPROCESS, map_frame=map_frame)


# ----------------------------------------------------------------------------- ROS harness


def stamp_key(stamp) -> tuple[int, int]:
    return (stamp.sec, stamp.nanosec)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def image_msg(rgb: np.ndarray, stamp, encoding: str = "rgb8", frame_id: str = "camera_optical_frame"):
    """sensor_msgs/Image of an RGB array in ``encoding`` (rgb8, bgr8, mono8...)."""
    from sensor_msgs.msg import Image

    if encoding == "bgr8":
        pixels = rgb[..., ::-1]
    elif encoding == "mono8":
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    else:
        pixels = rgb
    pixels = np.ascontiguousarray(pixels)
    msg = Image(height=pixels.shape[0], width=pixels.shape[1], encoding=encoding, step=pixels.strides[0], data=pixels.tobytes())
    msg.header.stamp, msg.header.frame_id = stamp, frame_id
    return msg


def compressed_msg(rgb: np.ndarray, stamp, fmt: str = "png", frame_id: str = "camera_optical_frame"):
    from sensor_msgs.msg import CompressedImage

    ok, buffer = cv2.imencode("." + fmt, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    msg = CompressedImage(format=fmt, data=buffer.tobytes())
    msg.header.stamp, msg.header.frame_id = stamp, frame_id
    return msg


class Probe:
    """A real rclpy node that feeds images/odometry to a posenet node and records what it publishes.

    Everything it receives is stored by header stamp; spins in a background thread
    with ``extra_nodes`` (e.g. an in-process PoseNetNode).
    """

    def __init__(self, context, namespace: str, image_topic: str = "camera/image_raw", compressed: bool = False, extra_nodes=()):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
        from nav_msgs.msg import Odometry
        from rclpy.executors import SingleThreadedExecutor
        from sensor_msgs.msg import CompressedImage, Image
        from tf2_msgs.msg import TFMessage

        self.node = rclpy.create_node("probe", namespace=namespace, context=context)
        self.poses, self.poses_cov, self.camera_poses, self.tf = {}, {}, {}, {}
        self.diagnostics: list = []
        self.node.create_subscription(PoseStamped, "posenet/pose", lambda m: self.poses.__setitem__(stamp_key(m.header.stamp), m), 50)
        self.node.create_subscription(PoseWithCovarianceStamped, "posenet/pose_with_covariance", lambda m: self.poses_cov.__setitem__(stamp_key(m.header.stamp), m), 50)
        self.node.create_subscription(PoseStamped, "posenet/camera_pose", lambda m: self.camera_poses.__setitem__(stamp_key(m.header.stamp), m), 50)
        self.node.create_subscription(TFMessage, "/tf", self._on_tf, 100)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 50)
        self.image_pub = self.node.create_publisher(CompressedImage if compressed else Image, image_topic, 10)
        self.odom_pub = self.node.create_publisher(Odometry, "odom", 50)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        for node in extra_nodes:
            self.executor.add_node(node)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def _on_tf(self, msg) -> None:
        for transform in msg.transforms:
            self.tf[(transform.header.frame_id, transform.child_frame_id, stamp_key(transform.header.stamp))] = transform

    def send(self, msg, answered=None, timeout: float = 10.0, republish: float = 1.0) -> bool:
        """Publish ``msg`` until ``answered()`` (default: a pose with its stamp) or ``timeout``.

        Republishing covers the rare best-effort loss of the sensor-data QoS.
        """
        key = stamp_key(msg.header.stamp)
        answered = answered or (lambda: key in self.poses and key in self.poses_cov and key in self.camera_poses)
        assert wait_for(lambda: self.image_pub.get_subscription_count() > 0, timeout), "posenet node never subscribed"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.image_pub.publish(msg)
            if wait_for(answered, min(republish, deadline - time.monotonic())):
                return True
        return False

    def close(self) -> None:
        self.executor.shutdown()
        self._thread.join(timeout=5)
        self.node.destroy_node()


def make_posenet_node(context, namespace: str, node_class=None, **parameters):
    """In-process PoseNetNode (or ``node_class``, e.g. PoseNetLifecycleNode) in ``namespace`` with parameter overrides.

    Defaults: CPU, one inference thread (oversubscribed threads were ~50x slower on
    the shared test machine; callers restore torch's thread count), relative image
    topic, and a max_image_age that a republished frame on a loaded machine stays under.
    """
    from rclpy.parameter import Parameter

    from ros2_posenet.ros.node import PoseNetNode

    parameters = {"device": "cpu", "cpu_threads": 1, "image_topic": "camera/image_raw", "max_image_age": 5.0, **parameters}
    overrides = [Parameter(name, value=value) for name, value in parameters.items()]
    return (node_class or PoseNetNode)(context=context, namespace=namespace, parameter_overrides=overrides)


@contextlib.contextmanager
def ros_context():
    """A private rclpy context; torch's thread count is restored after (the nodes set it process-wide)."""
    import rclpy

    threads = torch.get_num_threads()
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        yield ctx
    finally:
        ctx.try_shutdown()  # a node that gave up may have shut it down already
        torch.set_num_threads(threads)


class RunningNode:
    """An in-process PoseNetNode (or ``node_class``) and a Probe spinning together; ``close`` stops both."""

    def __init__(self, context, namespace: str, node_class=None, compressed: bool = False, **parameters):
        self.namespace = namespace
        self.node = make_posenet_node(context, namespace, node_class=node_class, compressed=compressed, **parameters)
        topic = parameters.get("image_topic", "camera/image_raw")
        self.probe = Probe(context, namespace, image_topic=topic, compressed=compressed, extra_nodes=[self.node])

    def close(self) -> None:
        self.probe.close()
        self.node.destroy_node()


# ----------------------------------------------------------------------------- the room with a map (refinement)

# A broad prior (2 m, ~100°): the untrained regressor knows little, the map must do the work.
BROAD_COVARIANCE = {"position_var": [4.0, 4.0, 4.0], "rotation_var": [3.0, 3.0, 3.0], "samples": 10}


@dataclass
class RoomFiles:
    scene: object  # helpers.room_map's SyntheticScene: scene.render(T, K, w, h)
    map_file: str  # its scene map (.npz)
    checkpoint: str  # an untrained regressor guessing near the room's centre, with BROAD_COVARIANCE


_ROOM_CACHE: dict[str, RoomFiles] = {}


def room_files(tmp_path_factory) -> RoomFiles:
    """The synthetic room's map and a regressor for it (memoised per pytest session: the map takes seconds)."""
    from helpers import room_map, untrained_checkpoint

    if "room" not in _ROOM_CACHE:
        folder = tmp_path_factory.mktemp("room")
        scene, scene_map = room_map()
        checkpoint = untrained_checkpoint(folder / "ckpt.pt", [-2.5, 0.5, 1.3], PreprocessConfig(resize=72, crop=64), covariance=BROAD_COVARIANCE)
        _ROOM_CACHE["room"] = RoomFiles(scene, str(scene_map.save(folder / "room.npz")), str(checkpoint))
    return _ROOM_CACHE["room"]


def room_camera_info(stamp, K=None, d=(0.0,) * 5, model: str = "plumb_bob", width: int = 320, height: int = 240):
    """sensor_msgs/CameraInfo of the room's 320×240 camera (helpers.ROOM_K unless ``K``)."""
    from helpers import ROOM_K
    from sensor_msgs.msg import CameraInfo

    K = ROOM_K if K is None else np.asarray(K, dtype=float)
    msg = CameraInfo(width=width, height=height, distortion_model=model, k=[float(v) for v in K.ravel()], d=[float(v) for v in d])
    msg.header.stamp = stamp
    return msg


def stamp_now(node, offset_s: float = 0.0):
    """The node's clock now (plus ``offset_s``) as a builtin_interfaces/Time."""
    from builtin_interfaces.msg import Time

    ns = node.get_clock().now().nanoseconds + round(offset_s * 1e9)
    return Time(sec=ns // 10**9, nanosec=ns % 10**9)


def latest_diagnostic(probe, key: str):
    """The newest value of ``key`` the probe saw on /diagnostics (None before it was published)."""
    for array in reversed(list(probe.diagnostics)):
        for status in array.status:
            for value in status.values:
                if value.key == key:
                    return value.value
    return None


def call_service(node, srv_type, name: str, request, timeout: float = 20.0):
    """Call service ``name`` from ``node`` (spun elsewhere, e.g. a Probe's executor) and return the response."""
    client = node.create_client(srv_type, name)
    try:
        assert client.wait_for_service(timeout_sec=10.0), f"service {name} not offered"
        future = client.call_async(request)
        assert wait_for(future.done, timeout), f"service {name} did not answer"
        return future.result()
    finally:
        node.destroy_client(client)


def wait_for_log(capfd, pattern: str, timeout: float = 10.0) -> str:
    """Poll pytest's ``capfd`` until stderr so far matches the regex ``pattern``; returns that stderr.

    Fails with the log when it never matches (for periodic lines such as the summary log).
    """
    import re

    seen = []

    def matched() -> bool:
        seen.append(capfd.readouterr().err)
        return re.search(pattern, "".join(seen), re.S) is not None

    assert wait_for(matched, timeout, interval=0.05), f"no log line matching {pattern!r} within {timeout} s:\n" + "".join(seen)[-3000:]
    return "".join(seen)

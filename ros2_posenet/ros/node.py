"""``posenet_node``: relocalise a camera from single images and publish its pose in the map.

Subscribes to ``sensor_msgs/Image`` (or ``CompressedImage``), runs the PoseNet
checkpoint on the newest frame in a worker thread (the subscription callback only
hands the message over, so a slow model never builds a backlog), and publishes,
stamped with the image's stamp:

* ``pose_topic`` (``geometry_msgs/PoseStamped``): the robot base in the map frame;
* ``pose_with_covariance_topic`` (``PoseWithCovarianceStamped``): the same with the
  checkpoint's calibrated covariance (6×6 row-major x y z roll pitch yaw), for
  robot_localization's map-frame EKF;
* ``camera_pose_topic`` (``PoseStamped``): the camera's REP-103 body frame
  (``camera_frame``: x forward, z up) in the map;
* TF according to ``tf_mode``: ``map_to_camera`` (map → camera_frame),
  ``map_to_odom`` (REP-105 map → odom from the base pose and odometry's odom → base)
  or ``none`` (robot_localization owns map → odom);
* ``/diagnostics`` (``diagnostic_msgs/DiagnosticArray``) and a periodic log line.

Bad input (bad encodings, empty/truncated/corrupt images, stale frames, NaN output,
missing odometry) is logged with throttling, counted, and never stops the node.
Run ``posenet_node --help`` for the parameters.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import rclpy
import torch
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.duration import Duration
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.time import Time
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
from sensor_msgs.msg import CompressedImage, Image

from ..checkpoint import CheckpointError
from ..frames import CameraMount, PoseHistory, RelocalizedPoses, extrinsic_matrix, map_to_odom
from ..backends import COMPILE_MODES
from ..inference import BACKENDS, PRECISIONS, BackendUnavailableError, NonFiniteOutputError, Relocalizer, resolve_device
from . import messages
from .image import ImageConversionError, msg_to_rgb

try:  # full ROS install: use tf2's broadcasters and buffer
    import tf2_ros
except ImportError:  # PyPI wheels: publish tf2_msgs/TFMessage ourselves
    tf2_ros = None

NODE_NAME = "posenet_node"
TF_MODES = ("map_to_camera", "map_to_odom", "none")
ODOM_SOURCES = ("auto", "topic", "tf")
IMAGE_QOS = ("sensor_data", "reliable")

# QoS tf2 itself uses for /tf and /tf_static.
TF_QOS = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
TF_STATIC_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


class ConfigurationError(ValueError):
    """A parameter value or the environment makes the node unable to start; the text says what to change."""


# ----------------------------------------------------------------------------- parameters


def _is_frame_id(value: str) -> str | None:
    if not value:
        return "must not be empty"
    if value.startswith("/"):
        return "tf2 frame ids must not start with '/'"
    return None


def _optional_frame_id(value: str) -> str | None:
    return _is_frame_id(value) if value else None


def _non_empty(value: str) -> str | None:
    return None if value else "must not be empty"


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def _number(minimum: float, strictly: bool = False) -> Callable[[Any], str | None]:
    def check(value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return "must be a finite number"
        if value < minimum or (strictly and value == minimum):
            return f"must be {'>' if strictly else '>='} {minimum}"
        return None

    return check


def _device(value: str) -> str | None:
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return None
    return "must be auto, cpu, cuda or cuda:N"


def _compile_mode(value) -> str | None:
    if isinstance(value, bool) or value in COMPILE_MODES:
        return None
    return f"must be true, false or one of {', '.join(COMPILE_MODES)}"


def _extrinsic(value) -> str | None:
    try:
        extrinsic_matrix(list(value))
    except (TypeError, ValueError):
        return "must be 6 finite numbers [x, y, z, roll, pitch, yaw] (metres, radians)"
    return None


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    check: Callable[[Any], str | None] | None = None
    read_only: bool = True  # fixed after start-up (topics, model); False: may change at run time
    dynamic_typing: bool = False  # numbers: accept integers for doubles (yaml `1` vs `1.0`)


PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("checkpoint", "", "Path to a ros2_posenet checkpoint (.pt) written by `train`.", _non_empty),
    ParamSpec("device", "auto", "Inference device: auto (CUDA when available), cpu, cuda or cuda:N.", _device),
    ParamSpec("backend", "torch", "Inference backend: torch, onnxruntime, tensorrt (CUDA) or auto.", _one_of(BACKENDS)),
    ParamSpec("precision", "fp32", "Network precision: fp32, or fp16 on CUDA (falls back to fp32 on CPU with a warning).", _one_of(PRECISIONS)),
    ParamSpec("compile", False, "torch backend: torch.compile the network (true, or a mode: default, reduce-overhead, max-autotune); slow first start.", _compile_mode, dynamic_typing=True),
    ParamSpec("cuda_graph", True, "torch backend on CUDA: replay a captured CUDA graph per frame (lower latency)."),
    ParamSpec("cpu_threads", 0, "CPU threads for inference, process-wide (0: torch's default). 1-2 avoids starving other nodes on a shared CPU.", _number(0)),
    ParamSpec("image_topic", "/camera/image_raw", "Image topic (for compressed images usually <camera>/image_raw/compressed).", _non_empty),
    ParamSpec("compressed", False, "Subscribe to sensor_msgs/CompressedImage (jpeg/png) instead of sensor_msgs/Image."),
    ParamSpec("image_qos", "sensor_data", "Image subscription QoS: sensor_data (best effort) or reliable.", _one_of(IMAGE_QOS)),
    ParamSpec("image_qos_depth", 1, "Image subscription queue depth; 1 keeps only the newest frame.", _number(1)),
    ParamSpec("map_frame", "", "Map frame id of the outputs; empty: the map frame recorded in the checkpoint.", _optional_frame_id, read_only=False),
    ParamSpec("odom_frame", "odom", "Odometry frame (REP-105), parent of base_frame in tf_mode map_to_odom.", _is_frame_id, read_only=False),
    ParamSpec("base_frame", "base_link", "Robot base frame whose pose is published.", _is_frame_id, read_only=False),
    ParamSpec("camera_frame", "camera_link", "Camera body frame (REP-103: x forward, z up; not the optical frame).", _is_frame_id, read_only=False),
    ParamSpec("camera_to_base", [0.0] * 6, "Pose of camera_frame in base_frame as [x, y, z, roll, pitch, yaw] (m, rad), as in a URDF joint origin.", _extrinsic, read_only=False, dynamic_typing=True),
    ParamSpec("publish_camera_to_base_tf", False, "Also publish camera_to_base as a static base_frame -> camera_frame transform (when no URDF does)."),
    ParamSpec("tf_mode", "map_to_camera", "TF to publish: map_to_camera (standalone camera), map_to_odom (robot, REP-105) or none (robot_localization owns map -> odom).", _one_of(TF_MODES)),
    ParamSpec("odom_source", "auto", "Where map_to_odom reads odom -> base: topic (nav_msgs/Odometry on odom_topic), tf (tf2), auto (tf when tf2_ros is installed, else topic).", _one_of(ODOM_SOURCES)),
    ParamSpec("odom_topic", "/odom", "nav_msgs/Odometry topic (odom -> base) for tf_mode map_to_odom with odom_source topic.", _non_empty),
    ParamSpec("odom_tolerance", 0.2, "Largest gap (s) between an image stamp and the odometry used for it.", _number(0.0), read_only=False, dynamic_typing=True),
    ParamSpec("transform_tolerance", 0.0, "Seconds added to the stamp of published TF (like AMCL), so lookups at 'now' succeed between relocalisations.", _number(0.0), read_only=False, dynamic_typing=True),
    ParamSpec("max_image_age", 1.0, "Drop frames older than this many seconds when the worker takes them (0: never).", _number(0.0), read_only=False, dynamic_typing=True),
    ParamSpec("pose_topic", "posenet/pose", "Output geometry_msgs/PoseStamped of base_frame in the map.", _non_empty),
    ParamSpec("pose_with_covariance_topic", "posenet/pose_with_covariance", "Output geometry_msgs/PoseWithCovarianceStamped of base_frame in the map.", _non_empty),
    ParamSpec("camera_pose_topic", "posenet/camera_pose", "Output geometry_msgs/PoseStamped of camera_frame in the map.", _non_empty),
    ParamSpec("diagnostics_period", 1.0, "Seconds between diagnostic_msgs/DiagnosticArray messages on /diagnostics.", _number(0.0, strictly=True), dynamic_typing=True),
    ParamSpec("log_period", 30.0, "Seconds between summary log lines (0: never).", _number(0.0), dynamic_typing=True),
    ParamSpec("log_throttle", 5.0, "Each kind of dropped-frame warning is logged at most once per this many seconds.", _number(0.0), read_only=False, dynamic_typing=True),
)
PARAMETER_NAMES = tuple(spec.name for spec in PARAMETERS)
_SPECS = {spec.name: spec for spec in PARAMETERS}


def validate_parameter(name: str, value: Any) -> str | None:
    """Problem with ``value`` for parameter ``name`` (``None`` when fine)."""
    spec = _SPECS.get(name)
    if spec is None or spec.check is None:
        return None
    return spec.check(value)


@dataclass(frozen=True)
class Settings:
    """A consistent snapshot of the parameters, swapped atomically when they change."""

    values: dict

    def __getattr__(self, name: str):
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


# ----------------------------------------------------------------------------- worker plumbing


class LatestFrameSlot:
    """One-frame mailbox between the subscription callback and the worker.

    ``put`` never blocks and replaces a frame the worker has not taken yet (the
    caller counts that as a drop), so the worker always processes the newest frame.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._item = None
        self._closed = False

    def put(self, item) -> bool:
        """Store ``item``; returns True when it replaced an untaken frame."""
        with self._cond:
            replaced = self._item is not None
            self._item = item
            self._cond.notify()
        return replaced

    def take(self, timeout: float | None = None):
        """The newest frame, waiting up to ``timeout`` s; ``None`` on timeout or when closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._item is not None or self._closed, timeout)
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed


@dataclass
class Statistics:
    """Thread-safe counters plus the latencies of the current diagnostics window."""

    counts: Counter = field(default_factory=Counter)
    latencies: list = field(default_factory=list)  # seconds from worker pick-up to publish
    ages: list = field(default_factory=list)  # seconds from image stamp to publish
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, key: str, n: int = 1) -> int:
        with self.lock:
            self.counts[key] += n
            return self.counts[key]

    def record(self, latency: float, age: float) -> None:
        with self.lock:
            self.counts["processed"] += 1
            self.latencies.append(latency)
            self.ages.append(age)

    def window(self) -> tuple[dict, list, list]:
        """Totals so far and the window's latencies/ages (the window is then reset)."""
        with self.lock:
            latencies, ages = self.latencies, self.ages
            self.latencies, self.ages = [], []
            return dict(self.counts), latencies, ages


# Counters that mean a frame was dropped, with the log text of each.
DROP_REASONS = {
    "superseded": "a newer frame arrived before the worker was free",
    "stale": "image older than max_image_age",
    "unsupported_encoding": "unsupported image encoding",
    "empty_image": "zero-sized image",
    "truncated_image": "truncated image data",
    "corrupt_compressed": "corrupt compressed image",
    "bad_image": "image unusable",
    "non_finite_output": "network output is NaN/inf",
    "internal_error": "unexpected error while processing a frame",
}


# ----------------------------------------------------------------------------- node


class PoseNetNode(Node):
    """The relocalisation node. Accepts the standard :class:`rclpy.node.Node` keyword arguments.

    Raises :class:`ConfigurationError` or :class:`~ros2_posenet.checkpoint.CheckpointError`
    at construction when a parameter or the checkpoint is unusable.
    """

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        self.stats = Statistics()
        self._slot = LatestFrameSlot()
        self._worker: threading.Thread | None = None
        self._last_warning: dict[str, float] = {}
        self._odometry = PoseHistory()
        self._odometry_lock = threading.Lock()
        try:
            self._declare_parameters()
            self._settings = self._read_settings()
            self._check_environment(self._settings)
            self._load_model(self._settings)
            self._create_interfaces(self._settings)
        except BaseException:
            self.destroy_node()
            raise
        self.add_on_set_parameters_callback(self._validate_parameter_change)
        self.add_post_set_parameters_callback(self._apply_parameter_change)
        self._worker = threading.Thread(target=self._worker_loop, name="posenet_worker", daemon=True)
        self._worker.start()
        s = self._settings
        self.get_logger().info(
            f"relocalising {'compressed ' if s.compressed else ''}images from {self._image_sub.topic_name} "
            f"with {s.checkpoint} ({self.relocalizer.backend_name} on {self.relocalizer.device}); publishing {self._pose_pub.topic_name} in frame "
            f"'{self.map_frame}', tf_mode {s.tf_mode}{self._odom_source_note()}"
        )

    # ------------------------------------------------------------------ start-up

    def _declare_parameters(self) -> None:
        for spec in PARAMETERS:
            descriptor = ParameterDescriptor(
                description=spec.description, read_only=spec.read_only, dynamic_typing=spec.dynamic_typing
            )
            try:
                self.declare_parameter(spec.name, spec.default, descriptor)
            except (InvalidParameterTypeException, InvalidParameterValueException) as err:
                raise ConfigurationError(
                    f"parameter '{spec.name}': {err}; expected a {type(spec.default).__name__} like {spec.default!r}"
                ) from None

    def _read_settings(self) -> Settings:
        values, problems = {}, []
        for spec in PARAMETERS:
            value = self.get_parameter(spec.name).value
            problem = validate_parameter(spec.name, value)
            if problem:
                problems.append(f"parameter '{spec.name}' = {value!r}: {problem}")
            values[spec.name] = value
        if problems:
            raise ConfigurationError("; ".join(problems))
        return self._settings_from(values)

    @staticmethod
    def _settings_from(values: dict) -> Settings:
        values = dict(values)
        for name in ("odom_tolerance", "transform_tolerance", "max_image_age", "diagnostics_period", "log_period", "log_throttle"):
            values[name] = float(values[name])
        values["camera_to_base"] = [float(v) for v in values["camera_to_base"]]
        values["mount"] = CameraMount.from_xyz_rpy(values["camera_to_base"])
        return Settings(values)

    def _check_environment(self, s: Settings) -> None:
        if s.tf_mode != "none" and tf2_ros is None:
            try:  # needed to publish /tf without tf2_ros
                importlib.import_module("tf2_msgs.msg")
            except ImportError:
                raise ConfigurationError(
                    f"tf_mode '{s.tf_mode}' needs tf2_ros or tf2_msgs, and neither is importable: install ROS 2's "
                    "tf2_ros, or generate tf2_msgs into this Python environment with scripts/build_tf2_msgs.sh, "
                    "or set tf_mode:=none"
                ) from None
        if s.odom_source == "tf" and tf2_ros is None:
            raise ConfigurationError("odom_source 'tf' needs tf2_ros (not installed); use odom_source:=topic with an Odometry topic")
        if s.publish_camera_to_base_tf and s.tf_mode == "map_to_camera":
            raise ConfigurationError(
                "publish_camera_to_base_tf with tf_mode map_to_camera would give camera_frame two TF parents "
                "(map and base_frame); use tf_mode map_to_odom or none, or publish_camera_to_base_tf:=false"
            )
        try:
            resolve_device(s.device)
        except ValueError as err:
            raise ConfigurationError(f"parameter 'device': {err}") from None

    def _load_model(self, s: Settings) -> None:
        if s.cpu_threads > 0:
            torch.set_num_threads(int(s.cpu_threads))
        # CheckpointError already says what to do; let it through unchanged.
        try:
            self.relocalizer = Relocalizer(
                s.checkpoint, device=s.device, backend=s.backend, precision=s.precision, compile=s.compile, cuda_graph=s.cuda_graph
            )
        except BackendUnavailableError as err:
            raise ConfigurationError(f"parameter 'backend' = {s.backend!r}: {err}") from None

    def _create_interfaces(self, s: Settings) -> None:
        image_qos = QoSProfile(
            depth=int(s.image_qos_depth),
            history=HistoryPolicy.KEEP_LAST,
            reliability=qos_profile_sensor_data.reliability if s.image_qos == "sensor_data" else ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.VOLATILE,
        )
        image_type = CompressedImage if s.compressed else Image
        try:
            self._image_sub = self.create_subscription(image_type, s.image_topic, self._on_image, image_qos)
            self._pose_pub = self.create_publisher(PoseStamped, s.pose_topic, 10)
            self._pose_cov_pub = self.create_publisher(PoseWithCovarianceStamped, s.pose_with_covariance_topic, 10)
            self._camera_pose_pub = self.create_publisher(PoseStamped, s.camera_pose_topic, 10)
            self._odom_sub = None
            if s.tf_mode == "map_to_odom" and self._odom_source(s) == "topic":
                self._odom_sub = self.create_subscription(Odometry, s.odom_topic, self._on_odometry, 50)
        except Exception as err:  # rclpy raises InvalidTopicNameException & co.
            raise ConfigurationError(f"cannot create the node's topics: {err}") from None
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._create_tf_interfaces(s)
        self._window_start = time.monotonic()
        self._last_drop_counts: dict = {}
        self._recent_values: dict = {}
        self._diagnostics_timer = self.create_timer(s.diagnostics_period, self._publish_diagnostics)
        self._log_timer = self.create_timer(s.log_period, self._log_summary) if s.log_period > 0 else None

    def _create_tf_interfaces(self, s: Settings) -> None:
        self._tf_broadcaster = self._tf_pub = self._tf_buffer = self._tf_listener = None
        self._static_broadcaster = self._tf_static_pub = None
        if s.tf_mode != "none":
            if tf2_ros is not None:
                self._tf_broadcaster = tf2_ros.TransformBroadcaster(self)
            else:
                from tf2_msgs.msg import TFMessage

                self._tf_pub = self.create_publisher(TFMessage, "/tf", TF_QOS)
        if s.tf_mode == "map_to_odom" and self._odom_source(s) == "tf":
            self._tf_buffer = tf2_ros.Buffer()
            self._tf_listener = tf2_ros.TransformListener(self._tf_buffer, self)
        if s.publish_camera_to_base_tf:
            if tf2_ros is not None:
                self._static_broadcaster = tf2_ros.StaticTransformBroadcaster(self)
            else:
                from tf2_msgs.msg import TFMessage

                self._tf_static_pub = self.create_publisher(TFMessage, "/tf_static", TF_STATIC_QOS)
            self._publish_static_extrinsic(s)

    @staticmethod
    def _odom_source(s: Settings) -> str:
        if s.odom_source == "auto":
            return "tf" if tf2_ros is not None else "topic"
        return s.odom_source

    def _odom_source_note(self) -> str:
        s = self._settings
        if s.tf_mode != "map_to_odom":
            return ""
        source = self._odom_source(s)
        return f" (odom -> base from {'tf2' if source == 'tf' else 'topic ' + self._odom_sub.topic_name})"

    @property
    def map_frame(self) -> str:
        return self._settings.map_frame or self.relocalizer.map_frame

    # ------------------------------------------------------------------ parameters at run time

    def _validate_parameter_change(self, parameters) -> SetParametersResult:
        for parameter in parameters:
            problem = validate_parameter(parameter.name, parameter.value)
            if problem:
                return SetParametersResult(successful=False, reason=f"parameter '{parameter.name}' = {parameter.value!r}: {problem}")
        return SetParametersResult(successful=True)

    def _apply_parameter_change(self, parameters) -> None:
        values = dict(self._settings.values)
        values.update({p.name: p.value for p in parameters if p.name in _SPECS})
        self._settings = self._settings_from(values)
        if self._settings.publish_camera_to_base_tf and any(p.name in ("camera_to_base", "base_frame", "camera_frame") for p in parameters):
            self._publish_static_extrinsic(self._settings)

    # ------------------------------------------------------------------ callbacks (executor thread)

    def _on_image(self, msg) -> None:
        self.stats.count("received")
        if self._slot.put(msg):
            self._drop("superseded", "")

    def _on_odometry(self, msg: Odometry) -> None:
        s = self._settings
        try:
            T_odom_base = messages.matrix_from_pose_msg(msg.pose.pose)
        except ValueError as err:
            self.stats.count("bad_odometry")
            self._warn_throttled("bad_odometry", f"ignoring odometry with an invalid pose: {err}")
            return
        if (msg.header.frame_id and msg.header.frame_id != s.odom_frame) or (msg.child_frame_id and msg.child_frame_id != s.base_frame):
            self._warn_throttled(
                "odometry_frames",
                f"odometry is {msg.header.frame_id} -> {msg.child_frame_id} but odom_frame/base_frame are "
                f"{s.odom_frame}/{s.base_frame}; using it as odom -> base anyway",
            )
        with self._odometry_lock:
            self._odometry.add(messages.stamp_to_seconds(msg.header.stamp), T_odom_base)

    # ------------------------------------------------------------------ worker thread

    def _worker_loop(self) -> None:
        while not self._slot.closed:
            msg = self._slot.take(timeout=0.2)
            if msg is None:
                continue
            try:
                self._process(msg)
            except Exception as err:  # never let one frame kill the worker
                self._drop("internal_error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")

    def _process(self, msg) -> None:
        started = time.perf_counter()
        s = self._settings
        stamp = msg.header.stamp
        age = self._age(stamp)
        if s.max_image_age > 0 and age > s.max_image_age:
            self._drop("stale", f"stamp {messages.stamp_to_seconds(stamp):.3f} is {age:.3f} s old (max_image_age {s.max_image_age} s)")
            return
        try:
            rgb = msg_to_rgb(msg)
            prediction = self.relocalizer.predict(rgb)
        except ImageConversionError as err:
            self._drop(err.reason, str(err))
            return
        except NonFiniteOutputError as err:
            self._drop("non_finite_output", str(err))
            return
        except ValueError as err:  # the preprocessor rejects e.g. 1-pixel images
            self._drop("bad_image", str(err))
            return
        poses = RelocalizedPoses.from_prediction(prediction.position, prediction.quaternion, prediction.covariance, s.mount)
        if not poses.is_finite:
            self._drop("non_finite_output", "pose or covariance is not finite")
            return
        map_frame = self.map_frame
        self._pose_pub.publish(messages.pose_stamped(poses.T_map_base, map_frame, stamp))
        self._pose_cov_pub.publish(messages.pose_with_covariance_stamped(poses.T_map_base, poses.base_covariance, map_frame, stamp))
        self._camera_pose_pub.publish(messages.pose_stamped(poses.T_map_camera, map_frame, stamp))
        self._publish_tf(s, poses.T_map_camera, poses.T_map_base, stamp)
        self.stats.record(time.perf_counter() - started, self._age(stamp))

    def _age(self, stamp) -> float:
        return (self.get_clock().now() - Time.from_msg(stamp, clock_type=self.get_clock().clock_type)).nanoseconds * 1e-9

    def _publish_tf(self, s: Settings, T_map_camera: np.ndarray, T_map_base: np.ndarray, stamp) -> None:
        if s.tf_mode == "none":
            return
        tf_stamp = (Time.from_msg(stamp) + Duration(seconds=s.transform_tolerance)).to_msg()
        if s.tf_mode == "map_to_camera":
            transform = messages.transform_stamped(T_map_camera, self.map_frame, s.camera_frame, tf_stamp)
        else:
            T_odom_base = self._odom_to_base(s, stamp)
            if T_odom_base is None:
                return
            T_map_odom = map_to_odom(T_map_base, T_odom_base)
            transform = messages.transform_stamped(T_map_odom, self.map_frame, s.odom_frame, tf_stamp)
        self._send_transforms([transform])

    def _odom_to_base(self, s: Settings, stamp) -> np.ndarray | None:
        """odom → base at the image stamp, or None (counted and logged) when unavailable."""
        if self._odom_source(s) == "tf":
            try:
                transform = self._tf_buffer.lookup_transform(
                    s.odom_frame, s.base_frame, Time.from_msg(stamp), timeout=Duration(seconds=s.odom_tolerance)
                )
                return messages.matrix_from_transform_msg(transform.transform)
            except tf2_ros.TransformException as err:
                detail = str(err)
        else:
            seconds = messages.stamp_to_seconds(stamp)
            with self._odometry_lock:
                T = self._odometry.lookup(seconds, s.odom_tolerance)
                latest = self._odometry.latest_stamp()
            if T is not None:
                return T
            detail = (
                f"no odometry on {self._odom_sub.topic_name} yet" if latest is None
                else f"no odometry within odom_tolerance {s.odom_tolerance} s of the image stamp {seconds:.3f} (latest {latest:.3f})"
            )
        count = self.stats.count("no_odometry")
        self._warn_throttled("no_odometry", f"map -> odom not published: {detail} [{count} so far]; poses are still published")
        return None

    def _send_transforms(self, transforms: list) -> None:
        if self._tf_broadcaster is not None:
            self._tf_broadcaster.sendTransform(transforms)
        else:
            self._tf_pub.publish(messages.tf_message(transforms))

    def _publish_static_extrinsic(self, s: Settings) -> None:
        transform = messages.transform_stamped(s.mount.T_base_camera, s.base_frame, s.camera_frame, self.get_clock().now().to_msg())
        if self._static_broadcaster is not None:
            self._static_broadcaster.sendTransform([transform])
        else:
            self._tf_static_pub.publish(messages.tf_message([transform]))

    # ------------------------------------------------------------------ bad input & diagnostics

    def _drop(self, reason: str, detail: str) -> None:
        count = self.stats.count(reason)
        if reason == "superseded":
            return  # expected whenever the camera outpaces the model: reported in diagnostics only
        log = self.get_logger().error if reason == "internal_error" else self.get_logger().warning
        self._warn_throttled(reason, f"dropped frame ({DROP_REASONS.get(reason, reason)}): {detail} [{count} so far]", log)

    def _warn_throttled(self, key: str, text: str, log: Callable | None = None) -> None:
        now = time.monotonic()
        last = self._last_warning.get(key)
        if last is not None and now - last < self._settings.log_throttle:
            return
        self._last_warning[key] = now
        (log or self.get_logger().warning)(text)

    def counters(self) -> dict:
        """Copy of the frame counters (received, processed and each drop reason)."""
        with self.stats.lock:
            return dict(self.stats.counts)

    def _diagnostic_values(self) -> tuple[dict, bool]:
        counts, latencies, ages = self.stats.window()
        now = time.monotonic()
        elapsed = max(now - self._window_start, 1e-9)
        self._window_start = now
        values = {
            "rate_hz": len(latencies) / elapsed,
            "latency_mean_ms": 1e3 * float(np.mean(latencies)) if latencies else float("nan"),
            "latency_max_ms": 1e3 * float(np.max(latencies)) if latencies else float("nan"),
            "age_at_publish_mean_ms": 1e3 * float(np.mean(ages)) if ages else float("nan"),
            "received": counts.get("received", 0),
            "processed": counts.get("processed", 0),
        }
        dropped = {reason: counts.get(reason, 0) for reason in (*DROP_REASONS, "no_odometry", "bad_odometry")}
        values.update({f"dropped_{reason}" if reason in DROP_REASONS else reason: n for reason, n in dropped.items()})
        values.update({"device": str(self.relocalizer.device), "backend": self.relocalizer.backend_name, "checkpoint": self._settings.checkpoint, "tf_mode": self._settings.tf_mode})
        new_problems = any(dropped[r] > self._last_drop_counts.get(r, 0) for r in dropped if r != "superseded")
        self._last_drop_counts = dropped
        return values, new_problems

    def _publish_diagnostics(self) -> None:
        values, new_problems = self._diagnostic_values()
        self._recent_values = values
        worker_alive = self._worker is not None and self._worker.is_alive()
        if not worker_alive:
            level, message = messages.DIAGNOSTIC_ERROR, "inference worker stopped"
        elif new_problems:
            level, message = messages.DIAGNOSTIC_WARN, "frames dropped for bad input (see values)"
        else:
            level, message = messages.DIAGNOSTIC_OK, f"relocalising at {values['rate_hz']:.1f} Hz"
        self._diagnostics_pub.publish(
            messages.diagnostic_array(
                self.get_clock().now().to_msg(), f"{self.get_name()}: relocalization", str(self.relocalizer.device), level, message, values
            )
        )

    def _log_summary(self) -> None:
        """One info line: totals, and rate/latency of the latest diagnostics window."""
        counts, recent = self.counters(), self._recent_values
        drops = ", ".join(f"{reason} {counts[reason]}" for reason in (*DROP_REASONS, "no_odometry") if counts.get(reason))
        timing = ""
        if recent and recent["rate_hz"] > 0:
            timing = f" ({recent['rate_hz']:.1f} Hz, latency {recent['latency_mean_ms']:.1f} ms mean / {recent['latency_max_ms']:.1f} ms max)"
        self.get_logger().info(
            f"received {counts.get('received', 0)} frames, relocalised {counts.get('processed', 0)}{timing}"
            + (f"; dropped: {drops}" if drops else "")
        )

    # ------------------------------------------------------------------ shutdown

    def destroy_node(self) -> None:
        """Stop the worker (it may be publishing) before the publishers go away."""
        self._slot.close()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=30.0)
            if self._worker.is_alive():
                self.get_logger().warning("inference worker did not stop within 30 s")
        super().destroy_node()


# ----------------------------------------------------------------------------- entry point


def _argument_parser() -> argparse.ArgumentParser:
    parameters = "\n".join(f"  {spec.name} (default {spec.default!r}): {spec.description}" for spec in PARAMETERS)
    return argparse.ArgumentParser(
        prog=NODE_NAME,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="PoseNet camera relocalisation node. Set parameters with ROS arguments, e.g.\n"
        "  ros2 run ros2_posenet posenet_node --ros-args -p checkpoint:=model.pt -p image_topic:=/camera/image_raw\n"
        "or a params file (--ros-args --params-file config/posenet.yaml).",
        epilog="parameters:\n" + parameters,
    )


def main(argv: list[str] | None = None) -> int:
    """Console script ``posenet_node``; returns 0 on a clean shutdown, 2 on a configuration error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _argument_parser().parse_args(rclpy.utilities.remove_ros_args(["prog", *argv])[1:])
    node = None
    try:
        rclpy.init(args=["prog", *argv])
        node = PoseNetNode()
        rclpy.spin(node)
    except (ConfigurationError, CheckpointError) as err:
        rclpy.logging.get_logger(NODE_NAME).fatal(f"cannot start: {err}")
        return 2
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

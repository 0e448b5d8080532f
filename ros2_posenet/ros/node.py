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
* ``/diagnostics`` (``diagnostic_msgs/DiagnosticArray``) and a periodic log line;
* for robots (``ros/robot.py``): ``/initialpose`` for Nav2/AMCL (``initial_pose``), the
  ``~/relocalize`` (Trigger) and ``~/enable`` (SetBool) services, the ``max_rate_hz`` cap;
  ``checkpoint`` changes at run time load the new model in the background and swap it.

The same class runs as a managed node (``lifecycle_node.py``): start-up is four steps,
``_configure``, ``_activate``, ``_deactivate``, ``_cleanup``, which the plain node runs itself.

Bad input (bad encodings, empty/truncated/corrupt/oversized images, negative, zero,
future or stale stamps, NaN output, missing odometry) is logged with throttling,
counted, and never stops the node; a worker thread that still dies is restarted.
Run ``posenet_node --help`` for the parameters.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
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
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.time import Time
from builtin_interfaces.msg import Time as BuiltinTime
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from ..checkpoint import CheckpointError
from ..covariance import UNCERTAINTY_METHODS, standard_deviations
from ..frames import CameraMount, PoseHistory, RelocalizedPoses, extrinsic_matrix, map_to_odom
from ..backends import COMPILE_MODES
from ..inference import BACKENDS, PRECISIONS, BackendUnavailableError, NonFiniteOutputError, Relocalizer, resolve_device
from ..initial_pose import INITIAL_POSE_MODES
from ..geometric.refiner import RefinementConfig
from ..geometric.scene_map import MapError
from . import messages
from .robot import RobotInterfaces
from .camera_info import CameraInfoBuffer, CameraInfoError
from .image import ImageConversionError, msg_to_rgb
from .refinement import REFINED, NodeRefinement

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


def _initial_pose_mode(value) -> str | None:
    # YAML (rcl's parser, `-p initial_pose:=off`) reads an unquoted off as the boolean false.
    if value is False or (isinstance(value, str) and value in INITIAL_POSE_MODES):
        return None
    return f"must be one of {', '.join(INITIAL_POSE_MODES)}"


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
    ParamSpec("checkpoint", "", "Path to a ros2_posenet checkpoint (.pt) written by `train`. Changing it at run time (another map or floor) loads the new model in the background and swaps it atomically; a bad file leaves the old model serving.", _non_empty, read_only=False),
    ParamSpec("device", "auto", "Inference device: auto (CUDA when available), cpu, cuda or cuda:N.", _device, read_only=False),
    ParamSpec("backend", "torch", "Inference backend: torch, onnxruntime, tensorrt (CUDA) or auto.", _one_of(BACKENDS), read_only=False),
    ParamSpec("precision", "fp32", "Network precision: fp32, or fp16 on CUDA (falls back to fp32 on CPU with a warning).", _one_of(PRECISIONS), read_only=False),
    ParamSpec("uncertainty", "", "Per-frame covariance of the regressor: fixed, mc_dropout or variance_head (torch backend; calibrated in the checkpoint); empty: the checkpoint's choice.", lambda v: None if v in ("", *UNCERTAINTY_METHODS) else f"must be empty or one of {', '.join(UNCERTAINTY_METHODS)}", read_only=False),
    ParamSpec("mc_samples", 0, "Dropout samples per frame for uncertainty mc_dropout (0: the checkpoint's).", _number(0), read_only=False),
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
    ParamSpec("enabled", True, "Relocalise incoming images; false pauses inference (the model stays loaded, ~/relocalize still answers). ~/enable sets it.", read_only=False),
    ParamSpec("max_rate_hz", 0.0, "Relocalise at most this many images per second (0: as many as the model keeps up with); the others are skipped before decoding.", _number(0.0), read_only=False, dynamic_typing=True),
    ParamSpec("initial_pose", "off", "Seed Nav2/AMCL on initial_pose_topic: off, once (the first confident pose while someone subscribes) or on_request (each ~/relocalize call).", _initial_pose_mode, read_only=False, dynamic_typing=True),
    ParamSpec("initial_pose_topic", "/initialpose", "geometry_msgs/PoseWithCovarianceStamped topic AMCL reads its initial pose from (planar: x, y, yaw).", _non_empty),
    ParamSpec("initial_pose_max_position_std", 0.5, "Seed only when the position standard deviation (worst horizontal direction, m) is at most this.", _number(0.0, strictly=True), read_only=False, dynamic_typing=True),
    ParamSpec("initial_pose_max_yaw_std", 0.35, "Seed only when the yaw standard deviation (rad) is at most this.", _number(0.0, strictly=True), read_only=False, dynamic_typing=True),
    ParamSpec("relocalize_timeout", 5.0, "Seconds ~/relocalize waits for an image to relocalise before it answers with a failure.", _number(0.0, strictly=True), read_only=False, dynamic_typing=True),
    ParamSpec("pose_topic", "posenet/pose", "Output geometry_msgs/PoseStamped of base_frame in the map.", _non_empty),
    ParamSpec("pose_with_covariance_topic", "posenet/pose_with_covariance", "Output geometry_msgs/PoseWithCovarianceStamped of base_frame in the map.", _non_empty),
    ParamSpec("camera_pose_topic", "posenet/camera_pose", "Output geometry_msgs/PoseStamped of camera_frame in the map.", _non_empty),
    ParamSpec("diagnostics_period", 1.0, "Seconds between diagnostic_msgs/DiagnosticArray messages on /diagnostics.", _number(0.0, strictly=True), dynamic_typing=True),
    ParamSpec("log_period", 30.0, "Seconds between summary log lines (0: never).", _number(0.0), dynamic_typing=True),
    ParamSpec("log_throttle", 5.0, "Each kind of dropped-frame warning is logged at most once per this many seconds.", _number(0.0), read_only=False, dynamic_typing=True),
    ParamSpec("future_stamp_tolerance", 1.0, "Drop frames stamped more than this many seconds ahead of the node's clock (0: never).", _number(0.0), read_only=False, dynamic_typing=True),
    ParamSpec("map_file", "", "Scene map (.npz written by `build-map`) for the geometric refinement: the regressor's pose is refined by local features + PnP-RANSAC and published with its geometric covariance; empty: regressor only. Switched at run time like checkpoint.", read_only=False),
    ParamSpec("refine", True, "Refine poses against map_file when one is given; false publishes the regressor's poses (the map stays loaded).", read_only=False),
    ParamSpec("refine_config", "", "YAML of refinement settings (RefinementConfig fields, e.g. config/refine.yaml); empty: the defaults.", read_only=False),
    ParamSpec("camera_info_topic", "", "sensor_msgs/CameraInfo of the images, needed by the refinement; empty: camera_info beside image_topic (/camera/image_raw -> /camera/camera_info)."),
    ParamSpec("camera_info_tolerance", -1.0, "Largest gap (s) between an image stamp and the CameraInfo used for it; negative: the latest CameraInfo (a fixed calibration).", _number(-math.inf), read_only=False, dynamic_typing=True),
    ParamSpec("initial_pose_require_refined", False, "With a map: seed initial_pose_topic only with geometrically verified (refined) poses.", read_only=False),
    ParamSpec("max_image_pixels", 25_000_000, "Drop images of more pixels (width x height, read from the header before decoding; 0: no limit).", _number(0), read_only=False),
)
PARAMETER_NAMES = tuple(spec.name for spec in PARAMETERS)
# Changing any of these loads a new model in the background (node._switch_model).
MODEL_PARAMETERS = ("checkpoint", "device", "backend", "precision", "uncertainty", "mc_samples", "map_file", "refine_config")
_SPECS = {spec.name: spec for spec in PARAMETERS}


def validate_parameter(name: str, value: Any) -> str | None:
    """Problem with ``value`` for parameter ``name`` (``None`` when fine)."""
    spec = _SPECS.get(name)
    if spec is None or spec.check is None:
        return None
    return spec.check(value)


def camera_info_topic_of(image_topic: str, compressed: bool = False) -> str:
    """The CameraInfo topic beside an image topic, as image_transport names it.

    ``/camera/image_raw`` -> ``/camera/camera_info``; ``/camera/image_raw/compressed`` -> ``/camera/camera_info``.
    """
    base = image_topic.rstrip("/")
    if compressed and base.endswith("/compressed"):
        base = base[: -len("/compressed")]
    namespace = base.rsplit("/", 1)[0] if "/" in base else ""
    return f"{namespace}/camera_info" if namespace or base.startswith("/") else "camera_info"


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
    latest_covariance: np.ndarray | None = None  # of the last published base pose (diagnostics' sigma)
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
    "negative_stamp": "negative header stamp",
    "zero_stamp": "header stamp is zero (the driver did not stamp the image)",
    "future_stamp": "image stamped ahead of the node's clock by more than future_stamp_tolerance",
    "unsupported_encoding": "unsupported image encoding",
    "empty_image": "zero-sized image",
    "truncated_image": "truncated image data",
    "image_too_large": "image larger than max_image_pixels",
    "corrupt_compressed": "corrupt compressed image",
    "bad_image": "image unusable",
    "non_finite_output": "network output is NaN/inf",
    "internal_error": "unexpected error while processing a frame",
}

# A worker that dies more often than this is not restarted again: the node exits
# with EXIT_WORKER_FAILED so that a supervisor (launch `respawn`, systemd) starts it afresh.
WORKER_RESTART_LIMIT = 5
WORKER_RESTART_WINDOW_S = 60.0
EXIT_WORKER_FAILED = 3


# ----------------------------------------------------------------------------- node


class PoseNetNode(Node):
    """The relocalisation node. Accepts the standard :class:`rclpy.node.Node` keyword arguments.

    Raises :class:`ConfigurationError` or :class:`~ros2_posenet.checkpoint.CheckpointError`
    at construction when a parameter or the checkpoint is unusable.
    """

    # A plain node configures and activates itself when constructed; the managed node
    # (lifecycle_node.PoseNetLifecycleNode) waits for its lifecycle manager instead. Both run
    # the same four steps: _configure, _activate, _deactivate, _cleanup.
    MANAGED = False

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        self.stats = Statistics()
        self._slot = LatestFrameSlot()
        self._worker: threading.Thread | None = None
        self._last_warning: dict[str, float] = {}
        self._odometry = PoseHistory()
        self._odometry_lock = threading.Lock()
        self._camera_infos = CameraInfoBuffer()  # outlives map switches
        self._camera_info_sub = None
        self._refinement_window: list = []  # (refined?, inliers, ms) of the diagnostics window
        self._refinement_problem = ""  # why map_file could not be loaded at configure ("" : none)
        self._settings: Settings | None = None  # None until configured; holds the serving model too
        self._settings_lock = threading.RLock()  # parameter changes vs. model swaps
        self._model_generation = 0  # the newest requested model switch
        self._reverting = threading.local()
        self._robot: RobotInterfaces | None = None
        self._image_sub = self._odom_sub = None
        self._diagnostics_timer = self._log_timer = None
        self._outputs: list = []  # publishers made at configure
        self.exit_code = 0  # what main() returns once spinning ends (non-zero: let `respawn` restart us)
        try:
            self._declare_parameters()
            self.add_on_set_parameters_callback(self._validate_parameter_change)
            self.add_post_set_parameters_callback(self._apply_parameter_change)
            if not self.MANAGED:
                self._configure()
                self._activate()
        except BaseException:
            self.destroy_node()
            raise

    # ------------------------------------------------------------------ lifecycle steps

    def _configure(self) -> None:
        """Read and check the parameters, load the model, create publishers and services."""
        s = self._read_settings()
        self._check_environment(s)
        if s.cpu_threads > 0:
            torch.set_num_threads(int(s.cpu_threads))
        model = self._build_relocalizer(s)
        self._refinement_problem = ""
        try:
            refinement = self._build_refinement(s)
        except ConfigurationError as err:  # the map is optional: the regressor alone still serves
            self._refinement_problem = str(err)
            self.get_logger().error(f"geometric refinement off, publishing the regressor's poses: {err}")
            refinement = None
        with self._settings_lock:
            self._settings = self._settings_from({**s.values, "model": model, "refinement": refinement})
        self._create_interfaces(self._settings)
        self._robot = RobotInterfaces(self)

    def _activate(self) -> None:
        """Start the worker, then subscribe to images (and odometry) and publish diagnostics."""
        s = self._settings
        self._start_worker()
        self._create_subscriptions(s)
        self._window_start = time.monotonic()
        self._last_drop_counts: dict = {}
        self._recent_values: dict = {}
        self._diagnostics_timer = self.create_timer(s.diagnostics_period, self._publish_diagnostics)
        self._log_timer = self.create_timer(s.log_period, self._log_summary) if s.log_period > 0 else None
        self.get_logger().info(
            f"relocalising {'compressed ' if s.compressed else ''}images from {self._image_sub.topic_name} "
            f"with {s.checkpoint} ({self.relocalizer.backend_name} on {self.relocalizer.device}); publishing {self._pose_pub.topic_name} in frame "
            f"'{self.map_frame}', tf_mode {s.tf_mode}{self._odom_source_note()}"
        )

    def _deactivate(self) -> None:
        """Stop taking images; returns once the frame in flight (if any) is published. Idempotent."""
        for subscription in (self._image_sub, self._odom_sub, self._camera_info_sub):
            if subscription is not None:
                self.destroy_subscription(subscription)
        self._image_sub = self._odom_sub = self._camera_info_sub = None
        for timer in (self._diagnostics_timer, self._log_timer):
            if timer is not None:
                self.destroy_timer(timer)
        self._diagnostics_timer = self._log_timer = None
        if self._robot is not None:
            self._robot.cancel_pending("node deactivated")
        self._stop_worker()

    def _cleanup(self) -> None:
        """Destroy publishers and services and free the model (and its GPU memory). Idempotent."""
        if self._robot is not None:
            self._robot.destroy()
            self._robot = None
        for publisher in self._outputs:
            self.destroy_publisher(publisher)
        self._outputs = []
        if getattr(self, "_tf_listener", None) is not None:
            self._tf_listener.unregister()
        self._tf_broadcaster = self._tf_pub = self._tf_buffer = self._tf_listener = None
        self._static_broadcaster = self._tf_static_pub = None
        with self._settings_lock:
            self._model_generation += 1  # a model still loading in the background is not swapped in
            had_model = self._settings is not None
            self._settings = None
        if had_model and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _start_worker(self) -> None:
        self._slot = LatestFrameSlot()
        self._worker = threading.Thread(target=self._worker_loop, name="posenet_worker", daemon=True)
        self._worker.start()

    def _stop_worker(self) -> None:
        """Close the slot and wait for the worker to finish the frame it holds."""
        self._slot.close()
        worker, self._worker = self._worker, None
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=30.0)
            if worker.is_alive():
                self.get_logger().warning("inference worker did not stop within 30 s")

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
        for name in ("odom_tolerance", "transform_tolerance", "max_image_age", "diagnostics_period", "log_period", "log_throttle",
                     "max_rate_hz", "initial_pose_max_position_std", "initial_pose_max_yaw_std", "relocalize_timeout",
                     "camera_info_tolerance"):
            values[name] = float(values[name])
        values["camera_to_base"] = [float(v) for v in values["camera_to_base"]]
        values["mount"] = CameraMount.from_xyz_rpy(values["camera_to_base"])
        if values["initial_pose"] is False:  # an unquoted `off` in YAML
            values["initial_pose"] = "off"
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

    @staticmethod
    def _build_relocalizer(s: Settings) -> Relocalizer:
        # CheckpointError already says what to do; let it through unchanged.
        try:
            return Relocalizer(
                s.checkpoint, device=s.device, backend=s.backend, precision=s.precision, compile=s.compile, cuda_graph=s.cuda_graph,
                uncertainty=s.uncertainty or None, mc_samples=int(s.mc_samples) or None,
            )
        except BackendUnavailableError as err:
            raise ConfigurationError(f"parameter 'backend' = {s.backend!r}: {err}") from None
        except ValueError as err:  # an uncertainty method the checkpoint has no calibration for
            raise ConfigurationError(f"parameter 'uncertainty' = {s.uncertainty!r}: {err}") from None

    def _build_refinement(self, s: Settings) -> NodeRefinement | None:
        """The map and refiner of ``map_file`` (None without a map)."""
        if not s.map_file:
            return None
        try:
            config = RefinementConfig.from_yaml(s.refine_config) if s.refine_config else None
            return NodeRefinement(s.map_file, config, self._camera_infos, warn=self.get_logger().warning)
        except MapError as err:
            raise ConfigurationError(f"parameter 'map_file' = {s.map_file!r}: {err}") from None
        except ValueError as err:  # bad refine_config, or the pose solver's library is missing
            raise ConfigurationError(f"refinement settings: {err}") from None

    @property
    def relocalizer(self) -> Relocalizer | None:
        """The serving model (``None`` while not configured)."""
        s = self._settings
        return None if s is None else s.model

    @relocalizer.setter
    def relocalizer(self, model: Relocalizer) -> None:
        with self._settings_lock:
            self._settings = self._settings_from({**self._settings.values, "model": model})

    def _create_interfaces(self, s: Settings) -> None:
        """Publishers (pose, covariance, camera pose, diagnostics, TF), made at configure."""
        try:
            self._pose_pub = self.create_publisher(PoseStamped, s.pose_topic, 10)
            self._pose_cov_pub = self.create_publisher(PoseWithCovarianceStamped, s.pose_with_covariance_topic, 10)
            self._camera_pose_pub = self.create_publisher(PoseStamped, s.camera_pose_topic, 10)
        except Exception as err:  # rclpy raises InvalidTopicNameException & co.
            raise ConfigurationError(f"cannot create the node's topics: {err}") from None
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._outputs = [self._pose_pub, self._pose_cov_pub, self._camera_pose_pub, self._diagnostics_pub]
        self._create_tf_interfaces(s)
        for broadcaster in (self._tf_broadcaster, self._static_broadcaster):
            if broadcaster is not None:
                self._outputs.append(broadcaster.pub_tf)
        self._outputs += [p for p in (self._tf_pub, self._tf_static_pub) if p is not None]

    def _create_subscriptions(self, s: Settings) -> None:
        """Images (and odometry for map_to_odom from a topic), made at activate."""
        image_qos = QoSProfile(
            depth=int(s.image_qos_depth),
            history=HistoryPolicy.KEEP_LAST,
            reliability=qos_profile_sensor_data.reliability if s.image_qos == "sensor_data" else ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.VOLATILE,
        )
        image_type = CompressedImage if s.compressed else Image
        try:
            self._image_sub = self.create_subscription(image_type, s.image_topic, self._on_image, image_qos)
            if s.tf_mode == "map_to_odom" and self._odom_source(s) == "topic":
                self._odom_sub = self.create_subscription(Odometry, s.odom_topic, self._on_odometry, 50)
            # Always: a map may be switched on at run time. Best effort matches any camera driver's QoS.
            self._camera_info_sub = self.create_subscription(
                CameraInfo, s.camera_info_topic or camera_info_topic_of(s.image_topic, s.compressed), self._on_camera_info, qos_profile_sensor_data
            )
        except Exception as err:  # rclpy raises InvalidTopicNameException & co.
            raise ConfigurationError(f"cannot create the node's topics: {err}") from None

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
            if not problem and parameter.name == "checkpoint" and not getattr(self._reverting, "active", False):
                problem = None if os.path.isfile(parameter.value) else "no such file"
            if problem:
                return SetParametersResult(successful=False, reason=f"parameter '{parameter.name}' = {parameter.value!r}: {problem}")
        return SetParametersResult(successful=True)

    def _apply_parameter_change(self, parameters) -> None:
        if getattr(self._reverting, "active", False):
            return  # a failed model switch putting the serving values back
        with self._settings_lock:
            if self._settings is None:
                return  # not configured yet: _configure reads every parameter
            values = dict(self._settings.values)
            values.update({p.name: p.value for p in parameters if p.name in _SPECS and p.name not in MODEL_PARAMETERS})
            self._settings = self._settings_from(values)
        model_change = {p.name: p.value for p in parameters if p.name in MODEL_PARAMETERS}
        if model_change:
            self._switch_model(model_change)
        s = self._settings
        if s is not None and s.publish_camera_to_base_tf and any(p.name in ("camera_to_base", "base_frame", "camera_frame") for p in parameters):
            self._publish_static_extrinsic(s)

    # ------------------------------------------------------------------ model switching (map/floor change at run time)

    def _switch_model(self, change: dict) -> None:
        """Load the model ``change`` asks for in the background; the serving one answers meanwhile."""
        with self._settings_lock:
            self._model_generation += 1
            generation = self._model_generation
            target = self._settings_from({**self._settings.values, **change})
            serving = self._settings.checkpoint
        self.get_logger().info(f"loading {target.checkpoint} ({target.backend} on {target.device}) in the background; {serving} keeps serving")
        threading.Thread(target=self._load_and_swap, args=(generation, target, change), name="posenet_model_loader", daemon=True).start()

    def _load_and_swap(self, generation: int, target: Settings, change: dict) -> None:
        try:
            model = self._build_relocalizer(target)
            refinement = self._build_refinement(target)  # a bad map rejects the switch: old model and map keep serving
        except Exception as err:  # CheckpointError, ConfigurationError, CUDA errors...
            self._reject_model_switch(generation, target, change, err if isinstance(err, (CheckpointError, ConfigurationError)) else f"{type(err).__name__}: {err}")
            return
        with self._settings_lock:
            if generation != self._model_generation or self._settings is None:
                return  # a newer switch was requested, or the node was cleaned up meanwhile
            previous = self._settings.checkpoint
            # One assignment: the worker reads either the old settings (model, map frame) or the new ones.
            self._settings = self._settings_from({**self._settings.values, **change, "model": model, "refinement": refinement})
            self._refinement_problem = ""
        self.get_logger().info(f"switched model: now relocalising with {target.checkpoint} in map frame '{self.map_frame}' (was {previous})")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the old model's memory, once the worker lets go of it

    def _reject_model_switch(self, generation: int, target: Settings, change: dict, reason) -> None:
        with self._settings_lock:
            if generation != self._model_generation or self._settings is None:
                return
            serving = {name: self._settings.values[name] for name in change}
        self.get_logger().error(f"cannot switch to {target.checkpoint}: {reason}; still relocalising with {serving.get('checkpoint', self._settings.checkpoint)}")
        self._reverting.active = True
        try:  # the parameters say what is serving
            self.set_parameters([Parameter(name, value=value) for name, value in serving.items()])
        finally:
            self._reverting.active = False

    # ------------------------------------------------------------------ robot interfaces (ros/robot.py)

    def _admit_frame(self, msg) -> bool:
        """Whether a received image goes to the worker: ``enabled``, ``max_rate_hz`` and ~/relocalize decide."""
        robot = self._robot
        return robot is None or robot.admit(msg)

    def _after_relocalization(self, poses: RelocalizedPoses, map_frame: str, stamp, refined: bool | None = None) -> None:
        """Worker thread, after the poses of a frame were published: /initialpose and ~/relocalize answers.

        ``refined``: True/False whether the geometric stage verified the pose, None without a map.
        """
        self.stats.latest_covariance = poses.base_covariance
        robot = self._robot
        if robot is not None:
            robot.on_relocalized(poses.T_map_base, poses.base_covariance, map_frame, stamp, refined)

    # ------------------------------------------------------------------ callbacks (executor thread)

    def _on_image(self, msg) -> None:
        if not self._admit_frame(msg):  # paused, over max_rate_hz (counted there)
            return
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
        """Relocalise the newest frame until the slot closes.

        :meth:`_process_safely` catches, counts and logs every exception of a frame. Should
        anything still end this thread, it records why, and the supervisor
        (:meth:`_supervise_worker`, on the diagnostics timer) starts a new one.
        """
        try:
            while not self._slot.closed:
                msg = self._slot.take(timeout=0.2)
                if msg is not None:
                    self._process_safely(msg)
        except BaseException as err:  # recorded for the supervisor, which restarts the worker
            self._worker_failure = f"{type(err).__name__}: {err}"
            self._error_throttled("worker_stopped", f"inference worker stopped: {self._worker_failure}\n{traceback.format_exc()}")

    def _process_safely(self, msg) -> None:
        try:
            self._process(msg)
        except Exception as err:  # never let one frame kill the worker
            self._drop("internal_error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        except BaseException:
            self.stats.count("internal_error")  # the frame dies with the worker; keep received = processed + drops
            raise

    def _process(self, msg) -> None:
        started = time.perf_counter()
        s = self._settings
        stamp_ns = messages.stamp_nanoseconds(msg.header.stamp)
        problem = self._stamp_problem(s, msg.header.stamp, stamp_ns)
        if problem is not None:
            self._drop(*problem)
            return
        try:
            rgb = msg_to_rgb(msg, s.max_image_pixels, self._on_format_mismatch)
            prediction = s.model.predict(rgb)  # s: one snapshot, so a model switch never splits a frame
        except ImageConversionError as err:
            self._drop(err.reason, str(err))
            return
        except NonFiniteOutputError as err:
            self._drop("non_finite_output", str(err))
            return
        except ValueError as err:  # the preprocessor rejects e.g. 1-pixel images
            self._drop("bad_image", str(err))
            return
        prediction, refined = self._refine(s, rgb, stamp_ns, prediction)
        poses = RelocalizedPoses.from_prediction(prediction.position, prediction.quaternion, prediction.covariance, s.mount)
        if not poses.is_finite:
            self._drop("non_finite_output", "pose or covariance is not finite")
            return
        self._publish_outputs(s, poses, messages.stamp_from_nanoseconds(stamp_ns), refined)
        age = self._age(stamp_ns)
        self.stats.record(time.perf_counter() - started, float("nan") if age is None else age)

    def _refine(self, s: Settings, rgb: np.ndarray, stamp_ns: int, prediction):
        """(prediction to publish, refined?) — the regressor's unless the map verifies a better pose.

        The geometric stage never costs a frame: any failure publishes the regressor's pose.
        """
        stage = s.refinement
        if stage is None or not s.refine:
            return prediction, None
        started = time.perf_counter()
        try:
            outcome = stage.refine(rgb, stamp_ns * 1e-9, prediction, s.camera_info_tolerance)
        except Exception as err:  # a bug or a malformed CameraInfo: fall back, count, report
            count = self.stats.count("refine_error")
            self._error_throttled("refine_error", f"refinement failed, publishing the regressor's pose: {type(err).__name__}: {err} [{count} so far]")
            return prediction, False
        self.stats.count(f"refine_{outcome.status}")
        inliers = outcome.result.inliers if outcome.result is not None else 0
        with self.stats.lock:
            self._refinement_window.append((outcome.status == REFINED, inliers, 1e3 * (time.perf_counter() - started)))
        if outcome.status != REFINED:
            self._warn_throttled(f"refine_{outcome.status}", f"refinement {outcome.status}: {outcome.reason}; publishing the regressor's pose")
        return outcome.prediction, outcome.status == REFINED

    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            intrinsics = self._camera_infos.add(msg)
        except CameraInfoError as err:
            count = self.stats.count("bad_camera_info")
            self._warn_throttled("bad_camera_info", f"ignoring CameraInfo: {err} [{count} so far]")
            return
        s = self._settings
        stage = None if s is None else s.refinement
        if stage is not None:
            stage.check_intrinsics(intrinsics)

    def _stamp_problem(self, s: Settings, stamp, stamp_ns: int) -> tuple[str, str] | None:
        """(drop reason, detail) when no output may carry this stamp, else None."""
        problem = messages.stamp_problem(stamp)
        if problem is not None:
            return problem
        age = self._age(stamp_ns)
        if age is None:  # simulated time before the first /clock message: the age is unknown
            return None
        if s.max_image_age > 0 and age > s.max_image_age:
            return "stale", f"stamp {stamp_ns * 1e-9:.3f} is {age:.3f} s old (max_image_age {s.max_image_age} s)"
        if s.future_stamp_tolerance > 0 and -age > s.future_stamp_tolerance:
            return "future_stamp", (
                f"stamp {stamp_ns * 1e-9:.3f} is {-age:.3f} s ahead of the node's clock (future_stamp_tolerance "
                f"{s.future_stamp_tolerance} s); are the camera's and this machine's clocks synchronised?"
            )
        return None

    def _age(self, stamp_ns: int) -> float | None:
        """Seconds from ``stamp_ns`` to now on the node's clock; None while a simulated clock reads 0."""
        now = self.get_clock().now().nanoseconds
        return (now - stamp_ns) * 1e-9 if now > 0 else None

    def _publish_outputs(self, s: Settings, poses: RelocalizedPoses, stamp: BuiltinTime, refined: bool | None = None) -> None:
        """Publish one frame's outputs, the base pose first; messages nobody subscribes to are not even built."""
        map_frame = s.map_frame or s.model.map_frame
        if self._pose_pub.get_subscription_count():
            self._pose_pub.publish(messages.pose_stamped(poses.T_map_base, map_frame, stamp))
        if self._pose_cov_pub.get_subscription_count():
            self._pose_cov_pub.publish(messages.pose_with_covariance_stamped(poses.T_map_base, poses.base_covariance, map_frame, stamp))
        if self._camera_pose_pub.get_subscription_count():
            self._camera_pose_pub.publish(messages.pose_stamped(poses.T_map_camera, map_frame, stamp))
        self._publish_tf(s, poses.T_map_camera, poses.T_map_base, stamp)
        self._after_relocalization(poses, map_frame, stamp, refined)

    def _publish_tf(self, s: Settings, T_map_camera: np.ndarray, T_map_base: np.ndarray, stamp: BuiltinTime) -> None:
        if s.tf_mode == "none" or not self._tf_subscription_count():
            return
        tf_stamp = messages.shifted_stamp(stamp, s.transform_tolerance) if s.transform_tolerance > 0 else stamp
        if s.tf_mode == "map_to_camera":
            transform = messages.transform_stamped(T_map_camera, s.map_frame or s.model.map_frame, s.camera_frame, tf_stamp)
        else:
            T_odom_base = self._odom_to_base(s, stamp)
            if T_odom_base is None:
                return
            T_map_odom = map_to_odom(T_map_base, T_odom_base)
            transform = messages.transform_stamped(T_map_odom, s.map_frame or s.model.map_frame, s.odom_frame, tf_stamp)
        self._send_transforms([transform])

    def _tf_subscription_count(self) -> int:
        publisher = self._tf_pub if self._tf_broadcaster is None else getattr(self._tf_broadcaster, "pub_tf", None)
        return 1 if publisher is None else publisher.get_subscription_count()  # unknown broadcaster internals: always send

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
        text = f"dropped frame ({DROP_REASONS.get(reason, reason)}): {detail} [{count} so far]"
        if reason == "internal_error":
            self._error_throttled(reason, text)
        else:
            self._warn_throttled(reason, text)

    def _on_format_mismatch(self, text: str) -> None:
        count = self.stats.count("format_mismatch")
        self._warn_throttled("format_mismatch", f"{text} [{count} so far]; decoded it as what the bytes are")

    # rclpy refuses a severity change at one call site ("Logger severity cannot be changed
    # between calls"), so each severity has its own logger call below. A failing logger is
    # reported on stderr and never propagates into the frame pipeline.

    def _warn_throttled(self, key: str, text: str) -> None:
        if self._log_due(key):
            try:
                self.get_logger().warning(text)
            except Exception as err:
                print(f"[WARN] [{NODE_NAME}]: {text} (rclpy logging failed: {err})", file=sys.stderr)

    def _error_throttled(self, key: str, text: str) -> None:
        if self._log_due(key):
            try:
                self.get_logger().error(text)
            except Exception as err:
                print(f"[ERROR] [{NODE_NAME}]: {text} (rclpy logging failed: {err})", file=sys.stderr)

    def _log_due(self, key: str) -> bool:
        """True at most once per ``log_throttle`` seconds for each kind of message."""
        now = time.monotonic()
        last = self._last_warning.get(key)
        if last is not None and now - last < self._settings.log_throttle:
            return False
        self._last_warning[key] = now
        return True

    # ------------------------------------------------------------------ worker supervision

    _worker_failure = ""  # why the worker thread ended (set by the thread itself)
    _restart_times: tuple = ()  # monotonic times of recent restarts
    _last_restart: tuple | None = None  # (wall-clock time, reason) of the latest restart

    def _supervise_worker(self) -> bool:
        """Restart a worker thread that ended while the node runs (on the diagnostics timer).

        A worker that died WORKER_RESTART_LIMIT times within WORKER_RESTART_WINDOW_S is
        not restarted again: the node sets ``exit_code`` to EXIT_WORKER_FAILED and shuts its
        context down, so that ``main`` returns non-zero and launch's ``respawn`` (or systemd)
        starts a fresh process. Returns False then, True otherwise.
        """
        if self._worker is None or self._worker.is_alive() or self._slot.closed:
            return True
        now = time.monotonic()
        recent = tuple(t for t in self._restart_times if now - t < WORKER_RESTART_WINDOW_S)
        reason = self._worker_failure or "unknown cause"
        if len(recent) >= WORKER_RESTART_LIMIT:
            text = (
                f"inference worker died {len(recent) + 1} times within {WORKER_RESTART_WINDOW_S:.0f} s (last: {reason}); "
                f"exiting with code {EXIT_WORKER_FAILED} so that launch respawn restarts the node"
            )
            try:
                self.get_logger().fatal(text)
            except Exception:
                print(f"[FATAL] [{NODE_NAME}]: {text}", file=sys.stderr)
            self.exit_code = EXIT_WORKER_FAILED
            try:  # a last word for /diagnostics before the node goes
                self._publish_status(messages.DIAGNOSTIC_ERROR, text, {**self._recent_values, "worker_restarts": len(recent)})
            except Exception:
                pass
            self.context.try_shutdown()  # ends rclpy.spin in main(), which returns exit_code
            return False
        self._restart_times = (*recent, now)
        self._last_restart = (time.time(), reason)
        self._worker_failure = ""
        count = self.stats.count("worker_restarts")
        self._worker = threading.Thread(target=self._worker_loop, name="posenet_worker", daemon=True)
        self._worker.start()
        self._error_throttled("worker_restarted", f"inference worker had stopped ({reason}); restarted it [{count} restarts so far]")
        return True

    def _restart_note(self) -> str:
        """'restarted N times, last at HH:MM:SS UTC (reason)', or '' when the worker never restarted."""
        if self._last_restart is None:
            return ""
        when, reason = self._last_restart
        count = self.counters().get("worker_restarts", 0)
        return f"inference worker restarted {count} times, last at {time.strftime('%H:%M:%S', time.gmtime(when))} UTC ({reason})"

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
        values["format_mismatch"] = counts.get("format_mismatch", 0)
        values["worker_restarts"] = counts.get("worker_restarts", 0)
        values["last_worker_restart"] = self._restart_note() or "never"
        values.update({"device": str(self.relocalizer.device), "backend": self.relocalizer.backend_name, "checkpoint": self._settings.checkpoint,
                       "tf_mode": self._settings.tf_mode, "uncertainty": self.relocalizer.uncertainty})
        values.update(self._refinement_values(counts))
        if self.stats.latest_covariance is not None:  # what the EKF is told now
            values.update(standard_deviations(self.stats.latest_covariance))
        new_problems = any(dropped[r] > self._last_drop_counts.get(r, 0) for r in dropped if r != "superseded")
        self._last_drop_counts = dropped
        return values, new_problems

    def _refinement_values(self, counts: dict) -> dict:
        """The geometric stage in this diagnostics window: share refined, inliers, time per frame."""
        s = self._settings
        with self.stats.lock:
            window, self._refinement_window = self._refinement_window, []
        values = {"map_file": s.map_file or "none", "refine": bool(s.refine and s.refinement is not None)}
        if self._refinement_problem:
            values["refinement_problem"] = self._refinement_problem
        for key in ("refine_refined", "refine_fallback", "refine_no_camera_info", "refine_error", "bad_camera_info"):
            values[key] = counts.get(key, 0)
        if window:
            refined, inliers, ms = (np.asarray(column, dtype=float) for column in zip(*window))
            values.update({"refined_share": float(refined.mean()), "refine_inliers_mean": float(inliers.mean()), "refine_ms_mean": float(ms.mean())})
        return values

    def _publish_diagnostics(self) -> None:
        """Publish the status; also the worker's supervisor (restarts a dead worker, see _supervise_worker)."""
        if not self._supervise_worker():
            return  # the node is shutting down
        values, new_problems = self._diagnostic_values()
        self._recent_values = values
        worker_alive = self._worker is not None and self._worker.is_alive()
        recently_restarted = self._restart_times and time.monotonic() - self._restart_times[-1] < WORKER_RESTART_WINDOW_S
        if not worker_alive:
            level, message = messages.DIAGNOSTIC_ERROR, "inference worker stopped"
        elif recently_restarted:
            level, message = messages.DIAGNOSTIC_WARN, self._restart_note()
        elif new_problems:
            level, message = messages.DIAGNOSTIC_WARN, "frames dropped for bad input (see values)"
        elif self._refinement_problem:
            level, message = messages.DIAGNOSTIC_WARN, "geometric refinement off: the map could not be loaded (see refinement_problem)"
        else:
            level, message = messages.DIAGNOSTIC_OK, f"relocalising at {values['rate_hz']:.1f} Hz"
        self._publish_status(level, message, values)

    def _publish_status(self, level, message: str, values: dict) -> None:
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
        restarts = self._restart_note()
        self.get_logger().info(
            f"received {counts.get('received', 0)} frames, relocalised {counts.get('processed', 0)}{timing}"
            + (f"; dropped: {drops}" if drops else "")
            + (f"; {restarts}" if restarts else "")
        )

    # ------------------------------------------------------------------ shutdown

    def destroy_node(self) -> None:
        """Stop the worker (it may be publishing) before the publishers go away."""
        try:
            self._deactivate()
            self._cleanup()
        finally:
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


def main(argv: list[str] | None = None, node_class: type | None = None) -> int:
    """Console script ``posenet_node``: 0 on a clean shutdown (Ctrl-C included, even during start-up),
    2 on a configuration error, ``node.exit_code`` when the node asks for a restart."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _argument_parser().parse_args(rclpy.utilities.remove_ros_args(["prog", *argv])[1:])
    node = None
    try:
        rclpy.init(args=["prog", *argv])
        node = (node_class or PoseNetNode)()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as err:
        if not rclpy.ok():
            pass  # Ctrl-C during start-up: rclpy's signal handler shut the context down under us
        elif isinstance(err, (ConfigurationError, CheckpointError)):
            rclpy.logging.get_logger(NODE_NAME).fatal(f"cannot start: {err}")
            return 2
        else:
            raise
    finally:
        _shut_down_quietly(node)
    return node.exit_code if node is not None else 0


def _shut_down_quietly(node: PoseNetNode | None) -> None:
    """Destroy the node and shut rclpy down; a second Ctrl-C meanwhile only cuts this short."""
    try:
        if node is not None:
            node.destroy_node()
    except KeyboardInterrupt:
        pass
    finally:
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())

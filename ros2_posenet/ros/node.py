"""``posenet_node``: relocalise a camera from single images and publish its pose in the map.

Subscribes to ``sensor_msgs/Image`` (or ``CompressedImage``). The subscription callback only
hands the message to the inference worker (a one-frame mailbox, so a slow model never builds a
backlog), which regresses the newest frame and publishes at once, stamped with the image's stamp:

* ``pose_topic`` (``PoseStamped``), ``pose_with_covariance_topic`` (``PoseWithCovarianceStamped``,
  the checkpoint's calibrated covariance, 6×6 row-major x y z roll pitch yaw) and
  ``camera_pose_topic``: the regressor's pose of the robot base / camera body frame in the map;
* TF according to ``tf_mode``: ``map_to_camera``, ``map_to_odom`` (REP-105) or ``none``.

With a scene map (``map_file``) a second worker, the refiner, takes the newest regressed frame
whenever it is free and publishes the poses the map verified on ``verified_pose_topic`` with
their geometric covariance; the regressor's answer never waits for it. Each topic carries every
measurement once, in stamp order. Also ``/diagnostics``, a periodic log line and, for robots
(``ros/robot.py``), ``/initialpose``, ``~/relocalize``, ``~/enable`` and ``max_rate_hz``.
``checkpoint`` / ``map_file`` changes at run time load the new model and map in the background
and swap them atomically.

The managed node (``lifecycle_node.py``) runs the same four steps, ``_configure``, ``_activate``,
``_deactivate``, ``_cleanup``, which the plain node runs itself. Parameters: ``parameters.py``
(``posenet_node --help``); workers: ``worker.py``, ``verified.py``; per-frame outputs: ``outputs.py``
(shared with ``relocalize-bag``); diagnostics: ``diagnostics.py``.
"""
from __future__ import annotations

import sys
import threading
import time
import traceback

import cv2
import torch
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from nav_msgs.msg import Odometry
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from ..checkpoint import CheckpointError
from ..frames import RelocalizedPoses
from ..inference import NonFiniteOutputError, Relocalizer
from . import messages, outputs
from .camera_info import CameraInfoBuffer, CameraInfoError, stamp_gap_problem
from .diagnostics import DiagnosticsReporter, ThrottledLog
from .entry import run_node
from .image import ImageConversionError, msg_to_rgb
from .parameters import (  # noqa: F401  (PARAMETER_NAMES, validate_parameter: re-exported, the node's API before the split)
    FLOAT_PARAMETERS, MODEL_PARAMETERS, NODE_NAME, PARAMETER_NAMES, PARAMETERS, ConfigurationError, NodeSettings,
    camera_info_topic_of, missing_file_problem, validate_parameter,
)
from .verified import LiveModel, RefineJob, VerifiedStage
from .robot import RobotInterfaces
from .worker import (  # noqa: F401  (DROP_REASONS & co.: re-exported, the node's API before the split)
    DROP_REASONS, EXIT_WORKER_FAILED, WORKER_RESTART_LIMIT, WORKER_RESTART_WINDOW_S, LatestFrameSlot, Statistics, Worker, WorkerGaveUp,
)


REFINER_NICE = 10


class PoseNetNode(Node):
    """The relocalisation node. Accepts the standard :class:`rclpy.node.Node` keyword arguments.

    Raises :class:`ConfigurationError` or :class:`~ros2_posenet.checkpoint.CheckpointError`
    at construction when a parameter or the checkpoint is unusable.
    """

    # A plain node configures and activates itself when constructed; the managed node
    # (lifecycle_node.PoseNetLifecycleNode) waits for its lifecycle manager instead.
    MANAGED = False

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        self.stats = Statistics()
        self._worker = Worker("inference worker", "posenet_worker", self._process_safely, self._on_worker_death)
        self._verified_stage = VerifiedStage(self)
        # Refinement is best effort: niced, it takes the CPU the regressor leaves (the regressor keeps the camera's rate).
        self._refiner = Worker("refinement worker", "posenet_refiner", self._verified_stage.process, self._on_worker_death, nice=REFINER_NICE)
        self.workers = (self._worker, self._refiner)
        self._log = ThrottledLog(self)
        self._warn_throttled, self._error_throttled = self._log.warn, self._log.error  # (robot.py and verified.py use them)
        self._odometry = outputs.OdometryLookup(self)
        self._camera_infos = CameraInfoBuffer()  # outlives map switches
        self._refinement_problem = ""  # why map_file could not be loaded at configure ("": none)
        self._settings: NodeSettings | None = None  # None until configured
        self._live: LiveModel | None = None  # the serving model and map, held apart from the parameters
        self._settings_lock = threading.RLock()  # parameter changes vs. model swaps
        self._model_generation = 0  # the newest requested model switch
        self._reverting = threading.local()
        self._last_stamp_ns = 0  # newest regressor pose published: each measurement once, in stamp order
        self._robot: RobotInterfaces | None = None
        self._image_sub = self._odom_sub = self._camera_info_sub = None
        self._poses = self._verified = self._tf = self._diagnostics = None
        self._diagnostics_timer = self._log_timer = None
        self.exit_code = 0  # what main() returns once spinning ends (non-zero: let `respawn` restart us)
        try:
            self._declare_parameters()
            self.add_pre_set_parameters_callback(self._type_parameter_change)
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
        """Read and check the parameters, load the model (and map), create publishers and services."""
        s = NodeSettings.from_parameters({spec.name: self.get_parameter(spec.name).value for spec in PARAMETERS})
        outputs.check_environment(s)
        if s.cpu_threads > 0:  # OpenCV too: SIFT's pool would otherwise run the (niced) refiner's work at full priority
            torch.set_num_threads(int(s.cpu_threads))
            cv2.setNumThreads(int(s.cpu_threads))
        model = outputs.build_relocalizer(s)
        self._refinement_problem = ""
        try:
            refinement = outputs.build_refinement(s, self._camera_infos, warn=self.get_logger().warning)
        except ConfigurationError as err:  # the map is optional: the regressor alone still serves
            self._refinement_problem = str(err)
            self.get_logger().error(f"geometric refinement off, publishing the regressor's poses: {err}")
            refinement = None
        with self._settings_lock:
            self._settings, self._live = s, LiveModel(model, refinement)
        self._poses = outputs.PosePublishers(self, s)
        self._verified = outputs.PosePublishers(self, s, verified=True)
        self._tf = outputs.TransformSender(self, s)
        self._diagnostics = DiagnosticsReporter(self)
        self._robot = RobotInterfaces(self)

    def _activate(self) -> None:
        """Start the workers, then subscribe to images (and odometry, CameraInfo) and publish diagnostics."""
        s = self._settings
        for worker in self.workers:
            worker.slot = LatestFrameSlot()
            worker.start()
        self._create_subscriptions(s)
        self._diagnostics_timer = self.create_timer(s.diagnostics_period, self._publish_diagnostics)
        self._log_timer = self.create_timer(s.log_period, self._diagnostics.log_summary) if s.log_period > 0 else None
        self.get_logger().info(
            f"relocalising {'compressed ' if s.compressed else ''}images from {self._image_sub.topic_name} "
            f"with {s.checkpoint} ({self.relocalizer.backend_name} on {self.relocalizer.device}); publishing {self._poses.pose.topic_name} in frame "
            f"'{self.map_frame}', tf_mode {s.tf_mode}{outputs.odom_source_note(s, self._odom_sub)}"
        )

    def _deactivate(self) -> None:
        """Stop taking images; returns once the frames in flight (if any) are finished. Idempotent."""
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
        for worker in self.workers:
            if not worker.stop(timeout=30.0):
                self.get_logger().warning(f"{worker.name} did not stop within 30 s")

    def _cleanup(self) -> None:
        """Destroy publishers and services and free the model (and its GPU memory). Idempotent."""
        for part in (self._robot, self._poses, self._verified, self._tf, self._diagnostics):
            if part is not None:
                part.destroy()
        self._robot = self._poses = self._verified = self._tf = self._diagnostics = None
        with self._settings_lock:
            self._model_generation += 1  # a model still loading in the background is not swapped in
            had_model = self._live is not None
            self._settings = self._live = None
        if had_model and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ start-up

    def _declare_parameters(self) -> None:
        for spec in PARAMETERS:
            descriptor = ParameterDescriptor(description=spec.description, read_only=spec.read_only, dynamic_typing=spec.dynamic_typing)
            try:
                value = self.declare_parameter(spec.name, spec.default, descriptor).value
            except (InvalidParameterTypeException, InvalidParameterValueException) as err:
                raise ConfigurationError(
                    f"parameter '{spec.name}': {err}; expected a {type(spec.default).__name__} like {spec.default!r}"
                ) from None
            if spec.name in FLOAT_PARAMETERS and isinstance(value, int) and not isinstance(value, bool):
                self.set_parameters([Parameter(spec.name, value=float(value))])  # YAML `2`: a double all the same

    @property
    def relocalizer(self) -> Relocalizer | None:
        """The serving model (``None`` while not configured)."""
        live = self._live
        return None if live is None else live.relocalizer

    @relocalizer.setter
    def relocalizer(self, model: Relocalizer) -> None:
        with self._settings_lock:
            self._live = LiveModel(model, self._live.refinement)

    def _create_subscriptions(self, s: NodeSettings) -> None:
        """Images, CameraInfo (a map may be switched on at run time) and odometry for map_to_odom from a topic."""
        image_qos = QoSProfile(
            depth=int(s.image_qos_depth), history=HistoryPolicy.KEEP_LAST, durability=DurabilityPolicy.VOLATILE,
            reliability=qos_profile_sensor_data.reliability if s.image_qos == "sensor_data" else ReliabilityPolicy.RELIABLE,
        )
        try:
            self._image_sub = self.create_subscription(CompressedImage if s.compressed else Image, s.image_topic, self._on_image, image_qos)
            if s.tf_mode == "map_to_odom" and outputs.resolve_odom_source(s.odom_source) == "topic":
                self._odom_sub = self.create_subscription(Odometry, s.odom_topic, self._on_odometry, 50)
            self._camera_info_sub = self.create_subscription(  # best effort matches any camera driver's QoS
                CameraInfo, s.camera_info_topic or camera_info_topic_of(s.image_topic, s.compressed), self._on_camera_info, qos_profile_sensor_data
            )
        except Exception as err:  # rclpy raises InvalidTopicNameException & co.
            raise ConfigurationError(f"cannot create the node's topics: {err}") from None

    @property
    def map_frame(self) -> str:
        return self._settings.map_frame or self.relocalizer.map_frame

    # ------------------------------------------------------------------ parameters at run time

    def _type_parameter_change(self, parameters: list) -> list:
        """Integers for double parameters (``ros2 param set ... max_rate_hz 2``) stay doubles."""
        return [Parameter(p.name, value=float(p.value)) if p.name in FLOAT_PARAMETERS and type(p.value) is int else p for p in parameters]

    def _validate_parameter_change(self, parameters) -> SetParametersResult:
        for parameter in parameters:
            problem = validate_parameter(parameter.name, parameter.value)
            if not problem and not getattr(self._reverting, "active", False):
                problem = missing_file_problem(parameter.name, parameter.value)  # refused at once, naming the file
            if problem:
                return SetParametersResult(successful=False, reason=f"parameter '{parameter.name}' = {parameter.value!r}: {problem}")
        return SetParametersResult(successful=True)

    def _apply_parameter_change(self, parameters) -> None:
        if getattr(self._reverting, "active", False):
            return  # a failed model switch putting the serving values back
        with self._settings_lock:
            if self._settings is None:
                return  # not configured yet: _configure reads every parameter
            self._settings = self._settings.with_changes({p.name: p.value for p in parameters if p.name in PARAMETER_NAMES and p.name not in MODEL_PARAMETERS})
        model_change = {p.name: p.value for p in parameters if p.name in MODEL_PARAMETERS}
        if model_change:
            self._switch_model(model_change)
        s, robot, tf = self._settings, self._robot, self._tf
        if robot is not None:
            robot.on_settings(s)
        if tf is not None and s.publish_camera_to_base_tf and any(p.name in ("camera_to_base", "base_frame", "camera_frame") for p in parameters):
            tf.send_static(s)

    # ------------------------------------------------------------------ model switching (map/floor change at run time)

    def _switch_model(self, change: dict) -> None:
        """Load the model and map ``change`` asks for in the background; the serving ones answer meanwhile."""
        with self._settings_lock:
            self._model_generation += 1
            generation = self._model_generation
            target = self._settings.with_changes(change)
            serving = self._settings.checkpoint
        self.get_logger().info(f"loading {target.checkpoint} (map {target.map_file or 'none'}, {target.backend} on {target.device}) in the background; {serving} keeps serving")
        threading.Thread(target=self._load_and_swap, args=(generation, target, change), name="posenet_model_loader", daemon=True).start()

    def _load_and_swap(self, generation: int, target: NodeSettings, change: dict) -> None:
        try:
            model = outputs.build_relocalizer(target)
            refinement = outputs.build_refinement(target, self._camera_infos, warn=self.get_logger().warning)  # a bad map rejects the switch
        except Exception as err:  # CheckpointError, ConfigurationError, CUDA errors...
            self._reject_model_switch(generation, target, change, err if isinstance(err, (CheckpointError, ConfigurationError)) else f"{type(err).__name__}: {err}")
            return
        with self._settings_lock:
            if generation != self._model_generation or self._settings is None:
                return  # a newer switch was requested, or the node was cleaned up meanwhile
            previous = self._settings.checkpoint
            # The worker reads the live model once per frame: either the old one or the new one.
            self._settings, self._live = self._settings.with_changes(change), LiveModel(model, refinement)
            self._refinement_problem = ""
        self.get_logger().info(f"switched model: now relocalising with {target.checkpoint} (map {target.map_file or 'none'}) in map frame '{self.map_frame}' (was {previous})")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the old model's memory, once the worker lets go of it

    def _reject_model_switch(self, generation: int, target: NodeSettings, change: dict, reason) -> None:
        with self._settings_lock:
            if generation != self._model_generation or self._settings is None:
                return
            serving = {name: getattr(self._settings, name) for name in change}
        changed = target.checkpoint if "checkpoint" in change else ", ".join(f"{name} {value!r}" for name, value in change.items())
        self.get_logger().error(f"cannot switch to {changed}: {reason}; still relocalising with {self._settings.checkpoint} (map {self._settings.map_file or 'none'})")
        self._reverting.active = True
        try:  # the parameters say what is serving
            self.set_parameters([Parameter(name, value=value) for name, value in serving.items()])
        finally:
            self._reverting.active = False

    # ------------------------------------------------------------------ callbacks (executor thread)

    def _on_image(self, msg) -> None:
        robot = self._robot
        if robot is not None and not robot.admit(msg):  # paused, over max_rate_hz (counted there)
            return
        self.stats.count("received")
        if self._worker.put(msg):
            self._drop("superseded", "")

    def _on_odometry(self, msg: Odometry) -> None:
        self._odometry.add(msg, self._settings)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        try:
            intrinsics = self._camera_infos.add(msg)
        except CameraInfoError as err:
            count = self.stats.count("bad_camera_info")
            self._warn_throttled("bad_camera_info", f"ignoring CameraInfo: {err} [{count} so far]")
            return
        s, live = self._settings, self._live
        age = self._age(messages.stamp_nanoseconds(msg.header.stamp))
        far = None if s is None or age is None else stamp_gap_problem(age, s.max_image_age, s.future_stamp_tolerance)
        if far:  # used all the same (the latest received is the calibration); the pairing by stamp may miss it
            count = self.stats.count("camera_info_far_stamp")
            self._warn_throttled("camera_info_far_stamp", f"CameraInfo {far}: are the camera's and this machine's clocks synchronised? [{count} so far]")
        if live is not None and live.refinement is not None:
            live.refinement.check_intrinsics(intrinsics)

    # ------------------------------------------------------------------ inference worker

    def _process_safely(self, msg) -> None:
        try:
            self._process(msg)
        except Exception as err:  # never let one frame kill the worker
            if self.context.ok():  # at shutdown the context goes first: the frame is simply not published
                self._drop("internal_error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        except BaseException:
            self.stats.count("internal_error")  # the frame dies with the worker; keep received = processed + drops
            raise

    def _process(self, msg) -> None:
        started = time.perf_counter()
        s, live = self._settings, self._live  # one snapshot: a model switch never splits a frame
        if s is None or live is None:
            return
        stamp_ns = messages.stamp_nanoseconds(msg.header.stamp)
        problem = self._stamp_problem(s, msg.header.stamp, stamp_ns)
        if problem is not None:
            self._drop(*problem)
            return
        try:
            rgb = msg_to_rgb(msg, s.max_image_pixels, self._on_format_mismatch)
            prediction = live.relocalizer.predict(rgb)
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
        if (problem := self._not_newer(stamp_ns)) is not None:  # checked last: a bad frame is counted as what it is
            self._drop(*problem)
            return
        if not self.context.ok():
            return  # shutting down
        stamp = messages.stamp_from_nanoseconds(stamp_ns)
        map_frame = s.map_frame or live.relocalizer.map_frame
        self._last_stamp_ns = stamp_ns
        self._poses.publish(poses, map_frame, stamp)
        self._publish_tf(s, poses, map_frame, stamp)
        self.stats.latest_covariance = poses.base_covariance
        if live.refinement is not None and s.refine:
            if self._refiner.put(RefineJob(rgb, stamp_ns, prediction, poses, s, live)):
                self.stats.count("refine_skipped")  # a newer frame came first; the regressor answered this one
        elif self._robot is not None:
            self._robot.on_relocalized(poses.T_map_base, poses.base_covariance, map_frame, stamp, None)
        age = self._age(stamp_ns)
        self.stats.record(time.perf_counter() - started, float("nan") if age is None else age)

    def _stamp_problem(self, s: NodeSettings, stamp, stamp_ns: int) -> tuple[str, str] | None:
        """(drop reason, detail) when no output may carry this stamp, else None."""
        problem = messages.stamp_problem(stamp)
        if problem is not None:
            return problem
        now = self.get_clock().now().nanoseconds
        age = (now - stamp_ns) * 1e-9 if now > 0 else None  # None: simulated time before the first /clock message
        if age is not None and s.max_image_age > 0 and age > s.max_image_age:
            return "stale", f"stamp {stamp_ns * 1e-9:.3f} is {age:.3f} s old (max_image_age {s.max_image_age} s)"
        if age is not None and s.future_stamp_tolerance > 0 and -age > s.future_stamp_tolerance:
            return "future_stamp", (
                f"stamp {stamp_ns * 1e-9:.3f} is {-age:.3f} s ahead of the node's clock (future_stamp_tolerance "
                f"{s.future_stamp_tolerance} s); are the camera's and this machine's clocks synchronised?"
            )
        return None

    def _not_newer(self, stamp_ns: int) -> tuple[str, str] | None:
        """("not_newer", detail) for a stamp at or before the last published one (the clock jumping back, a replay restarting, starts afresh)."""
        last = self._last_stamp_ns
        if stamp_ns <= last and self.get_clock().now().nanoseconds >= last - messages.NANOSECONDS:
            return "not_newer", f"stamp {stamp_ns * 1e-9:.3f} is not newer than the last published {last * 1e-9:.3f}"
        return None

    def already_answered(self, msg) -> bool:
        """Whether ``msg``'s frame was published already (~/relocalize then waits for a newer one)."""
        return messages.stamp_nanoseconds(msg.header.stamp) <= self._last_stamp_ns

    def _age(self, stamp_ns: int) -> float | None:
        """Seconds from ``stamp_ns`` to now on the node's clock; None while a simulated clock reads 0."""
        now = self.get_clock().now().nanoseconds
        return (now - stamp_ns) * 1e-9 if now > 0 else None

    def _publish_tf(self, s: NodeSettings, poses: RelocalizedPoses, map_frame: str, stamp) -> None:
        if s.tf_mode == "none" or not self._tf.subscription_count():
            return
        T_odom_base = self._odometry.lookup(s, stamp) if s.tf_mode == "map_to_odom" else None
        transform = outputs.frame_transform(s, map_frame, poses, stamp, T_odom_base)
        if transform is not None:
            self._tf.send(transform)

    # ------------------------------------------------------------------ bad input, logging, supervision

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

    def _on_worker_death(self, text: str) -> None:
        if self.context.ok():
            self._error_throttled("worker_stopped", text)

    def _supervise_worker(self) -> bool:
        """Restart a worker thread that ended while the node runs (on the diagnostics timer).

        A worker that died WORKER_RESTART_LIMIT times within WORKER_RESTART_WINDOW_S is
        not restarted again: the node sets ``exit_code`` to EXIT_WORKER_FAILED and shuts its
        context down, so that ``main`` returns non-zero and launch's ``respawn`` (or systemd)
        starts a fresh process. Returns False then, True otherwise.
        """
        for worker in self.workers:
            try:
                reason = worker.restart_if_dead()
            except WorkerGaveUp as err:
                self.exit_code = EXIT_WORKER_FAILED
                self._diagnostics.last_word(f"{worker.name} {err}; exiting with code {EXIT_WORKER_FAILED} so that launch respawn restarts the node", err.deaths)
                self.context.try_shutdown()  # ends rclpy.spin in main(), which returns exit_code
                return False
            if reason is not None:
                count = self.stats.count("worker_restarts")
                self._error_throttled("worker_restarted", f"{worker.name} had stopped ({reason}); restarted it [{count} restarts so far]")
        return True

    def _publish_diagnostics(self) -> None:
        """Publish the status; also the workers' supervisor (restarts a dead worker, see _supervise_worker)."""
        if self._supervise_worker() and self._diagnostics is not None:
            self._diagnostics.publish()

    def counters(self) -> dict:
        """Copy of the frame counters (received, processed and each drop reason)."""
        return self.stats.snapshot()

    # ------------------------------------------------------------------ shutdown

    def destroy_node(self) -> None:
        """Stop and join the workers (they may be publishing) before the publishers go away."""
        try:
            self._deactivate()
            self._cleanup()
        finally:
            super().destroy_node()


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None, node_class: type | None = None) -> int:
    """Console script ``posenet_node``: 0 on a clean shutdown (Ctrl-C or SIGTERM included, even during start-up),
    2 on a configuration error, ``node.exit_code`` when the node asks for a restart (see entry.run_node)."""
    return run_node(node_class or PoseNetNode, argv)


if __name__ == "__main__":
    sys.exit(main())

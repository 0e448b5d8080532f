"""What a robot asks of ``posenet_node`` beyond its pose topics: ``~/relocalize``, ``~/enable``,
seeding ``/initialpose`` (Nav2/AMCL) and the ``max_rate_hz`` cap.

:class:`RobotInterfaces` is created when the node is configured and destroyed at clean-up. Its
entry points are called from three threads: :meth:`admit` from the image callback (executor),
:meth:`on_relocalized` from the inference worker after each published pose, and the service
callbacks from the executor. ``~/relocalize`` hands the newest received image (kept even while
paused or rate-capped) to the worker and waits for its answer: the worker needs nothing from the
executor, so this works under a single-threaded executor too. An image already answered is not
relocalised again (a measurement is published once): the call answers at once with the last
relocalised pose, since a blocked single-threaded executor could not deliver a newer image. (An ``async`` callback awaiting the
worker would not: rclpy's executors re-run a pending coroutine instead of waiting for new messages.)
"""
from __future__ import annotations

import math
import threading
import time

import numpy as np
from geometry_msgs.msg import PoseWithCovarianceStamped
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_srvs.srv import SetBool, Trigger

from ..geometry import matrix_to_rpy
from ..initial_pose import InitialPoseGate, RateLimiter, horizontal_std, planar_initial_pose, yaw_std
from . import messages

# What Nav2's AMCL and RViz's "2D Pose Estimate" use for /initialpose.
INITIAL_POSE_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)


def describe_pose(T_map_base: np.ndarray, covariance: np.ndarray, map_frame: str, stamp) -> str:
    """One line for a service answer or a log: position, yaw, their standard deviations, frame and stamp."""
    x, y, z = T_map_base[:3, 3]
    _, _, yaw = matrix_to_rpy(T_map_base[:3, :3])
    return (
        f"x {x:.3f} m, y {y:.3f} m, z {z:.3f} m, yaw {math.degrees(yaw):.1f} deg in '{map_frame}' at "
        f"{messages.stamp_to_seconds(stamp):.3f}; std position {horizontal_std(covariance):.3f} m, "
        f"yaw {math.degrees(yaw_std(covariance)):.1f} deg"
    )


class RobotInterfaces:
    """``~/relocalize`` (Trigger), ``~/enable`` (SetBool), ``/initialpose`` and the rate cap of one node."""

    def __init__(self, node):
        self._node = node
        s = node._settings
        self._lock = threading.Lock()
        self._waiting: list[_Answer] = []  # ~/relocalize calls waiting for the next relocalised frame
        self._last: tuple | None = None  # on_relocalized's arguments for the newest relocalised frame
        self._latest_image = None  # the newest image received, admitted or not
        self._seeded_once = False  # `once` has seeded (reset whenever initial_pose becomes once)
        self._mode = s.initial_pose
        self._limiter = RateLimiter(s.max_rate_hz)
        self._pub_lock = threading.Lock()  # the worker seeds while a parameter change may remove the publisher
        self.initial_pose_pub = None  # advertised only in once / on_request (an outside client picks topics by type)
        self._sync_initial_pose_publisher(s)
        self._relocalize_srv = node.create_service(Trigger, "~/relocalize", self._on_relocalize)
        self._enable_srv = node.create_service(SetBool, "~/enable", self._on_enable)

    def on_settings(self, s) -> None:
        """After a parameter change (executor thread): (un)advertise /initialpose, re-arm `once`."""
        if s.initial_pose == "once" and self._mode != "once":
            self._seeded_once = False  # switching to once seeds again, whatever on_request did before
        self._mode = s.initial_pose
        self._sync_initial_pose_publisher(s)

    def _sync_initial_pose_publisher(self, s) -> None:
        with self._pub_lock:
            if s.initial_pose == "off" and self.initial_pose_pub is not None:
                self._node.destroy_publisher(self.initial_pose_pub)
                self.initial_pose_pub = None
            elif s.initial_pose != "off" and self.initial_pose_pub is None:
                self.initial_pose_pub = self._node.create_publisher(PoseWithCovarianceStamped, s.initial_pose_topic, INITIAL_POSE_QOS)

    # ------------------------------------------------------------------ image callback (executor thread)

    def admit(self, msg) -> bool:
        """Whether the image just received should go to the worker (counts the ones that do not)."""
        s = self._node._settings
        self._latest_image = msg
        if self.relocalize_pending():
            return True  # ~/relocalize takes the next frame, paused or not
        if not s.enabled:
            self._node.stats.count("paused")
            return False
        self._limiter.max_rate_hz = s.max_rate_hz
        if not self._limiter.admit(time.monotonic()):
            self._node.stats.count("rate_limited")
            return False
        return True

    def relocalize_pending(self) -> bool:
        with self._lock:
            return bool(self._waiting)

    # ------------------------------------------------------------------ worker thread

    def on_relocalized(self, T_map_base: np.ndarray, covariance: np.ndarray, map_frame: str, stamp, refined: bool | None = None) -> None:
        """After a pose was published: seed /initialpose when due and answer waiting ~/relocalize calls.

        ``refined``: whether the geometric stage verified the pose (None: no map loaded).
        """
        s = self._node._settings
        pose = (T_map_base, covariance, map_frame, stamp, refined)
        with self._lock:
            waiting, self._waiting = self._waiting, []
            self._last = pose
        if s.initial_pose == "once" and not self._seeded_once and not waiting:
            self._seed_and_spend_once(s, pose)
        if waiting:
            success, text = self._answer(s, pose)
            for answer in waiting:
                answer.set(success, text)

    def _seed_and_spend_once(self, s, pose: tuple) -> tuple[bool, str]:
        """Seed /initialpose with ``pose`` (any mode but off); a seed in `once` mode spends it."""
        seeded, note = self._seed(s, *pose)
        if seeded and s.initial_pose == "once":
            self._seeded_once = True
        return seeded, note

    def _answer(self, s, pose: tuple) -> tuple[bool, str]:
        """A ~/relocalize answer for ``pose`` (on_relocalized's arguments), seeding /initialpose unless off."""
        seeded, seed_note = self._seed_and_spend_once(s, pose) if s.initial_pose != "off" else (False, "initial_pose off")
        T_map_base, covariance, map_frame, stamp, refined = pose
        verified = "" if refined is None else ("; verified by the map" if refined else "; not verified by the map (regressor only)")
        text = f"{describe_pose(T_map_base, covariance, map_frame, stamp)}{verified}; {s.initial_pose_topic}: {seed_note}"
        return seeded or s.initial_pose == "off", text

    def _seed(self, s, T_map_base, covariance, map_frame, stamp, refined: bool | None = None) -> tuple[bool, str]:
        if s.initial_pose_require_refined and not refined:
            why = "no map_file is loaded" if refined is None else "the map did not verify this pose"
            self._node._warn_throttled("initial_pose_unverified", f"not seeding {s.initial_pose_topic}: initial_pose_require_refined and {why}")
            return False, f"not published, not geometrically verified ({why})"
        gate = InitialPoseGate(s.initial_pose_max_position_std, s.initial_pose_max_yaw_std)
        rejection = gate.rejection(covariance)
        if rejection:
            self._node._warn_throttled("initial_pose_gate", f"not seeding {s.initial_pose_topic}: {rejection}")
            return False, f"not published, not confident enough ({rejection})"
        T, planar_covariance = planar_initial_pose(T_map_base, covariance)
        with self._pub_lock:
            publisher = self.initial_pose_pub
            if publisher is None or publisher.get_subscription_count() == 0:
                self._node._warn_throttled("initial_pose_nobody", f"not seeding {s.initial_pose_topic}: nobody subscribes (is AMCL running?)")
                return False, "not published, nobody subscribes"
            publisher.publish(messages.pose_with_covariance_stamped(T, planar_covariance, map_frame, stamp))
            topic = publisher.topic_name
        self._node.get_logger().info(f"seeded {topic}: {describe_pose(T, planar_covariance, map_frame, stamp)}")
        return True, "published"

    # ------------------------------------------------------------------ services (executor thread)

    def _on_relocalize(self, request, response):
        s = self._node._settings
        msg = self._latest_image
        if self._node._image_sub is None:
            response.success, response.message = False, "the node is not active (lifecycle: activate it first)"
            return response
        if msg is None:
            response.success, response.message = False, f"no image received on {s.image_topic} yet"
            return response
        age = (self._node.get_clock().now().nanoseconds - (msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec)) * 1e-9
        if s.max_image_age > 0 and age > s.max_image_age:
            response.success = False
            response.message = f"the newest image on {s.image_topic} is {age:.2f} s old (max_image_age {s.max_image_age:g} s): is the camera running?"
            return response
        answered = self._node.already_answered(msg)
        with self._lock:
            last = self._last
        if answered and last is not None:
            # Its pose went out already and a measurement is published once: answer with the newest relocalised pose.
            success, text = self._answer(s, last)
            response.success = success
            response.message = (f"the newest image on {s.image_topic} (stamp {messages.stamp_to_seconds(msg.header.stamp):.3f}) was "
                                f"already relocalised and published, nothing went out again; newest relocalised pose: {text}")
            return response
        answer = _Answer()
        with self._lock:
            self._waiting.append(answer)
        if not answered:  # relocalise the newest image now, paused or rate-capped
            self._node._on_image(msg)
        # else: a map's refiner is still on it; its outcome answers
        if not answer.done.wait(s.relocalize_timeout):
            self._withdraw(answer)
            answer.set(False, f"no image relocalised within relocalize_timeout {s.relocalize_timeout:g} s (dropped? see the node's warnings)")
        response.success, response.message = answer.value
        return response

    def _withdraw(self, answer: "_Answer") -> None:
        with self._lock:
            if answer in self._waiting:
                self._waiting.remove(answer)

    def cancel_pending(self, reason: str) -> None:
        """Answer every waiting ~/relocalize with a failure (deactivation, clean-up)."""
        with self._lock:
            waiting, self._waiting = self._waiting, []
        for answer in waiting:
            answer.set(False, reason)

    def _on_enable(self, request, response):
        result = self._node.set_parameters([Parameter("enabled", value=bool(request.data))])[0]
        response.success = result.successful
        if not result.successful:
            response.message = result.reason
        elif request.data:
            response.message = "inference resumed"
        else:
            response.message = "inference paused (the model stays loaded; ~/relocalize still relocalises one frame)"
        return response

    def destroy(self) -> None:
        self.cancel_pending("node is shutting down or being cleaned up")
        self._node.destroy_service(self._relocalize_srv)
        self._node.destroy_service(self._enable_srv)
        with self._pub_lock:
            if self.initial_pose_pub is not None:
                self._node.destroy_publisher(self.initial_pose_pub)
            self.initial_pose_pub = None


class _Answer:
    """The answer to one ~/relocalize call, set once by whichever thread has it first."""

    def __init__(self):
        self.done = threading.Event()
        self.value = (False, "")
        self._lock = threading.Lock()

    def set(self, success: bool, message: str) -> None:
        with self._lock:
            if not self.done.is_set():
                self.value = (success, message)
                self.done.set()

"""What one relocalised frame sends out, shared by ``posenet_node`` and ``relocalize-bag``.

* :func:`frame_transform` / :func:`static_extrinsic`: the TF of a frame per ``tf_mode`` and the
  ``publish_camera_to_base_tf`` static transform;
* :func:`camera_to_base_tf_problem`: the cross-check of those two parameters;
* :func:`build_relocalizer` / :func:`build_refinement`: the regressor and the map stage from the
  parameters;
* for the node only: :class:`PosePublishers` (the pose topics), :class:`TransformSender`
  (``/tf`` and ``/tf_static`` through tf2_ros, or plain publishers without it) and
  :class:`OdometryLookup` (odom → base for ``map_to_odom``).

The parity test (test/tools/test_bag_node_parity.py) compares the node's messages with the
bag tool's, both built here.
"""
from __future__ import annotations

import importlib
import threading

import numpy as np
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped
from rclpy.duration import Duration
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from rclpy.time import Time

from ..frames import PoseHistory, RelocalizedPoses, map_to_odom
from ..geometric.refiner import RefinementConfig
from ..geometric.scene_map import MapError
from ..inference import BackendUnavailableError, Relocalizer, resolve_device
from . import messages
from .camera_info import CameraInfoBuffer
from .parameters import ConfigurationError, NodeSettings
from .refinement import NodeRefinement

try:  # full ROS install: use tf2's broadcasters and buffer
    import tf2_ros
except ImportError:  # PyPI wheels: publish tf2_msgs/TFMessage ourselves
    tf2_ros = None

# QoS tf2 itself uses for /tf and /tf_static.
TF_QOS = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
TF_STATIC_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


# ----------------------------------------------------------------------------- per-frame messages


def camera_to_base_tf_problem(tf_mode: str, publish_camera_to_base_tf: bool) -> str | None:
    """Why these two parameters cannot go together (None when they can)."""
    if publish_camera_to_base_tf and tf_mode == "map_to_camera":
        return ("publish_camera_to_base_tf with tf_mode map_to_camera would give camera_frame two TF parents "
                "(map and base_frame); use tf_mode map_to_odom or none, or publish_camera_to_base_tf:=false")
    return None


def check_environment(s: NodeSettings) -> None:
    """ConfigurationError when this installation cannot publish what the parameters ask for."""
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
    problem = camera_to_base_tf_problem(s.tf_mode, s.publish_camera_to_base_tf)
    if problem:
        raise ConfigurationError(problem)


def frame_transform(s: NodeSettings, map_frame: str, poses: RelocalizedPoses, stamp, T_odom_base=None):
    """The frame's TransformStamped for ``tf_mode`` (None for ``none``, or map_to_odom without ``T_odom_base``).

    Stamped ``transform_tolerance`` after the image, like AMCL, so lookups at 'now' succeed.
    """
    if s.tf_mode == "none":
        return None
    tf_stamp = messages.shifted_stamp(stamp, s.transform_tolerance) if s.transform_tolerance > 0 else stamp
    if s.tf_mode == "map_to_camera":
        return messages.transform_stamped(poses.T_map_camera, map_frame, s.camera_frame, tf_stamp)
    if T_odom_base is None:
        return None
    return messages.transform_stamped(map_to_odom(poses.T_map_base, T_odom_base), map_frame, s.odom_frame, tf_stamp)


def static_extrinsic(s: NodeSettings, stamp):
    """``base_frame -> camera_frame`` (camera_to_base), sent once on ``/tf_static`` with ``publish_camera_to_base_tf``."""
    return messages.transform_stamped(s.mount.T_base_camera, s.base_frame, s.camera_frame, stamp)


# ----------------------------------------------------------------------------- the two stages


def build_relocalizer(s: NodeSettings, checkpoint_setting: str | None = None) -> Relocalizer:
    """The regressor of the parameters; ConfigurationError names the parameter at fault (CheckpointError passes)."""
    options = {} if checkpoint_setting is None else {"checkpoint_setting": checkpoint_setting}
    try:
        resolve_device(s.device)
    except ValueError as err:  # e.g. cuda without a GPU
        raise ConfigurationError(f"parameter 'device': {err}") from None
    try:
        return Relocalizer(
            s.checkpoint, device=s.device, backend=s.backend, precision=s.precision, compile=s.compile, cuda_graph=s.cuda_graph,
            uncertainty=s.uncertainty or None, mc_samples=int(s.mc_samples) or None, **options,
        )
    except BackendUnavailableError as err:
        raise ConfigurationError(f"parameter 'backend' = {s.backend!r}: {err}") from None
    except ValueError as err:  # an uncertainty method the checkpoint has no calibration for
        raise ConfigurationError(f"parameter 'uncertainty' = {s.uncertainty!r}: {err}") from None


def build_refinement(s: NodeSettings, camera_infos: CameraInfoBuffer | None = None, warn=None) -> NodeRefinement | None:
    """The map and refiner of ``map_file`` (None without a map); ConfigurationError names the file at fault."""
    if not s.map_file:
        return None
    try:
        config = RefinementConfig.from_yaml(s.refine_config) if s.refine_config else None
        return NodeRefinement(s.map_file, config, camera_infos, warn=warn, separate_process=True)  # the regressor keeps its GIL
    except MapError as err:
        raise ConfigurationError(f"parameter 'map_file' = {s.map_file!r}: {err}") from None
    except ValueError as err:  # bad refine_config, or the pose solver's library is missing
        raise ConfigurationError(f"refinement settings: {err}") from None


# ----------------------------------------------------------------------------- the node's publishers


class PosePublishers:
    """The regressor's three pose topics, or (``verified``) the map-verified pose topic, of one node."""

    def __init__(self, node, s: NodeSettings, verified: bool = False):
        self._node = node
        try:
            if verified:
                self.pose = self.camera_pose = None
                self.pose_cov = node.create_publisher(PoseWithCovarianceStamped, s.verified_pose_topic, 10)
            else:
                self.pose = node.create_publisher(PoseStamped, s.pose_topic, 10)
                self.pose_cov = node.create_publisher(PoseWithCovarianceStamped, s.pose_with_covariance_topic, 10)
                self.camera_pose = node.create_publisher(PoseStamped, s.camera_pose_topic, 10)
        except Exception as err:  # rclpy raises InvalidTopicNameException & co.
            raise ConfigurationError(f"cannot create the node's topics: {err}") from None

    @property
    def publishers(self) -> list:
        return [p for p in (self.pose, self.pose_cov, self.camera_pose) if p is not None]

    def publish(self, poses: RelocalizedPoses, map_frame: str, stamp) -> None:
        """The base pose first; messages nobody subscribes to are not even built."""
        if self.pose is not None and self.pose.get_subscription_count():
            self.pose.publish(messages.pose_stamped(poses.T_map_base, map_frame, stamp))
        if self.pose_cov.get_subscription_count():
            self.pose_cov.publish(messages.pose_with_covariance_stamped(poses.T_map_base, poses.base_covariance, map_frame, stamp))
        if self.camera_pose is not None and self.camera_pose.get_subscription_count():
            self.camera_pose.publish(messages.pose_stamped(poses.T_map_camera, map_frame, stamp))

    def destroy(self) -> None:
        for publisher in self.publishers:
            self._node.destroy_publisher(publisher)


def resolve_odom_source(odom_source: str) -> str:
    """``tf`` or ``topic`` (``auto``: tf when tf2_ros is installed)."""
    if odom_source == "auto":
        return "tf" if tf2_ros is not None else "topic"
    return odom_source


def odom_source_note(s: NodeSettings, odom_sub) -> str:
    """' (odom -> base from …)' for the start-up log line in tf_mode map_to_odom, else ''."""
    if s.tf_mode != "map_to_odom":
        return ""
    return f" (odom -> base from {'tf2' if resolve_odom_source(s.odom_source) == 'tf' else 'topic ' + odom_sub.topic_name})"


class TransformSender:
    """``/tf`` (and ``/tf_static``) of one node: tf2_ros broadcasters, or TFMessage publishers without tf2_ros."""

    def __init__(self, node, s: NodeSettings):
        self._node = node
        self._broadcaster = self._pub = self._static_broadcaster = self._static_pub = None
        self.buffer = self._listener = None
        if s.tf_mode != "none":
            if tf2_ros is not None:
                self._broadcaster = tf2_ros.TransformBroadcaster(node)
            else:
                from tf2_msgs.msg import TFMessage

                self._pub = node.create_publisher(TFMessage, "/tf", TF_QOS)
        if s.tf_mode == "map_to_odom" and resolve_odom_source(s.odom_source) == "tf":
            self.buffer = tf2_ros.Buffer()
            self._listener = tf2_ros.TransformListener(self.buffer, node)
        if s.publish_camera_to_base_tf:
            if tf2_ros is not None:
                self._static_broadcaster = tf2_ros.StaticTransformBroadcaster(node)
            else:
                from tf2_msgs.msg import TFMessage

                self._static_pub = node.create_publisher(TFMessage, "/tf_static", TF_STATIC_QOS)
            self.send_static(s)

    def subscription_count(self) -> int:
        publisher = self._pub if self._broadcaster is None else getattr(self._broadcaster, "pub_tf", None)
        return 1 if publisher is None else publisher.get_subscription_count()  # unknown broadcaster internals: always send

    def send(self, transform) -> None:
        if self._broadcaster is not None:
            self._broadcaster.sendTransform([transform])
        elif self._pub is not None:
            self._pub.publish(messages.tf_message([transform]))

    def send_static(self, s: NodeSettings) -> None:
        transform = static_extrinsic(s, self._node.get_clock().now().to_msg())
        if self._static_broadcaster is not None:
            self._static_broadcaster.sendTransform([transform])
        elif self._static_pub is not None:
            self._static_pub.publish(messages.tf_message([transform]))

    def destroy(self) -> None:
        if self._listener is not None:
            self._listener.unregister()
        publishers = [self._pub, self._static_pub] + [getattr(b, "pub_tf", None) for b in (self._broadcaster, self._static_broadcaster) if b is not None]
        for publisher in publishers:
            if publisher is not None:
                self._node.destroy_publisher(publisher)
        self._broadcaster = self._pub = self._static_broadcaster = self._static_pub = self.buffer = self._listener = None


class OdometryLookup:
    """odom → base for tf_mode map_to_odom: from nav_msgs/Odometry (kept here) or from tf2 (the node's TransformSender buffer)."""

    def __init__(self, node):
        self._node = node
        self._history = PoseHistory()
        self._lock = threading.Lock()

    def add(self, msg, s: NodeSettings) -> None:
        """One Odometry message (the node's callback); an invalid pose is counted and ignored."""
        node = self._node
        try:
            T_odom_base = messages.matrix_from_pose_msg(msg.pose.pose)
        except ValueError as err:
            node.stats.count("bad_odometry")
            node._warn_throttled("bad_odometry", f"ignoring odometry with an invalid pose: {err}")
            return
        if (msg.header.frame_id and msg.header.frame_id != s.odom_frame) or (msg.child_frame_id and msg.child_frame_id != s.base_frame):
            node._warn_throttled("odometry_frames", f"odometry is {msg.header.frame_id} -> {msg.child_frame_id} but odom_frame/base_frame are "
                                 f"{s.odom_frame}/{s.base_frame}; using it as odom -> base anyway")
        with self._lock:
            self._history.add(messages.stamp_to_seconds(msg.header.stamp), T_odom_base)

    def lookup(self, s: NodeSettings, stamp) -> np.ndarray | None:
        """odom → base at the image stamp, or None (counted and logged) when unavailable."""
        node = self._node
        if resolve_odom_source(s.odom_source) == "tf":
            try:
                transform = node._tf.buffer.lookup_transform(s.odom_frame, s.base_frame, Time.from_msg(stamp), timeout=Duration(seconds=s.odom_tolerance))
                return messages.matrix_from_transform_msg(transform.transform)
            except tf2_ros.TransformException as err:
                detail = str(err)
        else:
            seconds = messages.stamp_to_seconds(stamp)
            with self._lock:
                T = self._history.lookup(seconds, s.odom_tolerance)
                latest = self._history.latest_stamp()
            if T is not None:
                return T
            detail = (
                f"no odometry on {node._odom_sub.topic_name} yet" if latest is None
                else f"no odometry within odom_tolerance {s.odom_tolerance} s of the image stamp {seconds:.3f} (latest {latest:.3f})"
            )
        count = node.stats.count("no_odometry")
        node._warn_throttled("no_odometry", f"map -> odom not published: {detail} [{count} so far]; poses are still published")
        return None

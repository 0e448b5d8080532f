"""numpy poses <-> ROS messages: the only module that knows ROS message field layout.

Poses are 4×4 homogeneous matrices (see :mod:`ros2_posenet.frames`); quaternion
order is converted with :func:`ros2_posenet.geometry.wxyz_to_xyzw`. Covariances are
6×6 in x, y, z, roll, pitch, yaw and go into the message row-major.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import (
    Pose,
    PoseStamped,
    PoseWithCovarianceStamped,
    Quaternion,
    Transform,
    TransformStamped,
    Vector3,
)
from std_msgs.msg import Header

from ..geometry import matrix_to_pose, pose_to_matrix, wxyz_to_xyzw, xyzw_to_wxyz


def stamp_to_seconds(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def header(frame_id: str, stamp: Time) -> Header:
    return Header(frame_id=frame_id, stamp=stamp)


def quaternion_msg(q_wxyz) -> Quaternion:
    x, y, z, w = (float(v) for v in wxyz_to_xyzw(q_wxyz))
    return Quaternion(x=x, y=y, z=z, w=w)


def quaternion_from_msg(q: Quaternion) -> np.ndarray:
    """(w, x, y, z) of a message quaternion."""
    return xyzw_to_wxyz([q.x, q.y, q.z, q.w])


def pose_msg(T: np.ndarray) -> Pose:
    """``geometry_msgs/Pose`` of a 4×4 pose."""
    t, q = matrix_to_pose(T)
    msg = Pose(orientation=quaternion_msg(q))
    msg.position.x, msg.position.y, msg.position.z = (float(v) for v in t)
    return msg


def matrix_from_pose_msg(pose: Pose) -> np.ndarray:
    """4×4 pose of a ``geometry_msgs/Pose``; raises ``ValueError`` for a zero/NaN quaternion."""
    t = [pose.position.x, pose.position.y, pose.position.z]
    return pose_to_matrix(t, quaternion_from_msg(pose.orientation))


def transform_msg(T: np.ndarray) -> Transform:
    t, q = matrix_to_pose(T)
    x, y, z = (float(v) for v in t)
    return Transform(translation=Vector3(x=x, y=y, z=z), rotation=quaternion_msg(q))


def matrix_from_transform_msg(transform: Transform) -> np.ndarray:
    t = [transform.translation.x, transform.translation.y, transform.translation.z]
    return pose_to_matrix(t, quaternion_from_msg(transform.rotation))


def pose_stamped(T: np.ndarray, frame_id: str, stamp: Time) -> PoseStamped:
    return PoseStamped(header=header(frame_id, stamp), pose=pose_msg(T))


def pose_with_covariance_stamped(T: np.ndarray, covariance: np.ndarray, frame_id: str, stamp: Time) -> PoseWithCovarianceStamped:
    """Pose plus its 6×6 covariance (x y z roll pitch yaw, row-major), as robot_localization reads it."""
    cov = np.asarray(covariance, dtype=float)
    if cov.shape != (6, 6):
        raise ValueError(f"covariance must be 6x6, got {cov.shape}")
    msg = PoseWithCovarianceStamped(header=header(frame_id, stamp))
    msg.pose.pose = pose_msg(T)
    msg.pose.covariance = cov.reshape(36).tolist()
    return msg


def covariance_from_msg(msg: PoseWithCovarianceStamped) -> np.ndarray:
    return np.asarray(msg.pose.covariance, dtype=float).reshape(6, 6)


def transform_stamped(T: np.ndarray, parent_frame: str, child_frame: str, stamp: Time) -> TransformStamped:
    """TF edge ``parent -> child`` whose transform is the pose of ``child`` in ``parent``."""
    return TransformStamped(header=header(parent_frame, stamp), child_frame_id=child_frame, transform=transform_msg(T))


def tf_message(transforms: Iterable[TransformStamped]):
    """``tf2_msgs/TFMessage``; imported lazily because tf2_msgs is not on PyPI (scripts/build_tf2_msgs.sh)."""
    from tf2_msgs.msg import TFMessage

    return TFMessage(transforms=list(transforms))


def relocalization_poses(poses, map_frame: str, stamp: Time) -> tuple[PoseStamped, PoseWithCovarianceStamped, PoseStamped]:
    """The node's three pose outputs for one :class:`~ros2_posenet.frames.RelocalizedPoses`.

    ``(pose, pose_with_covariance, camera_pose)``: the base in the map, the same with
    its covariance, and the camera body frame in the map, all stamped with the image's stamp.
    """
    return (
        pose_stamped(poses.T_map_base, map_frame, stamp),
        pose_with_covariance_stamped(poses.T_map_base, poses.base_covariance, map_frame, stamp),
        pose_stamped(poses.T_map_camera, map_frame, stamp),
    )


NANOSECONDS = 1_000_000_000
_INT32_MAX = 2**31 - 1


def stamp_nanoseconds(stamp: Time) -> int:
    """A ``builtin_interfaces/Time`` as integer nanoseconds (any ``nanosec``, even >= 1e9, taken as given)."""
    return int(stamp.sec) * NANOSECONDS + int(stamp.nanosec)


def stamp_from_nanoseconds(nanoseconds: int) -> Time:
    """The normalised stamp (0 <= nanosec < 1e9) every output of one frame carries."""
    return Time(sec=nanoseconds // NANOSECONDS, nanosec=nanoseconds % NANOSECONDS)


def shifted_stamp(stamp: Time, seconds: float) -> Time:
    """``stamp`` plus ``seconds`` (the node's ``transform_tolerance`` on TF), in integer nanoseconds, normalised."""
    return stamp_from_nanoseconds(stamp_nanoseconds(stamp) + round(seconds * NANOSECONDS))


def stamp_problem(stamp: Time) -> tuple[str, str] | None:
    """(drop reason, detail) when no output may carry ``stamp`` whatever the clock says, else None.

    Shared by the node and ``relocalize-bag`` so both drop the same frames.
    """
    stamp_ns = stamp_nanoseconds(stamp)
    if stamp.sec < 0:
        return "negative_stamp", f"header.stamp is sec {stamp.sec}, nanosec {stamp.nanosec}"
    if stamp_ns == 0:
        return "zero_stamp", "header.stamp is 0; make the camera driver stamp its images"
    if stamp_ns // NANOSECONDS > _INT32_MAX:
        return "future_stamp", f"header.stamp sec {stamp.sec}, nanosec {stamp.nanosec} does not fit a stamp once normalised"
    return None


# DiagnosticStatus levels (bytes in rclpy messages).
DIAGNOSTIC_OK = DiagnosticStatus.OK
DIAGNOSTIC_WARN = DiagnosticStatus.WARN
DIAGNOSTIC_ERROR = DiagnosticStatus.ERROR


def diagnostic_array(
    stamp: Time, name: str, hardware_id: str, level: bytes, message: str, values: Mapping[str, object]
) -> DiagnosticArray:
    """One ``DiagnosticStatus`` in a ``DiagnosticArray``; values are stringified (floats to 4 significant digits)."""
    status = DiagnosticStatus(level=level, name=name, hardware_id=hardware_id, message=message)
    status.values = [KeyValue(key=str(k), value=_format_value(v)) for k, v in values.items()]
    return DiagnosticArray(header=Header(stamp=stamp), status=[status])


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

"""numpy poses <-> ROS messages (real geometry_msgs / tf2_msgs / diagnostic_msgs types)."""
import math

import numpy as np
import pytest
from builtin_interfaces.msg import Time

from ros2_posenet.geometry import pose_to_matrix
from ros2_posenet.ros import messages

STAMP = Time(sec=12, nanosec=345_000_000)


def test_quaternion_order_is_xyzw_in_messages():
    # 90° about z: (w, x, y, z) = (cos 45°, 0, 0, sin 45°)
    T = pose_to_matrix([1.0, 2.0, 3.0], [math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)])
    msg = messages.pose_stamped(T, "map", STAMP)
    q = msg.pose.orientation
    assert (q.x, q.y) == (0.0, 0.0)
    assert q.z == pytest.approx(math.sin(math.pi / 4)) and q.w == pytest.approx(math.cos(math.pi / 4))
    assert (msg.pose.position.x, msg.pose.position.y, msg.pose.position.z) == (1.0, 2.0, 3.0)
    assert msg.header.frame_id == "map" and msg.header.stamp == STAMP


def test_pose_and_transform_round_trip():
    rng = np.random.default_rng(0)
    q = rng.normal(size=4)
    T = pose_to_matrix(rng.normal(size=3), q / np.linalg.norm(q))
    np.testing.assert_allclose(messages.matrix_from_pose_msg(messages.pose_msg(T)), T, atol=1e-12)
    ts = messages.transform_stamped(T, "map", "odom", STAMP)
    assert ts.header.frame_id == "map" and ts.child_frame_id == "odom" and ts.header.stamp == STAMP
    np.testing.assert_allclose(messages.matrix_from_transform_msg(ts.transform), T, atol=1e-12)


def test_covariance_is_row_major():
    cov = np.arange(36, dtype=float).reshape(6, 6)
    msg = messages.pose_with_covariance_stamped(np.eye(4), cov, "map", STAMP)
    assert msg.pose.covariance[1] == 1.0 and msg.pose.covariance[6] == 6.0  # [0][1] then [1][0]
    np.testing.assert_array_equal(messages.covariance_from_msg(msg), cov)
    with pytest.raises(ValueError, match="6x6"):
        messages.pose_with_covariance_stamped(np.eye(4), np.eye(3), "map", STAMP)


def test_zero_quaternion_from_a_message_is_rejected():
    pose = messages.pose_msg(np.eye(4))
    pose.orientation.w = 0.0
    with pytest.raises(ValueError, match="quaternion"):
        messages.matrix_from_pose_msg(pose)


def test_stamp_to_seconds():
    assert messages.stamp_to_seconds(STAMP) == pytest.approx(12.345)


def test_tf_message_holds_transforms():
    ts = messages.transform_stamped(np.eye(4), "map", "camera_link", STAMP)
    msg = messages.tf_message([ts])
    assert type(msg).__name__ == "TFMessage" and msg.transforms[0].child_frame_id == "camera_link"


def test_diagnostic_array_formats_values():
    msg = messages.diagnostic_array(STAMP, "posenet_node: relocalization", "cpu", messages.DIAGNOSTIC_WARN, "hello", {"rate_hz": 12.3456, "received": 3})
    status = msg.status[0]
    assert status.level == messages.DIAGNOSTIC_WARN and status.hardware_id == "cpu"
    assert {kv.key: kv.value for kv in status.values} == {"rate_hz": "12.35", "received": "3"}
    assert msg.header.stamp == STAMP

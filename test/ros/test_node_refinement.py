"""posenet_node with a scene map over the real rclpy: CameraInfo + map -> refined poses, fallbacks, diagnostics.

The regressor is an untrained network (its pose is a guess near the room's centre, with a
broad calibrated covariance); the refinement against a map of the rendered room must turn
that guess into the true camera pose, and without CameraInfo the node must keep answering
with the regressor's pose.
"""
import ros_fixtures
from ros_fixtures import Probe, image_msg, make_posenet_node, stamp_key, stamp_now, wait_for
from ros_fixtures import latest_diagnostic as diagnostic
from ros_fixtures import room_camera_info as camera_info

ros_fixtures.isolate_ros_domain()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from geometry_msgs.msg import PoseWithCovarianceStamped  # noqa: E402
from sensor_msgs.msg import CameraInfo  # noqa: E402

from helpers import ROOM_K, room_pose  # noqa: E402
from ros2_posenet.frames import CameraMount  # noqa: E402
from ros2_posenet.geometry import rotation_angle_deg_np, matrix_to_pose  # noqa: E402
from ros2_posenet.ros import messages  # noqa: E402

@pytest.fixture(scope="module")
def room(tmp_path_factory):
    files = ros_fixtures.room_files(tmp_path_factory)  # the room, its map, an untrained regressor with a broad prior
    return files.scene, files.map_file, files.checkpoint


def test_camera_info_and_map_turn_the_regressor_guess_into_the_true_pose(context, room):
    scene, map_file, checkpoint = room
    node = make_posenet_node(context, "refine", checkpoint=checkpoint, map_file=map_file, diagnostics_period=0.2)
    probe = Probe(context, "refine", extra_nodes=[node])
    info_pub = probe.node.create_publisher(CameraInfo, "camera/camera_info", 10)
    try:
        T_true = room_pose(-2.6, 0.5, 1.3, 8.0)
        rgb = scene.render(T_true, ROOM_K, 320, 240)[0]

        # No CameraInfo yet: the regressor's pose goes out, the node says why and keeps going.
        stamp = stamp_now(node)
        assert probe.send(image_msg(rgb, stamp)), "no answer without CameraInfo"
        assert wait_for(lambda: diagnostic(probe, "refine_no_camera_info") not in (None, "0"), 5.0)
        guess = messages.matrix_from_pose_msg(probe.camera_poses[stamp_key(stamp)].pose)

        # With CameraInfo: the refined pose, and a covariance far tighter than the regressor's.
        assert wait_for(lambda: info_pub.get_subscription_count() > 0, 10.0), "the node never subscribed to camera_info"
        for _ in range(3):
            info_pub.publish(camera_info(stamp_now(node)))
        assert wait_for(lambda: len(node._camera_infos) > 0, 5.0)
        verified = {}  # the map-verified poses have their own topic; the regressor's keep theirs
        probe.node.create_subscription(PoseWithCovarianceStamped, "posenet/verified/pose_with_covariance", lambda m: verified.__setitem__(stamp_key(m.header.stamp), m), 10)
        stamp = stamp_now(node)
        key = stamp_key(stamp)
        assert probe.send(image_msg(rgb, stamp), answered=lambda: key in verified and key in probe.poses_cov, timeout=20.0), "no verified pose with CameraInfo"
        T_cam = messages.matrix_from_pose_msg(verified[key].pose.pose)  # identity camera_to_base: base = camera body frame
        T_cam_true = CameraMount().camera_pose(T_true)
        assert np.linalg.norm(T_cam[:3, 3] - T_cam_true[:3, 3]) < 0.05
        assert rotation_angle_deg_np(matrix_to_pose(T_cam)[1], matrix_to_pose(T_cam_true)[1]) < 1.0
        assert np.linalg.norm(guess[:3, 3] - T_cam_true[:3, 3]) > 0.1  # the regressor alone was not there
        regressor = messages.matrix_from_pose_msg(probe.poses_cov[key].pose.pose)
        assert np.linalg.norm(regressor[:3, 3] - T_cam_true[:3, 3]) > 0.1  # the main topic keeps the regressor's measurement
        covariance = messages.covariance_from_msg(verified[key])
        assert np.all(np.diag(covariance)[:3] < 0.01) and np.all(np.diag(covariance)[:3] > 0)
        assert wait_for(lambda: diagnostic(probe, "refine_refined") not in (None, "0"), 5.0)
        assert diagnostic(probe, "map_file") == map_file
        assert float(diagnostic(probe, "position_std_m")) < 0.1
        counts = node.counters()
        assert counts.get("internal_error", 0) == 0 and counts.get("refine_error", 0) == 0
    finally:
        probe.close()
        node.destroy_node()


def test_a_bad_map_file_leaves_the_regressor_serving_and_says_why(context, room, tmp_path):
    scene, _, checkpoint = room
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a map")
    node = make_posenet_node(context, "badmap", checkpoint=checkpoint, map_file=str(corrupt), diagnostics_period=0.2)
    probe = Probe(context, "badmap", extra_nodes=[node])
    try:
        rgb = scene.render(room_pose(-2.6, 0.5, 1.3), ROOM_K, 320, 240)[0]
        assert probe.send(image_msg(rgb, stamp_now(node))), "a bad map must not stop the regressor"
        assert wait_for(lambda: diagnostic(probe, "refinement_problem") is not None, 5.0)
        assert "map_file" in diagnostic(probe, "refinement_problem") and diagnostic(probe, "refine") == "False"
        assert node.counters().get("internal_error", 0) == 0
    finally:
        probe.close()
        node.destroy_node()

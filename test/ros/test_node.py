"""posenet_node with the real rclpy over Fast DDS: outputs, conventions, TF, bad input, parameters.

A tiny PoseNet is overfitted on rendered views of a textured wall (test/ros_fixtures.py);
the node relocalises those views and the tests compare against the ground truth.
"""
import math
import re
import threading

import ros_fixtures
from ros_fixtures import compressed_msg, image_msg, make_posenet_node, stamp_key, wait_for, wait_for_log

ros_fixtures.isolate_ros_domain()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from builtin_interfaces.msg import Time  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from ros2_posenet.checkpoint import CheckpointError  # noqa: E402
from ros2_posenet.frames import CameraMount, base_covariance  # noqa: E402
from ros2_posenet.geometry import matrix_to_rpy, pose_to_matrix, rotation_angle_deg_np, matrix_to_pose  # noqa: E402
from ros2_posenet.inference import Relocalizer  # noqa: E402
from ros2_posenet.ros import messages  # noqa: E402
from ros2_posenet.ros.node import ConfigurationError, LatestFrameSlot  # noqa: E402

EXTRINSIC = [0.1, -0.05, 0.3, 0.0, 0.15, 0.05]  # camera_link in base_link: ahead, up, pitched down




@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return ros_fixtures.tiny_trained_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def relocalizer(scene):
    return Relocalizer(str(scene.checkpoint), device="cpu")


_last_stamp = [0]


def fresh_stamp(node) -> Time:
    """Now on the node's clock, unique within the test session (stamps key the answers)."""
    ns = max(node.get_clock().now().nanoseconds, _last_stamp[0] + 1000)
    _last_stamp[0] = ns
    return Time(sec=ns // 10**9, nanosec=ns % 10**9)


def as_matrix(pose_stamped) -> np.ndarray:
    return messages.matrix_from_pose_msg(pose_stamped.pose)


# ----------------------------------------------------------------------------- outputs


def test_poses_tf_frames_stamps_and_accuracy(start, scene, relocalizer):
    r = start("outputs", checkpoint=str(scene.checkpoint), camera_to_base=EXTRINSIC, base_frame="base_footprint")
    mount = CameraMount.from_xyz_rpy(EXTRINSIC)
    position_errors, rotation_errors, base_errors = [], [], []
    for T_true, rgb in zip(scene.poses, scene.images):
        stamp = fresh_stamp(r.node)
        assert r.probe.send(image_msg(rgb, stamp, encoding="bgr8")), "no answer to a good image"
        key = stamp_key(stamp)
        pose, pose_cov, camera = r.probe.poses[key], r.probe.poses_cov[key], r.probe.camera_poses[key]
        for msg in (pose, pose_cov, camera):
            assert msg.header.frame_id == "map" and msg.header.stamp == stamp

        # Exactly the Relocalizer's prediction, converted once: optical -> camera_link body, camera -> base.
        pred = relocalizer.predict(rgb)
        T_pred = pose_to_matrix(pred.position, pred.quaternion)
        np.testing.assert_allclose(as_matrix(camera), mount.camera_pose(T_pred), atol=1e-5)
        np.testing.assert_allclose(as_matrix(pose), mount.base_pose(T_pred), atol=1e-5)
        np.testing.assert_allclose(messages.matrix_from_pose_msg(pose_cov.pose.pose), mount.base_pose(T_pred), atol=1e-5)
        np.testing.assert_allclose(
            messages.covariance_from_msg(pose_cov), base_covariance(pred.covariance, T_pred, mount.base_pose(T_pred)), rtol=1e-6, atol=1e-9
        )
        tf = r.probe.tf[("map", "camera_link", key)]
        np.testing.assert_allclose(messages.matrix_from_transform_msg(tf.transform), as_matrix(camera), atol=1e-9)

        # Against the ground truth: the body frame of a level camera is level (REP-103), yaw = true yaw.
        T_cam_true = mount.camera_pose(T_true)
        T_cam = as_matrix(camera)
        roll, pitch, yaw = matrix_to_rpy(T_cam[:3, :3])
        assert abs(roll) < math.radians(8) and abs(pitch) < math.radians(8), "camera pose is not in the REP-103 body convention"
        assert abs(yaw - matrix_to_rpy(T_cam_true[:3, :3])[2]) < math.radians(10)
        position_errors.append(np.linalg.norm(T_cam[:3, 3] - T_cam_true[:3, 3]))
        rotation_errors.append(rotation_angle_deg_np(matrix_to_pose(T_cam)[1], matrix_to_pose(T_cam_true)[1]))
        base_errors.append(np.linalg.norm(as_matrix(pose)[:3, 3] - mount.base_pose(T_true)[:3, 3]))
    spread = scene.position_spread
    assert np.median(position_errors) < 0.3 * spread, (position_errors, spread)
    assert np.median(base_errors) < 0.3 * spread
    assert np.median(rotation_errors) < 5.0
    counts = r.node.counters()
    assert counts["processed"] >= len(scene.images) and counts.get("stale", 0) == 0


def test_compressed_images_png_exact_and_jpeg_accurate(start, scene, relocalizer):
    r = start("compressed", checkpoint=str(scene.checkpoint), compressed=True, map_frame="world", camera_frame="cam")
    rgb, T_true = scene.images[3], scene.poses[3]
    stamp = fresh_stamp(r.node)
    assert r.probe.send(compressed_msg(rgb, stamp, "png"))
    key = stamp_key(stamp)
    pred = relocalizer.predict(rgb)  # png is lossless: exactly the raw image's prediction
    camera = r.probe.camera_poses[key]
    assert camera.header.frame_id == "world" and camera.header.stamp == stamp
    np.testing.assert_allclose(as_matrix(camera), CameraMount().camera_pose(pose_to_matrix(pred.position, pred.quaternion)), atol=1e-5)
    assert ("world", "cam", key) in r.probe.tf

    jpeg_errors = []
    for rgb, T_true in list(zip(scene.images, scene.poses))[:6]:
        stamp = fresh_stamp(r.node)
        assert r.probe.send(compressed_msg(rgb, stamp, "jpeg"))
        jpeg_errors.append(np.linalg.norm(as_matrix(r.probe.camera_poses[stamp_key(stamp)])[:3, 3] - T_true[:3, 3]))
    assert np.median(jpeg_errors) < 0.3 * scene.position_spread


# ----------------------------------------------------------------------------- map -> odom


def odometry(stamp_ns: int, T_odom_base: np.ndarray) -> Odometry:
    msg = Odometry(child_frame_id="base_link")
    msg.header.frame_id = "odom"
    msg.header.stamp = Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
    msg.pose.pose = messages.pose_msg(T_odom_base)
    return msg


def odom_pose(x: float, yaw: float) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = np.array([[math.cos(yaw), -math.sin(yaw), 0], [math.sin(yaw), math.cos(yaw), 0], [0, 0, 1]])
    T[0, 3] = x
    return T


def test_map_to_odom_composes_with_odometry_to_the_relocalised_base(start, scene):
    r = start("robot", checkpoint=str(scene.checkpoint), tf_mode="map_to_odom", odom_source="topic", odom_topic="odom", camera_to_base=EXTRINSIC)
    rgb = scene.images[0]

    # No odometry yet: the poses still come, map -> odom does not, and it is counted.
    stamp = fresh_stamp(r.node)
    assert r.probe.send(image_msg(rgb, stamp))
    assert wait_for(lambda: r.node.counters().get("no_odometry", 0) >= 1)
    misses = r.node.counters()["no_odometry"]
    assert not [k for k in r.probe.tf if k[2] == stamp_key(stamp)]

    # Odometry at t-0.1 and t+0.1 s; the node interpolates odom -> base at the image stamp t.
    stamp = fresh_stamp(r.node)
    t_ns = stamp.sec * 10**9 + stamp.nanosec
    assert wait_for(lambda: r.probe.odom_pub.get_subscription_count() > 0)
    r.probe.odom_pub.publish(odometry(t_ns - 100_000_000, odom_pose(1.0, 0.2)))
    r.probe.odom_pub.publish(odometry(t_ns + 100_000_000, odom_pose(1.2, 0.4)))
    assert wait_for(lambda: len(r.node._odometry._history) >= 2)  # both landed before the image
    key = stamp_key(stamp)
    assert r.probe.send(image_msg(rgb, stamp), answered=lambda: ("map", "odom", key) in r.probe.tf)
    tf = r.probe.tf[("map", "odom", key)]
    assert tf.header.stamp == stamp
    T_map_odom = messages.matrix_from_transform_msg(tf.transform)
    T_map_base = as_matrix(r.probe.poses[key])
    np.testing.assert_allclose(T_map_odom @ odom_pose(1.1, 0.3), T_map_base, atol=1e-6)
    assert r.node.counters()["no_odometry"] == misses  # odometry found this time

    # transform_tolerance post-dates the TF stamp (as AMCL does); the pose keeps the image stamp.
    result = r.node.set_parameters([Parameter("transform_tolerance", value=0.5)])[0]
    assert result.successful
    r.probe.odom_pub.publish(odometry(t_ns + 150_000_000, odom_pose(1.25, 0.45)))
    stamp2 = Time(sec=stamp.sec, nanosec=stamp.nanosec + 10_000_000) if stamp.nanosec < 900_000_000 else Time(sec=stamp.sec + 1, nanosec=0)
    shifted = Time(sec=stamp2.sec, nanosec=stamp2.nanosec)
    shifted_ns = stamp2.sec * 10**9 + stamp2.nanosec + 500_000_000
    shifted = Time(sec=shifted_ns // 10**9, nanosec=shifted_ns % 10**9)
    assert r.probe.send(image_msg(rgb, stamp2), answered=lambda: ("map", "odom", stamp_key(shifted)) in r.probe.tf)
    assert r.probe.poses[stamp_key(stamp2)].header.stamp == stamp2


def test_tf_mode_none_publishes_no_tf(start, scene):
    r = start("ekf_owned", checkpoint=str(scene.checkpoint), tf_mode="none")
    stamp = fresh_stamp(r.node)
    assert r.probe.send(image_msg(scene.images[1], stamp))
    assert wait_for(lambda: r.node.count_publishers("/tf") == 0)  # no TF publisher at all (a closed test's node may linger in the graph)
    assert not [k for k in r.probe.tf if k[2] == stamp_key(stamp)]


# ----------------------------------------------------------------------------- bad input


def bad_images(stamp) -> dict:
    """reason counter -> a message that must be dropped for that reason."""
    yuv = Image(height=4, width=4, encoding="yuv422", step=8, data=bytes(32))
    empty = Image(height=0, width=0, encoding="rgb8", step=0, data=b"")
    truncated = Image(height=72, width=96, encoding="rgb8", step=288, data=bytes(1000))
    tiny = Image(height=1, width=1, encoding="rgb8", step=3, data=bytes(3))
    out = {"unsupported_encoding": yuv, "empty_image": empty, "truncated_image": truncated, "bad_image": tiny}
    for msg in out.values():
        msg.header.stamp = stamp
    return out


def test_every_bad_image_is_counted_and_the_next_good_one_answered(start, scene):
    r = start("bad_input", checkpoint=str(scene.checkpoint), log_throttle=60.0)
    good = scene.images[2]
    bad_stamps = []
    for reason, bad in bad_images(fresh_stamp(r.node)).items():
        bad.header.stamp = fresh_stamp(r.node)
        bad_stamps.append(stamp_key(bad.header.stamp))
        before = r.node.counters().get(reason, 0)
        assert r.probe.send(bad, answered=lambda: r.node.counters().get(reason, 0) > before), reason
        assert r.probe.send(image_msg(good, fresh_stamp(r.node))), f"no answer after {reason}"
    # A frame older than max_image_age.
    old = fresh_stamp(r.node)
    old.sec -= 30
    bad_stamps.append(stamp_key(old))
    assert r.probe.send(image_msg(good, old), answered=lambda: r.node.counters().get("stale", 0) >= 1)
    assert r.probe.send(image_msg(good, fresh_stamp(r.node)))
    assert not set(bad_stamps) & set(r.probe.poses), "a dropped frame produced a pose"
    counts = r.node.counters()
    assert counts["processed"] >= 5  # a good frame may be republished once on a loaded machine
    for reason in ("unsupported_encoding", "empty_image", "truncated_image", "bad_image", "stale"):
        assert counts[reason] >= 1, reason
    assert r.node._worker.is_alive()


def test_corrupt_compressed_image_then_good_one(start, scene):
    r = start("bad_compressed", checkpoint=str(scene.checkpoint), compressed=True)
    bad = compressed_msg(scene.images[0], fresh_stamp(r.node), "jpeg")
    bad.data = bytes(bad.data)[: len(bad.data) // 2]
    assert r.probe.send(bad, answered=lambda: r.node.counters().get("corrupt_compressed", 0) >= 1)
    assert r.probe.send(compressed_msg(scene.images[0], fresh_stamp(r.node), "png"))


def test_non_finite_network_output_is_dropped_and_node_keeps_serving(start, tmp_path):
    checkpoint = ros_fixtures.overflow_checkpoint(tmp_path / "overflow.pt")
    r = start("nan", checkpoint=str(checkpoint))
    red = np.zeros((72, 96, 3), np.uint8)
    red[..., 0] = 255
    bad_stamp = fresh_stamp(r.node)
    assert r.probe.send(image_msg(red, bad_stamp), answered=lambda: r.node.counters().get("non_finite_output", 0) >= 1)
    dark = np.full((72, 96, 3), 40, np.uint8)
    stamp = fresh_stamp(r.node)
    assert r.probe.send(image_msg(dark, stamp))
    np.testing.assert_allclose(as_matrix(r.probe.poses[stamp_key(stamp)])[:3, 3], 0.0, atol=1e-6)
    assert stamp_key(bad_stamp) not in r.probe.poses


def test_backlog_keeps_only_the_newest_frame(start, scene):
    # Reliable QoS with a deep queue delivers every frame to the callback; the slot drops the backlog.
    r = start("burst", checkpoint=str(scene.checkpoint), image_qos="reliable", image_qos_depth=50)
    publisher = r.probe.node.create_publisher(Image, "camera/image_raw", 50)
    assert wait_for(lambda: publisher.get_subscription_count() > 0)
    stamps = [fresh_stamp(r.node) for _ in range(30)]
    for stamp, rgb in zip(stamps, scene.images * 3):
        publisher.publish(image_msg(rgb, stamp))
    assert wait_for(lambda: stamp_key(stamps[-1]) in r.probe.poses), f"the newest frame was not processed: {r.node.counters()}"
    assert wait_for(lambda: r.node.counters().get("received", 0) == 30)
    assert wait_for(lambda: r.node.counters().get("processed", 0) + r.node.counters().get("superseded", 0) == 30)
    counts = r.node.counters()
    assert counts["superseded"] > 0, counts  # 30 frames in a burst cannot all be relocalised in time


def test_latest_frame_slot():
    slot = LatestFrameSlot()
    assert slot.put(1) is False
    assert slot.put(2) is True  # replaced an untaken frame
    assert slot.take(0.01) == 2 and slot.take(0.01) is None
    taken = []
    worker = threading.Thread(target=lambda: taken.append(slot.take(5.0)))
    worker.start()
    slot.close()
    worker.join(1.0)
    assert not worker.is_alive() and taken == [None] and slot.closed


# ----------------------------------------------------------------------------- diagnostics


def test_diagnostics_report_rate_latency_and_drops(start, scene):
    """/diagnostics carries the node's counts, the latency and rate of its window and the σ the EKF was
    last told; a new drop raises WARN for one window, then the status is OK again.

    Catches: a value reported under the wrong key or stale (e.g. ``processed`` read from ``received``,
    ``position_std_m`` from another covariance, or the WARN level staying on after the drop).
    """
    period = 0.2
    r = start("diag", checkpoint=str(scene.checkpoint), diagnostics_period=period)
    good = fresh_stamp(r.node)
    assert r.probe.send(image_msg(scene.images[0], good))
    old = fresh_stamp(r.node)
    old.sec -= 30
    assert r.probe.send(image_msg(scene.images[0], old), answered=lambda: r.node.counters().get("stale", 0) >= 1)

    def statuses():
        for array in list(r.probe.diagnostics):
            for status in array.status:
                if status.name.startswith("posenet_node"):
                    yield status, {kv.key: kv.value for kv in status.values}

    # A later window with nothing new: OK again, and its totals are the node's, value by value.
    assert wait_for(lambda: any(int(v.get("dropped_stale", 0)) == 1 and st.level == messages.DIAGNOSTIC_OK for st, v in statuses()), 10.0)
    status, values = [(st, v) for st, v in statuses() if st.level == messages.DIAGNOSTIC_OK][-1]
    counts = r.node.counters()
    for key in ("received", "processed"):
        assert int(values[key]) == counts[key]
    assert int(values["dropped_stale"]) == counts["stale"] == 1 and int(values["dropped_superseded"]) == counts.get("superseded", 0)
    assert values["no_odometry"] == "0" and values["device"] == "cpu" and values["backend"] == "torch" and values["checkpoint"] == str(scene.checkpoint)
    assert status.message.startswith("relocalising at")

    # The window that saw the stale frame warned; the one that relocalised the good frame timed it.
    assert any(st.level == messages.DIAGNOSTIC_WARN and "dropped" in st.message for st, _ in statuses())
    timed = [v for _, v in statuses() if float(v["rate_hz"]) > 0]
    assert timed, "no window relocalised a frame"
    for v in timed:
        assert 0 < float(v["latency_mean_ms"]) <= float(v["latency_max_ms"]) < 10_000
        assert float(v["rate_hz"]) <= counts["processed"] / period * 1.5  # at most the frames there were, in one window

    # σ of the last published covariance, as the EKF received it.
    cov = messages.covariance_from_msg(r.probe.poses_cov[stamp_key(good)])
    assert float(values["position_std_m"]) == pytest.approx(np.sqrt(np.linalg.eigvalsh(cov[:3, :3]).max()), rel=1e-3)  # printed to 4 digits
    assert float(values["yaw_std_deg"]) == pytest.approx(np.degrees(np.sqrt(cov[5, 5])), rel=1e-3)


# ----------------------------------------------------------------------------- parameters & start-up


@pytest.mark.parametrize(
    "overrides, error, text",
    [
        ({}, ConfigurationError, "'checkpoint'"),
        ({"tf_mode": "map_to_base"}, ConfigurationError, "'tf_mode'.*map_to_camera, map_to_odom, none"),
        ({"device": "gpu"}, ConfigurationError, "'device'"),
        ({"camera_to_base": [0.0, 0.0, 0.0]}, ConfigurationError, "'camera_to_base'.*6 finite numbers"),
        ({"max_image_age": -1.0}, ConfigurationError, "'max_image_age'.*>= 0"),
        ({"base_frame": "/base_link"}, ConfigurationError, "'base_frame'.*'/'"),
        ({"image_qos": "fast"}, ConfigurationError, "'image_qos'"),
        ({"backend": "tensorflow"}, ConfigurationError, "'backend'"),
        ({"backend": "tensorrt"}, ConfigurationError, "'backend'.*CUDA"),
        ({"precision": "int8"}, ConfigurationError, "'precision'"),
        ({"compile": "fastest"}, ConfigurationError, "'compile'"),
        ({"compressed": "maybe"}, ConfigurationError, "'compressed'.*expected a bool"),
        ({"publish_camera_to_base_tf": True}, ConfigurationError, "two TF parents"),
        ({"image_topic": "bad topic!"}, ConfigurationError, "topics"),
    ],
)
def test_bad_parameters_fail_at_start_up(context, scene, overrides, error, text):
    if overrides and "checkpoint" not in overrides:
        overrides = {"checkpoint": str(scene.checkpoint), **overrides}
    with pytest.raises(error, match=text):
        make_posenet_node(context, "bad_params", **overrides)


def test_checkpoint_problems_fail_at_start_up_with_advice(context, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*train"):
        make_posenet_node(context, "ckpt", checkpoint=str(tmp_path / "missing.pt"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError, match="corrupt"):
        make_posenet_node(context, "ckpt", checkpoint=str(corrupt))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a ros2_posenet checkpoint"):
        make_posenet_node(context, "ckpt", checkpoint=str(foreign))


def test_parameters_are_validated_at_run_time(start, scene):
    r = start("runtime", checkpoint=str(scene.checkpoint))
    node = r.node
    bad = node.set_parameters([Parameter("max_image_age", value=-2.0)])[0]
    assert not bad.successful and "max_image_age" in bad.reason
    assert not node.set_parameters([Parameter("camera_to_base", value=[1.0, 2.0])])[0].successful
    assert not node.set_parameters([Parameter("image_topic", value="/other")])[0].successful  # read-only
    assert node.get_parameter("max_image_age").value == 5.0
    # Integers are accepted for float parameters (yaml `2` vs `2.0`), and frames change live.
    assert node.set_parameters([Parameter("max_image_age", value=2)])[0].successful
    assert node.set_parameters([Parameter("camera_frame", value="camera_front")])[0].successful
    stamp = fresh_stamp(node)
    assert r.probe.send(image_msg(scene.images[0], stamp), answered=lambda: ("map", "camera_front", stamp_key(stamp)) in r.probe.tf)
    descriptor = node.describe_parameter("tf_mode")
    assert "map_to_odom" in descriptor.description and descriptor.read_only


def test_warnings_are_throttled_and_a_summary_is_logged(start, scene, capfd):
    r = start("logging", checkpoint=str(scene.checkpoint), log_throttle=60.0, log_period=0.3, diagnostics_period=0.1)
    for i in range(3):
        old = fresh_stamp(r.node)
        old.sec -= 30
        assert r.probe.send(image_msg(scene.images[0], old), answered=lambda: r.node.counters().get("stale", 0) >= i + 1)
    assert r.probe.send(image_msg(scene.images[0], fresh_stamp(r.node)))
    err = wait_for_log(capfd, r"relocalised [1-9].*dropped: stale [3-9]")
    assert err.count("dropped frame (image older than max_image_age)") == 1, err  # one warning per throttle period
    assert "[1 so far]" in err
    assert re.search(r"relocalised [1-9].*dropped: stale [3-9]", err), err

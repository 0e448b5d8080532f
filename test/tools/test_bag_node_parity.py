"""relocalize-bag writes what posenet_node publishes: the same images and params file through both, message by message.

The node runs for real (rclpy over Fast DDS, private ROS_DOMAIN_ID) and is fed the
bag's images; the tool reads the bag. Both single-threaded on the torch backend, one
image per forward, so every field agrees exactly, floats included (raw CDR bytes can
differ only in alignment padding, which serialisers leave unset).
"""
import logging
import re

import ros_fixtures
from ros_fixtures import Probe, image_msg, make_posenet_node, stamp_key, wait_for

ros_fixtures.isolate_ros_domain()

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from builtin_interfaces.msg import Time  # noqa: E402
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped  # noqa: E402
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from rosbags.rosbag2 import Reader, StoragePlugin, Writer  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402
from sensor_msgs.msg import CameraInfo  # noqa: E402
from tf2_msgs.msg import TFMessage  # noqa: E402

from helpers import ROOM_K, room_pose, untrained_checkpoint  # noqa: E402
from ros2_posenet.preprocess import PreprocessConfig  # noqa: E402
from ros2_posenet.ros.replay import camera_info_msg  # noqa: E402
from ros2_posenet.tools.relocalize_bag import main  # noqa: E402

TS = get_typestore(Stores.LATEST)
COV = {"position_var": [0.04, 0.09, 0.01], "rotation_var": [1e-3, 2e-3, 3e-3], "samples": 10}
PARAMS = {
    "backend": "torch",
    "device": "cpu",
    "cpu_threads": 1,
    "image_topic": "camera/image_raw",
    "camera_to_base": [0.2, -0.1, 0.5, 0.05, 0.3, -0.2],
    "base_frame": "base_footprint",
    "camera_frame": "front_camera_link",
    "tf_mode": "map_to_camera",
    "transform_tolerance": 0.25,
}
N_FRAMES = 4
TYPES = {"posenet/pose": PoseStamped, "posenet/pose_with_covariance": PoseWithCovarianceStamped, "posenet/camera_pose": PoseStamped}




def stamp(i: int) -> Time:
    return Time(sec=1_700_000_000 + i, nanosec=123_000_000 + i)


def write_image_bag(path, images) -> None:
    with Writer(path, version=Writer.VERSION_LATEST, storage_plugin=StoragePlugin.SQLITE3) as writer:
        conn = writer.add_connection("/camera/image_raw", "sensor_msgs/msg/Image", typestore=TS)
        for i, rgb in enumerate(images):
            msg = image_msg(rgb, stamp(i), encoding="bgr8", frame_id="camera_optical_frame")
            writer.write(conn, (stamp(i).sec + 1) * 10**9, serialize_message(msg))  # the rclpy message, as recorded


def bag_messages(path) -> dict[str, list[bytes]]:
    """Raw CDR per topic, in bag order."""
    out: dict[str, list[bytes]] = {}
    with Reader(path) as reader:
        for connection, _, raw in reader.messages():
            out.setdefault(connection.topic, []).append(bytes(raw))
    return out


def test_bag_tool_writes_the_nodes_messages(tmp_path, context):
    rng = np.random.default_rng(3)
    images = [cv2.GaussianBlur(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), (5, 5), 0) for _ in range(N_FRAMES)]
    checkpoint = untrained_checkpoint(tmp_path / "ckpt.pt", [1.0, -2.0, 0.5], PreprocessConfig(resize=72, crop=64), covariance=COV)
    bag, out = tmp_path / "in_bag", tmp_path / "out_bag"
    write_image_bag(bag, images)
    params_file = tmp_path / "posenet.yaml"
    params_file.write_text(yaml.safe_dump({"/**": {"ros__parameters": {**PARAMS, "checkpoint": str(checkpoint), "log_period": 0.0}}}))

    assert main([str(bag), "--params-file", str(params_file), "--out", str(out), "--batch-size", "1"]) == 0
    recorded = bag_messages(out)
    assert set(recorded) == {"/" + topic for topic in TYPES} | {"/tf"}
    assert all(len(raws) == N_FRAMES for raws in recorded.values())

    node = make_posenet_node(context, "parity", checkpoint=str(checkpoint), max_image_age=0.0, log_period=0.0, **PARAMS)
    probe = None
    try:
        probe = Probe(context, "parity", extra_nodes=[node])
        received = {"posenet/pose": probe.poses, "posenet/pose_with_covariance": probe.poses_cov, "posenet/camera_pose": probe.camera_poses}
        for i, rgb in enumerate(images):
            key = stamp_key(stamp(i))
            tf_key = ("scene_map", PARAMS["camera_frame"], (key[0], key[1] + 250_000_000))
            answered = lambda: all(key in d for d in received.values()) and tf_key in probe.tf  # noqa: E731
            assert probe.send(image_msg(rgb, stamp(i), encoding="bgr8"), answered=answered, timeout=20.0), f"no answer to frame {i}"

            for topic, msg_type in TYPES.items():
                from_bag = deserialize_message(recorded["/" + topic][i], msg_type)
                assert from_bag == received[topic][key], f"{topic} differs for frame {i}"  # every field exactly
            (transform,) = deserialize_message(recorded["/tf"][i], TFMessage).transforms
            assert transform == probe.tf[tf_key], f"/tf differs for frame {i}"
        # The node answered nothing else (e.g. no second TF edge), like the bag.
        assert wait_for(lambda: len(probe.poses) == N_FRAMES, 2.0)
        assert {k[:2] for k in probe.tf} == {("scene_map", PARAMS["camera_frame"])}
    finally:
        if probe is not None:
            probe.close()
        node.destroy_node()


# ----------------------------------------------------------------------------- with a map: CameraInfo in bag order


INFO_RATE_HZ, N_INFOS = 30.0, 120  # more than the node's buffer of 100
T0_NS = 1_700_000_000_000_000_000
RECORD_LAG_NS = 7_000_000  # the recorder receives a message 7 ms after its stamp


def info_stamp_ns(k: int) -> int:
    return T0_NS + 100_000_000 + round(k * 1e9 / INFO_RATE_HZ)  # the first CameraInfo comes 0.1 s after the first image


def camera_info_recording():
    """(bag time, CameraInfo) at 30 Hz, the calibration of ROOM_K's 320×240 camera."""
    return [(info_stamp_ns(k) + RECORD_LAG_NS, camera_info_msg(ROOM_K, 320, 240, info_stamp_ns(k), "camera_optical_frame")) for k in range(N_INFOS)]


# Image stamps: before any CameraInfo, then on CameraInfo stamps early (evicted from a buffer of 100
# by the end of the bag) and late, then 1 s after the last CameraInfo (none within the tolerance).
IMAGE_STAMPS_NS = [T0_NS, info_stamp_ns(0), info_stamp_ns(15), info_stamp_ns(60), info_stamp_ns(119), info_stamp_ns(119) + 1_000_000_000]
ROOM_POSES = [(-2.6, 0.5, 1.3, 8.0), (-2.3, 0.4, 1.3, -10.0), (-2.9, 0.6, 1.3, 5.0), (-2.5, 0.45, 1.3, 0.0), (-2.2, 0.5, 1.3, 12.0), (-2.7, 0.5, 1.3, -5.0)]
EXPECTED_STATUS = {
    0.05: ["no_camera_info", "refined", "refined", "refined", "refined", "no_camera_info"],
    -1.0: ["no_camera_info", "refined", "refined", "refined", "refined", "refined"],  # latest received, whatever its stamp
}


@pytest.fixture(scope="module")
def room_bag(tmp_path_factory):
    """A recording of the room: images, 120 CameraInfo in between; the room's map and untrained regressor."""
    room = ros_fixtures.room_files(tmp_path_factory)
    folder = tmp_path_factory.mktemp("parity_map")
    images = [room.scene.render(room_pose(*pose), ROOM_K, 320, 240)[0] for pose in ROOM_POSES]
    recording = sorted(
        [(t, "info", msg) for t, msg in camera_info_recording()]
        + [(s + RECORD_LAG_NS + 1, "image", image_msg(rgb, stamp_from_ns(s), encoding="bgr8")) for s, rgb in zip(IMAGE_STAMPS_NS, images)],
        key=lambda event: event[0],
    )
    bag = folder / "in_bag"
    with Writer(bag, version=Writer.VERSION_LATEST, storage_plugin=StoragePlugin.SQLITE3) as writer:
        connections = {
            "image": writer.add_connection("/camera/image_raw", "sensor_msgs/msg/Image", typestore=TS),
            "info": writer.add_connection("/camera/camera_info", "sensor_msgs/msg/CameraInfo", typestore=TS),
        }
        for bag_time, kind, msg in recording:
            writer.write(connections[kind], bag_time, serialize_message(msg))
    return bag, room.map_file, room.checkpoint, recording


def stamp_from_ns(ns: int) -> Time:
    return Time(sec=ns // 10**9, nanosec=ns % 10**9)


def bag_statuses(records) -> dict:
    """Refinement status per image stamp text, from the tool's log (refined frames are not logged)."""
    found = {}
    for record in records:
        match = re.match(r"image stamped (\S+): refinement (\S+) ", record.getMessage())
        if match:
            found[match.group(1)] = match.group(2)
    return found


MSG_TYPES = {"geometry_msgs/msg/PoseStamped": PoseStamped, "geometry_msgs/msg/PoseWithCovarianceStamped": PoseWithCovarianceStamped,
             "tf2_msgs/msg/TFMessage": TFMessage}


def bag_messages_by_stamp(path) -> dict:
    """{topic: {key: message}} of an output bag; key = header stamp, or (parent, child, stamp) per /tf transform."""
    out: dict = {}
    with Reader(path) as reader:
        for connection, _, raw in reader.messages():
            msg = deserialize_message(bytes(raw), MSG_TYPES[connection.msgtype])
            topic = out.setdefault(connection.topic, {})
            if isinstance(msg, TFMessage):
                for transform in msg.transforms:
                    topic[(transform.header.frame_id, transform.child_frame_id, stamp_key(transform.header.stamp))] = transform
            else:
                assert stamp_key(msg.header.stamp) not in topic, f"{connection.topic}: stamp written twice"
                topic[stamp_key(msg.header.stamp)] = msg
    return out


REFINE_OUTCOMES = ("refine_refined", "refine_fallback", "refine_no_camera_info", "refine_error")


def refinement_status(node, before: dict) -> str | None:
    """The one refine_<status> counter that moved since ``before`` (None while the refiner works)."""
    after = node.counters()
    moved = [key for key in REFINE_OUTCOMES if after.get(key, 0) > before.get(key, 0)]
    assert len(moved) <= 1, f"one frame, several outcomes: {moved}"
    return moved[0][len("refine_"):] if moved else None


@pytest.mark.parametrize("tolerance", [0.05, -1.0])
def test_with_a_map_every_frame_refines_as_in_the_node(tmp_path, context, room_bag, caplog, tolerance):
    """The bag's CameraInfo reach the refinement in bag order, as the node receives them: every
    frame's refinement status and every message, per topic and stamp, are the node's.

    Catches: loading every CameraInfo of the bag before the first image (the bag tool
    before issue 27): with tolerance 0.05 the early frames find no CameraInfo in a buffer
    holding the last 100; with -1 the first frame refines with a CameraInfo recorded after it.
    """
    bag, map_file, checkpoint, recording = room_bag
    params = {**PARAMS, "checkpoint": checkpoint, "map_file": map_file, "camera_info_tolerance": tolerance, "log_period": 0.0}
    params_file = tmp_path / "posenet.yaml"
    params_file.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    out = tmp_path / "out_bag"
    caplog.set_level(logging.INFO, logger="relocalize-bag")
    assert main([str(bag), "--params-file", str(params_file), "--out", str(out), "--batch-size", "1"]) == 0
    logged = bag_statuses(caplog.records)
    bag_status = [logged.get(f"{s // 10**9}.{s % 10**9:09d}", "refined") for s in IMAGE_STAMPS_NS]
    from_bag = bag_messages_by_stamp(out)

    node = make_posenet_node(context, "parity_map", max_image_age=0.0, **params)
    probe = None
    try:
        probe = Probe(context, "parity_map", extra_nodes=[node])
        verified_topic = node.get_parameter("verified_pose_topic").value
        verified: dict = {}
        probe.node.create_subscription(PoseWithCovarianceStamped, verified_topic, lambda m: verified.__setitem__(stamp_key(m.header.stamp), m), 50)
        info_pub = probe.node.create_publisher(CameraInfo, "camera/camera_info", 10)
        assert wait_for(lambda: info_pub.get_subscription_count() > 0, 10.0), "the node never subscribed to camera/camera_info"
        regressor = (probe.poses, probe.poses_cov, probe.camera_poses)
        node_status, infos = [], 0
        for _, kind, msg in recording:
            if kind == "info":  # one at a time: the node's best-effort queue holds 5
                infos += 1
                info_pub.publish(msg)
                assert wait_for(lambda: node._camera_infos.received == infos, 10.0), f"CameraInfo {infos} never arrived"
                continue
            before, key = node.counters(), stamp_key(msg.header.stamp)
            assert probe.send(msg, answered=lambda: all(key in d for d in regressor), timeout=30.0), f"no answer to {key}"
            assert wait_for(lambda: refinement_status(node, before) is not None, 30.0), f"frame {key} never left the refiner"
            node_status.append(refinement_status(node, before))
            if node_status[-1] == "refined":
                assert wait_for(lambda: key in verified, 10.0), f"no verified pose for the refined frame {key}"
        assert wait_for(lambda: len(probe.tf) >= len(from_bag.get("/tf", {})), 5.0)
        assert node_status == bag_status == EXPECTED_STATUS[tolerance]
        from_node = {"/parity_map/posenet/pose": probe.poses, "/parity_map/posenet/pose_with_covariance": probe.poses_cov,
                     "/parity_map/posenet/camera_pose": probe.camera_poses, "/tf": probe.tf, "/parity_map/" + verified_topic: verified}
        from_node = {topic.replace("/parity_map", ""): messages_ for topic, messages_ in from_node.items() if messages_}
        assert set(from_bag) == set(from_node)
        for topic, by_stamp in from_bag.items():
            assert by_stamp == from_node[topic], f"{topic} differs"  # every field of every message exactly
    finally:
        if probe is not None:
            probe.close()
        node.destroy_node()

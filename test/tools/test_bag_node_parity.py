"""relocalize-bag writes what posenet_node publishes: the same images and params file through both, message by message.

The node runs for real (rclpy over Fast DDS, private ROS_DOMAIN_ID) and is fed the
bag's images; the tool reads the bag. Both single-threaded on the torch backend, one
image per forward, so every field agrees exactly, floats included (raw CDR bytes can
differ only in alignment padding, which serialisers leave unset).
"""
import ros_fixtures
from ros_fixtures import Probe, image_msg, make_posenet_node, stamp_key, wait_for

ros_fixtures.isolate_ros_domain()

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from builtin_interfaces.msg import Time  # noqa: E402
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped  # noqa: E402
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from rosbags.rosbag2 import Reader, StoragePlugin, Writer  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402
from tf2_msgs.msg import TFMessage  # noqa: E402

from helpers import untrained_checkpoint  # noqa: E402
from ros2_posenet.preprocess import PreprocessConfig  # noqa: E402
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

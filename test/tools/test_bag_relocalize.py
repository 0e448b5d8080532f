"""relocalize-bag on small sqlite3 and MCAP bags written here with rosbags: conventions, parameters, safe outputs.

That its messages are exactly the node's is checked against the running node in
test_bag_node_parity.py; here the conventions are checked against hand-derived
geometry (REP-103 axes, the extrinsic chain, REP-105 map -> odom).
"""
import csv
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from rosbags.rosbag2 import Reader, StoragePlugin

from bag_helpers import (
    COV, EXTRINSIC, N_FRAMES, TOPIC, TS, base_args, check_camera_body_frame, matrix, odometry_msg, png_msg,
    raw_image_msg, read_topic, stamp_text, stamps, topics, write_bag,
)
from helpers import untrained_checkpoint
from ros2_posenet.frames import extrinsic_matrix
from ros2_posenet.geometry import pose_to_matrix
from ros2_posenet.inference import Relocalizer
from ros2_posenet.preprocess import PreprocessConfig
from ros2_posenet.tools.relocalize_bag import main, parse_args, resolve_parameters


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    return untrained_checkpoint(path, [1.0, -2.0, 0.5], PreprocessConfig(resize=72, crop=64), covariance=COV)


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (60, 80, 3), dtype=np.uint8) for _ in range(N_FRAMES)]


@pytest.fixture(scope="module")
def predictions(checkpoint, frames):
    """The network's optical-frame camera poses (4×4) of each frame, straight from the Relocalizer."""
    reloc = Relocalizer(str(checkpoint), device="cpu", backend="torch")
    return [pose_to_matrix(p.position, p.quaternion) for p in map(reloc.predict, frames)]


# ----------------------------------------------------------------------------- conventions


def test_sqlite3_raw_images_node_topics_frames_csv_and_tum(tmp_path, checkpoint, frames, predictions):
    bag = tmp_path / "in_bag"
    write_bag(bag, StoragePlugin.SQLITE3, "sensor_msgs/msg/Image", [raw_image_msg(i, f) for i, f in enumerate(frames)])
    out, csv_path, tum_path = tmp_path / "out_bag", tmp_path / "poses.csv", tmp_path / "poses.tum"
    rc = main(base_args(bag, out, checkpoint, "--csv", csv_path, "--tum", tum_path, "--batch-size", 2))
    assert rc == 0
    assert list(out.glob("*.db3")), "output storage defaults to the input's (sqlite3)"
    assert topics(out) == {"/posenet/pose", "/posenet/pose_with_covariance", "/posenet/camera_pose", "/tf"}
    poses, covs = read_topic(out, "/posenet/pose"), read_topic(out, "/posenet/pose_with_covariance")
    cameras, tfs = read_topic(out, "/posenet/camera_pose"), read_topic(out, "/tf")
    assert len(poses) == len(covs) == len(cameras) == len(tfs) == N_FRAMES
    for i, T_opt in enumerate(predictions):
        bag_time, sec, nanosec = stamps(i)
        for t, msg in (poses[i], covs[i], cameras[i]):
            assert t == bag_time and (msg.header.stamp.sec, msg.header.stamp.nanosec) == (sec, nanosec)
            assert msg.header.frame_id == "scene_map"  # the checkpoint's map frame
        (transform,) = tfs[i][1].transforms
        assert (transform.header.frame_id, transform.child_frame_id) == ("scene_map", "camera_link")
        # Identity camera_to_base: base = camera body frame, both the optical pose turned into REP-103 axes.
        check_camera_body_frame(matrix(cameras[i][1].pose), T_opt)
        check_camera_body_frame(matrix(poses[i][1].pose), T_opt)
        check_camera_body_frame(matrix(transform.transform), T_opt)
        np.testing.assert_allclose(covs[i][1].pose.covariance.reshape(6, 6), np.diag([0.04, 0.09, 0.01, 1e-3, 2e-3, 3e-3]), atol=1e-12)

    rows = list(csv.DictReader(csv_path.open()))
    tum = [line.split() for line in tum_path.read_text().splitlines() if not line.startswith("#")]
    assert len(rows) == len(tum) == N_FRAMES
    for i, (row, fields, (_, pose)) in enumerate(zip(rows, tum, poses)):
        assert row["timestamp"] == fields[0] == stamp_text(i)
        assert int(row["bag_time_ns"]) == stamps(i)[0]
        assert (row["frame_id"], row["child_frame_id"]) == ("scene_map", "base_link"), "what the pose message says"
        values = [float(row[k]) for k in ("x", "y", "z", "qx", "qy", "qz", "qw")]
        p, o = pose.pose.position, pose.pose.orientation
        assert values == [p.x, p.y, p.z, o.x, o.y, o.z, o.w] == [float(v) for v in fields[1:]]


def test_params_file_and_flags_extrinsic_frames_tf_none(tmp_path, checkpoint, frames, predictions):
    bag = tmp_path / "in_bag"
    write_bag(bag, StoragePlugin.SQLITE3, "sensor_msgs/msg/Image", [raw_image_msg(i, f) for i, f in enumerate(frames)])
    params = tmp_path / "posenet.yaml"
    params.write_text(
        "/**:\n  ros__parameters:\n"
        f"    camera_to_base: {EXTRINSIC}\n    base_frame: base_footprint\n    camera_frame: cam_body\n"
        "    tf_mode: map_to_camera\n    map_frame: world\n    pose_topic: robot/pose\n    log_period: 3.0\n"
    )
    out = tmp_path / "out_bag"
    assert main(base_args(bag, out, checkpoint, "--params-file", params, "--tf-mode", "none", "--publish-camera-to-base-tf")) == 0
    assert topics(out) == {"/robot/pose", "/posenet/pose_with_covariance", "/posenet/camera_pose", "/tf_static"}, "flag wins over the file"
    T_base_camera = extrinsic_matrix(EXTRINSIC)
    ((_, static),) = read_topic(out, "/tf_static")
    (edge,) = static.transforms
    assert (edge.header.frame_id, edge.child_frame_id) == ("base_footprint", "cam_body")
    np.testing.assert_allclose(matrix(edge.transform), T_base_camera, atol=1e-12)
    with Reader(out) as reader:
        (connection,) = [c for c in reader.connections if c.topic == "/tf_static"]
        assert connection.ext.offered_qos_profiles[0].durability.name == "TRANSIENT_LOCAL", "replays latched, like the node's"
    for i, ((_, pose), (_, camera)) in enumerate(zip(read_topic(out, "/robot/pose"), read_topic(out, "/posenet/camera_pose"))):
        assert pose.header.frame_id == camera.header.frame_id == "world"
        check_camera_body_frame(matrix(camera.pose), predictions[i])
        np.testing.assert_allclose(matrix(pose.pose) @ T_base_camera, matrix(camera.pose), atol=1e-6)


def test_map_to_odom_from_recorded_odometry(tmp_path, checkpoint, frames, predictions):
    odom = [pose_to_matrix([0.3 * i, 0.1, 0.0], [math.cos(0.1 * i), 0.0, 0.0, math.sin(0.1 * i)]) for i in range(N_FRAMES)]
    bag = tmp_path / "in_bag"
    extra = {"/odom": ("nav_msgs/msg/Odometry", [(i, odometry_msg(i, T)) for i, T in enumerate(odom)])}
    write_bag(bag, StoragePlugin.MCAP, "sensor_msgs/msg/Image", [raw_image_msg(i, f) for i, f in enumerate(frames)], extra)
    out = tmp_path / "out_bag"
    assert main(base_args(bag, out, checkpoint, "--tf-mode", "map_to_odom", "--transform-tolerance", 0.5)) == 0
    poses, tfs = read_topic(out, "/posenet/pose"), read_topic(out, "/tf")
    assert len(tfs) == N_FRAMES
    for i, ((_, pose), (_, tf)) in enumerate(zip(poses, tfs)):
        (transform,) = tf.transforms
        assert (transform.header.frame_id, transform.child_frame_id) == ("scene_map", "odom")
        _, sec, nanosec = stamps(i)
        post_dated = sec * 10**9 + nanosec + 500_000_000  # stamp + transform_tolerance (frame 0 carries into the next second)
        assert (transform.header.stamp.sec, transform.header.stamp.nanosec) == divmod(post_dated, 10**9)
        np.testing.assert_allclose(matrix(transform.transform) @ odom[i], matrix(pose.pose), atol=1e-6)  # REP-105


def test_mcap_compressed_images_skip_corrupt_frame_named_by_stamp(tmp_path, checkpoint, frames, predictions, capsys, caplog):
    corrupt = 2
    msgs = [png_msg(i, None if i == corrupt else f) for i, f in enumerate(frames)]
    bag = tmp_path / "in_bag"
    write_bag(bag, StoragePlugin.MCAP, "sensor_msgs/msg/CompressedImage", msgs)
    out = tmp_path / "out_bag"
    with caplog.at_level(logging.WARNING, logger="relocalize-bag"):
        rc = main(base_args(bag, out, checkpoint, "--backend", "onnxruntime"))
    assert rc == 0
    assert "skipped 1 (1 undecodable image)" in capsys.readouterr().out
    assert f"skipping image stamped {stamp_text(corrupt)}" in caplog.text
    assert str(stamps(corrupt)[0]) not in caplog.text, "named by its header stamp, not the bag time"
    assert list(out.glob("*.mcap")), "output storage defaults to the input's (mcap)"
    kept = [i for i in range(N_FRAMES) if i != corrupt]
    poses = read_topic(out, "/posenet/pose")
    assert [t for t, _ in poses] == [stamps(i)[0] for i in kept]
    for (_, pose), i in zip(poses, kept):
        check_camera_body_frame(matrix(pose.pose), predictions[i])


def test_shipped_params_file_gives_the_node_parameters_and_flags_win():
    config = Path(__file__).resolve().parents[2] / "config" / "posenet.yaml"
    params = resolve_parameters(parse_args(["bag", "--out", "o", "--params-file", str(config), "--checkpoint", "c.pt", "--base-frame", "base"]))
    assert (params["checkpoint"], params["backend"], params["tf_mode"], params["camera_frame"]) == ("c.pt", "torch", "map_to_camera", "camera_link")
    assert (params["image_topic"], params["pose_topic"], params["base_frame"]) == ("/camera/image_raw", "/posenet/pose", "base")
    np.testing.assert_array_equal(params["mount"].T_base_camera, np.eye(4))


# ----------------------------------------------------------------------------- bad input and outputs


def test_bad_topic_existing_output_and_missing_checkpoint_exit_2(tmp_path, checkpoint, frames, capsys):
    bag = tmp_path / "in_bag"
    write_bag(bag, StoragePlugin.SQLITE3, "sensor_msgs/msg/Image", [raw_image_msg(0, frames[0])])
    base = [str(bag), "--checkpoint", str(checkpoint), "--device", "cpu"]
    assert main(base + ["--topic", "/nope", "--out", str(tmp_path / "o1")]) == 2
    assert f"image topics there: ['{TOPIC}']" in capsys.readouterr().err
    assert main(base + ["--topic", "/chatter", "--out", str(tmp_path / "o2")]) == 2
    assert "std_msgs/msg/String" in capsys.readouterr().err
    assert main(base + ["--topic", TOPIC, "--out", str(bag), "--overwrite"]) == 2
    assert "would replace the input bag" in capsys.readouterr().err
    assert main([str(bag), "--checkpoint", str(tmp_path / "no.pt"), "--topic", TOPIC, "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--checkpoint" in err and "parameter" not in err
    assert main(base + ["--topic", TOPIC, "--out", str(tmp_path / "o4"), "--camera-frame", "/cam"]) == 2
    assert "camera_frame" in capsys.readouterr().err
    assert main(base + ["--topic", TOPIC, "--out", str(tmp_path / "o5"), "--tf-mode", "map_to_odom"]) == 2
    assert "no nav_msgs/Odometry" in capsys.readouterr().err
    assert main(base + ["--topic", TOPIC, "--out", str(tmp_path / "o6"), "--publish-camera-to-base-tf"]) == 2
    assert "two TF parents" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in_bag"], "nothing left behind, not even staging folders"


def test_existing_outputs_refused_all_bad_run_leaves_nothing_then_rerun_works(tmp_path, checkpoint, frames, capsys):
    out, csv_path, tum_path = tmp_path / "out_bag", tmp_path / "poses.csv", tmp_path / "poses.tum"
    bad_bag = tmp_path / "bad_bag"
    truncated_cdr = b"\x00\x01\x00\x00truncated"
    unstamped = png_msg(4, frames[0])
    unstamped.header.stamp = TS.types["builtin_interfaces/msg/Time"](sec=0, nanosec=0)  # the node drops these too
    write_bag(bad_bag, StoragePlugin.SQLITE3, "sensor_msgs/msg/CompressedImage", [png_msg(i, None) for i in range(3)] + [truncated_cdr, unstamped])
    outputs = ["--csv", csv_path, "--tum", tum_path]
    assert main(base_args(bad_bag, out, checkpoint, *outputs)) == 1
    err = capsys.readouterr().err
    assert "no pose was written" in err and "3 undecodable image" in err and "1 unreadable message" in err and "1 zero stamp" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_bag"], "an all-bad run leaves nothing behind"

    good_bag = tmp_path / "good_bag"
    write_bag(good_bag, StoragePlugin.SQLITE3, "sensor_msgs/msg/Image", [raw_image_msg(i, f) for i, f in enumerate(frames)])
    assert main(base_args(good_bag, out, checkpoint, *outputs)) == 0, "the same outputs work on the next run"
    first_csv = csv_path.read_text()
    assert len(first_csv.splitlines()) == N_FRAMES + 1

    for flag, path in (("--csv", csv_path), ("--tum", tum_path)):  # each output alone refuses to overwrite
        args = base_args(good_bag, tmp_path / "other_bag", checkpoint, flag, path)
        assert main(args) == 2
        assert f"{flag} {path} exists already" in capsys.readouterr().err
    assert not (tmp_path / "other_bag").exists() and csv_path.read_text() == first_csv

    assert main(base_args(bad_bag, out, checkpoint, *outputs, "--overwrite")) == 1
    assert csv_path.read_text() == first_csv and len(read_topic(out, "/posenet/pose")) == N_FRAMES, "a failed run keeps old outputs"
    assert main(base_args(good_bag, out, checkpoint, "--csv", csv_path, "--overwrite", "--map-frame", "other")) == 0
    assert list(csv.DictReader(csv_path.open()))[0]["frame_id"] == "other"
    assert read_topic(out, "/posenet/pose")[0][1].header.frame_id == "other"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_bag", "good_bag", "out_bag", "poses.csv", "poses.tum"]

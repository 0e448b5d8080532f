"""relocalize-bag on small sqlite3 and MCAP bags written here from synthetic frames."""
import csv

import cv2
import numpy as np
import pytest
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from helpers import untrained_checkpoint
from ros2_posenet.geometry import xyzw_to_wxyz
from ros2_posenet.inference import Relocalizer
from ros2_posenet.preprocess import PreprocessConfig
from ros2_posenet.tools.relocalize_bag import main

TS = get_typestore(Stores.LATEST)
TOPIC = "/camera/image_raw"
CAMERA_FRAME = "camera_optical_frame"
N_FRAMES = 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    return untrained_checkpoint(path, [1.0, -2.0, 0.5], PreprocessConfig(resize=72, crop=64))


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (60, 80, 3), dtype=np.uint8) for _ in range(N_FRAMES)]


def stamps(i: int) -> tuple[int, int, int]:
    """(bag time ns, header sec, header nanosec): the header lags the receive time by 7 ms."""
    bag_time = 1_700_000_000_000_000_000 + i * 100_000_000
    header = bag_time - 7_000_000
    return bag_time, header // 10**9, header % 10**9


def header(i: int):
    _, sec, nanosec = stamps(i)
    return TS.types["std_msgs/msg/Header"](stamp=TS.types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec), frame_id=CAMERA_FRAME)


def raw_image_msg(i: int, rgb: np.ndarray):
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    h, w = rgb.shape[:2]
    return TS.types["sensor_msgs/msg/Image"](
        header=header(i), height=h, width=w, encoding="bgr8", is_bigendian=0, step=w * 3, data=bgr.reshape(-1)
    )


def png_msg(i: int, rgb: np.ndarray | None):
    """Lossless PNG (decodes to the same pixels); ``None`` gives a corrupt payload."""
    data = np.frombuffer(b"not a png", np.uint8) if rgb is None else cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].reshape(-1)
    return TS.types["sensor_msgs/msg/CompressedImage"](header=header(i), format="png", data=data)


def write_bag(path, storage: StoragePlugin, msgtype: str, messages: list) -> None:
    with Writer(path, version=Writer.VERSION_LATEST, storage_plugin=storage) as writer:
        conn = writer.add_connection(TOPIC, msgtype, typestore=TS)
        writer.add_connection("/chatter", "std_msgs/msg/String", typestore=TS)
        for i, msg in enumerate(messages):
            writer.write(conn, stamps(i)[0], TS.serialize_cdr(msg, msgtype))


def read_topic(path, topic: str) -> list[tuple[int, object]]:
    with Reader(path) as reader:
        conns = [c for c in reader.connections if c.topic == topic]
        return [(t, TS.deserialize_cdr(raw, c.msgtype)) for c, t, raw in reader.messages(connections=conns)]


def expected_poses(checkpoint, frames):
    reloc = Relocalizer(str(checkpoint), device="cpu", backend="torch")
    return [reloc.predict(f) for f in frames]


def check_output_bag(out, indices, expected) -> None:
    poses, tfs = read_topic(out, "/posenet/pose"), read_topic(out, "/tf")
    assert len(poses) == len(tfs) == len(indices)
    for (bag_time, pose), (tf_time, tf), i, pred in zip(poses, tfs, indices, expected):
        _, sec, nanosec = stamps(i)
        assert bag_time == tf_time == stamps(i)[0]
        assert (pose.header.stamp.sec, pose.header.stamp.nanosec) == (sec, nanosec)
        assert pose.header.frame_id == "scene_map"
        (transform,) = tf.transforms
        assert transform.header.frame_id == "scene_map" and transform.child_frame_id == CAMERA_FRAME
        assert (transform.header.stamp.sec, transform.header.stamp.nanosec) == (sec, nanosec)
        p, o = pose.pose.position, pose.pose.orientation
        np.testing.assert_allclose([p.x, p.y, p.z], pred.position, atol=1e-5)
        np.testing.assert_allclose(xyzw_to_wxyz([o.x, o.y, o.z, o.w]), pred.quaternion, atol=1e-5)
        tr = transform.transform
        np.testing.assert_allclose([tr.translation.x, tr.translation.y, tr.translation.z], [p.x, p.y, p.z])
        np.testing.assert_allclose([tr.rotation.x, tr.rotation.y, tr.rotation.z, tr.rotation.w], [o.x, o.y, o.z, o.w])


def test_sqlite3_raw_images_to_bag_csv_and_tum(tmp_path, checkpoint, frames):
    bag = tmp_path / "in_bag"
    write_bag(bag, StoragePlugin.SQLITE3, "sensor_msgs/msg/Image", [raw_image_msg(i, f) for i, f in enumerate(frames)])
    out, csv_path, tum_path = tmp_path / "out_bag", tmp_path / "poses.csv", tmp_path / "poses.tum"
    rc = main([str(bag), "--topic", TOPIC, "--checkpoint", str(checkpoint), "--out", str(out), "--csv", str(csv_path),
               "--tum", str(tum_path), "--backend", "torch", "--device", "cpu", "--batch-size", "2"])
    assert rc == 0
    assert list(out.glob("*.db3")), "output storage defaults to the input's (sqlite3)"
    expected = expected_poses(checkpoint, frames)
    check_output_bag(out, range(N_FRAMES), expected)

    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == N_FRAMES and rows[0]["frame_id"] == CAMERA_FRAME
    tum = [line.split() for line in tum_path.read_text().splitlines() if not line.startswith("#")]
    assert len(tum) == N_FRAMES and all(len(fields) == 8 for fields in tum)
    for i, (row, fields, pred) in enumerate(zip(rows, tum, expected)):
        _, sec, nanosec = stamps(i)
        assert row["timestamp"] == fields[0] == f"{sec}.{nanosec:09d}"
        assert int(row["bag_time_ns"]) == stamps(i)[0]
        xyz_xyzw = np.array([float(row[k]) for k in ("x", "y", "z", "qx", "qy", "qz", "qw")])
        np.testing.assert_allclose(np.array(fields[1:], dtype=float), xyz_xyzw)
        np.testing.assert_allclose(xyz_xyzw[:3], pred.position, atol=1e-5)
        np.testing.assert_allclose(xyzw_to_wxyz(xyz_xyzw[3:]), pred.quaternion, atol=1e-5)


def test_mcap_compressed_images_skip_corrupt_frame(tmp_path, checkpoint, frames, capsys):
    corrupt = 2
    msgs = [png_msg(i, None if i == corrupt else f) for i, f in enumerate(frames)]
    bag = tmp_path / "in_bag"
    write_bag(bag, StoragePlugin.MCAP, "sensor_msgs/msg/CompressedImage", msgs)
    out = tmp_path / "out_bag"
    rc = main([str(bag), "--topic", TOPIC, "--checkpoint", str(checkpoint), "--out", str(out),
               "--backend", "onnxruntime", "--device", "cpu"])
    assert rc == 0
    assert "skipped 1 (1 undecodable image)" in capsys.readouterr().out
    assert list(out.glob("*.mcap")), "output storage defaults to the input's (mcap)"
    kept = [i for i in range(N_FRAMES) if i != corrupt]
    check_output_bag(out, kept, expected_poses(checkpoint, [frames[i] for i in kept]))


def test_bad_topic_existing_output_and_missing_checkpoint_exit_2(tmp_path, checkpoint, frames, capsys):
    bag = tmp_path / "in_bag"
    write_bag(bag, StoragePlugin.SQLITE3, "sensor_msgs/msg/Image", [raw_image_msg(0, frames[0])])
    base = [str(bag), "--checkpoint", str(checkpoint), "--device", "cpu"]
    assert main(base + ["--topic", "/nope", "--out", str(tmp_path / "o1")]) == 2
    assert f"image topics there: ['{TOPIC}']" in capsys.readouterr().err
    assert main(base + ["--topic", "/chatter", "--out", str(tmp_path / "o2")]) == 2
    assert "std_msgs/msg/String" in capsys.readouterr().err
    assert main(base + ["--topic", TOPIC, "--out", str(bag)]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main([str(bag), "--checkpoint", str(tmp_path / "no.pt"), "--topic", TOPIC, "--out", str(tmp_path / "o3")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))

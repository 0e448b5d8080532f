"""posenet-make-dataset: a rosbag2 made from the synthetic scene -> the scene's own poses, images and depth, in 7-Scenes layout.

The bags carry the scene's frames as a robot would record them: images at 10 Hz, CameraInfo,
registered 16UC1 depth, TF ``map -> odom`` (10 Hz) ``-> base_link`` (25 Hz) plus ``/tf_static``
``base_link -> camera_link -> camera_optical_frame``. The odom -> base samples that bracket an
image are the true pose pushed ±5 cm / ±3° apart, so only a correct two-sided lerp + slerp at the
image stamp gives the scene's pose back (nearest sample, one-sided or a wrong stamp are off by cm).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from rosbags.rosbag2 import StoragePlugin, Writer

from bag_helpers import EXTRINSIC, TS
from ros2_posenet.data.seven_scenes import SevenScenes, read_pose_file
from ros2_posenet.data.synthetic import SyntheticSceneConfig, generate_scene
from ros2_posenet.dataset_maker.tf_buffer import PoseSeries, TransformTree
from ros2_posenet.frames import extrinsic_matrix
from ros2_posenet.geometry import body_pose_to_optical, invert_matrix, matrix_to_pose, pose_to_matrix, rotation_angle_deg_np, rpy_to_matrix, wxyz_to_xyzw
from ros2_posenet.tools.make_dataset import main

T0 = 1_700_000_000_000_000_000  # ns
IMAGE_PERIOD = 100_000_000  # 10 Hz
TF_PERIOD = 40_000_000  # 25 Hz: odom -> base_link
MAP_ODOM_PERIOD = 100_000_000  # 10 Hz
IMAGE_OFFSET = 20_000_000  # even images fall midway between two TF samples, odd ones on a sample
T_MAP_ODOM = pose_to_matrix([0.4, -0.3, 0.0], matrix_to_pose(np.block([[rpy_to_matrix(0, 0, 0.3), np.zeros((3, 1))], [np.zeros((1, 3)), 1]]))[1])
T_BASE_OPTICAL = body_pose_to_optical(extrinsic_matrix(EXTRINSIC))
CAMERA = "camera_optical_frame"
SCENE = SyntheticSceneConfig(width=160, height=120, frames_train=24, frames_test=8, train_sequences=1, test_sequences=1,
                             num_points=300, formats=("7scenes",))


# ----------------------------------------------------------------------------- bag writing


def stamp(ns: int):
    return TS.types["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)


def header(ns: int, frame: str):
    return TS.types["std_msgs/msg/Header"](stamp=stamp(ns), frame_id=frame)


def transform(ns: int, parent: str, child: str, T: np.ndarray):
    t, q = matrix_to_pose(T)
    x, y, z, w = (float(v) for v in wxyz_to_xyzw(q))
    m = TS.types
    return m["geometry_msgs/msg/TransformStamped"](
        header=header(ns, parent), child_frame_id=child,
        transform=m["geometry_msgs/msg/Transform"](translation=m["geometry_msgs/msg/Vector3"](*map(float, t)),
                                                   rotation=m["geometry_msgs/msg/Quaternion"](x, y, z, w)))


def pose_msg(T: np.ndarray):
    t, q = matrix_to_pose(T)
    m = TS.types
    return m["geometry_msgs/msg/Pose"](position=m["geometry_msgs/msg/Point"](*map(float, t)),
                                       orientation=m["geometry_msgs/msg/Quaternion"](*map(float, wxyz_to_xyzw(q))))


def image_msg(ns: int, rgb: np.ndarray, frame: str = CAMERA):
    h, w = rgb.shape[:2]
    return TS.types["sensor_msgs/msg/Image"](header=header(ns, frame), height=h, width=w, encoding="rgb8", is_bigendian=0,
                                             step=w * 3, data=np.ascontiguousarray(rgb).reshape(-1))


def depth_msg(ns: int, mm: np.ndarray, frame: str = CAMERA):
    h, w = mm.shape
    return TS.types["sensor_msgs/msg/Image"](header=header(ns, frame), height=h, width=w, encoding="16UC1", is_bigendian=0,
                                             step=w * 2, data=np.ascontiguousarray(mm.astype("<u2")).view(np.uint8).reshape(-1))


def camera_info_msg(ns: int, K: np.ndarray, size, d=(0.0, 0.0, 0.0, 0.0, 0.0)):
    m = TS.types
    return m["sensor_msgs/msg/CameraInfo"](
        header=header(ns, CAMERA), height=size[1], width=size[0], distortion_model="plumb_bob", d=np.asarray(d, float),
        k=np.asarray(K, float).ravel(), r=np.eye(3).ravel(), p=np.zeros(12), binning_x=0, binning_y=0,
        roi=m["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False))


def image_stamps(n: int, start: int = T0) -> list[int]:
    return [start + IMAGE_OFFSET + i * IMAGE_PERIOD for i in range(n)]


def odom_base_samples(poses: list[np.ndarray], stamps: list[int]) -> list[tuple[int, np.ndarray]]:
    """25 Hz odom -> base_link whose two-sided interpolation at each image stamp is the image's true pose."""
    truth = [invert_matrix(T_MAP_ODOM) @ T @ invert_matrix(T_BASE_OPTICAL) for T in poses]
    samples = []
    for ns in range(stamps[0] - IMAGE_OFFSET - TF_PERIOD, stamps[-1] + 2 * TF_PERIOD, TF_PERIOD):
        i = int(np.argmin([abs(ns - s) for s in stamps]))
        T = truth[i].copy()
        offset = ns - stamps[i]
        if offset != 0 and abs(offset) < TF_PERIOD:  # a bracketing sample: push it apart symmetrically
            sign = np.sign(offset)
            T[:3, 3] += sign * np.array([0.05, -0.03, 0.02])
            T[:3, :3] = _turn(T[:3, :3], sign)
        samples.append((ns, T))
    return samples


def _turn(R: np.ndarray, sign: float) -> np.ndarray:
    """R·Exp(±w): the geodesic midpoint of the pair is R itself."""
    w = sign * np.radians(3.0) * np.array([0.3, -0.5, 0.81]) / np.linalg.norm([0.3, -0.5, 0.81])
    return R @ cv2.Rodrigues(w)[0]


def write_scene_bag(path: Path, frames: list[tuple[np.ndarray, np.ndarray, np.ndarray]], K, size, *, start: int = T0,
                    pose_topic: str | None = None, tf: bool = True, drop_tf: tuple[int, int] | None = None,
                    depth: bool = True, storage=StoragePlugin.SQLITE3, camera_info: bool = True,
                    extra=None) -> list[int]:
    """A recording of ``frames`` [(rgb, depth_mm, T_map_optical)]; returns the image stamps.

    ``drop_tf``: (first, last) image indices whose odom -> base samples are left out.
    ``pose_topic``: also (or, with ``tf=False``, instead) the base pose in the map as PoseStamped at 25 Hz.
    """
    stamps = image_stamps(len(frames), start)
    odom = odom_base_samples([T for _, _, T in frames], stamps)
    if drop_tf:
        lo, hi = stamps[drop_tf[0]] - TF_PERIOD, stamps[drop_tf[1]] + TF_PERIOD
        odom = [(ns, T) for ns, T in odom if not lo <= ns <= hi]
    messages = []  # (bag time, topic, msgtype, msg)
    static = [transform(start, "base_link", "camera_link", extrinsic_matrix(EXTRINSIC)),
              transform(start, "camera_link", CAMERA, body_pose_to_optical(np.eye(4)))]
    messages.append((start, "/tf_static", "tf2_msgs/msg/TFMessage", TS.types["tf2_msgs/msg/TFMessage"](transforms=static)))
    if tf:
        for ns in range(start - MAP_ODOM_PERIOD, stamps[-1] + 2 * MAP_ODOM_PERIOD, MAP_ODOM_PERIOD):
            messages.append((ns, "/tf", "tf2_msgs/msg/TFMessage", TS.types["tf2_msgs/msg/TFMessage"](transforms=[transform(ns + 10_000_000, "map", "odom", T_MAP_ODOM)])))
        for ns, T in odom:
            messages.append((ns + 3_000_000, "/tf", "tf2_msgs/msg/TFMessage", TS.types["tf2_msgs/msg/TFMessage"](transforms=[transform(ns, "odom", "base_link", T)])))
    if pose_topic:
        for ns, T in odom:
            msg = TS.types["geometry_msgs/msg/PoseStamped"](header=header(ns, "map"), pose=pose_msg(T_MAP_ODOM @ T))
            messages.append((ns + 3_000_000, pose_topic, "geometry_msgs/msg/PoseStamped", msg))
    for i, ((rgb, mm, _), ns) in enumerate(zip(frames, stamps)):
        messages.append((ns + 5_000_000, "/camera/image_raw", "sensor_msgs/msg/Image", image_msg(ns, rgb)))
        if camera_info:
            messages.append((ns + 5_000_000, "/camera/camera_info", "sensor_msgs/msg/CameraInfo", camera_info_msg(ns, K, size)))
        if depth:
            messages.append((ns + 6_000_000, "/camera/depth/image_raw", "sensor_msgs/msg/Image", depth_msg(ns, mm)))
    messages += extra or []
    with Writer(path, version=Writer.VERSION_LATEST, storage_plugin=storage) as writer:
        connections = {}
        for bag_time, topic, msgtype, msg in sorted(messages, key=lambda m: m[0]):
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, msgtype, typestore=TS)
            writer.write(connections[topic], bag_time, TS.serialize_cdr(msg, msgtype))
    return stamps


def scene_frames(root: Path, folder: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    files = sorted((root / folder).glob("frame-*.color.png"))
    out = []
    for f in files:
        stem = str(f)[: -len(".color.png")]
        rgb = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        mm = cv2.imread(f"{stem}.depth.png", cv2.IMREAD_UNCHANGED)
        out.append((rgb, mm, read_pose_file(Path(f"{stem}.pose.txt"))))
    return out


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("make_dataset") / "scene"
    generate_scene(root, SCENE)
    train, test = scene_frames(root, "seq-01"), scene_frames(root, "seq-02")
    bags = root.parent
    write_scene_bag(bags / "train_bag", train, SCENE.K, (SCENE.width, SCENE.height))
    write_scene_bag(bags / "test_bag", test, SCENE.K, (SCENE.width, SCENE.height), start=T0 + 60 * 10**9)
    return root, train, test


KEEP_ALL = ["--min-interval", "0", "--min-translation", "0", "--min-rotation", "0", "--blur-relative", "0"]


def make(bag, out, *extra, pose_source=f"tf:map:{CAMERA}", topic="/camera/image_raw"):
    return main([str(bag), "--image-topic", topic, "--pose-source", pose_source, "--out", str(out), "--quiet", *map(str, extra)])


def written_frames(out: Path, folder: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return scene_frames(out, folder)


def assert_same_poses(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(got) == len(expected)
    for T, E in zip(got, expected):
        assert np.linalg.norm(T[:3, 3] - E[:3, 3]) <= 1e-4
        assert rotation_angle_deg_np(matrix_to_pose(T)[1], matrix_to_pose(E)[1]) <= 0.01


# ----------------------------------------------------------------------------- poses from TF


def test_tf_bag_gives_the_scene_poses_images_and_depth(scene, tmp_path, capsys):
    root, train, test = scene
    out = tmp_path / "ds"
    assert make(root.parent / "train_bag", out, "--depth-topic", "/camera/depth/image_raw", "--test-bag", root.parent / "test_bag", *KEEP_ALL) == 0
    assert "wrote 24 train + 8 test frames" in capsys.readouterr().out
    assert (out / "TrainSplit.txt").read_text() == "sequence1\n" and (out / "TestSplit.txt").read_text() == "sequence2\n"
    for folder, frames in (("seq-01", train), ("seq-02", test)):
        got = written_frames(out, folder)
        assert_same_poses([T for _, _, T in got], [T for _, _, T in frames])
        for (rgb, mm, _), (rgb_e, mm_e, _) in zip(got, frames):
            np.testing.assert_array_equal(rgb, rgb_e)  # PNG colour, lossless
            np.testing.assert_array_equal(mm, np.where(mm_e == 65535, 0, mm_e))  # mm, 0 = invalid
    meta = yaml.safe_load((out / "dataset.yaml").read_text())
    assert meta["depth"]["registered"] is True and meta["frames"] == {"train": 24, "test": 8}
    assert meta["recordings"][0]["poses"]["map_frame"] == "map" and meta["tolerances_s"]["tf"] == 0.1
    # The loader reads it as a 7-Scenes scene, with the CameraInfo intrinsics.
    ds = SevenScenes(out, "test", max_points=0)
    assert len(ds) == 8 and np.allclose(ds.intrinsics(0), SCENE.K)
    assert not list(tmp_path.glob(".ds.*"))  # the staging folder is gone


def test_time_block_split_never_interleaves(scene, tmp_path):
    root, train, _ = scene
    out = tmp_path / "ds"
    assert make(root.parent / "train_bag", out, "--block-seconds", "0.6", "--test-fraction", "0.25", "--gap-seconds", "0.15", *KEEP_ALL) == 0
    meta = yaml.safe_load((out / "dataset.yaml").read_text())
    train_seqs, test_seqs = meta["sequences"]["train"], meta["sequences"]["test"]
    assert test_seqs and len(train_seqs) >= 2
    lengths = {s: len(list((out / s).glob("*.pose.txt"))) for s in train_seqs + test_seqs}
    assert all(n >= 3 for n in lengths.values())  # whole blocks, not single frames
    assert meta["frames"]["train"] + meta["frames"]["test"] + meta["skipped"]["within --gap-seconds of a train/test boundary"] == len(train)


def test_tf_gap_frames_are_skipped_and_counted(scene, tmp_path, capsys):
    root, train, _ = scene
    bag = tmp_path / "gap_bag"
    write_scene_bag(bag, train, SCENE.K, (SCENE.width, SCENE.height), drop_tf=(8, 11), depth=False)
    out = tmp_path / "ds"
    assert make(bag, out, "--test-fraction", "0", *KEEP_ALL) == 0
    assert "4 no pose within the tolerance on both sides" in capsys.readouterr().out
    expected = [T for i, (_, _, T) in enumerate(train) if not 8 <= i <= 11]
    assert_same_poses([T for _, _, T in written_frames(out, "seq-01")], expected)


def test_pose_topic_with_extrinsic_from_tf_static_or_given(scene, tmp_path):
    root, train, _ = scene
    bag = tmp_path / "pose_bag"
    write_scene_bag(bag, train, SCENE.K, (SCENE.width, SCENE.height), pose_topic="/slam/pose", tf=False, depth=False)
    expected = [T for _, _, T in train]
    assert make(bag, tmp_path / "a", "--test-fraction", "0", *KEEP_ALL, pose_source="topic:/slam/pose") == 0
    assert_same_poses([T for _, _, T in written_frames(tmp_path / "a", "seq-01")], expected)
    assert make(bag, tmp_path / "b", "--test-fraction", "0", "--camera-to-base", *EXTRINSIC, *KEEP_ALL, pose_source="topic:/slam/pose") == 0
    assert_same_poses([T for _, _, T in written_frames(tmp_path / "b", "seq-01")], expected)
    meta = yaml.safe_load((tmp_path / "a" / "dataset.yaml").read_text())
    assert meta["recordings"][0]["poses"]["camera_extrinsic"] == "/tf_static"


def test_near_duplicates_blur_and_cap(scene, tmp_path, capsys):
    root, train, _ = scene
    bag = tmp_path / "blur_bag"
    frames = [(cv2.GaussianBlur(rgb, (0, 0), 3.0) if i in (5, 9) else rgb, mm, T) for i, (rgb, mm, T) in enumerate(train)]
    frames[13] = frames[12]  # the robot stood still
    write_scene_bag(bag, frames, SCENE.K, (SCENE.width, SCENE.height), depth=False)
    out = tmp_path / "ds"
    assert make(bag, out, "--test-fraction", "0", "--min-interval", "0", "--min-rotation", "0.5", "--min-translation", "0.01",
                "--blur-relative", "0.4", "--max-frames", "15") == 0
    printed = capsys.readouterr().out
    assert "2 blurred" in printed and "1 near-duplicate (pose)" in printed and "6 over --max-frames" in printed
    assert len(list((out / "seq-01").glob("*.pose.txt"))) == 15


# ----------------------------------------------------------------------------- bad input


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error:" in err and "no output was created" in err
    return err


def test_bad_inputs_are_one_line_errors_and_write_nothing(scene, tmp_path, capsys):
    root, train, _ = scene
    bag = root.parent / "train_bag"
    out = tmp_path / "ds"
    assert make(bag, out, topic="/camera/missing") == 2
    assert "'/camera/missing' is not in the bag" in _error(capsys)
    assert make(bag, out, topic="/tf") == 2
    assert "expected sensor_msgs/msg/Image" in _error(capsys)
    assert make(bag, out, pose_source="tf:world:" + CAMERA) == 2
    assert "frame 'world' is in no transform" in _error(capsys)
    assert make(bag, out, pose_source="topic:/slam/pose") == 2
    assert "'/slam/pose' is not in the bag" in _error(capsys)
    assert make(bag, out, pose_source="gps") == 2
    assert "--pose-source 'gps'" in _error(capsys)
    assert make(tmp_path / "nothing", out) == 2
    assert "does not exist" in _error(capsys)
    assert not out.exists() and not list(tmp_path.glob(".ds.*"))


def test_no_camera_info_unconnected_tf_corrupt_bag(scene, tmp_path, capsys):
    root, train, _ = scene
    few = train[:6]
    no_info = tmp_path / "no_info"
    write_scene_bag(no_info, few, SCENE.K, (SCENE.width, SCENE.height), camera_info=False, depth=False)
    assert make(no_info, tmp_path / "ds") == 2
    assert "camera_info" in _error(capsys)
    unconnected = tmp_path / "unconnected"
    island = TS.types["tf2_msgs/msg/TFMessage"](transforms=[transform(T0, "gps_origin", "gps", np.eye(4))])
    write_scene_bag(unconnected, few, SCENE.K, (SCENE.width, SCENE.height), depth=False, extra=[(T0, "/tf_static", "tf2_msgs/msg/TFMessage", island)])
    assert make(unconnected, tmp_path / "ds", pose_source="tf:gps_origin:" + CAMERA) == 2
    assert "never connects" in _error(capsys)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "metadata.yaml").write_text("rosbag2_bagfile_information: {version: 9, storage_identifier: sqlite3")
    assert make(corrupt, tmp_path / "ds") == 2
    _error(capsys)
    truncated = tmp_path / "truncated"
    write_scene_bag(truncated, few, SCENE.K, (SCENE.width, SCENE.height), depth=False)
    (db,) = truncated.glob("*.db3")
    db.write_bytes(db.read_bytes()[:3000])
    assert make(truncated, tmp_path / "ds") == 2
    _error(capsys)
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.*"))


def test_stamps_out_of_order_are_counted(scene, tmp_path, capsys):
    root, train, _ = scene
    bag = tmp_path / "disorder"
    stamps = image_stamps(len(train))
    extra = [(stamps[10] + 7_000_000, "/camera/image_raw", "sensor_msgs/msg/Image", image_msg(stamps[3], train[3][0]))]
    write_scene_bag(bag, train, SCENE.K, (SCENE.width, SCENE.height), depth=False, extra=extra)
    assert make(bag, tmp_path / "ds", "--test-fraction", "0", *KEEP_ALL) == 0
    assert "1 stamp out of order" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the TF buffer on its own


def test_pose_series_needs_samples_on_both_sides():
    series = PoseSeries()
    series.add(200, pose_to_matrix([2.0, 0, 0], [1, 0, 0, 0]))
    series.add(100, pose_to_matrix([1.0, 0, 0], [1, 0, 0, 0]))
    assert series.at(150, 50)[0, 3] == pytest.approx(1.5)
    assert series.at(100, 0)[0, 3] == 1.0  # an exact sample needs no neighbour
    assert series.at(130, 50) is None  # the later sample is 70 ns away
    assert series.at(250, 1000) is None  # never extrapolated


def test_transform_tree_composes_static_and_dynamic_edges():
    tree = TransformTree()
    tree.add("map", "odom", 0, pose_to_matrix([1.0, 0, 0], [1, 0, 0, 0]), static=True)
    tree.add("odom", "base", 10, pose_to_matrix([0, 1.0, 0], [1, 0, 0, 0]), static=False)
    tree.add("odom", "base", 20, pose_to_matrix([0, 3.0, 0], [1, 0, 0, 0]), static=False)
    tree.add("base", "cam", 0, pose_to_matrix([0, 0, 1.0], [1, 0, 0, 0]), static=True)
    np.testing.assert_allclose(tree.lookup("map", "cam", 15, 5)[:3, 3], [1.0, 2.0, 1.0])
    np.testing.assert_allclose(tree.lookup("cam", "map", 15, 5)[:3, 3], [-1.0, -2.0, -1.0])
    assert tree.lookup("map", "cam", 15, 4) is None


# ----------------------------------------------------------------------------- poses from SfM


def test_sfm_poses_after_alignment_match_the_scene(tmp_path, capsys):
    """A quarter of a loop (30 frames of 120, 320x240): pycolmap with the CameraInfo fixed, aligned to the bag's TF."""
    config = SyntheticSceneConfig(width=320, height=240, frames_train=120, frames_test=1, train_sequences=1, test_sequences=1,
                                  num_points=0, formats=("7scenes",))
    generate_scene(tmp_path / "scene", config)
    frames = scene_frames(tmp_path / "scene", "seq-01")[:30]
    bag = tmp_path / "bag"
    stamps = write_scene_bag(bag, frames, config.K, (config.width, config.height), depth=False)
    out = tmp_path / "ds"
    assert make(bag, out, "--align-to", f"tf:map:{CAMERA}", "--test-fraction", "0", *KEEP_ALL, pose_source="sfm") == 0
    meta = yaml.safe_load((out / "dataset.yaml").read_text())
    registered = meta["sfm"]["registered"]
    assert registered >= 12 and meta["skipped"].get("not registered by SfM", 0) == 30 - registered
    rows = (out / "frames.csv").read_text().splitlines()[1:]
    truth = {f"{s // 10**9}.{s % 10**9:09d}": T for s, (_, _, T) in zip(stamps, frames)}
    got = [(row.split(",")[2], read_pose_file(out / row.split(",")[0] / f"{row.split(',')[1]}.pose.txt")) for row in rows]
    position = [np.linalg.norm(T[:3, 3] - truth[s][:3, 3]) for s, T in got]
    rotation = [rotation_angle_deg_np(matrix_to_pose(T)[1], matrix_to_pose(truth[s])[1]) for s, T in got]
    assert np.median(position) <= 0.02 and np.median(rotation) <= 0.5
    assert meta["sfm"]["alignment"]["residual_rms_m"] < 0.02 and meta["sfm"]["seed"] == 0
    # The same frames and seed give the same poses (COLMAP seeds its two-view RANSAC anew every run unless told:
    # these 30 frames registered 14-16 with 5-46 mm alignment residuals from run to run).
    assert make(bag, tmp_path / "again", "--align-to", f"tf:map:{CAMERA}", "--test-fraction", "0", *KEEP_ALL, pose_source="sfm") == 0
    again = (tmp_path / "again" / "frames.csv").read_text().splitlines()[1:]
    assert again == rows  # the same frames registered
    for row in rows:  # the same poses, to the last digits (threads sum in another order)
        seq, frame = row.split(",")[:2]
        np.testing.assert_allclose(read_pose_file(out / seq / f"{frame}.pose.txt"),
                                   read_pose_file(tmp_path / "again" / seq / f"{frame}.pose.txt"), atol=1e-3)
    # Poses that do not fit the reference are refused, not written.
    assert make(bag, tmp_path / "strict", "--align-to", f"tf:map:{CAMERA}", "--test-fraction", "0", "--max-alignment-residual", "1e-6",
                *KEEP_ALL, pose_source="sfm") == 2
    assert "alignment residual RMS" in capsys.readouterr().err and not (tmp_path / "strict").exists()


def test_both_mappers_keep_the_intrinsics_fixed():
    """Free intrinsics absorb pose errors; pycolmap 4 moved the global mapper's switches (once silently ignored)."""
    import pycolmap
    from ros2_posenet.dataset_maker.sfm import _global_options, _incremental_options

    incremental, global_options = _incremental_options(pycolmap, 7), _global_options(pycolmap, 7)
    bundle_adjustment = global_options.mapper.bundle_adjustment
    assert not (incremental.ba_refine_focal_length or incremental.ba_refine_principal_point or incremental.ba_refine_extra_params)
    assert not (bundle_adjustment.refine_focal_length or bundle_adjustment.refine_principal_point or bundle_adjustment.refine_extra_params)
    assert incremental.random_seed == global_options.random_seed == 7  # --sfm-seed reaches both mappers


def test_sfm_needs_frames_and_a_scale(scene, tmp_path, capsys):
    root, train, _ = scene
    bag = tmp_path / "few"
    write_scene_bag(bag, train[:3], SCENE.K, (SCENE.width, SCENE.height), depth=False)
    assert make(bag, tmp_path / "ds", *KEEP_ALL, "--test-fraction", "0", pose_source="sfm") == 2
    assert "SfM poses need metric scale" in _error(capsys)  # no odometry or pose topic in this bag, no --known-distance
    assert make(bag, tmp_path / "ds", *KEEP_ALL, "--test-fraction", "0", "--align-to", f"tf:map:{CAMERA}", pose_source="sfm") == 2
    assert "too few frames for SfM: 3 selected" in _error(capsys)
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.*"))
    with pytest.raises(SystemExit) as exit_info:
        make(bag, tmp_path / "ds", *KEEP_ALL, "--sfm-seed", "-1", pose_source="sfm")
    assert exit_info.value.code == 2 and "--sfm-seed must be >= 0, got -1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the dataset serves like the scene


def refined_errors(root: Path, map_path: Path) -> list[tuple[str, float, float]]:
    """(status, position error, rotation error) of each test frame refined from a prior 0.3 m / 5° off."""
    from ros2_posenet.geometric.refiner import Refiner, perturb_pose
    from ros2_posenet.geometric.scene_map import SceneMap

    refiner = Refiner(SceneMap.load(map_path))
    ds = SevenScenes(root, "test", max_points=0)
    rng = np.random.default_rng(0)
    out = []
    for i in range(len(ds)):
        T = ds.pose_matrix(i)
        result = refiner.refine(ds.load_image(i), ds.intrinsics(i), perturb_pose(T, 0.3, 5.0, rng))
        out.append((result.status, float(np.linalg.norm(result.position - T[:3, 3])),
                    rotation_angle_deg_np(result.quaternion, matrix_to_pose(T)[1])))
    return out


def test_build_map_and_refinement_on_the_dataset_match_the_scene(scene, tmp_path):
    from ros2_posenet.tools.build_map import main as build_map

    root, _, _ = scene
    out = tmp_path / "ds"
    assert make(root.parent / "train_bag", out, "--depth-topic", "/camera/depth/image_raw", "--test-bag", root.parent / "test_bag", *KEEP_ALL) == 0
    figures = []
    for name, folder in (("scene", root), ("dataset", out)):
        assert build_map(["--dataset", "7scenes", "--root", str(folder), "--out", str(tmp_path / f"{name}.npz"), "--calibrate", "0", "--quiet"]) == 0
        figures.append(refined_errors(folder, tmp_path / f"{name}.npz"))
    scene_figures, dataset_figures = figures
    assert [s for s, _, _ in dataset_figures] == [s for s, _, _ in scene_figures]
    assert any(s == "refined" for s, _, _ in scene_figures)
    np.testing.assert_allclose([e[1:] for e in dataset_figures], [e[1:] for e in scene_figures], atol=1e-4)


def test_known_distance_gives_metric_scale_and_gravity():
    """--known-distance: SfM poses in an arbitrary frame and scale are brought to metres with z up.

    The truth is a level camera walking a loop (optical y = world down); the 'SfM' poses are the truth under a
    random similarity (scale 0.37). After ``similarity_from_distance`` with the true distance between two frames,
    every distance between camera centres is metric and the cameras' mean down axis is world −z.
    Catches: the scale inverted (distance / metres) or gravity taken from the optical z (forward) axis.
    """
    from ros2_posenet.dataset_maker.sfm import similarity_from_distance

    rng = np.random.default_rng(3)
    truth = [body_pose_to_optical(pose_to_matrix([2.0 * np.cos(a), 2.0 * np.sin(a), 1.2], wxyz_from_yaw(a + np.pi / 2)))
             for a in np.linspace(0, 1.5 * np.pi, 12)]
    R = cv2.Rodrigues(rng.normal(size=3))[0]
    to_sfm = np.eye(4)
    to_sfm[:3, :3], to_sfm[:3, 3] = 0.37 * R, rng.normal(size=3)
    sfm = []
    for T in truth:
        S = np.eye(4)
        S[:3, :3], S[:3, 3] = R @ T[:3, :3], to_sfm[:3, :3] @ T[:3, 3] + to_sfm[:3, 3]
        sfm.append(S)
    a, b = 0, 7
    similarity = similarity_from_distance(sfm, a, b, float(np.linalg.norm(truth[a][:3, 3] - truth[b][:3, 3])))
    aligned = [similarity.apply_to_pose(T) for T in sfm]
    true_d = np.linalg.norm(np.array([T[:3, 3] for T in truth])[:, None] - np.array([T[:3, 3] for T in truth])[None], axis=2)
    got_d = np.linalg.norm(np.array([T[:3, 3] for T in aligned])[:, None] - np.array([T[:3, 3] for T in aligned])[None], axis=2)
    np.testing.assert_allclose(got_d, true_d, atol=1e-9)
    down = np.mean([T[:3, 1] for T in aligned], axis=0)
    np.testing.assert_allclose(down / np.linalg.norm(down), [0.0, 0.0, -1.0], atol=1e-9)


def wxyz_from_yaw(yaw: float) -> np.ndarray:
    return np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])


# ----------------------------------------------------------------------------- compressedDepth


def test_compressed_depth_gives_the_scene_depth(scene, tmp_path):
    """compressed_depth_image_transport's 16UC1 png (the millimetres) and 32FC1 png (quantised inverse depth) read back.

    16UC1 is lossless; 32FC1 loses at most the quantisation step d² / quant_a (0.9 mm at 3 m) plus the mm rounding.
    """
    from bag_helpers import compressed_depth_msg

    _, train, _ = scene
    frames, topic = train[:6], "/camera/depth/image_raw/compressedDepth"
    for encoding in ("16UC1", "32FC1"):
        extra = []
        for (_, mm, _), ns in zip(frames, image_stamps(len(frames))):
            depth = mm if encoding == "16UC1" else np.where(mm == 65535, np.nan, mm / 1000.0)
            extra.append((ns + 6_000_000, topic, "sensor_msgs/msg/CompressedImage", compressed_depth_msg(header(ns, CAMERA), depth, encoding)))
        bag = tmp_path / f"bag_{encoding}"
        write_scene_bag(bag, frames, SCENE.K, (SCENE.width, SCENE.height), depth=False, extra=extra)
        out = tmp_path / f"ds_{encoding}"
        assert make(bag, out, "--depth-topic", topic, "--test-fraction", "0", *KEEP_ALL) == 0
        assert yaml.safe_load((out / "dataset.yaml").read_text())["depth"]["registered"] is True
        got = written_frames(out, "seq-01")
        assert len(got) == len(frames)
        for (_, mm, _), (_, mm_e, _) in zip(got, frames):
            expected = np.where(mm_e == 65535, 0, mm_e).astype(np.int64)
            if encoding == "16UC1":
                np.testing.assert_array_equal(mm, expected)
                continue
            valid = (expected > 0) & (expected < 10_000)  # the plugin's depth_max: 10 m
            np.testing.assert_array_equal(mm > 0, valid)
            metres = expected[valid] / 1000.0
            assert np.all(np.abs(mm[valid].astype(np.int64) - expected[valid]) <= 1000.0 * metres ** 2 / (100.0 * 101.0) + 1.0)


def test_compressed_depth_that_cannot_be_read_is_refused():
    from bag_helpers import compressed_depth_msg
    from ros2_posenet.dataset_maker.bag_source import depth_to_millimetres
    from ros2_posenet.ros.image import ImageConversionError

    msg = compressed_depth_msg(header(T0, CAMERA), np.full((4, 5), 1500, np.uint16))
    np.testing.assert_array_equal(depth_to_millimetres(msg), np.full((4, 5), 1500))
    for fmt, data, text in (("16UC1; compressedDepth rvl", msg.data, "only compressedDepth png"),
                            ("16UC1; compressedDepth png", msg.data[:12], "no room"),
                            ("16UC1; compressedDepth png", msg.data[12:], "not a 16-bit one-channel PNG"),  # header missing
                            ("bgr8; compressedDepth png", msg.data, "encoding 'bgr8'")):
        bad = TS.types["sensor_msgs/msg/CompressedImage"](header=msg.header, format=fmt, data=data)
        with pytest.raises(ImageConversionError, match=text):
            depth_to_millimetres(bad)


# ----------------------------------------------------------------------------- an image folder or a video


VIDEO_SCENE = SyntheticSceneConfig(width=320, height=240, frames_train=120, frames_test=1, train_sequences=1, test_sequences=1,
                                   num_points=0, formats=("7scenes",))


@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    """30 frames (a quarter loop, 3° apart) of a scene with enough texture for SfM; their poses."""
    root = tmp_path_factory.mktemp("walk") / "scene"
    generate_scene(root, VIDEO_SCENE)
    return scene_frames(root, "seq-01")[17:47]


def calibration_yaml(path: Path, K: np.ndarray, size, d=(0.0, 0.0, 0.0, 0.0, 0.0), **changes) -> Path:
    """A calibration file as camera_calibration / camera_info_manager write it."""
    data = {"image_width": size[0], "image_height": size[1], "camera_name": "front",
            "camera_matrix": {"rows": 3, "cols": 3, "data": [float(v) for v in np.ravel(K)]},
            "distortion_model": "plumb_bob", "distortion_coefficients": {"rows": 1, "cols": len(d), "data": list(d)},
            "rectification_matrix": {"rows": 3, "cols": 3, "data": np.eye(3).ravel().tolist()},
            "projection_matrix": {"rows": 3, "cols": 4, "data": np.hstack([K, np.zeros((3, 1))]).ravel().tolist()}}
    data.update(changes)
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}))
    return path


def write_folder(folder: Path, frames) -> Path:
    folder.mkdir()
    for i, (rgb, _, _) in enumerate(frames):
        cv2.imwrite(str(folder / f"img_{i:04d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    (folder / "notes.txt").write_text("not an image")
    return folder


def known_distance(frames, a: int, b: int, fps: float = 10.0) -> list[str]:
    return ["--known-distance", str(a / fps), str(b / fps), str(np.linalg.norm(frames[a][2][:3, 3] - frames[b][2][:3, 3]))]


def assert_sfm_poses_match(out: Path, frames, fps: float = 10.0) -> dict:
    """The written poses equal the truth up to a rigid motion: scale within 2 % (metric), median 2 cm / 0.5°."""
    from ros2_posenet.dataset_maker.sfm import similarity_with_rotations

    meta = yaml.safe_load((out / "dataset.yaml").read_text())
    rows = [row.split(",") for row in (out / "frames.csv").read_text().splitlines()[1:]]
    assert len(rows) == meta["sfm"]["registered"] >= 25
    got = np.array([read_pose_file(out / seq / f"{frame}.pose.txt") for seq, frame, _ in rows])
    truth = np.array([frames[round(float(stamp) * fps)][2] for _, _, stamp in rows])
    similarity, _ = similarity_with_rotations(got, truth)
    assert abs(similarity.scale - 1.0) < 0.02
    aligned = [similarity.apply_to_pose(T) for T in got]
    position = [np.linalg.norm(T[:3, 3] - E[:3, 3]) for T, E in zip(aligned, truth)]
    rotation = [rotation_angle_deg_np(matrix_to_pose(T)[1], matrix_to_pose(E)[1]) for T, E in zip(aligned, truth)]
    assert np.median(position) <= 0.02 and np.median(rotation) <= 0.5
    return meta


def make_plain(flag: str, path: Path, out: Path, *extra) -> int:
    return main([flag, str(path), "--out", str(out), "--test-fraction", "0", "--quiet", *KEEP_ALL, *map(str, extra)])


def test_image_folder_gives_sfm_poses_that_match_the_scene(walk, tmp_path):
    folder = write_folder(tmp_path / "photos", walk)
    calibration = calibration_yaml(tmp_path / "front.yaml", VIDEO_SCENE.K, (VIDEO_SCENE.width, VIDEO_SCENE.height))
    out = tmp_path / "ds"
    assert make_plain("--images", folder, out, "--camera-info", calibration, *known_distance(walk, 0, 29)) == 0
    meta = assert_sfm_poses_match(out, walk)
    source = meta["recordings"][0]
    assert source["images"] == str(folder.resolve()) and source["files"] == 30 and source["calibration"] == str(calibration.resolve())
    assert meta["sfm"]["alignment"]["method"].startswith("known distance")
    assert np.allclose(SevenScenes(out, "train", max_points=0).intrinsics(0), VIDEO_SCENE.K)


def test_video_gives_sfm_poses_that_match_the_scene(walk, tmp_path):
    video = tmp_path / "walk.avi"  # FFV1: lossless, so the poses measure the route, not the codec
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 10.0, (VIDEO_SCENE.width, VIDEO_SCENE.height))
    for rgb, _, _ in walk:
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    K, out = VIDEO_SCENE.K, tmp_path / "ds"
    assert make_plain("--video", video, out, "--intrinsics", K[0, 0], K[1, 1], K[0, 2], K[1, 2], *known_distance(walk, 0, 29)) == 0
    meta = assert_sfm_poses_match(out, walk)
    assert meta["recordings"][0]["stamps"] == "the frame times in the file" and meta["recordings"][0]["fps"] == 10.0


def test_calibration_yaml_is_read_as_camera_info():
    from ros2_posenet.dataset_maker.image_source import read_calibration_yaml

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        d = (-0.28, 0.07, 1e-4, -2e-4, 0.0)
        intrinsics = read_calibration_yaml(calibration_yaml(Path(tmp) / "c.yaml", SCENE.K, (640, 480), d))
    np.testing.assert_allclose(intrinsics.K, SCENE.K)
    np.testing.assert_allclose(intrinsics.distortion, d)
    assert (intrinsics.width, intrinsics.height) == (640, 480)


def test_bad_plain_inputs_are_one_line_errors_and_write_nothing(walk, tmp_path, capsys):
    K, size = VIDEO_SCENE.K, (VIDEO_SCENE.width, VIDEO_SCENE.height)
    good = calibration_yaml(tmp_path / "good.yaml", K, size)
    out = tmp_path / "ds"
    scale = known_distance(walk, 0, 5)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    mixed = write_folder(tmp_path / "mixed", walk[:6])
    cv2.imwrite(str(mixed / "img_0003.png"), np.zeros((120, 160, 3), np.uint8))
    not_video = tmp_path / "clip.mp4"
    not_video.write_text("this is not a video")
    cases = [(("--images", tmp_path / "missing", "--camera-info", good), "is not a folder"),
             (("--images", empty, "--camera-info", good), "holds no image file"),
             (("--video", tmp_path / "none.mp4", "--camera-info", good), "does not exist"),
             (("--video", not_video, "--camera-info", good), "OpenCV cannot"),
             (("--images", mixed, "--camera-info", good), "img_0003.png is 160x120, the first image 320x240"),
             (("--images", mixed, "--camera-info", tmp_path / "nowhere.yaml"), "No such file"),
             (("--images", mixed, "--camera-info", calibration_yaml(tmp_path / "a.yaml", K, size, camera_matrix=None)), "missing camera_matrix"),
             (("--images", mixed, "--camera-info", calibration_yaml(tmp_path / "b.yaml", K, size, camera_matrix={"rows": 3, "cols": 3, "data": [1.0] * 8})),
              "camera_matrix has 8 values"),
             (("--images", mixed, "--camera-info", calibration_yaml(tmp_path / "c.yaml", K, size, d=(0.1, 0.0, 0.0))), "3 distortion coefficients"),
             (("--images", mixed, "--camera-info", calibration_yaml(tmp_path / "d.yaml", K * 0, size)), "no valid camera matrix")]
    (tmp_path / "e.yaml").write_text("image_width: [640\n")
    cases.append((("--images", mixed, "--camera-info", tmp_path / "e.yaml"), "is not YAML"))
    for (flag, path, *extra), text in cases:
        assert make_plain(flag, path, out, *extra, *scale) == 2, text
        assert text in _error(capsys)
    for extra, text in ((("--camera-info", good, "--pose-source", f"tf:map:{CAMERA}", *scale), "--pose-source must be sfm"),
                        (scale, "needs the camera's calibration"),
                        (("--camera-info", good), "needs metric scale"),
                        (("--camera-info", good, "--depth-topic", "/depth", *scale), "--depth-topic is for bags")):
        with pytest.raises(SystemExit) as exit_info:
            make_plain("--images", mixed, out, *extra)
        assert exit_info.value.code == 2 and text in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".ds.*"))

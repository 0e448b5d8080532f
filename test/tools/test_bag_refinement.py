"""relocalize-bag --map: the bag's CameraInfo + a scene map refine the regressor's poses, as the node does."""
import csv

import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin

from bag_helpers import TS, base_args, header, raw_image_msg, write_bag
from helpers import ROOM_K, room_pose
from ros2_posenet.tools.relocalize_bag import main
from ros_fixtures import room_files
TRUE_POSES = [room_pose(-2.6, 0.5, 1.3, 8.0), room_pose(-2.3, 0.4, 1.3, -10.0)]


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    files = room_files(tmp_path_factory)  # the room, its map, an untrained regressor with a broad prior
    images = [files.scene.render(T, ROOM_K, 320, 240)[0] for T in TRUE_POSES]
    return files.map_file, files.checkpoint, images


def camera_info_msg(i: int, d=np.zeros(5)):
    return TS.types["sensor_msgs/msg/CameraInfo"](
        header=header(i), height=240, width=320, distortion_model="plumb_bob", d=np.asarray(d, dtype=float), k=ROOM_K.ravel(),
        r=np.eye(3).ravel(), p=np.zeros(12), binning_x=0, binning_y=0,
        roi=TS.types["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0, do_rectify=False),
    )


def test_map_refines_every_frame_to_the_true_pose(tmp_path, room):
    map_file, checkpoint, images = room
    bag = tmp_path / "in_bag"
    infos = {"/camera/camera_info": ("sensor_msgs/msg/CameraInfo", [(i, camera_info_msg(i)) for i in range(len(images))])}
    write_bag(bag, StoragePlugin.SQLITE3, "sensor_msgs/msg/Image", [raw_image_msg(i, rgb) for i, rgb in enumerate(images)], infos)
    csv_path = tmp_path / "poses.csv"
    assert main(base_args(bag, tmp_path / "out", checkpoint, "--map", map_file, "--csv", csv_path)) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == len(TRUE_POSES)
    for row, T_true in zip(rows, TRUE_POSES):  # identity camera_to_base: the base sits at the camera centre
        assert np.linalg.norm([float(row[k]) for k in "xyz"] - T_true[:3, 3]) < 0.05


def test_map_without_camera_info_in_the_bag_is_refused_with_the_reason(tmp_path, room, capsys):
    map_file, checkpoint, images = room
    bag = tmp_path / "in_bag"
    write_bag(bag, StoragePlugin.SQLITE3, "sensor_msgs/msg/Image", [raw_image_msg(0, images[0])])
    out = tmp_path / "out"
    assert main(base_args(bag, out, checkpoint, "--map", map_file)) == 2
    assert "/camera/camera_info" in capsys.readouterr().err and not out.exists()
    assert main(base_args(bag, out, checkpoint, "--map", tmp_path / "missing.npz")) == 2
    assert not out.exists()


def test_camera_info_reaches_frames_in_bag_order_and_a_bad_one_is_counted(tmp_path, room, capsys):
    """A CameraInfo with 3 distortion coefficients is ignored and counted; the frame before the first good
    CameraInfo has none (the regressor's pose), the frame after it refines.

    Catches: loading the bag's CameraInfo up front (frame 0 would refine with the CameraInfo recorded
    after it) and dropping the distortion-length check (an OpenCV assertion in the refinement).
    """
    map_file, checkpoint, images = room
    bag = tmp_path / "in_bag"
    infos = {"/camera/camera_info": ("sensor_msgs/msg/CameraInfo", [(0, camera_info_msg(0, d=[-0.2, 0.05, 0.001])), (1, camera_info_msg(1))])}
    write_bag(bag, StoragePlugin.SQLITE3, "sensor_msgs/msg/Image", [raw_image_msg(i, rgb) for i, rgb in enumerate(images)], infos)
    csv_path = tmp_path / "poses.csv"
    assert main(base_args(bag, tmp_path / "out", checkpoint, "--map", map_file, "--csv", csv_path)) == 0
    out = capsys.readouterr().out
    assert "1 bad CameraInfo (ignored)" in out and "1 refinement no_camera_info" in out and "1 refinement refined" in out
    rows = list(csv.DictReader(csv_path.open()))
    errors = [np.linalg.norm([float(row[k]) for k in "xyz"] - T[:3, 3]) for row, T in zip(rows, TRUE_POSES)]
    assert errors[0] > 0.1 and errors[1] < 0.05  # the regressor's guess, then the map's pose

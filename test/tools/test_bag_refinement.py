"""relocalize-bag --map: the bag's CameraInfo + a scene map refine the regressor's poses, as the node does."""
import csv

import numpy as np
import pytest
from rosbags.rosbag2 import StoragePlugin

from bag_helpers import TS, base_args, header, raw_image_msg, write_bag
from helpers import ROOM_K, room_map, room_pose, untrained_checkpoint
from ros2_posenet.preprocess import PreprocessConfig
from ros2_posenet.tools.relocalize_bag import main

BROAD = {"position_var": [4.0, 4.0, 4.0], "rotation_var": [3.0, 3.0, 3.0], "samples": 10}
TRUE_POSES = [room_pose(-2.6, 0.5, 1.3, 8.0), room_pose(-2.3, 0.4, 1.3, -10.0)]


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bag_refine")
    scene, scene_map = room_map()
    checkpoint = untrained_checkpoint(folder / "ckpt.pt", [-2.5, 0.5, 1.3], PreprocessConfig(resize=72, crop=64), covariance=BROAD)
    images = [scene.render(T, ROOM_K, 320, 240)[0] for T in TRUE_POSES]
    return scene_map.save(folder / "room.npz"), checkpoint, images


def camera_info_msg(i: int):
    return TS.types["sensor_msgs/msg/CameraInfo"](
        header=header(i), height=240, width=320, distortion_model="plumb_bob", d=np.zeros(5), k=ROOM_K.ravel(),
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

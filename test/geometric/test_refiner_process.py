"""The refiner in a child process (the node's): same answers, lower priority, restarted when it dies, ended when dropped."""
import os

import numpy as np
import pytest

from helpers import ROOM_K, room_map, room_pose
from ros2_posenet.geometric.refiner import RefinementConfig, Refiner, perturb_pose
from ros2_posenet.geometric.refiner_process import RefinerProcess
from ros2_posenet.geometric.scene_map import MapError
from ros2_posenet.geometric.tracking import TrackedPrior

CONFIG = RefinementConfig(retrieval=False)


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    scene, scene_map = room_map()
    return scene, scene_map, scene_map.save(tmp_path_factory.mktemp("map") / "room.npz")


def _frame(scene, seed=1):
    T = room_pose(-2.6, 0.5, 1.3, 8.0)
    return scene.render(T, ROOM_K, 320, 240)[0], perturb_pose(T, 0.3, 5.0, np.random.default_rng(seed))


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_process_answers_as_the_refiner_at_a_lower_priority(room):
    scene, scene_map, path = room
    rgb, prior = _frame(scene)
    process = RefinerProcess(path, CONFIG, nice=5)
    try:
        assert os.getpriority(os.PRIO_PROCESS, process.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 5)
        assert os.sched_getscheduler(process.pid) == os.SCHED_IDLE  # a core running only the refiner counts as idle
        there = process.refine(rgb, ROOM_K, prior, None)
        here = Refiner(scene_map, CONFIG).refine(rgb, ROOM_K, prior, None)
        assert there.refined and (there.status, there.inliers, there.keyframes_used) == (here.status, here.inliers, here.keyframes_used)
        np.testing.assert_allclose(there.T, here.T, atol=1e-9)
        with pytest.raises(ValueError, match="RGB"):  # the refiner's error, raised here
            process.refine(rgb[..., 0], ROOM_K, prior, None)
        assert process.refine(rgb, ROOM_K, prior, None).refined  # and it serves on
    finally:
        process.close()


def test_the_idle_policy_can_be_left_off(room):
    _, _, path = room
    process = RefinerProcess(path, CONFIG, idle=False)
    try:
        assert os.sched_getscheduler(process.pid) == os.sched_getscheduler(0)
    finally:
        process.close()


def test_a_dead_process_is_replaced_and_a_dropped_one_ends(room):
    scene, _, path = room
    rgb, prior = _frame(scene)
    process = RefinerProcess(path, CONFIG)
    first = process.pid
    os.kill(first, 9)
    assert process.refine(rgb, ROOM_K, prior, None).refined
    second = process.pid
    assert second != first and _running(second)
    del process
    import gc

    gc.collect()
    assert not _running(second)


def test_a_map_the_child_cannot_load_is_a_map_error(tmp_path):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"not a map")
    with pytest.raises(MapError, match="broken.npz"):
        RefinerProcess(bad, CONFIG)


def test_the_child_tells_the_map_camera_and_takes_a_tracked_prior(room):
    scene, scene_map, path = room
    rgb, _ = _frame(scene)
    process = RefinerProcess(path, CONFIG)
    try:
        np.testing.assert_array_equal(process.map_info["intrinsics"], scene_map.intrinsics[0])
        assert process.map_info["image_size"] == (320, 240) and process.map_info["summary"] == scene_map.summary()
        far, wide = room_pose(3.0, -2.0, 1.3, yaw_deg=180.0), np.diag([1.0] * 3 + [0.5] * 3)
        T_last = room_pose(-2.65, 0.5, 1.3, 6.0)  # verified a moment ago, 5 cm and 2 degrees back
        tracked = TrackedPrior(T_last, np.diag([0.15**2] * 3 + [np.radians(9.0) ** 2] * 3), 0.1)
        assert process.refine(rgb, ROOM_K, far, wide).status == "fallback"
        assert process.refine(rgb, ROOM_K, far, wide, tracked).source == "tracking"
    finally:
        process.close()

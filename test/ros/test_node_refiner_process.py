"""The node's refinement runs in a niced SCHED_IDLE child process (issue 24 item 7), one per map, ended with its map."""
import ros_fixtures
from ros_fixtures import make_posenet_node, wait_for

ros_fixtures.isolate_ros_domain()

import os  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from ros2_posenet.geometric.refiner_process import REFINER_PROCESS_NICE, RefinerProcess  # noqa: E402


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    files = ros_fixtures.room_files(tmp_path_factory)
    return files.map_file, files.checkpoint


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_refiner_is_a_lower_priority_child_that_ends_with_its_map(context, room, tmp_path):
    map_file, checkpoint = room
    node = make_posenet_node(context, "refproc", checkpoint=checkpoint, map_file=map_file)
    try:
        refiner = node._live.refinement.refiner
        assert isinstance(refiner, RefinerProcess) and refiner.pid != os.getpid() and _alive(refiner.pid)
        assert os.getpriority(os.PRIO_PROCESS, refiner.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + REFINER_PROCESS_NICE)
        assert os.sched_getscheduler(refiner.pid) == os.SCHED_IDLE
        with open(f"/proc/{refiner.pid}/environ", "rb") as environ:
            assert b"OPENBLAS_NUM_THREADS=1" in environ.read().split(b"\0")
        first = refiner.pid
        other = shutil.copy(map_file, tmp_path / "other.npz")
        del refiner
        assert node.set_parameters([Parameter("map_file", value=str(other))])[0].successful
        assert wait_for(lambda: node._live.refinement.map_file == str(other), 30.0), "the map was not switched"
        assert wait_for(lambda: not _alive(first), 15.0), "the old map's refinement process outlived it"
        assert _alive(node._live.refinement.refiner.pid)
    finally:
        node.destroy_node()

"""Issue 24's node defects 4, 5, 6 and 10, each driven from outside through the node's ROS interface
(a separate rclpy node: SetParameters, ~/relocalize, /diagnostics, the ROS graph) over Fast DDS.

Every test here failed on the node before the fix (said in each docstring).
"""
import contextlib
import threading

import ros_fixtures
from ros_fixtures import RunningNode, call_service, image_msg, room_files, stamp_key, stamp_now, wait_for

ros_fixtures.isolate_ros_domain()

import pytest  # noqa: E402
from geometry_msgs.msg import PoseStamped, PoseWithCovarianceStamped  # noqa: E402
from rcl_interfaces.msg import ParameterType  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.parameter_client import AsyncParameterClient  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from helpers import ROOM_K, room_pose  # noqa: E402
from ros2_posenet.ros import messages  # noqa: E402

LOOSE_GATE = {"initial_pose_max_position_std": 100.0, "initial_pose_max_yaw_std": 3.0}


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return ros_fixtures.tiny_trained_checkpoint(tmp_path_factory)


@pytest.fixture
def start(context, closing):
    return lambda namespace, **parameters: closing(RunningNode(context, namespace, **parameters))


def call(r: RunningNode, srv_type, name: str, request):
    return call_service(r.probe.node, srv_type, f"/{r.namespace}/posenet_node/{name}", request)


def parameter_client(r: RunningNode) -> AsyncParameterClient:
    client = AsyncParameterClient(r.probe.node, f"/{r.namespace}/posenet_node")
    assert client.wait_for_services(timeout_sec=10.0), "parameter services not offered"
    return client


def answer_of(future, timeout: float = 10.0):
    assert wait_for(future.done, timeout), "no answer"
    return future.result()


@contextlib.contextmanager
def streaming(r: RunningNode, rgb, period: float = 0.1):
    """Publish ``rgb`` with fresh stamps (a camera at 1/period Hz) while the block runs."""
    stop = threading.Event()

    def stream():
        i = 0
        while not stop.is_set():
            r.probe.image_pub.publish(image_msg(rgb, stamp_now(r.node, i * 1e-6)))
            i += 1
            stop.wait(period)

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def test_set_parameters_refuses_a_missing_map_file_at_once_naming_it(start, scene, tmp_path):
    """Item 4. Before: SetParameters answered successful, and 0.5 s later an ERROR blamed the checkpoint."""
    r = start("missing_map", checkpoint=str(scene.checkpoint))
    missing = tmp_path / "no_such_map.npz"
    result = answer_of(parameter_client(r).set_parameters([Parameter("map_file", value=str(missing))])).results[0]
    assert not result.successful and str(missing) in result.reason and "no such file" in result.reason
    assert r.node.get_parameter("map_file").value == ""


def test_relocalize_never_republishes_an_answered_frame(start, scene):
    """Item 5. Before: ~/relocalize pushed the newest image through again, so its stamp went out twice."""
    r = start("answered", checkpoint=str(scene.checkpoint), relocalize_timeout=1.0)
    poses: list = []
    r.probe.node.create_subscription(PoseStamped, "posenet/pose", poses.append, 50)
    stamp = stamp_now(r.node)
    assert r.probe.send(image_msg(scene.images[0], stamp))
    assert wait_for(lambda: any(p.header.stamp == stamp for p in poses), 5.0)

    # No newer image: nothing to relocalise; the answer comes at once (a single-threaded executor blocked
    # in this call could not deliver a newer image) with the pose already published for that stamp.
    answer = call(r, Trigger, "relocalize", Trigger.Request())
    assert answer.success and "already relocalised and published" in answer.message, answer.message
    assert f"{stamp.sec + stamp.nanosec * 1e-9:.3f}" in answer.message
    twice = lambda: [stamp_key(p.header.stamp) for p in poses].count(stamp_key(stamp)) > 1  # noqa: E731
    assert not wait_for(twice, 0.5), "the frame went out twice"

    with streaming(r, scene.images[1]):  # a camera: ~/relocalize answers with a new frame
        answer = call(r, Trigger, "relocalize", Trigger.Request())
    assert answer.success, answer.message
    keys = [stamp_key(p.header.stamp) for p in poses]
    assert len(keys) == len(set(keys)) and keys == sorted(keys), "a stamp went out twice or out of order"


def test_initial_pose_is_advertised_only_in_once_and_on_request(start, scene):
    """Item 6 (second half). Before: /initialpose was advertised even with initial_pose off."""
    r = start("advertise", checkpoint=str(scene.checkpoint), initial_pose_topic="initialpose")
    topic = "/advertise/initialpose"
    assert not wait_for(lambda: r.probe.node.count_publishers(topic) > 0, 0.5)  # discovery would have shown one by now
    assert r.node.set_parameters([Parameter("initial_pose", value="on_request")])[0].successful
    assert wait_for(lambda: r.probe.node.count_publishers(topic) == 1, 5.0)
    assert r.node.set_parameters([Parameter("initial_pose", value="off")])[0].successful
    assert wait_for(lambda: r.probe.node.count_publishers(topic) == 0, 5.0)


def test_an_integer_for_a_double_parameter_stays_a_double(start, scene):
    """Item 10 (`ros2 param set /posenet_node max_rate_hz 2`). Before: accepted, and the parameter became an integer."""
    r = start("int_param", checkpoint=str(scene.checkpoint))
    client = parameter_client(r)
    for name in ("max_rate_hz", "future_stamp_tolerance"):
        assert answer_of(client.set_parameters([Parameter(name, value=2)])).results[0].successful
        (value,) = answer_of(client.get_parameters([name])).values
        assert value.type == ParameterType.PARAMETER_DOUBLE and value.double_value == 2.0, (name, value)
        assert r.node.get_parameter(name).value == 2.0 and type(r.node.get_parameter(name).value) is float


def test_switching_to_once_after_an_on_request_seed_publishes(start, scene):
    """Item 10. Before: an on_request seed spent `once`, so switching to initial_pose once never published."""
    r = start("once_after_request", checkpoint=str(scene.checkpoint), initial_pose="on_request", initial_pose_topic="initialpose", **LOOSE_GATE)
    seeds: list = []
    r.probe.node.create_subscription(PoseWithCovarianceStamped, "initialpose", seeds.append, 10)
    assert wait_for(lambda: r.probe.node.count_subscribers("/once_after_request/initialpose") > 0 and r.node.count_subscribers("/once_after_request/initialpose") > 0)
    with streaming(r, scene.images[0]):
        answer = call(r, Trigger, "relocalize", Trigger.Request())
        assert answer.success, answer.message
        assert wait_for(lambda: len(seeds) == 1, 5.0)
        assert r.node.set_parameters([Parameter("initial_pose", value="once")])[0].successful
        assert wait_for(lambda: len(seeds) == 2, 5.0), "switching to once did not seed"
        assert not wait_for(lambda: len(seeds) > 2, 0.5), "once seeded more than once"


def latest_status(probe):
    for array in reversed(probe.diagnostics):
        for status in array.status:
            if status.name.endswith("posenet_node: relocalization"):
                return status
    return None


def test_diagnostics_warn_when_every_refinement_fails(start, tmp_path_factory):
    """Item 6. Before: /diagnostics stayed OK while no frame could be refined (here: no CameraInfo at all)."""
    room = room_files(tmp_path_factory)
    r = start("refine_fails", checkpoint=room.checkpoint, map_file=room.map_file, diagnostics_period=0.3)
    rgb = room.scene.render(room_pose(-2.6, 0.5, 1.3), ROOM_K, 320, 240)[0]
    with streaming(r, rgb, period=0.05):
        assert wait_for(lambda: r.node.counters().get("refine_no_camera_info", 0) >= 2, 20.0)
        assert wait_for(lambda: (s := latest_status(r.probe)) is not None and s.level == messages.DIAGNOSTIC_WARN
                        and "refinement failing" in s.message, 5.0), latest_status(r.probe)
    status = latest_status(r.probe)
    values = {v.key: v.value for v in status.values}
    assert "no_camera_info" in values["refinement_failing"] and values["refine_refined"] == "0"

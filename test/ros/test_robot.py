"""posenet_node on a robot, with the real rclpy over Fast DDS: /initialpose seeding with its
confidence gate, ~/relocalize and ~/enable, max_rate_hz, the managed (lifecycle) node driven
through lifecycle_msgs services as nav2_lifecycle_manager does, and switching the model (map)
while images stream in.
"""
import contextlib
import threading
import time

import ros_fixtures
from ros_fixtures import RunningNode, image_msg, stamp_key, wait_for

ros_fixtures.isolate_ros_domain()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from builtin_interfaces.msg import Time  # noqa: E402
from geometry_msgs.msg import PoseWithCovarianceStamped  # noqa: E402
from lifecycle_msgs.msg import State, Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from std_srvs.srv import SetBool, Trigger  # noqa: E402

from ros2_posenet.geometry import matrix_to_rpy  # noqa: E402
from ros2_posenet.ros import messages  # noqa: E402
from ros2_posenet.ros.lifecycle_node import PoseNetLifecycleNode  # noqa: E402
from ros2_posenet.ros.node import DROP_REASONS  # noqa: E402




@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return ros_fixtures.tiny_trained_checkpoint(tmp_path_factory)


class Robot(RunningNode):
    """A posenet node and a Probe spinning them; the probe also listens to /initialpose and calls services."""

    def __init__(self, context, namespace, node_class=None, **parameters):
        parameters.setdefault("initial_pose_topic", "initialpose")  # in the test's namespace: no cross-talk
        super().__init__(context, namespace, node_class=node_class, **parameters)
        self.initial_poses: list = []
        self._initial_pose_sub = None
        self._stamps = 0

    def listen_to_initial_pose(self) -> None:
        self._initial_pose_sub = self.probe.node.create_subscription(PoseWithCovarianceStamped, "initialpose", self.initial_poses.append, 10)
        assert wait_for(lambda: self.node.count_publishers(f"/{self.namespace}/initialpose") > 0 and self._initial_pose_sub is not None)

    def call(self, srv_type, name: str, request, timeout: float = 20.0):
        return ros_fixtures.call_service(self.probe.node, srv_type, f"/{self.namespace}/posenet_node/{name}", request, timeout)

    def stamp(self) -> Time:
        ns = self.node.get_clock().now().nanoseconds + self._stamps * 1000  # unique even within one clock tick
        self._stamps += 1
        return Time(sec=ns // 10**9, nanosec=ns % 10**9)



@pytest.fixture
def start(context, closing):
    return lambda namespace, **parameters: closing(Robot(context, namespace, **parameters))


@contextlib.contextmanager
def streaming(r: Robot, images: list, period: float = 0.1, sent: list | None = None):
    """Publish ``images`` in a loop with fresh stamps (a camera) while the block runs."""
    stop = threading.Event()

    def stream():
        i = 0
        while not stop.is_set():
            stamp = r.stamp()
            if sent is not None:
                sent.append(stamp_key(stamp))
            r.probe.image_pub.publish(image_msg(images[i % len(images)], stamp))
            i += 1
            stop.wait(period)  # the camera's frame period; returns at once when the block ends

    streamer = threading.Thread(target=stream)
    streamer.start()
    try:
        yield
    finally:
        stop.set()
        streamer.join()


def counts_add_up(counts: dict) -> bool:
    """received = processed + every drop reason (paused and rate-limited frames are not received)."""
    return counts.get("received", 0) == counts.get("processed", 0) + sum(counts.get(reason, 0) for reason in DROP_REASONS)


# ----------------------------------------------------------------------------- /initialpose


def test_initial_pose_once_waits_for_a_subscriber_then_seeds_once(start, scene):
    r = start("seed_once", checkpoint=str(scene.checkpoint), initial_pose="once", initial_pose_max_position_std=100.0, initial_pose_max_yaw_std=3.0)
    assert r.probe.send(image_msg(scene.images[0], r.stamp()))  # nobody listens yet: not seeded, not spent
    r.listen_to_initial_pose()
    stamps = []

    def seeded_after_one_more_frame() -> bool:
        stamps.append(r.stamp())
        assert r.probe.send(image_msg(scene.images[1 + len(stamps) % 3], stamps[-1]))
        return wait_for(lambda: len(r.initial_poses) >= 1, 2.0)

    # The node seeds with the first frame it answers once it has discovered the subscriber: under load that
    # can take a frame or two after ours is up (the test's node sees the publisher, not the other way round).
    assert any(seeded_after_one_more_frame() for _ in range(10)), "never seeded with a subscriber listening"
    assert r.probe.send(image_msg(scene.images[4], r.stamp()))  # seeds come before the next frame's answer
    assert not wait_for(lambda: len(r.initial_poses) > 1, 0.5), "initial_pose once seeded more than once"
    seed = r.initial_poses[0]
    assert seed.header.frame_id == "map" and seed.header.stamp in stamps  # never the frame nobody heard
    pose = r.probe.poses_cov[stamp_key(seed.header.stamp)]  # the full 3-D base pose of that frame
    T_seed, T_base = messages.matrix_from_pose_msg(seed.pose.pose), messages.matrix_from_pose_msg(pose.pose.pose)
    np.testing.assert_allclose(T_seed[:2, 3], T_base[:2, 3], atol=1e-9)
    assert T_seed[2, 3] == 0.0 and abs(T_base[2, 3]) > 0.5  # planar for AMCL; the camera is ~1 m up
    assert matrix_to_rpy(T_seed[:3, :3])[2] == pytest.approx(matrix_to_rpy(T_base[:3, :3])[2], abs=1e-9)
    cov, cov_base = messages.covariance_from_msg(seed), messages.covariance_from_msg(pose)
    for i, j in [(0, 0), (0, 1), (1, 1), (5, 5), (0, 5)]:
        assert cov[i, j] == pytest.approx(cov_base[i, j])
    assert cov[2, 2] == cov[3, 3] == cov[4, 4] == 0.0 and cov[0, 0] > 0 and cov[5, 5] > 0


def test_initial_pose_on_request_seeds_only_on_relocalize_and_gates_on_confidence(start, scene):
    r = start("seed_request", checkpoint=str(scene.checkpoint), initial_pose="on_request", initial_pose_max_position_std=100.0, initial_pose_max_yaw_std=3.0)
    r.listen_to_initial_pose()
    for rgb in scene.images[:2]:
        assert r.probe.send(image_msg(rgb, r.stamp()))
    assert not wait_for(lambda: r.initial_poses, 0.5), "frames alone never seed in on_request"

    def relocalize_while_streaming(rgb):
        with streaming(r, [rgb]):
            return r.call(Trigger, "relocalize", Trigger.Request())

    answer = relocalize_while_streaming(scene.images[1])
    assert answer.success, answer.message
    assert "initialpose: published" in answer.message and "std position" in answer.message
    assert wait_for(lambda: len(r.initial_poses) == 1)
    x = messages.matrix_from_pose_msg(r.initial_poses[0].pose.pose)[0, 3]
    assert f"x {x:.3f} m" in answer.message

    # A gate nothing passes: the pose is still answered, /initialpose is not published, the reason is given.
    assert r.node.set_parameters([Parameter("initial_pose_max_position_std", value=1e-6)])[0].successful
    answer = relocalize_while_streaming(scene.images[2])
    assert not answer.success
    assert "not confident enough" in answer.message and "initial_pose_max_position_std" in answer.message
    assert not wait_for(lambda: len(r.initial_poses) > 1, 0.5), "a pose the gate refused was published"


def test_relocalize_without_a_camera_says_so_at_once(start, scene):
    r = start("no_camera", checkpoint=str(scene.checkpoint))
    started = time.monotonic()
    answer = r.call(Trigger, "relocalize", Trigger.Request())
    assert not answer.success and answer.message == "no image received on camera/image_raw yet"
    assert time.monotonic() - started < 5.0


# ----------------------------------------------------------------------------- ~/enable, max_rate_hz


def test_enable_pauses_and_resumes_inference_and_relocalize_still_answers(start, scene):
    r = start("enable", checkpoint=str(scene.checkpoint))
    assert r.probe.send(image_msg(scene.images[0], r.stamp()))
    answer = r.call(SetBool, "enable", SetBool.Request(data=False))
    assert answer.success and "paused" in answer.message
    assert r.node.get_parameter("enabled").value is False
    received = r.node.counters().get("received", 0)
    paused_stamp = r.stamp()
    r.probe.image_pub.publish(image_msg(scene.images[1], paused_stamp))
    assert wait_for(lambda: r.node.counters().get("paused", 0) >= 1)
    assert stamp_key(paused_stamp) not in r.probe.poses and r.node.counters().get("received", 0) == received

    # ~/relocalize relocalises one frame even while paused; the frames streaming on are still paused.
    processed = r.node.counters()["processed"]
    with streaming(r, [scene.images[2]]):
        answer = r.call(Trigger, "relocalize", Trigger.Request())
        assert answer.success and "initial_pose off" in answer.message
        assert wait_for(lambda: r.node.counters()["processed"] == processed + 1)  # the one frame (counted after its answer)
        paused = r.node.counters()["paused"]
        assert wait_for(lambda: r.node.counters()["paused"] >= paused + 3, 10.0), "the camera stopped streaming"
        assert r.node.counters()["processed"] == processed + 1, "inference resumed after ~/relocalize"

    answer = r.call(SetBool, "enable", SetBool.Request(data=True))
    assert answer.success and "resumed" in answer.message
    assert r.probe.send(image_msg(scene.images[3], r.stamp()))
    assert wait_for(lambda: counts_add_up(r.node.counters()), 5.0), r.node.counters()


def test_max_rate_hz_caps_a_fast_camera(start, scene):
    r = start("rate", checkpoint=str(scene.checkpoint), max_rate_hz=2.0, image_qos="reliable", image_qos_depth=50)
    assert wait_for(lambda: r.probe.image_pub.get_subscription_count() > 0)
    started = time.monotonic()
    for i in range(20):  # 20 Hz for one second
        r.probe.image_pub.publish(image_msg(scene.images[i % len(scene.images)], r.stamp()))
        time.sleep(max(0.0, started + (i + 1) * 0.05 - time.monotonic()))
    elapsed = time.monotonic() - started
    assert wait_for(lambda: r.node.counters().get("received", 0) + r.node.counters().get("rate_limited", 0) == 20)
    counts = r.node.counters()
    assert counts["received"] <= 2.0 * elapsed + 1, counts
    assert counts["rate_limited"] >= 20 - (2.0 * elapsed + 1)
    assert r.node.set_parameters([Parameter("max_rate_hz", value=0)])[0].successful  # live; integers accepted
    assert r.probe.send(image_msg(scene.images[0], r.stamp()))


# ----------------------------------------------------------------------------- lifecycle


def test_lifecycle_transitions_as_nav2_lifecycle_manager_drives_them(start, scene, tmp_path):
    r = start("managed", node_class=PoseNetLifecycleNode, checkpoint=str(scene.checkpoint))

    def transition(transition_id: int) -> bool:
        return r.call(ChangeState, "change_state", ChangeState.Request(transition=Transition(id=transition_id))).success

    def state() -> int:
        return r.call(GetState, "get_state", GetState.Request()).current_state.id

    def silent_for(seconds: float) -> bool:
        """No answer to a camera streaming fresh frames for ``seconds`` (returns False at the first answer)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            stamp = r.stamp()
            r.probe.image_pub.publish(image_msg(scene.images[0], stamp))
            if wait_for(lambda: stamp_key(stamp) in r.probe.poses, 0.1):
                return False
        return True

    assert state() == State.PRIMARY_STATE_UNCONFIGURED
    assert r.node.relocalizer is None and r.probe.image_pub.get_subscription_count() == 0

    assert transition(Transition.TRANSITION_CONFIGURE)
    assert state() == State.PRIMARY_STATE_INACTIVE and r.node.relocalizer is not None
    assert silent_for(0.5) and r.probe.image_pub.get_subscription_count() == 0  # configured, not yet active

    assert transition(Transition.TRANSITION_ACTIVATE)
    assert state() == State.PRIMARY_STATE_ACTIVE
    assert r.probe.send(image_msg(scene.images[1], r.stamp()))

    assert transition(Transition.TRANSITION_DEACTIVATE)
    assert state() == State.PRIMARY_STATE_INACTIVE
    assert wait_for(lambda: r.probe.image_pub.get_subscription_count() == 0)
    received = r.node.counters()["received"]
    assert silent_for(1.0) and r.node.counters()["received"] == received

    assert transition(Transition.TRANSITION_ACTIVATE)
    assert r.probe.send(image_msg(scene.images[2], r.stamp()))

    assert transition(Transition.TRANSITION_DEACTIVATE) and transition(Transition.TRANSITION_CLEANUP)
    assert state() == State.PRIMARY_STATE_UNCONFIGURED and r.node.relocalizer is None

    # A corrupt checkpoint fails the configure transition with the reason; a good one configures again.
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert r.node.set_parameters([Parameter("checkpoint", value=str(corrupt))])[0].successful
    assert not transition(Transition.TRANSITION_CONFIGURE)
    assert state() == State.PRIMARY_STATE_UNCONFIGURED
    assert r.node.set_parameters([Parameter("checkpoint", value=str(scene.checkpoint))])[0].successful
    assert transition(Transition.TRANSITION_CONFIGURE) and transition(Transition.TRANSITION_ACTIVATE)
    assert r.probe.send(image_msg(scene.images[3], r.stamp()))
    assert wait_for(lambda: counts_add_up(r.node.counters()), 5.0), r.node.counters()


# ----------------------------------------------------------------------------- map switching


def test_map_switch_under_a_stream_of_images_loses_no_frame(start, scene, tmp_path, capfd):
    floor2 = ros_fixtures.overflow_checkpoint(tmp_path / "floor2.pt", map_frame="floor2")  # textured views -> the origin
    r = start("switch", checkpoint=str(scene.checkpoint), image_qos="reliable", image_qos_depth=10, log_throttle=60.0)
    assert r.probe.send(image_msg(scene.images[0], r.stamp()))
    sent: list = []
    def answered(frame_id: str) -> int:
        return sum(1 for p in list(r.probe.poses.values()) if p.header.frame_id == frame_id)

    with streaming(r, scene.images, period=0.05, sent=sent):
        assert wait_for(lambda: answered("map") >= 5, 20.0)  # the camera streams before the switch
        assert r.node.set_parameters([Parameter("checkpoint", value=str(floor2))])[0].successful
        assert wait_for(lambda: answered("floor2") >= 5, 30.0)  # ... and on after it

        # A missing file is refused at once; a corrupt one loads in the background, fails, and the old model keeps serving.
        missing = r.node.set_parameters([Parameter("checkpoint", value=str(tmp_path / "nope.pt"))])[0]
        assert not missing.successful and "no such file" in missing.reason
        corrupt = tmp_path / "corrupt.pt"
        corrupt.write_bytes(b"torn download")
        assert r.node.set_parameters([Parameter("checkpoint", value=str(corrupt))])[0].successful
        assert wait_for(lambda: r.node.get_parameter("checkpoint").value == str(floor2), 30.0), "the parameter does not say what is serving"
        after_revert = answered("floor2")
        assert wait_for(lambda: answered("floor2") >= after_revert + 5, 20.0)  # the serving model keeps answering
    last = r.stamp()
    assert r.probe.send(image_msg(scene.images[0], last))
    assert r.probe.poses[stamp_key(last)].header.frame_id == "floor2"

    # Every answer pairs a model with its own map frame; after the swap only the new model answers.
    switched = False
    for key in sorted(r.probe.poses):
        pose = r.probe.poses[key]
        t = messages.matrix_from_pose_msg(pose.pose)[:3, 3]
        if pose.header.frame_id == "floor2":
            switched = True
            np.testing.assert_allclose(t, 0.0, atol=1e-6)
        else:
            assert pose.header.frame_id == "map" and not switched and np.linalg.norm(t) > 0.5
    # A frame of the stream may still be in flight (counted received, not yet answered): wait for it.
    assert wait_for(lambda: counts_add_up(r.node.counters()), 5.0), r.node.counters()
    counts = r.node.counters()
    assert counts.get("internal_error", 0) == 0 and r.node._worker.is_alive()
    # Reliable QoS, so every frame reached the node, and each was answered or superseded by a newer one.
    assert wait_for(lambda: r.node.counters()["received"] >= len(sent))
    assert len([k for k in sent if k in r.probe.poses]) + counts.get("superseded", 0) >= len(sent) - counts.get("stale", 0)
    err = capfd.readouterr().err
    assert "switched model: now relocalising with" in err and "floor2" in err
    assert f"cannot switch to {corrupt}" in err and f"still relocalising with {floor2}" in err

"""posenet_node's CameraInfo and map inputs over the real rclpy: which calibration a frame gets, what is
refused and reported, the CameraInfo topic of compressed images, map/refine switches at run time and
seeding /initialpose with verified poses only.

The regressor is untrained (a guess near the room's centre with a broad covariance): a pose near
the truth on the verified topic can only come from the map with the right calibration.
"""
import ros_fixtures
from ros_fixtures import (
    RunningNode, compressed_msg, image_msg, latest_diagnostic, room_camera_info, stamp_key, stamp_now, wait_for, wait_for_log,
)

ros_fixtures.isolate_ros_domain()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from geometry_msgs.msg import PoseWithCovarianceStamped  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import CameraInfo  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from helpers import ROOM_K, room_pose  # noqa: E402
from ros2_posenet.ros import messages  # noqa: E402

T_TRUE = room_pose(-2.6, 0.5, 1.3, 8.0)
WRONG_K = ROOM_K * [[2.0], [2.0], [1.0]]  # focal ×2


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    files = ros_fixtures.room_files(tmp_path_factory)
    return files, files.scene.render(T_TRUE, ROOM_K, 320, 240)[0]


class MapNode(RunningNode):
    """A posenet node with the room's map; the probe also publishes CameraInfo and records the verified poses."""

    def __init__(self, context, namespace, room, info_topic="camera/camera_info", **parameters):
        files, _ = room
        parameters = {"checkpoint": files.checkpoint, "map_file": files.map_file, "diagnostics_period": 0.2, **parameters}
        super().__init__(context, namespace, **parameters)
        self.verified: dict = {}
        topic = self.node.get_parameter("verified_pose_topic").value
        self.probe.node.create_subscription(PoseWithCovarianceStamped, topic, lambda m: self.verified.__setitem__(stamp_key(m.header.stamp), m), 10)
        self.info_pub = self.probe.node.create_publisher(CameraInfo, info_topic, 10)
        assert wait_for(lambda: self.info_pub.get_subscription_count() > 0, 10.0), f"the node never subscribed to {info_topic}"

    def give_camera_info(self, msg) -> None:
        """Publish one CameraInfo and wait until the node took it (stored or refused)."""
        before = self.camera_infos_seen()
        self.info_pub.publish(msg)
        assert wait_for(lambda: self.camera_infos_seen() > before, 10.0), "CameraInfo never arrived"

    def camera_infos_seen(self) -> int:
        return self.node._camera_infos.received + self.node.counters().get("bad_camera_info", 0)

    def refine_once(self, rgb, msg_factory=image_msg) -> tuple[str, object]:
        """Send one fresh frame; (its refinement outcome, its verified pose or None)."""
        before = self.node.counters()
        stamp = stamp_now(self.node)
        key = stamp_key(stamp)
        assert self.probe.send(msg_factory(rgb, stamp), timeout=20.0), "no regressor answer"
        outcomes = ("refined", "fallback", "no_camera_info", "error")

        def outcome():
            after = self.node.counters()
            moved = [o for o in outcomes if after.get(f"refine_{o}", 0) > before.get(f"refine_{o}", 0)]
            return moved[0] if moved else None

        assert wait_for(lambda: outcome() is not None, 20.0), "the refiner never finished the frame"
        if outcome() == "refined":
            assert wait_for(lambda: key in self.verified, 5.0)
        return outcome(), self.verified.get(key)


@pytest.fixture
def start_map_node(context, closing, room):
    return lambda namespace, **parameters: closing(MapNode(context, namespace, room, **parameters))


def position_error(verified) -> float:
    return float(np.linalg.norm(messages.matrix_from_pose_msg(verified.pose.pose)[:3, 3] - T_TRUE[:3, 3]))


# ----------------------------------------------------------------------------- which calibration a frame gets


def test_latest_camera_info_means_latest_received_and_far_stamps_are_reported(start_map_node, room, capfd):
    """With camera_info_tolerance -1 the latest CameraInfo *received* is the calibration: one stamped an
    hour ahead no longer pins itself, one stamped 1000 s back is used; each far stamp is counted and logged.

    Catches: "latest" by stamp (CameraInfoBuffer.lookup returning the greatest stamp, the node before
    issue 24): both frames below then refine with focal ×2 and fall back.
    """
    m = start_map_node("latest_info", camera_info_tolerance=-1.0)
    _, rgb = room
    m.give_camera_info(room_camera_info(stamp_now(m.node), K=WRONG_K))
    m.give_camera_info(room_camera_info(stamp_now(m.node, -1000.0)))  # the right calibration, old stamp
    status, verified = m.refine_once(rgb)
    assert status == "refined" and position_error(verified) < 0.05

    m.give_camera_info(room_camera_info(stamp_now(m.node, 3600.0), K=WRONG_K))  # an hour ahead
    m.give_camera_info(room_camera_info(stamp_now(m.node)))
    status, verified = m.refine_once(rgb)
    assert status == "refined" and position_error(verified) < 0.05

    assert m.node.counters().get("camera_info_far_stamp") == 2
    assert wait_for(lambda: latest_diagnostic(m.probe, "camera_info_far_stamp") == "2", 5.0)
    err = capfd.readouterr().err
    assert "CameraInfo stamped 1000.0" in err and "before its arrival" in err


def test_a_distortion_vector_of_the_wrong_length_is_one_bad_camera_info_not_an_error_per_frame(start_map_node, room, capfd):
    """plumb_bob with 3 coefficients is refused on arrival (bad_camera_info, with the reason); frames
    then have no CameraInfo, never an OpenCV assertion; a valid CameraInfo afterwards refines.

    Catches: dropping the length check in intrinsics_from_camera_info (issue 24: refine_error with
    an OpenCV assertion on every frame), and _on_camera_info not counting bad_camera_info.
    """
    m = start_map_node("bad_info", log_throttle=0.0)
    _, rgb = room
    m.give_camera_info(room_camera_info(stamp_now(m.node), d=(-0.2, 0.05, 0.001)))
    m.give_camera_info(room_camera_info(stamp_now(m.node), K=np.zeros((3, 3))))  # uncalibrated camera
    for _ in range(2):
        status, verified = m.refine_once(rgb)
        assert status == "no_camera_info" and verified is None
    counts = m.node.counters()
    assert counts.get("bad_camera_info") == 2 and counts.get("refine_error", 0) == 0
    assert wait_for(lambda: latest_diagnostic(m.probe, "bad_camera_info") == "2", 5.0)
    assert latest_diagnostic(m.probe, "refine_error") == "0"
    err = capfd.readouterr().err
    assert "3 distortion coefficients for model 'plumb_bob', which has 5" in err and "no valid camera matrix" in err

    m.give_camera_info(room_camera_info(stamp_now(m.node), d=(0.0,) * 5))
    status, verified = m.refine_once(rgb)
    assert status == "refined" and position_error(verified) < 0.05


def test_compressed_images_pair_with_the_camera_info_beside_image_raw(start_map_node, room):
    """image_transport's naming: <camera>/image_raw/compressed has its CameraInfo on <camera>/camera_info.

    Catches: camera_info_topic_of ignoring ``compressed`` (the node would listen on
    camera/image_raw/camera_info and never refine a compressed stream).
    """
    m = start_map_node("compressed_info", compressed=True, image_topic="camera/image_raw/compressed")
    _, rgb = room
    m.give_camera_info(room_camera_info(stamp_now(m.node)))
    status, verified = m.refine_once(rgb, msg_factory=compressed_msg)
    assert status == "refined" and position_error(verified) < 0.05


# ----------------------------------------------------------------------------- switches at run time


def test_map_file_and_refine_switch_at_run_time(start_map_node, room):
    """No map, then map_file set: verified poses; refine false: none (the map stays loaded); refine true: again.

    Catches: the refinement ignoring ``refine`` (``if live.refinement is not None and s.refine`` without
    ``s.refine``), and map_file missing from the parameters that load a new model and map.
    """
    files, rgb = room
    m = start_map_node("switches", map_file="")
    m.give_camera_info(room_camera_info(stamp_now(m.node)))

    def refiner_counts() -> int:
        return sum(v for k, v in m.node.counters().items() if k.startswith("refine_"))

    def regressor_answer():
        stamp = stamp_now(m.node)
        assert m.probe.send(image_msg(rgb, stamp), timeout=20.0)
        return stamp_key(stamp)

    unrefined = [regressor_answer()]  # no map: no refiner

    assert m.node.set_parameters([Parameter("map_file", value=files.map_file)])[0].successful
    assert wait_for(lambda: latest_diagnostic(m.probe, "map_file") == files.map_file, 30.0), "the map was never loaded"
    status, verified = m.refine_once(rgb)
    assert status == "refined" and position_error(verified) < 0.05

    assert m.node.set_parameters([Parameter("refine", value=False)])[0].successful
    unrefined += [regressor_answer() for _ in range(2)]  # the map stays loaded, unused
    assert latest_diagnostic(m.probe, "map_file") == files.map_file

    assert m.node.set_parameters([Parameter("refine", value=True)])[0].successful
    status, verified = m.refine_once(rgb)  # the refiner takes frames in order: the ones before are done with
    assert status == "refined" and position_error(verified) < 0.05
    assert refiner_counts() == 2, m.node.counters()  # refined twice; nothing else reached the refiner (not even refine_skipped)
    assert not any(key in m.verified for key in unrefined)


# ----------------------------------------------------------------------------- /initialpose with a map


def test_initial_pose_require_refined_seeds_only_poses_the_map_verified(start_map_node, room):
    """With initial_pose_require_refined, ~/relocalize seeds /initialpose only when the map verified the frame.

    Catches: RobotInterfaces._seed ignoring initial_pose_require_refined (AMCL seeded with the
    regressor's unverified guess, here over 0.1 m off).
    """
    m = start_map_node("require_refined", initial_pose="on_request", initial_pose_require_refined=True, initial_pose_topic="initialpose",
                       initial_pose_max_position_std=100.0, initial_pose_max_yaw_std=3.0, enabled=False)
    _, rgb = room
    seeds: list = []
    m.probe.node.create_subscription(PoseWithCovarianceStamped, "initialpose", seeds.append, 10)
    assert wait_for(lambda: m.node.count_subscribers(f"/{m.namespace}/initialpose") > 0)

    def relocalize():
        """~/relocalize on a fresh frame that arrived while paused (so it was not answered yet)."""
        paused = m.node.counters().get("paused", 0)
        assert wait_for(lambda: m.probe.image_pub.get_subscription_count() > 0, 10.0)
        m.probe.image_pub.publish(image_msg(rgb, stamp_now(m.node)))
        assert wait_for(lambda: m.node.counters().get("paused", 0) > paused, 10.0), "the frame never arrived"
        return ros_fixtures.call_service(m.probe.node, Trigger, f"/{m.namespace}/posenet_node/relocalize", Trigger.Request(), 30.0)

    answer = relocalize()  # no CameraInfo: the map cannot verify
    assert not answer.success and "not geometrically verified" in answer.message
    assert wait_for(lambda: m.node.counters().get("refine_no_camera_info", 0) >= 1, 5.0) and seeds == []

    m.give_camera_info(room_camera_info(stamp_now(m.node)))
    answer = relocalize()
    assert answer.success and "verified by the map" in answer.message and "initialpose: published" in answer.message
    assert wait_for(lambda: len(seeds) == 1, 5.0)
    seed = messages.matrix_from_pose_msg(seeds[0].pose.pose)
    assert np.linalg.norm(seed[:2, 3] - T_TRUE[:2, 3]) < 0.05  # planar: x, y of the verified pose


# ----------------------------------------------------------------------------- a wrong calibration


@pytest.mark.parametrize("focal_scale", [1.03, 1.1, 2.0])
def test_a_wrong_focal_length_is_never_published_as_verified_and_the_node_says_why(start_map_node, room, capfd, focal_scale):
    """Issue 24 item 1: CameraInfo's focal ×1.03 / ×1.1 / ×2 against the map's camera.

    Before, most such frames came out verified, metres off with a centimetre σ. Now the refiner estimates the
    focal length with the pose and refuses it: no verified pose, the log names the calibration and the CameraInfo K,
    and /diagnostics says every frame fell back for ``calibration``.
    Catches: the node publishing a fallback's pose on the verified topic, or the refiner's focal check off
    (``max_focal_error: 0``).
    """
    m = start_map_node(f"wrong_focal_{str(focal_scale).replace('.', '_')}")
    _, rgb = room
    K = ROOM_K * [[focal_scale], [focal_scale], [1.0]]
    m.give_camera_info(room_camera_info(stamp_now(m.node), K=K))
    outcomes = [m.refine_once(rgb) for _ in range(3)]
    assert [status for status, _ in outcomes] == ["fallback"] * 3, outcomes
    assert not m.verified, "a pose made with the wrong calibration went out as verified"
    wait_for_log(capfd, r"calibration: .*focal length.*check the CameraInfo K")
    assert wait_for(lambda: "calibration" in (latest_diagnostic(m.probe, "refinement_failing") or ""), 10.0)

"""The node's refinement stage: CameraInfo pairing, undistortion, refined vs regressor pose, intrinsics warning."""
import cv2
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CameraInfo

from helpers import ROOM_K, room_map, room_pose
from ros2_posenet.geometry import matrix_to_pose, pose_to_matrix
from ros2_posenet.inference import PosePrediction
from ros2_posenet.geometric.refiner import RefinementConfig, perturb_pose, pose_difference
from ros2_posenet.ros.refinement import FALLBACK, NO_CAMERA_INFO, REFINED, NodeRefinement, Undistorter
from ros2_posenet.ros.camera_info import intrinsics_from_camera_info
from ros2_posenet.geometric.scene_map import MapError

PRIOR_COV = np.diag([0.25] * 3 + [0.03] * 3)


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    scene, scene_map = room_map()
    path = scene_map.save(tmp_path_factory.mktemp("map") / "room.npz")
    return scene, path


def camera_info(K=ROOM_K, sec=5, d=(0.0,) * 5, width=320, height=240) -> CameraInfo:
    msg = CameraInfo(width=width, height=height, distortion_model="plumb_bob", k=[float(v) for v in np.ravel(K)], d=list(d))
    msg.header.stamp = Time(sec=sec)
    return msg


def prediction_of(T) -> PosePrediction:
    t, q = matrix_to_pose(T)
    return PosePrediction(position=t, quaternion=q, covariance=PRIOR_COV.copy())


def errors(prediction: PosePrediction, T_true) -> tuple[float, float]:
    d = pose_difference(pose_to_matrix(prediction.position, prediction.quaternion), T_true)
    return float(np.linalg.norm(d[:3])), float(np.degrees(np.linalg.norm(d[3:])))


def test_a_perturbed_regressor_pose_is_replaced_by_the_refined_one(room):
    scene, path = room
    stage = NodeRefinement(str(path), RefinementConfig(retrieval=False))
    stage.on_camera_info(camera_info(sec=5))
    T_true = room_pose(-2.6, 0.5, 1.3, 8.0)
    rgb = scene.render(T_true, ROOM_K, 320, 240)[0]
    prior = prediction_of(perturb_pose(T_true, 0.5, 10.0, np.random.default_rng(1)))
    outcome = stage.refine(rgb, 5.01, prior, camera_info_tolerance=0.05)
    assert outcome.status == REFINED, outcome.reason
    metres, degrees = errors(outcome.prediction, T_true)
    assert metres < 0.03 and degrees < 0.5
    assert np.all(np.diag(outcome.prediction.covariance) < np.diag(PRIOR_COV))  # geometry is more certain
    assert outcome.result.inliers >= RefinementConfig().min_inliers


def test_without_matching_camera_info_the_regressor_pose_goes_out_unchanged(room):
    scene, path = room
    stage = NodeRefinement(str(path))
    rgb = scene.render(room_pose(-2.6, 0.5, 1.3), ROOM_K, 320, 240)[0]
    prior = prediction_of(room_pose(-2.0, 0.3, 1.3))
    outcome = stage.refine(rgb, 5.0, prior, camera_info_tolerance=0.05)
    assert (outcome.status, outcome.reason) == (NO_CAMERA_INFO, "no CameraInfo yet") and outcome.prediction is prior
    stage.on_camera_info(camera_info(sec=9))
    outcome = stage.refine(rgb, 5.0, prior, camera_info_tolerance=0.05)
    assert outcome.status == NO_CAMERA_INFO and "within 0.05 s" in outcome.reason and outcome.prediction is prior


def test_a_prior_in_the_wrong_place_falls_back_to_the_regressor_pose(room):
    scene, path = room
    stage = NodeRefinement(str(path), RefinementConfig(retrieval=False))
    stage.on_camera_info(camera_info())
    rgb = scene.render(room_pose(-2.5, 0.5, 1.3), ROOM_K, 320, 240)[0]
    prior = prediction_of(room_pose(3.0, -2.0, 1.3, yaw_deg=180.0))
    outcome = stage.refine(rgb, 123.0, prior, camera_info_tolerance=-1.0)  # negative tolerance: the latest CameraInfo serves any stamp
    assert outcome.status == FALLBACK and outcome.reason and outcome.prediction is prior


def test_a_different_live_camera_is_reported_once(room):
    _, path = room
    warnings = []
    stage = NodeRefinement(str(path), warn=warnings.append)
    wide = ROOM_K.copy()
    wide[0, 0] = wide[1, 1] = 200.0
    stage.on_camera_info(camera_info(K=wide))
    stage.on_camera_info(camera_info(K=wide, sec=6))
    assert len(warnings) == 1 and "fx 200.0 vs 300.0" in warnings[0]
    quiet = []
    NodeRefinement(str(path), warn=quiet.append).on_camera_info(camera_info(K=ROOM_K * [[2], [2], [1]], width=640, height=480))
    assert quiet == []  # the same camera at twice the resolution is not a different camera


def test_distorted_images_are_undistorted_with_the_camera_info_coefficients():
    rng = np.random.default_rng(0)
    rgb = cv2.GaussianBlur(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), (7, 7), 2)
    undistort = Undistorter()
    assert undistort(rgb, intrinsics_from_camera_info(camera_info())) is rgb  # no distortion: no copy
    intrinsics = intrinsics_from_camera_info(camera_info(d=(-0.2, 0.05, 0.0, 0.0, 0.0)))
    expected = cv2.undistort(rgb, intrinsics.K, intrinsics.distortion)
    got = undistort(rgb, intrinsics)
    inner = (slice(20, -20), slice(20, -20))  # borders differ in how the two fill outside the image
    assert np.abs(got[inner].astype(int) - expected[inner].astype(int)).mean() < 1.5


def test_a_missing_map_fails_with_what_to_do(tmp_path):
    with pytest.raises(MapError):
        NodeRefinement(str(tmp_path / "missing.npz"))


def test_the_last_verified_pose_carries_the_next_frames_while_it_is_fresh(room):
    scene, path = room
    stage = NodeRefinement(str(path), RefinementConfig(retrieval=False, tracking_max_gap_s=1.0))
    stage.on_camera_info(camera_info())
    rng = np.random.default_rng(2)
    first, second = room_pose(-2.6, 0.5, 1.3, 4.0), room_pose(-2.55, 0.5, 1.3, 6.0)  # 5 cm and 2 deg apart
    outcome = stage.refine(scene.render(first, ROOM_K, 320, 240)[0], 10.0, prediction_of(perturb_pose(first, 0.3, 5.0, rng)))
    assert outcome.status == REFINED and outcome.result.source == "prior", outcome.reason
    lost = prediction_of(room_pose(3.0, -2.0, 1.3, yaw_deg=180.0))  # the regressor jumps to the other side of the room
    rgb = scene.render(second, ROOM_K, 320, 240)[0]
    outcome = stage.refine(rgb, 10.1, lost)
    assert outcome.status == REFINED and outcome.result.source == "tracking", outcome.reason
    assert errors(outcome.prediction, second)[0] < 0.03
    assert stage.refine(rgb, 11.5, lost).status == FALLBACK  # 1.4 s after the last verified pose: no track


def test_with_a_refiner_process_the_node_does_not_load_the_map_itself(room, monkeypatch):
    scene, path = room
    from ros2_posenet.geometric.scene_map import SceneMap

    def not_here(*args, **kwargs):
        raise AssertionError("the parent loaded the map")

    monkeypatch.setattr(SceneMap, "load", not_here)  # the child is a new interpreter: not patched
    stage = NodeRefinement(str(path), RefinementConfig(retrieval=False), separate_process=True)
    try:
        stage.on_camera_info(camera_info())
        T_true = room_pose(-2.6, 0.5, 1.3, 8.0)
        prior = prediction_of(perturb_pose(T_true, 0.3, 5.0, np.random.default_rng(4)))
        outcome = stage.refine(scene.render(T_true, ROOM_K, 320, 240)[0], 5.0, prior)
        assert outcome.status == REFINED and errors(outcome.prediction, T_true)[0] < 0.03
        assert stage.map_summary["keyframes"] == 18 and stage.map_image_size == (320, 240)
    finally:
        stage.refiner.close()

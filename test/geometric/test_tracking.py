"""Tracking: the last verified pose as the next frame's prior (Track, replay_stamps, Refiner.refine(tracked=...))."""
import math

import numpy as np
import pytest

from helpers import ROOM_K, room_map, room_pose
from ros2_posenet.geometric.refiner import RefinementConfig, Refiner, perturb_pose, pose_difference
from ros2_posenet.geometric.tracking import Track, TrackedPrior, replay_stamps

COV = np.diag([0.01**2] * 3 + [math.radians(0.5) ** 2] * 3)


def error_m(T, T_true) -> float:
    return float(np.linalg.norm(pose_difference(T, T_true)[:3]))


def test_the_prior_grows_with_its_age_by_the_motion_bound():
    track = Track(max_gap_s=1.0, speed_m_s=2.0, turn_deg_s=45.0)
    assert track.prior(10.0) is None  # nothing verified yet
    T = room_pose(-2.5, 0.5, 1.3)
    track.update(10.0, T, COV)
    prior = track.prior(10.5)
    np.testing.assert_array_equal(prior.T, T)
    assert prior.age_s == pytest.approx(0.5)
    # 0.5 s at 2 m/s and 45 deg/s: 1 m and 22.5 deg more standard deviation, added as variances.
    expected = COV + np.diag([1.0] * 3 + [math.radians(22.5) ** 2] * 3)
    np.testing.assert_allclose(prior.covariance, expected)
    np.testing.assert_array_equal(track.prior(10.0).covariance, COV)  # the same instant: its own covariance


def test_no_prior_when_too_old_earlier_off_or_reset():
    track = Track(max_gap_s=1.0)
    track.update(10.0, np.eye(4), COV)
    assert track.prior(11.5) is None  # older than max_gap_s
    assert track.prior(9.0) is None  # a frame from before the verified one (a bag looping)
    track.update(9.5, room_pose(1.0, 0.0, 1.0), COV)  # a frame that finished late does not replace a newer pose
    np.testing.assert_array_equal(track.prior(10.2).T, np.eye(4))
    track.update(2.0, room_pose(2.0, 0.0, 1.0), COV)  # the clock went back by more than max_gap_s: a new track
    np.testing.assert_array_equal(track.prior(2.5).T, room_pose(2.0, 0.0, 1.0))
    track.reset()
    assert track.prior(2.5) is None
    off = Track(max_gap_s=0.0)
    off.update(1.0, np.eye(4), COV)
    assert off.prior(1.0) is None
    for bad in ((-1.0, 1.0, 1.0), (1.0, 0.0, 1.0), (1.0, 1.0, -5.0), (float("nan"), 1.0, 1.0)):
        with pytest.raises(ValueError, match="tracking needs"):
            Track(*bad)


def test_the_config_names_the_track():
    track = Track.for_config(RefinementConfig(tracking_max_gap_s=0.5, tracking_speed_m_s=3.0, tracking_turn_deg_s=30.0))
    assert (track.max_gap_s, track.speed_m_s, track.turn_deg_s) == (0.5, 3.0, 30.0)


def test_replayed_frames_are_a_stream_per_sequence():
    stamps = replay_stamps(["seq-01", "seq-01", "seq-01", "seq-02", "seq-02"], 10.0)
    np.testing.assert_allclose(np.diff(stamps), [0.1, 0.1, 3600.0, 0.1])
    track = Track(max_gap_s=1.0)
    track.update(stamps[2], np.eye(4), COV)
    assert track.prior(stamps[3]) is None  # no track across recordings
    with pytest.raises(ValueError, match="positive"):
        replay_stamps(["a"], 0.0)


@pytest.fixture(scope="module")
def room():
    return room_map()


def test_a_tracked_prior_refines_a_frame_the_regressor_prior_cannot(room):
    scene, scene_map = room
    T_true = room_pose(-2.5, 0.5, 1.3, 5.0)
    rgb = scene.render(T_true, ROOM_K, 320, 240)[0]
    refiner = Refiner(scene_map, RefinementConfig(retrieval=False))
    wrong = room_pose(3.0, -2.0, 1.3, yaw_deg=180.0)  # the regressor on the other side of the room
    wide = np.diag([1.0] * 3 + [0.5] * 3)
    assert refiner.refine(rgb, ROOM_K, wrong, wide).status == "fallback"
    last = perturb_pose(T_true, 0.08, 3.0, np.random.default_rng(0))  # verified a moment ago, 8 cm back
    tracked = TrackedPrior(last, COV + np.diag([0.15**2] * 3 + [math.radians(9.0) ** 2] * 3), 0.1)
    result = refiner.refine(rgb, ROOM_K, wrong, wide, tracked)
    assert result.status == "refined" and result.source == "tracking", result.reason
    assert error_m(result.T, T_true) < 0.02
    assert result.attempts[0][0] == "tracking"
    # The correction is the regressor's error (what a user reads it for), not the 8 cm from the track.
    assert result.correction[0] == pytest.approx(error_m(wrong, T_true), abs=0.02)


def test_a_lost_track_costs_one_attempt_and_the_regressor_prior_decides(room):
    scene, scene_map = room
    T_true = room_pose(-2.5, 0.5, 1.3)
    rgb = scene.render(T_true, ROOM_K, 320, 240)[0]
    refiner = Refiner(scene_map, RefinementConfig(retrieval=False, neighbourhood_confirms=False, max_keyframe_angle_deg=90))
    prior = perturb_pose(T_true, 0.3, 5.0, np.random.default_rng(1))
    narrow = COV + np.diag([0.15**2] * 3 + [math.radians(9.0) ** 2] * 3)
    # 3.6 m and 60 deg away: its keyframes see part of the view, and the true pose they give is refused by the track's gate.
    lost = TrackedPrior(room_pose(-4.5, 3.5, 1.3, yaw_deg=-60.0), narrow, 0.1)
    result = refiner.refine(rgb, ROOM_K, prior, np.diag([0.25] * 3 + [0.03] * 3), lost)
    assert result.status == "refined" and result.source == "prior", result.reason
    assert [source for source, _ in result.attempts] == ["tracking", "prior"]
    assert error_m(result.T, T_true) < 0.02

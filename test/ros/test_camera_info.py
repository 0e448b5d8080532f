"""CameraInfo -> intrinsics for the refinement stage: validation, scaling, stamp pairing."""
import cv2
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CameraInfo

from ros2_posenet.ros.camera_info import (
    CameraInfoBuffer,
    CameraInfoError,
    intrinsics_from_camera_info,
    intrinsics_mismatch,
    stamp_gap_problem,
)

K640 = np.array([[525.0, 0.0, 319.5], [0.0, 525.0, 239.5], [0.0, 0.0, 1.0]])


def camera_info(K=K640, width=640, height=480, sec=10, nanosec=0, d=(0.1, -0.05, 0.0, 0.0, 0.0), model="plumb_bob") -> CameraInfo:
    msg = CameraInfo(width=width, height=height, distortion_model=model)
    msg.header.stamp = Time(sec=sec, nanosec=nanosec)
    msg.header.frame_id = "camera_optical"
    msg.k = [float(v) for v in np.asarray(K).reshape(9)]
    msg.d = list(d)
    return msg


def test_intrinsics_are_read_from_k_and_d():
    intrinsics = intrinsics_from_camera_info(camera_info())
    np.testing.assert_array_equal(intrinsics.K, K640)
    np.testing.assert_array_equal(intrinsics.distortion, [0.1, -0.05, 0.0, 0.0, 0.0])
    assert (intrinsics.width, intrinsics.height) == (640, 480)


@pytest.mark.parametrize(
    "msg, words",
    [
        (camera_info(K=np.zeros((3, 3))), "no valid camera matrix"),
        (camera_info(K=np.where(np.eye(3) > 0, np.nan, 0.0)), "no valid camera matrix"),
        (camera_info(width=0), "no image size"),
        (camera_info(d=(float("nan"), 0, 0, 0, 0)), "non-finite distortion"),
    ],
)
def test_unusable_camera_info_is_rejected_with_the_reason(msg, words):
    with pytest.raises(CameraInfoError, match=words):
        intrinsics_from_camera_info(msg)


def test_a_resized_stream_scales_the_calibration_and_a_crop_is_refused():
    intrinsics = intrinsics_from_camera_info(camera_info())
    half = intrinsics.for_image(320, 240)
    np.testing.assert_allclose(half.K, [[262.5, 0, 159.5], [0, 262.5, 119.5], [0, 0, 1]])  # cv2.resize's pixel centres
    with pytest.raises(CameraInfoError, match="aspect ratio"):
        intrinsics.for_image(480, 480)


def test_buffer_pairs_each_image_with_the_calibration_of_its_stamp():
    buffer = CameraInfoBuffer(max_messages=3)
    assert buffer.lookup(10.0, 0.05) is None
    for sec, fx in ((10, 500.0), (11, 510.0), (12, 520.0), (13, 530.0)):
        K = K640.copy()
        K[0, 0] = fx
        buffer.add(camera_info(K=K, sec=sec))
    assert len(buffer) == 3  # the oldest was dropped
    assert buffer.lookup(11.02, 0.05).K[0, 0] == 510.0
    assert buffer.lookup(12.98, 0.05).K[0, 0] == 530.0
    assert buffer.lookup(11.5, 0.05) is None  # no CameraInfo near that stamp
    assert buffer.lookup(0.0, -1.0).K[0, 0] == 530.0  # negative tolerance: latest
    with pytest.raises(CameraInfoError):
        buffer.add(camera_info(K=np.zeros((3, 3)), sec=14))
    assert buffer.lookup(0.0, -1.0).K[0, 0] == 530.0  # a bad message stores nothing


def test_mismatch_ignores_resolution_but_reports_another_lens():
    same_camera_at_half_size = intrinsics_from_camera_info(camera_info(K=K640 * [[0.5], [0.5], [1]], width=320, height=240))
    assert intrinsics_mismatch(same_camera_at_half_size, K640, (640, 480)) is None
    wide = K640.copy()
    wide[0, 0] = wide[1, 1] = 400.0
    problem = intrinsics_mismatch(intrinsics_from_camera_info(camera_info(K=wide)), K640, (640, 480))
    assert problem is not None and "fx 400.0 vs 525.0" in problem and "fy 400.0 vs 525.0" in problem


def with_focal(fx: float, sec: int) -> CameraInfo:
    K = K640.copy()
    K[0, 0] = fx
    return camera_info(K=K, sec=sec)


def test_latest_means_latest_received_whatever_its_stamp():
    """Catches: "latest" as the greatest stamp (the buffer before issue 24): one message stamped an
    hour ahead would pin its calibration until the clock passes it; an older-stamped one is ignored."""
    buffer = CameraInfoBuffer()
    buffer.add(with_focal(500.0, sec=10))
    buffer.add(with_focal(1000.0, sec=3610))  # an hour ahead
    buffer.add(with_focal(510.0, sec=11))
    assert buffer.lookup(11.0, -1.0).K[0, 0] == 510.0
    buffer.add(with_focal(520.0, sec=1))  # stamped far in the past, but the newest calibration
    assert buffer.lookup(11.0, -1.0).K[0, 0] == 520.0
    assert buffer.received == 4


def test_the_oldest_received_is_forgotten_first():
    """Catches: evicting the oldest stamp: a future-stamped message would never leave, a fresh
    message stamped in the past would be evicted at once."""
    buffer = CameraInfoBuffer(max_messages=2)
    buffer.add(with_focal(1000.0, sec=3610))
    buffer.add(with_focal(500.0, sec=10))
    buffer.add(with_focal(510.0, sec=11))  # the future-stamped one goes
    assert buffer.lookup(3610.0, 0.5) is None
    assert buffer.lookup(10.0, 0.05).K[0, 0] == 500.0 and buffer.received == 3


@pytest.mark.parametrize("model, lengths", [("plumb_bob", (5,)), ("rational_polynomial", (8, 12, 14)), ("equidistant", (4,)), ("", (4, 5, 8, 12, 14))])
def test_distortion_vectors_of_the_wrong_length_are_refused_and_the_right_ones_undistort(model, lengths):
    """Every length OpenCV's undistortion would assert on is refused when the message arrives.

    Catches: dropping the length check (issue 24: plumb_bob with 3 or 7 coefficients failed every
    frame's refinement with an OpenCV assertion instead of one bad_camera_info).
    """
    value = 0.0 if model == "equidistant" else 0.01  # the length is checked whatever the values; equidistant: see below
    for n in range(1, 16):
        msg = camera_info(d=[value] * n, model=model)
        if n in lengths:
            intrinsics = intrinsics_from_camera_info(msg)
            if intrinsics.distortion.any():
                cv2.initUndistortRectifyMap(intrinsics.K, intrinsics.distortion, None, intrinsics.K, (640, 480), cv2.CV_16SC2)
        else:
            with pytest.raises(CameraInfoError, match=f"{n} distortion coefficients for model '{model}'"):
                intrinsics_from_camera_info(msg)
    assert intrinsics_from_camera_info(camera_info(d=[], model=model)).distortion.size == 0  # none given: no distortion


def test_equidistant_distortion_is_refused_as_unsupported_but_zeros_are_fine():
    with pytest.raises(CameraInfoError, match="'equidistant' is not supported"):
        intrinsics_from_camera_info(camera_info(d=[0.1, 0.0, 0.0, 0.0], model="equidistant"))
    assert intrinsics_from_camera_info(camera_info(d=[0.0] * 4, model="equidistant")).distortion.size == 4


def test_stamp_gap_problem_uses_the_image_limits_and_zero_means_none():
    assert stamp_gap_problem(0.5, 1.0, 1.0) is None and stamp_gap_problem(-0.5, 1.0, 1.0) is None
    assert "1000.000 s before its arrival" in stamp_gap_problem(1000.0, 1.0, 1.0)
    assert "3600.000 s ahead of its arrival" in stamp_gap_problem(-3600.0, 1.0, 1.0)
    assert stamp_gap_problem(1000.0, 0.0, 0.0) is None and stamp_gap_problem(-3600.0, 0.0, 0.0) is None

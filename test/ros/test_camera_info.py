"""CameraInfo -> intrinsics for the refinement stage: validation, scaling, stamp pairing."""
import numpy as np
import pytest
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CameraInfo

from ros2_posenet.ros.camera_info import (
    CameraInfoBuffer,
    CameraInfoError,
    intrinsics_from_camera_info,
    intrinsics_mismatch,
)

K640 = np.array([[525.0, 0.0, 319.5], [0.0, 525.0, 239.5], [0.0, 0.0, 1.0]])


def camera_info(K=K640, width=640, height=480, sec=10, nanosec=0, d=(0.1, -0.05, 0.0, 0.0, 0.0)) -> CameraInfo:
    msg = CameraInfo(width=width, height=height, distortion_model="plumb_bob")
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
    np.testing.assert_allclose(half.K, [[262.5, 0, 159.75], [0, 262.5, 119.75], [0, 0, 1]])
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

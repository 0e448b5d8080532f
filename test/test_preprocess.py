"""The one principal-point convention for scaled images, checked against cv2.resize of rendered images.

Every path that scales intrinsics or pixel coordinates (the preprocessing, the loaders,
CameraInfo of a resized stream, feature detection on a shrunk image, the depth lift)
uses :func:`ros2_posenet.geometry.resized_pixel_coords`: OpenCV's pixel centres,
``u ↦ (u + 0.5)·s − 0.5``.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from helpers import room_pose
from ros2_posenet.geometry import scale_intrinsics
from ros2_posenet.data.synthetic import SyntheticScene, SyntheticSceneConfig
from ros2_posenet.geometry import resized_intrinsics
from ros2_posenet.preprocess import PreprocessConfig, Preprocessor

WIDTH, HEIGHT = 320, 240


@pytest.fixture(scope="module")
def view():
    """(scene, pose, K, inverse depth (H, W)) of a rendered view: 1/z is linear in pixels on planes, so
    interpolation by cv2.resize reproduces it exactly wherever the resized pixel stays on one plane."""
    scene = SyntheticScene(SyntheticSceneConfig(width=WIDTH, height=HEIGHT, num_points=0))
    T, K = room_pose(1.0, -1.0, 1.2, yaw_deg=30.0), scene.config.K
    return scene, T, K, 1.0 / scene.cast(T, K, WIDTH, HEIGHT)[0]


@pytest.mark.parametrize("size, interpolation", [((160, 120), cv2.INTER_AREA), ((240, 180), cv2.INTER_LINEAR),
                                                 ((640, 480), cv2.INTER_LINEAR)])
def test_resized_intrinsics_render_what_cv2_resize_makes(view, size, interpolation):
    """A render with the resized intrinsics equals cv2.resize of the full-size render.

    Mutation caught: scaling the principal point as ``cx·s`` (what CameraInfo scaling did) leaves a
    (s − 1)/2 px shift, measured here as a 1/z error 10⁴ times the float noise.
    """
    scene, T, K, inverse_depth = view
    resized = cv2.resize(inverse_depth, size, interpolation=interpolation)
    s = size[0] / WIDTH
    errors = {}
    for name, K_resized in (("opencv", resized_intrinsics(K, s, s)), ("cx*s", np.diag([s, s, 1.0]) @ K)):
        errors[name] = np.median(np.abs(resized - 1.0 / scene.cast(T, K_resized, *size)[0]))
    assert errors["opencv"] < 1e-6
    assert errors["cx*s"] > 3e-5  # the test tells the conventions apart


def test_every_path_scales_the_same_way():
    K = np.array([[500.0, 0.5, 318.7], [0.0, 505.0, 241.2], [0.0, 0.0, 1.0]])
    expected = resized_intrinsics(K, 0.5, 0.5)
    np.testing.assert_allclose(expected[:2, 2], [(318.7 + 0.5) / 2 - 0.5, (241.2 + 0.5) / 2 - 0.5])
    np.testing.assert_allclose(expected[0, :2], [250.0, 0.25])  # focal and skew scale with x
    np.testing.assert_allclose(scale_intrinsics(K, (640, 480), (320, 240)), expected)
    _, K_pre = Preprocessor(PreprocessConfig(resize=240, crop=224)).resize(np.zeros((480, 640, 3), np.uint8), K)
    np.testing.assert_allclose(K_pre, expected)
    camera_info = pytest.importorskip("ros2_posenet.ros.camera_info", exc_type=ImportError)
    resized_stream = camera_info.CameraIntrinsics(K, np.zeros(5), 640, 480).for_image(320, 240)
    np.testing.assert_allclose(resized_stream.K, expected)


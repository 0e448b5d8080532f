"""Local features: detection on a rendered view, matching a shifted copy, ratio/mutual checks, bad input."""
import cv2
import numpy as np
import pytest

from ros2_posenet.data.synthetic import SyntheticScene, SyntheticSceneConfig
from ros2_posenet.geometric.features import FeatureConfig, detect_features, match_features


@pytest.fixture(scope="module")
def view():
    scene = SyntheticScene(SyntheticSceneConfig(width=320, height=240, num_points=0))
    T = np.eye(4)
    T[:3, :3] = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # look along +x, z up
    T[:3, 3] = [-3.0, 0.5, 1.3]
    return scene.render(T)[0]


@pytest.mark.parametrize("kind", ["sift", "orb"])
def test_detect_shapes_cap_and_bounds(view, kind):
    config = FeatureConfig(type=kind, max_features=150)
    keypoints, descriptors = detect_features(view, config)
    assert 50 <= len(keypoints) <= 150
    assert keypoints.dtype == np.float32 and keypoints.shape == (len(keypoints), 2)
    assert descriptors.dtype == np.uint8 and descriptors.shape == (len(keypoints), config.descriptor_size)
    assert np.all(keypoints >= -0.5) and np.all(keypoints[:, 0] <= 319.5) and np.all(keypoints[:, 1] <= 239.5)
    gray_kp, _ = detect_features(cv2.cvtColor(view, cv2.COLOR_RGB2GRAY), config)
    np.testing.assert_allclose(gray_kp, keypoints)  # RGB is converted to grey, nothing else


@pytest.mark.parametrize("kind", ["sift", "orb"])
def test_matching_a_shifted_copy_finds_the_shift(view, kind):
    config = FeatureConfig(type=kind, max_features=500)
    shift = np.array([7.0, -4.0])
    moved = cv2.warpAffine(view, np.float32([[1, 0, shift[0]], [0, 1, shift[1]]]), (320, 240), borderMode=cv2.BORDER_REFLECT)
    kp_a, desc_a = detect_features(view, config)
    kp_b, desc_b = detect_features(moved, config)
    pairs = match_features(desc_a, desc_b, config)
    assert len(pairs) >= 40
    displacement = kp_b[pairs[:, 1]] - kp_a[pairs[:, 0]]
    # ORB keypoints come from a coarser pyramid (1.2 per level), so they are less precise than SIFT's.
    tolerance = 1.0 if kind == "sift" else 3.0
    correct = np.linalg.norm(displacement - shift, axis=1) < tolerance
    assert correct.mean() > 0.9
    assert len(np.unique(pairs[:, 0])) == len(pairs) and len(np.unique(pairs[:, 1])) == len(pairs)  # mutual: one-to-one


@pytest.mark.parametrize("kind", ["sift", "orb"])
def test_matching_agrees_with_opencv_brute_force(kind):
    rng = np.random.default_rng(0)
    size = FeatureConfig(type=kind).descriptor_size
    a = rng.integers(0, 256, (200, size)).astype(np.uint8)
    noise = rng.integers(0, 8, (120, size)).astype(np.uint8) if kind == "sift" else (rng.random((120, size)) < 0.05).astype(np.uint8)
    near = a[:120] + noise if kind == "sift" else a[:120] ^ noise  # ORB: flip a few low bits
    b = np.concatenate([near, rng.integers(0, 256, (150, size)).astype(np.uint8)])
    config = FeatureConfig(type=kind, ratio=0.9)
    ours = {tuple(p) for p in match_features(a, b, config).tolist()}
    norm, dtype = (cv2.NORM_L2, np.float32) if kind == "sift" else (cv2.NORM_HAMMING, np.uint8)
    matcher = cv2.BFMatcher(norm)
    af, bf = a.astype(dtype), b.astype(dtype)
    back = {m.queryIdx: m.trainIdx for m in matcher.match(bf, af)}
    reference = {(m[0].queryIdx, m[0].trainIdx) for m in matcher.knnMatch(af, bf, k=2)
                 if m[0].distance < 0.9 * m[1].distance and back[m[0].trainIdx] == m[0].queryIdx}
    assert ours == reference and len(ours) >= 100


def test_ratio_test_drops_ambiguous_features():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (10, 128)).astype(np.uint8)
    b = np.concatenate([a, a])  # every feature has two identical candidates
    assert len(match_features(a, b, FeatureConfig())) == 0
    assert len(match_features(a, a, FeatureConfig())) == 10
    assert len(match_features(a, a[:1], FeatureConfig())) == 0  # nothing to compare a second neighbour with


def test_max_image_size_returns_full_resolution_coordinates(view):
    big = cv2.resize(view, (640, 480), interpolation=cv2.INTER_LINEAR)
    big_kp, big_desc = detect_features(big, FeatureConfig(max_features=200, max_image_size=320))
    small = cv2.resize(cv2.cvtColor(big, cv2.COLOR_RGB2GRAY), (320, 240), interpolation=cv2.INTER_AREA)
    small_kp, small_desc = detect_features(small, FeatureConfig(max_features=200))
    # Pixel centres sit at integers: a half-size pixel x covers full-size pixels 2x and 2x + 1.
    np.testing.assert_allclose(big_kp, (small_kp + 0.5) * 2 - 0.5, atol=1e-4)
    np.testing.assert_array_equal(big_desc, small_desc)
    assert np.all(big_kp.max(0) > [320, 240])  # spread over the full-size image


def test_bad_input_and_config_raise():
    with pytest.raises(ValueError, match="uint8"):
        detect_features(np.zeros((20, 20, 3), np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        detect_features(np.zeros((20, 20, 4), np.uint8))
    with pytest.raises(ValueError, match="type"):
        FeatureConfig(type="surf")
    with pytest.raises(ValueError, match="ratio"):
        FeatureConfig(ratio=1.5)
    with pytest.raises(ValueError, match="unknown key 'nfeatures'"):
        FeatureConfig.from_dict({"type": "sift", "nfeatures": 3})
    with pytest.raises(ValueError, match="descriptors must be"):
        match_features(np.zeros((3, 32), np.uint8), np.zeros((3, 32), np.uint8), FeatureConfig())
    assert FeatureConfig.from_dict(FeatureConfig(type="orb").to_dict()) == FeatureConfig(type="orb")
    kp, desc = detect_features(np.full((60, 80, 3), 128, np.uint8))  # a blank image has no features
    assert kp.shape == (0, 2) and desc.shape == (0, 128)

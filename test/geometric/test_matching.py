"""Grid-indexed guided matching: the same pairs as the dense features x projections window matrix."""
import numpy as np
import pytest

from ros2_posenet.geometric.features import FeatureConfig
from ros2_posenet.geometric.matching import guided_matches, guided_matches_dense, pairs_within


def _scene(rng, kind: str, n_query=600, n_map=2500, true=400):
    """Random features and projections, ``true`` of them the same descriptor a few pixels away."""
    size = FeatureConfig(type=kind).descriptor_size
    keypoints = rng.uniform(0, [640, 480], (n_query, 2)).astype(np.float32)
    projections = rng.uniform(0, [640, 480], (n_map, 2))
    query = rng.integers(0, 256, (n_query, size), dtype=np.uint8)
    mapped = rng.integers(0, 256, (n_map, size), dtype=np.uint8)
    mapped[:true] = query[:true]
    mapped[true // 2 : true] ^= rng.integers(0, 2, (true - true // 2, size), dtype=np.uint8) * 16  # near, not equal
    projections[:true] = keypoints[:true] + rng.normal(0, 4, (true, 2))
    return keypoints, query, projections, mapped


@pytest.mark.parametrize("kind", ["sift", "orb"])
@pytest.mark.parametrize("window", [4.0, 12.0, 40.0])
def test_grid_guided_matching_gives_the_dense_matches(kind, window):
    rng = np.random.default_rng(int(window) + len(kind))
    keypoints, query, projections, mapped = _scene(rng, kind)
    config = FeatureConfig(type=kind)
    grid = guided_matches(keypoints, query, projections, mapped, window, config, 0.9)
    dense = guided_matches_dense(keypoints, query, projections, mapped, window, config, 0.9)
    assert len(dense) > 50
    np.testing.assert_array_equal(grid[np.lexsort(grid.T[::-1])], dense[np.lexsort(dense.T[::-1])])


def test_pairs_within_finds_exactly_the_pairs_inside_the_radius():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(-50, 300, (300, 2)), rng.uniform(-50, 300, (400, 2))
    ia, ib = pairs_within(a, b, 9.5)
    d2 = ((a[:, None].astype(np.float32) - b[None].astype(np.float32)) ** 2).sum(-1)
    expected = set(zip(*np.nonzero(d2 <= np.float32(9.5) ** 2)))
    assert set(zip(ia.tolist(), ib.tolist())) == expected and len(ia) == len(expected) > 100


def test_guided_matching_without_candidates_is_empty_and_checks_its_inputs():
    config = FeatureConfig()
    none = guided_matches(np.zeros((0, 2)), np.zeros((0, 128), np.uint8), np.ones((5, 2)), np.ones((5, 128), np.uint8), 12.0, config, 0.9)
    far = guided_matches(np.zeros((3, 2)), np.ones((3, 128), np.uint8), np.full((5, 2), 500.0), np.ones((5, 128), np.uint8), 12.0, config, 0.9)
    assert none.shape == far.shape == (0, 2)
    with pytest.raises(ValueError, match="radius"):
        pairs_within(np.zeros((2, 2)), np.zeros((2, 2)), 0.0)
    with pytest.raises(ValueError, match=r"\(N, 128\)"):
        guided_matches(np.zeros((3, 2)), np.ones((3, 32), np.uint8), np.zeros((5, 2)), np.ones((5, 128), np.uint8), 12.0, config, 0.9)

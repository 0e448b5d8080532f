"""Error metrics, baselines on tensors, report files and plots of the evaluation module."""
import json
import math

import numpy as np
import pytest
import torch
import transforms3d.quaternions as t3q

from ros2_posenet.baselines import (
    MeanPoseBaseline,
    NearestNeighbourBaseline,
    average_quaternion,
)
from ros2_posenet.evaluate import format_table, write_results
from ros2_posenet.geometric.retrieval import tiny_image_descriptor
from ros2_posenet.metrics import pose_errors, summarize_errors, threshold_key
from ros2_posenet.plots import plot_error_cdfs, plot_trajectory, top_down_axes


def axis_angle_quat(axis, degrees):
    return torch.tensor(t3q.axangle2quat(axis, math.radians(degrees)), dtype=torch.float64)


def test_rotation_error_is_the_geodesic_angle_not_an_euler_difference():
    # 30° about an oblique axis: Euler-angle differences would not add up to 30.
    q_true = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    q_pred = axis_angle_quat([1.0, 1.0, 1.0], 30.0)[None]
    _, rot = pose_errors(torch.zeros(1, 3), q_pred, torch.zeros(1, 3), q_true)
    assert rot[0] == pytest.approx(30.0, abs=1e-6)
    # q and -q are the same rotation.
    _, rot = pose_errors(torch.zeros(1, 3), -q_pred, torch.zeros(1, 3), q_pred)
    assert rot[0] == pytest.approx(0.0, abs=1e-4)


def test_summary_medians_means_and_threshold_shares():
    pos = np.array([0.1, 0.3, 0.4, 6.0])
    rot = np.array([1.0, 1.0, 4.0, 1.0])
    s = summarize_errors(pos, rot)
    assert s["frames"] == 4
    assert s["median_position_m"] == pytest.approx(0.35)
    assert s["mean_rotation_deg"] == pytest.approx(1.75)
    assert s[threshold_key(0.25, 2)] == pytest.approx(0.25)  # only frame 0
    assert s[threshold_key(0.5, 5)] == pytest.approx(0.75)  # frames 0-2
    assert s[threshold_key(5, 10)] == pytest.approx(0.75)  # 6 m is outside


def test_summary_rejects_mismatched_arrays():
    with pytest.raises(ValueError, match="error arrays"):
        summarize_errors(np.zeros(3), np.zeros(4))


def test_average_quaternion_ignores_sign_and_recovers_the_mean_rotation():
    centre = axis_angle_quat([0, 0, 1], 40.0)
    around = [t3q.qmult(centre.numpy(), t3q.axangle2quat([1, 0, 0], math.radians(d))) for d in (-5, 5)]
    q = torch.tensor(np.array([around[0], -around[1]]))  # one sign flipped
    avg = average_quaternion(q)
    assert avg[0] >= 0
    _, err = pose_errors(torch.zeros(1, 3), avg[None], torch.zeros(1, 3), centre[None])
    assert err[0] < 1e-6


def test_mean_pose_baseline_predicts_the_training_mean_everywhere():
    t = torch.tensor([[0.0, 0, 0], [2.0, 4, 6]])
    q = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])
    pred_t, pred_q = MeanPoseBaseline(t, q).predict(3)
    assert pred_t.shape == (3, 3) and pred_q.shape == (3, 4)
    torch.testing.assert_close(pred_t, torch.tensor([[1.0, 2, 3]]).expand(3, 3))
    torch.testing.assert_close(pred_q, torch.tensor([[1.0, 0, 0, 0]]).expand(3, 4))


def test_nearest_neighbour_retrieves_the_matching_training_image():
    rng = np.random.default_rng(0)
    train_images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(5)]
    train_desc = torch.from_numpy(np.stack([tiny_image_descriptor(im) for im in train_images]))
    train_t = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    train_q = torch.tensor([[1.0, 0, 0, 0]]).repeat(5, 1)
    nn_baseline = NearestNeighbourBaseline(train_desc, train_t, train_q)
    # Queries: training images 3 and 1 under a global brightness/contrast change.
    queries = [np.clip(train_images[i].astype(float) * 0.7 + 20, 0, 255).astype(np.uint8) for i in (3, 1)]
    query_desc = torch.from_numpy(np.stack([tiny_image_descriptor(im) for im in queries]))
    pred_t, _ = nn_baseline.predict(query_desc)
    torch.testing.assert_close(pred_t, train_t[[3, 1]])


def test_tiny_descriptor_is_unit_length_and_checks_its_input():
    d = tiny_image_descriptor(np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    assert d.shape == (16 * 16 * 3,) and np.linalg.norm(d) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError):
        tiny_image_descriptor(np.zeros((30, 40), dtype=np.uint8))


def test_table_json_and_csv_reports(tmp_path):
    summary = summarize_errors(np.array([0.1, 0.2]), np.array([1.0, 3.0]))
    results = [{"scene": "street", "split": "test", "methods": {"posenet": summary, "mean pose": summary}}]
    table = format_table(results)
    assert "street" in table and "mean pose" in table and "0.150" in table and "50.0%" in table
    paths = write_results(results, tmp_path)
    assert json.loads(paths["json"].read_text())[0]["methods"]["posenet"]["median_position_m"] == pytest.approx(0.15)
    rows = paths["csv"].read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("scene,split,method,frames")


def test_plots_write_pngs(tmp_path):
    rng = np.random.default_rng(0)
    true_t = np.cumsum(rng.normal(size=(30, 3)) * [1.0, 1.0, 0.05], axis=0)
    pred_t = true_t + rng.normal(scale=0.2, size=true_t.shape)
    cdf = plot_error_cdfs({"posenet": (rng.random(30), rng.random(30) * 5)}, tmp_path / "cdf.png")
    traj = plot_trajectory(true_t, pred_t, tmp_path / "traj.png")
    for path in (cdf, traj):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_top_down_view_drops_the_axis_with_least_motion():
    rng = np.random.default_rng(0)
    positions = np.c_[rng.normal(size=50) * 5, rng.normal(size=50) * 0.01, rng.normal(size=50) * 3]
    axes = top_down_axes(positions)
    assert axes.shape == (3, 2)
    assert np.abs(axes[1]).max() < 0.05  # the nearly constant y axis is projected away

"""The covariance model of refined poses (scale + floor + cross terms), its fit, and calibration on held-out parts of the trajectory."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ros2_posenet.covariance import CovarianceModel, calibration_metrics, fit_covariance_model
from ros2_posenet.geometric.map_builder import calibration_folds, without_keyframes
from ros2_posenet.geometric.refiner import RefinementConfig, Refiner, map_covariance_model


def _correlated_unit_covariances(n: int, seed: int = 0) -> np.ndarray:
    """Per-frame 6x6 covariances of very different sizes with strong position-rotation correlation (like PnP's)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 6, 6))
    a[:, 3:] += a[:, :3]  # rotation rows follow position rows: |correlation| ~ 0.7
    size = np.exp(rng.normal(size=(n, 1, 1)))
    return a @ a.transpose(0, 2, 1) * size * 1e-4


def _draw(cov: np.ndarray, rng) -> np.ndarray:
    return np.einsum("nij,nj->ni", np.linalg.cholesky(cov), rng.normal(size=cov.shape[:2]))


def _inside_95(residuals, cov) -> dict:
    m = calibration_metrics(torch.from_numpy(residuals), torch.from_numpy(cov))
    return {k: m[f"{k}_within_95"] for k in ("position", "rotation", "joint")}


@pytest.mark.parametrize("truth", [
    CovarianceModel(4.0, 0.25, 0.0, 0.0, 1.0),  # pixel noise only: a scale, PnP's correlation
    CovarianceModel(2.0, 1.0, 0.02, 0.01, 0.0),  # plus map errors that do not shrink with inliers nor correlate
])
def test_the_fitted_model_covers_fresh_frames_drawn_from_the_truth(truth):
    rng = np.random.default_rng(1)
    unit = _correlated_unit_covariances(300)
    fitted = fit_covariance_model(_draw(truth.apply(unit), rng), unit)
    fresh = _draw(truth.apply(unit), rng)
    inside = _inside_95(fresh, fitted.apply(unit))
    assert all(0.9 <= share <= 0.99 for share in inside.values()), (fitted, inside)
    assert abs(fitted.cross - truth.cross) <= 0.25
    # A scale alone cannot describe a floor: frames with many inliers (small unit covariance) fall outside.
    if truth.position_floor_m:
        assert fitted.position_floor_m > 0.5 * truth.position_floor_m
        scale_only = CovarianceModel(fitted.position_scale, fitted.rotation_scale)
        assert _inside_95(fresh, scale_only.apply(unit))["position"] < 0.85


def test_one_gross_error_does_not_set_the_model():
    rng = np.random.default_rng(2)
    unit = _correlated_unit_covariances(200, seed=3)
    truth = CovarianceModel(1.0, 1.0)
    residuals = _draw(truth.apply(unit), rng)
    clean = fit_covariance_model(residuals, unit)
    residuals[0] *= 1e4  # a wrong pose among the calibration frames
    spoiled = fit_covariance_model(residuals, unit)
    assert spoiled.position_scale == pytest.approx(clean.position_scale, rel=0.3)
    assert spoiled.rotation_scale == pytest.approx(clean.rotation_scale, rel=0.3)


def test_model_is_positive_definite_round_trips_and_refuses_bad_values():
    unit = _correlated_unit_covariances(50)
    cov = CovarianceModel(3.0, 0.5, 0.01, 0.002, 0.4).apply(unit)
    np.testing.assert_allclose(cov, cov.transpose(0, 2, 1))
    assert np.linalg.eigvalsh(cov).min() > 0
    np.testing.assert_allclose(CovarianceModel().apply(unit), unit)
    model = CovarianceModel(3.0, 0.5, 0.01, 0.002, 0.4)
    assert CovarianceModel.from_dict(model.to_dict()) == model
    with pytest.raises(ValueError, match="cross"):
        CovarianceModel(cross=1.5)
    with pytest.raises(ValueError):
        CovarianceModel(position_floor_m=float("nan"))
    with pytest.raises(ValueError, match="unknown"):
        CovarianceModel.from_dict({"scale": 2.0})
    with pytest.raises(ValueError, match="without held-out frames"):
        fit_covariance_model(np.zeros((0, 6)), np.zeros((0, 6, 6)))


def test_calibration_folds_leave_out_whole_sequences_or_blocks_of_one_sequence():
    six = [f"seq-0{k}" for k in range(1, 7) for _ in range(20)]
    used, parts = calibration_folds(six, "auto", folds=3)
    assert used == "sequences" and len(parts) == 3
    for part in parts:
        assert len({six[i] for i in part}) == 1 and len(part) == 20  # one whole sequence
    two = ["a"] * 100 + ["b"] * 40
    used, parts = calibration_folds(two, "auto", folds=4, block=15)
    assert used == "blocks" and len(parts) == 4
    for part in parts:
        assert len(part) == 15 and np.all(np.diff(part) == 1) and len({two[i] for i in part}) == 1
    assert len(set(np.concatenate(parts))) == 60  # disjoint
    _, tiny = calibration_folds(["a"] * 8, "blocks", folds=8, block=15)
    assert [list(p) for p in tiny] == [[i] for i in range(8)]  # leave-one-out on a handful of views
    with pytest.raises(ValueError, match="at least two"):
        calibration_folds(["a"] * 10, "sequences")
    with pytest.raises(ValueError, match="calibration split"):
        calibration_folds(["a"] * 10, "random")


def test_a_map_without_some_keyframes_and_the_model_the_refiner_publishes_with():
    from helpers import room_map

    _, scene_map = room_map(max_features=100)
    smaller = without_keyframes(scene_map, [0, 2])
    assert len(smaller) == len(scene_map) - 2 and smaller.names == scene_map.names[1:2] + scene_map.names[3:]
    np.testing.assert_array_equal(smaller.points3d[0], scene_map.points3d[1])
    with pytest.raises(ValueError, match="every keyframe"):
        without_keyframes(scene_map, range(len(scene_map)))
    model = CovarianceModel(2.0, 3.0, 0.01, 0.001, 0.5)
    scene_map.metadata["calibration"] = {"model": model.to_dict(), "covariance_scale": 2.0}
    assert Refiner(scene_map).covariance_model == model
    assert map_covariance_model(scene_map, RefinementConfig(covariance_scale=5.0)) == CovarianceModel(5.0, 5.0)
    scene_map.metadata["calibration"] = {"covariance_scale": 0.7}  # a map calibrated before the model existed
    assert Refiner(scene_map).covariance_model == CovarianceModel(0.7, 0.7)
    scene_map.metadata["calibration"] = {}
    assert Refiner(scene_map).covariance_model == CovarianceModel()


def test_calibration_priors_are_as_wrong_as_the_refiner_assumes_a_prior_to_be():
    """Without explicit priors, calibration moves each prior by a draw of ``default_prior_std_m`` / ``_deg``
    per axis (deployment's priors, not truth nudged): with priors assumed 20 m off, every correction
    exceeds a 1 m cap."""
    from helpers import ROOM_K, room_map, room_pose

    from ros2_posenet.geometric.refiner import calibration_residuals

    scene, scene_map = room_map(max_features=300)
    poses = [room_pose(x, 0.5, 1.3, 10.0) for x in (-3.75, -3.25, -2.75)]  # between the keyframes
    samples = [(scene.render(T, ROOM_K, 320, 240)[0], ROOM_K, T) for T in poses]
    near = calibration_residuals(scene_map, samples, RefinementConfig(default_prior_std_m=0.05, default_prior_std_deg=1.0))
    assert near["frames"] == 3 and len(near["residuals"]) == 3
    assert np.abs(near["residuals"][:, :3]).max() < 0.05
    assert near["focal_ratios"].shape == (3,) and np.abs(near["focal_ratios"] - 1).max() < 0.02  # the map's K is right
    lost = RefinementConfig(default_prior_std_m=20.0, default_prior_std_deg=1.0, max_correction_m=1.0)
    assert len(calibration_residuals(scene_map, samples, lost)["residuals"]) == 0
    # Explicit priors (as before issue 22: truth moved 0.3 m, 5°) are used whatever the config assumes.
    assert len(calibration_residuals(scene_map, samples, lost, prior_metres=0.05, prior_degrees=1.0)["residuals"]) == 3


def test_the_focal_scatter_is_stored_only_where_enough_frames_estimated_it():
    """Mutation: stored from a handful of ratios, or NaNs counted as estimates."""
    from ros2_posenet.geometric.pnp import focal_scatter
    from ros2_posenet.geometric.refiner import calibrate_covariance

    rng = np.random.default_rng(0)
    residuals, unit = rng.normal(0, 0.01, (12, 6)), np.broadcast_to(np.eye(6) * 1e-4, (12, 6, 6))
    ratios = 1 + rng.normal(0, 0.03, 12)
    stored = calibrate_covariance(residuals, unit, 12, focal_ratios=ratios)
    assert stored["focal_scatter"] == pytest.approx(focal_scatter(ratios))
    assert stored["median_focal_ratio"] == pytest.approx(float(np.median(ratios)))
    assert "focal_scatter" not in calibrate_covariance(residuals, unit, 12, focal_ratios=np.append(ratios[:9], [np.nan] * 3))
    assert "focal_scatter" not in calibrate_covariance(residuals, unit, 12)


# ----------------------------------------------------------------------------- a misregistered map, end to end


def _samples(dataset, indices):
    from ros2_posenet.geometric.map_builder import pose_matrix

    return [(dataset.load_image(int(i)), dataset.intrinsics(int(i)), pose_matrix(dataset, int(i))) for i in indices]


def _published(scene_map, frames, seed=0):
    """Residuals and published covariances of the refined frames (priors: truth moved 0.3 m, 10°)."""
    from ros2_posenet.geometric.refiner import perturb_pose, pose_difference

    refiner, rng = Refiner(scene_map), np.random.default_rng(seed)
    rows = [(T, refiner.refine(rgb, K, perturb_pose(T, 0.3, 10.0, rng), None)) for rgb, K, T in frames]
    refined = [(pose_difference(r.T, T), r.covariance) for T, r in rows if r.refined]
    assert len(refined) >= 0.8 * len(frames)
    return np.array([d for d, _ in refined]), np.array([c for _, c in refined])


def test_a_misregistered_map_calibrated_on_left_out_passes_covers_a_new_run(tmp_path_factory):
    """Depth read 4, 3 px off the colour image: the errors come from the map, not from pixel noise.

    The old calibration (images between the keyframes, one scale = mean NEES / 6) is flattered by
    frames the map explains well (here 46 % inside the joint 95 % bound); leaving each training pass
    out of the map in turn sees what a new run sees.
    """
    from helpers import tiny_scene

    from ros2_posenet.data.synthetic import SyntheticSceneConfig
    from ros2_posenet.geometric.features import FeatureConfig
    from ros2_posenet.geometric.map_builder import (
        build_scene_map, calibrate_held_out, held_out_indices, open_dataset, pose_matrix, shifted_depth_lift_factory,
    )
    from ros2_posenet.geometric.refiner import calibration_residuals
    from ros2_posenet.geometric.scene_map import select_keyframes
    from ros2_posenet.covariance import nees

    # Three training passes: each is left out of the map in turn, as a new run would not be in it.
    root = tiny_scene(tmp_path_factory, "misregistered", SyntheticSceneConfig(
        width=320, height=240, frames_train=300, frames_test=60, train_sequences=3, num_points=200, formats=("7scenes",)))
    train, test = open_dataset("7scenes", root, "train"), open_dataset("7scenes", root, "test")
    keyframes = select_keyframes(np.stack([pose_matrix(train, i) for i in range(len(train))]), 0.25, 15.0)
    scene_map = build_scene_map(train, keyframes, FeatureConfig(max_features=500), "depth",
                                lift_factory=shifted_depth_lift_factory(4, 3))
    frames = _samples(test, range(len(test)))

    old = calibration_residuals(scene_map, _samples(train, held_out_indices(len(train), keyframes, 40)), prior_metres=0.3,
                                prior_degrees=5.0)  # as before issue 22
    old_scale = float(nees(torch.from_numpy(old["residuals"]), torch.from_numpy(old["unit"])).mean()) / 6
    scene_map.metadata["calibration"] = {"covariance_scale": old_scale}
    old_inside = _inside_95(*_published(scene_map, frames))

    calibration = calibrate_held_out(scene_map, train, keyframes, 40)
    assert calibration["method"] == "leave-sequences-out" and calibration["folds"] == 2 and calibration["frames"] == 40
    # How far right poses' focal estimates scatter on this map, for the focal check (a right K: median near 1).
    assert abs(calibration["median_focal_ratio"] - 1) < 0.02 and 0 < calibration["focal_scatter"] < 0.05, calibration
    scene_map.metadata["calibration"] = calibration
    residuals, covariance = _published(scene_map, frames)
    new_inside = _inside_95(residuals, covariance)
    assert all(0.85 <= share for share in new_inside.values()), (new_inside, old_inside)
    # ... and not by a covariance so wide that everything is inside every bound.
    assert calibration_metrics(torch.from_numpy(residuals), torch.from_numpy(covariance))["joint_within_68"] <= 0.95
    assert old_inside["joint"] < 0.6 and new_inside["joint"] > old_inside["joint"] + 0.3, old_inside


def test_a_triangulated_map_left_out_for_calibration_is_triangulated_again_without_those_keyframes(tmp_path_factory):
    """A calibration frame must not be refined against points its own observations placed: the map a fold refines
    against is the map built without the fold's keyframes (triangulated), or the others' own points (depth)."""
    from helpers import tiny_scene

    from ros2_posenet.geometric.features import FeatureConfig
    from ros2_posenet.geometric.map_builder import LeaveOut, build_scene_map, open_dataset, pose_matrix
    from ros2_posenet.geometric.scene_map import select_keyframes

    train = open_dataset("7scenes", tiny_scene(tmp_path_factory, "left_out"), "train")
    keyframes = select_keyframes(np.stack([pose_matrix(train, i) for i in range(len(train))]), 0.1, 5.0)
    features, drop = FeatureConfig(max_features=400), [1, 2]
    full = build_scene_map(train, keyframes, features, "triangulation")
    left_out = LeaveOut(full, train, keyframes)(drop)
    built_without = build_scene_map(train, np.delete(keyframes, drop), features, "triangulation")
    assert left_out.names == built_without.names and left_out.num_points == built_without.num_points > 0
    for ours, theirs in zip(left_out.points3d, built_without.points3d):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
    # Only dropping the keyframes keeps points that the dropped ones helped place (or that only they confirmed).
    plain = without_keyframes(full, drop)
    assert any(len(a) != len(b) or not np.allclose(a, b, atol=1e-6) for a, b in zip(plain.points3d, left_out.points3d))

    with pytest.raises(ValueError, match="keyframes"):
        LeaveOut(full, train, keyframes[:-1])
    with pytest.raises(ValueError, match="keyframes"):
        LeaveOut(full, train, keyframes[::-1])(drop)  # the same images, not in the map's order

    depth = build_scene_map(train, keyframes, features, "depth")
    depth_left_out = LeaveOut(depth, train, keyframes)(drop)
    assert depth_left_out.names == without_keyframes(depth, drop).names
    np.testing.assert_array_equal(depth_left_out.points3d[0], depth.points3d[0])


def test_build_map_stores_how_the_covariance_was_calibrated(tmp_path_factory, tmp_path, capsys):
    from helpers import tiny_scene

    from ros2_posenet.geometric.scene_map import SceneMap
    from ros2_posenet.tools import build_map

    root = tiny_scene(tmp_path_factory, "calibrated_map")
    out = tmp_path / "map.npz"
    assert build_map.main(["--dataset", "7scenes", "--root", str(root), "--out", str(out), "--quiet", "--min-distance", "0.1",
                           "--calibrate", "4", "--calibrate-split", "blocks", "--calibrate-folds", "2",
                           "--calibrate-block", "3"]) == 0
    calibration = SceneMap.load(out).metadata["calibration"]
    assert calibration["method"] == "leave-blocks-out" and calibration["folds"] == 2 and calibration["frames"] == 4
    assert calibration["block"] == 3 and 0 <= calibration["refined"] <= 4
    CovarianceModel.from_dict(calibration["model"])  # a model the refiner can apply
    assert "covariance calibrated leave-blocks-out on" in capsys.readouterr().out
    assert build_map.main(["--dataset", "7scenes", "--root", str(root), "--out", str(out), "--calibrate-folds", "0"]) == 2
    assert "--calibrate-folds" in capsys.readouterr().err

"""Geometric refinement: PnP on exact correspondences, covariance, refining a perturbed prior, fallbacks, evaluate --map."""
import json
from dataclasses import replace

import numpy as np
import pytest

from helpers import ROOM_K, room_map, room_pose, tiny_scene, untrained_checkpoint
from ros2_posenet.evaluate import METHOD_MODEL, METHOD_REFINED, METHOD_RETRIEVAL_REFINED, main as evaluate_main
from ros2_posenet.preprocess import PreprocessConfig
from ros2_posenet.geometric.pnp import SOLVERS, geometric_covariance, reprojection_jacobian, solve_absolute_pose
from ros2_posenet.geometric.refiner import RefinementConfig, Refiner, perturb_pose, pose_difference
from ros2_posenet.tools import build_map

K = ROOM_K
pose = room_pose


def errors(T, T_true):
    d = pose_difference(T, T_true)
    return float(np.linalg.norm(d[:3])), float(np.degrees(np.linalg.norm(d[3:])))


def project(T, points):
    cam = (points - T[:3, 3]) @ T[:3, :3]
    return cam[:, :2] / cam[:, 2:] @ K[:2, :2].T + K[:2, 2]


@pytest.fixture(scope="module")
def room():
    return room_map()


def query(room, T):
    return room[0].render(T, K, 320, 240)[0]


@pytest.mark.parametrize("solver", SOLVERS)
def test_pnp_on_exactly_projected_correspondences_recovers_the_pose(solver):
    rng = np.random.default_rng(0)
    T_true = pose(1.0, -2.0, 1.2, yaw_deg=33.0)
    T_true[:3, :3] = T_true[:3, :3] @ np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])
    cam = np.column_stack((rng.uniform(-2, 2, 200), rng.uniform(-1.5, 1.5, 200), rng.uniform(2, 8, 200)))
    points = cam @ T_true[:3, :3].T + T_true[:3, 3]
    pixels = project(T_true, points)
    outliers = rng.random(200) < 0.4
    pixels[outliers] = rng.uniform(0, 320, (outliers.sum(), 2))  # 40 % wrong matches
    T, inliers = solve_absolute_pose(pixels, points, K, (320, 240), 2.0, solver)
    metres, degrees = errors(T, T_true)
    assert metres < 1e-6 and degrees < 1e-6
    np.testing.assert_array_equal(inliers[~outliers], True)
    assert inliers[outliers].mean() < 0.05  # a random pixel rarely lands within 2 px of the truth


def test_too_few_correspondences_give_no_pose():
    T, inliers = solve_absolute_pose(np.zeros((5, 2)), np.ones((5, 3)), K, (320, 240))
    assert T is None and inliers.shape == (5,) and not inliers.any()


def test_jacobian_matches_finite_differences():
    rng = np.random.default_rng(1)
    T = pose(0.3, 0.2, 1.0, yaw_deg=12.0)
    points = np.column_stack((rng.uniform(-1, 1, 10), rng.uniform(-1, 1, 10), rng.uniform(2, 5, 10))) @ T[:3, :3].T + T[:3, 3]
    uv, J = reprojection_jacobian(T, K, points)
    import cv2

    eps = 1e-6
    for k in range(6):
        delta = np.zeros(6)
        delta[k] = eps
        moved = T.copy()
        moved[:3, 3] += delta[:3]
        moved[:3, :3] = cv2.Rodrigues(delta[3:])[0] @ T[:3, :3]  # rotation about the map axes
        np.testing.assert_allclose((project(moved, points) - uv) / eps, J[:, :, k], rtol=1e-3, atol=1e-3)


def test_geometric_covariance_predicts_the_spread_of_noisy_solutions():
    rng = np.random.default_rng(2)
    T_true = pose(0.0, 0.0, 1.0)
    points = np.column_stack((rng.uniform(-2, 2, 80), rng.uniform(-1.5, 1.5, 80), rng.uniform(3, 6, 80))) @ T_true[:3, :3].T + T_true[:3, 3]
    clean = project(T_true, points)
    deltas, predicted = [], []
    for _ in range(60):
        noisy = clean + rng.normal(scale=0.7, size=clean.shape)
        T, inliers = solve_absolute_pose(noisy, points, K, (320, 240), 4.0, "opencv")
        deltas.append(pose_difference(T, T_true))
        predicted.append(geometric_covariance(T, K, noisy[inliers], points[inliers]))
    empirical = np.cov(np.array(deltas).T, bias=True)
    ratio = np.diag(empirical) / np.diag(np.mean(predicted, axis=0))
    assert np.all((ratio > 0.4) & (ratio < 2.5)), ratio


def test_a_perturbed_prior_is_refined_back(room):
    rng = np.random.default_rng(3)
    refiner = Refiner(room[1], RefinementConfig(retrieval=False))
    for T_true in (pose(-2.8, 0.6, 1.35, 10.0), pose(-2.2, 0.3, 1.25, -15.0)):
        prior = perturb_pose(T_true, 0.5, 10.0, rng)
        result = refiner.refine(query(room, T_true), K, prior, np.diag([0.25] * 3 + [0.03] * 3))
        assert result.status == "refined", result.reason
        metres, degrees = errors(result.T, T_true)
        assert metres < 0.02 and degrees < 0.3
        assert result.inliers >= 30 and result.source == "prior" and result.attempts == result.attempts[:1]
        assert len(result.attempts[0][1]) == 4 and result.keyframes_used[:4] == result.attempts[0][1]
        assert result.correction[0] == pytest.approx(0.5, abs=0.03)
        std = np.sqrt(np.diag(result.covariance))
        assert np.all(std[:3] < 0.05) and np.all(std[:3] >= 0.002)  # certain, but never beyond the floor
        assert set(result.timing_ms) == {"features", "matching", "pose", "total"}


def test_a_prior_in_the_wrong_place_falls_back_and_says_so(room):
    T_true = pose(-2.5, 0.5, 1.3)
    prior = pose(3.0, -2.0, 1.3, yaw_deg=180.0)  # the other side of the room, looking back
    prior_cov = np.diag([1.0] * 3 + [0.1] * 3)
    result = Refiner(room[1], RefinementConfig(retrieval=False)).refine(query(room, T_true), K, prior, prior_cov)
    assert result.status == "fallback" and "no keyframe" in result.reason
    np.testing.assert_array_equal(result.T, prior)
    np.testing.assert_array_equal(result.covariance, prior_cov)
    # 3.6 m and 60° off: its keyframes still see some of the view, and the pose found there is refused by the gate.
    far = pose(-4.5, 3.5, 1.3, yaw_deg=-60.0)
    gate_only = RefinementConfig(retrieval=False, neighbourhood_confirms=False, max_keyframe_angle_deg=90)
    result = Refiner(room[1], gate_only).refine(query(room, T_true), K, far, None)
    assert result.status == "fallback" and result.covariance is None
    assert "disagrees with the prior by 3.6" in result.reason
    # The keyframes around the refused pose, none of which made it, find the same pose: the prior was wrong.
    confirmed = Refiner(room[1], gate_only.replace(neighbourhood_confirms=True)).refine(query(room, T_true), K, far, None)
    assert confirmed.status == "refined" and confirmed.source == "neighbourhood", confirmed.reason
    assert "confirms the pose the gate refused" in confirmed.reason and errors(confirmed.T, T_true)[0] < 0.02
    (_, made), (_, around) = confirmed.attempts  # keyframes_used is de-duplicated: it could not show an overlap
    assert not set(made) & set(around)


def test_a_wrong_pose_from_a_misregistered_part_of_the_map_is_not_confirmed(room):
    """Keyframes whose 3D points sit 0.4 m off give a consistent but wrong pose; the rest of the map disagrees."""
    T_true = pose(-2.5, 0.5, 1.3)
    settings = RefinementConfig(retrieval=False)
    near = room[1].nearest_keyframes(T_true, settings.keyframes, settings.metres_per_radian, settings.max_keyframe_angle_deg)
    shifted = [p + np.float32([0.4, 0.0, 0.0]) if i in near else p for i, p in enumerate(room[1].points3d)]
    refiner = Refiner(replace(room[1], points3d=shifted), settings)
    confident = np.diag([0.02**2] * 3 + [np.radians(1.0) ** 2] * 3)
    result = refiner.refine(query(room, T_true), K, T_true, confident)
    assert result.status == "fallback", result.reason
    np.testing.assert_array_equal(result.T, T_true)
    assert "disagrees with the prior by 0.4" in result.reason and "keyframes around it gave another pose, 0.4" in result.reason


def test_retrieval_finds_the_pose_when_the_prior_is_wrong_or_missing(room):
    T_true = pose(-2.5, 0.5, 1.3, 5.0)
    rgb = query(room, T_true)
    refiner = Refiner(room[1], RefinementConfig())
    for prior in (pose(3.0, -2.0, 1.3, 180.0), None):
        result = refiner.refine(rgb, K, prior)
        assert result.status == "refined" and result.source == "retrieval", result.reason
        assert errors(result.T, T_true)[0] < 0.02
    assert "the prior was" in refiner.refine(rgb, K, pose(3.0, -2.0, 1.3, 180.0)).reason


def test_a_refinement_that_disagrees_with_a_confident_prior_is_gated(room):
    T_true = pose(-2.5, 0.5, 1.3)
    rgb = query(room, T_true)
    prior = perturb_pose(T_true, 0.5, 10.0, np.random.default_rng(4))
    confident = np.diag([0.01**2] * 3 + [np.radians(0.5) ** 2] * 3)  # claims 1 cm, but is 0.5 m off
    gate_only = RefinementConfig(neighbourhood_confirms=False, retrieval_confirms=False)
    result = Refiner(room[1], gate_only).refine(rgb, K, prior, confident)
    assert result.status == "fallback" and "disagrees with the prior" in result.reason
    np.testing.assert_array_equal(result.T, prior)
    assert result.inliers >= 30  # the geometry was fine; the gate refused it
    # Keyframes that did not make the pose find the same one: the prior was wrong, the pose is kept.
    for settings, source in ((RefinementConfig(), "neighbourhood"), (gate_only.replace(retrieval_confirms=True), "retrieval")):
        confirmed = Refiner(room[1], settings).refine(rgb, K, prior, confident)
        assert confirmed.status == "refined" and confirmed.source == source, confirmed.reason
        assert "confirms the pose the gate refused" in confirmed.reason and errors(confirmed.T, T_true)[0] < 0.02
    # An absolute cap is never overridden.
    capped = Refiner(room[1], RefinementConfig(max_correction_m=0.2)).refine(rgb, K, prior)
    assert capped.status == "fallback" and "max_correction_m" in capped.reason


def test_bad_arguments_raise(room):
    refiner = Refiner(room[1])
    rgb = np.zeros((240, 320, 3), np.uint8)
    with pytest.raises(ValueError, match="K must be"):
        refiner.refine(rgb, np.full((3, 3), np.nan), pose(0, 0, 1))
    with pytest.raises(ValueError, match="rigid"):
        refiner.refine(rgb, K, np.ones((4, 4)))
    with pytest.raises(ValueError, match="prior_covariance"):
        refiner.refine(rgb, K, pose(0, 0, 1), np.eye(3))
    with pytest.raises(ValueError, match="retrieval is off"):
        Refiner(room[1], RefinementConfig(retrieval=False)).refine(rgb, K, None)
    with pytest.raises(ValueError, match="solver"):
        RefinementConfig(solver="magic")
    with pytest.raises(ValueError, match="unknown key 'keyframe'"):
        RefinementConfig.from_dict({"keyframe": 3})
    blank = refiner.refine(rgb, K, pose(-2.5, 0.5, 1.3))  # no texture, no features: fallback, not an exception
    assert blank.status == "fallback" and "features" in blank.reason


def test_evaluate_with_a_map_adds_refined_rows(tmp_path_factory, tmp_path, capsys):
    root = tiny_scene(tmp_path_factory, "eval_map_scene")
    map_file = tmp_path / "scene.npz"
    assert build_map.main(["--dataset", "7scenes", "--root", str(root), "--out", str(map_file), "--quiet",
                           "--min-distance", "0.1", "--calibrate", "0"]) == 0
    ckpt = untrained_checkpoint(tmp_path / "model.pt", [0.0, 0.0, 1.2], PreprocessConfig(resize=32, crop=32))
    out = tmp_path / "eval"
    settings = tmp_path / "refine.yaml"  # 160x120 views have few features: lower inlier counts
    # (and ~50 inliers at 160x120 do not pin the focal length: single frames scatter by 5-80 %, no calibration check)
    settings.write_text("min_inliers: 12\nretrieval_min_inliers: 15\nmax_focal_error: 0\n")
    assert evaluate_main(["--checkpoint", str(ckpt), "--dataset", "7scenes", "--root", str(root), "--map", str(map_file),
                          "--refine-config", str(settings), "--out", str(out), "--no-plots", "--no-baselines"]) == 0
    table = capsys.readouterr().out
    assert METHOD_REFINED in table and METHOD_RETRIEVAL_REFINED in table and "ms/frame" in table
    methods = json.loads((out / "results.json").read_text())[0]["methods"]
    assert set(methods) == {METHOD_MODEL, METHOD_REFINED, METHOD_RETRIEVAL_REFINED}
    for name in (METHOD_REFINED, METHOD_RETRIEVAL_REFINED):
        assert methods[name]["ms_per_frame"] > 0 and 0 <= methods[name]["refined_share"] <= 1
    # Retrieval + refinement does not depend on the (untrained) regressor: centimetres, even at 160x120
    # from 16 training images, where the regressor is metres off.
    assert methods[METHOD_RETRIEVAL_REFINED]["refined_share"] >= 0.6
    assert methods[METHOD_RETRIEVAL_REFINED]["median_position_m"] < 0.15
    assert methods[METHOD_MODEL]["median_position_m"] > 0.5
    assert "refined_share" in (out / "results.csv").read_text()
    # Calibration of what the node would publish: geometric covariance where refined, the prior's elsewhere.
    calibration = json.loads((out / "results.json").read_text())[0]["calibration_refined"]
    assert calibration["uncertainty"].startswith(METHOD_REFINED) and 0 <= calibration["position_within_95"] <= 1
    assert "geometric" in table

    # The test frames replayed as a 1 Hz stream (3.4-3.8 m apart: inside 4 sigma of the 1.5 m/s bound): after a
    # verified frame the next ones start from it.
    common = ["--checkpoint", str(ckpt), "--dataset", "7scenes", "--root", str(root), "--map", str(map_file),
              "--refine-config", str(settings), "--no-plots", "--no-baselines"]
    assert evaluate_main([*common, "--stream-rate", "1", "--out", str(tmp_path / "stream")]) == 0
    streamed = json.loads((tmp_path / "stream" / "results.json").read_text())[0]["methods"][METHOD_REFINED]
    assert 0 < streamed["tracked_share"] <= streamed["refined_share"]
    assert "tracked_share" not in methods[METHOD_REFINED]
    capsys.readouterr()
    assert evaluate_main([*common, "--stream-rate", "-1"]) == 2
    assert "positive" in capsys.readouterr().err

    assert evaluate_main(["--checkpoint", str(ckpt), "--dataset", "7scenes", "--root", str(root),
                          "--map", str(tmp_path / "absent.npz")]) == 2
    assert "build-map" in capsys.readouterr().err


def test_the_shipped_refine_yaml_holds_the_defaults():
    """config/refine.yaml documents the defaults: it must not drift from RefinementConfig."""
    from pathlib import Path

    shipped = RefinementConfig.from_yaml(Path(__file__).resolve().parents[2] / "config" / "refine.yaml")
    assert shipped == RefinementConfig()


def test_a_pose_made_by_far_keyframes_is_solved_again_with_the_nearest(room):
    """A wrong prior's keyframes see the place from afar, with fewer and less precise points (here 200 each, 3 cm
    off): their pose is 2-3 cm off; the keyframes nearest that pose, matched where it projects them, fix it."""
    T_true = pose(-2.6, 0.6, 1.3)
    prior = pose(-3.6, 0.6, 1.3)  # 1 m behind: its keyframes are not those nearest the truth
    wide = np.diag([1.7**2] * 3 + [np.radians(48.0) ** 2] * 3)
    # A map calibrated to its errors (std twice the pixel noise's): the two poses agree within its gate.
    settings = RefinementConfig(retrieval=False, wide_prior_cross_check=False, covariance_scale=4.0)
    near = set(room[1].nearest_keyframes(T_true, settings.keyframes, settings.metres_per_radian,
                                         settings.max_keyframe_angle_deg).tolist())
    prior_keyframes = set(room[1].nearest_keyframes(prior, settings.keyframes, settings.metres_per_radian,
                                                    settings.max_keyframe_angle_deg).tolist())
    assert near - prior_keyframes

    def refined(near_shift, local):
        kept = [slice(None) if i in near else slice(0, 200) for i in range(len(room[1].names))]
        points = [p[k] + np.float32(near_shift if i in near else [0, 0.03, 0])
                  for i, (p, k) in enumerate(zip(room[1].points3d, kept))]
        thinned = replace(room[1], points3d=points, keypoints=[p[k] for p, k in zip(room[1].keypoints, kept)],
                          descriptors=[d[k] for d, k in zip(room[1].descriptors, kept)])
        return Refiner(thinned, settings.replace(local_refinement=local)).refine(query(room, T_true), K, prior, wide)

    alone, local = refined([0, 0, 0], False), refined([0, 0, 0], True)
    assert alone.status == local.status == "refined", (alone.reason, local.reason)
    assert errors(alone.T, T_true)[0] > 0.015
    assert errors(local.T, T_true)[0] < 0.5 * errors(alone.T, T_true)[0], local.reason
    assert local.inliers > alone.inliers and "keyframes nearest the pose" in local.reason
    assert near <= set(local.keyframes_used)
    # Nearest keyframes that say another place (their part of the map 0.4 m off) leave the pose as it was.
    misregistered = refined([0.4, 0, 0], True)
    np.testing.assert_allclose(misregistered.T, refined([0.4, 0, 0], False).T)
    assert "keyframes nearest the pose" not in misregistered.reason

"""The main job end to end at toy size: scene -> both training stages -> evaluation -> real node over DDS -> report."""
import csv
import json

import pytest

import ros_fixtures
from ros2_posenet.evaluate import METHOD_REFINED
from ros2_posenet.tools.demo import main

ros_fixtures.isolate_ros_domain()


def test_demo_runs_end_to_end_and_the_node_agrees_with_offline_evaluation(tmp_path):
    run_dir, scene_dir = tmp_path / "run", tmp_path / "scene"
    rc = main([
        "--out", str(run_dir), "--scene", str(scene_dir), "--frames-train", "20", "--train-sequences", "1",
        "--frames-test", "6", "stages.learned.epochs=1", "stages.reprojection.epochs=1", "train.progress=false",
    ])
    assert rc == 0
    summary = json.loads((run_dir / "node_summary.json").read_text())
    assert summary["sent"] == summary["answered"] == 6
    offline = json.loads((run_dir / "eval" / "results.json").read_text())[0]["methods"]["posenet"]
    # The node publishes the camera body frame; compared with ground truth it must score what
    # the offline evaluation of the same checkpoint scored (same preprocessing, same frames).
    assert summary["median_position_m"] == pytest.approx(offline["median_position_m"], abs=1e-4)
    assert summary["median_rotation_deg"] == pytest.approx(offline["median_rotation_deg"], abs=1e-3)
    with (run_dir / "node_poses.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(r["frame_id"] == "map" for r in rows)
    report = (run_dir / "report.md").read_text()
    assert "answered 6 of 6 images" in report and "error_cdf" in report
    # The covariance an EKF is told, as the offline evaluation measured it on the test frames.
    calibration = json.loads((run_dir / "eval" / "results.json").read_text())[0]["calibration"]
    section = report.split("## Covariance on the test frames")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| posenet |"))
    assert f"| {calibration['joint_within_68']:.0%}/{calibration['joint_within_95']:.0%}/" in row

    # The node with the scene map refines as the offline evaluation does (same Refiner, same priors).
    refined = json.loads((run_dir / "node_summary_refined.json").read_text())
    assert refined["answered"] == 6 and refined["refined"] + refined["fallback"] == 6
    offline_refined = json.loads((run_dir / "eval" / "results.json").read_text())[0]["methods"][METHOD_REFINED]
    assert refined["refined"] == round(offline_refined["refined_share"] * 6)
    assert refined["median_position_m"] == pytest.approx(offline_refined["median_position_m"], abs=0.01)
    assert "The node with the scene map" in report

"""evaluate on a tiny synthetic scene: model + baselines, table, JSON/CSV, plots, CLI errors."""
import csv
import json

import numpy as np
import pytest
import torch

from ros2_posenet.checkpoint import save_checkpoint
from ros2_posenet.data import build_dataset
from ros2_posenet.data.synthetic import SyntheticSceneConfig, generate_scene
from ros2_posenet.evaluate import METHOD_MEAN, METHOD_MODEL, METHOD_NN, evaluate_checkpoint, main
from ros2_posenet.model import ModelConfig, PoseNet
from ros2_posenet.preprocess import PreprocessConfig


@pytest.fixture(scope="module")
def scene_and_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene")
    generate_scene(root, SyntheticSceneConfig(
        width=64, height=48, frames_train=10, frames_test=5, train_sequences=1, test_sequences=1, num_points=100,
    ))
    torch.manual_seed(0)
    model = PoseNet(ModelConfig(backbone="resnet18", hidden_dim=16, pretrained=False)).eval()
    model.set_position_offset(torch.tensor([0.5, -0.5, 1.2]))
    ckpt = save_checkpoint(root.parent / "model.pt", model, PreprocessConfig(resize=32, crop=32), map_frame="room")
    return root, ckpt


def test_cli_writes_table_json_csv_and_plots(scene_and_checkpoint, tmp_path, capsys):
    root, ckpt = scene_and_checkpoint
    out = tmp_path / "eval"
    assert main(["--checkpoint", str(ckpt), "--dataset", "7scenes", "--root", str(root), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for method in (METHOD_MODEL, METHOD_MEAN, METHOD_NN):
        assert method in table
    assert "med pos (m)" in table and "≤0.25m,2°" in table

    results = json.loads((out / "results.json").read_text())
    assert len(results) == 1 and results[0]["split"] == "test" and results[0]["map_frame"] == "room"
    methods = results[0]["methods"]
    assert set(methods) == {METHOD_MODEL, METHOD_MEAN, METHOD_NN}
    assert all(m["frames"] == 5 for m in methods.values())

    # The mean-pose row matches an independent computation from the pose files.
    train = build_dataset("7scenes", root, "train", max_points=0)
    test = build_dataset("7scenes", root, "test", max_points=0)
    expected = np.median(np.linalg.norm(test.positions() - train.positions().mean(0), axis=1))
    assert methods[METHOD_MEAN]["median_position_m"] == pytest.approx(expected, rel=1e-5)
    # The model predicts its bias-dominated pose; its row reflects what it outputs.
    assert methods[METHOD_MODEL]["median_position_m"] > 0

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == [METHOD_MODEL, METHOD_MEAN, METHOD_NN]
    scene = results[0]["scene"]
    with open(out / f"{scene}_frames.csv") as f:
        frames = list(csv.DictReader(f))
    assert len(frames) == 5 and frames[0]["image"].endswith(".color.png")
    assert float(frames[0]["true_qw"]) >= 0
    for name in ("error_cdf", "trajectory"):
        assert (out / f"{scene}_{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_nearest_neighbour_finds_each_training_image_itself(scene_and_checkpoint):
    root, ckpt = scene_and_checkpoint
    result = evaluate_checkpoint(ckpt, "7scenes", root, split="train", device="cpu")
    nn_row = result["methods"][METHOD_NN]
    assert nn_row["median_position_m"] == pytest.approx(0.0, abs=1e-6)
    assert nn_row["median_rotation_deg"] == pytest.approx(0.0, abs=0.05)
    assert nn_row["within_0.25m_2deg"] == 1.0
    assert result["files"] == {}  # nothing written without out_dir


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "missing.pt"], "does not exist"),
        (["--checkpoint", "CKPT", "--checkpoint", "CKPT", "--root", "ROOT", "--root", "ROOT", "--root", "ROOT"], "one --checkpoint per --root"),
        (["--checkpoint", "CKPT", "--dataset", "kitti"], "dataset kind must be one of"),
        (["--checkpoint", "CKPT", "--split", "val"], "split must be"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(scene_and_checkpoint, args, message, capsys):
    root, ckpt = scene_and_checkpoint
    args = [str(ckpt) if a == "CKPT" else str(root) if a == "ROOT" else a for a in args]
    if "--dataset" not in args:
        args += ["--dataset", "7scenes"]
    if "--root" not in args:
        args += ["--root", str(root)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err

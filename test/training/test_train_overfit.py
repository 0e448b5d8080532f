"""Training end to end on a tiny synthetic scene: overfitting, learned weights, two stages."""
import json

import pytest
import torch

from ros2_posenet.checkpoint import load_checkpoint
from helpers import tiny_scene as make_scene
from ros2_posenet.data.synthetic import SyntheticSceneConfig
from ros2_posenet.train import load_config, run_training


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory):
    return make_scene(tmp_path_factory, "scene", SyntheticSceneConfig(
        width=64, height=48, frames_train=8, frames_test=4, train_sequences=1, test_sequences=1, num_points=400,
    ))


def tiny_config(root, out_dir, *overrides):
    return load_config(None, [
        "data.kind=7scenes", f"data.root={root}", "data.max_points=32", "data.augment=false", "data.val=none",
        "model.backbone=resnet18", "model.hidden_dim=64", "model.dropout=0.0", "model.pretrained=false",
        "preprocess.resize=48", "preprocess.crop=48", "optim.batch_size=8", "optim.lr=1e-3", "optim.loss_lr=0.05",
        "train.workers=0", "train.progress=false", "train.test_at_end=false", f"train.out_dir={out_dir}",
        *overrides,
    ])


def read_log(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_overfitting_a_handful_of_images_drives_errors_near_zero(tiny_scene, tmp_path):
    # 40 px crops: ResNet-18 ends in 2x2 maps, so BatchNorm statistics (8 images x 4) stay usable in eval mode.
    cfg = tiny_config(
        tiny_scene, tmp_path, "loss.type=learned", "train.epochs=100", "preprocess.resize=40", "preprocess.crop=40",
        "optim.position_lr_scale=10",
    )
    result = run_training(cfg)
    log = read_log(tmp_path)
    assert len(log) == 100
    first, last = log[0], log[-1]
    assert last["loss_position"] < 0.05 * first["loss_position"]
    assert last["loss_rotation"] < 0.05 * first["loss_rotation"]
    # The learned weights move: ŝx follows the shrinking position residual down,
    # ŝq first rises while the rotation residual is large.
    assert last["sx"] < -0.25
    assert max(abs(r["sq"] + 3.0) for r in log) > 0.2

    # Errors of the saved model (eval mode) on the training images.
    from ros2_posenet.data import build_dataset
    from ros2_posenet.metrics import model_forward, pose_errors, predict_poses, summarize_errors
    from ros2_posenet.checkpoint import model_from_checkpoint, preprocess_from_checkpoint

    payload = load_checkpoint(result["checkpoint"])
    model = model_from_checkpoint(payload)
    train_set = build_dataset("7scenes", tiny_scene, "train", preprocess_from_checkpoint(payload), max_points=0)
    pred = predict_poses(model_forward(model, torch.device("cpu")), train_set)
    errors = summarize_errors(*pose_errors(pred["pred_t"], pred["pred_q"], pred["true_t"], pred["true_q"]))
    spread = (pred["true_t"] - pred["true_t"].mean(0)).norm(dim=1).median().item()
    assert errors["median_position_m"] < 0.1 * spread
    assert errors["median_rotation_deg"] < 5.0


def test_two_stage_schedule_fine_tunes_with_reprojection(tiny_scene, tmp_path):
    cfg = tiny_config(
        tiny_scene, tmp_path, "data.val=holdout", "data.val_fraction=0.25", "train.epochs=2",
        "stages.reprojection.epochs=3", "stages.reprojection.lr=1e-4", "map_frame=room",
    )
    result = run_training(cfg)
    assert set(result["stages"]) == {"learned", "reprojection"}
    assert result["checkpoint"] == str(tmp_path / "reprojection" / "best.pt")
    log = read_log(tmp_path)
    # Epoch 0 of the fine-tuning stage: validation of the weights it starts from.
    assert [(r["stage"], r["epoch"]) for r in log] == [("learned", 1), ("learned", 2)] + [("reprojection", e) for e in range(4)]
    assert log[2]["init"] == str(tmp_path / "learned" / "best.pt")
    reproj = [r["loss_reprojection"] for r in log[3:]]
    assert all(r["points"] > 0 for r in log[3:])
    assert reproj[-1] < reproj[0]
    assert all("val" in r for r in log)  # val_every=1

    # Stage 2 started from stage 1's best weights and trained with BatchNorm frozen (the
    # default of a reprojection stage): running statistics unchanged, weights changed.
    stage1 = load_checkpoint(tmp_path / "learned" / "best.pt")
    assert stage1["loss_config"]["type"] == "learned" and "sx" in stage1["criterion_state"]
    stage2 = load_checkpoint(tmp_path / "reprojection" / "last.pt")["model_state"]
    bn_stats = [k for k in stage2 if k.endswith(("running_mean", "running_var"))]
    assert bn_stats and all(torch.equal(stage2[k], stage1["model_state"][k]) for k in bn_stats)
    assert not torch.equal(stage2["fc_position.weight"], stage1["model_state"]["fc_position.weight"])

    ckpt = load_checkpoint(result["checkpoint"])
    assert ckpt["map_frame"] == "room"
    # best.pt is either an improvement found by fine-tuning or the starting weights (epoch 0).
    best_log = next(r for r in log[2:] if r["epoch"] == ckpt["epoch"])
    assert best_log["val"] == ckpt["val_metrics"]
    assert ckpt["stage"] == "reprojection" and ckpt["loss_config"] == {"type": "reprojection", "gamma": 1}
    assert ckpt["model_config"]["backbone"] == "resnet18"
    assert ckpt["preprocess"]["crop"] == 48
    assert ckpt["train_config"]["stages"][1]["epochs"] == 3
    assert ckpt["git_revision"]
    assert "camera_to_world" in ckpt["pose_convention"]
    cov = ckpt["covariance"]
    assert len(cov["position_var"]) == 3 and len(cov["rotation_var"]) == 3 and cov["samples"] == 2
    assert "holdout" in ckpt["covariance_source"]
    assert ckpt["val_metrics"]["frames"] == 2


def test_single_stage_alone_needs_the_previous_stage_checkpoint(tiny_scene, tmp_path, capsys):
    from ros2_posenet.train import main

    args = ["--stage", "reprojection", "data.kind=7scenes", f"data.root={tiny_scene}", f"train.out_dir={tmp_path}"]
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("model: {backbone: resnet18, pretrained: false}\n")
    assert main(["--config", str(cfg_path), *args]) == 2
    err = capsys.readouterr().err
    assert "learned/best.pt" in err and "run stage 'learned' first" in err

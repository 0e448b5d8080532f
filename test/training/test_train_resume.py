"""--resume continues exactly; checkpoints round-trip; bad checkpoints fail clearly."""
import json

import pytest
import torch

from ros2_posenet.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint
from ros2_posenet.data import build_dataset
from helpers import tiny_scene as make_scene
from ros2_posenet.data.synthetic import SyntheticSceneConfig
from ros2_posenet.metrics import model_forward, pose_errors, predict_poses, summarize_errors
from ros2_posenet.inference import Relocalizer
from ros2_posenet.train import holdout_split, load_config, main, run_training, sequence_ids


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory):
    return make_scene(tmp_path_factory, "scene", SyntheticSceneConfig(
        width=64, height=48, frames_train=12, frames_test=4, train_sequences=2, test_sequences=1, num_points=300,
    ))


def config(root, out_dir, *overrides):
    # Augmentation, dropout and gradient clipping stay on so the test also covers the random state.
    return load_config(None, [
        "data.kind=7scenes", f"data.root={root}", "data.max_points=16", "data.augment=true", "data.color_jitter=0.2",
        "data.rotation_deg=5", "optim.clip_grad_norm=1.0",
        "data.val=holdout", "data.val_fraction=0.25",
        "model.backbone=resnet18", "model.hidden_dim=32", "model.dropout=0.3", "model.pretrained=false",
        "preprocess.resize=40", "preprocess.crop=32", "optim.batch_size=4", "optim.lr=1e-3",
        "train.workers=0", "train.progress=false", "train.test_at_end=false", f"train.out_dir={out_dir}",
        "train.epochs=2", "stages.reprojection.epochs=1", *overrides,
    ])


def state_of(path):
    payload = load_checkpoint(path)
    return payload["model_state"], payload["criterion_state"], payload["resume"]["optimizer"]["state"]


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} differs")


def test_resume_reproduces_an_uninterrupted_run(tiny_scene, tmp_path):
    # Without validation every epoch is "best", so a resumed run has all the files it needs.
    straight = tmp_path / "straight"
    run_training(config(tiny_scene, straight, "data.val=none", "train.keep_every=1"))

    # Continue from the snapshot of epoch 1 of stage 1 as if the run had been killed there.
    resumed = tmp_path / "resumed"
    snapshot = straight / "learned" / "epoch_001.pt"
    assert load_checkpoint(snapshot)["resume"]["epoch"] == 1
    assert main(["--resume", str(snapshot), f"train.out_dir={resumed}", "train.keep_every=0"]) == 0
    assert not (resumed / "learned" / "epoch_001.pt").exists()

    for stage in ("learned", "reprojection"):
        model_a, crit_a, opt_a = state_of(straight / stage / "last.pt")
        model_b, crit_b, opt_b = state_of(resumed / stage / "last.pt")
        assert_same_tensors(model_a, model_b)
        assert_same_tensors(crit_a, crit_b)
        for key in opt_a:
            assert_same_tensors(opt_a[key], opt_b[key])
    learned = load_checkpoint(straight / "learned" / "last.pt")["criterion_state"]
    assert learned["sx"].item() != 0.0 and learned["sq"].item() != -3.0


def test_checkpoint_round_trip_gives_identical_predictions(tiny_scene, tmp_path):
    result = run_training(config(tiny_scene, tmp_path, "stages.learned.epochs=1", "stages.reprojection.epochs=1"))
    payload = load_checkpoint(result["checkpoint"])
    # The validation metrics were computed by the in-memory model at save time;
    # the reloaded model must reproduce them exactly on the same held-out frames.
    model = model_from_checkpoint(payload)
    plain = build_dataset("7scenes", tiny_scene, "train", preprocess_from_checkpoint(payload), max_points=0)
    _, val_idx = holdout_split(sequence_ids(plain), 0.25, payload["train_config"]["data"]["val_block"])
    val = torch.utils.data.Subset(plain, val_idx)
    pred = predict_poses(model_forward(model, torch.device("cpu")), val)
    metrics = summarize_errors(*pose_errors(pred["pred_t"], pred["pred_q"], pred["true_t"], pred["true_q"]))
    assert metrics == payload["val_metrics"]

    # The node's path (Relocalizer: raw image -> preprocessing -> model) agrees too.
    reloc = Relocalizer(result["checkpoint"], device="cpu")
    first = reloc.predict(plain.load_image(val_idx[0]))
    torch.testing.assert_close(torch.from_numpy(first.position).float(), pred["pred_t"][0], rtol=0, atol=1e-5)
    assert reloc.map_frame == "map"


def test_bad_checkpoints_fail_with_a_clear_message(tiny_scene, tmp_path, capsys):
    result = run_training(config(tiny_scene, tmp_path / "run", "loss.type=beta", "train.epochs=1"))
    assert main(["--resume", result["checkpoint"]]) == 2  # best.pt: no optimiser state
    assert "resume from a stage's last.pt" in capsys.readouterr().err

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(open(result["stages"]["beta"]["last"], "rb").read()[:1000])
    assert main(["--resume", str(corrupt)]) == 2
    assert "corrupt" in capsys.readouterr().err

    payload = load_checkpoint(result["stages"]["beta"]["last"])
    payload["version"] = 999
    future = tmp_path / "future.pt"
    torch.save(payload, future)
    assert main(["--resume", str(future)]) == 2
    assert "version 999" in capsys.readouterr().err

    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == ["beta"]

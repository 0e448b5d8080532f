"""Checkpoint round trip, failure messages and calibrated covariance."""
import numpy as np
import pytest
import torch

from ros2_posenet.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    save_ensemble,
)
from ros2_posenet.covariance import MIN_POSITION_STD, calibrate, covariance_matrix
from ros2_posenet.geometry import quat_normalize
from ros2_posenet.inference import NonFiniteOutputError, Relocalizer
from ros2_posenet.losses import LearnedWeightingLoss
from ros2_posenet.model import ModelConfig, PoseEnsemble, PoseNet
from ros2_posenet.preprocess import PreprocessConfig

PRE = PreprocessConfig(resize=40, crop=32)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = PoseNet(ModelConfig(backbone="resnet18", pretrained=False, hidden_dim=16))
    model.set_position_offset(torch.tensor([1.0, 2.0, 3.0]))
    criterion = LearnedWeightingLoss(sx=0.5, sq=-2.5)
    cov = {"position_var": [0.04, 0.09, 0.01], "rotation_var": [1e-3, 2e-3, 3e-3], "samples": 10}
    path = save_checkpoint(
        tmp_path / "ckpt.pt", model, PRE, criterion=criterion, loss_config={"type": "learned"},
        map_frame="scene_map", covariance=cov,
    )
    return path, model.eval()


def test_round_trip_gives_identical_predictions(checkpoint):
    path, model = checkpoint
    payload = load_checkpoint(path)
    assert payload["map_frame"] == "scene_map"
    assert payload["criterion_state"]["sq"].item() == pytest.approx(-2.5)
    assert "camera_to_world" in payload["pose_convention"]
    restored = model_from_checkpoint(payload)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model(x), restored(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_relocalizer_uses_checkpoint_preprocessing_and_covariance(checkpoint):
    path, model = checkpoint
    reloc = Relocalizer(str(path), device="cpu")
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    pred = reloc.predict(image)
    with torch.no_grad():
        t, q = model(reloc.prepare(image))
    np.testing.assert_allclose(pred.position, t[0].numpy(), atol=1e-6)
    assert pred.quaternion[0] >= 0 and abs(np.linalg.norm(pred.quaternion) - 1) < 1e-6
    np.testing.assert_allclose(np.diag(pred.covariance)[:3], [0.04, 0.09, 0.01])
    assert reloc.map_frame == "scene_map"


def test_relocalizer_rejects_nan_output(checkpoint):
    path, _ = checkpoint
    reloc = Relocalizer(str(path), device="cpu")
    with torch.no_grad():
        reloc.model.fc_position.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError):
        reloc.predict(np.zeros((40, 40, 3), np.uint8))


def test_missing_corrupt_and_incompatible_checkpoints(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(corrupt)
    payload = torch.load(path, weights_only=False)
    torch.save({**payload, "version": 999}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="version 999"):
        load_checkpoint(tmp_path / "future.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a ros2_posenet checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    bad = {**payload, "model_config": {**payload["model_config"], "hidden_dim": 99}}
    torch.save(bad, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        model_from_checkpoint(load_checkpoint(tmp_path / "mismatch.pt"))
    with pytest.raises(ValueError, match="CUDA is not available" if not torch.cuda.is_available() else "device"):
        Relocalizer(str(path), device="cuda" if not torch.cuda.is_available() else "tpu")


def test_calibrated_covariance_matches_residual_variance():
    gen = torch.Generator().manual_seed(0)
    n = 4000
    true_t = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    true_q = quat_normalize(torch.randn(n, 4, generator=gen, dtype=torch.float64))
    stds = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    pred_t = true_t + torch.randn(n, 3, generator=gen, dtype=torch.float64) * stds
    # Small rotation about world z by angle ~ N(0, 0.05 rad).
    angle = torch.randn(n, generator=gen, dtype=torch.float64) * 0.05
    dq = torch.stack([torch.cos(angle / 2), torch.zeros(n), torch.zeros(n), torch.sin(angle / 2)], -1).double()
    from ros2_posenet.geometry import quat_multiply

    pred_q = quat_multiply(dq, true_q)
    calib = calibrate(pred_t, pred_q, true_t, true_q)
    np.testing.assert_allclose(np.sqrt(calib["position_var"]), stds.numpy(), rtol=0.05)
    rot_std = np.sqrt(calib["rotation_var"])
    assert rot_std[2] == pytest.approx(0.05, rel=0.05) and rot_std[:2].max() < 1e-6
    cov = covariance_matrix(calib)
    assert cov.shape == (6, 6) and np.allclose(cov, cov.T)
    assert cov[3, 3] > 0  # floors keep the matrix positive definite
    assert covariance_matrix(None)[0, 0] > MIN_POSITION_STD**2


def _member(tmp_path, seed, hidden_dim=16, name=None):
    torch.manual_seed(seed)
    model = PoseNet(ModelConfig(backbone="resnet18", pretrained=False, hidden_dim=hidden_dim)).eval()
    cov = {"position_var": [0.04, 0.09, 0.01], "rotation_var": [1e-3, 2e-3, 3e-3], "samples": 10}
    return save_checkpoint(tmp_path / (name or f"member{seed}.pt"), model, PRE, covariance=cov), model


def test_an_ensemble_checkpoint_predicts_its_members_mean_through_the_relocalizer(tmp_path):
    (a, net_a), (b, net_b) = _member(tmp_path, 0), _member(tmp_path, 1)
    path = save_ensemble(tmp_path / "ensemble.pt", [a, b])
    payload = load_checkpoint(path)
    assert payload["members"] == [str(a), str(b)] and payload["covariance"] == load_checkpoint(a)["covariance"]
    model = model_from_checkpoint(payload)
    assert isinstance(model, PoseEnsemble) and len(model.members) == 2
    reloc = Relocalizer(str(path), device="cpu", warmup=False)
    rgb = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    pred = reloc.predict(rgb)
    x = reloc.prepare(rgb)
    with torch.no_grad():
        (ta, qa), (tb, qb) = net_a(x), net_b(x)
    np.testing.assert_allclose(pred.position, ((ta + tb) / 2)[0].numpy(), atol=1e-5)
    assert not np.allclose(pred.position, ta[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(np.diag(pred.covariance)[:3], [0.04, 0.09, 0.01])  # the first member's calibration


def test_an_ensemble_refuses_members_of_another_network_and_ensembles(tmp_path):
    (a, _), (b, _) = _member(tmp_path, 0), _member(tmp_path, 1, hidden_dim=8)
    with pytest.raises(CheckpointError, match="model_config differs"):
        save_ensemble(tmp_path / "e.pt", [a, b])
    with pytest.raises(CheckpointError, match="at least 2"):
        save_ensemble(tmp_path / "e.pt", [a])
    (c, _) = _member(tmp_path, 2)
    nested = save_ensemble(tmp_path / "e.pt", [a, c])
    with pytest.raises(CheckpointError, match="an ensemble already"):
        save_ensemble(tmp_path / "e2.pt", [a, nested])

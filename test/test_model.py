"""PoseNet output contract for every backbone, dropout behaviour and preprocessing."""
import numpy as np
import pytest
import torch

from ros2_posenet.geometry import quat_mean
from ros2_posenet.model import BACKBONES, ModelConfig, PoseEnsemble, PoseNet
from ros2_posenet.preprocess import PreprocessConfig, Preprocessor


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_outputs_position_and_unit_quaternion(backbone):
    torch.manual_seed(0)
    model = PoseNet(ModelConfig(backbone=backbone, pretrained=False, hidden_dim=16)).eval()
    with torch.no_grad():
        t, q = model(torch.randn(2, 3, 96, 96))
    assert t.shape == (2, 3) and q.shape == (2, 4)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(2))


def test_missing_imagenet_weights_warn_instead_of_downloading(caplog, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # empty cache
    with caplog.at_level("WARNING"):
        PoseNet(ModelConfig(backbone="resnet18", pretrained=True, hidden_dim=8))
    assert "not in the torch cache" in caplog.text


def test_eval_is_deterministic_and_mc_dropout_is_not():
    torch.manual_seed(0)
    model = PoseNet(ModelConfig(backbone="resnet18", pretrained=False, hidden_dim=64, dropout=0.5)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x)[0], model(x)[0]
        torch.testing.assert_close(a, b)
        model.enable_mc_dropout()
        samples = torch.stack([model(x)[0] for _ in range(5)])
    assert samples.std(0).max() > 0
    assert not model.training and model.head[0].training  # BatchNorm stays frozen, dropout on


def test_fine_tuning_mode_trains_the_deployed_network():
    torch.manual_seed(0)
    model = PoseNet(ModelConfig(backbone="resnet18", pretrained=False, hidden_dim=32, dropout=0.5))
    images = torch.randn(4, 3, 64, 64)
    model.train()
    model(images)  # move the BatchNorm statistics away from their initial values
    bn = model.backbone.bn1
    stats = bn.running_mean.clone()
    model.eval()
    with torch.no_grad():
        deployed = model(images)

    model.freeze_batchnorm, model.train_dropout = True, False
    model.train()
    assert model.training and not bn.training
    t, q = model(images)
    torch.testing.assert_close((t, q), deployed)  # same forward as deployed ...
    assert torch.equal(bn.running_mean, stats)  # ... and the statistics stay put
    (t.sum() + q.sum()).backward()
    assert bn.weight.grad is not None  # BatchNorm's affine parameters still learn

    model.freeze_batchnorm, model.train_dropout = False, True
    model.train()
    assert bn.training and not torch.allclose(model(images)[0], deployed[0])


def test_position_offset_sets_bias():
    model = PoseNet(ModelConfig(backbone="resnet18", pretrained=False, hidden_dim=8))
    model.set_position_offset(torch.tensor([10.0, -5.0, 1.5]))
    torch.testing.assert_close(model.fc_position.bias.detach(), torch.tensor([10.0, -5.0, 1.5]))


def test_bad_model_config_is_rejected():
    with pytest.raises(ValueError, match="unknown backbone"):
        ModelConfig(backbone="vgg99")
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.5)


def test_preprocess_keeps_projection_exact():
    """A pixel's ray must land on the same content after resize + crop with the updated K."""
    cfg = PreprocessConfig(resize=60, crop=48)
    pre = Preprocessor(cfg)
    image = np.zeros((120, 160, 3), np.uint8)
    image[56:60, 80:84] = 255  # a 4x4 bright square centred at pixel (81.5, 57.5), inside every crop
    K = np.array([[200.0, 0, 80], [0, 200.0, 60], [0, 0, 1]])
    ray = np.linalg.inv(K) @ np.array([81.5, 57.5, 1.0])
    for rng in (None, np.random.default_rng(3)):
        cropped, K2 = pre.geometric(image, K, rng)
        assert cropped.shape == (48, 48, 3)
        u, v, w = K2 @ ray
        ys, xs = np.nonzero(cropped[..., 0] > 64)
        weights = cropped[ys, xs, 0].astype(float)
        assert abs(np.average(xs, weights=weights) - u / w) < 0.3
        assert abs(np.average(ys, weights=weights) - v / w) < 0.3


def test_preprocess_normalisation_and_bad_images():
    pre = Preprocessor(PreprocessConfig(resize=32, crop=32))
    tensor, K = pre(np.full((32, 48, 3), 255, np.uint8))
    assert tensor.shape == (3, 32, 32) and K is None
    expected = (1.0 - torch.tensor(cfg_mean := pre.config.mean)) / torch.tensor(pre.config.std)
    torch.testing.assert_close(tensor[:, 0, 0], expected.float())
    assert len(cfg_mean) == 3
    with pytest.raises(ValueError, match="HxWx3"):
        pre(np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="too small"):
        pre(np.zeros((0, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        pre(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="crop"):
        PreprocessConfig(resize=32, crop=64)


def _members(n=2, **config):
    networks = []
    for seed in range(n):
        torch.manual_seed(seed)
        networks.append(PoseNet(ModelConfig(backbone="resnet18", pretrained=False, hidden_dim=16, **config)).eval())
    return networks


def test_an_ensemble_publishes_its_members_mean_pose():
    members = _members(3, dropout=0.2, variance_head=True)
    ensemble = PoseEnsemble(members).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        poses = [m(x) for m in members]
        t, q = ensemble(x)
        out = ensemble.uncertainty_outputs(x, 4)
        _, _, log_variance = ensemble.forward_with_log_variance(x)
    torch.testing.assert_close(t, torch.stack([p[0] for p in poses]).mean(0))
    torch.testing.assert_close(q, quat_mean(torch.stack([p[1] for p in poses])))
    assert not torch.allclose(t, poses[0][0])  # the members differ: the mean is not one of them
    torch.testing.assert_close(out["t"], t)
    torch.testing.assert_close(out["q"], q)
    assert out["t_samples"].shape == (2, 12, 3) and out["q_samples"].shape == (2, 12, 4)  # 4 per member
    variances = torch.stack([m.uncertainty_outputs(x)["log_variance"] for m in members]).exp()
    torch.testing.assert_close(out["log_variance"].exp(), variances.mean(0))
    torch.testing.assert_close(log_variance, out["log_variance"])
    assert ensemble.config == members[0].config


def test_an_ensemble_needs_two_networks_of_one_architecture():
    with pytest.raises(ValueError, match="at least 2"):
        PoseEnsemble(_members(1))
    torch.manual_seed(0)
    other = PoseNet(ModelConfig(backbone="resnet18", pretrained=False, hidden_dim=8))
    with pytest.raises(ValueError, match="one ModelConfig"):
        PoseEnsemble([_members(1)[0], other])

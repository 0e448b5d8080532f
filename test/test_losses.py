"""Each loss against a hand computation, gradients, sign invariance and the factory."""
import math

import pytest
import torch

from ros2_posenet import geometry as g
from ros2_posenet.losses import (
    BetaLoss,
    LearnedWeightingLoss,
    ReprojectionLoss,
    reprojection_residuals,
    build_loss,
    parameter_groups,
)
from ros2_posenet.model import ModelConfig, PoseNet

IDENTITY = torch.tensor([[1.0, 0.0, 0.0, 0.0]])


def batch(position, rotation, **extra):
    return {"position": torch.as_tensor(position, dtype=torch.float32), "rotation": torch.as_tensor(rotation, dtype=torch.float32), **extra}


def test_beta_loss_hand_computation_l2_and_l1():
    true = batch([[0.0, 0.0, 0.0]], IDENTITY)
    pred_t = torch.tensor([[3.0, 4.0, 0.0]])
    pred_q = torch.tensor([[2.0, 0.0, 0.0, 2.0]])  # normalised inside: (0.7071, 0, 0, 0.7071)
    loss, stats = BetaLoss(beta=10.0, norm="l2")(pred_t, pred_q, true)
    rot = math.sqrt((1 - math.sqrt(0.5)) ** 2 + 0.5)
    assert stats["loss_position"].item() == pytest.approx(5.0)
    assert loss.item() == pytest.approx(5.0 + 10.0 * rot, rel=1e-6)
    loss_l1, _ = BetaLoss(beta=10.0, norm="l1")(pred_t, pred_q, true)
    assert loss_l1.item() == pytest.approx(7.0 + 10.0 * ((1 - math.sqrt(0.5)) + math.sqrt(0.5)), rel=1e-6)


def test_learned_weighting_hand_computation_and_defaults():
    criterion = LearnedWeightingLoss()
    assert criterion.sx.item() == 0.0 and criterion.sq.item() == -3.0
    true = batch([[1.0, 1.0, 1.0]], IDENTITY)
    loss, stats = criterion(torch.tensor([[1.0, 1.0, 3.0]]), IDENTITY.clone(), true)
    # Lx = 2, Lq = 0 (up to the sqrt epsilon): 2·e^0 + 0 + 0·e^3 − 3
    assert loss.item() == pytest.approx(2.0 - 3.0, abs=1e-4)
    assert stats["sq"].item() == -3.0


def test_learned_weighting_can_be_negative_and_gradients_reach_s_and_model():
    model = PoseNet(ModelConfig(backbone="resnet18", pretrained=False, hidden_dim=32))
    criterion = LearnedWeightingLoss(sx=-1.0, sq=-3.0)
    images = torch.randn(2, 3, 64, 64)
    pred_t, pred_q = model(images)
    true = batch(pred_t.detach(), pred_q.detach())
    loss, _ = criterion(pred_t, pred_q, true)
    assert loss.item() < 0  # log-variance terms dominate once residuals are ~0
    pred_t, pred_q = model(images)
    loss, _ = criterion(pred_t, pred_q, batch(torch.ones(2, 3), IDENTITY.repeat(2, 1)))
    loss.backward()
    assert criterion.sx.grad is not None and criterion.sx.grad.abs() > 0
    assert criterion.sq.grad is not None and criterion.sq.grad.abs() > 0
    assert model.backbone.conv1.weight.grad.abs().sum() > 0


def test_rotation_loss_ignores_quaternion_sign():
    q_true = g.quat_normalize(torch.tensor([[0.8, 0.2, -0.1, 0.3]]))
    q_pred = g.quat_normalize(torch.tensor([[0.7, 0.25, -0.1, 0.35]]))
    true = batch(torch.zeros(1, 3), q_true)
    for criterion in (BetaLoss(beta=100.0), LearnedWeightingLoss()):
        a, _ = criterion(torch.zeros(1, 3), q_pred, true)
        b, _ = criterion(torch.zeros(1, 3), -q_pred, true)
        assert a.item() == pytest.approx(b.item(), rel=1e-6)


def reprojection_batch(points, mask, t=None):
    K = torch.tensor([[[100.0, 0, 50], [0, 100.0, 50], [0, 0, 1]]])
    t = torch.zeros(1, 3) if t is None else t
    return batch(t, IDENTITY, K=K, points=points, points_mask=mask)


def test_reprojection_loss_hand_computation():
    # Two points at depth 2 and 4; predicted camera moved 0.1 m along +x shifts them by 5 and 2.5 px.
    points = torch.tensor([[[0.0, 0.0, 2.0], [0.0, 0.0, 4.0]]])
    b = reprojection_batch(points, torch.tensor([[True, True]]))
    loss, stats = ReprojectionLoss(gamma=1)(torch.tensor([[0.1, 0.0, 0.0]]), IDENTITY, b)
    assert loss.item() == pytest.approx((5.0 + 2.5) / 2, rel=1e-5)
    assert stats["points"].item() == 2
    loss2, _ = ReprojectionLoss(gamma=2)(torch.tensor([[0.1, 0.1, 0.0]]), IDENTITY, b)
    assert loss2.item() == pytest.approx((math.hypot(5, 5) + math.hypot(2.5, 2.5)) / 2, rel=1e-5)


def test_reprojection_loss_masks_and_empty_images():
    points = torch.tensor([[[0.0, 0.0, 2.0], [0.0, 0.0, -3.0], [9.0, 9.0, 9.0]]])
    # Third point padded out; second behind the true camera: only the first counts.
    b = reprojection_batch(points, torch.tensor([[True, True, False]]))
    loss, stats = ReprojectionLoss()(torch.tensor([[0.1, 0.0, 0.0]]), IDENTITY, b)
    assert stats["points"].item() == 1 and loss.item() == pytest.approx(5.0, rel=1e-5)
    empty = reprojection_batch(torch.zeros(1, 0, 3), torch.zeros(1, 0, dtype=torch.bool))
    pred_t = torch.zeros(1, 3, requires_grad=True)
    loss, _ = ReprojectionLoss()(pred_t, IDENTITY, empty)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(pred_t.grad).all()


def test_reprojection_loss_is_finite_when_prediction_is_behind_points():
    points = torch.tensor([[[0.0, 0.0, 2.0]]])
    b = reprojection_batch(points, torch.tensor([[True]]))
    pred_t = torch.tensor([[0.3, 0.0, 5.0]], requires_grad=True)  # camera past the point
    loss, _ = ReprojectionLoss(max_pixel_error=100.0)(pred_t, IDENTITY, b)
    loss.backward()
    assert loss.item() == pytest.approx(100.0)
    assert torch.isfinite(pred_t.grad).all()


def test_reprojection_gradient_points_towards_truth():
    points = torch.tensor([[[0.5, -0.2, 3.0], [-0.4, 0.3, 5.0], [0.1, 0.1, 2.0]]])
    b = reprojection_batch(points, torch.ones(1, 3, dtype=torch.bool))
    pred_t = torch.tensor([[0.2, -0.1, 0.0]], requires_grad=True)
    loss, _ = ReprojectionLoss(gamma=2)(pred_t, IDENTITY, b)
    loss.backward()
    assert (pred_t.grad[0, :2] * pred_t.detach()[0, :2] > 0).all()  # descent reduces the offset


def test_build_loss_factory_and_errors():
    assert isinstance(build_loss({"type": "learned", "sq": -2.0}), LearnedWeightingLoss)
    assert build_loss({"type": "reprojection", "gamma": 2}).gamma == 2.0
    with pytest.raises(ValueError, match="loss type"):
        build_loss({"type": "nope"})
    with pytest.raises(ValueError, match="bad options"):
        build_loss({"type": "beta", "gama": 3})
    with pytest.raises(ValueError, match="norm"):
        build_loss({"type": "beta", "norm": "l3"})
    with pytest.raises(ValueError):
        build_loss({"type": "beta", "beta": -1})


def test_loss_parameters_get_no_weight_decay():
    model = PoseNet(ModelConfig(backbone="resnet18", pretrained=False, hidden_dim=8))
    criterion = LearnedWeightingLoss()
    groups = parameter_groups(model, criterion, weight_decay=1e-4)
    assert groups[0]["weight_decay"] == 1e-4
    assert groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[1]["params"]} == {id(criterion.sx), id(criterion.sq)}
    assert len(parameter_groups(model, BetaLoss(), 1e-4)) == 1


def test_reprojection_loss_uses_the_predicted_rotation():
    """A camera-to-world rotation error alone moves every point by f·tan(θ) pixels.

    Predicted position = true position; the predicted camera is turned by θ = 0.1 rad about
    its y axis, so a world point straight ahead at any depth appears at u = cx − f·tan θ.
    Mutation this catches (tried by hand): ``project_points(points, pred_t, batch["rotation"], K)``
    in ``reprojection_residuals`` (projecting with the true rotation instead of ``pred_q``)
    gives a loss of 0 and no gradient for the rotation, so fine-tuning would stop training it.
    """
    theta = 0.1
    pred_q = torch.tensor([[math.cos(theta / 2), 0.0, math.sin(theta / 2), 0.0]], requires_grad=True)
    points = torch.tensor([[[0.0, 0.0, 2.0], [0.0, 0.0, 5.0]]])
    b = reprojection_batch(points, torch.ones(1, 2, dtype=torch.bool))
    residual, valid = reprojection_residuals(torch.zeros(1, 3), pred_q, b)
    expected_u = -100.0 * math.tan(theta)  # f = 100 px
    assert valid.all()
    assert residual[0, :, 0].tolist() == pytest.approx([expected_u, expected_u], rel=1e-5)
    assert residual[0, :, 1].abs().max().item() < 1e-4
    loss, _ = ReprojectionLoss(gamma=1)(torch.zeros(1, 3), pred_q, b)
    assert loss.item() == pytest.approx(abs(expected_u), rel=1e-5)
    loss.backward()
    assert pred_q.grad[0, 2].item() > 0  # descent turns the camera back towards the truth (θ -> 0)

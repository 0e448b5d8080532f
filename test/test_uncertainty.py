"""Validation splits, per-frame covariance (MC dropout, variance head), calibration and its metrics."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from helpers import untrained_checkpoint
from ros2_posenet.checkpoint import load_checkpoint, save_checkpoint
from ros2_posenet.covariance import (
    calibrate_methods, calibration_metrics, standard_deviations, chi2_ppf, coverage, covariance_matrix, fit_block_scales, fit_scale,
    fixed_block_scales, guarded_block_scales, held_out_folds, leave_block_out_fixed_nees,
    mc_dropout_covariance, nees, pose_residuals, scale_covariance, unit_covariances, with_floor,
)
from ros2_posenet.data.split import block_split, sequence_split, split_frames
from ros2_posenet.inference import Relocalizer
from ros2_posenet.losses import variance_head_nll
from ros2_posenet.model import ModelConfig, PoseNet
from ros2_posenet.preprocess import PreprocessConfig
from ros2_posenet.train import ConfigError, load_config

PRE = PreprocessConfig(resize=32, crop=32)


# ----------------------------------------------------------------------------- splits


@pytest.mark.parametrize("gap", [0, 3, 12])
def test_block_split_keeps_every_training_frame_more_than_gap_frames_from_validation(gap):
    ids = ["a"] * 120 + ["b"] * 75 + ["c"] * 40
    split = block_split(ids, fraction=0.2, block=8, gap=gap)
    position = {i: (seq, i - ids.index(seq)) for i, seq in enumerate(ids)}
    assert split.val and split.train
    assert sorted(split.train + split.val + split.excluded) == list(range(len(ids)))
    for v in split.val:
        for t in split.train:
            if position[v][0] == position[t][0]:
                assert abs(position[v][1] - position[t][1]) > gap
    # Only frames that are that close are dropped: the buffer is exactly the gap.
    assert len(split.excluded) <= 2 * gap * len(split.val)
    if gap == 0:
        assert not split.excluded


def test_sequence_split_holds_out_whole_sequences():
    ids = [f"seq-0{k}" for k in range(1, 7) for _ in range(30)]
    split = sequence_split(ids, fraction=0.2)
    val_seqs, train_seqs = {ids[i] for i in split.val}, {ids[i] for i in split.train}
    assert val_seqs and not val_seqs & train_seqs
    assert all(ids.count(s) == sum(ids[i] == s for i in split.val) for s in val_seqs)  # whole sequences
    assert len(split.val) + len(split.train) == len(ids) and not split.excluded
    with pytest.raises(ValueError, match="at least two"):
        sequence_split(["a"] * 10, 0.2)


def test_auto_split_uses_sequences_when_there_are_enough():
    three = ["a"] * 30 + ["b"] * 30 + ["c"] * 30
    assert split_frames(three, "auto", 0.1, 10, 5).description.startswith("sequences")
    assert split_frames(["a"] * 30 + ["b"] * 30, "auto", 0.25, 5, 5).description.startswith("blocks")
    with pytest.raises(ValueError, match="validation split"):
        split_frames(three, "random", 0.1, 10, 5)


def test_config_checks_split_and_uncertainty_settings():
    base = ["data.kind=7scenes", "data.root=x"]
    cfg = load_config(None, base)
    assert cfg["data"]["val_split"] == "auto" and cfg["uncertainty"]["method"] == "fixed"
    with pytest.raises(ConfigError, match="data.val_split"):
        load_config(None, base + ["data.val_split=random"])
    with pytest.raises(ConfigError, match="data.val_gap"):
        load_config(None, base + ["data.val_gap=-1"])
    with pytest.raises(ConfigError, match="model.dropout > 0"):
        load_config(None, base + ["uncertainty.method=mc_dropout", "model.dropout=0"])
    with pytest.raises(ConfigError, match="model.variance_head"):
        load_config(None, base + ["uncertainty.method=variance_head"])
    with pytest.raises(ConfigError, match="uncertainty.method"):
        load_config(None, base + ["uncertainty.method=ensemble"])


# ----------------------------------------------------------------------------- NEES, coverage, scale


def test_nees_and_coverage_match_a_hand_example():
    residuals = torch.tensor([[1.0, 2.0, 2.0], [0.5, 0.0, 0.0], [3.0, 4.0, 0.0]], dtype=torch.float64)
    cov = torch.diag_embed(torch.tensor([[1.0, 4.0, 4.0], [1.0, 1.0, 1.0], [1.0, 1.0, 4.0]], dtype=torch.float64))
    # 1 + 1 + 1, 0.25, 9 + 16
    np.testing.assert_allclose(nees(residuals, cov).numpy(), [3.0, 0.25, 25.0])
    # chi-square 3 dof: 68 % bound 3.506, 95 % 7.815, 99 % 11.345 (tables)
    np.testing.assert_allclose(chi2_ppf([0.68, 0.95, 0.99], 3), [3.5059, 7.8147, 11.3449], atol=2e-3)
    np.testing.assert_allclose(coverage([3.0, 0.25, 25.0], 3), [2 / 3, 2 / 3, 2 / 3])
    six = torch.cat((residuals, residuals), dim=1)
    cov6 = torch.block_diag(*[torch.eye(6, dtype=torch.float64)] * 1).expand(3, 6, 6).clone()
    cov6[:, :3, :3] = cov
    cov6[:, 3:, 3:] = cov * 4
    metrics = calibration_metrics(six, cov6)
    assert metrics["nees_position_median"] == pytest.approx(3.0)
    assert metrics["nees_rotation_median"] == pytest.approx(0.75)
    assert metrics["position_within_95"] == pytest.approx(2 / 3) and metrics["rotation_within_68"] == pytest.approx(2 / 3)
    assert metrics["nees_ideal_median"] == pytest.approx(2.366, abs=1e-3)


def test_calibration_scale_recovers_the_true_factor():
    gen = torch.Generator().manual_seed(0)
    n = 4000
    # Per-frame covariances of very different sizes; the truth is 4x (position) and 0.25x (rotation) them.
    sizes = torch.exp(torch.randn(n, 6, generator=gen, dtype=torch.float64))
    unit = torch.diag_embed(sizes)
    truth = torch.tensor([4.0] * 3 + [0.25] * 3, dtype=torch.float64)
    residuals = torch.randn(n, 6, generator=gen, dtype=torch.float64) * (sizes * truth).sqrt()
    sp, sr = fit_block_scales(residuals, unit)
    assert sp == pytest.approx(4.0, rel=0.1) and sr == pytest.approx(0.25, rel=0.1)
    calibrated = scale_covariance(unit, sp, sr)
    metrics = calibration_metrics(residuals, calibrated)
    assert metrics["position_within_95"] == pytest.approx(0.95, abs=0.02)
    assert metrics["nees_rotation_median"] == pytest.approx(2.366, rel=0.1)
    with pytest.raises(ValueError):
        fit_scale([], 3)


def test_guarded_scales_hold_the_validation_tail_inside_the_95_percent_bound():
    gen = torch.Generator().manual_seed(4)
    n = 2000
    unit = torch.eye(6, dtype=torch.float64).expand(n, 6, 6).clone()
    gaussian = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    # Gaussian residuals: the curve fit already holds 99 % inside the 99 % bound; the guard asks
    # for 99 % inside the 95 % bound, a factor chi2(0.99)/chi2(0.95) = 1.45 in variance.
    fitted, guarded = fit_block_scales(gaussian, unit), guarded_block_scales(gaussian, unit)
    for f, g in zip(fitted, guarded):
        assert f == pytest.approx(1.0, rel=0.1) and g == pytest.approx(11.345 / 7.815, rel=0.1)
    # Heavy-tailed rotation (Student t, 2 dof): the guard raises the scale until 99 % are inside the 95 % bound.
    torch.manual_seed(4)
    heavy = gaussian.clone()
    heavy[:, 3:] /= torch.sqrt(torch.distributions.Chi2(2.0).sample((n, 1)) / 2.0)
    sp, sr = guarded_block_scales(heavy, unit)
    metrics = calibration_metrics(heavy, scale_covariance(unit, sp, sr))
    assert metrics["rotation_within_95"] == pytest.approx(0.99, abs=0.005)
    assert metrics["position_within_95"] >= 0.98 and sr > 3 * fit_block_scales(heavy, unit)[1]


def test_held_out_folds_are_the_validation_blocks_or_pieces_of_one_run():
    blocks = np.concatenate([np.arange(10, 25), np.arange(100, 115), np.arange(190, 205)])
    folds = held_out_folds(blocks[::-1])  # any order: folds follow the frames' dataset index
    assert sorted(tuple(np.sort(blocks[::-1][f])) for f in folds) == [tuple(range(a, a + 15)) for a in (10, 100, 190)]
    one_sequence = held_out_folds(np.arange(300, 400))
    assert [len(f) for f in one_sequence] == [20] * 5 and np.array_equal(np.concatenate(one_sequence), np.arange(100))
    many = held_out_folds(np.arange(0, 200, 2))  # 100 runs of one frame: 5 folds of neighbouring frames
    assert len(many) == 5 and all(np.all(np.diff(f) == 1) for f in many)
    with pytest.raises(ValueError, match="empty"):
        held_out_folds([])


def test_fixed_covariance_is_not_inflated_by_one_gross_validation_error():
    # Per-axis errors (yaw dominant) and one 160° flip about roll in 100 validation frames: the tail
    # guard scales the whole rotation block to that flip and covers 99 %+ of fresh frames; the
    # leave-block-out fit stays inside the 90-98 % band in position, rotation and 6-DoF.
    gen = torch.Generator().manual_seed(0)
    sd = torch.tensor([1.0, 1.0, 0.2, 0.05, 0.05, 0.3], dtype=torch.float64)
    val = torch.randn(100, 6, generator=gen, dtype=torch.float64) * sd
    val[37, 3] = 2.8
    fresh = torch.randn(4000, 6, generator=gen, dtype=torch.float64) * sd
    unit = torch.diag(val.pow(2).mean(0)).expand(len(fresh), 6, 6)  # the ``fixed`` per-axis variances
    new = calibration_metrics(fresh, scale_covariance(unit, *fixed_block_scales(val, held_out_folds(np.arange(100)))))
    assert all(0.90 <= new[f"{block}_within_95"] <= 0.98 for block in ("position", "rotation", "joint")), new
    guarded = calibration_metrics(fresh, scale_covariance(unit, *guarded_block_scales(val, unit[:100])))
    assert guarded["rotation_within_95"] > 0.98
    # Each fold is judged by the variances of the others: errors twice the other place's are NEES 4 per axis.
    place_a, place_b = torch.full((4, 6), 0.1, dtype=torch.float64), torch.full((4, 6), 0.2, dtype=torch.float64)
    position, rotation = leave_block_out_fixed_nees(torch.cat((place_a, place_b)), [np.arange(4), np.arange(4, 8)])
    np.testing.assert_allclose(position, [0.75] * 4 + [12.0] * 4)
    np.testing.assert_allclose(rotation, position)
    # Without two folds there is nothing to leave out: the tail guard, as for the per-frame methods.
    assert fixed_block_scales(val, [np.arange(100)]) == guarded_block_scales(val, unit[:100])


def test_floor_and_scaling_keep_the_covariance_symmetric_positive_definite():
    a = torch.randn(5, 6, 6, dtype=torch.float64)
    cov = with_floor(scale_covariance(a @ a.transpose(1, 2) * 1e-8, 9.0, 0.5))
    torch.testing.assert_close(cov, cov.transpose(1, 2))
    assert torch.linalg.eigvalsh(cov).min() > 0
    assert (torch.diagonal(cov, dim1=1, dim2=2)[:, :3] >= 0.01**2 - 1e-15).all()
    sigma = standard_deviations(np.diag([0.04, 0.09, 0.01, 1e-4, 1e-4, np.radians(3.0) ** 2]))
    assert sigma["position_std_m"] == pytest.approx(0.3) and sigma["yaw_std_deg"] == pytest.approx(3.0)
    assert sigma["rotation_std_deg"] == pytest.approx(3.0)


# ----------------------------------------------------------------------------- MC dropout and variance head


def test_mc_dropout_covariance_is_the_second_moment_about_the_published_pose():
    t = torch.zeros(1, 3)
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    t_s = torch.tensor([[[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, -2.0, 0.0]]])
    q_s = q.expand(1, 4, 4).clone()
    cov = mc_dropout_covariance(t, q, t_s, q_s)[0]
    np.testing.assert_allclose(torch.diagonal(cov).numpy(), [0.5, 2.0, 0.0, 0.0, 0.0, 0.0], atol=1e-12)


def test_mc_dropout_spread_grows_out_of_distribution():
    """A tiny network fitted to a few images is less sure about images unlike them."""
    torch.manual_seed(0)
    model = PoseNet(ModelConfig(backbone="resnet18", hidden_dim=64, dropout=0.3, pretrained=False))
    gen = torch.Generator().manual_seed(1)
    # In distribution: smooth images (gradients); out of distribution: strong pixel noise.
    ramp = torch.linspace(-1, 1, 32)
    images = torch.stack([torch.stack([ramp[None, :] * a + ramp[:, None] * b + c for a, b, c in ((s, 1 - s, 0.1), (1 - s, s, -0.1), (s, s, 0.0))])
                          for s in torch.linspace(0, 1, 8)])
    target_t = torch.randn(8, 3, generator=gen)
    # Fit the head (where the dropout is) on fixed backbone features: fast, and what MC dropout samples.
    model.eval()
    with torch.no_grad():
        features = model.features(images)
    head_params = [p for name, p in model.named_parameters() if not name.startswith("backbone")]
    optim = torch.optim.Adam(head_params, lr=1e-3)
    model.head.train()
    for _ in range(300):
        t, q = model.pose(model.head(features))
        loss = (t - target_t).abs().sum(-1).mean() + (q[:, 1:]).abs().sum(-1).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    noise = torch.randn(8, 3, 32, 32, generator=gen) * 3.0
    with torch.no_grad():
        spread_in = unit_covariances(model.uncertainty_outputs(images, 64))["mc_dropout"][:, :3, :3]
        spread_out = unit_covariances(model.uncertainty_outputs(noise, 64))["mc_dropout"][:, :3, :3]
    trace_in = torch.diagonal(spread_in, dim1=1, dim2=2).sum(-1).median()
    trace_out = torch.diagonal(spread_out, dim1=1, dim2=2).sum(-1).median()
    assert trace_out > 2 * trace_in
    # The published pose is the deterministic one, whatever the sampling.
    with torch.no_grad():
        t_det, _ = model(images)
        out = model.uncertainty_outputs(images, 4)
    torch.testing.assert_close(out["t"], t_det)
    assert not model.training


def test_variance_head_nll_trains_only_the_variance_head():
    torch.manual_seed(0)
    model = PoseNet(ModelConfig(backbone="resnet18", hidden_dim=16, dropout=0.1, pretrained=False, variance_head=True))
    images = torch.randn(4, 3, 32, 32)
    t, q, log_var = model.forward_with_log_variance(images)
    true_t, true_q = torch.randn(4, 3), torch.nn.functional.normalize(torch.randn(4, 4), dim=-1)
    loss = variance_head_nll(log_var, t, q, true_t, true_q)
    # Hand value: 0.5 * sum(r^2 e^-s + s), mean over the batch.
    r = pose_residuals(t.detach(), q.detach(), true_t, true_q).float()
    assert loss.item() == pytest.approx((0.5 * (r**2 * torch.exp(-log_var) + log_var).sum(-1).mean()).item(), rel=1e-5)
    loss.backward()
    assert model.fc_log_variance.weight.grad.abs().sum() > 0
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("fc_log_variance"))


# ----------------------------------------------------------------------------- checkpoints and Relocalizer


def _calibrated_checkpoint(path, method="mc_dropout", variance_head=True):
    """A tiny model with every method calibrated on a few random held-out frames."""
    torch.manual_seed(0)
    model = PoseNet(ModelConfig(backbone="resnet18", hidden_dim=16, dropout=0.2, pretrained=False, variance_head=variance_head))
    images = torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        out = model.uncertainty_outputs(images, 8)
    true_t = out["t"] + 0.1 * torch.randn(12, 3)
    true_q = out["q"]
    fixed, unc = calibrate_methods(out["t"], out["q"], true_t, true_q, unit_covariances(out), method, 8)
    save_checkpoint(path, model, PRE, covariance={**fixed, "uncertainty": unc})
    return path


def test_uncertainty_settings_round_trip_through_the_checkpoint(tmp_path):
    path = _calibrated_checkpoint(tmp_path / "m.pt")
    stored = load_checkpoint(path)["covariance"]["uncertainty"]
    assert stored["method"] == "mc_dropout" and stored["mc_samples"] == 8
    assert load_checkpoint(path)["covariance"]["scale_fit"] == "leave-block-out, 5 folds"  # 12 frames in 5 pieces
    assert set(stored["scales"]) == {"mc_dropout", "variance_head"} and set(stored["val_metrics"]) == {"fixed", "mc_dropout", "variance_head"}
    image = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)

    reloc = Relocalizer(str(path), device="cpu", warmup=False)
    assert (reloc.uncertainty, reloc.mc_samples) == ("mc_dropout", 8)
    a, b = reloc.predict(image), reloc.predict(image)
    np.testing.assert_array_equal(a.position, b.position)  # the published pose is deterministic
    assert not np.array_equal(a.covariance, b.covariance)  # the covariance is sampled per frame
    np.testing.assert_allclose(a.covariance, a.covariance.T)
    plain = Relocalizer(str(path), device="cpu", warmup=False, uncertainty="fixed")
    np.testing.assert_allclose(plain.predict(image).position, a.position, atol=1e-5)
    np.testing.assert_array_equal(plain.predict(image).covariance, covariance_matrix(load_checkpoint(path)["covariance"]))

    head = Relocalizer(str(path), device="cpu", warmup=False, uncertainty="variance_head")
    c = head.predict(image).covariance
    np.testing.assert_array_equal(c, head.predict(image).covariance)
    assert np.count_nonzero(c - np.diag(np.diag(c))) == 0
    with pytest.raises(ValueError, match="mc_samples"):
        Relocalizer(str(path), device="cpu", warmup=False, mc_samples=1)
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        Relocalizer(str(path), device="cpu", warmup=False, uncertainty="ensemble")


def test_exported_backend_falls_back_to_the_fixed_covariance(tmp_path, caplog):
    pytest.importorskip("onnxruntime")
    path = _calibrated_checkpoint(tmp_path / "m.pt")
    with caplog.at_level(logging.WARNING):
        reloc = Relocalizer(str(path), device="cpu", backend="onnxruntime", warmup=False)
    assert reloc.uncertainty == "fixed" and "needs the torch backend" in caplog.text
    image = np.full((32, 32, 3), 128, np.uint8)
    np.testing.assert_array_equal(reloc.predict(image).covariance, covariance_matrix(load_checkpoint(path)["covariance"]))


def test_checkpoints_without_uncertainty_settings_still_load(tmp_path):
    calib = {"position_var": [0.04, 0.09, 0.01], "rotation_var": [1e-3, 2e-3, 3e-3], "samples": 10}
    path = untrained_checkpoint(tmp_path / "old.pt", [0.0, 0.0, 0.0], PRE, covariance=calib)
    payload = torch.load(path, weights_only=False)
    payload["model_config"].pop("variance_head")  # as written before the variance head existed
    torch.save(payload, path)
    reloc = Relocalizer(str(path), device="cpu", warmup=False)
    assert reloc.uncertainty == "fixed"
    prediction = reloc.predict(np.zeros((32, 32, 3), np.uint8))
    np.testing.assert_array_equal(prediction.covariance, covariance_matrix(calib))
    with pytest.raises(ValueError, match="no calibration for uncertainty 'mc_dropout'"):
        Relocalizer(str(path), device="cpu", warmup=False, uncertainty="mc_dropout")


def test_evaluate_reports_calibration_and_a_reliability_plot(tmp_path_factory, tmp_path, capsys):
    from helpers import tiny_scene

    from ros2_posenet.evaluate import main

    root = tiny_scene(tmp_path_factory, "unc_scene")
    path = _calibrated_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "eval"
    assert main(["--checkpoint", str(path), "--dataset", "7scenes", "--root", str(root), "--out", str(out), "--no-baselines"]) == 0
    printed = capsys.readouterr().out
    assert "covariance (mc_dropout): NEES median position" in printed and "68/95/99 % bounds" in printed
    result = json.loads((out / "results.json").read_text())[0]
    calibration = result["calibration"]
    assert calibration["uncertainty"] == "mc_dropout"
    assert 0.0 <= calibration["position_within_68"] <= calibration["position_within_95"] <= calibration["position_within_99"] <= 1.0
    assert calibration["nees_position_median"] > 0 and (out / "scene_reliability.png").stat().st_size > 1000
    assert main(["--checkpoint", str(path), "--dataset", "7scenes", "--root", str(root), "--no-baselines", "--uncertainty", "fixed"]) == 0
    assert "covariance (fixed)" in capsys.readouterr().out

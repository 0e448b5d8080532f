"""train.refit: the validated run chooses epochs and calibrates, the refit trains on every frame."""
import logging
import shutil

import pytest
import torch

from helpers import tiny_scene as make_scene
from ros2_posenet.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_from_checkpoint
from ros2_posenet.model import PoseEnsemble
from ros2_posenet.train import TrainingError
from ros2_posenet.data.synthetic import SyntheticSceneConfig
from ros2_posenet.train import ConfigError, load_config, main, refit_config, run_training

FRAMES = 16


@pytest.fixture(scope="module")
def tiny_scene(tmp_path_factory):
    return make_scene(tmp_path_factory, "scene", SyntheticSceneConfig(
        width=64, height=48, frames_train=FRAMES, frames_test=4, train_sequences=1, test_sequences=1, num_points=300,
    ))


def config(root, out_dir, *overrides):
    return load_config(None, [
        "data.kind=7scenes", f"data.root={root}", "data.max_points=16", "data.augment=false",
        "data.val=holdout", "data.val_split=blocks", "data.val_fraction=0.25", "data.val_block=2", "data.val_gap=1",
        "model.backbone=resnet18", "model.hidden_dim=32", "model.dropout=0.3", "model.pretrained=false",
        "preprocess.resize=40", "preprocess.crop=32", "optim.batch_size=4", "optim.lr=1e-3",
        "train.workers=0", "train.progress=false", "train.test_at_end=false", f"train.out_dir={out_dir}",
        "train.epochs=3", "stages.reprojection.epochs=2", *overrides,
    ])


def test_refit_retraces_the_chosen_epochs_on_every_frame_with_the_held_out_calibration(tiny_scene, tmp_path, capsys):
    result = run_training(config(tiny_scene, tmp_path, "train.refit=true"))
    out = capsys.readouterr().out
    # k = 4, blocks of 2: frames 4-5 and 12-13 validate, 3, 6, 11, 14 are the gap; the refit has all 16.
    assert "training 8, validation 4, dropped 4 of 16 frames" in out
    assert f"training {FRAMES}, validation 0, dropped 0 of {FRAMES} frames" in out
    assert result["validated"]["checkpoint"] == str(tmp_path / "reprojection" / "best.pt")
    assert result["checkpoint"] == str(tmp_path / "refit" / "reprojection" / "best.pt")
    for stage in ("learned", "reprojection"):
        chosen = load_checkpoint(tmp_path / stage / "best.pt")
        refit = load_checkpoint(tmp_path / "refit" / stage / "best.pt")
        assert refit["epoch"] == chosen["epoch"]
        assert refit["covariance"] == chosen["covariance"] and refit["covariance"]["samples"] == 4
        assert refit["val_metrics"] == chosen["val_metrics"]
        assert refit["val_split"].startswith(chosen["val_split"]) and "this refit trained on every frame" in refit["val_split"]
        # Different weights: the refit saw frames the validated model never trained on.
        if refit["epoch"] > 0:
            assert not torch.equal(refit["model_state"]["fc_position.weight"], chosen["model_state"]["fc_position.weight"])
    # Its config can be resumed as is: it says where the calibration came from and when to stop.
    refit_cfg = load_checkpoint(result["checkpoint"])["train_config"]
    assert refit_cfg["train"]["calibrate_from"] == str(tmp_path) and refit_cfg["data"]["val"] == "none"


def test_a_refit_alone_from_a_finished_validated_run(tiny_scene, tmp_path):
    run_training(config(tiny_scene, tmp_path))
    assert not (tmp_path / "refit").exists()
    assert main(["--resume", str(tmp_path / "reprojection" / "last.pt"), "train.refit=true"]) == 0
    assert load_checkpoint(tmp_path / "refit" / "reprojection" / "best.pt")["epoch"] == \
        load_checkpoint(tmp_path / "reprojection" / "best.pt")["epoch"]


def test_stop_after_zero_keeps_the_starting_weights(tiny_scene, tmp_path, capsys):
    run_training(config(tiny_scene, tmp_path, "data.val=none", "stages.reprojection.stop_after=0"))
    learned = load_checkpoint(tmp_path / "learned" / "best.pt")["model_state"]
    kept = load_checkpoint(tmp_path / "reprojection" / "best.pt")
    assert kept["epoch"] == 0 and kept["model_state"].keys() == learned.keys()
    assert all(torch.equal(kept["model_state"][k], learned[k]) for k in learned)
    assert "not trained (stop_after 0)" in capsys.readouterr().out


def test_stop_after_ends_the_stage_early_on_its_own_schedule(tiny_scene, tmp_path):
    cfg = config(tiny_scene, tmp_path, "data.val=none", "stages.learned.stop_after=1", "stages.reprojection.epochs=1")
    run_training(cfg)
    last = load_checkpoint(tmp_path / "learned" / "last.pt")
    assert last["epoch"] == 1
    # The learning rate followed the 3-epoch cosine, not a 1-epoch one that would end at 1 % of lr.
    assert last["resume"]["optimizer"]["param_groups"][0]["lr"] > 0.5e-3


def test_the_log_warns_when_the_split_drops_many_frames(tiny_scene, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        run_training(config(tiny_scene, tmp_path, "data.val_gap=2", "train.epochs=1", "stages.reprojection.epochs=1"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "drops" in r.getMessage()]
    assert warnings and "8 of 16 training frames (50 %" in warnings[0]


def test_refit_needs_a_holdout_and_all_stages(tiny_scene, tmp_path):
    with pytest.raises(ConfigError, match="train.refit needs data.val: holdout"):
        config(tiny_scene, tmp_path, "train.refit=true", "data.val=none")
    with pytest.raises(ConfigError, match="refits every stage"):
        run_training(config(tiny_scene, tmp_path, "train.refit=true"), only_stage="learned")
    refit = refit_config(config(tiny_scene, tmp_path, "train.refit=true"), {"learned": 3, "reprojection": 0})
    assert refit["train"]["out_dir"] == str(tmp_path / "refit") and not refit["train"]["refit"]
    assert [s["stop_after"] for s in refit["stages"]] == [3, 0]


def test_an_ensemble_refits_networks_of_successive_seeds_and_publishes_their_mean(tiny_scene, tmp_path, capsys):
    result = run_training(config(tiny_scene, tmp_path, "train.refit=true", "train.ensemble=2"))
    assert result["checkpoint"] == str(tmp_path / "ensemble.pt")
    assert result["stages"]["reprojection"]["best"] == str(tmp_path / "refit" / "reprojection" / "best.pt")
    members = [tmp_path / "refit" / "reprojection" / "best.pt", tmp_path / "refit-seed1" / "reprojection" / "best.pt"]
    first, second = (load_checkpoint(m) for m in members)
    assert [first["train_config"]["train"]["seed"], second["train_config"]["train"]["seed"]] == [0, 1]
    assert first["epoch"] == second["epoch"] == load_checkpoint(tmp_path / "reprojection" / "best.pt")["epoch"]
    assert not torch.equal(first["model_state"]["fc_position.weight"], second["model_state"]["fc_position.weight"])
    payload = load_checkpoint(result["checkpoint"])
    assert payload["members"] == [str(m) for m in members] and payload["covariance"] == first["covariance"]
    ensemble = model_from_checkpoint(payload)
    assert isinstance(ensemble, PoseEnsemble)
    x = torch.randn(3, 3, preprocess_from_checkpoint(payload).crop, preprocess_from_checkpoint(payload).crop)
    with torch.no_grad():
        t = ensemble(x)[0]
        expected = torch.stack([model_from_checkpoint(load_checkpoint(m))(x)[0] for m in members]).mean(0)
    torch.testing.assert_close(t, expected)
    assert "ensemble of 2 networks (seeds 0..1)" in capsys.readouterr().out


def test_an_ensemble_needs_a_refit_and_is_not_a_stage_start(tiny_scene, tmp_path):
    with pytest.raises(ConfigError, match="train.ensemble 2 needs train.refit"):
        config(tiny_scene, tmp_path, "train.ensemble=2")
    refit = refit_config(config(tiny_scene, tmp_path, "train.refit=true", "train.ensemble=3", "train.seed=5"),
                         {"learned": 3, "reprojection": 0}, member=2)
    assert refit["train"]["out_dir"] == str(tmp_path / "refit-seed7") and refit["train"]["seed"] == 7
    assert refit["train"]["ensemble"] == 1
    run_training(config(tiny_scene, tmp_path / "run", "train.refit=true", "train.ensemble=2", "train.epochs=1",
                        "stages.reprojection.epochs=1"))
    with pytest.raises(TrainingError, match="is an ensemble of 2 networks; start from one of its members"):
        run_training(config(tiny_scene, tmp_path / "tune", "data.val=none", f"stages.learned.init={tmp_path / 'run' / 'ensemble.pt'}",
                            "train.epochs=1", "stages.reprojection.epochs=1"))


def test_resuming_one_network_of_an_interrupted_ensemble_trains_the_rest_and_writes_the_ensemble(tiny_scene, tmp_path):
    run_training(config(tiny_scene, tmp_path, "train.refit=true", "train.ensemble=2", "train.epochs=2",
                        "stages.reprojection.epochs=1"))
    second = load_checkpoint(tmp_path / "refit-seed1" / "reprojection" / "best.pt")["model_state"]
    # Interrupted in the first network: the second never started, no ensemble was written.
    shutil.rmtree(tmp_path / "refit-seed1")
    (tmp_path / "ensemble.pt").unlink()
    assert main(["--resume", str(tmp_path / "refit" / "learned" / "last.pt")]) == 0
    payload = load_checkpoint(tmp_path / "ensemble.pt")
    assert payload["members"] == [str(tmp_path / d / "reprojection" / "best.pt") for d in ("refit", "refit-seed1")]
    retrained = load_checkpoint(tmp_path / "refit-seed1" / "reprojection" / "best.pt")
    assert retrained["train_config"]["train"]["seed"] == 1
    assert all(torch.equal(retrained["model_state"][k], second[k]) for k in second)  # the same network again
    first_mtime = (tmp_path / "refit" / "reprojection" / "best.pt").stat().st_mtime_ns
    # A network that finished with this config is kept; one of another run (here: another seed) is trained again.
    (tmp_path / "ensemble.pt").unlink()
    shutil.copytree(tmp_path / "refit", tmp_path / "refit-seed1", dirs_exist_ok=True)
    assert main(["--resume", str(tmp_path / "refit" / "learned" / "last.pt")]) == 0
    assert (tmp_path / "refit" / "reprojection" / "best.pt").stat().st_mtime_ns > first_mtime  # the resumed one reran its last stage
    again = load_checkpoint(tmp_path / "refit-seed1" / "reprojection" / "best.pt")
    assert again["train_config"]["train"]["seed"] == 1 and all(torch.equal(again["model_state"][k], second[k]) for k in second)
    assert (tmp_path / "ensemble.pt").is_file()

"""Training config: YAML + overrides, validation messages, validation split."""
import pytest
import yaml

from ros2_posenet.train import ConfigError, holdout_split, load_config, main


def write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {"data": {"kind": "synthetic", "root": "/tmp/scene"}, "model": {"backbone": "resnet18", "pretrained": False}}


def test_defaults_give_the_two_stage_schedule_and_overrides_apply(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.epochs=3", "stages.reprojection.lr=1e-5", "stages.0.epochs=7", "optim.batch_size=4"])
    assert [s["name"] for s in cfg["stages"]] == ["learned", "reprojection"]
    assert cfg["stages"][0]["loss"] == {"type": "learned", "sx": 0.0, "sq": -3.0}
    assert cfg["stages"][0]["epochs"] == 7 and cfg["stages"][1]["epochs"] is None
    assert cfg["stages"][1]["lr"] == pytest.approx(1e-5)
    assert cfg["train"]["epochs"] == 3 and cfg["optim"]["batch_size"] == 4
    assert cfg["model"]["backbone"] == "resnet18"


def test_top_level_loss_makes_a_single_stage_run(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["loss.type=beta", "loss.beta=250", "loss.norm=l1"])
    assert len(cfg["stages"]) == 1
    assert cfg["stages"][0]["name"] == "beta"
    assert cfg["stages"][0]["loss"] == {"type": "beta", "beta": 250, "norm": "l1"}
    assert cfg["stages"][0]["init"] == "scratch"


def test_stage_fields_missing_from_the_file_can_still_be_overridden(tmp_path):
    data = {**BASE, "stages": [{"name": "s1", "loss": {"type": "learned"}}]}
    cfg = load_config(write(tmp_path, data), ["stages.s1.epochs=2", "stages.s1.loss.sq=-2"])
    assert cfg["stages"][0]["epochs"] == 2 and cfg["stages"][0]["loss"]["sq"] == -2


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        (BASE, ["train.epoch=3"], "unknown config key 'train.epoch' (did you mean 'train.epochs'"),
        (BASE, ["optim.lr=-1"], "optim.lr must be a positive number"),
        (BASE, ["optim.clip_grad_norm=0"], "optim.clip_grad_norm must be a positive number or null"),
        (BASE, ["data.rotation_deg=90"], "data.rotation_deg must be in [0, 30]"),
        (BASE, ["data.random_crop=maybe"], "data.random_crop must be true or false"),
        (BASE, ["stages.reprojection.freeze_batchnorm=1"], "stages.reprojection.freeze_batchnorm must be true, false or null"),
        (BASE, ["train.device=tpu"], "train.device"),
        (BASE, ["model.backbone=vgg"], "unknown backbone"),
        (BASE, ["preprocess.crop=300"], "crop <= resize"),
        (BASE, ["stages.learned.loss.type=magic"], "loss type must be one of"),
        (BASE, ["stages.nope.epochs=1"], "no stage named 'nope'"),
        (BASE, ["train.epochs"], "key=value"),
        ({**BASE, "trian": {}}, [], "unknown config key 'trian' (did you mean 'train'"),
        ({"model": {"backbone": "resnet18"}}, [], "data.kind is required"),
        ({**BASE, "stages": [{"name": "a", "loss": {"type": "beta"}}, {"name": "a", "loss": {"type": "beta"}}]}, [], "used twice"),
        ({**BASE, "stages": [{"name": "a", "loss": {"type": "beta"}, "epoch": 3}]}, [], "unknown key 'stages[0].epoch'"),
    ],
)
def test_bad_configs_fail_with_a_message_naming_the_key(tmp_path, data, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, data), overrides)
    assert message in str(err.value)


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--config", str(write(tmp_path, BASE)), "optim.batch_size=0"]) == 2
    assert "optim.batch_size" in capsys.readouterr().err


def test_cli_prints_the_resolved_config(tmp_path, capsys):
    assert main(["--config", str(write(tmp_path, BASE)), "train.seed=5", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["seed"] == 5 and printed["stages"][1]["loss"]["type"] == "reprojection"


def test_holdout_takes_contiguous_blocks_from_every_sequence():
    ids = ["seq1"] * 100 + ["seq2"] * 60
    train, val = holdout_split(ids, fraction=0.25, block=10)
    assert sorted(train + val) == list(range(160)) and not set(train) & set(val)
    # k = 4: block 2 (frames 20-29) and block 6 (60-69) of seq1, block 2 of seq2 (frames 120-129).
    assert val == list(range(20, 30)) + list(range(60, 70)) + list(range(120, 130))


def test_holdout_falls_back_to_every_kth_frame_for_tiny_sets():
    train, val = holdout_split(["a"] * 8, fraction=0.25, block=10)
    assert val == [2, 6] and len(train) == 6

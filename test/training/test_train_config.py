"""Training config: YAML + overrides, validation messages, old checkpoints' configs, validation split."""
from pathlib import Path

import pytest
import torch
import yaml

from ros2_posenet.checkpoint import FORMAT, VERSION
from ros2_posenet.train import ConfigError, apply_override, holdout_split, load_config, main, validate_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"


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
        (BASE, ["train.epoch=3"], "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
        (BASE, ["optim.lr=-1"], "optim.lr must be > 0, got -1"),
        (BASE, ["optim.clip_grad_norm=0"], "optim.clip_grad_norm must be > 0 or null, got 0"),
        (BASE, ["data.rotation_deg=90"], "data.rotation_deg must be in [0, 30]"),
        (BASE, ["data.random_crop=maybe"], "data.random_crop must be true or false"),
        (BASE, ["stages.reprojection.freeze_batchnorm=1"], "stages.reprojection.freeze_batchnorm must be true or false or null, got 1"),
        (BASE, ["train.device=tpu"], "train.device"),
        (BASE, ["model.backbone=vgg"], "unknown backbone"),
        (BASE, ["preprocess.crop=300"], "crop <= resize"),
        (BASE, ["stages.learned.loss.type=magic"], "loss type must be one of"),
        (BASE, ["stages.nope.epochs=1"], "no stage named 'nope'"),
        (BASE, ["train.epochs"], "key=value"),
        ({**BASE, "trian": {}}, [], "unknown key 'trian' (did you mean 'train'?)"),
        ({"model": {"backbone": "resnet18"}}, [], "data.kind is required"),
        ({**BASE, "stages": [{"name": "a", "loss": {"type": "beta"}}, {"name": "a", "loss": {"type": "beta"}}]}, [], "used twice"),
        ({**BASE, "stages": [{"name": "a", "loss": {"type": "beta"}, "epoch": 3}]}, [], "unknown key 'stages.a.epoch' (did you mean 'stages.a.epochs'?)"),
        # Wrong types are not coerced: a flag is not 1, a count is not 2.5, a number is not a string.
        (BASE, ["train.seed=1.5"], "train.seed must be an integer, got 1.5"),
        (BASE, ["stages.learned.epochs=2.5"], "stages.learned.epochs must be an integer or null, got 2.5"),
        (BASE, ["optim.lr='0.1'"], "optim.lr must be a number, got '0.1'"),
        (BASE, ["train.progress=1"], "train.progress must be true or false, got 1"),
        (BASE, ["train.amp=maybe"], "train.amp must be 'auto' or true or false, got 'maybe'"),
        (BASE, ["optim.position_lr_scale=-2"], "optim.position_lr_scale must be 'auto' or > 0, got -2"),
        (BASE, ["optim.lr=.nan"], "optim.lr must be a finite number"),
        (BASE, ["data.val=train"], "data.val must be 'holdout', 'test' or 'none', got 'train'"),
        (BASE, ["model.backbnoe=resnet18"], "unknown key 'model.backbnoe' (did you mean 'model.backbone'?)"),
        (BASE, ["stages.reprojection.epoch=5"], "unknown key 'stages.reprojection.epoch' (did you mean 'stages.reprojection.epochs'?)"),
        (BASE, ["data.options=null"], "data.options must be a mapping, got None"),
        (BASE, ["stages.learned.name=a/b"], "stage name 'a/b' must be letters, digits, - or _"),
        ({**BASE, "stages": []}, [], "stages must not be empty"),
        ({**BASE, "stages": [{"name": "a", "epochs": 3}]}, [], "stages.a.loss is required (a mapping like {type: learned})"),
        ({**BASE, "train": 5}, ["train.epochs=3"], "config key 'train' is a value, not a section"),
    ],
)
def test_bad_configs_fail_with_a_message_naming_the_key(tmp_path, data, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, data), overrides)
    assert message in str(err.value)


def test_every_problem_is_reported_at_once_with_its_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.kind=synthetic", "data.root=/tmp/scene", "train.epochs=0", "optim.batch_size=0"])
    assert str(err.value) == "optim.batch_size must be >= 1, got 0; train.epochs must be >= 1, got 0"


def test_an_override_names_a_stage_by_name_or_index_and_is_checked_by_validation():
    cfg = validate_config(BASE)
    apply_override(cfg, "stages.reprojection.epochs=5")
    apply_override(cfg, "stages.-2.lr=1e-3")
    assert validate_config(cfg)["stages"][1]["epochs"] == 5 and cfg["stages"][0]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="there are only 2 stages"):
        apply_override(cfg, "stages.2.epochs=1")
    with pytest.raises(ConfigError, match="no stage named 'reprojectoin' \\(did you mean 'reprojection'"):
        apply_override(cfg, "stages.reprojectoin.epochs=1")
    with pytest.raises(ConfigError, match="name a field of the stage"):
        apply_override(cfg, "stages.learned=3")


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("train_*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates_to_itself(path):
    cfg = load_config(path, [] if "root:" in path.read_text() else ["data.root=/tmp/scene"])
    assert validate_config(cfg) == cfg  # idempotent: checkpoints store the resolved form
    assert [s["name"] for s in cfg["stages"]] and cfg["data"]["kind"]


# train_config as the first release stored it in checkpoints (resolved; the keys of that release only).
FIRST_RELEASE_CONFIG = {
    "map_frame": "map",
    "data": {"kind": "synthetic", "root": "/tmp/scene", "max_points": 256, "augment": True, "color_jitter": 0.0,
             "val": "holdout", "val_fraction": 0.1, "val_block": 10},
    "model": {"backbone": "resnet18", "hidden_dim": 2048, "dropout": 0.5, "pretrained": False},
    "preprocess": {"resize": 256, "crop": 224},
    "optim": {"lr": 1e-4, "loss_lr": None, "position_lr_scale": "auto", "weight_decay": 0.0, "batch_size": 32,
              "eps": 1e-8, "schedule": "cosine", "final_lr_fraction": 0.01},
    "loss": None,
    "stages": [
        {"name": "learned", "loss": {"type": "learned", "sx": 0.0, "sq": -3.0}, "epochs": 4, "lr": None, "init": "previous"},
        {"name": "reprojection", "loss": {"type": "reprojection", "gamma": 1}, "epochs": None, "lr": 1e-5, "init": "previous"},
    ],
    "train": {"epochs": 100, "workers": 2, "seed": 0, "device": "auto", "amp": "auto", "val_every": 1, "keep_every": 0,
              "out_dir": "runs/posenet", "progress": True, "test_at_end": True, "deterministic": False},
}


def test_a_config_stored_by_an_older_release_resumes_with_the_new_keys_at_their_defaults(tmp_path, capsys):
    """Mutation: a schema that requires every key (or drops stored values) breaks ``train --resume`` of old runs."""
    payload = {"format": FORMAT, "version": VERSION, "model_config": {}, "model_state": {}, "preprocess": {},
               "train_config": FIRST_RELEASE_CONFIG}
    torch.save(payload, tmp_path / "last.pt")
    assert main(["--resume", str(tmp_path / "last.pt"), "stages.learned.epochs=6", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg == validate_config(cfg)
    learned, reprojection = cfg["stages"]
    assert learned["epochs"] == 6 and reprojection["lr"] == pytest.approx(1e-5)  # stored values and the override kept
    assert (learned["freeze_batchnorm"], learned["dropout"], reprojection["freeze_batchnorm"], reprojection["dropout"]) == (
        False, True, True, False)  # resolved by loss, as the release that added them does
    assert cfg["data"]["val_split"] == "auto" and cfg["uncertainty"]["method"] == "fixed" and cfg["train"]["refit"] is False
    assert cfg["optim"]["clip_grad_norm"] == 5.0 and cfg["model"]["variance_head"] is False


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

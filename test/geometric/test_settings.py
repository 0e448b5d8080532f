"""Settings of the geometric stage: strict dict round trip (unknown keys, wrong types are errors), value checks,
validated copies, and the feature config stored in maps written before."""
import json

import numpy as np
import pydantic
import pytest

from ros2_posenet.geometric.features import FeatureConfig
from ros2_posenet.geometric.refiner import RefinementConfig
from ros2_posenet.geometric.scene_map import SceneMap, SceneMapBuilder

SETTINGS = [FeatureConfig, RefinementConfig]


@pytest.mark.parametrize("cls", SETTINGS)
def test_round_trip_and_unknown_keys(cls):
    """Mutation: ``from_dict`` that drops unknown keys silently (a typo in a params file would fall back to a default)."""
    settings = cls()
    assert cls.from_dict(settings.to_dict()) == settings
    with pytest.raises(ValueError, match=rf"^{cls.model_config['title']}: unknown key 'typo_field' \(known: "):
        cls.from_dict({**settings.to_dict(), "typo_field": 1})


@pytest.mark.parametrize("cls, typo, meant", [
    (FeatureConfig, "max_feature", "max_features"), (RefinementConfig, "keyframe", "keyframes"),
    (RefinementConfig, "min_inlier", "min_inliers"),
])
def test_a_misspelt_key_gets_a_did_you_mean_hint(cls, typo, meant):
    with pytest.raises(ValueError, match=rf"unknown key '{typo}' \(did you mean '{meant}'\?\)"):
        cls.from_dict({typo: 3})


@pytest.mark.parametrize("field, value, message", [
    ("max_focal_error", -0.01, "max_focal_error must be >= 0, got -0.01"),
    ("guided_ratio", 1.5, "guided_ratio must be <= 1, got 1.5"),
    ("guided_window_px", 0.0, "guided_window_px must be > 0, got 0.0"),
    ("guided_min_inliers", 5, "guided_min_inliers must be >= 6, got 5"),
    ("max_keyframe_angle_deg", 181.0, "max_keyframe_angle_deg must be <= 180"),
    ("solver", "magic", "solver must be 'pycolmap', 'poselib' or 'opencv', got 'magic'"),
    ("gate_sigma", float("inf"), "gate_sigma must be a finite number"),
    # Wrong types are not coerced (the old int() accepted 4.7 keyframes as 4).
    ("keyframes", 4.7, "keyframes must be an integer, got 4.7"),
    ("retrieval", "yes", "retrieval must be true or false, got 'yes'"),
])
def test_refinement_values_are_checked(field, value, message):
    with pytest.raises(ValueError, match=f"^refinement config: {message}"):
        RefinementConfig.from_dict({field: value})
    with pytest.raises(ValueError, match=field):  # the keyword constructor: pydantic's ValidationError names the field
        RefinementConfig(**{field: value})


@pytest.mark.parametrize("values, message", [
    ({"type": "surf"}, "type must be 'sift' or 'orb', got 'surf'"),
    ({"max_features": 4}, "max_features must be >= 8, got 4"),
    ({"max_image_size": 16}, "max_image_size must be 0 (off) or >= 32, got 16"),
    ({"mutual": 1}, "mutual must be true or false, got 1"),
    ({"ratio": 0, "orb_levels": 17}, "ratio must be > 0, got 0; orb_levels must be <= 16, got 17"),
])
def test_feature_values_are_checked(values, message):
    with pytest.raises(ValueError) as err:
        FeatureConfig.from_dict(values)
    assert str(err.value) == f"feature config: {message}"


def test_a_changed_value_survives_the_round_trip():
    changed = RefinementConfig(max_focal_error=0.05, guided_matching=False, keyframes=6)
    assert RefinementConfig.from_dict(changed.to_dict()) == changed != RefinementConfig()


@pytest.mark.parametrize("cls", SETTINGS)
def test_settings_are_frozen(cls):
    """A Refiner and its map share them: a change in place would reach both."""
    settings = cls()
    field = next(iter(cls.model_fields))
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        setattr(settings, field, getattr(settings, field))


def test_a_change_is_a_validated_copy():
    changed = RefinementConfig().replace(min_inliers=40, covariance_scale=2)
    assert (changed.min_inliers, changed.covariance_scale, changed.retrieval) == (40, 2.0, True)
    with pytest.raises(ValueError, match="refinement config: min_inliers must be >= 6"):
        RefinementConfig().replace(min_inliers=3)
    with pytest.raises(ValueError, match="unknown key 'min_inlier'"):
        RefinementConfig().replace(min_inlier=40)


def test_from_yaml_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "refine.yaml"
    path.write_text("keyframes: 6\nguided_ratio: 0.8\n")
    assert RefinementConfig.from_yaml(path) == RefinementConfig(keyframes=6, guided_ratio=0.8)
    path.write_text("min_position_std: 2e-3\n")  # read as the training configs and key=value settings are: a number
    assert RefinementConfig.from_yaml(path) == RefinementConfig(min_position_std=0.002)
    path.write_text("keyframes: 6\nmin_inlers: 20\n")
    with pytest.raises(ValueError, match=rf"{path}: refinement config: unknown key 'min_inlers' \(did you mean 'min_inliers'\?\)"):
        RefinementConfig.from_yaml(path)


def test_a_map_written_before_the_settings_were_pydantic_still_loads(tmp_path):
    """The header's feature_config as the dataclass wrote it (asdict; ``ratio`` given as the int 1) loads unchanged."""
    rng = np.random.default_rng(0)
    builder = SceneMapBuilder(FeatureConfig(type="orb", max_features=500), "depth")
    K = np.array([[100.0, 0, 80], [0, 100.0, 60], [0, 0, 1]])
    builder.add_keyframe("frame-000000.color.png", K, np.eye(4), (160, 120), rng.uniform(0, 150, (20, 2)),
                         rng.integers(0, 256, (20, 32)), rng.normal(size=(20, 3)))
    path = builder.build({}).save(tmp_path / "map.npz")
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    header = json.loads(str(arrays["header"]))
    header["feature_config"] = {"type": "orb", "max_features": 500, "ratio": 1, "mutual": False, "contrast_threshold": 0.02,
                                "orb_fast_threshold": 12, "orb_levels": 8, "max_image_size": 0}
    arrays["header"] = np.array(json.dumps(header))
    np.savez(path, **arrays)
    loaded = SceneMap.load(path).feature_config
    assert loaded == FeatureConfig(type="orb", max_features=500, ratio=1.0, mutual=False)
    assert loaded.descriptor_size == 32

"""Settings of the geometric stage: strict dict round trip (unknown keys are errors) and value checks."""
import pytest

from ros2_posenet.geometric.features import FeatureConfig
from ros2_posenet.geometric.refiner import RefinementConfig


@pytest.mark.parametrize("cls", [FeatureConfig, RefinementConfig])
def test_round_trip_and_unknown_keys(cls):
    """Mutation: ``from_dict`` that drops unknown keys silently (a typo in a params file would fall back to a default)."""
    settings = cls()
    assert cls.from_dict(settings.to_dict()) == settings
    with pytest.raises(ValueError, match=rf"{cls.SETTINGS_NAME}: unknown keys \['typo_field'\]"):
        cls.from_dict({**settings.to_dict(), "typo_field": 1})


@pytest.mark.parametrize("field, value, message", [
    ("max_focal_error", -0.01, "max_focal_error must be >= 0"),
    ("guided_ratio", 1.5, "guided_ratio must be in"),
    ("guided_window_px", 0.0, "guided_window_px must be > 0"),
    ("guided_min_inliers", 5, "guided_min_inliers must be >= 6"),
])
def test_refinement_values_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        RefinementConfig(**{field: value})


def test_a_changed_value_survives_the_round_trip():
    changed = RefinementConfig(max_focal_error=0.05, guided_matching=False, keyframes=6)
    assert RefinementConfig.from_dict(changed.to_dict()) == changed != RefinementConfig()

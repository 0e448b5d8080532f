"""The shared configuration base: strict models whose errors name the dotted key path (list items by name)."""
from typing import Literal

import pytest
from pydantic import Field, field_validator, model_validator

from ros2_posenet.config_base import ConfigError, StrictModel, did_you_mean, key_value


class Item(StrictModel):
    name: str | None = None
    count: int = Field(1, ge=1)


class Section(StrictModel):
    size: int = 3
    mode: Literal["auto"] | bool = "auto"
    scale: float | None = Field(None, gt=0)

    @field_validator("size")
    @classmethod
    def _odd(cls, size: int) -> int:
        if size % 2 == 0:
            raise ValueError(f"must be odd, got {size}")
        return size

    @model_validator(mode="after")
    def _fits(self):
        if self.scale is not None and self.scale * self.size > 10:
            raise ValueError("scale times size must be <= 10")
        return self


class Root(StrictModel):
    label: str = Field(description="what the run is called")
    section: Section = Section()
    items: list[Item] = []


@pytest.mark.parametrize("values, message", [
    ({"label": "a", "sectoin": {}}, "unknown key 'sectoin' (did you mean 'section'?)"),
    ({"label": "a", "section": {"sise": 5}}, "unknown key 'section.sise' (did you mean 'section.size'?)"),
    ({"label": "a", "items": [{"name": "left", "count": 0}]}, "items.left.count must be >= 1, got 0"),
    ({"label": "a", "items": [{"count": 0}]}, "items.0.count must be >= 1, got 0"),  # no name: its index
    ({"label": "a", "items": [{"name": "left", "cuont": 2}]}, "unknown key 'items.left.cuont' (did you mean 'items.left.count'?)"),
    ({"label": "a", "section": {"mode": "on"}}, "section.mode must be 'auto' or true or false, got 'on'"),
    ({"label": "a", "section": {"scale": 0}}, "section.scale must be > 0 or null, got 0"),
    ({"label": "a", "section": {"size": 4}}, "section.size must be odd, got 4"),
    ({"label": "a", "section": {"scale": 5.0}}, "section.scale times size must be <= 10"),  # a check naming its field
    ({"label": "a", "section": {"size": "3"}}, "section.size must be an integer, got '3'"),
    ({}, "label is required (what the run is called)"),
    ({"label": 1, "items": {}}, "label must be a string, got 1; items must be a list, got {}"),
])
def test_errors_name_the_key_path(values, message):
    with pytest.raises(ConfigError) as err:
        Root.from_dict(values)
    assert str(err.value) == message


def test_round_trip_and_validated_replace():
    root = Root.from_dict({"label": "a", "items": [{"name": "left"}]})
    assert root.to_dict() == {"label": "a", "section": {"size": 3, "mode": "auto", "scale": None},
                              "items": [{"name": "left", "count": 1}]}
    assert Root.from_dict(root.to_dict()) == root
    assert root.replace(label="b").label == "b" and root.label == "a"
    with pytest.raises(ConfigError, match="unknown key 'lable'"):
        root.replace(lable="b")


def test_did_you_mean_lists_the_options_when_none_is_close():
    assert did_you_mean("epoch", ["epochs", "seed"], "train.") == " (did you mean 'train.epochs'?)"
    assert did_you_mean("zzz", ["b", "a"]) == " (known: a, b)"


def test_a_command_line_setting_reads_its_value_as_the_configs_do():
    assert key_value("max_range_uncertainty=1e-2") == ("max_range_uncertainty", 0.01)  # a float, as in a YAML config
    assert key_value("guided_matching=false") == ("guided_matching", False)
    assert key_value("split_file=queries.txt") == ("split_file", "queries.txt")
    assert key_value("name=") == ("name", "")
    for malformed in ("min_track_length", "=3"):
        with pytest.raises(ConfigError, match="expected KEY=VALUE"):
            key_value(malformed)
    with pytest.raises(ConfigError, match="not YAML") as err:  # not a yaml.YAMLError traceback
        key_value("pairs=[1, 2")
    assert "\n" not in str(err.value)

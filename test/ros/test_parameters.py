"""The node's parameter table (ros/parameters.py): one typed table, everything else derived from it."""
import argparse
import math
from dataclasses import FrozenInstanceError, fields

import pytest

from ros2_posenet.ros.parameters import (
    FLOAT_PARAMETERS, PARAMETERS, ConfigurationError, NodeSettings, add_parameter_flag, argument_parser, missing_file_problem,
    spec, type_problem, validate_parameter,
)


def test_every_settings_field_is_a_declared_parameter_with_its_type():
    assert [f.name for f in fields(NodeSettings)] == [row.name for row in PARAMETERS]
    for row in PARAMETERS:
        assert row.description and type_problem(row.name, row.default) is None and validate_parameter(row.name, row.default) in (None, "must not be empty")


def test_float_parameters_derive_from_the_table_and_include_future_stamp_tolerance():
    """The hand-written float list of the old node omitted future_stamp_tolerance (an integer from YAML stayed an integer)."""
    expected = {row.name for row in PARAMETERS if isinstance(row.default, float)}
    assert set(FLOAT_PARAMETERS) == expected and "future_stamp_tolerance" in FLOAT_PARAMETERS
    assert all(spec(name).dynamic_typing for name in FLOAT_PARAMETERS)  # YAML `2` is accepted at declaration...
    s = NodeSettings.from_parameters({"checkpoint": "m.pt", "future_stamp_tolerance": 2, "max_rate_hz": 3})
    assert type(s.future_stamp_tolerance) is float and type(s.max_rate_hz) is float  # ...and held as a double


def test_settings_are_frozen_typed_and_refuse_bad_values_with_every_problem():
    s = NodeSettings.from_parameters({"checkpoint": "m.pt", "initial_pose": False, "camera_to_base": [0, 0, 1, 0, 0, 0]})
    assert s.initial_pose == "off" and s.camera_to_base == (0.0, 0.0, 1.0, 0.0, 0.0, 0.0) and s.mount.T_base_camera[2, 3] == 1.0
    with pytest.raises(FrozenInstanceError):
        s.tf_mode = "none"
    assert s.with_changes({"tf_mode": "none"}).tf_mode == "none" and s.tf_mode == "map_to_camera"
    with pytest.raises(ConfigurationError) as err:
        NodeSettings.from_parameters({"checkpoint": "m.pt", "tf_mode": "x", "mc_samples": 1.5, "max_rate_hz": math.nan, "base_frame": "/b"})
    for text in ("'tf_mode' = 'x': must be one of map_to_camera", "'mc_samples' = 1.5: must be an integer", "'max_rate_hz'", "'base_frame'"):
        assert text in str(err.value)


def test_missing_files_are_named():
    assert missing_file_problem("map_file", "/no/such/map.npz") == "no such file: /no/such/map.npz"
    assert missing_file_problem("checkpoint", "/no/such.pt") == "no such file: /no/such.pt"
    assert missing_file_problem("map_file", "") is None  # no map: regressor only
    assert missing_file_problem("image_topic", "/nope") is None


def test_help_and_bag_flags_come_from_the_table():
    help_text = argument_parser().format_help()
    assert all(f"  {row.name} (default {row.default!r})" in help_text for row in PARAMETERS)
    parser = argparse.ArgumentParser()
    for name in ("tf_mode", "camera_to_base", "publish_camera_to_base_tf", "future_stamp_tolerance", "compile"):
        add_parameter_flag(parser, name)
    args = parser.parse_args(["--tf-mode", "none", "--camera-to-base", "1", "2", "3", "0", "0", "0", "--no-publish-camera-to-base-tf",
                              "--future-stamp-tolerance", "2", "--compile"])
    assert (args.tf_mode, args.camera_to_base, args.publish_camera_to_base_tf, args.future_stamp_tolerance, args.compile) == (
        "none", [1.0, 2.0, 3.0, 0.0, 0.0, 0.0], False, 2.0, True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--tf-mode", "sideways"])  # choices from the table

"""Base of the geometric stage's settings (FeatureConfig, RefinementConfig, TriangulationConfig).

Strict models (:mod:`ros2_posenet.config_base`): a typo in a params file, or a map written by
a newer version, must fail loudly rather than fall back to a default silently. Frozen: a
:class:`~ros2_posenet.geometric.refiner.Refiner` and its map share them; a change is a validated
copy (:meth:`~ros2_posenet.config_base.StrictModel.replace`).
"""
from __future__ import annotations

from pydantic import ConfigDict

from ..config_base import StrictModel


class GeometricSettings(StrictModel):
    """Subclasses set ``model_config = ConfigDict(title=...)`` (e.g. ``"feature config"``), the prefix of their errors."""

    model_config = ConfigDict(frozen=True)

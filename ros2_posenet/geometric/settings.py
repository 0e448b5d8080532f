"""Dict round trip of settings dataclasses that refuses unknown keys.

A typo in a params file, or a map written by a newer version, must fail loudly
rather than fall back to a default silently (FeatureConfig, RefinementConfig).
"""
from __future__ import annotations

from dataclasses import asdict, fields


class StrictDictSettings:
    """Mixin for dataclasses: ``to_dict`` and a ``from_dict`` that names unknown keys.

    Subclasses set ``SETTINGS_NAME`` (e.g. ``"feature config"``), the prefix of the error.
    """

    SETTINGS_NAME = "settings"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` listing the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{cls.SETTINGS_NAME}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        return cls(**d)

"""The project's one way to declare configuration: pydantic v2 models that refuse what they do not know.

The training config (:mod:`ros2_posenet.train_config`) and the geometric stage's settings
(:class:`~ros2_posenet.geometric.features.FeatureConfig`, :class:`~ros2_posenet.geometric.triangulation.TriangulationConfig`,
:class:`~ros2_posenet.geometric.refiner.RefinementConfig`) derive from :class:`StrictModel`.
A typo in a file, a wrong type or an out-of-range value must fail loudly rather than fall back
to a default: every problem becomes one line of a :class:`ConfigError` that names the dotted key
path (list items by their ``name``, e.g. ``stages.reprojection.epochs``), with a did-you-mean
hint for a misspelt key.
"""
from __future__ import annotations

import difflib
import re
import typing
from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A configuration is invalid; the message names the key."""


def did_you_mean(key: str, options, prefix: str = "") -> str:
    """`` (did you mean '<prefix><closest option>'?)``, or the known options when none is close."""
    close = difflib.get_close_matches(key, [str(o) for o in options], n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(sorted(map(str, options)))})"


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    """YAML as the configs read it: safe, and ``1e-4`` is a float."""
    return yaml.load(text, Loader=_YamlLoader)


def key_value(item: str) -> tuple[str, Any]:
    """One ``key=value`` command-line setting, the value read by :func:`parse_yaml` ("" when empty).

    Raises:
        ConfigError: not ``key=value``, or a value that is not YAML.
    """
    key, sep, raw = item.partition("=")
    if not (sep and key):
        raise ConfigError(f"expected KEY=VALUE, got {item!r}")
    try:
        return key, parse_yaml(raw) if raw else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{item!r}: the value is not YAML ({getattr(err, 'problem', None) or err})") from None


class StrictModel(BaseModel):
    """Base of every configuration model: unknown keys are errors, values are not coerced.

    strict: a YAML ``1`` is not a flag nor ``2.5`` a count (an integer is still a valid float);
    no NaN or infinity, which would slip through every range check. :meth:`from_dict` (files,
    maps, checkpoints) raises :class:`ConfigError`, prefixed with the model's ``title`` when it has
    one; the keyword constructor raises pydantic's ``ValidationError`` (also a ``ValueError``). No
    custom ``__init__``: pydantic would call it for nested sections too, losing the key path.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @classmethod
    def from_dict(cls, values: Mapping):
        """The model of a plain mapping (the inverse of :meth:`to_dict`), missing keys at their defaults."""
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise ConfigError(describe(err, cls, values)) from None

    def to_dict(self) -> dict:
        """Plain dicts, lists and scalars, as written to YAML, JSON and checkpoints."""
        return self.model_dump()

    def replace(self, **changes: Any):
        """A validated copy with ``changes`` (the models' ``dataclasses.replace``)."""
        return self.from_dict({**self.to_dict(), **changes})


# ----------------------------------------------------------------------------- error messages

# The phrase for pydantic's error types (https://docs.pydantic.dev/latest/errors/validation_errors/);
# each is followed by ", got <value>".
_PHRASES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "literal_error": "must be {expected}",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "list_type": "must be a list",
    "too_short": "must not be empty",
}


def describe(err: ValidationError, model: type[BaseModel], values: Any) -> str:
    """One line per key that failed: ``<title>: <dotted.path> <what is wrong>``, joined by ``; ``."""
    problems: dict[str, list[str]] = {}  # sentence start -> phrases, so a union's alternatives share one line
    for error in err.errors(include_url=False):
        loc, owner = _field_loc(model, error["loc"])
        path = _dotted(loc, values)
        if error["type"] == "extra_forbidden":
            parent = path.rpartition(".")[0]
            known = owner.model_fields if owner is not None else {}
            problems.setdefault(f"unknown key '{path}'" + did_you_mean(str(loc[-1]), known, f"{parent}." if parent else ""), [])
        elif error["type"] == "missing":
            field = owner.model_fields.get(str(loc[-1])) if owner is not None else None
            hint = f" ({field.description})" if field is not None and field.description else ""
            problems.setdefault(f"{path} is required{hint}", [])
        elif error["type"] in ("value_error", "assertion_error"):
            problems.setdefault(_sentence(path, str(error["ctx"]["error"]), _model_at(model, loc)), [])
        elif error["type"] in _PHRASES:
            phrases = problems.setdefault(f"{path or 'the config'} \0, got {error['input']!r}", [])
            phrases.append(_PHRASES[error["type"]].format(**{k: _plain(v) for k, v in error.get("ctx", {}).items()}))
            if _nullable(owner, loc) and "must be null" not in phrases:
                phrases.append("must be null")
        else:
            problems.setdefault(_sentence(path, f"{error['msg']}, got {error['input']!r}", None), [])
    lines = [start.replace("\0", _alternatives(phrases)) if phrases else start for start, phrases in problems.items()]
    title = model.model_config.get("title")
    return (f"{title}: " if title else "") + "; ".join(lines)


def _plain(value):
    """``0`` for a bound given as ``0.0`` (pydantic stores a float field's bounds as floats)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _nullable(owner: type[BaseModel] | None, loc: tuple) -> bool:
    field = owner.model_fields.get(str(loc[-1])) if owner is not None and loc else None
    return field is not None and type(None) in typing.get_args(field.annotation)


def _alternatives(phrases: list[str]) -> str:
    """``must be 'auto'`` + ``must be > 0`` -> ``must be 'auto' or > 0``."""
    rest = [p.removeprefix("must be ") for p in phrases[1:]]
    return " or ".join([phrases[0], *rest]) if all(p.startswith("must be ") for p in phrases) else "; ".join(phrases)


def _sentence(path: str, text: str, model: type[BaseModel] | None) -> str:
    """A validator's message at ``path``; one that starts with a field of the model there names that key."""
    if not path:
        return text
    if model is not None and text.split(" ", 1)[0] in model.model_fields:
        return f"{path}.{text}"
    return f"{path} {text}" if text.startswith("must ") else f"{path}: {text}"


def _model_in(annotation) -> type[BaseModel] | None:
    """The model inside an annotation (``Section``, ``list[Section]``, ``Section | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _field_loc(model: type[BaseModel], loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """``loc`` without pydantic's union-member tags, and the model that owns its last key."""
    kept, owner, current = [], None, model
    for part in loc:
        if isinstance(part, int):
            kept.append(part)
        elif current is not None:  # a key of this model (or an unknown one)
            kept.append(part)
            owner = current
            field = current.model_fields.get(part)
            current = _model_in(field.annotation) if field is not None else None
        # else: the name of a union member ("literal['auto']", "float"), not a key
    return tuple(kept), owner


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    current = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(part)
        current = _model_in(field.annotation) if field is not None else None
    return current


def _dotted(loc: tuple, values: Any) -> str:
    """``loc`` as a dotted key path; a list item is named by its ``name`` key when it has one."""
    parts, node = [], values
    for part in loc:
        item = _item(node, part)
        if isinstance(part, int) and isinstance(item, Mapping) and isinstance(item.get("name"), str) and item["name"]:
            parts.append(item["name"])
        else:
            parts.append(str(part))
        node = item
    return ".".join(parts)


def _item(node: Any, part):
    if isinstance(node, Mapping):
        return node.get(part)
    if isinstance(node, (list, tuple)) and isinstance(part, int) and -len(node) <= part < len(node):
        return node[part]
    return None

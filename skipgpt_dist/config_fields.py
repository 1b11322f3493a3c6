"""The machinery under the config tree: fields that carry their range or choices in their metadata, a section
mixin that coerces and checks every field on construction, and the conversion of a plain dict (YAML + overrides)
into a section, where an unknown key is a one-line error that suggests the closest valid one."""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import field
from typing import ClassVar

from .errors import SkipGPTError


def num_field(default, *, ge=None, gt=None, le=None, lt=None):
    """A numeric field with an allowed range (checked on construction)."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt})


def choice_field(default, choices: tuple):
    """A field restricted to a fixed set of values."""
    return field(default=default, metadata={"choices": choices})


def list_field(*default: str, nonempty: bool = False):
    return field(default_factory=lambda: list(default), metadata={"nonempty": nonempty})


def section_field(cls):
    return field(default_factory=cls)


class Section:
    """Mixin: coerce + range-check every field on construction. `_prefix` names the section in messages."""

    _prefix: ClassVar[str] = ""

    def __post_init__(self):
        self.validate()

    def validate(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            key = _join(self._prefix, f.name)
            value = _coerce(getattr(self, f.name), hints[f.name], key)
            setattr(self, f.name, value)
            _check_field(value, f.metadata, key)
        return self


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _type_error(key: str, value, expected: str):
    return SkipGPTError(f"{key}={value!r} has the wrong type: expected {expected}")


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp` and return it in canonical form (raises SkipGPTError)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return None if value is None else _coerce(value, inner, key)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else section_from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise _type_error(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key, value, "an integer")
        return value
    if tp is float:
        return _coerce_float(value, key)
    if tp is str:
        if not isinstance(value, str):
            raise _type_error(key, value, "a string (quote it in YAML)")
        return value
    if origin is list:
        return _coerce_list(value, args[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _type_error(key, value, f"a list of {len(args)} values")
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")


def _coerce_float(value, key: str) -> float:
    # Ints are fine for float keys; so are numeric strings, since YAML 1.1 reads `3e-4` (no dot) as a string.
    if isinstance(value, bool):
        raise _type_error(key, value, "a number")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _type_error(key, value, "a number") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _type_error(key, value, "a finite number")
    return float(value)


def _coerce_list(value, item_type, key: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise _type_error(key, value, "a list, e.g. [a, b]")
    return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]


def _check_field(value, meta, key: str) -> None:
    """Range / choice / non-empty checks from a field's metadata."""
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(str(c) for c in meta["choices"])
        raise SkipGPTError(f"{key}={value!r} is not supported: use one of {allowed}")
    if meta.get("nonempty") and not value:
        raise SkipGPTError(f"{key} is empty: give at least one entry")
    bounds = (("ge", ">=", lambda a, b: a >= b), ("gt", ">", lambda a, b: a > b),
              ("le", "<=", lambda a, b: a <= b), ("lt", "<", lambda a, b: a < b))
    for name, sign, ok in bounds:
        bound = meta.get(name)
        if bound is not None and value is not None and not ok(value, bound):
            raise SkipGPTError(f"{key}={value!r} is out of range: it must be {sign} {bound}")


def section_from_dict(cls, data, prefix: str):
    """Build dataclass `cls` from a mapping, rejecting unknown keys with a suggestion."""
    if data is None:  # an empty YAML section (`logging:` with everything commented out)
        data = {}
    if not isinstance(data, dict):
        raise _type_error(prefix or "config", data, "a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    for name in data:
        if name not in valid:
            raise _unknown_key(cls, str(name), valid, prefix)
    kwargs = {name: _coerce(value, hints[name], _join(prefix, name)) for name, value in data.items()}
    return cls(**kwargs)


def _unknown_key(cls, name: str, valid: list[str], prefix: str) -> SkipGPTError:
    close = [_join(prefix, c) for c in difflib.get_close_matches(name, valid, n=1)]
    if not close:  # a key put in the wrong section, e.g. top-level `seq_len` -> data.seq_len
        sections = {k: t for k, t in typing.get_type_hints(cls).items() if dataclasses.is_dataclass(t)}
        close = [_join(prefix, f"{k}.{name}") for k, t in sections.items()
                 if name in {f.name for f in dataclasses.fields(t)}]
    hint = f" (did you mean {close[0]}?)" if close else ""
    where = f"of {prefix}" if prefix else "at the top level"
    return SkipGPTError(f"unknown config key {_join(prefix, name)}{hint}: valid keys {where} are "
                        f"{', '.join(valid)}")

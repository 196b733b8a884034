"""A mapping read from YAML or JSON into a dataclass, its fields' type hints the schema: an
unknown key is refused with the closest valid one named (a misspelt key would otherwise be
ignored and the run fall back to a default), a value of the wrong type with its key named.

jsonargparse parses the same dataclasses, but it drops an unknown key inside a ``dict[str, X]``
without a word and answers a wrong type with a multi-line report of every union member; an
experiment config's mistakes are one line each."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def refuse_unknown_keys(keys: Iterable[object], valid: Iterable[str], where: str) -> None:
    """Refuse a key that is not ``valid``, naming it and the closest valid one."""
    valid = list(valid)
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
            raise ValueError(f"{where}: unknown key {key!r}; {hint}")


def read_mapping(cls: type[T], value: object, where: str, keys: tuple[str, ...] = ()) -> T:
    """``value`` (a mapping, or None for every default) as a ``cls``; ``where`` (a file) and
    ``keys`` (the path to ``value`` inside it) name the place of a mistake."""
    section = f"{where}: {'.'.join(keys)}" if keys else where
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"{section} must be a mapping, got {value!r}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    refuse_unknown_keys(value, fields, section)
    hints = typing.get_type_hints(cls)
    return cls(
        **{
            key: _typed(hints[key], item, where, (*keys, key), fields[key].metadata.get("help"))
            for key, item in value.items()
        }
    )


def _typed(hint: object, value: object, where: str, keys: tuple[str, ...], help: str | None) -> Any:
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return read_mapping(hint, value, where, keys)
    if origin in (typing.Union, types.UnionType) and type(None) in arguments:
        if value is None:
            return None
        [inner] = [argument for argument in arguments if argument is not type(None)]
        return _typed(inner, value, where, keys, help)
    if origin is dict and value is None:  # an empty YAML section: ``overrides:``
        return {}
    if origin is dict and arguments and isinstance(value, dict):
        return {k: _typed(arguments[1], v, where, (*keys, str(k)), help) for k, v in value.items()}
    if origin is list and isinstance(value, list):
        return [_typed(arguments[0], item, where, keys, help) for item in value]
    if _matches(hint, origin, value):
        return value
    expected = (
        f"one of {', '.join(map(str, arguments))}"
        if origin is Literal
        else f"a {getattr(origin or hint, '__name__', hint)}"
    )
    hint_text = f" ({help})" if help else ""
    raise ValueError(f"{where}: {'.'.join(keys)} must be {expected}{hint_text}, got {value!r}")


def _matches(hint: object, origin: object, value: object) -> bool:
    """Whether a plain value fits ``hint``: a number is a float, a bool is no int."""
    if hint is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)

"""The unknown key of a ``plankton fit`` config file, named in one line with the closest valid
key. jsonargparse refuses such a key with its whole usage message and a report of every type
the section could have, without the file's name nor a suggestion; this finds the key again in the
config files of the command line once jsonargparse has refused them."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from jsonargparse import ArgumentParser

from .config_files import load_mapping
from .typed_mapping import refuse_unknown_keys

# The keys of a ``class_path`` section beside the class's own settings (``init_args``).
SUBCLASS_KEYS = ("class_path", "init_args", "dict_kwargs")
CONFIG_OPTIONS = ("--config", "-c")


def refuse_unknown_config_keys(parser: ArgumentParser, args: list[str]) -> None:
    """Refuse the first key of a ``--config`` file in ``args`` that ``parser`` (a subcommand's)
    does not accept, naming the file, the section and the closest valid key."""
    # Each setting's dotted name; a class's settings come with a ``<name>.help`` option.
    dests = [action.dest.split(".") for action in parser._actions]
    dests = [dest for dest in dests if dest[-1] != "help"]
    for path in _config_files(args):
        _check_section(load_mapping(path), Path(path), dests, ())


def _config_files(args: list[str]) -> list[str]:
    files = []
    for index, arg in enumerate(args):
        option, equals, value = arg.partition("=")
        if option in CONFIG_OPTIONS:
            if equals:
                files.append(value)
            elif index + 1 < len(args):
                files.append(args[index + 1])
    return [file for file in files if Path(file).is_file()]


def _check_section(
    mapping: dict, file: Path, dests: list[list[str]], keys: tuple[str, ...]
) -> None:
    """Check ``mapping``, the section ``keys`` of ``file``, against the options ``dests``. A
    section without options under it (``model``, ``data.synthetic``) is one typed setting:
    only a ``class_path`` section is checked further, against that class's settings."""
    depth = len(keys)
    valid = sorted(
        {dest[depth] for dest in dests if len(dest) > depth and dest[:depth] == list(keys)}
    )
    if not valid:
        _check_subclass(mapping, file, keys)
        return
    section = f"{file}: {'.'.join(keys)}" if keys else str(file)
    refuse_unknown_keys(mapping, valid, section)
    for key, value in mapping.items():
        _check_value(value, file, dests, (*keys, key))


def _check_value(value: object, file: Path, dests: list[list[str]], keys: tuple[str, ...]) -> None:
    """A section's value: a mapping to check, or the path of a config file holding it
    (``trainer: trainer/default.yaml``, relative to the config)."""
    if isinstance(value, str) and value.endswith((".yaml", ".yml")):
        nested = file.parent / value
        if nested.is_file():
            _check_section(load_mapping(nested), nested, dests, keys)
    elif isinstance(value, dict):
        _check_section(value, file, dests, keys)


def _check_subclass(mapping: dict, file: Path, keys: tuple[str, ...]) -> None:
    """A ``class_path`` section: its keys, and its ``init_args`` against the class's settings.
    A class that cannot be imported, or whose settings ``_settings`` cannot tell, is left to
    jsonargparse."""
    class_path = mapping.get("class_path")
    if not isinstance(class_path, str):
        return
    section = f"{file}: {'.'.join(keys)}"
    refuse_unknown_keys(mapping, SUBCLASS_KEYS, section)
    module, _, name = class_path.rpartition(".")
    try:
        settings = _settings(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError, ValueError, TypeError):
        return
    init_args = mapping.get("init_args") or {}
    if settings is None or not isinstance(init_args, dict):
        return
    refuse_unknown_keys(init_args, settings, f"{section}.init_args")
    for key, value in init_args.items():
        if isinstance(value, dict):
            _check_subclass(value, file, (*keys, "init_args", key))


def _settings(cls: type) -> list[str] | None:
    """The parameters of ``cls``, with those of the base classes that its ``**kwargs`` reach
    (the suite's modules pass the data settings on); None when ``**kwargs`` reach no class that
    names its parameters."""
    names: list[str] = []
    for klass in cls.__mro__:
        parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]
        names += [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if all(p.kind is not p.VAR_KEYWORD for p in parameters):
            return names
    return None

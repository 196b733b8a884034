"""The one reader of the suite's YAML config files (fit, experiment and data configs): a mistake
is one line naming the file and its line, and what YAML allows but a user never means is refused
(a key given twice in one mapping, of which PyYAML silently keeps the last; a key that is no
string; an empty file where settings are expected).

``plankton fit`` reads its configs through jsonargparse; ``use_in_jsonargparse`` makes it check
every config file with the same rules before jsonargparse reads it as before."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jsonargparse
import yaml
from jsonargparse import _util as jsonargparse_util

STRING_TAG = "tag:yaml.org,2002:str"
MERGE_TAG = "tag:yaml.org,2002:merge"


class ConfigFileError(ValueError):
    """A mistake in a config file, in one line: ``<file>, line <n>: <what is wrong>``."""


class _Problem(Exception):
    """A mistake found in YAML text, before the file it came from is known."""

    def __init__(self, message: str, mark: yaml.Mark | None) -> None:
        super().__init__(message)
        self.message = message
        self.line = None if mark is None else mark.line + 1

    def in_file(self, file: str) -> ConfigFileError:
        where = file if self.line is None else f"{file}, line {self.line}"
        return ConfigFileError(f"{where}: {self.message}")


def load_yaml(path: str | Path) -> object:
    """The content of the YAML file ``path``, read as ``yaml.safe_load`` would, or a
    ``ConfigFileError`` naming the file and the line of its first mistake."""
    path = Path(path)
    text = path.read_text()
    try:
        _check(text)
    except _Problem as problem:
        raise problem.in_file(str(path)) from None
    return yaml.safe_load(text)


def load_mapping(path: str | Path) -> dict:
    """The content of ``path`` where it must be a mapping of settings; an empty file or any
    other document is refused, naming the file."""
    content = load_yaml(path)
    if not isinstance(content, dict):
        found = "the file is empty" if content is None else f"found {type(content).__name__}"
        raise ConfigFileError(f"{path}: expected a mapping of settings; {found}")
    return content


def use_in_jsonargparse() -> None:
    """Check every config file jsonargparse reads with the rules of ``load_yaml`` before its own
    YAML loader reads it. jsonargparse loads command-line values with the same function; those
    are left to its loader unchanged, so only files are held to these rules."""
    original = jsonargparse.get_loader("yaml")
    if getattr(original, "checks_config_files", False):
        return
    jsonargparse.set_loader("yaml", _checking_files(original), exceptions=(yaml.YAMLError,))


def _checking_files(load: Callable[[str], object]) -> Callable[[str], object]:
    def load_checked(text: str) -> object:
        try:
            empty = _check(text) is None
        except _Problem as problem:
            file = _file_being_read(text)
            if file is None:
                return load(text)
            raise problem.in_file(file) from None
        if empty and (file := _file_being_read(text)) is not None:
            raise ConfigFileError(f"{file}: expected a mapping of settings; the file is empty")
        return load(text)

    load_checked.checks_config_files = True
    return load_checked


def _file_being_read(text: str) -> str | None:
    """The config file whose whole content ``text`` is, or None (a value of the command line or
    of a setting inside a file). jsonargparse keeps the files it is reading on a stack."""
    stack = jsonargparse_util.config_load_stack.get()
    if not stack:
        return None
    real_path, given = stack[-1]
    try:
        if Path(real_path).read_text() != text:
            return None
    except OSError:
        return None
    # A file named inside another is given relative to that one, and read from its folder.
    return given if len(stack) == 1 else real_path


def _check(text: str) -> yaml.Node | None:
    """The node tree of ``text`` (None for an empty document), or the ``_Problem`` of its first
    mistake: a YAML syntax error, a tab where YAML wants spaces, a key that is no string or a
    key given twice in one mapping."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        if mark is not None and _is_tab(text, mark):
            raise _Problem("found a tab character; indent with spaces", mark) from None
        raise _Problem(error.problem or error.context or "not valid YAML", mark) from None
    except yaml.YAMLError as error:
        raise _Problem(str(error).splitlines()[0], None) from None
    if node is not None:
        _check_keys(node)
    return node


def _is_tab(text: str, mark: yaml.Mark) -> bool:
    """Whether the error at ``mark`` is a tab: on it, or just before it in the indentation."""
    line = text.splitlines()[mark.line] if mark.line < len(text.splitlines()) else ""
    return "\t" in line[: mark.column + 1]


def _check_keys(node: yaml.Node) -> None:
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_keys(item)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    first_lines: dict[str, int] = {}
    for key, value in node.value:
        if key.tag == MERGE_TAG:  # ``<<: *defaults``: YAML's way to reuse a mapping
            continue
        if key.tag != STRING_TAG or not isinstance(key, yaml.ScalarNode):
            raise _Problem(f"key {key.value!r} is not a string; quote it", key.start_mark)
        line = key.start_mark.line + 1
        if key.value in first_lines:
            raise _Problem(
                f"key {key.value!r} is given twice (first on line {first_lines[key.value]}); "
                "keep one",
                key.start_mark,
            )
        first_lines[key.value] = line
        _check_keys(value)

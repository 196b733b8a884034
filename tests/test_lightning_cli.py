"""``PlanktonCLI`` overrides two private ``LightningCLI`` methods. A Lightning release may rename
them, change their parameters or stop calling them, and the override would then be skipped or
broken without a word: a checkpoint read by Lightning's unpickler instead of ours, an empty run
folder left behind. pyproject.toml pins the minor version they were written against; these tests
name the method that changed when that pin moves."""

import inspect
import tomllib
from importlib.metadata import version

import pytest
from conftest import REPOSITORY
from lightning.pytorch.cli import LightningCLI
from packaging.requirements import Requirement

from workflows.lightning_cli import PlanktonCLI

OVERRIDDEN = ("_parse_ckpt_path", "_run_subcommand")


def test_the_installed_lightning_is_the_pinned_one():
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    pins = [Requirement(r) for r in project["dependencies"] if r.startswith("lightning")]
    assert len(pins) == 1 and pins[0].specifier, "pyproject.toml must pin lightning's version"
    installed = version("lightning")
    assert pins[0].specifier.contains(installed), (
        f"lightning {installed} is installed, outside pyproject.toml's pin {pins[0].specifier}: "
        f"check PlanktonCLI's overrides of {', '.join(OVERRIDDEN)} against it, then move the pin"
    )


@pytest.mark.parametrize("name", OVERRIDDEN)
def test_the_overridden_lightning_methods_keep_their_shape(name):
    parent = getattr(LightningCLI, name, None)
    assert parent is not None, f"LightningCLI.{name} is gone: PlanktonCLI.{name} is never called"
    expected = inspect.signature(getattr(PlanktonCLI, name), eval_str=True)
    actual = inspect.signature(parent, eval_str=True)
    assert actual == expected, (
        f"LightningCLI.{name} is now {name}{actual}; PlanktonCLI.{name} overrides {name}{expected}"
    )
    assert f"self.{name}(" in inspect.getsource(LightningCLI), (
        f"LightningCLI no longer calls self.{name}(): PlanktonCLI.{name} would be skipped"
    )


def test_the_private_names_the_config_checks_read_are_still_there():
    """``PlanktonCLI.parse_arguments`` finds the subcommand's parser in LightningCLI's
    ``_subcommand_parsers``, and ``config_files`` the file jsonargparse is reading on its
    ``config_load_stack``; without them a config file's mistake is no longer one line."""
    from jsonargparse import _util as jsonargparse_util

    assert "self._subcommand_parsers[" in inspect.getsource(LightningCLI)
    stack = getattr(jsonargparse_util, "config_load_stack", None)
    assert stack is not None and stack.get() == (), "jsonargparse's config_load_stack is gone"

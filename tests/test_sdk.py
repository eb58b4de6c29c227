"""flashar.sdk: the one module a plugin imports from."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import flashar.sdk as sdk


@pytest.mark.parametrize("name", sdk.__all__)
def test_every_name_is_its_home_modules_own_object(name):
    assert getattr(sdk, name) is getattr(importlib.import_module(sdk.HOMES[name]), name)


def test_the_names_type_checkers_see_are_the_names_it_offers():
    """The TYPE_CHECKING imports restate HOMES for editors and mypy; they must name the same things, from the
    same modules."""
    tree = ast.parse(Path(sdk.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    seen = {alias.name: node.module for node in block.body for alias in node.names}
    assert seen == sdk.HOMES


def test_registration_names_import_no_torch():
    """A plugin's package root imports its registration names from the facade while `flashar backends`
    lists plugins; that must not pull in torch (the heavy names load on first use)."""
    code = ("import sys\n"
            "from flashar.sdk import BackendSpec, Config, FlashARError, RuntimeConfig, hookimpl\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "from flashar.sdk import Backbone\n"
            "assert 'torch' in sys.modules\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_an_unknown_name_is_an_attribute_error_that_lists_the_offer():
    with pytest.raises(AttributeError, match="flashar.sdk has no 'Backbon'.*Backbone"):
        sdk.Backbon  # noqa: B018
    assert hasattr(sdk, "write_kv") and not hasattr(sdk, "nothing_here")
    assert set(sdk.__all__) <= set(dir(sdk))


def test_the_janus_plugin_imports_flashar_through_the_facade_alone():
    """The worked example of docs/writing-a-backend-plugin.md takes every flashar name from flashar.sdk."""
    source = Path(__file__).resolve().parents[1] / "plugins" / "flashar-janus" / "src" / "flashar_janus"
    modules = {node.module for path in source.glob("*.py") for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "flashar"}
    assert modules == {"flashar.sdk"}


def test_the_plugin_guide_lists_what_the_facade_offers():
    guide = (Path(__file__).resolve().parents[1] / "docs" / "writing-a-backend-plugin.md").read_text()
    paragraph = guide[guide.index("It offers the registration names"):].split("\n\n")[0]
    listed = set(re.findall(r"`(\w+)`", paragraph))
    assert listed == set(sdk.__all__)

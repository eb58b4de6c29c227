"""The plugin system: built-ins as plugins, third-party registration, duplicates, failures, entry points."""

from __future__ import annotations

import json
import sys
import textwrap
import warnings

import pytest
import torch
from click.testing import CliRunner

from flashar.cli import cli
from flashar.config import Config
from flashar.errors import MissingExtraError, PluginError
from flashar.hookspecs import hookimpl
from flashar.plugins import BackendSpec, Registry, build_manager


class _Opts(Config):
    pass


def spec(id, requires=(), extra=None):
    return BackendSpec(id=id, description=f"{id} test backend", options=_Opts, load=lambda o, r: None,
                       requires=requires, extra=extra)


def registry_with(*plugins):
    pm, infos = build_manager(load_entry_points=False)
    for i, plugin in enumerate(plugins):
        pm.register(plugin, name=f"test-plugin-{i}")
    return Registry.from_manager(pm, infos)


def test_builtins_register_through_the_same_hooks(registry):
    assert registry.owners[("backend", "llamagen")] == "flashar.backends.llamagen"
    assert registry.owners[("backend", "emu35")] == "flashar.backends.emu35"
    assert registry.owners[("method", "raster")] == "flashar.methods.raster"


def test_a_plugin_object_adds_a_backend():
    class Plugin:
        @hookimpl
        def flashar_register_backends(self, register):
            register(spec("toy"))

    reg = registry_with(Plugin())
    assert reg.backend("toy").description == "toy test backend"
    assert reg.owners[("backend", "toy")] == "test-plugin-0"


def test_duplicate_ids_are_rejected_naming_both_plugins():
    class Plugin:
        @hookimpl
        def flashar_register_backends(self, register):
            register(spec("llamagen"))

    with pytest.raises(PluginError,
        match="'llamagen' is registered twice, by plugin 'flashar.backends.llamagen' and by plugin 'test-plugin-0'"):
        registry_with(Plugin())


def test_a_plugin_whose_hook_raises_is_reported_not_fatal():
    class Broken:
        @hookimpl
        def flashar_register_methods(self, register):
            raise RuntimeError("boom")

    reg = registry_with(Broken())
    assert "raster" in reg.methods
    assert any(p.name == "test-plugin-0" and "boom" in p.error for p in reg.plugins)


def test_missing_extra_is_listed_with_the_pip_command():
    class Plugin:
        @hookimpl
        def flashar_register_backends(self, register):
            register(spec("needs-extra", requires=("surely_not_installed_pkg",), extra="fancy"))

    reg = registry_with(Plugin())
    result = CliRunner().invoke(cli, ["backends", "--json"], obj=reg)
    row = next(r for r in json.loads(result.output) if r["id"] == "needs-extra")
    assert row["available"] is False and row["install"] == "pip install 'flashar[fancy]'"
    with pytest.raises(MissingExtraError, match=r"run: pip install 'flashar\[fancy\]'"):
        reg.backend("needs-extra").check_available()


@pytest.fixture
def entry_point_plugin(tmp_path, monkeypatch):
    """A real installed distribution (dist-info with an entry point in group 'flashar') on sys.path."""
    (tmp_path / "flashar_toyplugin.py").write_text(
        textwrap.dedent("""
        from flashar.hookspecs import hookimpl
        from flashar.plugins import BackendSpec
        from flashar.config import Config

        class Options(Config):
            pass

        @hookimpl
        def flashar_register_backends(register):
            register(BackendSpec(id="toy-ep", description="from an entry point", options=Options,
                                 load=lambda o, r: None))
    """)
    )
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('this plugin is broken')\n")
    dist = tmp_path / "flashar_toyplugin-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: flashar-toyplugin\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[flashar]\ntoy = flashar_toyplugin\nbroken = broken_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("flashar_toyplugin", None)


def test_entry_point_plugins_load_and_failures_are_reported(entry_point_plugin):
    pm, infos = build_manager()
    reg = Registry.from_manager(pm, infos)
    assert reg.backend("toy-ep").description == "from an entry point"
    toy = next(i for i in infos if i.name == "toy")
    assert (toy.package, toy.version, toy.error) == ("flashar-toyplugin", "1.2.3", None)
    broken = next(i for i in infos if i.name == "broken")
    assert "this plugin is broken" in broken.error
    result = CliRunner().invoke(cli, ["plugins", "--json"], obj=reg)
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["toy"]["registers"] == ["backend:toy-ep"] and rows["broken"]["error"]


def test_environment_variable_limits_entry_points(entry_point_plugin, monkeypatch):
    monkeypatch.setenv("FLASHAR_LOAD_PLUGINS", "toy")
    _, infos = build_manager()
    assert {i.name for i in infos if not i.builtin} == {"toy"}
    monkeypatch.setenv("FLASHAR_LOAD_PLUGINS", "")
    _, infos = build_manager()
    assert all(i.builtin for i in infos)


def test_plugin_commands_join_the_cli():
    import click

    class Plugin:
        @hookimpl
        def flashar_register_commands(self, cli):
            @cli.command(name="hello-toy")
            def hello():
                click.echo("hi from a plugin")

    result = CliRunner().invoke(cli, ["hello-toy"], obj=registry_with(Plugin()))
    assert result.exit_code == 0 and "hi from a plugin" in result.output
    without = CliRunner().invoke(cli, ["--help"], obj=registry_with())  # another registry: the command is gone
    assert without.exit_code == 0 and "hello-toy" not in without.output


def test_a_flag_two_backends_declare_is_resolved_per_selected_backend(registry):
    """Emu3.5 declares --model-path; a plugin backend declaring it with another meaning shows and parses its own."""
    from pydantic import Field

    class ToyOptions(Config):
        model_path: int = Field(3, description="Toy's own model path: a number of layers.")

    loaded = {}

    class Plugin:
        @hookimpl
        def flashar_register_backends(self, register):
            register(
                BackendSpec(
                    id="toy", description="toy", options=ToyOptions, load=lambda o, r: loaded.setdefault("o", o))
            )

    reg = registry_with(Plugin())
    own = CliRunner().invoke(cli, ["generate", "--backend", "toy", "--help"], obj=reg)
    assert "Toy's own model path" in own.output and "Emu3.5(-Image) folder" not in own.output
    emu = CliRunner().invoke(cli, ["generate", "-b", "emu35", "--help"], obj=reg)
    assert "Emu3.5(-Image) folder" in emu.output and "Toy's own model path" not in emu.output
    wrong = CliRunner().invoke(cli, ["generate", "-b", "toy", "--model-path", "x", "--classes", "1"], obj=reg)
    assert wrong.exit_code == 2 and "'x' is not a valid integer" in wrong.output  # toy's type, not emu35's Path


def _method_with(option_type, id="toy-method"):
    from pydantic import Field

    from flashar.methods.raster import Raster

    class ToyOptions(Config):
        draft_length: option_type = Field(None, description="toy")

    return type("ToyMethod", (Raster,), {"id": id, "Options": ToyOptions})


def test_a_method_flag_declared_with_another_type_fails_registration_naming_both():
    """SJD's --draft-length is an int; a method plugin declaring it as a path would read SJD's value under
    `compare --methods sjd,toy-method`: registration refuses it in one line naming both owners."""
    from pathlib import Path

    class Plugin:
        @hookimpl
        def flashar_register_methods(self, register):
            register(_method_with(Path | None))

    with pytest.raises(PluginError, match=r"option --draft-length is declared as int by method '(sjd|gsd)' \(plugin "
                       r"'flashar.methods.(sjd|gsd)'\) and as Path by method 'toy-method' \(plugin 'test-plugin-0'\)"):
        registry_with(Plugin())


def test_a_method_flag_declared_with_the_same_type_is_shared():
    class Plugin:
        @hookimpl
        def flashar_register_methods(self, register):
            register(_method_with(int | None))

    assert "toy-method" in registry_with(Plugin()).methods


def test_a_backend_flag_that_clashes_with_a_method_flag_fails_registration():
    from pydantic import Field

    class ClashOptions(Config):
        buckets: str = Field("x", description="not FlashAR's --buckets")

    class Plugin:
        @hookimpl
        def flashar_register_backends(self, register):
            register(BackendSpec(id="clash", description="clash", options=ClashOptions, load=lambda o, r: None))

    with pytest.raises(
        PluginError, match=r"--buckets is declared as int by method 'flashar' .* and as str by backend 'clash'"):
        registry_with(Plugin())


def test_a_backend_decode_without_conditions_still_writes_images_with_a_deprecation(tmp_path):
    """A plugin written when ``Backbone.decode`` took the codes alone keeps working (one-line warning);
    the current signature receives the conditions."""
    from helpers import random_gpt

    from flashar.api import save_images

    seen = []

    class Old(type(random_gpt())):
        def decode(self, codes):
            return torch.zeros(len(codes), 3, 8, 8)

    class New(type(random_gpt())):
        def decode(self, codes, conditions=None):
            seen.append(list(conditions))
            return torch.zeros(len(codes), 3, 8, 8)

    codes = torch.zeros(2, 2, 2, dtype=torch.long)
    old = random_gpt()
    old.__class__ = Old
    with pytest.warns(DeprecationWarning, match=r"Old.decode\(codes\) should also take the conditions"):
        assert len(save_images(old, codes, tmp_path / "old", [3, 4])) == 2
    new = random_gpt()
    new.__class__ = New
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(save_images(new, codes, tmp_path / "new", [3, 4])) == 2
    assert seen == [[3, 4]]

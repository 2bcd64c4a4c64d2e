"""Tests for plugin loading (zoo/plugins.py): every source, import-once, and the error messages.

Test plugins record their import in a throwaway ``plugin_probe_log`` module
instead of registering models, so the process's catalogue is left as it
was; the one registering plugin is the synthetic world's (the ``world``
fixture). ``zoo.contrib`` is pointed at a ``tmp_path`` folder and entry
points come from a ``*.dist-info`` folder on a temporary ``sys.path`` entry,
so nothing is written into the project or installed.
"""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import zoo
import zoo.contrib
from harness import data as datasets
from zoo.plugins import ENTRY_POINT_GROUP, with_absolute_paths

PROBE_PREFIXES = ("plugin_probe_", "zoo.contrib.", "wasserstein_bench_plugin_")


@pytest.fixture
def log(monkeypatch):
    """The list every probe plugin appends its ``__name__`` to when it is imported."""
    module = types.ModuleType("plugin_probe_log")
    module.imports = []
    monkeypatch.setitem(sys.modules, "plugin_probe_log", module)
    return module.imports


@pytest.fixture(autouse=True)
def forget_probe_modules():
    """Drop the probe plugins from ``sys.modules`` after each test, so every test imports its own afresh."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(PROBE_PREFIXES):
            del sys.modules[name]


@pytest.fixture
def contrib(monkeypatch, tmp_path):
    """An empty stand-in for the ``zoo/contrib/`` folder."""
    folder = tmp_path / "contrib"
    folder.mkdir()
    monkeypatch.setattr(zoo.contrib, "__path__", [str(folder)])
    return folder


@pytest.fixture
def no_entry_points(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **selection: [])


def _probe(folder: Path, module: str, body: str = "") -> Path:
    """Write ``folder/module.py``: it logs its import, then runs ``body``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module}.py"
    path.write_text("import plugin_probe_log\n\nplugin_probe_log.imports.append(__name__)\n" + textwrap.dedent(body))
    return path


def _installed_distribution(site: Path, entry_points: dict[str, str]) -> None:
    """A ``*.dist-info`` folder under ``site`` declaring ``entry_points`` in the plugin group."""
    info = site / "plugin_probe_dist-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-probe-dist\nVersion: 1.0\n")
    lines = [f"[{ENTRY_POINT_GROUP}]", *(f"{name} = {value}" for name, value in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------
# Sources and their order
# --------------------------------------------------------------------------


def test_module_name_plugin_is_imported_once(tmp_path, monkeypatch, log, contrib, no_entry_points):
    _probe(tmp_path / "site", "plugin_probe_module")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert zoo.import_plugins(["plugin_probe_module"]) == ["plugin_probe_module"]
    assert zoo.import_plugins(["plugin_probe_module"]) == ["plugin_probe_module"]
    assert log == ["plugin_probe_module"]


def test_file_plugin_is_imported_once_by_its_resolved_path(tmp_path, monkeypatch, log, contrib, no_entry_points):
    path = _probe(tmp_path / "plugins", "plugin_probe_file")
    monkeypatch.chdir(tmp_path)
    spellings = ["plugins/plugin_probe_file.py", str(path), "plugins/../plugins/plugin_probe_file.py"]
    assert zoo.import_plugins(spellings) == [str(path.resolve())] * 3
    assert len(log) == 1 and log[0].startswith("wasserstein_bench_plugin_plugin_probe_file_")
    assert sys.modules[log[0]].__file__ == str(path.resolve())


def test_files_of_the_same_name_in_different_folders_are_two_plugins(tmp_path, log, contrib, no_entry_points):
    first, second = _probe(tmp_path / "a", "plugin_probe_twin"), _probe(tmp_path / "b", "plugin_probe_twin")
    assert zoo.import_plugins([str(first), str(second)]) == [str(first), str(second)]
    assert len(set(log)) == 2


def test_contrib_modules_are_imported_in_name_order(log, contrib, no_entry_points):
    _probe(contrib, "plugin_probe_second")
    _probe(contrib, "plugin_probe_first")
    (contrib / "plugin_probe_notes.txt").write_text("not a module")
    expected = ["zoo.contrib.plugin_probe_first", "zoo.contrib.plugin_probe_second"]
    assert zoo.import_plugins() == expected
    assert zoo.import_plugins() == expected
    assert log == expected


def test_installed_entry_points_are_loaded(tmp_path, monkeypatch, log, contrib):
    site = tmp_path / "site"
    _probe(site, "plugin_probe_entry")
    _installed_distribution(site, {"probe_models": "plugin_probe_entry"})
    monkeypatch.syspath_prepend(str(site))
    assert "probe_models" in zoo.import_plugins()
    assert "probe_models" in zoo.import_plugins()
    assert log == ["plugin_probe_entry"]


def test_sources_are_imported_contrib_then_entry_points_then_the_list(tmp_path, monkeypatch, log, contrib):
    site = tmp_path / "site"
    _probe(contrib, "plugin_probe_contrib")
    _probe(site, "plugin_probe_entry")
    _installed_distribution(site, {"probe_models": "plugin_probe_entry"})
    _probe(site, "plugin_probe_listed")
    listed_file = _probe(tmp_path / "plugins", "plugin_probe_listed_file")
    monkeypatch.syspath_prepend(str(site))
    names = zoo.import_plugins([str(listed_file), "plugin_probe_listed"])
    assert names == ["zoo.contrib.plugin_probe_contrib", "probe_models", str(listed_file), "plugin_probe_listed"]
    assert log[:2] == ["zoo.contrib.plugin_probe_contrib", "plugin_probe_entry"]
    assert log[2].startswith("wasserstein_bench_plugin_plugin_probe_listed_file_") and log[3] == "plugin_probe_listed"


def test_with_absolute_paths_keeps_module_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert with_absolute_paths(["my_models", "plugins/my_models.py", "pkg.models"]) == [
        "my_models",
        str(tmp_path / "plugins" / "my_models.py"),
        "pkg.models",
    ]


def test_the_synthetic_plugin_registers_a_loadable_model(world):
    """The world's plugin registered its model with a key and a prefix: the checkpoint loads and predicts the labels."""
    assert zoo.import_plugins([str(world.plugin)]) == [str(world.plugin.resolve())]
    spec = zoo.model_spec(world.model)
    assert (spec.state_dict_key, spec.strip_prefix, spec.weights.url) == ("net", "module.", None)
    images, labels = datasets.test_subset("mnist", str(world.data_root), world.test_examples)
    with torch.no_grad():
        predictions = zoo.model(world.model, weights_dir=world.weights_dir)(images).argmax(1)
    assert torch.equal(predictions, labels)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_missing_module_names_the_plugin_and_the_reason(contrib, no_entry_points):
    with pytest.raises(zoo.PluginError) as error:
        zoo.import_plugins(["plugin_probe_missing"])
    assert str(error.value) == (
        "plugin 'plugin_probe_missing' (a module name) could not be imported: No module named 'plugin_probe_missing'"
    )
    assert isinstance(error.value, ValueError)


def test_module_that_raises(tmp_path, monkeypatch, log, contrib, no_entry_points):
    _probe(tmp_path / "site", "plugin_probe_raises", "raise RuntimeError('no GPU for this model')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(
        zoo.PluginError,
        match=r"^plugin 'plugin_probe_raises' \(a module name\) could not be imported: RuntimeError: no GPU for this model$",
    ):
        zoo.import_plugins(["plugin_probe_raises"])
    assert "plugin_probe_raises" not in sys.modules


def test_missing_file(tmp_path, contrib, no_entry_points):
    missing = tmp_path / "plugins" / "absent.py"
    with pytest.raises(zoo.PluginError) as error:
        zoo.import_plugins([str(missing)])
    assert str(error.value) == f"plugin {str(missing)!r} (a file) could not be imported: the file {missing} does not exist"


def test_file_that_is_not_python(tmp_path, contrib, no_entry_points):
    notes = tmp_path / "plugins" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("models")
    with pytest.raises(zoo.PluginError, match=r"\(a file\) could not be imported: .*notes\.txt is not a \.py file"):
        zoo.import_plugins([str(notes)])


def test_file_that_fails_leaves_nothing_behind_and_imports_once_fixed(tmp_path, log, contrib, no_entry_points):
    path = _probe(tmp_path, "plugin_probe_broken", "def broken(:\n")
    expected = r"^plugin '.*plugin_probe_broken\.py' \(a file\) could not be imported: SyntaxError"
    with pytest.raises(zoo.PluginError, match=expected):
        zoo.import_plugins([str(path)])
    assert not [name for name in sys.modules if name.startswith("wasserstein_bench_plugin_plugin_probe_broken")]
    _probe(tmp_path, "plugin_probe_broken")
    assert zoo.import_plugins([str(path)]) == [str(path)]
    assert len(log) == 1  # the file with a syntax error ran nothing; the fixed one ran once


def test_contrib_module_that_fails(log, contrib, no_entry_points):
    _probe(contrib, "plugin_probe_bad_contrib", "import plugin_probe_not_installed\n")
    with pytest.raises(zoo.PluginError) as error:
        zoo.import_plugins()
    assert str(error.value) == (
        f"contrib module 'zoo.contrib.plugin_probe_bad_contrib' (in {contrib}) could not be imported: "
        "No module named 'plugin_probe_not_installed'"
    )


def test_entry_point_that_fails(monkeypatch, contrib):
    broken = importlib.metadata.EntryPoint(name="their_models", value="plugin_probe_uninstalled", group=ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **selection: [broken])
    with pytest.raises(zoo.PluginError) as error:
        zoo.import_plugins()
    assert str(error.value) == (
        f"plugin 'their_models' (an entry point of group '{ENTRY_POINT_GROUP}', value 'plugin_probe_uninstalled') "
        "could not be imported: No module named 'plugin_probe_uninstalled'"
    )

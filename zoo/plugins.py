"""Plugins: modules that register models and solvers before a run uses them.

A plugin is an ordinary Python module whose import calls
:func:`~zoo.register_model` or :func:`~zoo.register_solver`. They come from
three places, imported in this order by :func:`import_plugins`:

1. every module in the ``zoo/contrib/`` folder (drop a file there);
2. every installed entry point of the group ``wasserstein_bench.plugins``
   (a package declares ``[project.entry-points."wasserstein_bench.plugins"]``
   ``my_models = "my_package.models"``);
3. the ``plugins`` list of the run: dotted module names, or paths to
   ``.py`` files.

Each plugin is imported once per process, however often
:func:`import_plugins` is called, so nothing registers twice.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import re
import sys
from pathlib import Path
from typing import Sequence

from . import contrib

ENTRY_POINT_GROUP = "wasserstein_bench.plugins"
"""The entry point group installed packages declare their plugins under."""

_FILE_MODULE_PREFIX = "wasserstein_bench_plugin_"


class PluginError(ValueError):
    """A plugin could not be imported; the message names it, says where it came from, and why."""


def import_plugins(plugins: Sequence[str] = ()) -> list[str]:
    """Import the contrib modules, the installed entry points, then ``plugins``.

    Parameters
    ----------
    plugins : sequence of str
        Each a dotted module name importable from ``sys.path``
        (``"my_models"``) or the path of a ``.py`` file
        (``"plugins/my_models.py"``, relative to the working directory). A
        file is imported under a module name derived from its resolved path,
        so the same file given twice, or by another relative path, is one
        plugin.

    Returns
    -------
    list of str
        The plugins in effect, in import order: contrib and module names as
        dotted names, entry points by their name, files by their resolved
        path. Plugins imported by an earlier call are listed too, without
        being imported again.

    Raises
    ------
    PluginError
        A plugin failed to import; the message names it, says whether it was
        a contrib module, an entry point, a module name or a file, and
        includes the underlying error.
    """
    names = []
    for module_info in sorted(pkgutil.iter_modules(contrib.__path__), key=lambda info: info.name):
        module_name = f"{contrib.__name__}.{module_info.name}"
        _import_module(module_name, f"contrib module {module_name!r} (in {module_info.module_finder.path})")
        names.append(module_name)
    for entry_point in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda entry: entry.name):
        _load_entry_point(entry_point)
        names.append(entry_point.name)
    for plugin in plugins:
        if _names_a_file(plugin):
            names.append(_import_file(plugin))
        else:
            _import_module(plugin, f"plugin {plugin!r} (a module name)")
            names.append(plugin)
    return names


def with_absolute_paths(plugins: Sequence[str]) -> list[str]:
    """``plugins`` with every file path made absolute, so the list means the same from any working directory.

    Module names are kept as they are. Used to hand a run's plugins to
    workers that may start in another folder.
    """
    return [str(Path(plugin).expanduser().resolve()) if _names_a_file(plugin) else plugin for plugin in plugins]


def _names_a_file(plugin: str) -> bool:
    return plugin.endswith(".py") or os.sep in plugin or (os.altsep is not None and os.altsep in plugin)


def _import_module(module_name: str, described: str) -> None:
    if module_name in sys.modules:
        return
    try:
        importlib.import_module(module_name)
    except Exception as error:
        raise PluginError(f"{described} could not be imported: {_reason(error)}") from error


def _load_entry_point(entry_point: importlib.metadata.EntryPoint) -> None:
    # Loading imports the entry point's module, which sys.modules keeps: a
    # second load does not run its registrations again.
    try:
        entry_point.load()
    except Exception as error:
        raise PluginError(
            f"plugin {entry_point.name!r} (an entry point of group {ENTRY_POINT_GROUP!r}, "
            f"value {entry_point.value!r}) could not be imported: {_reason(error)}"
        ) from error


def _import_file(plugin: str) -> str:
    path = Path(plugin).expanduser().resolve()
    described = f"plugin {plugin!r} (a file)"
    if not path.is_file():
        raise PluginError(f"{described} could not be imported: the file {path} does not exist")
    if path.suffix != ".py":
        raise PluginError(f"{described} could not be imported: {path} is not a .py file")
    module_name = _module_name_of_file(path)
    if module_name in sys.modules:
        return str(path)
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    # Registered before it runs, as the import system does, so that the
    # module can be found by name (pickling, dataclasses) while it executes.
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise PluginError(f"{described} could not be imported: {_reason(error)}") from error
    return str(path)


def _module_name_of_file(path: str | os.PathLike) -> str:
    """The module name a plugin file is imported under: its stem and a hash of its resolved path.

    Stable across processes, so a driver and its workers agree on it, and
    distinct for two files of the same name in different folders.
    """
    resolved = Path(path).expanduser().resolve()
    stem = re.sub(r"\W", "_", resolved.stem)
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    return f"{_FILE_MODULE_PREFIX}{stem}_{digest}"


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if not isinstance(error, ImportError) else str(error)

"""Grid files on a search path: the built-in grids, and those in configuration folders of the user's own.

A grid file is ``grid/NAME.yaml`` in a configuration folder: the package's
own (``harness/conf``, shipped with it) or one added to Hydra's search path
(``--config-dir DIR``). A grid's ``include: [NAME, ...]`` is looked up along
the same search path, so a grid of the user's may include a built-in grid or
another of the user's. A folder earlier on the path wins, as in Hydra.

omegaconf is imported only to read a file, so that the rest of the run's
machinery imports where Hydra is not installed.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["BUILT_IN_CONFIG", "CONFIG_PACKAGE", "GRID_KEYS", "GridFileError", "GridFiles", "grid_blocks"]

CONFIG_PACKAGE = "harness.conf"
"""The package whose resources are the built-in configuration."""

BUILT_IN_CONFIG = importlib.resources.files(CONFIG_PACKAGE)
"""The configuration folder shipped with the package: ``config.yaml`` and ``grid/*.yaml``."""

GRID_KEYS = ("name", "description", "blocks", "include", "train", "skip_missing_weights")
"""The keys a grid may have."""


class GridFileError(ValueError):
    """A grid that names an unknown key or includes a grid that is nowhere on the search path."""


@dataclass(frozen=True)
class GridFiles:
    """The grid files of a search path of configuration folders.

    Attributes
    ----------
    config_folders : sequence of Traversable
        Configuration folders (a ``pathlib.Path`` or a package's resources),
        first found first; each may hold a ``grid/`` folder.
    """

    config_folders: Sequence[Traversable] = (BUILT_IN_CONFIG,)

    def _grid_folders(self) -> list[Traversable]:
        return [folder / "grid" for folder in self.config_folders if (folder / "grid").is_dir()]

    def names(self) -> list[str]:
        """The names of every grid on the search path, sorted."""
        return sorted({
            entry.name.removesuffix(".yaml")
            for folder in self._grid_folders() for entry in folder.iterdir() if entry.name.endswith(".yaml") and entry.is_file()
        })

    def load(self, name: str) -> dict:
        """The grid ``name`` as a plain mapping, from the first folder that has it.

        Raises
        ------
        GridFileError
            No folder of the search path has ``grid/NAME.yaml``.
        """
        for folder in self._grid_folders():
            path = folder / f"{name}.yaml"
            if path.is_file():
                from omegaconf import OmegaConf

                return OmegaConf.to_container(OmegaConf.create(path.read_text()), resolve=True)
        raise GridFileError(f"grid {name!r} does not exist; grids: {', '.join(self.names())}")


def grid_blocks(grid: Mapping[str, Any], grid_files: GridFiles = GridFiles(), _seen: tuple[str, ...] = ()) -> list[dict]:
    """The blocks of a grid, those of the grids it includes first (each grid once).

    Raises
    ------
    GridFileError
        The grid, or one it includes, has an unknown key, includes a grid
        that does not exist, or has no blocks and trains nothing.
    """
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise GridFileError(f"grid {grid.get('name')!r}: unknown key(s) {unknown}; allowed: {', '.join(GRID_KEYS)}")
    blocks: list[dict] = []
    for name in grid.get("include") or []:
        if name in _seen:
            continue
        try:
            included = grid_files.load(name)
        except GridFileError:
            raise GridFileError(
                f"grid {grid.get('name')!r} includes {name!r}, which does not exist; grids: {', '.join(grid_files.names())}"
            ) from None
        blocks += grid_blocks(included, grid_files, _seen + (name,))
        _seen += (name,)
    blocks += [dict(block) for block in grid.get("blocks") or []]
    if not blocks and not grid.get("train"):
        raise GridFileError(f"grid {grid.get('name')!r} has no blocks, includes none and trains nothing")
    return blocks

"""Benchmark grids: blocks of axes expanded into cells, cells split into shards.

A grid file (``harness/conf/grid/<name>.yaml``, or one in a ``--config-dir``) holds ``blocks``; each block maps
setting names to a value or to a list of values (an axis). A block expands
into the product of its axes; a grid is the union of its blocks and of the
blocks of the grids it ``include``s.

What a block may set depends on its kind of cell (:mod:`harness.run.cells`):
a block that sets ``suite`` runs an evaluation suite
(:class:`~harness.run.kinds.SuiteCell`), one that sets ``certifier``
certifies (:class:`~harness.run.kinds.CertifyCell`), and one that sets
neither attacks (:class:`~harness.run.kinds.AttackCell`). Each kind's block
dataclass lists its settings, their types, defaults and ranges. A name no
cell of a block uses (a hyperparameter none of its solvers declares, a
kernel size for an l_p ball) is refused with the allowed list rather than
dropped.

Everything is validated before any work is scheduled: every problem in the
grid is collected and reported in one :class:`GridError` that lists the
allowed values.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Mapping

from .cells import Cell, CellKinds, cell_kinds_with

__all__ = ["GridError", "expand_blocks"]


class GridError(ValueError):
    """A grid that cannot run; the message lists every problem found."""


def _as_axis(value) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _foreign_problem(kind: type[Cell], kinds: CellKinds, block: Mapping[str, Any]) -> str | None:
    """The settings of other kinds that ``block`` (of ``kind``) sets, in one problem; None if there are none."""
    own = set(kind.block_settings()) | kind.extra_settings()
    foreign = set(block) - own
    if not foreign:
        return None
    (default,) = [other for other in kinds if other.marker is None]
    # Settings the attack fills by default come last: the ones a user typed on purpose read first.
    defaulted = set(default.defaults())
    names = sorted(foreign, key=lambda name: (name in defaulted, name))
    if kind.marker is not None:
        return kind.foreign_settings_problem(names, block)
    for other in kinds:
        theirs = [name for name in names if name in set(other.block_settings()) | other.extra_settings()]
        if other is not kind and theirs:
            return other.missing_marker_problem(theirs)
    return None


def expand_blocks(
    blocks: Iterable[Mapping[str, Any]], overrides: Mapping[str, Any] | None = None, extra_kinds: tuple[type[Cell], ...] = (),
) -> list[Cell]:
    """Expand blocks into their cells, in order, without duplicates.

    Parameters
    ----------
    blocks : iterable of mappings
        Setting name to a value or a list of values (see the block dataclass
        of each kind of cell, and the hyperparameters an attack block's
        solvers declare).
    overrides : mapping, optional
        Settings that replace the blocks' own everywhere (e.g. ``n_examples``
        or ``seed`` typed on the command line); None values are ignored.
    extra_kinds : tuple of Cell subclasses
        Kinds of cells beside the built-in and registered ones
        (:func:`~harness.run.cells.register_cell_kind`).

    Raises
    ------
    GridError
        Listing every problem of every block: unknown settings (or settings
        no cell of the block uses), empty axes, unknown model, solver or
        protocol names, impossible values.
    """
    kinds = cell_kinds_with(*extra_kinds)
    problems: list[str] = []
    cells: dict[str, Cell] = {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    known = kinds.known_settings() | {name for kind in kinds for name in kind.extra_settings()}
    for number, block in enumerate(blocks, start=1):
        where = f"block {number}"
        kind, problem = kinds.of_block(block)
        if problem is not None:
            problems.append(f"{where}: {problem}")
            continue
        unknown = sorted(set(block) - known)
        if unknown:
            problems.append(f"{where}: unknown setting(s) {', '.join(map(repr, unknown))}; allowed: {kind.allowed_settings(block)}")
            continue
        foreign = _foreign_problem(kind, kinds, block)
        if foreign is not None:
            problems.append(f"{where}: {foreign}")
            continue
        # A setting of unlisted_axes is one value even when it is a list (a certify block's radii).
        axes = {name: [value] if name in kind.unlisted_axes else _as_axis(value) for name, value in {**block, **overrides}.items()}
        empty = [name for name, values in axes.items() if not values]
        if empty:
            problems.append(f"{where}: empty axis {', '.join(map(repr, empty))}: give at least one value")
            continue
        names = list(axes)
        used: set[str] = set()
        problems_before = len(problems)
        for values in itertools.product(*(axes[name] for name in names)):
            point = dict(zip(names, values))
            # None means unset: the kind's default (or a protocol's value) applies, and the name counts as used.
            unset = {name for name, value in point.items() if value is None}
            cell, used_here = kind.from_settings(
                {**kind.defaults(), **{name: value for name, value in point.items() if name not in unset}}, problems, where,
            )
            used |= used_here | unset
            if cell is not None:
                cells.setdefault(cell.cell_id, cell)
        unused = sorted(kind.conditional_settings(block) - used)
        if unused and len(problems) == problems_before:
            problems.append(
                f"{where}: {', '.join(map(repr, unused))} is used by none of the block's cells; allowed: {kind.allowed_settings(block)}"
            )
    if problems:
        unique = list(dict.fromkeys(problems))
        raise GridError(f"the grid cannot run; {len(unique)} problem(s):\n  " + "\n  ".join(unique))
    return list(cells.values())

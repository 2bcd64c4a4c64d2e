"""Grid cells as types: what every kind of cell shares, and the table of kinds.

A cell is one point of a grid: a model, a data set, a ball, examples and a
seed, plus what its kind does with them (attack with one
:class:`~harness.attack.spec.AttackSpec`, run an evaluation suite, certify).
Each kind is a subclass of :class:`Cell` that owns

* its block: :attr:`Cell.block`, a dataclass whose fields are the settings
  a grid block of this kind may set, their types, defaults and ranges
  (:func:`harness.run.fields.setting`, checked by :func:`check_setting`),
  and :meth:`Cell.from_settings`, which turns one expanded
  point of a block into a cell;
* its validation before any work (:meth:`Cell.problems_before_run`);
* its shard run (:meth:`Cell.run_shard`) and the store table it writes
  (:attr:`Cell.table`);
* its summary (:meth:`Cell.outcome`), from which the worker writes the
  cell's row of the ``cells`` table.

A block says which kind it is by setting the kind's :attr:`Cell.marker`
(``suite``, ``certifier``); a block that sets no marker attacks. A new kind
is a subclass registered with :func:`register_cell_kind`; nothing else
changes.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import zoo

from ..attack.ball import Ball
from ..vocabulary import BallKind
from .fields import check_field, setting
from .store import CELLS_SCHEMA, EXAMPLES_SCHEMA, Table

if TYPE_CHECKING:
    from .runner import ShardProgress, ShardRunner

__all__ = [
    "SHARED_CONFIG_COLUMNS", "BallBlock", "Cell", "CellKinds", "CellOutcome", "Shard", "ball_of", "cell_kinds_with", "check_cell_basics",
    "check_setting", "config_digest", "register_cell_kind", "unregister_cell_kind", "wasserstein_only",
]


SHARED_CONFIG_COLUMNS = tuple(
    name for name in EXAMPLES_SCHEMA.names
    if name in CELLS_SCHEMA.names and name not in ("schema_version", "cell_id", "gradient_mode", "failed_model_checks")
)
"""The configuration columns that the ``examples`` and ``cells`` tables share (:meth:`Cell.columns` fills them)."""


def _value_type(annotation: Any) -> Any:
    """The type a setting's values have (``int | None`` -> ``int``)."""
    members = [arg for arg in typing.get_args(annotation) if arg is not type(None)] if typing.get_args(annotation) else [annotation]
    return members[0] if len(members) == 1 else None


def check_setting(block: type, name: str, value: Any, problems: list[str], where: str) -> Any:
    """``value`` of ``block``'s setting ``name`` checked against the field's type and what it allows; None if it fails.

    A problem reads ``"<where>: <name>=<value> is invalid: it must be ..."``.
    """
    ok, converted, allowed = check_field(block, name, value, null=False)
    if not ok:
        problems.append(f"{where}: {name}={value!r} is invalid: it must be {allowed}")
        return None
    # A number takes its field's type: p=2 and p=2.0 are one ball, with one id.
    kind = _value_type(typing.get_type_hints(block)[name])
    return kind(converted) if kind in (int, float) else converted


def _odd(value: int) -> bool:
    return value % 2 == 1


@dataclass
class BallBlock:
    """The settings every block of a kind in a ball shares: data set, model, ball, seed, examples.

    A kind's block dataclass extends it with its own settings.
    """

    dataset: str | None = None
    model: str | None = None
    threat_model: BallKind = BallKind.WASSERSTEIN
    kernel_size: int | None = setting(None, at_least=3, rule=_odd, words="an odd integer >= 3")
    p: float | None = setting(None, above=0)
    seed: int = setting(0, at_least=0)
    n_examples: int | None = setting(None, at_least=1)


def config_digest(value: Mapping[str, Any]) -> str:
    """A short hash of plain JSON values: equal values, equal digests, on any machine."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class CellOutcome:
    """A cell's summary from the rows of its shards on disk.

    Attributes
    ----------
    examples : int
        Examples with rows on disk.
    seconds : float
        Their compute time.
    robust_accuracy : float or None
        At the cell's largest radius (a certify cell: certified accuracy); None without rows.
    attack_summary, box_handling : str
        The method in words, and how it keeps pixels in [0, 1].
    gradient_mode : str or None
        How the model's gradients were taken (None where none were).
    failed_model_checks : list of str or None
        The model checks that failed on some row; None where none ran.
    """

    examples: int
    seconds: float
    robust_accuracy: float | None
    attack_summary: str
    box_handling: str
    gradient_mode: str | None = None
    failed_model_checks: list[str] | None = None


@dataclass(frozen=True)
class Cell(ABC):
    """One point of a grid; subclasses are the kinds of cells (see the module's docstring).

    Attributes
    ----------
    dataset, model : str
        The data set and the registered model.
    ball : Ball
        The threat model.
    seed : int
    n_examples : int
        The first this many test examples.
    """

    dataset: str
    model: str
    ball: Ball
    seed: int
    n_examples: int

    marker: ClassVar[str | None]
    """The block setting whose presence makes a block this kind (None: the kind of blocks that set no marker)."""
    block: ClassVar[type]
    """The dataclass of the settings a block of this kind may set (each to a value or a list of values: an axis)."""
    table: ClassVar[Table]
    """The store table its shards write, one file per shard."""
    unlisted_axes: ClassVar[frozenset[str]] = frozenset()
    """Settings of the block whose list is one value, not an axis."""

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Mapping[str, Any], problems: list[str], where: str) -> tuple["Cell | None", set[str]]:
        """The cell of one point of a block (its defaults filled in), appending every problem found.

        Returns the cell (None if the point has a problem) and the names of
        conditional settings it used (those of :meth:`conditional_settings`).
        """

    @classmethod
    def block_settings(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls.block))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The block's defaults, where it has one (the one place they are written), as a user would type them."""
        return {
            field.name: field.default.value if isinstance(field.default, enum.Enum) else field.default
            for field in dataclasses.fields(cls.block) if field.default is not dataclasses.MISSING and field.default is not None
        }

    @classmethod
    def extra_settings(cls) -> set[str]:
        """Settings beyond the block dataclass's fields that the kind takes (an attack: its solvers' hyperparameters)."""
        return set()

    @classmethod
    def foreign_settings_problem(cls, names: list[str], block: Mapping[str, Any]) -> str:
        """The problem of a block of this kind that sets ``names``, settings of other kinds."""
        return f"{', '.join(map(repr, names))} cannot be set with {cls.marker}: a {cls.marker} block sets {cls.allowed_settings(block)}"

    @classmethod
    def missing_marker_problem(cls, names: list[str]) -> str:
        """The problem of a block without this kind's marker that sets ``names``, settings only this kind takes."""
        return f"{', '.join(map(repr, names))} are settings of {cls.marker} blocks: set {cls.marker}, or leave them out"

    @classmethod
    def conditional_settings(cls, block: Mapping[str, Any]) -> set[str]:
        """Settings of ``block`` that some cells use and others do not: refused when no cell of the block uses them."""
        return set()

    @classmethod
    def allowed_settings(cls, block: Mapping[str, Any]) -> str:
        """The settings a block like ``block`` may set, in words (for messages)."""
        return ", ".join(sorted(cls.block_settings()))

    @classmethod
    def problems_before_run(cls, cells: list["Cell"]) -> list[str]:
        """Problems of this kind's cells that only a look at their models finds (before any work)."""
        return []

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Everything that determines the cell's numbers, as plain JSON values (its id hashes it)."""

    @property
    @abstractmethod
    def label(self) -> str:
        """What attacks (or certifies) the cell's model, in a few words."""

    @property
    @abstractmethod
    def final_eps(self) -> float:
        """The largest radius the cell reports."""

    @abstractmethod
    def columns(self) -> dict[str, Any]:
        """The cell's configuration as the store's columns (those of the ``cells`` table it fills)."""

    @abstractmethod
    def run_shard(self, worker: "ShardRunner", shard: "Shard", on_progress: Callable[["ShardProgress"], None] | None) -> None:
        """Compute the shard's rows and write them to :attr:`table` (the worker gives models, examples, folders)."""

    @abstractmethod
    def outcome(self, worker: "ShardRunner") -> CellOutcome:
        """The cell's summary from the rows of its shards on disk."""

    @property
    def cell_id(self) -> str:
        """A hash of :meth:`config`: equal configurations, equal ids, on any machine."""
        return config_digest(self.config())

    def shards(self, shard_size: int) -> list["Shard"]:
        """The cell's examples ``0 .. n_examples - 1`` in consecutive slices of ``shard_size``."""
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size={shard_size!r} is invalid: it must be an integer >= 1")
        return [Shard(self, start, min(start + shard_size, self.n_examples)) for start in range(0, self.n_examples, shard_size)]


@dataclass(frozen=True)
class Shard:
    """Examples ``start .. stop - 1`` of a cell's test subset."""

    cell: Cell
    start: int
    stop: int

    @property
    def shard_id(self) -> str:
        return config_digest({"cell": self.cell.config(), "start": self.start, "stop": self.stop})

    @property
    def size(self) -> int:
        return self.stop - self.start


class CellKinds:
    """Kinds of cells, by the block setting that selects each; exactly one kind has no marker (the default)."""

    def __init__(self, kinds: tuple[type[Cell], ...]):
        markers = [kind.marker for kind in kinds]
        for kind in kinds:
            if not (isinstance(kind, type) and issubclass(kind, Cell)):
                raise ValueError(f"a cell kind is a subclass of Cell, not {kind!r}")
        repeated = sorted({repr(m) for m in markers if markers.count(m) > 1})
        if repeated:
            raise ValueError(f"cell kinds share the marker(s) {', '.join(repeated)}: each kind needs its own")
        self.kinds = tuple(kinds)

    def __iter__(self):
        return iter(self.kinds)

    def of_block(self, block: Mapping[str, Any]) -> tuple[type[Cell] | None, str | None]:
        """The kind of ``block`` by its marker, or a problem naming the markers it sets at once."""
        marked = [kind for kind in self.kinds if kind.marker is not None and kind.marker in block]
        if len(marked) > 1:
            return None, f"{', '.join(repr(k.marker) for k in marked)} select different kinds of cells: a block sets one"
        if marked:
            return marked[0], None
        (default,) = [kind for kind in self.kinds if kind.marker is None]
        return default, None

    def known_settings(self) -> set[str]:
        return {name for kind in self.kinds for name in kind.block_settings()}


_REGISTERED_KINDS: list[type[Cell]] = []


def register_cell_kind(kind: type[Cell]) -> type[Cell]:
    """Add a kind of cell to every grid expanded after this call (a decorator; a plugin module calls it).

    Its :attr:`Cell.marker` must be new; the cells are pickled to Ray
    workers, so the kind must live in a module the workers import (a plugin
    passed with ``plugins=[...]``).
    """
    cell_kinds_with(kind)
    _REGISTERED_KINDS.append(kind)
    return kind


def unregister_cell_kind(kind: type[Cell]) -> None:
    _REGISTERED_KINDS.remove(kind)


def cell_kinds_with(*extra: type[Cell]) -> CellKinds:
    """The built-in kinds (:mod:`harness.run.kinds`), the registered ones, and ``extra``."""
    from .kinds import AttackCell, CertifyCell, SuiteCell

    return CellKinds((AttackCell, SuiteCell, CertifyCell, *_REGISTERED_KINDS, *extra))


def check_cell_basics(settings: Mapping[str, Any], problems: list[str], where: str) -> None:
    """Problems of the settings every cell needs: data set, model (registered, of that data set), examples."""
    for required in ("dataset", "model", "n_examples"):
        if required not in settings:
            problems.append(f"{where}: {required} is not set")
    model_names = [spec.name for spec in zoo.models()]
    model_spec = zoo.model_spec(settings["model"]) if settings.get("model") in model_names else None
    if "model" in settings and model_spec is None:
        problems.append(f"{where}: model={settings['model']!r} is not registered; registered: {', '.join(model_names)}")
    if model_spec is not None and "dataset" in settings and model_spec.dataset.value != settings["dataset"]:
        problems.append(
            f"{where}: model {model_spec.name!r} classifies {model_spec.dataset.value}, not dataset={settings['dataset']!r}"
        )


def ball_of(block: type, settings: Mapping[str, Any], problems: list[str], where: str, unset_hint: str = "") -> Ball | None:
    """The ball ``settings`` name (``threat_model``, and ``kernel_size`` and ``p`` for a transport ball)."""
    kind = check_setting(block, "threat_model", settings["threat_model"], problems, where)
    if kind is None:
        return None
    if not Ball.has_geometry(kind):
        return Ball(kind)
    geometry = []
    for name in ("kernel_size", "p"):
        if settings.get(name) is None:
            problems.append(f"{where}: {name} is not set{unset_hint}")
            geometry.append(None)
        else:
            geometry.append(check_setting(block, name, settings[name], problems, where))
    if None in geometry:
        return None
    return Ball.of(kind.value, *geometry)


def wasserstein_only(ball: Ball | None, problems: list[str], where: str, what: str) -> None:
    if ball is not None and ball.kind is not BallKind.WASSERSTEIN:
        problems.append(f"{where}: {what}, not threat_model={ball.kind.value!r}")

"""What a run will do before it attacks: which models it trains and in what order, which it skips, what it downloads.

:func:`plan_run` decides, from the grid, its cells and the settings; it
changes nothing on disk. The preflight checks the plan it returns (weights
and data there, or fetchable), and only once every check has passed does
:func:`fetch` download what the plan lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import zoo

from ..data import load_dataset
from .cells import Cell
from .fields import check_field, setting
from .settings import RunSettings

__all__ = ["DataSplit", "Plan", "TrainingRequest", "fetch", "has_weights", "plan_run", "training_requests"]


@dataclass(frozen=True)
class TrainingRequest:
    """A model to train by its recipe before the run (see :func:`harness.train.train`)."""

    model: str
    epochs: int | None = setting(None, at_least=1, null_means="the recipe's")
    train_examples: int | None = setting(None, at_least=1, null_means="the whole training split")


@dataclass(frozen=True)
class DataSplit:
    """One split of a data set: the test split the attacks read, or the training split a recipe reads."""

    dataset: str
    train: bool = False

    def __str__(self) -> str:
        return f"{self.dataset} ({'training' if self.train else 'test'} split)"


@dataclass(frozen=True)
class Plan:
    """What a run does before and besides its attacks.

    Attributes
    ----------
    cells : list of Cell
        The cells to attack: the grid's, less those of skipped models.
    training : list of TrainingRequest
        Models to train first, in order: a recipe that fine-tunes another
        model's weights comes after that model.
    skipped_models : list of str
        Models a ``skip_missing_weights`` grid drops for want of weights.
    weights_to_fetch : list of str
        Models whose published weights are downloaded before the run.
    data_to_fetch : list of DataSplit
        Splits downloaded before the run.
    """

    cells: list[Cell]
    training: list[TrainingRequest] = field(default_factory=list)
    skipped_models: list[str] = field(default_factory=list)
    weights_to_fetch: list[str] = field(default_factory=list)
    data_to_fetch: list[DataSplit] = field(default_factory=list)

    @property
    def models_to_train(self) -> set[str]:
        return {request.model for request in self.training}

    @property
    def data_needed(self) -> list[DataSplit]:
        """The test split of every data set attacked, and the training split of every data set trained on."""
        attacked = sorted({DataSplit(cell.dataset) for cell in self.cells}, key=str)
        trained = sorted({DataSplit(zoo.model_spec(name).dataset.value, train=True) for name in self.models_to_train}, key=str)
        return attacked + trained


def training_requests(grid: Mapping[str, Any]) -> tuple[list[TrainingRequest], list[str]]:
    """The grid's ``train`` list: model names, or mappings with ``model`` and optional ``epochs``, ``train_examples``.

    Returns
    -------
    requests : list of TrainingRequest
        The valid entries, in order.
    problems : list of str
        One per invalid entry, naming it and what is allowed.
    """
    requests, problems = [], []
    trainable = sorted(spec.name for spec in zoo.models() if spec.recipe is not None)
    for entry in grid.get("train") or []:
        settings = {"model": entry} if isinstance(entry, str) else dict(entry) if isinstance(entry, Mapping) else None
        if settings is None or set(settings) - {"model", "epochs", "train_examples"} or "model" not in settings:
            problems.append(
                f"train entry {entry!r} is invalid: give a model name, or model: NAME with optional epochs and train_examples"
            )
            continue
        if settings["model"] not in trainable:
            problems.append(f"train: model {settings['model']!r} has no recipe; models with recipes: {', '.join(trainable)}")
            continue
        for key in ("epochs", "train_examples"):
            ok, _, allowed = check_field(TrainingRequest, key, settings.get(key))
            if not ok:
                problems.append(f"train: {key}={settings[key]!r} of {settings['model']!r} is invalid: it must be {allowed}")
        requests.append(TrainingRequest(settings["model"], settings.get("epochs"), settings.get("train_examples")))
    return requests, problems


def has_weights(spec: zoo.ModelSpec, weights_dir: str | None, download: bool) -> bool:
    """Whether the model's weights are there when the attacks start: trained by its recipe, on disk, or to be downloaded."""
    if spec.recipe is not None:
        return zoo.trained_weights_path(spec, weights_dir).is_file() and zoo.training_record(spec, weights_dir) is not None
    if spec.weights is None:
        return False
    return zoo.weights_path(spec, weights_dir).is_file() or (download and spec.weights.url is not None)


def plan_run(grid: Mapping[str, Any], cells: list[Cell], settings: RunSettings) -> Plan:
    """Decide what the run trains, skips and downloads.

    Parameters
    ----------
    grid : mapping
        The grid (its ``train`` list and ``skip_missing_weights``); invalid
        ``train`` entries are left out (the preflight reports them).
    cells : list of Cell
        The grid's cells.
    settings : RunSettings
        ``weights_dir``, ``download``, ``train_missing`` and ``data_root``
        are read.

    Returns
    -------
    Plan
    """
    weights_dir, download = settings.weights_dir, settings.download
    skipped: list[str] = []
    if cells and grid.get("skip_missing_weights"):
        keep = {
            name for name in {cell.model for cell in cells}
            if has_weights(zoo.model_spec(name), weights_dir, download)
            or (settings.train_missing and zoo.model_spec(name).recipe is not None)
        }
        skipped = sorted({cell.model for cell in cells} - keep)
        cells = [cell for cell in cells if cell.model in keep]
    training, _ = training_requests(grid)
    if settings.train_missing:
        requested = {request.model for request in training}
        for name in sorted({cell.model for cell in cells}):
            spec = zoo.model_spec(name)
            if spec.recipe is not None and name not in requested and not has_weights(spec, weights_dir, download):
                training.append(TrainingRequest(name))
    plan = Plan(cells, _with_starting_models(training, weights_dir, download), skipped)
    if not download:
        return plan
    weights_to_fetch = []
    for name in sorted({cell.model for cell in cells} - plan.models_to_train):
        spec = zoo.model_spec(name)
        if spec.recipe is None and spec.weights is not None and spec.weights.url is not None:
            if not zoo.weights_path(spec, weights_dir).is_file():
                weights_to_fetch.append(name)
    data_to_fetch = [split for split in plan.data_needed if _missing(split, settings.data_root)]
    return Plan(plan.cells, plan.training, plan.skipped_models, weights_to_fetch, data_to_fetch)


def _missing(split: DataSplit, data_root: str) -> bool:
    try:
        load_dataset(split.dataset, data_root, train=split.train)
    except FileNotFoundError:
        return True
    except ValueError:
        return False  # there but unreadable: the preflight says so, a download would not replace it
    return False


def _with_starting_models(requests: list[TrainingRequest], weights_dir: str | None, download: bool) -> list[TrainingRequest]:
    """``requests``, each preceded by the untrained recipe model its recipe fine-tunes (``init_from``), if any."""
    from ..train.recipes import recipe

    ordered: list[TrainingRequest] = []

    def add(request: TrainingRequest) -> None:
        if any(known.model == request.model for known in ordered):
            return
        start = recipe(zoo.model_spec(request.model).recipe).init_from
        if start is not None and zoo.model_spec(start).recipe is not None and not has_weights(zoo.model_spec(start), weights_dir, download):
            add(next((known for known in requests if known.model == start), TrainingRequest(start)))
        ordered.append(request)

    for request in requests:
        add(request)
    return ordered


def fetch(plan: Plan, settings: RunSettings) -> list[str]:
    """Download the weights and data the plan lists; returns the problems (empty when every download succeeded).

    A weights file is checked against its published hash before it is kept.
    """
    problems = []
    for name in plan.weights_to_fetch:
        try:  # fetched once here, not by every worker at once
            zoo.model(name, weights_dir=settings.weights_dir, download=True)
        except (OSError, ValueError) as error:
            problems.append(f"model {name!r}: {error}")
    for split in plan.data_to_fetch:
        try:
            load_dataset(split.dataset, settings.data_root, train=split.train, download=True)
        except (OSError, ValueError) as error:
            problems.append(f"data set {split}: {error}")
    return problems

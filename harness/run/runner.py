"""Running shards and cells: what a worker does, wherever it runs.

A :class:`ShardRunner` belongs to one worker process (an in-process executor
or a long-lived Ray actor); it keeps the models and data it has loaded, so a
worker pays for each only once. :meth:`ShardRunner.run_shard` has the
shard's kind of cell compute and store its rows
(:meth:`~harness.run.cells.Cell.run_shard`); a shard already on disk is skipped, so running a shard twice
(a retry, a resumed run) changes nothing. :meth:`ShardRunner.finish_cell`
summarizes a cell from the rows that landed on disk.
"""

from __future__ import annotations

import copy
import datetime
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

import zoo

from ..attack.evaluate import clean_accuracy
from ..attack.pgd import AttackProgress
from ..data import load_dataset, test_subset
from ..provenance import git_commit, package_versions, resolve_device
from ..vocabulary import CellStatus
from .cells import SHARED_CONFIG_COLUMNS, Cell, Shard
from .settings import RunSettings
from .store import Table, shard_exists, write_shard

__all__ = [
    "RunContext", "ShardOutcome", "ShardProgress", "ShardRunner", "default_verify_workers",
    "training_summary",
]

@dataclass(frozen=True)
class RunContext:
    """Where a run reads and writes, and on what device it computes."""

    data_root: str
    results_dir: str
    weights_dir: str | None = None
    device: str = "cpu"
    """A device torch knows (the run's ``device=auto`` resolved)."""
    download: bool = RunSettings.download
    gallery_examples: int = RunSettings.gallery_examples
    """The first this many examples of every cell keep their images (``images`` table)."""
    verify_workers: int | None = None
    """Processes that run the exact LPs beside the attack (0: in the worker itself; None: :func:`default_verify_workers`)."""


@dataclass(frozen=True)
class ShardProgress:
    """A running shard's state, reported by its worker after attack steps."""

    shard_id: str
    cell_id: str
    decided: int
    """Examples of the shard fooled, or done with every step."""
    examples: int
    step: int
    steps: int
    eps: float
    seconds: float
    """Since the shard started."""
    stage: str = ""
    """What the shard is doing, where steps and radius do not say it (a suite's member)."""


@dataclass(frozen=True)
class ShardOutcome:
    shard_id: str
    cell_id: str
    examples: int
    seconds: float
    skipped: bool


_CELL_CONFIG_COLUMNS = (*SHARED_CONFIG_COLUMNS, "certifier", "box", "time_limit", "radius_rounds")
"""The configuration columns of the ``cells`` table (a kind of cell fills those it has)."""


def default_verify_workers(device: torch.device) -> int:
    """Verification processes beside an attack on ``device``.

    On a CPU the attack already uses the cores, so the LPs run in the worker
    itself; beside a GPU attack half the cores (at most 8) verify.
    """
    if device.type == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def training_summary(spec: zoo.ModelSpec, weights_dir: str | None) -> str:
    """The model's training in words; for a recipe-trained model, with its training record."""
    record = zoo.training_record(spec, weights_dir) if spec.recipe is not None else None
    if record is None:
        return spec.training
    examples = record["train_examples"]
    certified = (
        f", {100 * record['certified_accuracy']:.2f}% certified at l_inf {record['certified_linf_eps']:g}"
        if "certified_accuracy" in record else ""
    )
    return (
        f"{spec.training}. Training record: recipe {record['recipe']['name']}, {record['epochs']} epochs on "
        f"{examples} training images, seed {record['seed']}, {100 * record['clean_accuracy']:.2f}% clean{certified}, "
        f"{record['seconds'] / 60:.1f} min on {record['device']}, commit {record['git_commit'][:10]}, "
        f"sha256 {record['sha256'][:12]}"
    )


class ShardRunner:
    """Runs shards for one worker, caching models, test sets and clean accuracies."""

    def __init__(self, context: RunContext):
        self.context = context
        self.device = resolve_device(context.device)
        self.verify_workers = default_verify_workers(self.device) if context.verify_workers is None else context.verify_workers
        self._verify_pool: ProcessPoolExecutor | None = None
        self._models: dict[str, torch.nn.Module] = {}
        self._cpu_models: dict[str, torch.nn.Module] = {}
        self._clean_accuracy: dict[str, float] = {}
        self._test_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def verifier(self) -> ProcessPoolExecutor | None:
        """The worker's verification processes, started on first use (spawned: a forked CUDA context is unusable)."""
        if self.verify_workers == 0:
            return None
        if self._verify_pool is None:
            self._verify_pool = ProcessPoolExecutor(self.verify_workers, mp_context=multiprocessing.get_context("spawn"))
        return self._verify_pool

    def close(self) -> None:
        """Stop the verification processes (a later shard starts them again)."""
        if self._verify_pool is not None:
            self._verify_pool.shutdown(cancel_futures=True)
            self._verify_pool = None

    def provide_test_set(self, dataset: str, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Use these test images (the first ones, in torchvision's order) instead of reading the data root."""
        self._test_sets[dataset] = (images, labels)

    def examples(self, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
        cell = shard.cell
        provided = self._test_sets.get(cell.dataset)
        if provided is not None and provided[0].shape[0] >= shard.stop:
            return provided[0][shard.start : shard.stop], provided[1][shard.start : shard.stop]
        return test_subset(cell.dataset, self.context.data_root, shard.stop - shard.start, shard.start, download=self.context.download)

    def model(self, name: str) -> torch.nn.Module:
        if name not in self._models:
            loaded = zoo.model(name, weights_dir=self.context.weights_dir, device=self.device, download=self.context.download)
            for parameter in loaded.parameters():
                parameter.requires_grad_(False)
            self._models[name] = loaded
        return self._models[name]

    def cpu_model(self, name: str) -> torch.nn.Module:
        """The model on the CPU, where the certifiers compute (in float64)."""
        if self.device.type == "cpu":
            return self.model(name)
        if name not in self._cpu_models:
            self._cpu_models[name] = copy.deepcopy(self.model(name)).cpu()
        return self._cpu_models[name]

    def clean_accuracy(self, cell: Cell) -> float:
        """Accuracy of the cell's model on the full test split of its data set."""
        if cell.model not in self._clean_accuracy:
            images, labels = load_dataset(cell.dataset, self.context.data_root, download=self.context.download)
            self._clean_accuracy[cell.model] = clean_accuracy(self.model(cell.model), images.to(self.device), labels.to(self.device))
        return self._clean_accuracy[cell.model]

    def progress(self, shard: Shard, decided: int, step: int, steps: int, eps: float, started: float, stage: str = "") -> "ShardProgress":
        """The shard's state now, for the progress line."""
        return ShardProgress(
            shard.shard_id, shard.cell.cell_id, decided, shard.size, step, steps, eps, time.perf_counter() - started, stage,
        )

    def attack_progress(
        self, shard: Shard, started: float, on_progress: Callable[[ShardProgress], None] | None,
    ) -> Callable[..., None] | None:
        """``on_progress`` fed from an attack's :class:`~harness.attack.pgd.AttackProgress` (``before`` examples of the
        shard decided by earlier stages); None without ``on_progress``."""
        if on_progress is None:
            return None

        def report(before: int, progress: AttackProgress, stage: str = "") -> None:
            on_progress(self.progress(shard, before + progress.decided, progress.step, progress.steps, progress.eps, started, stage))

        return report

    def attack_inputs(self, shard: Shard) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
        """The shard's images and labels on the worker's device, and the cell's model there."""
        images, labels = self.examples(shard)
        return images.to(self.device), labels.to(self.device), self.model(shard.cell.model)

    def write_attack_rows(self, shard: Shard, images: torch.Tensor, columns: Mapping[str, Any], record: dict) -> None:
        """An attacking shard's gallery images, then its ``examples`` rows (the file that marks the shard done)."""
        self._write_images(shard, images, columns["adversarial"])
        cell = shard.cell
        write_shard(self.context.results_dir, Table.EXAMPLES, cell.dataset, cell.model, shard.shard_id, record)

    def run_shard(self, shard: Shard, on_progress: Callable[[ShardProgress], None] | None = None) -> ShardOutcome:
        """Compute and store one shard (skipped when its file exists); ``on_progress`` gets :class:`ShardProgress` updates."""
        cell = shard.cell
        if shard_exists(self.context.results_dir, cell.table, cell.dataset, cell.model, shard.shard_id, cell.cell_id):
            return ShardOutcome(shard.shard_id, cell.cell_id, shard.size, 0.0, skipped=True)
        started = time.perf_counter()
        cell.run_shard(self, shard, on_progress)
        return ShardOutcome(shard.shard_id, cell.cell_id, shard.size, time.perf_counter() - started, skipped=False)

    def _write_images(self, shard: Shard, images: torch.Tensor, adversarial: np.ndarray) -> None:
        kept = max(0, min(shard.stop, self.context.gallery_examples) - shard.start)
        if kept == 0:
            return
        cell = shard.cell
        channels, height, width = images.shape[1:]
        originals = images[:kept].detach().cpu().numpy().astype(np.float32)
        record = {
            "cell_id": [cell.cell_id] * kept,
            "shard_id": [shard.shard_id] * kept,
            "example_index": np.arange(shard.start, shard.start + kept),
            "channels": [channels] * kept,
            "height": [height] * kept,
            "width": [width] * kept,
            "original": [image.ravel() for image in originals],
            "adversarial": [image.ravel() for image in adversarial[:kept].astype(np.float32)],
        }
        write_shard(self.context.results_dir, Table.IMAGES, cell.dataset, cell.model, shard.shard_id, record)

    def finish_cell(self, cell: Cell, started_at: datetime.datetime) -> dict:
        """Write the cell's row of the ``cells`` table from its shards' rows on disk; returns the row.

        ``seconds`` is the compute time of the rows on disk, so a rerun that
        only finds finished shards leaves it unchanged; ``started_at`` is
        when this run began the cell. A certify cell's ``robust_accuracy``
        is its certified accuracy at its largest radius.
        """
        spec = zoo.model_spec(cell.model)
        outcome = cell.outcome(self)
        row = {name: [None] for name in _CELL_CONFIG_COLUMNS}
        row.update({name: [value] for name, value in cell.columns().items() if name in row})
        row.update(
            cell_id=[cell.cell_id],
            gradient_mode=[outcome.gradient_mode],
            status=[(CellStatus.COMPLETE if outcome.examples == cell.n_examples else CellStatus.INCOMPLETE).value],
            n_examples=[outcome.examples],
            started_at=[started_at],
            finished_at=[datetime.datetime.now(datetime.timezone.utc)],
            seconds=[outcome.seconds],
            clean_accuracy=[self.clean_accuracy(cell)],
            robust_accuracy=[outcome.robust_accuracy],
            failed_model_checks=[outcome.failed_model_checks],
            trained_for=[spec.trained_for.value],
            model_training=[training_summary(spec, self.context.weights_dir)],
            model_paper=[spec.paper],
            attack_summary=[outcome.attack_summary],
            box_handling=[outcome.box_handling],
            ball_description=[cell.ball.description],
            config_json=[json.dumps(cell.config(), sort_keys=True)],
            package_versions_json=[json.dumps(package_versions(), sort_keys=True)],
            git_commit=[git_commit()],
            device=[str(self.device) if self.device.type == "cpu" else torch.cuda.get_device_name(self.device)],
        )
        write_shard(self.context.results_dir, Table.CELLS, cell.dataset, cell.model, cell.cell_id, row)
        return {name: values[0] for name, values in row.items()}

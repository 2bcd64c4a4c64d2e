"""Running shards and cells: what a worker does, wherever it runs.

A :class:`ShardRunner` belongs to one worker process (an in-process executor
or a long-lived Ray actor); it keeps the models and data it has loaded, so a
worker pays for each only once. :meth:`ShardRunner.run_shard` attacks and
verifies one shard and writes its rows to the store; a shard already on disk
is skipped, so running a shard twice (a retry, a resumed run) changes
nothing. :meth:`ShardRunner.finish_cell` summarizes a cell from the rows that
landed on disk.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import zoo
from solvers.iterate import Norm, NormBallIterate

from ..attack.pgd import make_iterate
from ..data import load_dataset, test_subset
from ..attack.evaluate import attack_and_verify, clean_accuracy
from .grid import Cell, Shard, ThreatModel
from .store import CELLS_SCHEMA, EXAMPLES_SCHEMA, Table, read_table, shard_exists, write_shard
from ..attack.verify import VerificationStatus, robust_accuracy

__all__ = ["RunContext", "ShardOutcome", "ShardRunner"]

_PACKAGES = ("torch", "torchvision", "numpy", "scipy", "pyarrow", "pandas", "ray", "hydra-core")


@dataclass(frozen=True)
class RunContext:
    """Where a run reads and writes, and on what device it computes."""

    data_root: str
    results_dir: str
    weights_dir: str | None = None
    device: str = "cpu"
    download: bool = False
    gallery_examples: int = 8
    """The first this many examples of every cell keep their images (``images`` table)."""


@dataclass(frozen=True)
class ShardOutcome:
    shard_id: str
    cell_id: str
    examples: int
    seconds: float
    skipped: bool


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def package_versions() -> dict[str, str]:
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def git_commit() -> str:
    """The commit of the checkout the code runs from ('unknown' outside git)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def _attack_summary(cell: Cell) -> str:
    if cell.threat_model is not ThreatModel.WASSERSTEIN:
        return f"PGD in the {cell.threat_model.value} ball, step rule {cell.step_rule.value}"
    return zoo.solver_spec(cell.solver).summary


def _box_handling(cell: Cell) -> str:
    """How the attack keeps pixels in [0, 1], in words for the report."""
    if cell.threat_model is not ThreatModel.WASSERSTEIN:
        return "clipped to [0, 1] after each step"
    if cell.clamp:
        return "clamped to [0, 1] after each step, which does not conserve mass"
    spec = zoo.solver_spec(cell.solver)
    box = {**spec.defaults, **spec.fixed}.get("box")
    if box is True:
        return "kept in [0, 1] by the solver"
    if box is False:
        return "none: images may leave [0, 1], and such claims fail verification"
    return "not declared by the solver"


class ShardRunner:
    """Runs shards for one worker, caching models, test sets and clean accuracies."""

    def __init__(self, context: RunContext):
        self.context = context
        self.device = _device(context.device)
        self._models: dict[str, torch.nn.Module] = {}
        self._clean_accuracy: dict[str, float] = {}
        self._test_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def provide_test_set(self, dataset: str, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Use these test images (the first ones, in torchvision's order) instead of reading the data root."""
        self._test_sets[dataset] = (images, labels)

    def _examples(self, shard: Shard) -> tuple[torch.Tensor, torch.Tensor]:
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

    def clean_accuracy(self, cell: Cell) -> float:
        """Accuracy of the cell's model on the full test split of its data set."""
        if cell.model not in self._clean_accuracy:
            images, labels = load_dataset(cell.dataset, self.context.data_root, download=self.context.download)
            self._clean_accuracy[cell.model] = clean_accuracy(self.model(cell.model), images.to(self.device), labels.to(self.device))
        return self._clean_accuracy[cell.model]

    def _iterate(self, cell: Cell):
        if cell.threat_model is not ThreatModel.WASSERSTEIN:
            return NormBallIterate(Norm(cell.threat_model.value), cell.step_size)
        spec = zoo.solver_spec(cell.solver)
        wanted = {"kernel_size": cell.kernel_size, "p": cell.p, "lam": cell.lam, "step_size": cell.step_size}
        solver = spec.create(**{name: value for name, value in wanted.items() if name in spec.defaults and value is not None})
        return make_iterate(solver, cell.step_rule, cell.step_size, clamp=cell.clamp)

    def run_shard(self, shard: Shard) -> ShardOutcome:
        """Attack, verify and store one shard (skipped when its file exists)."""
        cell, context = shard.cell, self.context
        if shard_exists(context.results_dir, Table.EXAMPLES, cell.dataset, cell.model, shard.shard_id):
            return ShardOutcome(shard.shard_id, cell.cell_id, shard.stop - shard.start, 0.0, skipped=True)
        started = time.perf_counter()
        images, labels = self._examples(shard)
        model = self.model(cell.model)
        torch.manual_seed(cell.seed)
        wasserstein = cell.threat_model is ThreatModel.WASSERSTEIN
        columns = attack_and_verify(
            model, images.to(self.device), labels.to(self.device), self._iterate(cell), cell.schedule,
            kernel_size=cell.kernel_size if wasserstein else None,
            p=cell.p if wasserstein else None,
            norm=None if wasserstein else Norm(cell.threat_model.value),
            batch_size=shard.stop - shard.start, loss=cell.loss, restarts=cell.restarts, seed=cell.seed,
        )
        rows = shard.stop - shard.start
        config = cell.config()
        record = {name: [config[name]] * rows for name in EXAMPLES_SCHEMA.names if name in config}
        record.update(
            cell_id=[cell.cell_id] * rows,
            gradient_mode=[zoo.model_spec(cell.model).gradient_mode.value] * rows,
            shard_id=[shard.shard_id] * rows,
            example_index=np.arange(shard.start, shard.stop),
            verification_status=[VerificationStatus(int(code)).name for code in columns["verification_status"]],
        )
        record.update({name: columns[name] for name in EXAMPLES_SCHEMA.names if name in columns and name not in record})
        # Images first: the examples file is what marks the shard done.
        self._write_images(shard, images, columns["adversarial"])
        write_shard(context.results_dir, Table.EXAMPLES, cell.dataset, cell.model, shard.shard_id, record)
        return ShardOutcome(shard.shard_id, cell.cell_id, rows, time.perf_counter() - started, skipped=False)

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
        """Write the cell's row from its examples on disk; returns the row.

        ``seconds`` is the compute time of the examples on disk (attack and
        verification), so a rerun that only finds finished shards leaves it
        unchanged; ``started_at`` is when this run began the cell.
        """
        context = self.context
        examples = read_table(context.results_dir, Table.EXAMPLES, filters=[("cell_id", "==", cell.cell_id)])
        examples = examples.drop_duplicates("example_index")
        config = cell.config()
        spec = zoo.model_spec(cell.model)
        row = {name: [config[name]] for name in CELLS_SCHEMA.names if name in config}
        complete = len(examples) == cell.n_examples
        row.update(
            cell_id=[cell.cell_id],
            gradient_mode=[spec.gradient_mode.value],
            status=["complete" if complete else "incomplete"],
            n_examples=[len(examples)],
            started_at=[started_at],
            finished_at=[datetime.datetime.now(datetime.timezone.utc)],
            seconds=[float((examples["attack_seconds"] + examples["verify_seconds"]).sum())],
            clean_accuracy=[self.clean_accuracy(cell)],
            robust_accuracy=[robust_accuracy(examples["verified_distance"], cell.schedule.final_eps) if len(examples) else None],
            trained_for=[spec.trained_for.value],
            model_training=[spec.training],
            model_paper=[spec.paper],
            attack_summary=[_attack_summary(cell)],
            box_handling=[_box_handling(cell)],
            config_json=[json.dumps(config, sort_keys=True)],
            package_versions_json=[json.dumps(package_versions(), sort_keys=True)],
            git_commit=[git_commit()],
            device=[str(self.device) if self.device.type == "cpu" else torch.cuda.get_device_name(self.device)],
        )
        write_shard(context.results_dir, Table.CELLS, cell.dataset, cell.model, cell.cell_id, row)
        return {name: values[0] for name, values in row.items()}

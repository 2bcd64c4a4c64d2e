"""Running shards and cells: what a worker does, wherever it runs.

A :class:`ShardRunner` belongs to one worker process (an in-process executor
or a long-lived Ray actor); it keeps the models and data it has loaded, so a
worker pays for each only once. :meth:`ShardRunner.run_shard` attacks and
verifies one shard (or, for a certify cell, certifies it) and writes its rows
to the store; a shard already on disk is skipped, so running a shard twice
(a retry, a resumed run) changes nothing. :meth:`ShardRunner.finish_cell`
summarizes a cell from the rows that landed on disk.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import zoo

from ..attack.evaluate import attack_and_verify, clean_accuracy
from ..attack.model_checks import ModelCheckWarning, check_model
from ..attack.pgd import AttackProgress
from ..attack.suite import evaluate_batch
from ..attack.verify import VerificationStatus, robust_accuracy
from ..data import load_dataset, test_subset
from ..provenance import git_commit, package_versions, resolve_device
from ..vocabulary import CellStatus, CertificateStatus, Certifier, ModelCheck
from .grid import Cell, Shard, certify_config
from .store import CELLS_SCHEMA, EXAMPLES_SCHEMA, TYPED_HYPERPARAMETERS, Table, read_cell, shard_exists, write_shard

__all__ = [
    "RunContext", "ShardOutcome", "ShardProgress", "ShardRunner", "cell_columns", "certify_columns", "default_batch_size",
    "default_verify_workers", "training_summary",
]

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


def default_batch_size(device: torch.device) -> int:
    """Examples per attack batch (and shard) on ``device``.

    A GPU keeps a thousand 28x28 or 32x32 examples' plans in memory with
    room to spare and needs them to leave its launch-bound regime; on a CPU
    larger batches only delay the first finished shard.
    """
    return 100 if device.type == "cpu" else 1000


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


_CONFIG_COLUMNS = [
    name for name in EXAMPLES_SCHEMA.names
    if name in CELLS_SCHEMA.names and name not in ("schema_version", "cell_id", "gradient_mode", "failed_model_checks")
]
"""The configuration columns that examples and cells share (:func:`cell_columns` fills them)."""


def cell_columns(cell: Cell) -> dict:
    """The cell's configuration as the store's columns (:data:`~harness.run.store.EXAMPLES_SCHEMA`).

    ``step_rule`` and ``step_size`` are the attack's step, or for a solver
    that steps by its own rule, that rule's hyperparameters of the same names.
    A certify cell fills only its ball, seed and largest radius (its own
    settings are :func:`certify_columns`).
    """
    if cell.certify is not None:
        columns = dict.fromkeys(_CONFIG_COLUMNS)
        columns.update(cell.ball.config(), ball_title=cell.ball.title, final_eps=cell.final_eps, seed=cell.seed)
        return columns
    config = cell.config()
    hyperparameters = config.pop("hyperparameters")
    columns = {name: value for name, value in config.items() if name in EXAMPLES_SCHEMA.names}
    columns.update({name: hyperparameters.get(name) for name in TYPED_HYPERPARAMETERS})
    if cell.step_rule is None:
        columns.update(step_rule=hyperparameters.get("step_rule"), step_size=hyperparameters.get("step_size"))
    suite = cell.attack_suite
    columns.update(
        ball_title=cell.ball.title,
        eps_increment=cell.schedule.increment,
        final_eps=cell.final_eps,
        hyperparameters_json=json.dumps(hyperparameters, sort_keys=True),
        suite=None if suite is None else suite.name,
        suite_version=None if suite is None else suite.version,
        suite_json=None if suite is None else suite.definition_json(),
    )
    return columns


def certify_columns(cell: Cell) -> dict:
    """A certify cell's settings as the store's columns (``certifier``, ``box``, ``time_limit``, ``radius_rounds``);
    all None for an attack cell."""
    if cell.certify is None:
        return {"certifier": None, "box": None, "time_limit": None, "radius_rounds": None}
    config = certify_config(cell.certify)
    return {name: config.get(name) for name in ("certifier", "box", "time_limit", "radius_rounds")}


_SUITE_COLUMNS = ("schedule_radius", "found_by", "refined_by", "rejected_claims")
"""Examples columns only a suite cell fills."""

_SUITE_BOX = "every member keeps pixels in [0, 1] inside its projection; every image it keeps is verified in the box"


def _suite_summary(cell: Cell) -> str:
    suite = cell.attack_suite
    members = ", ".join(member.name for member in suite.members)
    return (
        f"attack suite {suite.label}: {members}, each on the examples it can still improve; then the radius refinement "
        f"(segment line search, {suite.refinement.rounds} rounds of bisection over fixed-radius attacks)"
    )


_CERTIFIER_SUMMARY = {
    Certifier.LINEAR_BOUNDS: (
        "certified lower bound, incomplete: exact support-function bounds over the ball, back-substituted through "
        "linear ReLU relaxations"
    ),
    Certifier.MILP: (
        "certified lower bound, complete: the verification problem as a mixed-integer program (ReLUs as in Tjeng et al. "
        "2019) after the linear bounds, {time_limit:g} s per example and radius"
    ),
}


def _certify_summary(cell: Cell) -> str:
    settings = cell.certify
    radii = ", ".join(f"{radius:g}" for radius in settings.radii)
    refinement = f"; then {settings.radius_rounds} rounds of bisection of each example's certified radius" if settings.radius_rounds else ""
    return _CERTIFIER_SUMMARY[settings.certifier].format(time_limit=settings.time_limit) + f", at radii {radii}{refinement}"


def _failed_checks(per_row) -> list[str] | None:
    """Every model check that failed on some row, in the order of :class:`ModelCheck`; None when no row was checked."""
    checked = [names for names in per_row if names is not None]
    if not checked:
        return None
    failed = {name for names in checked for name in names}
    return [check.value for check in ModelCheck if check.value in failed]


def _certify_box(cell: Cell) -> str:
    if cell.certify.box:
        return "the certified ball keeps pixels in [0, 1], as the attacks' verification does"
    return "the certified ball ignores the pixel bound 1: a larger ball, so its certificates hold with the box too"


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

    def _verifier(self) -> ProcessPoolExecutor | None:
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

    def run_shard(self, shard: Shard, on_progress: Callable[[ShardProgress], None] | None = None) -> ShardOutcome:
        """Attack, verify and store one shard (skipped when its file exists).

        ``on_progress`` gets a :class:`ShardProgress` after every attack step.
        """
        cell, context = shard.cell, self.context
        if cell.certify is not None:
            return self._certify_shard(shard, on_progress)
        if shard_exists(context.results_dir, Table.EXAMPLES, cell.dataset, cell.model, shard.shard_id, cell.cell_id):
            return ShardOutcome(shard.shard_id, cell.cell_id, shard.stop - shard.start, 0.0, skipped=True)
        started = time.perf_counter()
        rows = shard.stop - shard.start

        def report(before: int, progress: AttackProgress, stage: str = "") -> None:
            on_progress(ShardProgress(
                shard.shard_id, cell.cell_id, before + progress.decided, rows, progress.step, progress.steps,
                progress.eps, time.perf_counter() - started, stage,
            ))

        if on_progress is not None:  # the shard has started (its model may take a while to load)
            report(0, AttackProgress(0, rows, 0, cell.schedule.iterations, cell.schedule.initial))
        images, labels = self._examples(shard)
        model = self.model(cell.model)
        images, labels = images.to(self.device), labels.to(self.device)
        # Before the seed, and changing no state the attack reads (random generators included).
        checks = check_model(model, images, labels, loss=cell.loss)
        torch.manual_seed(cell.seed)
        if cell.suite is not None:
            columns = self._evaluate(cell, model, images, labels, started, None if on_progress is None else report)
        else:
            columns = attack_and_verify(
                model, images, labels, cell.ball, cell.iterate(), cell.schedule,
                batch_size=rows, loss=cell.loss, restarts=cell.restarts, seed=cell.seed,
                on_progress=None if on_progress is None else report, verify_executor=self._verifier(),
            )
            columns.update({name: np.full(rows, None) for name in _SUITE_COLUMNS})
        checks = checks.with_zero_gradient_steps(int(np.sum(columns["zero_gradient_steps"])))
        columns["failed_model_checks"] = [checks.names] * rows
        record = {name: [value] * rows for name, value in cell_columns(cell).items()}
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

    def _certify_shard(self, shard: Shard, on_progress: Callable[[ShardProgress], None] | None) -> ShardOutcome:
        """A certify cell's shard: :func:`~harness.certify.run.certify_batch` on its images, one certificates row per
        example and radius (skipped when its file exists)."""
        from ..certify.run import certify_batch  # attack-only workers never load the certifiers

        cell, context = shard.cell, self.context
        rows = shard.stop - shard.start
        if shard_exists(context.results_dir, Table.CERTIFICATES, cell.dataset, cell.model, shard.shard_id, cell.cell_id):
            return ShardOutcome(shard.shard_id, cell.cell_id, rows, 0.0, skipped=True)
        started = time.perf_counter()
        radii = cell.certify.radii

        def report(done: bool) -> None:  # the certifier reports nothing while it runs: the shard's start and end
            if on_progress is not None:
                stage = "certified" if done else f"certifying at {len(radii)} radii"
                on_progress(ShardProgress(
                    shard.shard_id, cell.cell_id, rows if done else 0, rows, 0, 1, radii[-1], time.perf_counter() - started, stage,
                ))

        report(done=False)
        images, labels = self._examples(shard)
        model = self.cpu_model(cell.model)
        batch = certify_batch(model, images.cpu(), labels.cpu(), cell.ball.transport, cell.certify)
        # What the ladder's timings do not cover (the bisection of the certified radius, reading the network), per example.
        rest = max(time.perf_counter() - started - float(batch.seconds.sum()), 0.0) / rows
        settings = {**certify_columns(cell), **cell.ball.config(), "ball_title": cell.ball.title}
        count = rows * len(radii)  # rows of the table: example-major, radii in increasing order
        record = {name: [value] * count for name, value in settings.items()}
        per_example = np.repeat(np.arange(rows), len(radii))
        record.update(
            cell_id=[cell.cell_id] * count,
            shard_id=[shard.shard_id] * count,
            example_index=shard.start + per_example,
            label=labels.cpu().numpy()[per_example],
            clean_prediction=batch.prediction[per_example],
            eps=np.tile(np.asarray(radii, dtype=np.float64), rows),
            status=[status.value for statuses in batch.status for status in statuses],
            margin_lower=batch.margin.ravel(),
            safety_margin=batch.safety_margin.ravel(),
            seconds=batch.seconds.ravel(),
            certified_radius=batch.certified_radius[per_example],
            radius_search_seconds=np.full(count, rest),
        )
        write_shard(context.results_dir, Table.CERTIFICATES, cell.dataset, cell.model, shard.shard_id, record)
        report(done=True)
        return ShardOutcome(shard.shard_id, cell.cell_id, rows, time.perf_counter() - started, skipped=False)

    @staticmethod
    def _evaluate(cell: Cell, model, images, labels, started: float, report) -> dict[str, np.ndarray]:
        """A suite cell's shard: :func:`~harness.attack.suite.evaluate_batch`, as the examples table's columns."""
        rows = images.shape[0]

        def on_stage(index: int, stages: int, name: str) -> None:
            report(0, AttackProgress(0, rows, index, stages, math.nan), name)

        outcome = evaluate_batch(model, images, labels, cell.ball, cell.attack_suite, cell.seed, None if report is None else on_stage)
        total = time.perf_counter() - started
        columns = dict(outcome.columns)
        columns.update(
            eps_found=columns["schedule_radius"],
            restart=np.full(rows, -1),
            attack_seconds=np.full(rows, (total - outcome.verify_seconds) / rows),
            verify_seconds=np.full(rows, outcome.verify_seconds / rows),
            adversarial=outcome.adversarial.detach().cpu().numpy(),
        )
        return columns

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
        """Write the cell's row from its examples (a certify cell: its certificates) on disk; returns the row.

        ``seconds`` is the compute time of the examples on disk (attack and
        verification, or certification), so a rerun that only finds finished
        shards leaves it unchanged; ``started_at`` is when this run began the
        cell. A certify cell's ``robust_accuracy`` is its certified accuracy
        at its largest radius.
        """
        context = self.context
        spec = zoo.model_spec(cell.model)
        if cell.certify is not None:
            examples, seconds, robust = self._certified_outcome(cell)
            summary, box_handling, gradient_mode = _certify_summary(cell), _certify_box(cell), None
            failed_checks = None
        else:
            found = read_cell(
                context.results_dir, Table.EXAMPLES, cell.dataset, cell.model, cell.cell_id,
                ["example_index", "attack_seconds", "verify_seconds", "verified_distance", "failed_model_checks"],
            )
            found = found.drop_duplicates("example_index")
            examples, seconds = len(found), float((found["attack_seconds"] + found["verify_seconds"]).sum())
            robust = robust_accuracy(found["verified_distance"], cell.final_eps) if examples else None
            failed_checks = _failed_checks(found["failed_model_checks"])
            summary = _suite_summary(cell) if cell.suite else cell.ball.attack_summary(cell.solver_spec, cell.step_rule)
            if failed_checks:
                warnings.warn(
                    f"{cell.model}, {summary}: the model failed the checks {', '.join(failed_checks)}, so its robust "
                    f"accuracy may overstate its robustness (docs/evaluate.md, 'Checks on the model')",
                    ModelCheckWarning, stacklevel=2,
                )
            box_handling = _SUITE_BOX if cell.suite else cell.ball.box_handling(cell.solver_spec, cell.clamp)
            gradient_mode = spec.gradient_mode.value
        row = {name: [value] for name, value in {**cell_columns(cell), **certify_columns(cell)}.items()}
        complete = examples == cell.n_examples
        row.update(
            cell_id=[cell.cell_id],
            gradient_mode=[gradient_mode],
            status=[(CellStatus.COMPLETE if complete else CellStatus.INCOMPLETE).value],
            n_examples=[examples],
            started_at=[started_at],
            finished_at=[datetime.datetime.now(datetime.timezone.utc)],
            seconds=[seconds],
            clean_accuracy=[self.clean_accuracy(cell)],
            robust_accuracy=[robust],
            failed_model_checks=[failed_checks],
            trained_for=[spec.trained_for.value],
            model_training=[training_summary(spec, context.weights_dir)],
            model_paper=[spec.paper],
            attack_summary=[summary],
            box_handling=[box_handling],
            ball_description=[cell.ball.description],
            config_json=[json.dumps(cell.config(), sort_keys=True)],
            package_versions_json=[json.dumps(package_versions(), sort_keys=True)],
            git_commit=[git_commit()],
            device=[str(self.device) if self.device.type == "cpu" else torch.cuda.get_device_name(self.device)],
        )
        write_shard(context.results_dir, Table.CELLS, cell.dataset, cell.model, cell.cell_id, row)
        return {name: values[0] for name, values in row.items()}

    def _certified_outcome(self, cell: Cell) -> tuple[int, float, float | None]:
        """Examples with certificates on disk, their certification seconds, and the certified accuracy at the largest radius."""
        certificates = read_cell(
            self.context.results_dir, Table.CERTIFICATES, cell.dataset, cell.model, cell.cell_id,
            ["example_index", "eps", "seconds", "radius_search_seconds", "status"],
        )
        certificates = certificates.drop_duplicates(["example_index", "eps"])
        per_example = certificates.drop_duplicates("example_index")
        seconds = float(certificates["seconds"].sum() + per_example["radius_search_seconds"].sum())
        largest = certificates[certificates["eps"] == cell.final_eps]
        robust = float((largest["status"] == CertificateStatus.CERTIFIED.value).mean()) if len(largest) else None
        return len(per_example), seconds, robust

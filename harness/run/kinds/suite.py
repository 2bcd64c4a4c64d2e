"""Suite cells: a versioned evaluation suite (:data:`~harness.attack.suite.SUITES`) on a model in a Wasserstein ball.

A block that sets ``suite`` names data set, models, ball, examples and
seed; the suite supplies every attack setting, and an attack setting beside
it is refused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np
import torch

from ...attack.model_checks import check_model
from ...attack.pgd import AttackProgress
from ...attack.spec import AttackSpec
from ...attack.suite import AttackSuite, attack_suite, evaluate_batch
from ..cells import BallBlock, Cell, CellOutcome, Shard, ball_of, check_cell_basics, check_setting, wasserstein_only
from ..fields import setting
from ..store import Table
from .attack import AttackCell, attack_outcome, examples_record

if TYPE_CHECKING:
    from ..runner import ShardProgress, ShardRunner

__all__ = ["SuiteBlock", "SuiteCell"]


@dataclass
class SuiteBlock(BallBlock):
    """What a suite block may set; the suite supplies everything else."""

    suite: str | None = None
    suite_version: int | None = setting(None, at_least=1)
    """The suite's version; the latest when unset."""


_BOX = "every member keeps pixels in [0, 1] inside its projection; every image it keeps is verified in the box"


@dataclass(frozen=True)
class SuiteCell(Cell):
    """A grid cell that runs an evaluation suite.

    Attributes
    ----------
    suite : AttackSuite
    """

    suite: AttackSuite

    marker: ClassVar[str | None] = "suite"
    block: ClassVar[type] = SuiteBlock
    table: ClassVar[Table] = Table.EXAMPLES

    @classmethod
    def foreign_settings_problem(cls, names: list[str], block: Mapping[str, Any]) -> str:
        return (
            f"{', '.join(map(repr, names))} cannot be set with suite={block['suite']!r}: the suite brings its own attacks; "
            f"a suite block sets {', '.join(sorted(cls.block_settings()))}"
        )

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], problems: list[str], where: str) -> tuple[Cell | None, set[str]]:
        before = len(problems)
        check_cell_basics(settings, problems, where)
        suite = None
        if "dataset" in settings:
            try:
                suite = attack_suite(settings["suite"], settings["dataset"], settings.get("suite_version"))
            except ValueError as error:
                problems.append(f"{where}: {error}")
        ball = ball_of(SuiteBlock, settings, problems, where)
        wasserstein_only(ball, problems, where, "suites attack Wasserstein balls")
        seed = check_setting(SuiteBlock, "seed", settings["seed"], problems, where)
        n_examples = check_setting(SuiteBlock, "n_examples", settings.get("n_examples", 1), problems, where)
        if len(problems) > before:
            return None, set()
        return cls(settings["dataset"], settings["model"], ball, seed, n_examples, suite), set()

    @property
    def label(self) -> str:
        return self.suite.label

    @property
    def final_eps(self) -> float:
        return self.suite.final_eps

    def _legacy_attack(self) -> AttackSpec:
        """The attack fields a suite cell's id has hashed since suites existed: its first member's schedule, no solver."""
        return AttackSpec(None, self.suite.members[0].schedule)

    def config(self) -> dict[str, Any]:
        return {
            "suite": self.suite.name, "suite_version": self.suite.version, "dataset": self.dataset, "model": self.model,
            **self.ball.config(), **self._legacy_attack().to_dict(), "seed": self.seed, "n_examples": self.n_examples,
        }

    def columns(self) -> dict[str, Any]:
        columns = AttackCell(self.dataset, self.model, self.ball, self.seed, self.n_examples, self._legacy_attack()).columns()
        columns.update(
            final_eps=self.final_eps, suite=self.suite.name, suite_version=self.suite.version,
            suite_json=self.suite.definition_json(),
        )
        return columns

    def run_shard(self, worker: "ShardRunner", shard: Shard, on_progress: Callable[["ShardProgress"], None] | None) -> None:
        started = time.perf_counter()
        report = worker.attack_progress(shard, started, on_progress)
        rows = shard.size
        if report is not None:
            report(0, AttackProgress(0, rows, 0, len(self.suite.members) + 2, math.nan))
        images, labels, model = worker.attack_inputs(shard)
        checks = check_model(model, images, labels)
        torch.manual_seed(self.seed)

        def on_stage(index: int, stages: int, name: str) -> None:
            report(0, AttackProgress(0, rows, index, stages, math.nan), name)

        outcome = evaluate_batch(
            model, images, labels, self.ball, self.suite, self.seed, None if report is None else on_stage, worker.verifier()
        )
        total = time.perf_counter() - started
        columns = dict(outcome.columns)
        columns.update(
            eps_found=columns["schedule_radius"],
            restart=np.full(rows, -1),
            attack_seconds=np.full(rows, (total - outcome.verify_seconds) / rows),
            verify_seconds=np.full(rows, outcome.verify_seconds / rows),
            adversarial=outcome.adversarial.detach().cpu().numpy(),
        )
        checks = checks.with_zero_gradient_steps(int(np.sum(columns["zero_gradient_steps"])))
        columns["failed_model_checks"] = [checks.names] * rows
        worker.write_attack_rows(shard, images, columns, examples_record(self, shard, columns))

    def outcome(self, worker: "ShardRunner") -> CellOutcome:
        members = ", ".join(member.name for member in self.suite.members)
        summary = (
            f"attack suite {self.suite.label}: {members}, each on the examples it can still improve; then the radius "
            f"refinement (segment line search, {self.suite.refinement.rounds} rounds of bisection over fixed-radius attacks)"
        )
        return attack_outcome(self, worker, summary, _BOX)

"""Attack cells: one :class:`~harness.attack.spec.AttackSpec` on a model in a ball, every claim verified.

A block that sets no kind's marker attacks. It names data set, models, the
ball and the attack: a solver (any registered one; none for an l_p ball),
the solver's hyperparameters (``lam``, ``tol``, ``max_iter``, ...; see
:class:`zoo.Hyperparameter`), the radius schedule, the ascent step, the
loss and restarts. A ``protocol`` (:data:`~harness.attack.spec.PROTOCOLS`)
supplies the schedule, step, ``lam`` and geometry a block does not set
itself. A setting no cell of the block uses (a hyperparameter none of its
solvers declares, a kernel size for an l_p ball) is refused with the
allowed list rather than dropped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np
import torch

import zoo
from solvers.iterate import BallIterate, StepRule

from ...attack.ball import Ball
from ...attack.evaluate import attack_and_verify
from ...attack.model_checks import ModelCheckWarning, check_model
from ...attack.pgd import AttackProgress, EpsSchedule, Loss
from ...attack.spec import PROTOCOLS, AttackSpec
from ...attack.verify import VerificationStatus, robust_accuracy
from ...vocabulary import ModelCheck
from ..cells import BallBlock, SHARED_CONFIG_COLUMNS, Cell, CellOutcome, Shard, ball_of, check_cell_basics, check_setting
from ..fields import setting
from ..store import EXAMPLES_SCHEMA, TYPED_HYPERPARAMETERS, Table, read_cell

if TYPE_CHECKING:
    from ..runner import ShardProgress, ShardRunner

__all__ = ["AttackBlock", "AttackCell", "examples_record", "failed_checks", "warn_failed_checks"]


@dataclass
class AttackBlock(BallBlock):
    """What an attack block may set (solver hyperparameters come on top); unset values come from a protocol."""

    solver: str | None = None
    protocol: str | None = None
    eps_initial: float | None = setting(None, above=0)
    eps_factor: float | None = None
    eps_every: int | None = None
    eps_increment: float | None = None
    iterations: int | None = None
    step_rule: StepRule | None = None
    step_size: float | None = setting(None, above=0)
    clamp: bool = False
    loss: Loss = Loss.CROSS_ENTROPY
    restarts: int = setting(1, at_least=1)


_PROTOCOL_HINT = f" (set it, or a protocol: {', '.join(sorted(PROTOCOLS))})"


def _protocol_presets(settings: Mapping[str, Any], problems: list[str], where: str) -> dict[str, Any]:
    """The block settings a named protocol supplies."""
    if "protocol" not in settings:
        return {}
    protocol = PROTOCOLS.get(settings["protocol"])
    if protocol is None:
        problems.append(f"{where}: protocol={settings['protocol']!r} is unknown; allowed: {', '.join(sorted(PROTOCOLS))}")
        return {}
    attack, schedule = protocol.attack, protocol.attack.schedule
    return {
        "eps_initial": schedule.initial, "eps_factor": schedule.factor, "eps_every": schedule.every,
        "eps_increment": schedule.increment, "iterations": schedule.iterations,
        "step_rule": attack.step_rule.value, "step_size": attack.step_size,
        "kernel_size": protocol.kernel_size, "p": protocol.p, **dict(attack.hyperparameters),
    }


def _solver(ball: Ball, settings: Mapping[str, Any], problems: list[str], where: str) -> zoo.SolverSpec | None:
    name = settings.get("solver")
    if not ball.takes_solver:
        if name is not None:
            problems.append(f"{where}: the {ball.kind.value} ball takes no solver (got solver={name!r})")
        return None
    registered = [spec.name for spec in zoo.solver_specs()]
    if name is None:
        problems.append(f"{where}: a {ball.kind.value} cell needs a solver; registered: {', '.join(registered)}")
        return None
    if name not in registered:
        problems.append(f"{where}: solver={name!r} is not registered; registered: {', '.join(registered)}")
        return None
    return zoo.solver_spec(name)


_SCHEDULE_DEFAULTS = {"eps_factor": 1.0, "eps_every": 1, "iterations": 1, "eps_increment": 0.0}
"""A schedule's values where neither the block nor a protocol sets them: a fixed radius, one step."""


def _schedule(settings: Mapping[str, Any], problems: list[str], where: str) -> EpsSchedule | None:
    if settings.get("eps_initial") is None:
        problems.append(f"{where}: eps_initial is not set{_PROTOCOL_HINT}")
    try:
        values = {name: settings.get(name, default) for name, default in _SCHEDULE_DEFAULTS.items()}
        return EpsSchedule(settings.get("eps_initial", 1.0), values["eps_factor"], values["eps_every"], values["iterations"],
                           values["eps_increment"])
    except ValueError as error:
        problems.append(f"{where}: {error}")
        return None


def failed_checks(per_row) -> list[str] | None:
    """Every model check that failed on some row, in the order of :class:`ModelCheck`; None when no row was checked."""
    checked = [names for names in per_row if names is not None]
    if not checked:
        return None
    failed = {name for names in checked for name in names}
    return [check.value for check in ModelCheck if check.value in failed]


def warn_failed_checks(model: str, summary: str, failed: list[str] | None) -> None:
    if failed:
        import warnings

        warnings.warn(
            f"{model}, {summary}: the model failed the checks {', '.join(failed)}, so its robust accuracy may overstate "
            f"its robustness (docs/evaluate.md, 'Checks on the model')",
            ModelCheckWarning, stacklevel=3,
        )


def examples_record(cell: Cell, shard: Shard, columns: dict[str, Any]) -> dict[str, Any]:
    """The ``examples`` rows of a shard: the cell's configuration columns beside the attack's per-example ones."""
    rows = shard.size
    record = {name: [value] * rows for name, value in cell.columns().items() if name in EXAMPLES_SCHEMA.names}
    record.update(
        cell_id=[cell.cell_id] * rows,
        gradient_mode=[zoo.model_spec(cell.model).gradient_mode.value] * rows,
        shard_id=[shard.shard_id] * rows,
        example_index=np.arange(shard.start, shard.stop),
        verification_status=[VerificationStatus(int(code)).name for code in columns["verification_status"]],
    )
    record.update({name: columns[name] for name in EXAMPLES_SCHEMA.names if name in columns and name not in record})
    return record


def attack_outcome(cell: Cell, worker: "ShardRunner", summary: str, box_handling: str) -> CellOutcome:
    """An attacking cell's summary from its ``examples`` rows on disk."""
    found = read_cell(
        worker.context.results_dir, Table.EXAMPLES, cell.dataset, cell.model, cell.cell_id,
        ["example_index", "attack_seconds", "verify_seconds", "verified_distance", "failed_model_checks"],
    )
    found = found.drop_duplicates("example_index")
    examples, seconds = len(found), float((found["attack_seconds"] + found["verify_seconds"]).sum())
    robust = robust_accuracy(found["verified_distance"], cell.final_eps) if examples else None
    failed = failed_checks(found["failed_model_checks"])
    warn_failed_checks(cell.model, summary, failed)
    return CellOutcome(
        examples, seconds, robust, summary, box_handling, zoo.model_spec(cell.model).gradient_mode.value, failed,
    )


_SUITE_COLUMNS = ("schedule_radius", "found_by", "refined_by", "rejected_claims")
"""Examples columns only a suite cell fills."""


@dataclass(frozen=True)
class AttackCell(Cell):
    """A grid cell that runs one attack and verifies every claim.

    Attributes
    ----------
    attack : AttackSpec
        The attack; its ``hyperparameters`` hold every hyperparameter the solver declares (exactly what it runs
        with, so exactly what the cell records and hashes), its step is None where the solver steps by its own rule.
    """

    attack: AttackSpec

    marker: ClassVar[str | None] = None
    block: ClassVar[type] = AttackBlock
    table: ClassVar[Table] = Table.EXAMPLES

    @classmethod
    def conditional_settings(cls, block: Mapping[str, Any]) -> set[str]:
        return (set(block) - set(cls.block_settings())) | ({"kernel_size", "p", "step_rule", "step_size"} & set(block))

    @classmethod
    def allowed_settings(cls, block: Mapping[str, Any]) -> str:
        registered = {spec.name for spec in zoo.solver_specs()}
        solvers = block.get("solver")
        solvers = solvers if isinstance(solvers, (list, tuple)) else [solvers]
        text = ", ".join(cls.block_settings())
        for name in (name for name in solvers if isinstance(name, str) and name in registered):
            declared = [h.name for h in zoo.solver_spec(name).hyperparameters]
            text += f"; hyperparameters of {name}: {', '.join(declared) or 'none'}"
        return text

    @classmethod
    def extra_settings(cls) -> set[str]:
        return {h.name for spec in zoo.solver_specs() for h in spec.hyperparameters}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], problems: list[str], where: str) -> tuple[Cell | None, set[str]]:
        before = len(problems)
        used: set[str] = set()
        check_cell_basics(settings, problems, where)
        presets = _protocol_presets(settings, problems, where)
        merged = {**presets, **settings}
        ball = ball_of(AttackBlock, {**settings, **{k: merged.get(k) for k in ("kernel_size", "p")}}, problems, where, _PROTOCOL_HINT)
        spec = None
        if ball is not None:
            spec = _solver(ball, settings, problems, where)
            if ball.takes_solver:
                used |= {"kernel_size", "p"}
        hyperparameters: dict[str, Any] = {}
        if spec is not None:
            for declared in spec.hyperparameters:
                if declared.name in settings:
                    used.add(declared.name)
                # A protocol presets the solver's lam and step_size (plan-space steps) where the block does not.
                preset = presets.get(declared.name) if declared.name in ("lam", "step_size") else None
                try:
                    value = settings.get(declared.name, declared.default if preset is None else preset)
                    hyperparameters[declared.name] = declared.check(value)
                except ValueError as error:
                    problems.append(f"{where}: {error}")
        attack_steps = spec is None or spec.kind.attack_steps
        step_rule = step_size = None
        if attack_steps:
            used |= {"step_rule", "step_size"}
            step_rule = check_setting(AttackBlock, "step_rule", merged.get("step_rule", StepRule.LINF_SIGN.value), problems, where)
            if merged.get("step_size") is None:
                problems.append(f"{where}: step_size is not set{_PROTOCOL_HINT}")
            else:
                step_size = check_setting(AttackBlock, "step_size", merged["step_size"], problems, where)
        clamp = check_setting(AttackBlock, "clamp", settings["clamp"], problems, where)
        if clamp and not (spec is not None and attack_steps):
            what = f"the plan-space solver {spec.name!r}: its iterates are feasible" if spec is not None else "an l_p ball: it clips already"
            problems.append(f"{where}: clamp=true is not allowed with {what}")
        loss = check_setting(AttackBlock, "loss", settings["loss"], problems, where)
        restarts = check_setting(AttackBlock, "restarts", settings["restarts"], problems, where)
        seed = check_setting(AttackBlock, "seed", settings["seed"], problems, where)
        n_examples = check_setting(AttackBlock, "n_examples", settings.get("n_examples", 1), problems, where)
        schedule = _schedule(merged, problems, where)
        if len(problems) > before:
            return None, used
        attack = AttackSpec(
            spec.name if spec else None, schedule, tuple(hyperparameters.items()), step_rule, step_size, clamp, loss, restarts,
        )
        return cls(settings["dataset"], settings["model"], ball, seed, n_examples, attack), used

    @property
    def label(self) -> str:
        return self.attack.solver or self.ball.kind.value

    @property
    def final_eps(self) -> float:
        return self.attack.schedule.final_eps

    def iterate(self) -> BallIterate:
        """The attack's driver for this cell (built fresh: iterates keep per-run state)."""
        return self.attack.iterate(self.ball)

    def config(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "model": self.model, **self.ball.config(), **self.attack.to_dict(),
            "seed": self.seed, "n_examples": self.n_examples,
        }

    def columns(self) -> dict[str, Any]:
        """``step_rule`` and ``step_size`` are the attack's step, or for a solver that steps by its own rule, that
        rule's hyperparameters of the same names."""
        config = self.config()
        hyperparameters = config.pop("hyperparameters")
        columns = dict.fromkeys(SHARED_CONFIG_COLUMNS)
        columns.update({name: value for name, value in config.items() if name in columns})
        columns.update({name: hyperparameters.get(name) for name in TYPED_HYPERPARAMETERS})
        if self.attack.step_rule is None:
            columns.update(step_rule=hyperparameters.get("step_rule"), step_size=hyperparameters.get("step_size"))
        columns.update(
            ball_title=self.ball.title, eps_increment=self.attack.schedule.increment, final_eps=self.final_eps,
            hyperparameters_json=json.dumps(hyperparameters, sort_keys=True),
        )
        return columns

    def run_shard(self, worker: "ShardRunner", shard: Shard, on_progress: Callable[["ShardProgress"], None] | None) -> None:
        started = time.perf_counter()
        report = worker.attack_progress(shard, started, on_progress)
        if report is not None:  # the shard has started (its model may take a while to load)
            report(0, AttackProgress(0, shard.size, 0, self.attack.schedule.iterations, self.attack.schedule.initial))
        images, labels, model = worker.attack_inputs(shard)
        # Before the seed, and changing no state the attack reads (random generators included).
        checks = check_model(model, images, labels, loss=self.attack.loss)
        torch.manual_seed(self.seed)
        attack = self.attack
        columns = attack_and_verify(
            model, images, labels, self.ball, self.iterate(), attack.schedule, batch_size=shard.size, loss=attack.loss,
            restarts=attack.restarts, seed=self.seed, on_progress=report, verify_executor=worker.verifier(),
        )
        columns.update({name: np.full(shard.size, None) for name in _SUITE_COLUMNS})
        checks = checks.with_zero_gradient_steps(int(np.sum(columns["zero_gradient_steps"])))
        columns["failed_model_checks"] = [checks.names] * shard.size
        worker.write_attack_rows(shard, images, columns, examples_record(self, shard, columns))

    def outcome(self, worker: "ShardRunner") -> CellOutcome:
        spec = self.attack.solver_spec
        return attack_outcome(
            self, worker, self.ball.attack_summary(spec, self.attack.step_rule), self.ball.box_handling(spec, self.attack.clamp),
        )

"""Certify cells: certified lower bounds on robust accuracy (:mod:`harness.certify`) instead of an attack.

A block that sets ``certifier`` (a :class:`~harness.vocabulary.Certifier`
value, or a list of them: an axis) names data set, models, the Wasserstein
ball, the ``radii`` reported (one list, not an axis), ``box``,
``time_limit`` (the complete certifier's), ``radius_rounds``, examples and
seed; an attack setting beside it is refused. A ``protocol`` supplies only
the ball's kernel size and p.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np

import zoo

from ...attack.spec import PROTOCOLS
from ...vocabulary import DATASETS, CertificateStatus, Certifier
from ..cells import BallBlock, SHARED_CONFIG_COLUMNS, Cell, CellOutcome, Shard, ball_of, check_cell_basics, check_setting, wasserstein_only
from ..fields import setting
from ..store import Table, read_cell, write_shard

if TYPE_CHECKING:
    from ...certify.run import CertifySettings
    from ..runner import ShardProgress, ShardRunner

__all__ = ["CertifyBlock", "CertifyCell", "certify_config"]


@dataclass
class CertifyBlock(BallBlock):
    """What a certify block may set; unset, ``time_limit`` and ``radius_rounds`` keep :class:`CertifySettings`' defaults."""

    certifier: Certifier | None = None
    protocol: str | None = None
    radii: list | None = None
    box: bool = True
    time_limit: float | None = setting(None, above=0)
    radius_rounds: int | None = setting(None, at_least=0)


def certify_config(settings: "CertifySettings") -> dict[str, Any]:
    """Certify settings as plain JSON values; ``time_limit`` only where the certifier has one to keep."""
    config = {
        "certifier": settings.certifier.value, "radii": list(settings.radii), "box": settings.box,
        "radius_rounds": settings.radius_rounds,
    }
    if settings.certifier is Certifier.MILP:
        config["time_limit"] = settings.time_limit
    return config


def _radii(value, problems: list[str], where: str) -> tuple[float, ...] | None:
    """A certify block's ``radii``: one number or a list of them, positive, finite, distinct and increasing."""
    if value is None:
        problems.append(f"{where}: radii is not set (no default ladder for this data set): give a list, e.g. [0.001, 0.01, 0.1]")
        return None
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    numeric = all(not isinstance(r, bool) and isinstance(r, numbers.Real) and math.isfinite(float(r)) and r > 0 for r in values)
    if not values or not numeric or values != sorted(set(values)):
        problems.append(
            f"{where}: radii={value!r} is invalid: give one list of positive, finite, distinct radii in increasing order "
            f"(e.g. {list(DATASETS['mnist'].certify_radii)}); it is not an axis"
        )
        return None
    return tuple(float(r) for r in values)


_SUMMARY = {
    Certifier.LINEAR_BOUNDS: (
        "certified lower bound, incomplete: exact support-function bounds over the ball, back-substituted through "
        "linear ReLU relaxations"
    ),
    Certifier.MILP: (
        "certified lower bound, complete: the verification problem as a mixed-integer program (ReLUs as in Tjeng et al. "
        "2019) after the linear bounds, {time_limit:g} s per example and radius"
    ),
}


@dataclass(frozen=True)
class CertifyCell(Cell):
    """A grid cell that certifies.

    Attributes
    ----------
    settings : CertifySettings
    """

    settings: "CertifySettings"

    marker: ClassVar[str | None] = "certifier"
    block: ClassVar[type] = CertifyBlock
    table: ClassVar[Table] = Table.CERTIFICATES
    unlisted_axes: ClassVar[frozenset[str]] = frozenset({"radii"})

    @classmethod
    def foreign_settings_problem(cls, names: list[str], block: Mapping[str, Any]) -> str:
        return (
            f"{', '.join(map(repr, names))} cannot be set beside certifier: they are attack settings; "
            f"a certify block sets {', '.join(sorted(cls.block_settings()))}"
        )

    @classmethod
    def missing_marker_problem(cls, names: list[str]) -> str:
        return (
            f"{', '.join(map(repr, names))} are certify settings, in a block without certifier: set "
            f"certifier ({', '.join(repr(c.value) for c in Certifier)}), or leave them out of an attack block"
        )

    @classmethod
    def conditional_settings(cls, block: Mapping[str, Any]) -> set[str]:
        return {"kernel_size", "p", "time_limit"} & set(block)

    @classmethod
    def allowed_settings(cls, block: Mapping[str, Any]) -> str:
        return f"{', '.join(sorted(cls.block_settings()))} (time_limit with certifier milp only)"

    @classmethod
    def problems_before_run(cls, cells: list[Cell]) -> list[str]:
        """Models with a layer no certificate rule covers, found from their architecture alone."""
        names = sorted({cell.model for cell in cells})
        if not names:
            return []
        from ...certify.network import PiecewiseLinearNetwork, UnsupportedNetwork

        problems = []
        for name in names:
            spec = zoo.model_spec(name)
            try:
                PiecewiseLinearNetwork.of(spec.build(), DATASETS[spec.dataset.value].shape)
            except UnsupportedNetwork as error:
                problems.append(f"model {name!r} cannot be certified: {error}; drop it from the certify blocks")
        return problems

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], problems: list[str], where: str) -> tuple[Cell | None, set[str]]:
        before = len(problems)
        check_cell_basics(settings, problems, where)
        certifier = check_setting(CertifyBlock, "certifier", settings["certifier"], problems, where)
        geometry = {}
        if "protocol" in settings:
            protocol = PROTOCOLS.get(settings["protocol"])
            if protocol is None:
                problems.append(f"{where}: protocol={settings['protocol']!r} is unknown; allowed: {', '.join(sorted(PROTOCOLS))}")
            else:
                geometry = {"kernel_size": protocol.kernel_size, "p": protocol.p}
        hint = f" (set it, or a protocol: {', '.join(sorted(PROTOCOLS))})"
        ball = ball_of(CertifyBlock, {**geometry, **settings}, problems, where, hint)
        wasserstein_only(ball, problems, where, "certificates are for the Wasserstein ball")
        # Unset, the data set's ladder (DatasetFacts.certify_radii).
        facts = DATASETS.get(settings.get("dataset"))
        radii = _radii(settings.get("radii", None if facts is None else facts.certify_radii), problems, where)
        box = check_setting(CertifyBlock, "box", settings["box"], problems, where)
        optional = {
            name: check_setting(CertifyBlock, name, settings[name], problems, where)
            for name in ("time_limit", "radius_rounds") if name in settings
        }
        seed = check_setting(CertifyBlock, "seed", settings["seed"], problems, where)
        n_examples = check_setting(CertifyBlock, "n_examples", settings.get("n_examples", 1), problems, where)
        used = {"kernel_size", "p"} | ({"time_limit"} if certifier is Certifier.MILP else set())
        if len(problems) > before:
            return None, used
        from ...certify.run import CertifySettings  # only grids that certify load the certifiers

        return cls(settings["dataset"], settings["model"], ball, seed, n_examples, CertifySettings(certifier, radii, box, **optional)), used

    @property
    def label(self) -> str:
        certifier = self.settings.certifier.value.replace("_", " ")
        return f"certified ({certifier}, {'box' if self.settings.box else 'no box'})"

    @property
    def final_eps(self) -> float:
        return self.settings.radii[-1]

    def config(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset, "model": self.model, **self.ball.config(), "certify": certify_config(self.settings),
            "seed": self.seed, "n_examples": self.n_examples,
        }

    def columns(self) -> dict[str, Any]:
        config = certify_config(self.settings)
        columns = dict.fromkeys(SHARED_CONFIG_COLUMNS)
        columns.update(self.ball.config(), ball_title=self.ball.title, final_eps=self.final_eps, seed=self.seed)
        columns.update({name: config.get(name) for name in ("certifier", "box", "time_limit", "radius_rounds")})
        return columns

    def run_shard(self, worker: "ShardRunner", shard: Shard, on_progress: Callable[["ShardProgress"], None] | None) -> None:
        """:func:`~harness.certify.run.certify_batch` on the shard's images, one certificates row per example and radius."""
        from ...certify.run import certify_batch  # attack-only workers never load the certifiers

        rows, radii = shard.size, self.settings.radii
        started = time.perf_counter()

        def report(done: bool) -> None:  # the certifier reports nothing while it runs: the shard's start and end
            if on_progress is not None:
                stage = "certified" if done else f"certifying at {len(radii)} radii"
                on_progress(worker.progress(shard, rows if done else 0, 0, 1, radii[-1], started, stage))

        report(done=False)
        images, labels = worker.examples(shard)
        batch = certify_batch(worker.cpu_model(self.model), images.cpu(), labels.cpu(), self.ball.transport, self.settings)
        # What the ladder's timings do not cover (the bisection of the certified radius, reading the network), per example.
        rest = max(time.perf_counter() - started - float(batch.seconds.sum()), 0.0) / rows
        settings = {
            name: value for name, value in self.columns().items()
            if name in ("threat_model", "ball_title", "kernel_size", "p", "certifier", "box", "time_limit", "radius_rounds")
        }
        count = rows * len(radii)  # rows of the table: example-major, radii in increasing order
        record = {name: [value] * count for name, value in settings.items()}
        per_example = np.repeat(np.arange(rows), len(radii))
        record.update(
            cell_id=[self.cell_id] * count,
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
        write_shard(worker.context.results_dir, Table.CERTIFICATES, self.dataset, self.model, shard.shard_id, record)
        report(done=True)

    def outcome(self, worker: "ShardRunner") -> CellOutcome:
        """Examples with certificates on disk, their certification seconds, and the certified accuracy at the largest
        radius."""
        certificates = read_cell(
            worker.context.results_dir, Table.CERTIFICATES, self.dataset, self.model, self.cell_id,
            ["example_index", "eps", "seconds", "radius_search_seconds", "status"],
        )
        certificates = certificates.drop_duplicates(["example_index", "eps"])
        per_example = certificates.drop_duplicates("example_index")
        seconds = float(certificates["seconds"].sum() + per_example["radius_search_seconds"].sum())
        largest = certificates[certificates["eps"] == self.final_eps]
        robust = float((largest["status"] == CertificateStatus.CERTIFIED.value).mean()) if len(largest) else None
        refinement = (
            f"; then {self.settings.radius_rounds} rounds of bisection of each example's certified radius"
            if self.settings.radius_rounds else ""
        )
        radii = ", ".join(f"{radius:g}" for radius in self.settings.radii)
        summary = _SUMMARY[self.settings.certifier].format(time_limit=self.settings.time_limit) + f", at radii {radii}{refinement}"
        box = (
            "the certified ball keeps pixels in [0, 1], as the attacks' verification does" if self.settings.box
            else "the certified ball ignores the pixel bound 1: a larger ball, so its certificates hold with the box too"
        )
        return CellOutcome(len(per_example), seconds, robust, summary, box)

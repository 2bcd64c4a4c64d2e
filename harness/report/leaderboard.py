"""The numbers of the leaderboard, computed from the store's tables alone.

A leaderboard table holds the models attacked under one threat model: a data
set, a ball (Wasserstein with its kernel size and cost exponent p, or an
l_p ball), and every attack run against it (solvers, lambdas, schedules).
A model's robustness is the worst case over those attacks, example by
example: example ``i`` is robust at radius ``r`` when no attack found a
*verified* adversarial example within ``r`` (the exact distance of
:mod:`harness.attack.verify`), and at least one attack searched up to ``r``. Where
some unbroken example was never searched up to ``r``, the robust accuracy
at ``r`` is unknown (NaN), never guessed.

Certificates (the store's ``certificates`` table) bound the same number from
below: example ``i`` is certified at ``r`` when its certified radius is at
least ``r`` (a certificate at a radius covers every smaller ball). Where a
model has them, its leaderboard row shows both bounds, and
:func:`certificate_table` sets them side by side at the certified radii.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

import zoo

from ..vocabulary import STANDARD_RADII, CellStatus, CertificateStatus, Certifier, ModelCheck, VerificationStatus

__all__ = [
    "KNOWN_EXACTLY_TOLERANCE",
    "STANDARD_RADII",
    "ThreatGroup",
    "VerificationCounts",
    "attack_label",
    "cell_label",
    "certificate_groups",
    "certificate_table",
    "certificate_violations",
    "certified_radii",
    "chosen_certificates",
    "failed_model_checks",
    "headline_examples",
    "known_exactly",
    "leaderboard",
    "model_curves",
    "radius_label",
    "robust_accuracy_at",
    "solver_table",
    "threat_groups",
    "worst_case",
]

_VERIFIED = VerificationStatus.VERIFIED.name
_CLEAN_MISCLASSIFIED = VerificationStatus.CLEAN_MISCLASSIFIED.name
_BPDA = zoo.GradientMode.BPDA_STRAIGHT_THROUGH.value


@dataclass(frozen=True)
class ThreatGroup:
    """A data set and a ball: the rows of one leaderboard table.

    ``ball_title`` and ``ball_description`` are the words the store keeps
    for the ball (written by the attack's threat-model object); they do not
    take part in comparisons.
    """

    dataset: str
    threat_model: str
    kernel_size: int | None = None
    p: float | None = None
    ball_title: str = field(default="", compare=False)
    ball_description: str = field(default="", compare=False)

    @property
    def slug(self) -> str:
        parts = [self.dataset, self.threat_model]
        if self.kernel_size is not None:
            parts += [f"k{self.kernel_size}", f"p{self.p:g}"]
        return "-".join(parts).replace(".", "_")

    @property
    def title(self) -> str:
        return f"{self.dataset}: {self.ball_title or self.threat_model}"

    def select(self, frame: pd.DataFrame) -> pd.Series:
        """Rows of ``frame`` (examples or cells) that belong to this group."""
        mask = (frame["dataset"] == self.dataset) & (frame["threat_model"] == self.threat_model)
        if self.kernel_size is None:
            return mask & frame["kernel_size"].isna()
        return mask & (frame["kernel_size"] == self.kernel_size) & (frame["p"] == self.p)

    def radii(self, largest_attacked: float) -> tuple[float, ...]:
        """The standard radii, or fractions of the largest radius attacked for an unlisted pair."""
        known = STANDARD_RADII.get((self.dataset, self.threat_model))
        if known is not None:
            return known
        return tuple(float(f"{largest_attacked * fraction:.2g}") for fraction in (0.25, 0.5, 1.0))


def threat_groups(examples: pd.DataFrame, cells: pd.DataFrame | None = None) -> list[ThreatGroup]:
    """Every group in ``examples``, the one with most examples of each data set first.

    Titles come from the examples' ``ball_title``, descriptions from the
    cells' ``ball_description`` where the cells table has them.
    """
    counts: dict[ThreatGroup, int] = {}
    columns = ["dataset", "threat_model", "kernel_size", "p"]
    for (dataset, threat, kernel_size, p), rows in examples.groupby(columns, dropna=False):
        geometry = {} if pd.isna(kernel_size) else {"kernel_size": int(kernel_size), "p": float(p)}
        group = ThreatGroup(dataset, threat, **geometry)
        description = _first(cells.loc[group.select(cells), "ball_description"]) if cells is not None and len(cells) else None
        group = replace(group, ball_title=_first(rows["ball_title"]) or "", ball_description=description or "")
        counts[group] = len(rows)
    return sorted(counts, key=lambda g: (g.dataset, -counts[g], g.threat_model, g.kernel_size or 0, g.p or 0))


def certificate_groups(certificates: pd.DataFrame) -> list[ThreatGroup]:
    """Every data set and ball of the ``certificates`` table, in sorted order."""
    groups = []
    for (dataset, threat, kernel_size, p), rows in certificates.groupby(["dataset", "threat_model", "kernel_size", "p"]):
        groups.append(ThreatGroup(dataset, threat, int(kernel_size), float(p), ball_title=_first(rows["ball_title"]) or ""))
    return groups


def radius_label(value: float) -> str:
    """How a radius is written in tables: ``k/255`` for the small l_inf radii that are such, else ``%g``."""
    in_255ths = value * 255
    if value < 0.1 and abs(in_255ths - round(in_255ths)) < 1e-9:
        return f"{round(in_255ths)}/255"
    return f"{value:g}"


def worst_case(examples: pd.DataFrame) -> pd.DataFrame:
    """Per example index: the smallest verified distance over all attacks, and the largest radius searched."""
    # Grouping two columns, not the frame: the other columns would be reordered for nothing.
    grouped = examples.groupby("example_index")
    return pd.DataFrame({"verified_distance": grouped["verified_distance"].min(), "reach": grouped["final_eps"].max()})


def robust_accuracy_at(per_example: pd.DataFrame, radius: float) -> float:
    """Fraction robust at ``radius`` (see the module docstring); NaN when not known."""
    if per_example.empty:
        return math.nan
    unbroken = per_example["verified_distance"] > radius
    if (unbroken & (per_example["reach"] < radius)).any():
        return math.nan
    return float(unbroken.mean())


KNOWN_EXACTLY_TOLERANCE = 0.1
"""An example's minimal adversarial radius counts as known exactly when its certified radius is at least its
verified radius divided by ``1 +`` this: the true minimal radius then lies in a bracket at most 10% wide."""


def chosen_certificates(certificates: pd.DataFrame) -> pd.DataFrame:
    """The rows of one certify cell per model, ball and certifier: the one with the box where both ran, then the one
    with most examples.

    Certificates of the ball without the box hold in the boxed ball too (it is a larger set), but those of the boxed
    ball, the one the attacks' verification checks, are the tighter.
    """
    if certificates.empty:
        return certificates
    keys = ["dataset", "model", "threat_model", "kernel_size", "p", "certifier"]
    cells = certificates.groupby([*keys, "cell_id", "box"], as_index=False).agg(examples=("example_index", "nunique"))
    cells = cells.sort_values(["box", "examples", "cell_id"], ascending=[False, False, True], kind="stable")
    chosen = cells.drop_duplicates(keys)["cell_id"]
    return certificates[certificates["cell_id"].isin(chosen)]


def certified_radii(certificates: pd.DataFrame) -> pd.Series:
    """Per example index, the largest radius these certificates prove (0 where none).

    An example certified at a radius of a cell's ladder has a certified radius at least that large, so
    ``certified_radii(rows) >= r`` is its certificate at ``r``, at the ladder's radii and between them.
    """
    return certificates.groupby("example_index")["certified_radius"].max()


def known_exactly(certified: pd.Series, per_example: pd.DataFrame) -> float:
    """Share of the examples in both ``certified`` (:func:`certified_radii`) and ``per_example`` (:func:`worst_case`)
    whose minimal adversarial radius is bracketed within :data:`KNOWN_EXACTLY_TOLERANCE`; NaN when they share none."""
    shared = certified.index.intersection(per_example.index)
    if shared.empty:
        return math.nan
    verified = per_example.loc[shared, "verified_distance"]
    return float((certified.loc[shared] >= verified / (1 + KNOWN_EXACTLY_TOLERANCE)).mean())


def certificate_violations(examples: pd.DataFrame, certificates: pd.DataFrame) -> pd.DataFrame:
    """Every certificate that a verified attack contradicts: a bug in a certifier or in the verification.

    Parameters
    ----------
    examples : DataFrame
        The ``examples`` table.
    certificates : DataFrame
        The ``certificates`` table.

    Returns
    -------
    DataFrame
        One row per (model, ball, example, radius the example is certified at, attack cell) where that attack has a
        verified adversarial example within the radius (status VERIFIED, ``verified_distance <= eps``). The radii
        are those of rows with status certified and each example's certified radius. Columns: ``dataset``,
        ``model``, ``threat_model``, ``kernel_size``, ``p``, ``example_index``, ``eps``, ``certify_cell_id``,
        ``certifier``, ``box``, ``attack_cell_id``, ``verified_distance``; empty when there is no contradiction.
    """
    ball = ["dataset", "model", "threat_model", "kernel_size", "p"]
    columns = [*ball, "example_index", "eps", "certify_cell_id", "certifier", "box", "attack_cell_id", "verified_distance"]
    if examples.empty or certificates.empty:
        return pd.DataFrame(columns=columns)
    proven_columns = [*ball, "example_index", "eps", "cell_id", "certifier", "box"]
    at_ladder = certificates.loc[certificates["status"] == CertificateStatus.CERTIFIED.value, proven_columns]
    radii = certificates.drop_duplicates(["cell_id", "example_index"])
    radii = radii[radii["certified_radius"] > 0].assign(eps=radii["certified_radius"])[proven_columns]
    proven = pd.concat([at_ladder, radii]).drop_duplicates().rename(columns={"cell_id": "certify_cell_id"})
    broken = examples.loc[examples["verification_status"] == _VERIFIED, [*ball, "example_index", "cell_id", "verified_distance"]]
    broken = broken.rename(columns={"cell_id": "attack_cell_id"})
    # Kernel size is an integer column in one table and may hold nulls (l_p balls), so floats, in the other.
    proven, broken = (frame.astype({"kernel_size": "float64", "p": "float64"}) for frame in (proven, broken))
    key = [*ball, "example_index"]
    # Only a certificate that the example's smallest verified distance contradicts meets every attack on it: joined
    # whole, an example's certify cells and radii times its attack cells grow with the square of the cells.
    smallest = broken.groupby(key, dropna=False)["verified_distance"].min().rename("smallest").reset_index()
    suspect = proven.merge(smallest, on=key)
    suspect = suspect.loc[suspect["smallest"] <= suspect["eps"]].drop(columns="smallest")
    joined = suspect.merge(broken, on=key)
    violated = joined[joined["verified_distance"] <= joined["eps"]]
    return violated[columns].sort_values([*ball, "example_index", "eps", "attack_cell_id"]).reset_index(drop=True)


def attack_label(solver, clamp, lam, step_rule=None, suite=None, suite_version=None) -> str:
    """How an attack (or an evaluation suite, with its version) is named in tables and legends."""
    if not pd.isna(suite):
        return f"{suite} v{int(suite_version)}"
    if pd.isna(solver):
        return f"PGD ({step_rule})" if step_rule else "PGD"
    label = str(solver) + (" +clamp" if bool(clamp) else "")
    if lam is not None and not (isinstance(lam, float) and math.isnan(lam)):
        label += f" λ={lam:g}"
    return label


_LABEL_COLUMNS = ["solver", "clamp", "lam", "step_rule", "suite", "suite_version"]
"""The columns :func:`cell_label` reads."""
_WORST_CASE_COLUMNS = ["example_index", "verified_distance", "final_eps"]
"""The columns :func:`worst_case` reads."""


def cell_label(cell_examples: pd.DataFrame) -> str:
    """The :func:`attack_label` of the one cell these examples come from."""
    first = cell_examples.iloc[0]
    return attack_label(first["solver"], first["clamp"], first["lam"], first["step_rule"], first.get("suite"), first.get("suite_version"))


def headline_examples(examples: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The rows a leaderboard headline is computed from, and the suite they come from.

    When any row comes from an evaluation suite, the headline is that suite
    alone (its latest version: versions never mix); otherwise it is the
    worst case over every attack, and the suite is None.
    """
    if "suite" not in examples or not examples["suite"].notna().any():
        return examples, None
    suites = examples[examples["suite"].notna()]
    # The standard suite first, then the latest version of it.
    name = "standard" if (suites["suite"] == "standard").any() else sorted(suites["suite"].unique())[0]
    version = int(suites.loc[suites["suite"] == name, "suite_version"].max())
    chosen = suites[(suites["suite"] == name) & (suites["suite_version"] == version)]
    return chosen, attack_label(None, False, None, None, name, version)


def _claimed(examples: pd.DataFrame) -> pd.Series:
    """Successes the attack claimed on examples the model classified correctly."""
    return examples["success"].fillna(False).astype(bool) & (examples["verification_status"] != _CLEAN_MISCLASSIFIED)


@dataclass(frozen=True)
class VerificationCounts:
    """Claimed successes on correctly classified examples, and how many passed exact verification."""

    claimed: int
    verified: int

    @classmethod
    def of(cls, examples: pd.DataFrame) -> "VerificationCounts":
        return cls(int(_claimed(examples).sum()), int((examples["verification_status"] == _VERIFIED).sum()))

    @property
    def fraction(self) -> float:
        return self.verified / self.claimed if self.claimed else math.nan


def _median(values: pd.Series) -> float:
    return float(np.median(values.to_numpy(dtype=np.float64))) if len(values) else math.nan


@dataclass
class LeaderboardTable:
    """One table: a threat group, the radii reported, the rank radius, the largest radius searched, one row per model."""

    group: ThreatGroup
    radii: tuple[float, ...]
    reference_radius: float | None
    """The largest standard radius at which every row's robust accuracy is known (ties in rank, the solver table)."""
    largest_radius: float
    attacks: dict[str, list[float]]
    """Attack families (solver, with +clamp when clamped, or PGD and its step) and the lambdas each ran with."""
    schedules: list[str]
    rows: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    certified: bool = False
    """Whether some row has certificates: its ``certified`` column holds certified accuracy at each radius."""


def _flags(examples: pd.DataFrame, cells: pd.DataFrame, checked: pd.DataFrame) -> list[tuple[str, str]]:
    """The reliability flags of one model's row: ``(label, explanation)``.

    ``examples`` are the rows its numbers come from; ``checked`` all of its rows on the ball, whose failed model checks
    describe the model whichever attack ran them.
    """
    flags = []
    unconverged = int(examples["unconverged_steps"].sum())
    if unconverged:
        flags.append(("unconverged", f"{unconverged} attack steps whose projection did not converge"))
    failed = int(examples["failed_steps"].sum())
    if failed:
        flags.append(("failed steps", f"{failed} attack steps whose solver failed"))
    zero = int(examples["zero_gradient_steps"].sum())
    if zero:
        flags.append((
            "zero gradients",
            f"{zero} attack steps with a zero input gradient (model check {ModelCheck.ZERO_GRADIENT_STEPS.value}): "
            f"{ModelCheck.ZERO_GRADIENT_STEPS.consequence}",
        ))
    rejected = examples[_claimed(examples) & (examples["verification_status"] != _VERIFIED)]
    if len(rejected):
        reasons = ", ".join(f"{status} {count}" for status, count in rejected["verification_status"].value_counts().items())
        flags.append((f"{len(rejected)} rejected", f"{len(rejected)} claimed successes failed exact verification ({reasons})"))
    rejected_in_suite = int(examples["rejected_claims"].fillna(0).sum()) if "rejected_claims" in examples else 0
    if rejected_in_suite:
        flags.append((
            f"{rejected_in_suite} rejected",
            f"{rejected_in_suite} claims of the suite's attacks failed exact verification (the radii count only verified ones)",
        ))
    for check in failed_model_checks(checked):
        flags.append((check.value.replace("_", " "), f"model check {check.value} failed: {check.consequence}"))
    if (examples["gradient_mode"] == _BPDA).any():
        flags.append(("BPDA", "input gradients approximated (straight-through BPDA): an upper bound on robustness"))
    if len(cells) and (cells["status"] != CellStatus.COMPLETE.value).any():
        flags.append((CellStatus.INCOMPLETE.value, "some of this model's cells did not finish; rerun the grid to complete them"))
    return flags


def failed_model_checks(examples: pd.DataFrame) -> list[ModelCheck]:
    """The model checks that failed on any of these rows, in the order of :class:`ModelCheck`.

    :attr:`ModelCheck.ZERO_GRADIENT_STEPS` is left out: the ``zero gradients``
    flag counts those steps, in older stores too.
    """
    if "failed_model_checks" not in examples:
        return []
    failed = set(examples["failed_model_checks"].explode().dropna())
    return [check for check in ModelCheck if check.value in failed and check is not ModelCheck.ZERO_GRADIENT_STEPS]


_MODEL_METADATA = {"trained_for": "trained_for", "training": "model_training", "paper": "model_paper", "clean_accuracy": "clean_accuracy"}


def _strongest(attacks: dict[str, pd.DataFrame], radius: float | None) -> str:
    """The attack whose own median verified radius is smallest; ties: lower robust accuracy at ``radius``."""

    def score(label):
        per_example = attacks[label]
        at_radius = robust_accuracy_at(per_example, radius) if radius is not None else math.nan
        return (_median(per_example["verified_distance"]), math.inf if math.isnan(at_radius) else at_radius, label)

    return min(attacks, key=score)


def _first(values: pd.Series):
    present = values.dropna()
    return present.iloc[0] if len(present) else None


def leaderboard(
    examples: pd.DataFrame, cells: pd.DataFrame, group: ThreatGroup, certificates: pd.DataFrame | None = None
) -> LeaderboardTable:
    """The leaderboard table of one threat group.

    Parameters
    ----------
    examples : DataFrame
        The ``examples`` table.
    cells : DataFrame
        The ``cells`` table (clean accuracy, model metadata, status).
    group : ThreatGroup
    certificates : DataFrame, optional
        The ``certificates`` table. A model with certificates on the group's
        ball gets, beside its (attacked) robust accuracy at each radius,
        ``certified``: the share of its certified examples certified at
        each radius (the :func:`chosen_certificates`, each example counted
        certified when any of them proves it), ``certified_examples`` and
        ``known_exactly`` (:func:`known_exactly`).

    Returns
    -------
    LeaderboardTable
        Rows sorted by rank: median verified radius descending (the radius
        at which half of the examples are broken; infinite when more than
        half survive the whole search), ties broken by robust accuracy at the
        reference radius (the largest standard radius known for every model)
        descending. A fixed radius alone would rank a model that is broken
        early but keeps a few survivors above one that is broken late.
    """
    everything = examples[group.select(examples)]
    mine, suite = headline_examples(everything)
    # Certify cells have rows of their own below; the attacks' flags and metadata come from attack cells.
    my_cells = cells[group.select(cells) & cells["certifier"].isna()] if len(cells) else cells
    my_certificates = chosen_certificates(certificates[group.select(certificates)]) if certificates is not None else None
    largest = float(mine["final_eps"].max())
    radii = group.radii(largest)
    rows, attacks_of = [], {}
    for model, model_examples in mine.groupby("model"):
        per_example = worst_case(model_examples)
        model_cells = my_cells[my_cells["model"] == model] if len(my_cells) else my_cells
        counts = VerificationCounts.of(model_examples)
        # Each cell's rows with the columns they are scored on only: a group copies every column it has.
        attacks_of[model] = {
            cell_label(attack_examples): worst_case(attack_examples)
            for _, attack_examples in model_examples[["cell_id", *_LABEL_COLUMNS, *_WORST_CASE_COLUMNS]].groupby("cell_id")
        }
        seconds = float((model_examples["attack_seconds"] + model_examples["verify_seconds"]).sum())
        metadata = {name: _first(model_cells[column]) if len(model_cells) else None for name, column in _MODEL_METADATA.items()}
        row = {
            "model": model,
            **metadata,
            "evaluation": suite or f"worst case of {model_examples['cell_id'].nunique()} attacks",
            "median_radius": _median(per_example["verified_distance"]),
            "examples": len(per_example),
            "attacks": model_examples["cell_id"].nunique(),
            "claimed": counts.claimed,
            "verified": counts.verified,
            "fraction_verified": counts.fraction,
            "seconds": seconds,
            "seconds_per_example": seconds / len(model_examples),
            "flags": _flags(model_examples, model_cells, everything[everything["model"] == model]),
        }
        for radius in radii:
            row[radius] = robust_accuracy_at(per_example, radius)
        certified = (
            certified_radii(my_certificates[my_certificates["model"] == model]) if my_certificates is not None
            else pd.Series(dtype=np.float64)
        )
        if len(certified):
            row.update(
                certified={radius: float((certified >= radius).mean()) for radius in radii},
                certified_examples=len(certified),
                known_exactly=known_exactly(certified, per_example),
            )
        else:
            row.update(certified=None, certified_examples=0, known_exactly=math.nan)
        rows.append(row)
    known = [r for r in radii if all(not math.isnan(row[r]) for row in rows)]
    reference_radius = max(known) if known else None
    notes = []
    for row in rows:
        model_rows = mine[mine["model"] == row["model"]]
        row["best_attack"] = _main_finder(model_rows) if suite is not None else _strongest(attacks_of[row["model"]], reference_radius)
    if suite is not None:
        without = sorted(set(everything["model"]) - set(mine["model"]))
        notes.append(
            f"the headline is the {suite} evaluation suite (one verified minimal radius per example); single attacks are "
            "in the solver table" + (f"; models without a {suite} evaluation: {', '.join(without)}" if without else "")
        )
    frame = pd.DataFrame(rows)
    sort_key = ["median_radius", reference_radius] if reference_radius is not None else ["median_radius"]
    frame = frame.sort_values(sort_key + ["model"], ascending=[False] * len(sort_key) + [True], kind="stable")
    scores = frame[sort_key].apply(tuple, axis=1)
    frame["rank"] = [1 + sum(other > score for other in scores) for score in scores]
    frame = frame.reset_index(drop=True)
    if reference_radius is None:
        notes.append("no standard radius was searched for every model: ties in median radius stay tied")
    attacks: dict[str, list[float]] = {}
    described = mine[["solver", "clamp", "lam", "step_rule", "suite", "suite_version"]].drop_duplicates()
    for solver, clamp, lam, step_rule, suite_name, version in described.itertuples(index=False):
        lambdas = attacks.setdefault(attack_label(solver, clamp, None, step_rule, suite_name, version), [])
        if not pd.isna(lam):
            lambdas.append(float(lam))
    attacks = {label: sorted(attacks[label]) for label in sorted(attacks)}
    single = mine[mine["suite"].isna()]
    schedules = sorted({
        f"eps {e0:g} x{f:g}{'' if pd.isna(inc) or not inc else f' +{inc:g}'} every {every} of {it} steps (largest {fe:.3g})"
        for e0, f, inc, every, it, fe in single[["eps_initial", "eps_factor", "eps_increment", "eps_every", "iterations", "final_eps"]]
        .drop_duplicates().itertuples(index=False)
    })
    if suite is not None:
        schedules.insert(0, f"{suite}: each member's schedule and budget are in the rows' suite_json (largest radius {largest:.3g})")
    certified = bool(frame["certified"].notna().any())
    if certified:
        notes.append(
            "[certified, attacked]: a certified lower bound (the share of the certified examples that a certificate proves "
            "robust at that radius) and the attacked upper bound; known exactly: the share of the examples both ran on "
            f"whose certified radius is within {100 * KNOWN_EXACTLY_TOLERANCE:g}% of the verified one"
        )
    return LeaderboardTable(group, radii, reference_radius, largest, attacks, schedules, frame, notes, certified)


def _main_finder(suite_examples: pd.DataFrame) -> str:
    """The suite member that found the smallest radius of most of these examples, with its share of the broken ones."""
    found = suite_examples.loc[suite_examples["found_by"].notna() & (suite_examples["found_by"] != ""), "found_by"]
    if found.empty:
        return "–"
    counts = found.value_counts()
    return f"{counts.index[0]} ({100 * counts.iloc[0] / len(found):.0f}% of minimal radii)"


def model_curves(examples: pd.DataFrame, by: list[str], points: int = 120) -> pd.DataFrame:
    """Robust accuracy against radius, worst case over the attacks within each ``by`` group.

    Returns a long frame with the ``by`` columns, ``eps`` and
    ``robust_accuracy``; each curve stops at the largest radius searched.
    """
    parts = []
    for key, rows in examples.groupby(by, dropna=False):
        per_example = worst_case(rows)
        reach = float(per_example["reach"].min())
        grid = np.linspace(0.0, reach, points)
        distances = np.sort(per_example["verified_distance"].to_numpy(dtype=np.float64))
        robust = 1.0 - np.searchsorted(distances, grid, side="right") / len(distances)
        part = pd.DataFrame({"eps": grid, "robust_accuracy": robust})
        for name, value in zip(by, key if isinstance(key, tuple) else (key,)):
            part[name] = value
        parts.append(part)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=by + ["eps", "robust_accuracy"])


_SOLVER_TABLE_COLUMNS = [
    "cell_id", "model", *_LABEL_COLUMNS, *_WORST_CASE_COLUMNS, "success", "verification_status", "steps", "solver_iterations",
    "unconverged_steps", "attack_seconds", "verify_seconds",
]
"""The columns :func:`solver_table` reads (a group copies every column it has)."""


def solver_table(examples: pd.DataFrame, tables: list[LeaderboardTable]) -> pd.DataFrame:
    """One row per cell (attack on a model): its own robust accuracy, verification rate and cost."""
    rows = []
    for table in tables:
        mine = examples.loc[table.group.select(examples), _SOLVER_TABLE_COLUMNS]
        for cell_id, cell_examples in mine.groupby("cell_id"):
            per_example = worst_case(cell_examples)
            counts = VerificationCounts.of(cell_examples)
            steps = int(cell_examples["steps"].sum())
            rows.append({
                "threat": table.group.title,
                "attack": cell_label(cell_examples),
                "model": cell_examples["model"].iloc[0],
                "radius": table.reference_radius,
                "robust_accuracy": robust_accuracy_at(per_example, table.reference_radius) if table.reference_radius is not None else math.nan,
                "median_radius": _median(per_example["verified_distance"]),
                "claimed": counts.claimed,
                "verified": counts.verified,
                "fraction_verified": counts.fraction,
                "seconds_per_example": float((cell_examples["attack_seconds"] + cell_examples["verify_seconds"]).mean()),
                "iterations_per_step": float(cell_examples["solver_iterations"].sum()) / steps if steps else math.nan,
                "unconverged_steps": int(cell_examples["unconverged_steps"].sum()),
                "examples": len(per_example),
                "cell_id": cell_id,
            })
    return pd.DataFrame(rows)


def certificate_table(examples: pd.DataFrame, certificates: pd.DataFrame) -> pd.DataFrame:
    """Certified and attacked robust accuracy at the certified radii: one row per ball, model and radius.

    For each model and ball, the :func:`chosen_certificates` (one cell per
    certifier) and the attacks of its leaderboard row (the headline suite,
    or every attack) are compared on the examples all of them ran on.

    Returns
    -------
    DataFrame
        ``threat``, ``model``, ``radius``, ``examples``; for each
        :class:`~harness.vocabulary.Certifier` ``c``, ``certified_<c>`` (the
        share certified at the radius; NaN where ``c`` did not run) and
        ``seconds_<c>`` (its mean seconds per example evaluated at that
        radius); ``certified`` (by any of them), ``attacked`` (the share
        whose verified radius exceeds the radius; NaN without attacks or
        where they did not search that far), ``gap`` (attacked minus
        certified: the share undecided) and ``known_exactly`` (the model's,
        over all radii: :func:`known_exactly`).
    """
    rows = []
    chosen = chosen_certificates(certificates)
    for group in certificate_groups(chosen):
        attacked = headline_examples(examples[group.select(examples)])[0] if len(examples) else examples
        for model, model_certificates in chosen[group.select(chosen)].groupby("model"):
            by_certifier = dict(tuple(model_certificates.groupby("certifier")))
            model_attacks = attacked[attacked["model"] == model] if len(attacked) else attacked
            per_example = worst_case(model_attacks) if len(model_attacks) else None
            covered = [set(frame["example_index"]) for frame in by_certifier.values()]
            covered += [set(per_example.index)] if per_example is not None else []
            shared = sorted(set.intersection(*covered))
            if not shared:
                continue
            radii_by_certifier = {name: certified_radii(frame).loc[shared] for name, frame in by_certifier.items()}
            best = pd.concat(radii_by_certifier.values(), axis=1).max(axis=1)
            exact = known_exactly(best, per_example) if per_example is not None else math.nan
            for radius in sorted(model_certificates["eps"].unique()):
                row = {"threat": group.title, "model": model, "radius": float(radius), "examples": len(shared)}
                for certifier in Certifier:
                    row[f"certified_{certifier.value}"] = row[f"seconds_{certifier.value}"] = math.nan
                    frame = by_certifier.get(certifier.value)
                    if frame is None:
                        continue
                    row[f"certified_{certifier.value}"] = float((radii_by_certifier[certifier.value] >= radius).mean())
                    # Seconds of the examples the certifier evaluated at this radius (not those decided below it).
                    evaluated = frame[(frame["eps"] == radius) & frame["example_index"].isin(shared) & frame["margin_lower"].notna()]
                    if len(evaluated):
                        row[f"seconds_{certifier.value}"] = float(evaluated["seconds"].mean())
                row["certified"] = float((best >= radius).mean())
                row["attacked"] = robust_accuracy_at(per_example.loc[shared], radius) if per_example is not None else math.nan
                row["gap"] = row["attacked"] - row["certified"]
                row["known_exactly"] = exact
                rows.append(row)
    return pd.DataFrame(rows)

"""Hand-made result stores: cells whose verified distances (or certified radii) the test chooses."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np

from harness.run.store import CELLS_SCHEMA, TYPED_HYPERPARAMETERS, Table, write_shard
from harness.vocabulary import BallKind, CellStatus, CertificateStatus, VerificationStatus

PAPER_SCHEDULE = {"eps_initial": 0.3, "eps_factor": 1.1, "eps_every": 10, "iterations": 200}
"""Largest radius 0.3 * 1.1**19 = 1.83."""


def _final_eps(schedule: dict) -> float:
    return schedule["eps_initial"] * schedule["eps_factor"] ** ((schedule["iterations"] - 1) // schedule["eps_every"])


def _hyperparameters(**values) -> dict:
    present = {name: value for name, value in values.items() if value is not None}
    typed = {name: present.get(name) for name in TYPED_HYPERPARAMETERS}
    return {**typed, "hyperparameters_json": json.dumps(present, sort_keys=True)}


def attack(solver="projected_sinkhorn_box", lam=1000.0, clamp=False, kernel_size=5, p=1.0, **schedule) -> dict:
    """The configuration columns of a Wasserstein attack."""
    schedule = schedule or PAPER_SCHEDULE
    return {
        "threat_model": BallKind.WASSERSTEIN.value, "ball_title": f"W{kernel_size}p{p:g} ball", "solver": solver,
        "kernel_size": kernel_size, "p": p, **_hyperparameters(lam=lam), "step_rule": "linf_sign", "step_size": 0.1,
        "clamp": clamp, "loss": "cross_entropy", "restarts": 1, "seed": 0, **schedule, "final_eps": _final_eps(schedule),
        **_NO_SUITE,
    }


def suite_evaluation(version: int = 1, kernel_size=5, p=1.0) -> dict:
    """The configuration columns of a cell that ran the ``standard`` suite (version ``version``)."""
    config = attack(solver=None, lam=None, kernel_size=kernel_size, p=p, eps_initial=0.005, eps_factor=1.1, eps_every=3, iterations=200)
    return {
        **config, "step_rule": None, "step_size": None, "final_eps": 2.7, "suite": "standard", "suite_version": version,
        "suite_json": json.dumps({"name": "standard", "version": version}),
    }


_NO_SUITE = {"eps_increment": 0.0, "suite": None, "suite_version": None, "suite_json": None}
_NO_CERTIFIER = {"certifier": [None], "box": [None], "time_limit": [None], "radius_rounds": [None]}


def norm_attack(threat_model="linf", eps=0.4, iterations=40) -> dict:
    """The configuration columns of a fixed-radius l_p PGD attack (no solver, kernel or p)."""
    schedule = {"eps_initial": eps, "eps_factor": 1.0, "eps_every": iterations, "iterations": iterations}
    return {
        "threat_model": threat_model, "ball_title": f"{threat_model} ball", "solver": None, "kernel_size": None,
        "p": None, **_hyperparameters(), "step_rule": "linf_sign", "step_size": 0.01, "clamp": False,
        "loss": "cross_entropy", "restarts": 1, "seed": 0, **schedule, "final_eps": _final_eps(schedule), **_NO_SUITE,
    }


def _status(distance: float) -> str:
    if distance == 0.0:
        return VerificationStatus.CLEAN_MISCLASSIFIED.name
    return VerificationStatus.NOT_FOUND.name if math.isinf(distance) else VerificationStatus.VERIFIED.name


def write_cell(
    results_dir,
    model: str,
    config: dict,
    distances,
    *,
    dataset: str = "mnist",
    statuses=None,
    unconverged=0,
    zero_gradients=0,
    gradient_mode: str = "exact",
    clean_accuracy: float = 0.99,
    trained_for: str = "none",
    seconds_per_example: float = 0.1,
    images: np.ndarray | None = None,
    failed_model_checks=(),
) -> str:
    """Write one cell (examples, cells row, optional images) and return its id.

    ``distances[i]`` is example i's verified distance: 0 for a clean
    misclassification, inf for no verified adversarial example. ``statuses``
    overrides the verdicts (a claimed success rejected by verification has
    an infinite distance and a status such as ``OUTSIDE_BOX``). ``failed_model_checks``
    (:class:`~harness.vocabulary.ModelCheck` values) land on every row; None
    writes the nulls of a store older than version 6.
    """
    checks = None if failed_model_checks is None else list(failed_model_checks)
    distances = np.asarray(distances, dtype=np.float64)
    n = len(distances)
    statuses = list(statuses) if statuses is not None else [_status(d) for d in distances]
    success = [status != VerificationStatus.NOT_FOUND.name for status in statuses]
    cell_id = hashlib.sha256(repr((model, dataset, sorted(config.items()))).encode()).hexdigest()[:20]
    columns = {name: [value] * n for name, value in config.items()}
    columns.update(
        cell_id=[cell_id] * n, gradient_mode=[gradient_mode] * n, shard_id=[cell_id] * n, example_index=np.arange(n),
        label=np.arange(n) % 10, clean_prediction=np.arange(n) % 10, adversarial_prediction=(np.arange(n) + 1) % 10,
        success=success, eps_found=np.where(np.isfinite(distances), distances * 1.5, np.nan),
        verification_status=statuses, verified_distance=distances, distance=distances,
        mass_error=np.zeros(n), box_violation=np.zeros(n), unreachable_mass=np.zeros(n),
        steps=np.full(n, 100), restart=np.zeros(n, dtype=int), solver_iterations=np.full(n, 3000),
        unconverged_steps=np.full(n, unconverged), failed_steps=np.zeros(n, dtype=int),
        zero_gradient_steps=np.full(n, zero_gradients), failed_model_checks=[checks] * n,
        attack_seconds=np.full(n, seconds_per_example * 0.75), verify_seconds=np.full(n, seconds_per_example * 0.25),
    )
    is_suite = config.get("suite") is not None
    columns.update(
        schedule_radius=distances * 1.2 if is_suite else [None] * n,
        found_by=[("plan_pgd_box" if np.isfinite(d) and d > 0 else "") if is_suite else None for d in distances],
        refined_by=["segment" if is_suite else None] * n,
        rejected_claims=[0 if is_suite else None] * n,
    )
    write_shard(results_dir, Table.EXAMPLES, dataset, model, cell_id, columns)
    row = {name: [value] for name, value in config.items()}
    row.update(
        cell_id=[cell_id], gradient_mode=[gradient_mode], status=[CellStatus.COMPLETE.value], n_examples=[n], started_at=[None],
        finished_at=[None], seconds=[seconds_per_example * n], clean_accuracy=[clean_accuracy],
        robust_accuracy=[float(np.mean(distances > 1.83))], failed_model_checks=[checks], trained_for=[trained_for],
        model_training=[f"training recipe of {model}"], model_paper=[f"paper of {model}"],
        attack_summary=[f"summary of {config['solver'] or config['threat_model']}"],
        box_handling=["clamped" if config["clamp"] else f"box of {config['solver']}"],
        ball_description=[f"description of the {config['ball_title']}"], config_json=["{}"], package_versions_json=['{"torch": "2.15.0"}'],
        git_commit=["0123456789abcdef"], device=["cpu"], **_NO_CERTIFIER,
    )
    write_shard(results_dir, Table.CELLS, dataset, model, cell_id, row)
    if images is not None:
        kept = images.shape[0]
        adversarial = np.clip(images + 0.2 * np.roll(images, 1, axis=-1), 0, 1)
        write_shard(results_dir, Table.IMAGES, dataset, model, cell_id, {
            "cell_id": [cell_id] * kept, "shard_id": [cell_id] * kept, "example_index": np.arange(kept),
            "channels": [images.shape[1]] * kept, "height": [images.shape[2]] * kept, "width": [images.shape[3]] * kept,
            "original": [image.ravel().astype(np.float32) for image in images],
            "adversarial": [image.ravel().astype(np.float32) for image in adversarial],
        })
    return cell_id


CERTIFY_RADII = (0.001, 0.01, 0.05, 0.1)


def write_certificates(
    results_dir,
    model: str,
    certified_radius,
    *,
    radii=CERTIFY_RADII,
    certifier: str = "linear_bounds",
    box: bool = True,
    dataset: str = "mnist",
    kernel_size: int = 5,
    p: float = 1.0,
    misclassified=(),
    seconds_per_radius: float = 0.5,
) -> str:
    """Write one certify cell (certificates and its cells row) and return its id.

    ``certified_radius[i]`` is example i's certified radius: it is certified
    at every radius up to it, and unknown (undecided) at the next one and
    beyond; the examples in ``misclassified`` are clean misclassifications.
    """
    certified_radius = np.asarray(certified_radius, dtype=np.float64)
    n, per = len(certified_radius), len(radii)
    misclassified = set(misclassified)
    statuses, margins, seconds = [], [], []
    for i, radius in enumerate(certified_radius):
        failed = False
        for eps in radii:
            if i in misclassified:
                statuses.append(CertificateStatus.CLEAN_MISCLASSIFIED.value)
                margins.append(np.nan)
                seconds.append(0.0)
            elif eps <= radius:
                statuses.append(CertificateStatus.CERTIFIED.value)
                margins.append(1.0)
                seconds.append(seconds_per_radius)
            else:
                statuses.append(CertificateStatus.UNKNOWN.value)
                margins.append(np.nan if failed else -1.0)  # evaluated at the first radius it fails only
                seconds.append(0.0 if failed else seconds_per_radius)
                failed = True
    settings = {"certifier": certifier, "box": box, "time_limit": 20.0 if certifier == "milp" else None, "radius_rounds": 0}
    cell_id = hashlib.sha256(repr((model, dataset, kernel_size, p, sorted(settings.items()), tuple(radii))).encode()).hexdigest()[:20]
    ball = {"threat_model": BallKind.WASSERSTEIN.value, "ball_title": f"W{kernel_size}p{p:g} ball", "kernel_size": kernel_size, "p": p}
    columns = {name: [value] * n * per for name, value in {**ball, **settings}.items()}
    example = np.repeat(np.arange(n), per)
    columns.update(
        cell_id=[cell_id] * n * per, shard_id=[cell_id] * n * per, example_index=example, label=example % 10,
        clean_prediction=np.where(np.isin(example, list(misclassified)), (example + 1) % 10, example % 10),
        eps=np.tile(np.asarray(radii, dtype=np.float64), n), status=statuses, margin_lower=margins,
        safety_margin=np.where(np.isnan(margins), np.nan, 1e-6), seconds=seconds,
        certified_radius=np.where(np.isin(np.arange(n), list(misclassified)), 0.0, certified_radius)[example],
        radius_search_seconds=np.zeros(n * per),
    )
    write_shard(results_dir, Table.CERTIFICATES, dataset, model, cell_id, columns)
    row = {name: [None] for name in CELLS_SCHEMA.names if name != "schema_version"}
    row.update({name: [value] for name, value in {**ball, **settings}.items()})
    row.update(
        cell_id=[cell_id], final_eps=[radii[-1]], seed=[0], status=[CellStatus.COMPLETE.value], n_examples=[n],
        seconds=[float(np.sum(seconds))], clean_accuracy=[0.99], robust_accuracy=[float(np.mean(certified_radius >= radii[-1]))],
        trained_for=["none"], attack_summary=[f"certified lower bound: {certifier}"], box_handling=["the box"],
        ball_description=[f"description of the W{kernel_size}p{p:g} ball"], config_json=["{}"],
        package_versions_json=['{"torch": "2.15.0"}'], git_commit=["0123456789abcdef"], device=["cpu"],
    )
    write_shard(results_dir, Table.CELLS, dataset, model, cell_id, row)
    return cell_id

"""Attack a data set in batches and verify every claim: per-example columns.

The unit of work of every benchmark: a model, clean images, a threat model
with its solver, a schedule. :func:`attack_and_verify` returns one column per
recorded quantity (numpy arrays of length N), ready for a table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np
import torch
from torch import nn

from solvers.iterate import BallIterate

from .ball import Ball
from .pgd import AttackProgress, EpsSchedule, Loss, PGDAttack

__all__ = ["attack_and_verify", "clean_accuracy", "submitter"]


def clean_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of ``images`` the model classifies as ``labels``."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for chunk, chunk_labels in zip(images.split(batch_size), labels.split(batch_size)):
            correct += int((model(chunk).argmax(1) == chunk_labels).sum())
    return correct / images.shape[0]


def submitter(distances, x: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
    """An ``on_success`` hook that hands each claim with a positive radius to ``distances``."""
    clean = x.detach().cpu().double().numpy()

    def submit(indices: torch.Tensor, images: torch.Tensor, eps_found: torch.Tensor) -> None:
        moved = eps_found > 0
        claimed = images[moved].detach().cpu().double().numpy()
        for index, image in zip(indices[moved].tolist(), claimed):
            distances.submit(index, clean[index], image)

    return submit


def attack_and_verify(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    ball: Ball,
    iterate: BallIterate,
    schedule: EpsSchedule,
    *,
    batch_size: int = 100,
    loss: Loss = Loss.CROSS_ENTROPY,
    restarts: int = 1,
    seed: int = 0,
    on_progress: Callable[[int, AttackProgress], None] | None = None,
    verify_executor: Executor | None = None,
) -> dict[str, np.ndarray]:
    """Attack ``images`` batch by batch and verify each claimed success.

    ``iterate`` moves the attack inside ``ball`` (see :meth:`Ball.iterate`);
    the ball checks every claim exactly (:meth:`Ball.verify`).

    Returns
    -------
    dict of str to numpy array
        Per example: ``label``, the attack's claims (``success``,
        ``eps_found``, ``clean_prediction``, ``adversarial_prediction``,
        ``steps``, ``restart``, ``solver_iterations``,
        ``unconverged_steps``, ``failed_steps``, ``zero_gradient_steps``),
        the verdict (``verification_status``, ``verified_distance``,
        ``distance``, ``mass_error``, ``box_violation``,
        ``unreachable_mass``, ``verified_prediction``), and ``attack_seconds`` /
        ``verify_seconds`` (the batch's wall time shared equally by its
        examples). ``adversarial`` holds the stored images.

    ``on_progress(examples_before, progress)`` is called after every attack
    step with the number of examples of earlier batches and the current
    batch's :class:`~harness.attack.pgd.AttackProgress`.

    With ``verify_executor`` (a process pool) the exact LP of each claim
    starts in a worker as soon as the attack makes it, while the attack goes
    on with the rest of the batch; ``verify_seconds`` is then the wait after
    the attack. The verdicts are the same either way.
    """
    if not isinstance(ball, Ball):
        raise ValueError(f"ball={ball!r} is invalid: pass a harness.attack.ball.Ball")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: it must be an integer >= 1")
    attack = PGDAttack(model, iterate, schedule, loss=loss, restarts=restarts, seed=seed)
    columns: dict[str, list[np.ndarray]] = {}
    for start in range(0, images.shape[0], batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        before = start
        distances = None if verify_executor is None else ball.exact_distances(verify_executor)
        result = attack.run(
            x, y,
            on_step=None if on_progress is None else lambda progress: on_progress(before, progress),
            on_success=None if distances is None else submitter(distances, x),
        )
        started = time.perf_counter()
        verdict = ball.verify(model, x, y, result, distances=distances)
        verify_seconds = time.perf_counter() - started
        batch = {"label": y.cpu().numpy()}
        batch.update({name: value.cpu().numpy() for name, value in result.per_example().items()})
        renamed = {"status": "verification_status", "prediction": "verified_prediction"}
        for name, value in verdict.to_dict().items():
            batch[renamed.get(name, name)] = value
        batch["attack_seconds"] = np.full(x.shape[0], result.seconds / x.shape[0])
        batch["verify_seconds"] = np.full(x.shape[0], verify_seconds / x.shape[0])
        batch["adversarial"] = verdict.image.cpu().numpy()
        for name, value in batch.items():
            columns.setdefault(name, []).append(value)
    return {name: np.concatenate(parts) for name, parts in columns.items()}

"""The words the store holds, each defined once, by its enum, and the facts of each data set.

Attack, run and report all read and write these values; none of them spells
a status or a ball as a string literal. The module imports nothing from the
rest of the harness, so every room may use it, which is why the table of
data-set facts (:data:`DATASETS`) lives here too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping

__all__ = [
    "BallKind", "CellStatus", "CertificateStatus", "Certifier", "DATASETS", "DatasetFacts", "ModelCheck", "STANDARD_RADII",
    "VerificationStatus",
]


class BallKind(enum.Enum):
    """The family of balls an attack stays in; stored by value."""

    WASSERSTEIN = "wasserstein"
    """Local-transport Wasserstein ball (the benchmark's threat model)."""
    LINF = "linf"
    """l_inf ball intersected with the pixel box (baseline)."""
    L2 = "l2"
    """l_2 ball intersected with the pixel box (baseline)."""


class CellStatus(enum.Enum):
    """Whether every example of a cell landed on disk; stored by value."""

    COMPLETE = "complete"
    INCOMPLETE = "incomplete"


class VerificationStatus(enum.IntEnum):
    """Outcome of verifying one example, in the order the checks run; stored by name."""

    VERIFIED = 0
    """A success that passed every check."""
    CLEAN_MISCLASSIFIED = 1
    """The clean image is already misclassified: verified radius 0."""
    NOT_FOUND = 2
    """The attack claimed no success."""
    PREDICTION_UNCHANGED = 3
    """The model classifies the stored image correctly after all."""
    OUTSIDE_BOX = 4
    """A pixel lies outside [0, 1]."""
    MASS_NOT_CONSERVED = 5
    """The total mass differs from the clean image's."""
    UNREACHABLE_MASS = 6
    """Some mass cannot be transported within the windows (moved too far, or created)."""
    RADIUS_EXCEEDED = 7
    """The exact transport cost exceeds the radius the attack claims."""

    @property
    def counts_as_success(self) -> bool:
        return self in (VerificationStatus.VERIFIED, VerificationStatus.CLEAN_MISCLASSIFIED)


class Certifier(enum.Enum):
    """How a certificate is computed; stored by value."""

    LINEAR_BOUNDS = "linear_bounds"
    """Incomplete: exact support-function bounds over the ball, back-substituted through linear ReLU relaxations."""
    MILP = "milp"
    """Complete: the verification problem as a mixed-integer program (ReLUs as in Tjeng et al. 2019), with a time limit."""


class CertificateStatus(enum.Enum):
    """Outcome of certifying one example at one radius; stored by value."""

    CERTIFIED = "certified"
    """Every image of the ball is classified correctly (a lower bound on robust accuracy)."""
    COUNTEREXAMPLE = "counterexample"
    """An image of the ball changes the prediction, and it passed the exact verification of attacks."""
    CLEAN_MISCLASSIFIED = "clean_misclassified"
    """The clean image is already misclassified."""
    UNKNOWN = "unknown"
    """The bounds are too loose to decide (incomplete certifier), or a candidate failed verification."""
    TIMEOUT = "timeout"
    """The complete certifier ran out of its time limit."""

    @property
    def decided(self) -> bool:
        return self in (CertificateStatus.CERTIFIED, CertificateStatus.COUNTEREXAMPLE, CertificateStatus.CLEAN_MISCLASSIFIED)


class ModelCheck(enum.Enum):
    """A check on the model under attack (:mod:`harness.attack.model_checks`); a failed one is stored by value.

    Each names a property of the model that makes an attack's numbers
    overstate robustness, or describe another model than the one handed
    over; :attr:`consequence` says how.
    """

    RANDOMIZED_OUTPUTS = "randomized_outputs"
    """Two identical calls on the same images give different outputs."""
    PROBABILITY_OUTPUTS = "probability_outputs"
    """Every output row is non-negative and sums to 1: probabilities, not logits."""
    LOG_PROBABILITY_OUTPUTS = "log_probability_outputs"
    """Every output row's logsumexp is 0: log-probabilities, not logits."""
    ZERO_INPUT_GRADIENT = "zero_input_gradient"
    """The attack loss's gradient with respect to the input is exactly zero for some clean image."""
    NONFINITE_INPUT_GRADIENT = "nonfinite_input_gradient"
    """That gradient has a NaN or infinite entry for some clean image."""
    TRAINING_MODE = "training_mode"
    """The model, or one of its modules, was handed over in training mode."""
    ZERO_GRADIENT_STEPS = "zero_gradient_steps"
    """Attack steps met an exactly zero input gradient (the attack's own tally, not a check before it)."""

    @property
    def consequence(self) -> str:
        """Why a failure makes the numbers unreliable, in words (warnings, the leaderboard's flags)."""
        return _MODEL_CHECK_CONSEQUENCES[self]


_MODEL_CHECK_CONSEQUENCES = {
    ModelCheck.RANDOMIZED_OUTPUTS: (
        "each attack step follows the gradient of one random draw and a success on one draw need not repeat on the "
        "next, so attacks find fewer adversarial examples than exist (a randomized model needs an attack on the "
        "expected output)"
    ),
    ModelCheck.PROBABILITY_OUTPUTS: (
        "the attack's cross-entropy applies a second softmax to values in [0, 1], whose gradient is small and vanishes "
        "where the model is confident, so gradient attacks stall; return logits"
    ),
    ModelCheck.LOG_PROBABILITY_OUTPUTS: (
        "a log-softmax leaves cross-entropy and logit margins unchanged, but computed as the log of a softmax it "
        "saturates where the model is confident (a probability rounded to 1 has a zero gradient, one rounded to 0 an "
        "infinite log); return logits"
    ),
    ModelCheck.ZERO_INPUT_GRADIENT: (
        "a gradient attack cannot move from an image whose gradient is zero (a step function, quantization or "
        "saturated outputs: gradient masking), so robustness is overstated; attack such a model through a "
        "differentiable approximation (BPDA) or without gradients"
    ),
    ModelCheck.NONFINITE_INPUT_GRADIENT: (
        "the attack's steps are undefined where the gradient is NaN or infinite, so its numbers measure no robustness"
    ),
    ModelCheck.TRAINING_MODE: (
        "dropout draws random masks and batch norm normalizes by the batch in training mode; the attacks and the "
        "verification switch the model to eval mode, so the numbers hold for the eval-mode model, not the one handed over"
    ),
    ModelCheck.ZERO_GRADIENT_STEPS: (
        "a step with a zero gradient cannot move the image (gradient masking), so robustness is overstated"
    ),
}


@dataclass(frozen=True)
class DatasetFacts:
    """What every room needs to know of one data set.

    Attributes
    ----------
    shape : tuple of int
        ``(C, H, W)`` of one image.
    standard_radii : mapping of str to tuple of float
        Per ball kind (a :class:`BallKind` value), the radii at which every
        evaluation and leaderboard reports robust accuracy.
    certify_radii : tuple of float
        The radii a certify block reports when it sets none: small, since
        certificates of the networks here stop far below the attacks' radii
        (the ladder ends at the smallest standard Wasserstein radius).
    batch_size_cpu, batch_size_gpu : int
        Examples per attack batch (and shard) when ``batch_size=auto``: on a
        CPU larger batches only delay the first finished shard; a GPU needs a
        thousand to leave its launch-bound regime and holds their plans with
        room to spare.
    """

    shape: tuple[int, int, int]
    standard_radii: Mapping[str, tuple[float, ...]]
    certify_radii: tuple[float, ...]
    batch_size_cpu: int = 100
    batch_size_gpu: int = 1000

    def batch_size(self, device_type: str) -> int:
        """The batch size ``batch_size=auto`` means on a device of this type (``"cpu"``, ``"cuda"``)."""
        return self.batch_size_cpu if device_type == "cpu" else self.batch_size_gpu


DATASETS = {
    "mnist": DatasetFacts(
        shape=(1, 28, 28),
        standard_radii={
            BallKind.WASSERSTEIN.value: (0.1, 0.5, 1.0, 2.0),
            BallKind.LINF.value: (0.1, 0.2, 0.3, 0.4),
            BallKind.L2.value: (1.0, 2.0, 3.0),
        },
        certify_radii=(0.001, 0.01, 0.05, 0.1),
    ),
    "cifar10": DatasetFacts(
        shape=(3, 32, 32),
        standard_radii={
            BallKind.WASSERSTEIN.value: (0.01, 0.05, 0.1),
            BallKind.LINF.value: (2 / 255, 4 / 255, 8 / 255),
            BallKind.L2.value: (0.25, 0.5, 1.0),
        },
        certify_radii=(0.0001, 0.001, 0.005, 0.01),
    ),
}
"""The facts of each data set, by name (the values of ``zoo.Dataset``, which cannot import the harness)."""

STANDARD_RADII = {
    (name, kind): radii for name, facts in DATASETS.items() for kind, radii in facts.standard_radii.items()
}
"""The radii at which every evaluation and leaderboard of a (data set, threat model) reports robust accuracy."""

"""Training recipes as data: what to train, with what optimizer, schedule and objective.

A :class:`Recipe` is a frozen description; :func:`harness.train.loop.train`
runs it. Each model kind of the benchmark has one:

* standard training (cross-entropy on clean images);
* the binarized model: standard training of a network whose inputs are
  thresholded inside the model (the zoo entry's preprocessing);
* l_inf-certified training by interval bound propagation (Gowal et al.
  2018): the loss mixes clean cross-entropy with the cross-entropy of the
  worst-case logits over the l_inf ball, whose radius ramps up;
* Wasserstein adversarial training, Algorithm 1 of Wong, Schmidt, Kolter
  (2019) with the adaptive radius of their Appendix B: the attack's
  schedule starts small and grows, each example stops at its first
  adversarial iterate; any registered solver can run it.

Recipes are looked up by name in :data:`RECIPES`; a zoo entry names its
recipe (``ModelSpec.recipe``), and a plugin that registers a model can
register its recipe with :func:`register_recipe`.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from solvers.iterate import StepRule
from zoo import Dataset

from ..attack.ball import Ball
from ..attack.pgd import EpsSchedule
from ..attack.spec import AttackSpec

__all__ = [
    "AdversarialTraining",
    "Augmentation",
    "CertifiedTraining",
    "LearningRateSchedule",
    "Objective",
    "Optimizer",
    "OptimizerKind",
    "RECIPES",
    "Recipe",
    "ScheduleKind",
    "recipe",
    "register_recipe",
]


class Objective(enum.Enum):
    """What a training step minimizes."""

    STANDARD = "standard"
    """Cross-entropy on the (augmented) clean images."""
    INTERVAL_CERTIFIED = "interval_certified"
    """Clean cross-entropy mixed with that of interval-bound worst-case logits over an l_inf ball."""
    WASSERSTEIN_ADVERSARIAL = "wasserstein_adversarial"
    """Cross-entropy on the first adversarial example a Wasserstein PGD attack finds (Algorithm 1)."""


class ScheduleKind(enum.Enum):
    """The shape of the learning rate over training."""

    STEP = "step"
    """``lr`` times ``factor`` for each milestone epoch passed."""
    TRIANGLE = "triangle"
    """Linear from ``start * lr`` up to ``lr`` at ``peak`` (a fraction of training), then down to ``end * lr``."""


class OptimizerKind(enum.Enum):
    SGD = "sgd"
    """SGD with (optionally Nesterov) momentum."""
    ADAM = "adam"
    """Adam, ``momentum`` as its first beta."""


@dataclass(frozen=True)
class Optimizer:
    """SGD with momentum (or Adam) on the batch-mean loss.

    ``weight_decay`` is torch's coefficient (the decay per step is ``lr *
    weight_decay``). ``bias_lr_scale`` multiplies the learning rate of
    batch-norm shifts but not their decay per step, as in the fast CIFAR-10
    baselines.
    """

    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    bias_lr_scale: float = 1.0
    kind: OptimizerKind = OptimizerKind.SGD


@dataclass(frozen=True)
class LearningRateSchedule:
    kind: ScheduleKind = ScheduleKind.STEP
    milestones: tuple[int, ...] = ()
    factor: float = 0.1
    start: float = 0.2
    peak: float = 0.25
    end: float = 0.07

    def multiplier(self, progress: float, epoch: int) -> float:
        """The learning-rate multiplier at ``progress`` (fraction of all steps done) in ``epoch``."""
        if self.kind is ScheduleKind.STEP:
            return self.factor ** sum(epoch >= milestone for milestone in self.milestones)
        if progress <= self.peak:
            return self.start + (1 - self.start) * progress / self.peak
        return 1 + (self.end - 1) * (progress - self.peak) / (1 - self.peak)


@dataclass(frozen=True)
class Augmentation:
    """Label-preserving image changes, applied per batch on the device.

    ``flip``: mirror left-right, at random or (``alternating_flip``) every
    image in every other epoch with a fixed random half flipped in the first;
    ``translate``: shift by up to this many pixels (reflect padding).
    """

    flip: bool = False
    alternating_flip: bool = False
    translate: int = 0


@dataclass(frozen=True)
class AdversarialTraining:
    """The inner Wasserstein attack of adversarial training (Algorithm 1, Appendix B): an attack and its ball.

    The attack's schedule is the adaptive radius: it starts at ``eps_initial``, grows by ``eps_factor`` every
    ``eps_every`` steps, and each example stops at its first adversarial iterate or after ``iterations`` steps.
    """

    attack: AttackSpec
    kernel_size: int = 5
    p: float = 2.0

    @property
    def ball(self) -> Ball:
        return Ball.wasserstein(self.kernel_size, self.p)

    def to_dict(self) -> dict[str, Any]:
        return {"attack": self.attack.to_dict(), "kernel_size": self.kernel_size, "p": self.p}


@dataclass(frozen=True)
class CertifiedTraining:
    """Interval bound propagation training against an l_inf ball (Gowal et al. 2018).

    The radius grows linearly from 0 to ``eps`` over ``ramp_epochs`` after
    ``warmup_epochs`` of clean training, and the weight of the clean loss
    from 1 down to ``final_clean_weight`` alongside.
    """

    eps: float = 0.1
    warmup_epochs: int = 1
    ramp_epochs: int = 5
    final_clean_weight: float = 0.5

    def at(self, epoch_progress: float) -> tuple[float, float]:
        """Radius and clean-loss weight at ``epoch_progress`` (epochs done, fractional)."""
        ramp = min(max((epoch_progress - self.warmup_epochs) / max(self.ramp_epochs, 1e-9), 0.0), 1.0)
        return self.eps * ramp, 1 - (1 - self.final_clean_weight) * ramp


@dataclass(frozen=True)
class Recipe:
    """How to train one model.

    Attributes
    ----------
    name : str
    dataset : Dataset
    architecture : str
        The zoo builder's architecture (checked against the model trained).
    objective : Objective
    epochs : int
    batch_size : int
    optimizer : Optimizer
    schedule : LearningRateSchedule
    augmentation : Augmentation
    label_smoothing : float
    whitening : bool
        Initialize the network's whitening layer from training patches first
        (networks with an ``init_whitening`` method).
    adversarial, certified
        The objective's settings.
    seed : int
    description : str
        Where the recipe comes from.
    init_from : str or None
        A zoo model of the same architecture whose weights start the
        training (fine-tuning); None: random initialization.
    train_examples : int or None
        Train on the first this many training images only (None: all).
    """

    name: str
    dataset: Dataset
    architecture: str
    objective: Objective
    epochs: int
    batch_size: int
    optimizer: Optimizer
    schedule: LearningRateSchedule = field(default_factory=LearningRateSchedule)
    augmentation: Augmentation = field(default_factory=Augmentation)
    label_smoothing: float = 0.0
    whitening: bool = False
    adversarial: AdversarialTraining | None = None
    certified: CertifiedTraining | None = None
    seed: int = 0
    description: str = ""
    init_from: str | None = None
    train_examples: int | None = None

    def __post_init__(self):
        needs = {Objective.WASSERSTEIN_ADVERSARIAL: "adversarial", Objective.INTERVAL_CERTIFIED: "certified"}
        for objective, setting in needs.items():
            given = getattr(self, setting) is not None
            if given != (self.objective is objective):
                raise ValueError(
                    f"recipe {self.name!r}: {setting} settings are {'needed' if not given else 'not used'} "
                    f"with objective {self.objective.value!r}"
                )
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"recipe {self.name!r}: epochs={self.epochs} and batch_size={self.batch_size} must be >= 1")

    def with_epochs(self, epochs: int) -> "Recipe":
        """The same recipe for a different number of epochs (a shorter run, say)."""
        return replace(self, epochs=epochs)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain JSON values (enums by value)."""

        def plain(value):
            if isinstance(value, enum.Enum):
                return value.value
            if isinstance(value, dict):
                return {key: plain(item) for key, item in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(item) for item in value]
            return value

        written = plain(asdict(self))
        if self.adversarial is not None:
            written["adversarial"] = self.adversarial.to_dict()
        return written


_PAPER_SGD = Optimizer(lr=0.1, momentum=0.9, weight_decay=5e-4)
_FINE_TUNING_SGD = Optimizer(lr=0.01, momentum=0.9, weight_decay=5e-4)
_MNIST_SGD_WORDS = "SGD, momentum 0.9, weight decay 5e-4, batch 128, learning rate 0.1 then 0.01 after 10 epochs"
_PAPER_STEPS = LearningRateSchedule(ScheduleKind.STEP, milestones=(10,), factor=0.1)
_WONG_2019 = "Wong, Schmidt, Kolter 2019, Appendix B"

_MNIST_WASSERSTEIN = AdversarialTraining(
    AttackSpec("projected_sinkhorn", EpsSchedule(0.1, 1.4, 5, 50), (("lam", 1000.0),), StepRule.LINF_SIGN, 0.1),
    kernel_size=5, p=2.0,
)

_MNIST_STANDARD = Recipe(
    name="mnist_standard",
    dataset=Dataset.MNIST,
    architecture="mnist_small_convnet",
    objective=Objective.STANDARD,
    epochs=20,
    batch_size=128,
    optimizer=_PAPER_SGD,
    schedule=_PAPER_STEPS,
    description=f"standard training with the optimizer of {_WONG_2019}",
)

_MNIST_PLAN_PGD_SCHEDULE = EpsSchedule(0.01, 1.4, 5, 50)

_MNIST_WASSERSTEIN_SINKHORN = replace(
    _MNIST_STANDARD,
    name="mnist_wasserstein_sinkhorn",
    objective=Objective.WASSERSTEIN_ADVERSARIAL,
    epochs=1,
    optimizer=_FINE_TUNING_SGD,
    schedule=LearningRateSchedule(ScheduleKind.STEP),
    adversarial=_MNIST_WASSERSTEIN,
    init_from="mnist/trained_standard",
    train_examples=640,
    description=f"Algorithm 1 with projected Sinkhorn, adaptive eps 0.1 x1.4 every 5 of 50 steps ({_WONG_2019}), "
    f"as fine-tuning of mnist/trained_standard on 640 training images (sized for a CPU; the paper trains "
    f"from scratch, {_MNIST_SGD_WORDS})",
)

RECIPES: dict[str, Recipe] = {
    entry.name: entry
    for entry in (
        _MNIST_STANDARD,
        replace(
            _MNIST_STANDARD, name="mnist_binarized",
            description=f"standard training of a network on inputs binarized at 0.5, optimizer of {_WONG_2019}",
        ),
        Recipe(
            name="mnist_linf_certified",
            dataset=Dataset.MNIST,
            architecture="mnist_small_convnet",
            objective=Objective.INTERVAL_CERTIFIED,
            epochs=20,
            batch_size=128,
            optimizer=Optimizer(lr=1e-3, momentum=0.9, weight_decay=0.0, kind=OptimizerKind.ADAM),
            schedule=LearningRateSchedule(ScheduleKind.STEP, milestones=(15,), factor=0.1),
            certified=CertifiedTraining(eps=0.1, warmup_epochs=1, ramp_epochs=8, final_clean_weight=0.5),
            description="interval bound propagation against l_inf eps 0.1 (Gowal et al. 2018), ramped radius",
        ),
        _MNIST_WASSERSTEIN_SINKHORN,
        replace(
            _MNIST_WASSERSTEIN_SINKHORN,
            name="mnist_wasserstein_plan_pgd",
            adversarial=AdversarialTraining(AttackSpec("plan_pgd_box", _MNIST_PLAN_PGD_SCHEDULE), kernel_size=5, p=1.0),
            description="Algorithm 1 with plan-space PGD in the boxed ball (5x5, p = 1), adaptive eps from 0.01 "
            "x1.4 every 5 of 50 steps, as fine-tuning of mnist/trained_standard on 640 training images (sized "
            "for a CPU)",
        ),
        replace(
            _MNIST_WASSERSTEIN_SINKHORN,
            name="mnist_wasserstein_plan_pgd_fast",
            # One warm-started Newton step of the box projection per attack step instead of up to 100: the
            # iterate is still a point of the boxed ball (the solver repairs every plan into it), only not the
            # exact projection, which training does not need. Attack steps cost about 5x less on a CPU (128
            # training images against mnist/standard: 6.4 ms per example-step against 31, success 89% against
            # 91%, mean radius found 0.123 against 0.116).
            adversarial=AdversarialTraining(
                AttackSpec("plan_pgd_box", _MNIST_PLAN_PGD_SCHEDULE, (("box_max_iter", 1),)), kernel_size=5, p=1.0
            ),
            description="mnist_wasserstein_plan_pgd with an inexact projection for the inner attack: one "
            "warm-started Newton step of the box projection per attack step (box_max_iter 1; every iterate still "
            "in the boxed ball), about 5x cheaper attack steps, for longer CPU runs",
        ),
        replace(
            _MNIST_WASSERSTEIN_SINKHORN,
            name="mnist_wasserstein_plan_pgd_full",
            epochs=2,
            adversarial=AdversarialTraining(
                AttackSpec("plan_pgd_box", _MNIST_PLAN_PGD_SCHEDULE, (("box_max_iter", 1),)), kernel_size=5, p=1.0
            ),
            train_examples=None,
            description="mnist_wasserstein_plan_pgd_fast on all 60,000 training images for 2 epochs: fine-tuning of "
            "mnist/trained_standard against plan-space PGD in the boxed ball (5x5, p = 1), adaptive eps from 0.01 "
            "x1.4 every 5 of 50 steps, one warm-started Newton step of the box projection per attack step",
        ),
        Recipe(
            name="cifar10_fast_standard",
            dataset=Dataset.CIFAR10,
            architecture="cifar_fast_net",
            objective=Objective.STANDARD,
            epochs=12,
            batch_size=1024,
            # airbench93's decoupled lr 11.5 and weight decay 0.0153 per 1024 examples, momentum 0.85, for a mean loss.
            optimizer=Optimizer(lr=1.5, momentum=0.85, weight_decay=1.33e-3, nesterov=True, bias_lr_scale=64.0),
            schedule=LearningRateSchedule(ScheduleKind.TRIANGLE, start=0.2, peak=0.23, end=0.07),
            augmentation=Augmentation(flip=True, alternating_flip=True, translate=2),
            label_smoothing=0.2,
            whitening=True,
            description="fast CIFAR-10 training in the manner of the airbench baselines (Jordan 2024): whitened "
            "first layer, Nesterov SGD with a triangular schedule, label smoothing, flips and 2-pixel translations",
        ),
        Recipe(
            name="cifar10_resnet18_standard",
            dataset=Dataset.CIFAR10,
            architecture="cifar_resnet18",
            objective=Objective.STANDARD,
            epochs=30,
            batch_size=512,
            optimizer=Optimizer(lr=0.4, momentum=0.9, weight_decay=5e-4, nesterov=True),
            schedule=LearningRateSchedule(ScheduleKind.TRIANGLE, start=0.1, peak=0.2, end=0.0),
            augmentation=Augmentation(flip=True, translate=4),
            label_smoothing=0.1,
            description="ResNet18, one-cycle SGD, flips and 4-pixel translations (a GPU recipe)",
        ),
        Recipe(
            name="cifar10_resnet18_wasserstein",
            dataset=Dataset.CIFAR10,
            architecture="cifar_resnet18",
            objective=Objective.WASSERSTEIN_ADVERSARIAL,
            epochs=20,
            batch_size=128,
            optimizer=_PAPER_SGD,
            schedule=_PAPER_STEPS,
            augmentation=Augmentation(flip=True, translate=4),
            adversarial=AdversarialTraining(
                AttackSpec("projected_sinkhorn", EpsSchedule(0.01, 1.5, 5, 50), (("lam", 1000.0),), StepRule.LINF_SIGN, 0.01),
                kernel_size=5, p=2.0,
            ),
            description=f"Algorithm 1 on ResNet18, adaptive eps 0.01 x1.5 every 5 of 50 steps ({_WONG_2019}; a GPU recipe)",
        ),
        Recipe(
            name="cifar10_small_resnet_linf_certified",
            dataset=Dataset.CIFAR10,
            architecture="cifar_small_resnet",
            objective=Objective.INTERVAL_CERTIFIED,
            epochs=60,
            batch_size=256,
            optimizer=Optimizer(lr=5e-4, momentum=0.9, weight_decay=0.0, kind=OptimizerKind.ADAM),
            schedule=LearningRateSchedule(ScheduleKind.STEP, milestones=(40, 50), factor=0.1),
            augmentation=Augmentation(flip=True, translate=2),
            certified=CertifiedTraining(eps=2 / 255, warmup_epochs=5, ramp_epochs=20, final_clean_weight=0.5),
            description="interval bound propagation against l_inf eps 2/255 on the small ResNet (a GPU recipe)",
        ),
    )
}


def register_recipe(entry: Recipe) -> Recipe:
    """Add ``entry`` to :data:`RECIPES` (from a plugin, beside the model that names it); a taken name is an error."""
    if not isinstance(entry, Recipe):
        raise ValueError(f"register_recipe takes a Recipe, got {type(entry).__name__}")
    if entry.name in RECIPES and RECIPES[entry.name] != entry:
        raise ValueError(f"recipe {entry.name!r} is already registered with other settings")
    RECIPES[entry.name] = entry
    return entry


def recipe(name: str) -> Recipe:
    """The recipe called ``name``; an unknown name raises ValueError listing the known ones."""
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r} is unknown; recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]

"""Checks on the model under attack, in the manner of AutoAttack's ``checks.py``.

Some models make any gradient attack's numbers overstate robustness: outputs
that change from call to call, probabilities where logits are expected,
input gradients that are zero or not finite, a model left in training mode.
:func:`check_model` looks for each on a batch of clean images before an
attack and returns the failed checks (:class:`~harness.vocabulary.ModelCheck`)
with what it measured; :meth:`ModelChecks.warn` says why each failure matters.

The checks use the model as the attacks do: in eval mode, with the input
gradient of the attack's loss taken through the model's own backward pass (a
straight-through binarization, BPDA, included: the gradient the attack
follows is the one checked). They change nothing: every module's training
flag, every buffer, the random number generators and the parameters'
gradients are as they were, so an attack after them produces the same
numbers as one without them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from ..vocabulary import ModelCheck
from .pgd import Loss, attack_objective

__all__ = ["ModelCheckWarning", "ModelChecks", "check_model"]


class ModelCheckWarning(UserWarning):
    """A model check failed: the attack's numbers may overstate the model's robustness."""


@dataclass(frozen=True)
class ModelChecks:
    """The outcome of :func:`check_model`: the failed checks, each with what was measured.

    Attributes
    ----------
    examples : int
        Clean images the checks ran on.
    findings : tuple of (ModelCheck, str)
        One entry per failed check, in the order of :class:`ModelCheck`;
        empty when every check passed.
    """

    examples: int
    findings: tuple[tuple[ModelCheck, str], ...] = ()

    def __post_init__(self):
        order = list(ModelCheck)
        object.__setattr__(self, "findings", tuple(sorted(self.findings, key=lambda finding: order.index(finding[0]))))

    @property
    def failed(self) -> tuple[ModelCheck, ...]:
        return tuple(check for check, _ in self.findings)

    @property
    def passed(self) -> bool:
        return not self.findings

    @property
    def names(self) -> list[str]:
        """The failed checks' stored values (the store's ``failed_model_checks``)."""
        return [check.value for check in self.failed]

    def detail(self, check: ModelCheck) -> str | None:
        """What was measured for a failed ``check``; None when it passed."""
        return dict(self.findings).get(check)

    def as_dict(self) -> dict[str, str]:
        """``{check value: what was measured}`` for every failed check (``frame.attrs["model_checks"]``)."""
        return {check.value: detail for check, detail in self.findings}

    def with_zero_gradient_steps(self, steps: int) -> "ModelChecks":
        """These checks, and :attr:`ModelCheck.ZERO_GRADIENT_STEPS` when the attack counted ``steps`` > 0 steps with
        an exactly zero input gradient."""
        steps = int(steps)
        if steps <= 0:
            return self
        found = tuple(finding for finding in self.findings if finding[0] is not ModelCheck.ZERO_GRADIENT_STEPS)
        detail = f"{steps} attack step{'s' if steps != 1 else ''} met an exactly zero input gradient"
        return replace(self, findings=found + ((ModelCheck.ZERO_GRADIENT_STEPS, detail),))

    def messages(self) -> list[str]:
        """One sentence per failed check: its name, what was measured, and why it matters."""
        return [f"model check {check.value} failed: {detail}; {check.consequence}" for check, detail in self.findings]

    def warn(self, stacklevel: int = 2) -> None:
        """A :class:`ModelCheckWarning` per failed check (:meth:`messages`)."""
        for message in self.messages():
            warnings.warn(message, ModelCheckWarning, stacklevel=stacklevel + 1)


def check_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss: Loss = Loss.CROSS_ENTROPY,
    batch_size: int = 1000,
) -> ModelChecks:
    """Check ``model`` on clean ``images`` for what makes attacks overstate robustness.

    Parameters
    ----------
    model : nn.Module
        A classifier of images in [0, 1] returning one row of outputs per image.
    images, labels : Tensor
        (N, C, H, W) clean images on the model's device, and their (N,) labels.
    loss : Loss, default cross-entropy
        The attack's loss, whose input gradient is checked.
    batch_size : int, default 1000
        Images per forward and backward pass.

    Returns
    -------
    ModelChecks
        The failed checks among:

        * ``training_mode``: the model or a submodule is in training mode;
        * ``randomized_outputs``: two calls on the same images differ by more
          than the rounding of a sum as long as an image can explain: ``D *
          eps`` (``D`` the pixels of one image, ``eps`` of the output dtype)
          times the row's largest output. Compared in eval mode, as
          attacked, and also in training mode when the model came in it (its
          buffers, such as batch norm's running statistics, restored after);
        * ``probability_outputs``: in eval mode every output is >= 0 and
          every row sums to 1 within ``K * eps`` (``K`` classes: the rounding
          of a sum of ``K`` terms and of each term);
        * ``log_probability_outputs``: every row's logsumexp is 0 within
          ``K * eps``;
        * ``zero_input_gradient`` and ``nonfinite_input_gradient``: the input
          gradient of ``loss`` in eval mode, through the model's own backward
          (a straight-through estimator included), is exactly zero for some
          image, or has a NaN or infinite entry.

    Raises
    ------
    ValueError
        Images that are not (N, C, H, W), labels that do not match, a bad
        batch size, or outputs that are not one row per image.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor, got {getattr(images, 'shape', type(images).__name__)}")
    if not isinstance(labels, torch.Tensor) or labels.shape != images.shape[:1]:
        raise ValueError(f"labels must be a ({images.shape[0]},) tensor, got {getattr(labels, 'shape', type(labels).__name__)}")
    if not isinstance(loss, Loss):
        raise ValueError(f"loss={loss!r} is invalid: allowed {[item.value for item in Loss]}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: it must be an integer >= 1")
    chunks = list(zip(images.detach().split(batch_size), labels.split(batch_size)))
    modes = [(module, module.training) for module in model.modules()]
    in_training = [(name, module) for name, module in model.named_modules() if module.training]
    devices = [images.device] if images.device.type == "cuda" else []
    findings: list[tuple[ModelCheck, str]] = []
    try:
        with torch.random.fork_rng(devices=devices):
            if in_training:
                findings += _training_mode(model, chunks, in_training)
            model.eval()
            rows = _Rows.of([_eval_chunk(model, x, y, loss) for x, y in chunks])
    finally:
        for module, training in modes:
            module.training = training
    if rows.differs.any():
        differences = _differences(rows.differs, rows.largest_difference, rows.changed_prediction, images[0].numel())
        findings.append((ModelCheck.RANDOMIZED_OUTPUTS, "in eval mode (as attacked), " + differences))
    if rows.probabilities.all():
        findings.append((
            ModelCheck.PROBABILITY_OUTPUTS,
            f"every output is >= 0 and every row sums to 1 (largest error {float(rows.sum_error.max()):.2g})",
        ))
    elif rows.log_probabilities.all():
        findings.append((
            ModelCheck.LOG_PROBABILITY_OUTPUTS, f"every row's logsumexp is 0 (largest {float(rows.logsumexp_error.max()):.2g})",
        ))
    if rows.zero_gradient.any():
        findings.append((ModelCheck.ZERO_INPUT_GRADIENT, _which(rows.zero_gradient, f"the {loss.value} input gradient is exactly zero")))
    if rows.nonfinite_gradient.any():
        findings.append((
            ModelCheck.NONFINITE_INPUT_GRADIENT, _which(rows.nonfinite_gradient, f"the {loss.value} input gradient has NaN or infinite entries"),
        ))
    return ModelChecks(int(images.shape[0]), tuple(findings))


_MODE_DEPENDENT = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
)
"""Modules whose output depends on the training flag, named first in the training-mode finding."""


@dataclass
class _Rows:
    """Per image: what the eval-mode checks measured (tensors on the CPU)."""

    differs: torch.Tensor
    """Two calls differ beyond rounding."""
    largest_difference: torch.Tensor
    changed_prediction: torch.Tensor
    probabilities: torch.Tensor
    """The row is >= 0 and sums to 1 within rounding."""
    sum_error: torch.Tensor
    log_probabilities: torch.Tensor
    """The row's logsumexp is 0 within rounding."""
    logsumexp_error: torch.Tensor
    zero_gradient: torch.Tensor
    nonfinite_gradient: torch.Tensor

    @classmethod
    def of(cls, parts: list["_Rows"]) -> "_Rows":
        return cls(*(torch.cat([getattr(part, f.name) for part in parts]) for f in fields(cls)))


def _differences(differs: torch.Tensor, largest: torch.Tensor, changed: torch.Tensor, pixels: int) -> str:
    return (
        f"two identical calls differ on {int(differs.sum())} of {differs.numel()} images (largest difference "
        f"{float(largest.max()):.3g}; tolerance {pixels} * eps * the row's largest output) and change "
        f"{int(changed.sum())} predictions"
    )


def _check_rows(outputs, images: torch.Tensor) -> None:
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2 or outputs.shape[0] != images.shape[0]:
        raise ValueError(
            f"the model returned {getattr(outputs, 'shape', type(outputs).__name__)} for {images.shape[0]} images: "
            "a classifier returns one row of class scores per image"
        )


def _eps(outputs: torch.Tensor) -> float:
    return torch.finfo(outputs.dtype).eps if outputs.is_floating_point() else 0.0


def _compare(first: torch.Tensor, second: torch.Tensor, pixels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: whether two calls' outputs differ beyond rounding, their largest difference, and a changed prediction."""
    a, b = first.detach().double(), second.detach().double()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    gap = torch.where(same, torch.zeros_like(a), (a - b).abs())
    scale = torch.where(torch.isfinite(a), a.abs(), torch.zeros_like(a)).amax(1, keepdim=True)
    tolerance = pixels * _eps(first) * scale
    return (gap > tolerance).any(1).cpu(), gap.amax(1).cpu(), (first.argmax(1) != second.argmax(1)).cpu()


def _eval_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Loss) -> _Rows:
    """The eval-mode checks on one chunk: two calls, their rows, and the attack loss's input gradient."""
    with torch.no_grad():
        first, second = model(x), model(x)
    _check_rows(first, x)
    differs, largest, changed = _compare(first, second, x[0].numel())
    rows = first.detach().double()
    classes = rows.shape[1]
    tolerance = classes * _eps(first)
    usable = classes >= 2 and first.is_floating_point()
    finite = torch.isfinite(rows).all(1)
    sum_error = (rows.sum(1) - 1).abs()
    probabilities = finite & (rows >= 0).all(1) & (sum_error <= tolerance) & usable
    logsumexp_error = torch.logsumexp(rows, 1).abs()
    log_probabilities = finite & (logsumexp_error <= tolerance) & usable
    zero, nonfinite = _gradient(model, x, y, loss)
    return _Rows(
        differs, largest, changed, probabilities.cpu(), sum_error.cpu(), log_probabilities.cpu(), logsumexp_error.cpu(),
        zero.cpu(), nonfinite.cpu(),
    )


def _training_mode(model: nn.Module, chunks, in_training: list[tuple[str, nn.Module]]) -> list[tuple[ModelCheck, str]]:
    """The training-mode finding, and whether the outputs are random in that mode (buffers restored after)."""
    named = sorted(in_training, key=lambda item: not isinstance(item[1], _MODE_DEPENDENT))  # dropout and batch norm first
    labels = [f"{name or 'the model itself'} ({type(module).__name__})" for name, module in named]
    shown = ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
    detail = f"{len(labels)} module{'s' if len(labels) != 1 else ''} in training mode ({shown})"
    if not any(isinstance(module, _MODE_DEPENDENT) for _, module in in_training):
        detail += ", none of them a dropout or batch norm layer (the outputs may not depend on the mode)"
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    parts = []
    try:
        with torch.no_grad():
            for x, _ in chunks:
                first, second = model(x), model(x)
                _check_rows(first, x)
                parts.append(_compare(first, second, x[0].numel()))
    except (RuntimeError, ValueError) as error:  # e.g. batch norm in training mode on a single image
        return [(ModelCheck.TRAINING_MODE, f"{detail}; it does not run in that mode on these images ({type(error).__name__}: {error})")]
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    findings = [(ModelCheck.TRAINING_MODE, detail)]
    differs, largest, changed = (torch.cat(values) for values in zip(*parts))
    if differs.any():
        differences = _differences(differs, largest, changed, chunks[0][0][0].numel())
        findings.append((ModelCheck.RANDOMIZED_OUTPUTS, "in training mode (as handed over), " + differences))
    return findings


def _gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, loss: Loss) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: whether the attack loss's input gradient, taken as the attack takes it, is all zero or not finite.

    Only the input's gradient is computed: no parameter's ``.grad`` is touched.
    """
    x = images.clone().requires_grad_(True)
    with torch.enable_grad():
        objective = attack_objective(model(x), labels, loss, targeted=False).sum()
        if objective.requires_grad:
            (grad,) = torch.autograd.grad(objective, x, allow_unused=True)
        else:
            grad = None  # the output does not depend on the input at all
    flat = (torch.zeros_like(x) if grad is None else grad.detach()).flatten(1)
    return ~flat.ne(0).any(1), ~torch.isfinite(flat).all(1)


def _which(mask: torch.Tensor, what: str) -> str:
    indices = torch.nonzero(mask).flatten().tolist()
    shown = ", ".join(str(index) for index in indices[:5]) + (", ..." if len(indices) > 5 else "")
    return f"{what} on {len(indices)} of {mask.numel()} clean images (indices {shown})"

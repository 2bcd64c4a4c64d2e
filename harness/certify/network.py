"""The networks certificates handle: a preprocessing step, then affine layers and ReLUs.

Both certifiers read a model as :class:`PiecewiseLinearNetwork`: the
preprocessing of a :class:`~zoo.architectures.ClassifierWithPreprocessing`
(identity, a per-channel normalization, or a binarization, which is
piecewise constant) and a flat list of ``Conv2d``, ``Linear``, ``Flatten``
and ``ReLU`` layers. :func:`check_certifiable` reads the one table of
layer rules (:data:`.layers.RULES`: :data:`CERTIFIABLE_LAYERS`,
:data:`CERTIFIABLE_PREPROCESSING` and the conditions of :func:`layer_problem`
derive from it); :meth:`PiecewiseLinearNetwork.of`, the certifiers and the
run's preflight all go through it, so anything else is refused, with the
layer's name and what is allowed, before any bound is computed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from zoo.architectures import Binarize, ClassifierWithPreprocessing, Normalize

from .layers import RULES, ExactRelaxation, Role, UnsupportedNetwork, rule_for

__all__ = [
    "ALLOWED", "CERTIFIABLE_LAYERS", "CERTIFIABLE_PREPROCESSING", "PiecewiseLinearNetwork", "UnsupportedNetwork",
    "binarization_threshold", "check_certifiable", "layer_problem",
]


def _certifiable(role: Role) -> tuple[type[nn.Module], ...]:
    return tuple(layer_type for layer_type, rule in RULES.items() if rule.role is role and rule.certifiable)


def _listing(words: list[str], conjunction: str) -> str:
    return ", ".join(words[:-1]) + f" {conjunction} {words[-1]}" if len(words) > 1 else words[0]


CERTIFIABLE_LAYERS = _certifiable(Role.LAYER)
"""The layer types (exactly these, not subclasses, which may compute something else) both certifiers have rules for."""

CERTIFIABLE_PREPROCESSING = _certifiable(Role.PREPROCESSING)
"""The preprocessing steps both certifiers have rules for."""

PREPROCESSING_ALLOWED = _listing([RULES[t].allowed for t in CERTIFIABLE_PREPROCESSING], "or")
"""The preprocessing steps in words."""

ALLOWED = (
    f"{_listing([RULES[t].allowed for t in CERTIFIABLE_LAYERS], 'and')}, after an {PREPROCESSING_ALLOWED} preprocessing"
)
"""What :func:`check_certifiable` allows, in words (every refusal quotes it)."""


def _name(module: nn.Module) -> str:
    return type(module).__name__


def layer_problem(layer: nn.Module) -> str | None:
    """Why the certifiers have no rule for ``layer`` (a sentence naming it and what is allowed), or None if they have one.

    A layer whose rule lacks some of the certifiers' rules (a ``MaxPool2d`` has only an interval rule) is named with
    what it lacks.
    """
    rule = RULES.get(type(layer))
    if rule is None or rule.role is not Role.LAYER:
        return f"certificates have no rule for layer {_name(layer)}; supported: {ALLOWED}"
    if not rule.certifiable:
        return (
            f"certificates have no rule for layer {_name(layer)} beyond interval bounds (it has no "
            f"{_listing(list(rule.missing()), 'and no')}); supported: {ALLOWED}"
        )
    problem = rule.problem(layer)
    return None if problem is None else f"{problem}; supported: {ALLOWED}"


def _preprocessing_problem(preprocess: nn.Module) -> str | None:
    if type(preprocess) not in CERTIFIABLE_PREPROCESSING:
        return f"certificates have no rule for the preprocessing {_name(preprocess)}; supported: {PREPROCESSING_ALLOWED}"
    return None


def binarization_threshold(preprocess: Binarize, dtype: torch.dtype) -> float:
    """The smallest value of ``dtype`` that ``preprocess`` maps to 1, as a float.

    A model of dtype ``dtype`` sees pixels of that dtype and compares them in
    it (a float32 model rounds its Python threshold to float32), so its bit
    is ``[x' >= t]`` for every pixel it can see exactly when ``t`` is this
    value. It is found with the model's own comparison: ``preprocess`` is run
    on the values of ``dtype`` a few units in the last place around its
    threshold, and the switch from 0 to 1 among them is the answer.

    Raises
    ------
    UnsupportedNetwork
        The module does not switch once from 0 to 1 near its threshold.
    """
    centre = torch.tensor(preprocess.threshold, dtype=dtype)
    below, above = [centre], [centre]
    for _ in range(4):
        below.append(torch.nextafter(below[-1], torch.tensor(-math.inf, dtype=dtype)))
        above.append(torch.nextafter(above[-1], torch.tensor(math.inf, dtype=dtype)))
    values = torch.stack(below[:0:-1] + above)
    with torch.no_grad():
        bits = preprocess(values)
    switch = torch.nonzero(bits[1:] != bits[:-1]).flatten()
    if not torch.isin(bits, torch.tensor([0.0, 1.0], dtype=bits.dtype)).all() or switch.numel() != 1 or bits[0] != 0:
        raise UnsupportedNetwork(
            f"{preprocess!r} does not switch once from 0 to 1 near its threshold in {dtype}: certificates need a binarization "
            f"[x >= t]; got {bits.tolist()} at {values.tolist()}"
        )
    return float(values[int(switch[0]) + 1])


def _split(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return (model.preprocess, model.net) if isinstance(model, ClassifierWithPreprocessing) else (nn.Identity(), model)


def _flat_layers(net: nn.Module) -> list[nn.Module]:
    """The layers of ``net`` in order: a Sequential's (nested ones flattened, Identity dropped), or ``net`` itself."""
    if not isinstance(net, nn.Sequential):
        return [net]
    return [layer for layer in net.modules() if not isinstance(layer, (nn.Sequential, nn.Identity))]


def check_certifiable(model: nn.Module, input_shape) -> None:
    """Refuse, before any work, a model the certifiers cannot read; the one check behind every certifier and the preflight.

    ``model`` is a :class:`~zoo.architectures.ClassifierWithPreprocessing` or a
    bare ``Sequential``; it is certifiable when its preprocessing is one of
    :data:`CERTIFIABLE_PREPROCESSING` (a binarization that switches once near
    its threshold in the model's dtype), every layer passes
    :func:`layer_problem`, every ``Linear`` reads a flat input, and the last
    layer is a ``Linear`` that produces the logits. Only the architecture and
    the shapes are read (weights may be random).

    Raises
    ------
    UnsupportedNetwork
        Naming the first layer (or preprocessing) without a rule, and what is allowed.
    """
    preprocess, net = _split(model)
    problem = _preprocessing_problem(preprocess)
    if problem is not None:
        raise UnsupportedNetwork(problem)
    layers = _flat_layers(net)
    for layer in layers:
        problem = layer_problem(layer)
        if problem is not None:
            raise UnsupportedNetwork(problem)
    if not layers or type(layers[-1]) is not nn.Linear:
        raise UnsupportedNetwork(f"the network must end in a Linear layer that produces the logits; supported: {ALLOWED}")
    if isinstance(preprocess, Binarize):
        binarization_threshold(preprocess, _dtype(model))
    shape = tuple(int(s) for s in input_shape)
    probe = torch.zeros(1, *shape, dtype=torch.float64)
    with torch.no_grad():
        for layer in layers:
            rule = rule_for(layer)
            problem = rule.input_problem(layer, tuple(probe.shape[1:]))
            if problem is not None:
                raise UnsupportedNetwork(f"{problem}; supported: {ALLOWED}")
            try:
                probe = rule.forward(layer, probe)
            except RuntimeError as error:
                raise UnsupportedNetwork(f"the network does not take images of shape {shape}: {error}") from None
    if probe.dim() != 2:
        raise UnsupportedNetwork(f"the network's logits have shape {tuple(probe.shape[1:])} per image: they must be a vector")


def _dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: its parameters' (float32 for a model without any)."""
    return next((parameter.dtype for parameter in model.parameters()), torch.float32)


@dataclass(frozen=True, eq=False)
class PiecewiseLinearNetwork:
    """A classifier as preprocessing plus ``Conv2d``/``Linear``/``Flatten``/``ReLU`` layers.

    Attributes
    ----------
    preprocess : nn.Module
        ``nn.Identity``, :class:`~zoo.architectures.Normalize` or
        :class:`~zoo.architectures.Binarize`.
    layers : tuple of nn.Module
        In order; the last is the ``Linear`` layer that produces the logits.
    input_shape : tuple of int
        ``(C, H, W)`` of the images.
    model : nn.Module
        The model it was read from (re-run on counterexamples by the exact verification).
    dtype : torch.dtype
        The dtype the model computes in (its parameters'): the unit roundoff of
        the safety margins (:mod:`.safety`) and the dtype of its binarization's
        comparison.
    """

    preprocess: nn.Module
    layers: tuple[nn.Module, ...]
    input_shape: tuple[int, int, int]
    model: nn.Module
    dtype: torch.dtype = None

    def __post_init__(self):
        if self.dtype is None:
            object.__setattr__(self, "dtype", _dtype(self.model))
        # Built directly or by ``of``: the same check, before any bound is computed.
        for layer in self.layers:
            problem = layer_problem(layer)
            if problem is not None:
                raise UnsupportedNetwork(problem)
        problem = _preprocessing_problem(self.preprocess)
        if problem is not None:
            raise UnsupportedNetwork(problem)
        if not self.layers or type(self.layers[-1]) is not nn.Linear:
            raise UnsupportedNetwork(f"the network must end in a Linear layer that produces the logits; supported: {ALLOWED}")

    @classmethod
    def of(cls, model: nn.Module, input_shape) -> "PiecewiseLinearNetwork":
        """Read ``model`` (a ``ClassifierWithPreprocessing`` or a bare ``Sequential``) after :func:`check_certifiable`.

        Raises
        ------
        UnsupportedNetwork
            A layer outside the supported list (named, with what is allowed),
            or a network that does not end in the ``Linear`` layer of the logits.
        """
        check_certifiable(model, input_shape)
        preprocess, net = _split(model)
        return cls(preprocess, tuple(_flat_layers(net)), tuple(int(s) for s in input_shape), model, _dtype(model))

    @functools.cached_property
    def threshold(self) -> float:
        """The binarization's threshold as the model compares it (:func:`binarization_threshold`); binarized networks only."""
        if not self.binarized:
            raise AttributeError("only a binarized network has a threshold")
        return binarization_threshold(self.preprocess, self.dtype)

    @property
    def binarized(self) -> bool:
        return isinstance(self.preprocess, Binarize)

    @functools.cached_property
    def activations(self) -> tuple[nn.ReLU, ...]:
        """The ReLU layers in order: activation ``d`` reads block ``d``'s output."""
        return tuple(layer for layer in self.layers if isinstance(layer, nn.ReLU))

    @functools.cached_property
    def blocks(self) -> tuple[tuple[nn.Module, ...], ...]:
        """The affine layers split at the ReLUs: block ``d`` maps ReLU ``d - 1``'s output (block 0: the
        preprocessed image, a normalization included) to ReLU ``d``'s input; the last block makes the logits."""
        blocks, current = [], [self.preprocess] if isinstance(self.preprocess, Normalize) else []
        for layer in self.layers:
            if isinstance(layer, nn.ReLU):
                blocks.append(tuple(current))
                current = []
            else:
                current.append(layer)
        blocks.append(tuple(current))
        return tuple(blocks)

    @functools.cached_property
    def layer_input_shapes(self) -> tuple[tuple[tuple[int, ...], ...], ...]:
        """The input shape of every layer of every block."""
        shapes, probe = [], torch.zeros(1, *self.input_shape, dtype=torch.float64)
        for block in self.blocks:
            inner = []
            for layer in block:
                inner.append(tuple(probe.shape[1:]))
                probe = rule_for(layer).forward(layer, probe)
            shapes.append(tuple(inner))
            probe = torch.relu(probe)
        return tuple(shapes)

    def block_input_shape(self, depth: int) -> tuple[int, ...]:
        return self.layer_input_shapes[depth][0]

    @functools.cached_property
    def block_relaxations(self) -> tuple[tuple[ExactRelaxation, ...], ...]:
        """The back-substitution step of every layer of every block (all exact: the blocks are affine)."""
        return tuple(
            tuple(rule_for(layer).relaxation(layer, shape) for layer, shape in zip(block, shapes))
            for block, shapes in zip(self.blocks, self.layer_input_shapes)
        )

    @functools.cached_property
    def _jacobians(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        # Per network, so that they go with it (a cache on the method would keep every network alive).
        return {}

    @torch.no_grad()
    def jacobian(self, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``depth`` as coefficient images ``(outputs, *input shape)`` and biases ``(outputs,)``, in float64."""
        if depth not in self._jacobians:
            self._jacobians[depth] = self._block_jacobian(depth)
        return self._jacobians[depth]

    def _block_jacobian(self, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = self.block_input_shape(depth)
        pixels = math.prod(shape)
        basis = torch.cat([torch.zeros(1, pixels, dtype=torch.float64), torch.eye(pixels, dtype=torch.float64)]).view(-1, *shape)
        for layer in self.blocks[depth]:
            basis = rule_for(layer).forward(layer, basis)
        bias = basis[0].flatten()
        return (basis[1:] - basis[0]).flatten(1).T.reshape(-1, *shape).contiguous(), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits, as the model computes them."""
        h = self.preprocess(x)
        for layer in self.layers:
            h = layer(h)
        return h


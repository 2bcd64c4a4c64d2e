"""The networks certificates handle: a preprocessing step, then affine layers and ReLUs.

Both certifiers read a model as :class:`PiecewiseLinearNetwork`: the
preprocessing of a :class:`~zoo.architectures.ClassifierWithPreprocessing`
(identity, a per-channel normalization, or a binarization, which is
piecewise constant) and a flat list of ``Conv2d``, ``Linear``, ``Flatten``
and ``ReLU`` layers. :func:`check_certifiable` holds the one list of what
the bounds have rules for (:data:`CERTIFIABLE_LAYERS`,
:data:`CERTIFIABLE_PREPROCESSING` and the conditions of
:func:`layer_problem`); :meth:`PiecewiseLinearNetwork.of`, the certifiers and
the run's preflight all go through it, so anything else is refused, with
the layer's name and what is allowed, before any bound is computed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from zoo.architectures import Binarize, ClassifierWithPreprocessing, Normalize

__all__ = [
    "CERTIFIABLE_LAYERS", "CERTIFIABLE_PREPROCESSING", "PiecewiseLinearNetwork", "UnsupportedNetwork", "apply_affine",
    "binarization_threshold", "check_certifiable", "conv_zero_padding", "layer_problem",
]

CERTIFIABLE_LAYERS = (nn.Conv2d, nn.Linear, nn.Flatten, nn.ReLU)
"""The layer types (exactly these, not subclasses, which may compute something else) the bounds have rules for."""

CERTIFIABLE_PREPROCESSING = (nn.Identity, Normalize, Binarize)
"""The preprocessing steps the bounds have rules for."""

ALLOWED = (
    "Conv2d (zero padding: padding_mode='zeros', numeric or 'valid' padding, or 'same' with symmetric padding), "
    "Linear (on a flat input), Flatten (start_dim=1, end_dim=-1) and ReLU, "
    "after an Identity, Normalize or Binarize preprocessing"
)
"""What :func:`check_certifiable` allows, in words (every refusal quotes it)."""


class UnsupportedNetwork(ValueError):
    """A model with a layer that no certificate rule covers."""


def _name(module: nn.Module) -> str:
    return type(module).__name__


def conv_zero_padding(layer: nn.Conv2d) -> tuple[int, int] | None:
    """The convolution's padding as ``(rows, columns)`` of zeros on each side, or None where it is not that.

    ``padding='valid'`` is no padding; ``padding='same'`` is symmetric zero padding when the dilated kernel has odd
    size (PyTorch pads even kernels more on one side, which the bounds' transposed convolution cannot express).
    """
    if layer.padding_mode != "zeros":
        return None
    if layer.padding == "valid":
        return (0, 0)
    if layer.padding == "same":
        left_w, right_w, left_h, right_h = layer._reversed_padding_repeated_twice
        return (int(left_h), int(left_w)) if (left_h, left_w) == (right_h, right_w) else None
    return tuple(int(p) for p in layer.padding)


def layer_problem(layer: nn.Module) -> str | None:
    """Why the bounds have no rule for ``layer`` (a sentence naming it), or None if they have one."""
    if type(layer) not in CERTIFIABLE_LAYERS:
        return f"certificates have no rule for layer {_name(layer)}; supported: {ALLOWED}"
    if isinstance(layer, nn.Conv2d) and conv_zero_padding(layer) is None:
        return (
            f"certificates have no rule for {layer!r} (padding={layer.padding!r}, padding_mode={layer.padding_mode!r}): "
            f"the bounds pull functionals back through zero padding only; supported: {ALLOWED}"
        )
    if isinstance(layer, nn.Flatten) and (layer.start_dim, layer.end_dim) != (1, -1):
        return f"certificates have no rule for {layer!r}: only Flatten(start_dim=1, end_dim=-1); supported: {ALLOWED}"
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
    if type(preprocess) not in CERTIFIABLE_PREPROCESSING:
        raise UnsupportedNetwork(
            f"certificates have no rule for the preprocessing {_name(preprocess)}; supported: Identity, Normalize, Binarize"
        )
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
            if isinstance(layer, nn.Linear) and probe.dim() != 2:
                raise UnsupportedNetwork(
                    f"certificates have no rule for {layer!r} on an input of shape {tuple(probe.shape[1:])}: a Linear layer "
                    f"must read a flat input (put a Flatten before it); supported: {ALLOWED}"
                )
            if isinstance(layer, nn.Conv2d) and probe.dim() != 4:
                raise UnsupportedNetwork(f"certificates have no rule for {layer!r} on an input of shape {tuple(probe.shape[1:])}")
            try:
                probe = torch.relu(probe) if isinstance(layer, nn.ReLU) else apply_affine(layer, probe)
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
        if type(self.preprocess) not in CERTIFIABLE_PREPROCESSING:
            raise UnsupportedNetwork(
                f"certificates have no rule for the preprocessing {_name(self.preprocess)}; supported: Identity, Normalize, Binarize"
            )
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
                probe = apply_affine(layer, probe)
            shapes.append(tuple(inner))
            probe = torch.relu(probe)
        return tuple(shapes)

    def block_input_shape(self, depth: int) -> tuple[int, ...]:
        return self.layer_input_shapes[depth][0]

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
            basis = apply_affine(layer, basis)
        bias = basis[0].flatten()
        return (basis[1:] - basis[0]).flatten(1).T.reshape(-1, *shape).contiguous(), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits, as the model computes them."""
        h = self.preprocess(x)
        for layer in self.layers:
            h = layer(h)
        return h


def apply_affine(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """One affine layer (Conv2d, Linear, Flatten, Normalize) in float64."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(h, layer.weight.double(), None if layer.bias is None else layer.bias.double())
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(h, layer.weight.double(), None if layer.bias is None else layer.bias.double())
    if isinstance(layer, Normalize):
        return (h - layer.mean.double()) / layer.std.double()
    return layer(h)

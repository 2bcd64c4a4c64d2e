"""The networks certificates handle: a preprocessing step, then affine layers and ReLUs.

Both certifiers read a model as :class:`PiecewiseLinearNetwork`: the
preprocessing of a :class:`~zoo.architectures.ClassifierWithPreprocessing`
(identity, a per-channel normalization, or a binarization, which is
piecewise constant) and a flat list of ``Conv2d``, ``Linear``, ``Flatten``
and ``ReLU`` layers. Anything else is refused with the layer's name before
any bound is computed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from zoo.architectures import Binarize, ClassifierWithPreprocessing, Normalize

__all__ = ["PiecewiseLinearNetwork", "UnsupportedNetwork", "apply_affine"]

_LAYERS = (nn.Conv2d, nn.Linear, nn.Flatten, nn.ReLU)
_PREPROCESSING = (nn.Identity, Normalize, Binarize)


class UnsupportedNetwork(ValueError):
    """A model with a layer that no certificate rule covers."""


@dataclass(frozen=True, eq=False)
class PiecewiseLinearNetwork:
    """A classifier as preprocessing plus ``Conv2d``/``Linear``/``Flatten``/``ReLU`` layers.

    Attributes
    ----------
    preprocess : nn.Module
        ``nn.Identity``, :class:`~zoo.architectures.Normalize` or
        :class:`~zoo.architectures.Binarize`.
    layers : tuple of nn.Module
        In order; the last is the affine layer that produces the logits.
    input_shape : tuple of int
        ``(C, H, W)`` of the images.
    model : nn.Module
        The model it was read from (re-run on counterexamples by the exact verification).
    """

    preprocess: nn.Module
    layers: tuple[nn.Module, ...]
    input_shape: tuple[int, int, int]
    model: nn.Module

    @classmethod
    def of(cls, model: nn.Module, input_shape) -> "PiecewiseLinearNetwork":
        """Read ``model`` (a ``ClassifierWithPreprocessing`` or a bare ``Sequential``).

        Raises
        ------
        UnsupportedNetwork
            A layer outside the supported list (named), or a network that
            does not end in an affine layer.
        """
        preprocess, net = (model.preprocess, model.net) if isinstance(model, ClassifierWithPreprocessing) else (nn.Identity(), model)
        if not isinstance(preprocess, _PREPROCESSING):
            raise UnsupportedNetwork(
                f"certificates have no rule for the preprocessing {type(preprocess).__name__}; supported: Identity, Normalize, Binarize"
            )
        layers = []
        for layer in net.modules() if isinstance(net, nn.Sequential) else [net]:
            if isinstance(layer, nn.Sequential):
                continue
            if isinstance(layer, nn.Identity):
                continue
            if not isinstance(layer, _LAYERS):
                raise UnsupportedNetwork(
                    f"certificates have no rule for layer {type(layer).__name__}; supported: Conv2d, Linear, Flatten, ReLU "
                    "(after an Identity, Normalize or Binarize preprocessing)"
                )
            layers.append(layer)
        if not layers or not isinstance(layers[-1], (nn.Conv2d, nn.Linear)):
            raise UnsupportedNetwork("the network must end in a Linear (or Conv2d) layer that produces the logits")
        return cls(preprocess, tuple(layers), tuple(int(s) for s in input_shape), model)

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

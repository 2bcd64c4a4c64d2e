"""The certificates' table of layer rules (harness/certify/layers.py) against the layers themselves.

References: each layer's own ``forward`` (PyTorch), on random inputs in float64. An exact rule (a convolution through
its public attributes, an affine layer's pull-back, its sparse matrix) must reproduce it to the rounding of the sums
involved; the ReLU's relaxation must bound it on samples of its input box.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.certify.layers import RULES, ReluRelaxation, Role, UnsupportedNetwork, conv_zero_padding, convolve, rule_for
from harness.certify.network import CERTIFIABLE_LAYERS, CERTIFIABLE_PREPROCESSING, layer_problem
from harness.certify.safety import gamma, unit_roundoff
from zoo.architectures import Normalize, WongResidualBlock

U64 = unit_roundoff(torch.float64)

CONVOLUTIONS = [
    nn.Conv2d(2, 3, 3, padding=1),
    nn.Conv2d(2, 3, 3, padding=(2, 1), stride=2),
    nn.Conv2d(2, 3, 4, padding="same"),
    nn.Conv2d(2, 3, 3, padding="same", dilation=2),
    nn.Conv2d(2, 4, 3, padding="valid", groups=2, bias=False),
    nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(2, 3, 4, padding="same", padding_mode="replicate"),
    nn.Conv2d(2, 3, 3, padding=2, padding_mode="circular"),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("layer", CONVOLUTIONS, ids=repr)
def test_convolve_is_the_layers_own_convolution(layer):
    layer = layer.double()
    h = torch.randn(2, 2, 7, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(convolve(layer, h, layer.weight, layer.bias), layer(h))


def test_zero_padding_is_read_from_the_public_attributes():
    assert conv_zero_padding(nn.Conv2d(1, 1, 3, padding="same")) == (1, 1)
    assert conv_zero_padding(nn.Conv2d(1, 1, 3, padding="same", dilation=(2, 1))) == (2, 1)
    assert conv_zero_padding(nn.Conv2d(1, 1, 3, padding=(2, 1))) == (2, 1)
    assert conv_zero_padding(nn.Conv2d(1, 1, 3, padding="valid")) == (0, 0)
    # PyTorch pads an even kernel one more on the far side: no symmetric padding expresses it.
    assert conv_zero_padding(nn.Conv2d(1, 1, 4, padding="same")) is None
    assert conv_zero_padding(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")) is None


def test_the_table_says_what_each_layer_lacks_and_the_refusals_name_it():
    for layer_type in CERTIFIABLE_LAYERS + CERTIFIABLE_PREPROCESSING:
        assert RULES[layer_type].certifiable
    assert CERTIFIABLE_LAYERS == (nn.Conv2d, nn.Linear, nn.Flatten, nn.ReLU)
    assert all(not RULES[t].missing() for t in CERTIFIABLE_LAYERS)
    for layer in (nn.MaxPool2d(2), WongResidualBlock(2, 2, downsample=False)):
        rule = rule_for(layer)
        assert rule.role is Role.LAYER and rule.missing() == ("linear relaxation", "MILP encoding")
        problem = layer_problem(layer)
        assert type(layer).__name__ in problem and "no linear relaxation and no MILP encoding" in problem
    assert "Normalize" in layer_problem(Normalize((0.5,), (0.2,)))  # a preprocessing step, not a layer
    with pytest.raises(UnsupportedNetwork, match="no rule for layer Tanh"):
        rule_for(nn.Tanh())


def _affine_layers():
    torch.manual_seed(1)
    return [
        (nn.Linear(12, 5), (12,)),
        (nn.Conv2d(2, 3, 3, padding=1, stride=2), (2, 6, 5)),
        (nn.Conv2d(2, 4, 3, padding="same", groups=2, bias=False), (2, 5, 5)),
        (nn.Flatten(), (2, 3, 3)),
        (Normalize((0.4, 0.6), (0.2, 0.3)), (2, 3, 3)),
    ]


@pytest.mark.parametrize("layer, shape", _affine_layers(), ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
def test_an_affine_layers_pull_back_and_matrix_reproduce_its_forward(layer, shape):
    layer = layer.double()
    rule = rule_for(layer)
    generator = torch.Generator().manual_seed(2)
    h = torch.randn(1, *shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        output = layer(h)
        weights = torch.randn(4, *output.shape[1:], generator=generator, dtype=torch.float64)
        pulled, constant = rule.relaxation(layer, shape).pull(weights, 0)
        exact = (weights * output).flatten(1).sum(1)
        # Both sides sum at most (fan-in + outputs + 1) products of these magnitudes.
        magnitude = (weights.abs() * output.abs()).flatten(1).sum(1) + (pulled.abs() * h.abs()).flatten(1).sum(1) + constant.abs()
        terms = h.numel() + output[0].numel() + 1
        tolerance = 2 * gamma(terms, U64) * magnitude
        assert ((pulled * h).flatten(1).sum(1) + constant - exact).abs().le(tolerance).all()
        if layer.__class__ in (nn.Linear, nn.Conv2d):
            encoding = rule.encoding(layer, shape)
            rebuilt = torch.from_numpy(encoding.matrix @ h.flatten().numpy() + encoding.bias)
            bound = gamma(h.numel() + 1, U64) * (output.abs().flatten() + 1)
            assert (rebuilt - output.flatten()).abs().le(bound).all()


def test_the_relu_relaxation_bounds_relu_on_its_input_box():
    generator = torch.Generator().manual_seed(3)
    lower = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    upper = lower + torch.rand(2, 6, generator=generator, dtype=torch.float64) * 2
    relaxation = ReluRelaxation.of(lower, upper)
    weights = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    for example in range(2):
        pulled, constant = relaxation.pull(weights, example)
        for _ in range(50):
            z = lower[example] + (upper[example] - lower[example]) * torch.rand(6, generator=generator, dtype=torch.float64)
            tolerance = 4 * gamma(7, U64) * (weights.abs() @ z.abs() + constant.abs())
            assert (weights @ torch.relu(z) >= pulled @ z + constant - tolerance).all()

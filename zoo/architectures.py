"""Network architectures of the catalogue and the preprocessing that goes inside a model.

Every registered model takes images in ``[0, 1]`` and is a
:class:`ClassifierWithPreprocessing`: a preprocessing module (normalization,
binarization or identity) followed by the bare network, whose state dict is
what published checkpoints hold. Keeping the preprocessing inside the model
means an attack perturbs the images a user sees, and the Wasserstein ball is
defined on those.

The bare networks reproduce the published architectures layer by layer, so
that their state-dict keys match the authors' checkpoints where those exist.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Binarize",
    "ClassifierWithPreprocessing",
    "Normalize",
    "FastCifarNet",
    "cifar_fast_net",
    "cifar_resnet18",
    "cifar_small_resnet",
    "mnist_small_convnet",
]


class Binarize(nn.Module):
    """Threshold pixels to 0 or 1, with a straight-through (BPDA) gradient.

    The forward pass returns ``(x >= threshold)`` as a float tensor of the
    dtype of ``x``. Its true gradient is zero almost everywhere, which would
    leave a gradient attack without a direction, so the backward pass treats
    the step as the identity: Backward Pass Differentiable Approximation
    (Athalye, Carlini, Wagner, ICML 2018).

    Parameters
    ----------
    threshold : float, default 0.5
        Pixels at or above it become 1, the others 0.
    """

    def __init__(self, threshold: float = 0.5):
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hard = (x >= self.threshold).to(x.dtype)
        # ``x - x.detach()`` is exactly zero with gradient one, so the output
        # is ``hard`` bit for bit at any input; the common form
        # ``x + (hard - x).detach()`` rounds to 0 instead of 1 at x = 1e8.
        return hard + (x - x.detach())

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` on ``(B, C, H, W)`` images.

    Parameters
    ----------
    mean, std : sequence of float
        One value per channel; every ``std`` must be positive. Stored as
        buffers (they move with ``.to(device)`` and are saved in the state
        dict, but are not trained).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if min(std) <= 0:
            raise ValueError(f"std={tuple(std)} is invalid: every channel's std must be positive")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())}"


class ClassifierWithPreprocessing(nn.Module):
    """``net(preprocess(x))``: a classifier of ``[0, 1]`` images.

    Parameters
    ----------
    preprocess : nn.Module
        Maps ``[0, 1]`` images to the network's input (e.g. :class:`Normalize`,
        :class:`Binarize`, or :class:`torch.nn.Identity`).
    net : nn.Module
        The bare network; published weights load into ``.net``.
    """

    def __init__(self, preprocess: nn.Module, net: nn.Module):
        super().__init__()
        self.preprocess = preprocess
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(x))


def mnist_small_convnet() -> nn.Sequential:
    """Wong & Kolter (ICML 2018)'s small MNIST network, 1x28x28 -> 10 logits.

    Two 4x4 stride-2 convolutions (16 and 32 filters) and a 100-unit hidden
    layer; state-dict keys ``0.*, 2.*, 5.*, 7.*`` as in the published
    checkpoints of Wong, Schmidt, Kolter (ICML 2019).
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with batch norm and a shortcut.

    The shortcut is a 1x1 convolution with batch norm when the stride or the
    width changes, else the identity. Attribute names follow
    github.com/kuangliu/pytorch-cifar, whose ResNet18 Wong et al. (2019) used.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 3x32x32 images: 3x3 stem, four stages of basic blocks, 4x4 average pool."""

    def __init__(self, blocks_per_stage: Sequence[int], num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        stages = []
        for planes, stride, blocks in zip((64, 128, 256, 512), (1, 2, 2, 2), blocks_per_stage):
            layers = []
            for block_stride in [stride] + [1] * (blocks - 1):
                layers.append(BasicBlock(in_planes, planes, block_stride))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.flatten(1))


def cifar_resnet18() -> CifarResNet:
    """ResNet18 for CIFAR-10 (He et al. 2016, pytorch-cifar variant), 11.17M parameters.

    The architecture of the standard and adversarially trained CIFAR-10
    models of Wong, Schmidt, Kolter (ICML 2019). Takes normalized images.
    """
    return CifarResNet((2, 2, 2, 2))


class WongResidualBlock(nn.Module):
    """Residual block of Wong et al. (NeurIPS 2018): ``relu(skip(x) + conv_b(relu(conv_a(x))))``.

    Without downsampling, ``conv_a`` is 3x3 (stride 1) and ``skip`` is 1x1;
    with downsampling, ``conv_a`` is 4x4 stride 2 and ``skip`` 2x2 stride 2,
    halving height and width. ``conv_b`` is always 3x3 stride 1. All
    convolutions have biases and there is no batch norm (the certified
    training bounds each layer separately).
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: bool):
        super().__init__()
        if downsample:
            self.conv_a = nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1)
            self.skip = nn.Conv2d(in_channels, out_channels, 2, stride=2, padding=0)
        else:
            self.conv_a = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
            self.skip = nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0)
        self.conv_b = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.skip(x) + self.conv_b(F.relu(self.conv_a(x))))


def cifar_small_resnet() -> nn.Sequential:
    """The small CIFAR-10 ResNet of Wong et al. (NeurIPS 2018), 4.21M parameters.

    ``cifar_model_resnet(N=1, factor=1)`` of github.com/locuslab/convex_adversarial:
    a 3x3 convolution to 16 channels, four residual blocks with 16, 16, 32
    and 64 filters (the last two downsample, 32 -> 16 -> 8 pixels), then
    fully connected layers 4096 -> 1000 -> 10. Wong, Schmidt, Kolter (ICML
    2019) attack its l_inf-certified weights. Takes normalized images.
    """
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=1, padding=1),
        nn.ReLU(),
        WongResidualBlock(16, 16, downsample=False),
        WongResidualBlock(16, 16, downsample=False),
        WongResidualBlock(16, 32, downsample=True),
        WongResidualBlock(32, 64, downsample=True),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 1000),
        nn.ReLU(),
        nn.Linear(1000, 10),
    )


class _FrozenScaleBatchNorm(nn.BatchNorm2d):
    """Batch norm with a fixed unit scale (only the shift is learned) and fast running statistics."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class _ConvPoolGroup(nn.Module):
    """conv 3x3 -> max-pool 2 -> BN -> GELU -> conv 3x3 -> BN -> GELU; the convolutions start near the identity."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _FrozenScaleBatchNorm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _FrozenScaleBatchNorm(out_channels)
        for conv in (self.conv1, self.conv2):
            # Identity on the first channels: an implicit residual path at the start of training.
            nn.init.dirac_(conv.weight.data[: conv.weight.shape[1]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.pool(self.conv1(x))))
        return F.gelu(self.norm2(self.conv2(x)))


class FastCifarNet(nn.Module):
    """A small, fast CIFAR-10 network in the manner of the airbench baselines (Jordan 2024), 32x32 -> 10 logits.

    A 2x2 whitening convolution (fixed weights from the principal components
    of training patches, see :meth:`init_whitening`), three conv-pool groups
    of ``widths`` channels, a global max-pool and a linear layer scaled by
    1/9. With widths (64, 128, 128) (0.6M parameters) it trains to about 92%
    on CIFAR-10 in ten epochs. Takes normalized images.
    """

    def __init__(self, widths: Sequence[int] = (64, 128, 128), num_classes: int = 10):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        channels = [24, *widths]
        self.groups = nn.Sequential(*(_ConvPoolGroup(a, b) for a, b in zip(channels[:-1], channels[1:])))
        self.head = nn.Linear(widths[-1], num_classes, bias=False)

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from normalized training ``images`` (N, 3, H, W).

        The 12 filters are the eigenvectors of the 2x2 patch covariance, each
        divided by the square root of its eigenvalue (plus ``eps``), and their
        negatives, so that the GELU after them keeps both signs.
        """
        patches = images.unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 3 * 4).double()
        covariance = patches.T @ patches / patches.shape[0]
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).reshape(12, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(F.gelu(self.whiten(x)))
        return self.head(torch.amax(x, dim=(2, 3))) / 9


def cifar_fast_net() -> FastCifarNet:
    """:class:`FastCifarNet` with widths (64, 128, 128): the benchmark's CPU-trainable CIFAR-10 model."""
    return FastCifarNet((64, 128, 128))

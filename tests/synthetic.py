"""A small world that needs no download and no published weights.

:func:`make_world` writes, into a folder:

- an MNIST-format test split (torchvision's raw idx layout) of digit-like
  synthetic images, read by the real loader of :mod:`harness.data`;
- a tiny convolutional network saved the way third-party training scripts
  often save theirs: the state dict under a key (``"net"``), every key with
  ``nn.DataParallel``'s ``module.`` prefix;
- the plugin file a user would write to register that checkpoint: the
  network, and one ``register_model`` call with declarative checkpoint
  options.

The labels are the network's own predictions, so the clean accuracy is 100%
and every example is a real target for the attack.
"""

from __future__ import annotations

import hashlib
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from conftest import digit_batch

TINY_MODEL = "mnist/tiny_synthetic"
"""The name the plugin registers."""

ARCHITECTURE_SOURCE = textwrap.dedent(
    '''
    from torch import nn


    def tiny_net() -> nn.Sequential:
        """1x28x28 -> 10 logits: one 5x5 stride-2 convolution and a linear layer."""
        return nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 10))
    '''
)

PLUGIN_TEMPLATE = textwrap.dedent(
    '''
    from torch import nn

    import zoo


    @zoo.register_model(
        "{name}",
        dataset=zoo.Dataset.MNIST,
        trained_for=zoo.TrainedFor.NONE,
        training="a randomly initialized network whose predictions are the synthetic labels",
        weights=zoo.WeightsFile("{filename}", "{sha256}", url=None),
        state_dict_key="net",
        strip_prefix="module.",
    )
    def tiny_synthetic():
        return zoo.ClassifierWithPreprocessing(nn.Identity(), tiny_net())
    '''
)


@dataclass(frozen=True)
class World:
    """Where :func:`make_world` put everything."""

    data_root: Path
    weights_dir: Path
    plugin: Path
    model: str
    test_examples: int


def tiny_net() -> torch.nn.Module:
    namespace: dict = {}
    exec(ARCHITECTURE_SOURCE, namespace)
    return namespace["tiny_net"]()


def plugin_source(name: str, checkpoint: Path) -> str:
    """The text of a plugin file registering the tiny network under ``name``, its weights in ``checkpoint``."""
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    return ARCHITECTURE_SOURCE + PLUGIN_TEMPLATE.format(name=name, filename=checkpoint.name, sha256=sha256)


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_world(folder: Path, test_examples: int = 48, seed: int = 0, train_examples: int = 192) -> World:
    """Write the synthetic data (test and training splits), checkpoint and plugin under ``folder``."""
    torch.manual_seed(seed)
    net = tiny_net().eval()
    raw = folder / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, count, offset in (("t10k", test_examples, 0), ("train", train_examples, 1)):
        pixels = np.round(digit_batch(seed + offset, count, (1, 28, 28)) * 255).astype(np.uint8)
        with torch.no_grad():
            labels = net(torch.from_numpy(pixels.astype(np.float32) / 255)).argmax(1).numpy()
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", pixels[:, 0])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    weights_dir = folder / "weights"
    weights_dir.mkdir()
    checkpoint = weights_dir / "tiny_synthetic.pt"
    torch.save({"net": {f"module.{key}": value for key, value in net.state_dict().items()}, "epoch": 3}, checkpoint)
    plugin = folder / "plugins" / "tiny_synthetic_plugin.py"
    plugin.parent.mkdir()
    plugin.write_text(plugin_source(TINY_MODEL, checkpoint))
    return World(folder / "data", weights_dir, plugin, TINY_MODEL, test_examples)

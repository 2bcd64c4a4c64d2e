"""The model catalogue: classifiers looked up by name, with their weights.

A grid names a model (``model=mnist/standard``); :func:`model` turns that into
a ready module: built, preprocessing included, weights loaded after their
sha256 is checked, in eval mode. Every model takes images in ``[0, 1]``.

Weights files are looked up in one folder, the first of:

1. the ``weights_dir`` argument;
2. the ``WASSERSTEIN_BENCH_WEIGHTS`` environment variable;
3. ``$XDG_CACHE_HOME/wasserstein-robustness-bench/weights``, by default
   ``~/.cache/wasserstein-robustness-bench/weights``.

A missing file is downloaded from its public URL only when asked
(``download=True``); a local checkpoint without one (``url=None``) must be
in the folder already. Third parties add models with the :func:`register_model`
decorator, exactly like the built-ins, usually in a plugin (:mod:`zoo.plugins`).
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .architectures import (
    Binarize,
    ClassifierWithPreprocessing,
    Normalize,
    cifar_fast_net,
    cifar_resnet18,
    cifar_small_resnet,
    mnist_small_convnet,
)
from .registry import Registry

WEIGHTS_ENV_VAR = "WASSERSTEIN_BENCH_WEIGHTS"
"""Environment variable naming the weights folder when no ``weights_dir`` is passed."""

_CACHE_SUBDIR = Path("wasserstein-robustness-bench") / "weights"
TRAINED_SUBDIR = "trained"
"""Subfolder of the weights folder holding the weights that recipes trained."""
_HASH_CHUNK_BYTES = 1 << 20


class Dataset(enum.Enum):
    """The data set a model classifies."""

    MNIST = "mnist"
    """28x28 grey digits, 10 classes."""
    CIFAR10 = "cifar10"
    """32x32 colour images, 10 classes."""


class TrainedFor(enum.Enum):
    """The threat model a model was trained to resist."""

    NONE = "none"
    """Standard training on clean images."""
    LINF_CERTIFIED = "linf_certified"
    """Provably robust training against an l_inf ball (Wong & Kolter 2018)."""
    WASSERSTEIN_ADVERSARIAL = "wasserstein_adversarial"
    """PGD adversarial training in a Wasserstein ball (Wong, Schmidt, Kolter 2019)."""


class GradientMode(enum.Enum):
    """What the gradient of a model's output with respect to its input is."""

    EXACT = "exact"
    """The true gradient: every layer is differentiable almost everywhere."""
    BPDA_STRAIGHT_THROUGH = "bpda_straight_through"
    """A non-differentiable preprocessing (binarization) is treated as the
    identity in the backward pass (Athalye, Carlini, Wagner 2018); attacks
    record this, since their gradient is an approximation."""


@dataclass(frozen=True)
class WeightsFile:
    """A published weights file.

    Attributes
    ----------
    filename : str
        Name of the file inside the weights folder.
    sha256 : str
        Expected SHA-256 of the file, 64 lowercase hexadecimal digits.
    url : str or None
        Where it can be downloaded from; None for a local checkpoint with no
        public source (it must already be in the weights folder).
    """

    filename: str
    sha256: str
    url: str | None

    def __post_init__(self):
        if not self.filename or Path(self.filename).name != self.filename:
            raise ValueError(f"filename={self.filename!r} is invalid: it must be a bare file name, without folders")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"sha256={self.sha256!r} is invalid: it must be 64 lowercase hexadecimal digits")
        if self.url is not None and not self.url:
            raise ValueError("url='' is invalid: give the public URL of the file, or None if it has none")


_KEYS_SHOWN = 20
"""At most this many keys of a checkpoint level are quoted in an error message."""


def _described_keys(level: Mapping) -> str:
    keys = [repr(key) for key in level]
    shown = ", ".join(keys[:_KEYS_SHOWN])
    if len(keys) > _KEYS_SHOWN:
        shown += f", ... ({len(keys) - _KEYS_SHOWN} more)"
    return f"[{shown}]"


def _object_at_key_path(checkpoint: Any, state_dict_key: str, path: Path) -> Any:
    """Descend ``state_dict_key`` into ``checkpoint``: dots descend, an integer component indexes a list."""
    node = checkpoint
    walked = "the checkpoint"
    for component in state_dict_key.split("."):
        where = f"{path}: state_dict_key={state_dict_key!r} does not fit the checkpoint: {walked}"
        if isinstance(node, Mapping):
            if component not in node:
                raise ValueError(f"{where} has no key {component!r}; its keys are {_described_keys(node)}")
            node = node[component]
        elif isinstance(node, (list, tuple)):
            if not component.isdigit() or int(component) >= len(node):
                raise ValueError(
                    f"{where} is a {type(node).__name__} of {len(node)} items, so {component!r} must be an "
                    f"index from 0 to {len(node) - 1}"
                )
            node = node[int(component)]
        else:
            raise ValueError(
                f"{where} is of type {type(node).__name__}, which has no key {component!r} "
                "(only dicts and lists are descended)"
            )
        walked += f"[{component!r}]"
    return node


@dataclass(frozen=True)
class ModelSpec:
    """One catalogue entry.

    Attributes
    ----------
    name : str
        Registry key, ``"<dataset>/<variant>"`` by convention, e.g. ``"mnist/standard"``.
    dataset : Dataset
    architecture : str
        Short name of the bare network, e.g. ``"mnist_small_convnet"``.
    builder : callable
        Returns a fresh, untrained :class:`~zoo.architectures.ClassifierWithPreprocessing`
        (preprocessing included); weights load into its ``.net``.
    trained_for : TrainedFor
        The threat model the weights were (or are to be) trained against.
    training : str
        The training recipe, or where published weights come from.
    paper : str
        Citation of the paper the model comes from or is evaluated in.
    clean_accuracy : float or None
        Reference accuracy of these weights on the full clean test set, in
        percent; None without weights.
    weights : WeightsFile or None
        Published weights; None for an architecture-only entry, whose
        weights come from a training step.
    gradient_mode : GradientMode
        Whether input gradients are exact or a BPDA approximation.
    state_dict_key : str or None
        Where the state dict of ``.net`` lies inside the object stored in the
        weights file: a path of keys, where dots descend and an integer
        component indexes a list, e.g. ``"state_dict.0"`` for
        ``checkpoint["state_dict"][0]``; None when the file holds the state
        dict itself.
    strip_prefix : str or None
        Removed from every key of the state dict that starts with it, e.g.
        ``"module."`` for a network saved from ``nn.DataParallel``.
    recipe : str or None
        The training recipe (``harness.train``) whose run produces the
        weights, for an entry without published ones: they are read from the
        weights folder's ``trained/`` subfolder, checked against the sha256
        of their training record (see :func:`training_record`).
    """

    name: str
    dataset: Dataset
    architecture: str
    builder: Callable[[], ClassifierWithPreprocessing]
    trained_for: TrainedFor
    training: str
    paper: str
    clean_accuracy: float | None = None
    weights: WeightsFile | None = None
    gradient_mode: GradientMode = GradientMode.EXACT
    state_dict_key: str | None = None
    strip_prefix: str | None = None
    recipe: str | None = None

    def __post_init__(self):
        if self.recipe is not None and self.weights is not None:
            raise ValueError(
                f"model {self.name!r} has both published weights and a recipe ({self.recipe!r}): register the "
                "recipe's model under a name of its own"
            )
        if self.clean_accuracy is not None and not 0.0 <= self.clean_accuracy <= 100.0:
            raise ValueError(f"clean_accuracy={self.clean_accuracy!r} is invalid: it is a percentage in [0, 100]")
        if self.state_dict_key is not None and not all(self.state_dict_key.split(".")):
            raise ValueError(
                f"state_dict_key={self.state_dict_key!r} is invalid: it is a dot-separated path of non-empty keys "
                "(e.g. 'net' or 'state_dict.0'), or None for a file holding the state dict itself"
            )
        if self.strip_prefix == "":
            raise ValueError("strip_prefix='' is invalid: give the prefix to remove (e.g. 'module.'), or None")

    def build(self) -> ClassifierWithPreprocessing:
        """A fresh, randomly initialized model (training mode), e.g. to train it."""
        module = self.builder()
        if not isinstance(module, ClassifierWithPreprocessing):
            raise TypeError(
                f"the builder of model {self.name!r} returned {type(module).__name__}; it must return a "
                "zoo.architectures.ClassifierWithPreprocessing (preprocessing, then the network whose weights are loaded)"
            )
        return module

    def load(
        self,
        *,
        weights_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        download: bool = False,
    ) -> ClassifierWithPreprocessing:
        """The model with its published weights, in eval mode: see :func:`model`."""
        path = _verified_weights_file(self, weights_dir, download)
        # All published checkpoints of the catalogue hold only tensors and
        # plain containers, so the safe loader suffices.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = self._state_dict_in(checkpoint, path)
        module = self.build()
        try:
            module.net.load_state_dict(state_dict)
        except RuntimeError as error:
            raise ValueError(
                f"{path}: the checkpoint does not fit model {self.name!r} (architecture {self.architecture}): {error}"
            ) from error
        return module.to(device).eval()

    def _state_dict_in(self, checkpoint: Any, path: Path) -> Mapping[str, torch.Tensor]:
        """The state dict of ``.net`` inside ``checkpoint``, the object loaded from the weights file ``path``.

        Raises
        ------
        ValueError
            ``state_dict_key`` does not lead to a dict in the checkpoint; the
            message names the key path, the keys present where it failed and
            the file.
        """
        state_dict = checkpoint
        if self.state_dict_key is not None:
            state_dict = _object_at_key_path(checkpoint, self.state_dict_key, path)
        if not isinstance(state_dict, Mapping):
            raise ValueError(
                f"{path}: the state dict of model {self.name!r} must be a dict, but "
                f"{'the checkpoint' if self.state_dict_key is None else f'state_dict_key={self.state_dict_key!r}'} "
                f"holds an object of type {type(state_dict).__name__}"
            )
        if self.strip_prefix is not None:
            state_dict = {key.removeprefix(self.strip_prefix): value for key, value in state_dict.items()}
        return state_dict


class ModelRegistry(Registry[ModelSpec]):
    """A name -> :class:`ModelSpec` table."""

    noun = "model"


# Builders: the bare network behind its preprocessing.


def _mnist_small_convnet_on_raw_pixels() -> ClassifierWithPreprocessing:
    return ClassifierWithPreprocessing(nn.Identity(), mnist_small_convnet())


def _mnist_small_convnet_on_binarized_pixels() -> ClassifierWithPreprocessing:
    return ClassifierWithPreprocessing(Binarize(0.5), mnist_small_convnet())


def _cifar_resnet18_normalized() -> ClassifierWithPreprocessing:
    # CIFAR-10 channel statistics as in pytorch-cifar, used by Wong et al. 2019.
    return ClassifierWithPreprocessing(Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)), cifar_resnet18())


def _cifar_fast_net_normalized() -> ClassifierWithPreprocessing:
    return ClassifierWithPreprocessing(Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), cifar_fast_net())


def _cifar_small_resnet_normalized() -> ClassifierWithPreprocessing:
    # The ImageNet means with one std for all channels, as in convex_adversarial's CIFAR loader.
    return ClassifierWithPreprocessing(Normalize((0.485, 0.456, 0.406), (0.225, 0.225, 0.225)), cifar_small_resnet())


_WONG_2019 = "Wong, Schmidt, Kolter, Wasserstein Adversarial Examples via Projected Sinkhorn Iterations, ICML 2019"
_WONG_2019_CHECKPOINTS = "https://github.com/locuslab/projected_sinkhorn/raw/master/checkpoints/"
_MNIST_SGD = "SGD, momentum 0.9, weight decay 5e-4, batch 128, learning rate 0.1 then 0.01 after 10 epochs"

BUILTIN_MODELS = (
    ModelSpec(
        name="mnist/standard",
        dataset=Dataset.MNIST,
        architecture="mnist_small_convnet",
        builder=_mnist_small_convnet_on_raw_pixels,
        trained_for=TrainedFor.NONE,
        training="standard training; published weights of the paper (checkpoints/mnist_vanilla.pth)",
        paper=f"{_WONG_2019} (Table 1: 98.90%)",
        clean_accuracy=98.89,
        weights=WeightsFile(
            "mnist_vanilla.pth",
            "f95e9ca5f79c6f05c4373f9fa18fb89e1606f939a538390822bce391e7c7e60d",
            _WONG_2019_CHECKPOINTS + "mnist_vanilla.pth",
        ),
        state_dict_key="state_dict.0",
    ),
    ModelSpec(
        name="mnist/binarized",
        dataset=Dataset.MNIST,
        architecture="mnist_small_convnet",
        builder=_mnist_small_convnet_on_binarized_pixels,
        trained_for=TrainedFor.NONE,
        training="standard training on inputs binarized at 0.5; published weights of the paper "
        "(checkpoints/mnist_binarize.pth)",
        paper=f"{_WONG_2019} (Table 1: 98.73%)",
        clean_accuracy=98.73,
        weights=WeightsFile(
            "mnist_binarize.pth",
            "a3921ef74e5bcad28e276d2cc00ce5948d4295786aaf6fd7eda81473e81b71ae",
            _WONG_2019_CHECKPOINTS + "mnist_binarize.pth",
        ),
        gradient_mode=GradientMode.BPDA_STRAIGHT_THROUGH,
        state_dict_key="state_dict.0",
    ),
    ModelSpec(
        name="mnist/linf_certified",
        dataset=Dataset.MNIST,
        architecture="mnist_small_convnet",
        builder=_mnist_small_convnet_on_raw_pixels,
        trained_for=TrainedFor.LINF_CERTIFIED,
        training="provably robust training against l_inf eps=0.1 (convex outer adversarial polytope); "
        "published weights (checkpoints/mnist_robust.pth)",
        paper=f"Wong & Kolter, Provable Defenses via the Convex Outer Adversarial Polytope, ICML 2018; "
        f"evaluated in {_WONG_2019} (Table 1: 98.20%)",
        clean_accuracy=98.20,
        weights=WeightsFile(
            "mnist_robust.pth",
            "95014ab0c04c73f48b3be0cb7acc42aff60ce4420c6c43bec25e9a1447279e08",
            _WONG_2019_CHECKPOINTS + "mnist_robust.pth",
        ),
    ),
    ModelSpec(
        name="mnist/wasserstein_adversarial",
        dataset=Dataset.MNIST,
        architecture="mnist_small_convnet",
        builder=_mnist_small_convnet_on_raw_pixels,
        trained_for=TrainedFor.WASSERSTEIN_ADVERSARIAL,
        training="PGD adversarial training in the Wasserstein ball, 5x5 local transport, adaptive eps from 0.1 "
        f"(x1.4 every 5 of at most 50 steps), {_MNIST_SGD}; published weights (checkpoints/mnist_adv_training.pth)",
        paper=f"{_WONG_2019} (Table 1: 96.95%)",
        clean_accuracy=97.28,
        weights=WeightsFile(
            "mnist_adv_training.pth",
            "cb1b02fecc0fa07a0b86a22ef87187c1e849ebaa24cd8f8004f039a0f9871f32",
            _WONG_2019_CHECKPOINTS + "mnist_adv_training.pth",
        ),
        state_dict_key="net",
        strip_prefix="module.",
    ),
    *(
        ModelSpec(
            name=f"mnist/trained_{kind}",
            dataset=Dataset.MNIST,
            architecture="mnist_small_convnet",
            builder=_mnist_small_convnet_on_binarized_pixels if kind == "binarized" else _mnist_small_convnet_on_raw_pixels,
            trained_for=trained_for,
            training=f"trained by the benchmark's recipe mnist_{kind}: {training}",
            paper=f"the benchmark's own; compare {published}",
            gradient_mode=GradientMode.BPDA_STRAIGHT_THROUGH if kind == "binarized" else GradientMode.EXACT,
            recipe=f"mnist_{kind}",
        )
        for kind, trained_for, training, published in (
            ("standard", TrainedFor.NONE, "standard training", "mnist/standard"),
            ("binarized", TrainedFor.NONE, "standard training on inputs binarized at 0.5", "mnist/binarized"),
            ("linf_certified", TrainedFor.LINF_CERTIFIED, "interval bound propagation against l_inf eps 0.1",
             "mnist/linf_certified"),
            ("wasserstein_sinkhorn", TrainedFor.WASSERSTEIN_ADVERSARIAL,
             "Wasserstein adversarial training with projected Sinkhorn (the paper's Algorithm 1)",
             "mnist/wasserstein_adversarial"),
            ("wasserstein_plan_pgd", TrainedFor.WASSERSTEIN_ADVERSARIAL,
             "Wasserstein adversarial training with plan-space PGD in the boxed ball", "mnist/wasserstein_adversarial"),
            ("wasserstein_plan_pgd_fast", TrainedFor.WASSERSTEIN_ADVERSARIAL,
             "Wasserstein adversarial training with plan-space PGD in the boxed ball, one Newton step of the box "
             "projection per attack step", "mnist/wasserstein_adversarial"),
            ("wasserstein_plan_pgd_full", TrainedFor.WASSERSTEIN_ADVERSARIAL,
             "Wasserstein adversarial training with plan-space PGD in the boxed ball on the whole training set, one "
             "Newton step of the box projection per attack step", "mnist/wasserstein_adversarial"),
        )
    ),
    ModelSpec(
        name="cifar10/fast_standard",
        dataset=Dataset.CIFAR10,
        architecture="cifar_fast_net",
        builder=_cifar_fast_net_normalized,
        trained_for=TrainedFor.NONE,
        training="trained by the benchmark's recipe cifar10_fast_standard (fast baseline in the manner of airbench, "
        "trainable on a CPU)",
        paper="the benchmark's own; Jordan 2024 (airbench) for the training scheme",
        recipe="cifar10_fast_standard",
    ),
    ModelSpec(
        name="cifar10/resnet18",
        dataset=Dataset.CIFAR10,
        architecture="cifar_resnet18",
        builder=_cifar_resnet18_normalized,
        trained_for=TrainedFor.NONE,
        training="trained by the benchmark's recipe cifar10_resnet18_standard; the paper trains this architecture "
        "normally (94.70% clean, Table 1)",
        paper=_WONG_2019,
        recipe="cifar10_resnet18_standard",
    ),
    ModelSpec(
        name="cifar10/resnet18_wasserstein_adversarial",
        dataset=Dataset.CIFAR10,
        architecture="cifar_resnet18",
        builder=_cifar_resnet18_normalized,
        trained_for=TrainedFor.WASSERSTEIN_ADVERSARIAL,
        training="trained by the benchmark's recipe cifar10_resnet18_wasserstein (Algorithm 1, adaptive eps from "
        "0.01); the paper's reaches 80.7% clean",
        paper=_WONG_2019,
        recipe="cifar10_resnet18_wasserstein",
    ),
    ModelSpec(
        name="cifar10/small_resnet",
        dataset=Dataset.CIFAR10,
        architecture="cifar_small_resnet",
        builder=_cifar_small_resnet_normalized,
        trained_for=TrainedFor.LINF_CERTIFIED,
        training="trained by the benchmark's recipe cifar10_small_resnet_linf_certified (interval bound propagation, "
        "l_inf eps 2/255); the convex-polytope weights the paper evaluates reach 66.33% clean (Table 1)",
        paper=f"Wong, Schmidt, Metzen, Kolter, Scaling Provable Adversarial Defenses, NeurIPS 2018; "
        f"evaluated in {_WONG_2019}",
        recipe="cifar10_small_resnet_linf_certified",
    ),
)

_REGISTRY = ModelRegistry(BUILTIN_MODELS)


def register_model(
    name: str,
    *,
    dataset: Dataset,
    trained_for: TrainedFor,
    training: str = "",
    paper: str = "",
    clean_accuracy: float | None = None,
    weights: WeightsFile | None = None,
    gradient_mode: GradientMode = GradientMode.EXACT,
    state_dict_key: str | None = None,
    strip_prefix: str | None = None,
    architecture: str | None = None,
    recipe: str | None = None,
    registry: ModelRegistry | None = None,
):
    """Decorator adding a model builder under ``name``.

    The builder takes no arguments and returns a
    :class:`~zoo.architectures.ClassifierWithPreprocessing`; the keyword
    arguments are the :class:`ModelSpec` fields. ``architecture`` defaults to
    the builder's name. The builder is returned unchanged.

    Put the call in a plugin (see :mod:`zoo.plugins`) to make the model
    usable in a grid without editing the project.

    Example
    -------
    A checkpoint saved as ``{"net": model.state_dict(), "epoch": 30}`` from an
    ``nn.DataParallel``, with no public copy:

    >>> @register_model(                                              # doctest: +SKIP
    ...     "mnist/my_net", dataset=Dataset.MNIST, trained_for=TrainedFor.NONE,
    ...     weights=WeightsFile("my_net.pt", "<sha256>", url=None),
    ...     state_dict_key="net", strip_prefix="module.")
    ... def my_net():
    ...     return ClassifierWithPreprocessing(nn.Identity(), mnist_small_convnet())
    """

    def decorate(builder):
        (registry or _REGISTRY).add(
            ModelSpec(
                name=name,
                dataset=dataset,
                architecture=architecture or builder.__name__,
                builder=builder,
                trained_for=trained_for,
                training=training,
                paper=paper,
                clean_accuracy=clean_accuracy,
                weights=weights,
                gradient_mode=gradient_mode,
                state_dict_key=state_dict_key,
                strip_prefix=strip_prefix,
                recipe=recipe,
            )
        )
        return builder

    return decorate


def model(
    name: str,
    *,
    weights_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    download: bool = False,
) -> ClassifierWithPreprocessing:
    """The registered model ``name`` with its weights, ready to attack.

    Parameters
    ----------
    name : str
        A registered name (see :func:`models`), e.g. ``"mnist/standard"``.
    weights_dir : str or os.PathLike, optional
        Folder holding the weights file; see :func:`resolve_weights_dir` for
        the folder used when it is not given.
    device : str or torch.device, default "cpu"
    download : bool, default False
        Fetch a missing weights file from its public URL into the weights
        folder instead of raising (impossible for a local checkpoint,
        ``url=None``).

    Returns
    -------
    ClassifierWithPreprocessing
        In eval mode, taking ``(B, C, H, W)`` images in ``[0, 1]`` and
        returning logits. Parameters keep ``requires_grad=True`` so the same
        module can be fine-tuned; attacks should take input gradients with
        ``torch.autograd.grad(loss, x)``, which computes no parameter gradients.

    Raises
    ------
    ValueError
        Unknown name (the message lists the registered ones); an entry
        without published weights; a weights file whose sha256 differs from
        the catalogue's; a ``state_dict_key`` that does not fit the checkpoint
        (the message names the key path, the keys present and the file); a
        checkpoint that does not fit the architecture.
    FileNotFoundError
        The weights file is missing and ``download`` is False, or it has no
        public URL; the message names the file, the folder searched, the URL
        (or that there is none), the sha256 and the settings that change the
        folder.
    OSError
        The download failed; the message says how to fetch the file by hand.
    """
    return _REGISTRY.spec(name).load(weights_dir=weights_dir, device=device, download=download)


def model_spec(name: str) -> ModelSpec:
    """The entry registered as ``name``; an unknown name raises ValueError listing the registered ones."""
    return _REGISTRY.spec(name)


def models() -> list[ModelSpec]:
    """All registered models, sorted by name."""
    return _REGISTRY.specs()


def resolve_weights_dir(weights_dir: str | os.PathLike | None = None) -> Path:
    """The folder weights files are looked up in (it may not exist yet).

    ``weights_dir`` if given; else the ``WASSERSTEIN_BENCH_WEIGHTS``
    environment variable if set and non-empty; else
    ``wasserstein-robustness-bench/weights`` in the user's cache folder
    (``$XDG_CACHE_HOME``, by default ``~/.cache``).
    """
    return _weights_dir_and_origin(weights_dir)[0]


def weights_path(spec: ModelSpec | str, weights_dir: str | os.PathLike | None = None) -> Path:
    """Where the weights file of a model (a spec or a registered name) is looked up.

    Raises
    ------
    ValueError
        The entry has no published weights.
    """
    if isinstance(spec, str):
        spec = _REGISTRY.spec(spec)
    if spec.weights is None and spec.recipe is not None:
        return trained_weights_path(spec, weights_dir)
    weights = _published_weights(spec)
    return resolve_weights_dir(weights_dir) / weights.filename


def _weights_dir_and_origin(weights_dir: str | os.PathLike | None) -> tuple[Path, str]:
    if weights_dir is not None:
        return Path(weights_dir).expanduser(), "the weights_dir argument"
    from_env = os.environ.get(WEIGHTS_ENV_VAR, "")
    if from_env:
        return Path(from_env).expanduser(), f"the {WEIGHTS_ENV_VAR} environment variable"
    cache_home = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG specification says to ignore a relative XDG_CACHE_HOME.
    if not cache_home or not os.path.isabs(cache_home):
        cache_home = Path.home() / ".cache"
    return Path(cache_home) / _CACHE_SUBDIR, "the default cache folder"


def _published_weights(spec: ModelSpec) -> WeightsFile:
    if spec.weights is None and spec.recipe is not None:
        raise ValueError(f"model {spec.name!r} has no published weights: its recipe {spec.recipe!r} trains them")
    if spec.weights is None:
        raise ValueError(
            f"model {spec.name!r} has no published weights: it is an architecture-only entry and must be trained "
            f"first; its spec's build() gives the untrained model. Training: {spec.training}"
        )
    return spec.weights


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _how_to_fix(weights: WeightsFile, folder: Path, *, offer_download: bool) -> str:
    if weights.url is None:
        options = [f"copy the file into {folder}"]
    else:
        options = [f"download it by hand (e.g. curl -L -o {folder / weights.filename} {weights.url})"]
    options += [
        "pass weights_dir=... (the folder that holds it)",
        f"set the {WEIGHTS_ENV_VAR} environment variable to that folder",
    ]
    if offer_download and weights.url is not None:
        options.append("pass download=True to fetch it automatically")
    return "To fix it: " + ", or ".join(options) + "."


def _source_line(weights: WeightsFile) -> str:
    if weights.url is None:
        return "It has no public URL: it is a local checkpoint that only its owner can provide."
    return f"Public URL: {weights.url}"


def trained_weights_path(spec: ModelSpec | str, weights_dir: str | os.PathLike | None = None) -> Path:
    """Where the weights a recipe trains for a model are kept: ``<weights folder>/trained/<dataset>__<variant>.pt``.

    The training record is the file of the same name ending in ``.json``.
    """
    name = spec if isinstance(spec, str) else spec.name
    return resolve_weights_dir(weights_dir) / TRAINED_SUBDIR / (name.replace("/", "__") + ".pt")


def training_record(spec: ModelSpec | str, weights_dir: str | os.PathLike | None = None) -> dict | None:
    """The training record of a recipe-trained model (recipe, hyperparameters, accuracy, time, ...), None if untrained."""
    path = trained_weights_path(spec, weights_dir).with_suffix(".json")
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _verified_trained_file(spec: ModelSpec, weights_dir: str | os.PathLike | None) -> Path:
    path = trained_weights_path(spec, weights_dir)
    record = training_record(spec, weights_dir)
    if not path.is_file() or record is None:
        raise FileNotFoundError(
            f"model {spec.name!r} has no trained weights yet: {path} and its record {path.with_suffix('.json').name} "
            f"are made by its recipe {spec.recipe!r}. Train it with `python -m harness.train {spec.name}`, or run "
            "a grid that names it with train_missing=true."
        )
    actual = sha256_of_file(path)
    if actual != record.get("sha256"):
        raise ValueError(
            f"{path}: sha256 {actual} differs from its training record's {record.get('sha256')!r}: the file was "
            "changed after training; train the model again"
        )
    return path


def _verified_weights_file(spec: ModelSpec, weights_dir: str | os.PathLike | None, download: bool) -> Path:
    if spec.weights is None and spec.recipe is not None:
        return _verified_trained_file(spec, weights_dir)
    weights = _published_weights(spec)
    folder, origin = _weights_dir_and_origin(weights_dir)
    path = folder / weights.filename
    if not path.is_file():
        if not download or weights.url is None:
            cannot_download = " download=True cannot fetch it: there is no public URL." if download else ""
            raise FileNotFoundError(
                f"weights file {weights.filename!r} of model {spec.name!r} not found in {folder} "
                f"(the folder given by {origin}).{cannot_download}\n"
                f"{_source_line(weights)}\n"
                f"Expected sha256: {weights.sha256}\n" + _how_to_fix(weights, folder, offer_download=True)
            )
        _download(weights, folder)
    actual = sha256_of_file(path)
    if actual != weights.sha256:
        replacement = (
            "replace it with the checkpoint registered for this model"
            if weights.url is None
            else f"delete it and load again with download=True, or fetch it from {weights.url}"
        )
        raise ValueError(
            f"{path}: sha256 mismatch, expected {weights.sha256} but the file has {actual}. It is corrupt or not "
            f"the registered file; {replacement}."
        )
    return path


def _download(weights: WeightsFile, folder: Path) -> None:
    """Fetch ``weights`` (which has a URL) into ``folder``; the file takes its final name only once its sha256 is right."""
    partial = folder / f".{weights.filename}.{uuid.uuid4().hex}.partial"
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, os.fspath(partial), progress=False)
        except OSError as error:  # urllib's URLError and HTTPError are OSErrors
            raise OSError(
                f"could not download {weights.url} into {folder}: {error}\n"
                f"Expected sha256: {weights.sha256}\n" + _how_to_fix(weights, folder, offer_download=False)
            ) from error
        actual = sha256_of_file(partial)
        if actual != weights.sha256:
            raise ValueError(
                f"the file downloaded from {weights.url} has sha256 {actual}, expected {weights.sha256}; "
                "it was not kept. The download was corrupted or the file at that URL changed."
            )
        os.replace(partial, folder / weights.filename)
    finally:
        partial.unlink(missing_ok=True)

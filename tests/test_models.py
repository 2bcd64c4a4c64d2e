"""Tests for the model catalogue (zoo/model_registry.py) and its architectures (zoo/architectures.py).

The published MNIST weights are read from the folder named by the
``WEIGHTS_DIR`` environment variable and MNIST from the data root named by
``DATA_ROOT``; tests that need them skip when they are unset. Custom models
are registered in isolated :class:`zoo.ModelRegistry` objects, with weights
saved to ``tmp_path``, so the global catalogue is left untouched and no
network is used (downloads come from ``file://`` URLs).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from harness.data import mnist_test_subset
from zoo.architectures import WongResidualBlock, cifar_resnet18, cifar_small_resnet, mnist_small_convnet

pytestmark = pytest.mark.usefixtures("single_thread")

MNIST_MODELS = ("mnist/binarized", "mnist/linf_certified", "mnist/standard", "mnist/wasserstein_adversarial")
TRAINED_MNIST_MODELS = tuple(
    f"mnist/trained_{kind}" for kind in (
        "binarized", "linf_certified", "standard", "wasserstein_plan_pgd", "wasserstein_plan_pgd_fast",
        "wasserstein_plan_pgd_full", "wasserstein_sinkhorn",
    )
)
CIFAR_MODELS = ("cifar10/fast_standard", "cifar10/resnet18", "cifar10/resnet18_wasserstein_adversarial", "cifar10/small_resnet")
# Accuracy on 1000 images has a standard error of about 0.4 points at 98%.
ACCURACY_SLACK_POINTS = 2.0


def _env_folder(variable: str, what: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        pytest.skip(f"set {variable} to {what} to run this test")
    return Path(value)


@pytest.fixture(scope="module")
def weights_dir() -> Path:
    return _env_folder("WEIGHTS_DIR", "the folder holding the published MNIST weights (mnist_vanilla.pth, ...)")


@pytest.fixture(scope="module")
def mnist_slice() -> tuple[torch.Tensor, torch.Tensor]:
    return mnist_test_subset(_env_folder("DATA_ROOT", "a data root holding MNIST/raw"), 1000)


@pytest.fixture
def isolated_environment(monkeypatch, tmp_path):
    """No weights folder from the environment; the user's cache is under ``tmp_path``."""
    monkeypatch.delenv(zoo.WEIGHTS_ENV_VAR, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _spec(name: str) -> zoo.ModelSpec:
    return next(spec for spec in zoo.models() if spec.name == name)


# --------------------------------------------------------------------------
# Catalogue contents
# --------------------------------------------------------------------------


def test_builtin_entries():
    # Plugins imported by other tests of the session may have added models, so only the built-ins are checked.
    specs = [spec for spec in zoo.models() if spec in zoo.BUILTIN_MODELS]
    names = [spec.name for spec in specs]
    assert names == sorted(names) == sorted(MNIST_MODELS + TRAINED_MNIST_MODELS + CIFAR_MODELS)
    for spec in specs:
        assert spec.training and spec.paper
        assert spec.dataset is (zoo.Dataset.MNIST if spec.name.startswith("mnist/") else zoo.Dataset.CIFAR10)
        binarized = spec.name in ("mnist/binarized", "mnist/trained_binarized")
        expected_mode = zoo.GradientMode.BPDA_STRAIGHT_THROUGH if binarized else zoo.GradientMode.EXACT
        assert spec.gradient_mode is expected_mode
        if spec.name in MNIST_MODELS:
            assert spec.weights is not None and spec.weights.url.endswith("/" + spec.weights.filename)
            assert spec.weights.url.startswith("https://github.com/locuslab/projected_sinkhorn/")
        else:  # the benchmark trains these
            assert spec.weights is None and spec.clean_accuracy is None and spec.recipe is not None
    trained_for = {spec.name: spec.trained_for for spec in specs}
    assert trained_for["mnist/linf_certified"] is zoo.TrainedFor.LINF_CERTIFIED
    assert trained_for["mnist/wasserstein_adversarial"] is zoo.TrainedFor.WASSERSTEIN_ADVERSARIAL
    assert trained_for["mnist/standard"] is trained_for["mnist/binarized"] is zoo.TrainedFor.NONE


# --------------------------------------------------------------------------
# Published MNIST weights
# --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", MNIST_MODELS)
def test_mnist_model_loads_and_matches_reference_accuracy(name, weights_dir, mnist_slice):
    classifier = zoo.model(name, weights_dir=weights_dir)
    assert isinstance(classifier, zoo.ClassifierWithPreprocessing)
    assert not any(module.training for module in classifier.modules()), "model() must return eval mode"
    images, labels = mnist_slice
    with torch.no_grad():
        accuracy = 100.0 * (classifier(images).argmax(1) == labels).double().mean().item()
    reference = _spec(name).clean_accuracy
    assert abs(accuracy - reference) <= ACCURACY_SLACK_POINTS, f"{name}: {accuracy:.2f}% on 1000 images, reference {reference}%"


def test_model_uses_the_published_weights(weights_dir):
    """The net holds exactly the tensors stored in the file, in every checkpoint layout."""
    raw = torch.load(weights_dir / "mnist_vanilla.pth", map_location="cpu", weights_only=True)["state_dict"][0]
    loaded = zoo.model("mnist/standard", weights_dir=weights_dir).net.state_dict()
    assert loaded.keys() == raw.keys()
    assert all(torch.equal(loaded[key], raw[key]) for key in raw)
    adversarial = torch.load(weights_dir / "mnist_adv_training.pth", map_location="cpu", weights_only=True)["net"]
    loaded = zoo.model("mnist/wasserstein_adversarial", weights_dir=weights_dir).net.state_dict()
    assert all(torch.equal(loaded[key], adversarial["module." + key]) for key in loaded)


def test_sha256_mismatch_raises(weights_dir, tmp_path):
    spec = _spec("mnist/standard")
    corrupt = tmp_path / spec.weights.filename
    shutil.copyfile(weights_dir / spec.weights.filename, corrupt)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 mismatch") as error:
        zoo.model("mnist/standard", weights_dir=tmp_path)
    message = str(error.value)
    assert str(corrupt) in message and spec.weights.sha256 in message and _sha256(corrupt) in message


def test_weights_dir_from_environment(weights_dir, isolated_environment, monkeypatch, tmp_path):
    monkeypatch.setenv(zoo.WEIGHTS_ENV_VAR, str(weights_dir))
    classifier = zoo.model("mnist/linf_certified")
    assert not classifier.training
    # The argument wins over the environment variable.
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        zoo.model("mnist/linf_certified", weights_dir=tmp_path)


@pytest.mark.slow
def test_bpda_gradient_of_binarized_model(weights_dir, mnist_slice):
    classifier = zoo.model("mnist/binarized", weights_dir=weights_dir)
    images, labels = mnist_slice
    x = images[:16].clone().requires_grad_(True)
    logits = classifier(x)
    binarized = (images[:16] >= 0.5).float()
    assert torch.equal(logits, classifier.net(binarized))

    (gradient,) = torch.autograd.grad(F.cross_entropy(logits, labels[:16]), x)
    assert torch.isfinite(gradient).all()
    assert (gradient.flatten(1).abs().amax(1) > 0).all(), "every image must get a non-zero gradient"
    # Straight through: the gradient at x is the net's gradient at the binarized image.
    z = binarized.clone().requires_grad_(True)
    (gradient_at_binarized,) = torch.autograd.grad(F.cross_entropy(classifier.net(z), labels[:16]), z)
    torch.testing.assert_close(gradient, gradient_at_binarized, rtol=0, atol=0)


# --------------------------------------------------------------------------
# Lookup and its errors (no weights needed)
# --------------------------------------------------------------------------


def test_missing_file_message(isolated_environment, tmp_path):
    spec = _spec("mnist/standard")
    with pytest.raises(FileNotFoundError) as error:
        zoo.model("mnist/standard", weights_dir=tmp_path / "empty")
    message = str(error.value)
    settings = ("weights_dir=", zoo.WEIGHTS_ENV_VAR, "download=True")
    for needed in (spec.weights.filename, str(tmp_path / "empty"), spec.weights.url, spec.weights.sha256, *settings):
        assert needed in message, f"{needed!r} missing from: {message}"


def test_weights_folder_lookup_order(isolated_environment, monkeypatch, tmp_path):
    default = tmp_path / "home" / ".cache" / "wasserstein-robustness-bench" / "weights"
    assert zoo.resolve_weights_dir() == default
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored, as the XDG specification says
    assert zoo.resolve_weights_dir() == default
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo.resolve_weights_dir() == tmp_path / "xdg" / "wasserstein-robustness-bench" / "weights"
    monkeypatch.setenv(zoo.WEIGHTS_ENV_VAR, str(tmp_path / "env"))
    assert zoo.resolve_weights_dir() == tmp_path / "env"
    assert zoo.resolve_weights_dir(tmp_path / "argument") == tmp_path / "argument"
    assert zoo.weights_path("mnist/linf_certified") == tmp_path / "env" / "mnist_robust.pth"
    assert zoo.weights_path(_spec("mnist/standard"), tmp_path) == tmp_path / "mnist_vanilla.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{zoo.WEIGHTS_ENV_VAR} environment variable")):
        zoo.model("mnist/standard")


def test_unknown_model_lists_registered_names():
    with pytest.raises(ValueError, match="mnist/standart") as error:
        zoo.model("mnist/standart")
    for name in MNIST_MODELS + CIFAR_MODELS:
        assert name in str(error.value)


@pytest.mark.parametrize("name", CIFAR_MODELS + TRAINED_MNIST_MODELS)
def test_recipe_entry_without_trained_weights_says_how_to_train_it(name, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"model '{name}' has no trained weights yet.*python -m harness.train {name}"):
        zoo.model(name, weights_dir=tmp_path)
    assert zoo.weights_path(name, tmp_path) == zoo.trained_weights_path(name, tmp_path)
    assert zoo.training_record(name, tmp_path) is None
    assert isinstance(_spec(name).build(), zoo.ClassifierWithPreprocessing)


def test_an_entry_has_published_weights_or_a_recipe_not_both():
    with pytest.raises(ValueError, match="both published weights and a recipe"):
        zoo.ModelSpec(
            name="mnist/both", dataset=zoo.Dataset.MNIST, architecture="a", builder=_plain_mnist,
            trained_for=zoo.TrainedFor.NONE, training="t", paper="p",
            weights=zoo.WeightsFile("f.pt", "0" * 64, url=None), recipe="mnist_standard",
        )


def test_duplicate_registration_raises():
    registry = zoo.ModelRegistry()
    decorate = zoo.register_model("mnist/dup", dataset=zoo.Dataset.MNIST, trained_for=zoo.TrainedFor.NONE, registry=registry)
    decorate(_plain_mnist)
    with pytest.raises(ValueError, match="'mnist/dup' is already registered"):
        decorate(_plain_mnist)
    assert registry.names() == ["mnist/dup"]
    with pytest.raises(ValueError, match="'mnist/standard' is already registered"):
        zoo.register_model("mnist/standard", dataset=zoo.Dataset.MNIST, trained_for=zoo.TrainedFor.NONE)(_plain_mnist)
    assert [spec.name for spec in zoo.models()].count("mnist/standard") == 1
    with pytest.raises(ValueError, match="already registered"):
        zoo.ModelRegistry(zoo.BUILTIN_MODELS + zoo.BUILTIN_MODELS[:1])


# --------------------------------------------------------------------------
# Custom models in an isolated registry
# --------------------------------------------------------------------------


def _plain_mnist() -> zoo.ClassifierWithPreprocessing:
    return zoo.ClassifierWithPreprocessing(nn.Identity(), mnist_small_convnet())


def _custom_entry(tmp_path: Path, *, corrupt_sha: bool = False, url: str | None = None):
    """A registry with one model whose weights (random, seed 0) are saved under ``tmp_path/source``.

    The file nests the state dict under ``"model"``, so loading also
    exercises ``state_dict_key``.
    """
    torch.manual_seed(0)
    reference = _plain_mnist().eval()
    source = tmp_path / "source" / "custom.pt"
    source.parent.mkdir()
    torch.save({"model": reference.net.state_dict(), "epoch": 3}, source)
    sha = _sha256(source)
    if corrupt_sha:
        sha = sha[::-1]
    registry = zoo.ModelRegistry()
    builder = zoo.register_model(
        "mnist/custom",
        dataset=zoo.Dataset.MNIST,
        trained_for=zoo.TrainedFor.NONE,
        training="random weights, seed 0",
        weights=zoo.WeightsFile("custom.pt", sha, url or source.as_uri()),
        state_dict_key="model",
        registry=registry,
    )(_plain_mnist)
    assert builder is _plain_mnist, "the decorator must return the builder unchanged"
    return registry, reference, source


def test_custom_model_in_isolated_registry(tmp_path, isolated_environment):
    registry, reference, source = _custom_entry(tmp_path)
    assert registry.names() == ["mnist/custom"]
    assert "mnist/custom" not in [spec.name for spec in zoo.models()], "isolated registry leaked"
    with pytest.raises(ValueError, match="mnist/custom"):
        zoo.model("mnist/custom")
    with pytest.raises(ValueError, match=r"unknown model 'nope'; registered models: mnist/custom"):
        registry.spec("nope")

    spec = registry.spec("mnist/custom")
    assert spec.architecture == "_plain_mnist" and spec.gradient_mode is zoo.GradientMode.EXACT
    classifier = spec.load(weights_dir=source.parent)
    assert not classifier.training
    assert all(parameter.requires_grad for parameter in classifier.parameters())
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(classifier(x), reference(x), rtol=0, atol=0)


def test_checkpoint_that_does_not_fit_raises(tmp_path):
    registry, _, source = _custom_entry(tmp_path)
    spec = registry.spec("mnist/custom")
    wrong_layout = zoo.ModelSpec(**{**spec.__dict__, "state_dict_key": None})
    with pytest.raises(ValueError, match=r"custom\.pt: the checkpoint does not fit model 'mnist/custom'"):
        wrong_layout.load(weights_dir=source.parent)


def test_builder_must_return_classifier_with_preprocessing():
    spec = zoo.ModelSpec("mnist/bare", zoo.Dataset.MNIST, "bare", mnist_small_convnet, zoo.TrainedFor.NONE, "", "")
    with pytest.raises(TypeError, match="ClassifierWithPreprocessing"):
        spec.build()


def test_download_into_weights_folder(tmp_path, isolated_environment):
    registry, reference, source = _custom_entry(tmp_path)
    spec = registry.spec("mnist/custom")
    cache = tmp_path / "cache" / "weights"
    with pytest.raises(FileNotFoundError, match="download=True"):
        spec.load(weights_dir=cache)
    classifier = spec.load(weights_dir=cache, download=True)
    assert sorted(path.name for path in cache.iterdir()) == ["custom.pt"], "the temporary file must be gone"
    assert _sha256(cache / "custom.pt") == _sha256(source)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(classifier(x), reference(x), rtol=0, atol=0)


def test_download_with_wrong_sha256_keeps_nothing(tmp_path):
    registry, _, _ = _custom_entry(tmp_path, corrupt_sha=True)
    spec = registry.spec("mnist/custom")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=f"expected {spec.weights.sha256}") as error:
        spec.load(weights_dir=cache, download=True)
    assert spec.weights.url in str(error.value)
    assert list(cache.iterdir()) == []


def test_failed_download_explains_manual_fix(tmp_path):
    missing_url = (tmp_path / "nowhere" / "custom.pt").as_uri()
    registry, _, _ = _custom_entry(tmp_path, url=missing_url)
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="could not download") as error:
        registry.spec("mnist/custom").load(weights_dir=cache, download=True)
    message = str(error.value)
    for needed in (missing_url, str(cache / "custom.pt"), "weights_dir=", zoo.WEIGHTS_ENV_VAR):
        assert needed in message, f"{needed!r} missing from: {message}"
    assert list(cache.iterdir()) == []


def test_weights_file_validation():
    with pytest.raises(ValueError, match="sha256='abc'"):
        zoo.WeightsFile("a.pt", "abc", "https://example.org/a.pt")
    with pytest.raises(ValueError, match="filename='sub/a.pt'"):
        zoo.WeightsFile("sub/a.pt", "0" * 64, "https://example.org/a.pt")
    with pytest.raises(ValueError, match="url=''"):
        zoo.WeightsFile("a.pt", "0" * 64, "")


# --------------------------------------------------------------------------
# Checkpoint layouts: state_dict_key, strip_prefix, local files without a URL
# --------------------------------------------------------------------------


def _saved_layout(tmp_path: Path, checkpoint_of, **layout) -> tuple[zoo.ModelSpec, Path, nn.Module]:
    """A spec whose local weights file (no URL) holds ``checkpoint_of(state_dict)`` of a seeded network."""
    torch.manual_seed(1)
    reference = _plain_mnist().eval()
    path = tmp_path / "layout.pt"
    torch.save(checkpoint_of(reference.net.state_dict()), path)
    registry = zoo.ModelRegistry()
    zoo.register_model(
        "mnist/layout",
        dataset=zoo.Dataset.MNIST,
        trained_for=zoo.TrainedFor.NONE,
        weights=zoo.WeightsFile(path.name, _sha256(path), url=None),
        registry=registry,
        **layout,
    )(_plain_mnist)
    return registry.spec("mnist/layout"), path, reference


def _with_prefix(state_dict: dict, prefix: str) -> dict:
    return {prefix + key: value for key, value in state_dict.items()}


@pytest.mark.parametrize(
    "checkpoint_of, layout",
    [
        (lambda state: state, {}),
        (lambda state: {"training": {"model": state}, "epoch": 7}, {"state_dict_key": "training.model"}),
        (lambda state: {"state_dict": [state, {"unused": torch.zeros(1)}]}, {"state_dict_key": "state_dict.0"}),
        (lambda state: _with_prefix(state, "module."), {"strip_prefix": "module."}),
        (lambda state: {"net": _with_prefix(state, "module.")}, {"state_dict_key": "net", "strip_prefix": "module."}),
    ],
    ids=["plain", "nested_key", "list_index", "prefix", "key_and_prefix"],
)
def test_checkpoint_layouts_load_the_same_weights(tmp_path, checkpoint_of, layout):
    spec, path, reference = _saved_layout(tmp_path, checkpoint_of, **layout)
    classifier = spec.load(weights_dir=path.parent)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(classifier(x), reference(x), rtol=0, atol=0)


def test_prefix_is_removed_only_where_present(tmp_path):
    def half_prefixed(state):
        keys = list(state)
        return {("module." + key if index % 2 else key): state[key] for index, key in enumerate(keys)}

    spec, path, reference = _saved_layout(tmp_path, half_prefixed, strip_prefix="module.")
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(spec.load(weights_dir=path.parent)(x), reference(x), rtol=0, atol=0)


def test_wrong_key_names_the_path_the_keys_present_and_the_file(tmp_path):
    spec, path, _ = _saved_layout(
        tmp_path, lambda state: {"training": {"model": state, "optimizer": {}}, "epoch": 7}, state_dict_key="training.net"
    )
    with pytest.raises(ValueError) as error:
        spec.load(weights_dir=path.parent)
    message = str(error.value)
    for needed in (str(path), "state_dict_key='training.net'", "['training']", "no key 'net'", "'model', 'optimizer'"):
        assert needed in message, f"{needed!r} missing from: {message}"


@pytest.mark.parametrize(
    "state_dict_key, expected",
    [
        ("state_dict.2", r"\['state_dict'\] is a list of 2 items, so '2' must be an index from 0 to 1"),
        ("state_dict.first", r"\['state_dict'\] is a list of 2 items, so 'first' must be an index from 0 to 1"),
        ("epoch.0", r"\['epoch'\] is of type int, which has no key '0'"),
        ("epoch", r"state_dict_key='epoch' holds an object of type int"),
    ],
)
def test_key_path_through_lists_and_leaves(tmp_path, state_dict_key, expected):
    spec, path, _ = _saved_layout(
        tmp_path, lambda state: {"state_dict": [state, state], "epoch": 7}, state_dict_key=state_dict_key
    )
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + expected):
        spec.load(weights_dir=path.parent)


def test_long_key_lists_are_shortened(tmp_path):
    many_keys = {f"layer{i}": torch.zeros(1) for i in range(50)}
    spec, path, _ = _saved_layout(tmp_path, lambda state: many_keys, state_dict_key="net")
    with pytest.raises(ValueError, match=r"'layer19', \.\.\. \(30 more\)\]"):
        spec.load(weights_dir=path.parent)


@pytest.mark.parametrize(
    "layout, bad",
    [
        ({"state_dict_key": ""}, "state_dict_key=''"),
        ({"state_dict_key": "a..b"}, "state_dict_key='a..b'"),
        ({"strip_prefix": ""}, "strip_prefix=''"),
    ],
)
def test_layout_options_validated(layout, bad):
    with pytest.raises(ValueError, match=re.escape(bad)):
        zoo.register_model(
            "mnist/bad", dataset=zoo.Dataset.MNIST, trained_for=zoo.TrainedFor.NONE, registry=zoo.ModelRegistry(), **layout
        )(_plain_mnist)


def test_local_checkpoint_without_url(tmp_path, isolated_environment):
    spec, path, _ = _saved_layout(tmp_path, lambda state: state)
    empty = tmp_path / "empty"
    for download in (False, True):
        with pytest.raises(FileNotFoundError) as error:
            spec.load(weights_dir=empty, download=download)
        message = str(error.value)
        for needed in ("layout.pt", str(empty), "no public URL", spec.weights.sha256, f"copy the file into {empty}"):
            assert needed in message, f"{needed!r} missing from: {message}"
        assert "download=True to fetch" not in message and "curl" not in message
    assert "cannot fetch it: there is no public URL" in message
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    with pytest.raises(ValueError, match="sha256 mismatch.*replace it with the checkpoint registered"):
        spec.load(weights_dir=path.parent)


# --------------------------------------------------------------------------
# Architectures and preprocessing
# --------------------------------------------------------------------------


def test_binarize_forward_is_exact_and_gradient_is_identity():
    x = torch.tensor([0.0, 0.3, 0.4999, 0.5, 0.5001, 0.7, 0.9, 1.0], requires_grad=True)
    y = zoo.Binarize(0.5)(x)
    assert y.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    weights = torch.arange(1.0, 9.0)
    (gradient,) = torch.autograd.grad((y * weights).sum(), x)
    assert torch.equal(gradient, weights)
    # Exactly 0 or 1 at any threshold and far outside [0, 1], where x + (1 - x) rounds to 0.
    x = torch.cat([torch.rand(10000), torch.tensor([1e8, -1e8, 3e7])])
    assert torch.equal(zoo.Binarize(0.3)(x), (x >= 0.3).float())


def test_mnist_small_convnet_layout():
    net = mnist_small_convnet()
    assert [key for key in net.state_dict()] == [f"{i}.{p}" for i in (0, 2, 5, 7) for p in ("weight", "bias")]
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    "name,builder,parameters,mean,std",
    [
        # pytorch-cifar's ResNet18: 11,173,962 parameters.
        ("cifar10/resnet18", cifar_resnet18, 11_173_962, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
        # 3x3 stem, blocks 16->16, 16->16, 16->32 (down), 32->64 (down), 4096->1000->10.
        (
            "cifar10/small_resnet",
            cifar_small_resnet,
            (3 * 16 * 9 + 16)
            + 2 * (2 * (16 * 16 * 9 + 16) + (16 * 16 + 16))
            + (16 * 32 * 16 + 32) + (16 * 32 * 4 + 32) + (32 * 32 * 9 + 32)
            + (32 * 64 * 16 + 64) + (32 * 64 * 4 + 64) + (64 * 64 * 9 + 64)
            + (4096 * 1000 + 1000) + (1000 * 10 + 10),
            (0.485, 0.456, 0.406),
            (0.225, 0.225, 0.225),
        ),
    ],
)
def test_cifar_builders(name, builder, parameters, mean, std):
    spec = _spec(name)
    assert spec.architecture == builder.__name__
    torch.manual_seed(0)
    classifier = spec.build().eval()
    assert sum(p.numel() for p in classifier.parameters()) == parameters
    assert sum(p.numel() for p in builder().parameters()) == parameters
    assert isinstance(classifier.preprocess, zoo.Normalize)
    assert not list(classifier.preprocess.parameters()), "normalization constants are buffers, not parameters"

    constant = torch.full((2, 3, 32, 32), 0.6)
    logits = classifier(constant)
    assert logits.shape == (2, 10)
    normalized = (constant - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(logits, classifier.net(normalized))
    assert not torch.allclose(logits, classifier.net(constant)), "control: normalization must change the output"


def test_small_resnet_blocks_downsample_like_the_original():
    """Feature maps 16x32x32, 16x32x32, 32x16x16, 64x8x8 after the four blocks."""
    net = cifar_small_resnet()
    shapes = []
    x = torch.rand(1, 3, 32, 32)
    for layer in net:
        x = layer(x)
        if isinstance(layer, WongResidualBlock):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]

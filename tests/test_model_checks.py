"""The checks on the model under attack (harness/attack/model_checks.py): what they flag, what they leave alone.

Models that make gradient attacks overstate robustness (dropout left in
training mode, softmax or log-softmax outputs, a rounding layer without a
gradient, noise at every call, a non-finite gradient) are flagged; a plain
network, a straight-through binarization (BPDA, the gradient the attack
follows) and the paper's four MNIST models are not. The checks change no
state an attack reads. A small grid of the synthetic world carries the flags
to disk and to the leaderboard.
"""

from __future__ import annotations

import copy
import textwrap
import warnings

import pytest
import torch
from torch import nn

import zoo
from conftest import digit_batch
from harness.attack.model_checks import ModelChecks, ModelCheckWarning, check_model
from harness.attack.pgd import EpsSchedule, Loss, PGDAttack
from harness.data import test_subset
from harness.report import write_report
from harness.report.leaderboard import leaderboard, threat_groups
from harness.run.benchmark import run_benchmark
from harness.run.store import Table, read_table
from harness.vocabulary import ModelCheck
from synthetic import ARCHITECTURE_SOURCE
from solvers.iterate import Norm, NormBallIterate
from zoo.architectures import Binarize

pytestmark = pytest.mark.usefixtures("single_thread")

PAPER_MODELS = ("mnist/standard", "mnist/binarized", "mnist/linf_certified", "mnist/wasserstein_adversarial")


def tiny_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 10))


class Round(nn.Module):
    """Quantize pixels to quarters, with torch's true gradient of rounding: zero."""

    def forward(self, x):
        return torch.round(4 * x) / 4


class Noisy(nn.Module):
    """Dropout at every call, in eval mode too (a randomized defense)."""

    def forward(self, x):
        return nn.functional.dropout(x, 0.5, training=True)


class Sqrt(nn.Module):
    """sqrt of the pixels: an infinite derivative at the black ones."""

    def forward(self, x):
        return x.sqrt()


class Jitter(nn.Module):
    """Adds uniform noise of ``size`` times the output's largest entry at every call."""

    def __init__(self, size: float):
        super().__init__()
        self.size = size

    def forward(self, logits):
        return logits + self.size * logits.abs().amax() * torch.rand_like(logits)


def _built(*layers, training: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*layers).train(training)


MODELS = {
    "dropout in training mode": (lambda: _built(nn.Dropout(0.5), tiny_net(), training=True),
                                 {ModelCheck.RANDOMIZED_OUTPUTS, ModelCheck.TRAINING_MODE}),
    "batch norm in training mode": (lambda: _built(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10),
                                                   training=True), {ModelCheck.TRAINING_MODE}),
    "softmax outputs": (lambda: _built(tiny_net(), nn.Softmax(1)), {ModelCheck.PROBABILITY_OUTPUTS}),
    "log-softmax outputs": (lambda: _built(tiny_net(), nn.LogSoftmax(1)), {ModelCheck.LOG_PROBABILITY_OUTPUTS}),
    "rounding layer": (lambda: _built(Round(), tiny_net()), {ModelCheck.ZERO_INPUT_GRADIENT}),
    "noise in eval mode": (lambda: _built(Noisy(), tiny_net()), {ModelCheck.RANDOMIZED_OUTPUTS}),
    "sqrt of black pixels": (lambda: _built(Sqrt(), tiny_net()), {ModelCheck.NONFINITE_INPUT_GRADIENT}),
    "plain network": (lambda: _built(tiny_net()), set()),
    "straight-through binarization": (lambda: _built(Binarize(), tiny_net()), set()),
}


@pytest.fixture(scope="module")
def digits():
    x = torch.as_tensor(digit_batch(5, 12, (1, 28, 28)), dtype=torch.float32)
    return x, torch.arange(12) % 10


@pytest.mark.parametrize("name", list(MODELS))
def test_each_model_fails_exactly_its_checks(name, digits):
    build, expected = MODELS[name]
    checks = check_model(build(), *digits)
    assert set(checks.failed) == expected, checks.messages()
    assert checks.examples == 12 and checks.passed == (not expected)
    assert check_model(build(), *digits, batch_size=5).failed == checks.failed  # in chunks of 5, 5 and 2


@pytest.mark.parametrize("name", list(MODELS))
def test_the_checks_change_no_state_an_attack_reads(name, digits):
    build, _ = MODELS[name]
    model = build()
    for parameter in model.parameters():
        parameter.grad = None
    state = copy.deepcopy(model.state_dict())
    modes = [module.training for module in model.modules()]
    generator = torch.get_rng_state()
    check_model(model, *digits)
    assert torch.equal(torch.get_rng_state(), generator)
    assert [module.training for module in model.modules()] == modes
    after = model.state_dict()
    assert all(torch.equal(state[key], after[key]) for key in state), "a buffer or parameter changed"
    assert all(parameter.grad is None for parameter in model.parameters())


def test_a_mixed_mode_model_keeps_each_module_s_mode(digits):
    model = _built(nn.Dropout(0.5), tiny_net())
    model[0].train()  # the model in eval mode, its dropout in training mode
    checks = check_model(model, *digits)
    assert [module.training for module in model.modules()] == [False, True] + [False] * 5
    assert checks.failed == (ModelCheck.RANDOMIZED_OUTPUTS, ModelCheck.TRAINING_MODE)
    assert "1 module in training mode (0 (Dropout))" in checks.detail(ModelCheck.TRAINING_MODE)


def test_an_attack_after_the_checks_gives_the_same_numbers(digits):
    """Batch norm in training mode: its running statistics, which the eval-mode attack uses, are restored."""
    x, _ = digits
    model = MODELS["batch norm in training mode"][0]()
    untouched = copy.deepcopy(model)
    with torch.no_grad():
        y = untouched.eval()(x).argmax(1)
    untouched.train()

    def attack(model):  # l_inf steps (the solver does not matter here); the second restart starts at random
        return PGDAttack(model, NormBallIterate(Norm.LINF, 0.01), EpsSchedule(0.02, 1.5, 1, 10), restarts=2, seed=3).run(x, y)

    check_model(model, x, y)
    after, before = attack(model), attack(untouched)
    for name, value in before.per_example().items():
        assert torch.equal(getattr(after, name), value), name
    assert torch.equal(after.adversarial, before.adversarial)


def test_the_randomness_tolerance_follows_the_output_dtype_and_the_image_size(digits):
    x, y = digits
    eps32, pixels = torch.finfo(torch.float32).eps, x[0].numel()
    within = _built(tiny_net(), Jitter(eps32))  # far below pixels * eps of the row's largest output
    beyond = _built(tiny_net(), Jitter(4 * pixels * eps32))
    assert check_model(within, x, y).passed
    assert check_model(beyond, x, y).failed == (ModelCheck.RANDOMIZED_OUTPUTS,)
    # In float64 the same relative jitter is far beyond rounding.
    assert check_model(within.double(), x.double(), y).failed == (ModelCheck.RANDOMIZED_OUTPUTS,)


def test_the_gradient_checked_is_the_attack_s_loss(digits):
    """Cross-entropy on a confidently classified example is exactly zero in float32; the logit margin is not."""
    x, y = digits
    model = _built(*tiny_net())
    with torch.no_grad():
        model[3].weight.mul_(1e4)  # logit gaps of thousands: the softmax rounds to one-hot
        y = model(x).argmax(1)
    assert check_model(model, x, y).failed == (ModelCheck.ZERO_INPUT_GRADIENT,)
    assert check_model(model, x, y, loss=Loss.LOGIT_MARGIN).passed


def test_warnings_name_each_failed_check_and_why(digits):
    checks = check_model(MODELS["softmax outputs"][0](), *digits).with_zero_gradient_steps(7)
    assert checks.names == ["probability_outputs", "zero_gradient_steps"]
    assert checks.as_dict()["zero_gradient_steps"] == "7 attack steps met an exactly zero input gradient"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checks.warn()
    assert [warning.category for warning in caught] == [ModelCheckWarning] * 2
    first, second = (str(warning.message) for warning in caught)
    assert first.startswith("model check probability_outputs failed: every output is >= 0 and every row sums to 1")
    assert ModelCheck.PROBABILITY_OUTPUTS.consequence in first and "gradient attacks stall" in first
    assert second.startswith("model check zero_gradient_steps failed: 7 attack steps") and "overstated" in second
    assert checks.with_zero_gradient_steps(0) == checks and ModelChecks(3).with_zero_gradient_steps(0).passed
    with pytest.raises(ValueError, match="one row of class scores per image"):
        check_model(_built(tiny_net(), nn.Flatten(0)), *digits)


def test_the_paper_models_fail_no_check(published_folders):
    data_root, weights_dir = published_folders
    x, y = test_subset("mnist", data_root, 100)
    for name in PAPER_MODELS:
        checks = check_model(zoo.model(name, weights_dir=weights_dir), x, y)
        assert checks.passed, f"{name}: {checks.messages()}"
    # The binarized model's own gradient is straight-through; with the true gradient of its step it would fail.
    binarized = zoo.model("mnist/binarized", weights_dir=weights_dir)
    binarized.preprocess = Round().eval()
    assert check_model(binarized, x, y).failed == (ModelCheck.ZERO_INPUT_GRADIENT,)


# --------------------------------------------------------------------------
# A grid: the flags on disk and in the leaderboard
# --------------------------------------------------------------------------

FLAGGED_PLUGIN = textwrap.dedent(
    '''
    import torch
    from torch import nn

    import zoo


    class Round(nn.Module):
        def forward(self, x):
            return torch.round(4 * x) / 4


    def _register(name, builder):
        zoo.register_model(
            name, dataset=zoo.Dataset.MNIST, trained_for=zoo.TrainedFor.NONE, training="the tiny synthetic network, altered",
            weights=zoo.WeightsFile("tiny_synthetic.pt", "{sha256}", url=None), state_dict_key="net", strip_prefix="module.",
        )(builder)


    def tiny_softmax():
        return zoo.ClassifierWithPreprocessing(nn.Identity(), nn.Sequential(*tiny_net(), nn.Softmax(1)))


    def tiny_rounded():
        return zoo.ClassifierWithPreprocessing(Round(), tiny_net())


    _register("mnist/tiny_synthetic_softmax", tiny_softmax)
    _register("mnist/tiny_synthetic_rounded", tiny_rounded)
    '''
)


@pytest.fixture(scope="module")
def flagged_plugin(world, tmp_path_factory):
    import hashlib

    sha256 = hashlib.sha256((world.weights_dir / "tiny_synthetic.pt").read_bytes()).hexdigest()
    plugin = tmp_path_factory.mktemp("plugins") / "tiny_flagged_plugin.py"
    plugin.write_text(ARCHITECTURE_SOURCE + FLAGGED_PLUGIN.replace("{sha256}", sha256))
    zoo.import_plugins([str(plugin)])
    return plugin


def test_a_grid_stores_the_failed_checks_and_the_leaderboard_flags_them(world, flagged_plugin, tmp_path):
    softmax, rounded = "mnist/tiny_synthetic_softmax", "mnist/tiny_synthetic_rounded"
    common = {"dataset": "mnist", "n_examples": 4, "iterations": 3}
    config = {
        "grid": {"name": "checks", "blocks": [
            {**common, "model": [world.model, softmax], "solver": "projected_sinkhorn_box", "protocol": "paper_code_mnist"},
            # The flags belong to the model, whatever the ball.
            {**common, "model": [world.model, rounded], "threat_model": "linf", "eps_initial": 0.1, "step_size": 0.01},
        ]},
        "executor": "local", "n_examples": None, "seed": None, "data_root": str(world.data_root),
        "weights_dir": str(world.weights_dir), "download": False, "results_dir": str(tmp_path / "results"), "device": "cpu",
        "batch_size": 2, "gallery_examples": 0, "report": False, "dry_run": False, "plugins": [str(world.plugin), str(flagged_plugin)],
        "ray": {"address": None, "gpus_per_actor": 1.0, "cpus_per_actor": 1, "max_retries": 0, "num_cpus": 2},
    }
    with pytest.warns(ModelCheckWarning) as warned:
        assert run_benchmark(config) == 0
    expected = {world.model: [], softmax: ["probability_outputs"], rounded: ["zero_input_gradient", "zero_gradient_steps"]}
    # The run warns once per flagged cell, naming the model and its failed checks; the clean model never.
    messages = [str(warning.message) for warning in warned if issubclass(warning.category, ModelCheckWarning)]
    assert sorted(message.split(",")[0] for message in messages) == sorted([softmax, rounded])
    examples = read_table(config["results_dir"])
    assert len(examples) == 4 * 4
    for (model, _), rows in examples.groupby([examples["model"].astype(str), "cell_id"]):
        assert [list(names) for names in rows["failed_model_checks"]] == [expected[model]] * 4, model
    assert (examples.loc[examples["model"] == rounded, "zero_gradient_steps"] > 0).all()
    cells = read_table(config["results_dir"], Table.CELLS)
    assert sorted((str(model), list(names)) for model, names in zip(cells["model"], cells["failed_model_checks"])) == sorted(
        [(world.model, [])] * 2 + [(softmax, expected[softmax]), (rounded, expected[rounded])]
    )
    flags = {}
    for group in threat_groups(examples, cells):
        rows = leaderboard(examples, cells, group).rows
        flags.update({(group.threat_model, model): dict(row) for model, row in zip(rows["model"], rows["flags"])})
    assert flags[("wasserstein", world.model)] == {} and flags[("linf", world.model)] == {}
    assert set(flags[("wasserstein", softmax)]) == {"probability outputs"}
    assert "gradient attacks stall" in flags[("wasserstein", softmax)]["probability outputs"]
    assert set(flags[("linf", rounded)]) == {"zero input gradient", "zero gradients"}
    page = write_report(config["results_dir"], tmp_path / "report").read_text(encoding="utf-8")
    assert page.count('">probability outputs</span>') == 1 and page.count('">zero input gradient</span>') == 1


# --------------------------------------------------------------------------
# harness.evaluate (after the patch to harness/attack/suite.py)
# --------------------------------------------------------------------------


def test_harness_evaluate_warns_and_records_the_failed_checks(monkeypatch):
    import harness
    from harness.attack import suite as suite_module
    from harness.attack.ball import Ball
    from harness.attack.suite import attack_suite
    from test_suite import _cut

    suite = _cut(attack_suite("standard", "mnist"), iterations=3)
    monkeypatch.setitem(suite_module.SUITES, (suite.name, suite.dataset, suite.version), suite)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 12 * 12, 10)).double().eval()
    x = torch.as_tensor(digit_batch(3, 4, (1, 12, 12)))
    with torch.no_grad():
        y = net(x).argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelCheckWarning)
        clean = harness.evaluate(net, x, y, Ball.wasserstein(3, 1.0), dataset="mnist", batch_size=2)
    assert clean.attrs["model_checks"] == {}
    with pytest.warns(ModelCheckWarning, match="model check probability_outputs failed: every output is >= 0"):
        frame = harness.evaluate(nn.Sequential(net, nn.Softmax(1)).eval(), x, y, Ball.wasserstein(3, 1.0), dataset="mnist", batch_size=2)
    assert "probability_outputs" in frame.attrs["model_checks"]

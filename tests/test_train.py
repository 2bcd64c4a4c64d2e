"""Tests for harness/train: interval bounds against sampled inputs, seeded and resumable training, the record.

The training runs use the synthetic world's tiny training split and a tiny
recipe registered here, so each takes seconds.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

import zoo
from harness.attack.pgd import EpsSchedule, PGDAttack
from harness.attack.spec import AttackSpec
from harness.train import Recipe, TrainingDiverged, certified_accuracy, register_recipe, train
from harness.certify.layers import interval_bounds
from harness.train.certified import worst_case_logits
from harness.train.recipes import (
    RECIPES,
    AdversarialTraining,
    CertifiedTraining,
    LearningRateSchedule,
    Objective,
    Optimizer,
    ScheduleKind,
)
from solvers.iterate import Norm, NormBallIterate
from synthetic import tiny_net
from zoo.architectures import ClassifierWithPreprocessing, Normalize, WongResidualBlock

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = "mnist/tiny_recipe"
TINY_RECIPE = Recipe(
    name="tiny_standard",
    dataset=zoo.Dataset.MNIST,
    architecture="tiny_net",
    objective=Objective.STANDARD,
    epochs=3,
    batch_size=32,
    optimizer=Optimizer(lr=0.05, momentum=0.9, weight_decay=5e-4),
    schedule=LearningRateSchedule(ScheduleKind.STEP, milestones=(2,), factor=0.1),
)


@pytest.fixture(scope="module", autouse=True)
def tiny_recipes():
    """The tiny network as a zoo entry trained by each objective's tiny recipe."""
    variants = {
        TINY: TINY_RECIPE,
        "mnist/tiny_certified": dataclasses.replace(
            TINY_RECIPE, name="tiny_certified", objective=Objective.INTERVAL_CERTIFIED,
            certified=CertifiedTraining(eps=0.05, warmup_epochs=0, ramp_epochs=1),
        ),
        "mnist/tiny_wasserstein": dataclasses.replace(
            TINY_RECIPE, name="tiny_wasserstein", objective=Objective.WASSERSTEIN_ADVERSARIAL, epochs=1,
            adversarial=AdversarialTraining(AttackSpec("plan_pgd_box", EpsSchedule(0.05, 1.5, 2, 6)), kernel_size=3, p=1.0),
        ),
        "mnist/tiny_diverging": dataclasses.replace(TINY_RECIPE, name="tiny_diverging", optimizer=Optimizer(lr=1e30)),
    }
    for name, entry in variants.items():
        register_recipe(entry)
        if name not in {spec.name for spec in zoo.models()}:
            zoo.register_model(
                name, dataset=zoo.Dataset.MNIST, trained_for=zoo.TrainedFor.NONE, architecture="tiny_net",
                recipe=entry.name,
            )(lambda: ClassifierWithPreprocessing(nn.Identity(), tiny_net()))
    yield variants


# --------------------------------------------------------------------------
# Interval bounds
# --------------------------------------------------------------------------


def _mixed_network() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), WongResidualBlock(4, 6, downsample=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 5),
    )
    return ClassifierWithPreprocessing(Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)), net).eval()


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.1])
def test_interval_bounds_contain_every_sampled_output(eps):
    model = _mixed_network()
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    lower_in, upper_in = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    lower, upper = interval_bounds(model, lower_in, upper_in)
    assert torch.isfinite(lower).all() and (lower <= upper + 1e-6).all()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(64):
            corner = torch.rand(x.shape, generator=generator) < 0.5
            sample = torch.where(corner, lower_in, upper_in) if _ % 2 else lower_in + (upper_in - lower_in) * torch.rand(
                x.shape, generator=generator
            )
            out = model(sample)
            assert (out >= lower - 1e-5).all() and (out <= upper + 1e-5).all()
    if eps == 0:
        with torch.no_grad():
            torch.testing.assert_close(lower, model(x), rtol=0, atol=1e-5)
            torch.testing.assert_close(upper, model(x), rtol=0, atol=1e-5)


def test_interval_bounds_refuse_unknown_layers():
    with pytest.raises(ValueError, match="no rule for layer Tanh"):
        interval_bounds(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), torch.zeros(1, 3), torch.ones(1, 3))


# --------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------


def _state(path) -> dict:
    return torch.load(path, weights_only=True)


def test_training_writes_weights_and_record_and_the_zoo_loads_them(world, tmp_path):
    record = train(TINY, data_root=world.data_root, weights_dir=tmp_path, progress=False)
    path = zoo.trained_weights_path(TINY, tmp_path)
    assert record["sha256"] == zoo.sha256_of_file(path)
    assert json.loads(path.with_suffix(".json").read_text()) == record
    assert record["epochs"] == 3 and record["train_examples"] == 192 and record["recipe"]["name"] == "tiny_standard"
    assert [entry["epoch"] for entry in record["history"]] == [1, 2, 3]
    assert 0 <= record["clean_accuracy"] <= 1 and record["seconds"] > 0 and record["device"] == "cpu"
    assert not path.with_suffix(".checkpoint.pt").exists()
    model = zoo.model(TINY, weights_dir=tmp_path)
    images, labels = zoo_test_set(world)
    with torch.no_grad():
        accuracy = float((model(images).argmax(1) == labels).float().mean())
    assert accuracy == pytest.approx(record["clean_accuracy"])
    # A second call finds the weights and does not train again.
    assert train(TINY, data_root=world.data_root, weights_dir=tmp_path, progress=False) == record
    # A changed file no longer matches its record.
    torch.save({"tampered": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="differs from its training record"):
        zoo.model(TINY, weights_dir=tmp_path)


def zoo_test_set(world):
    from harness.data import load_dataset

    return load_dataset("mnist", world.data_root)


def _killed_at_epoch_two_batch_two(world, weights_dir, **options) -> None:
    """Train TINY into ``weights_dir`` until a KeyboardInterrupt at batch 2 of epoch 1 (the second epoch)."""

    def kill_in_epoch_two(step):
        if step.epoch == 1 and step.batch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TINY, data_root=world.data_root, weights_dir=weights_dir, progress=False, on_step=kill_in_epoch_two, **options)


def test_a_killed_run_resumes_from_its_last_epoch_and_ends_where_an_unbroken_one_does(world, tmp_path):
    unbroken = train(TINY, data_root=world.data_root, weights_dir=tmp_path / "unbroken", progress=False)
    _killed_at_epoch_two_batch_two(world, tmp_path / "killed")
    path = zoo.trained_weights_path(TINY, tmp_path / "killed")
    assert not path.exists() and _state(path.with_suffix(".checkpoint.pt"))["epoch"] == 1
    epochs_seen = []
    resumed = train(
        TINY, data_root=world.data_root, weights_dir=tmp_path / "killed", progress=False,
        on_step=lambda step: epochs_seen.append(step.epoch),
    )
    assert sorted(set(epochs_seen)) == [1, 2]  # epoch 0 was not trained again
    assert resumed["sha256"] == unbroken["sha256"]
    assert resumed["clean_accuracy"] == unbroken["clean_accuracy"]


def test_a_run_killed_within_an_epoch_resumes_from_its_batch_and_ends_where_an_unbroken_one_does(world, tmp_path):
    unbroken = train(TINY, data_root=world.data_root, weights_dir=tmp_path / "unbroken", progress=False)
    _killed_at_epoch_two_batch_two(world, tmp_path / "killed", checkpoint_seconds=0)
    saved = _state(zoo.trained_weights_path(TINY, tmp_path / "killed").with_suffix(".checkpoint.pt"))
    assert (saved["epoch"], saved["within"]["batch"]) == (1, 2)  # batches 0 and 1 of epoch 1 are in it
    seen = []
    resumed = train(
        TINY, data_root=world.data_root, weights_dir=tmp_path / "killed", progress=False, checkpoint_seconds=0,
        on_step=lambda step: seen.append((step.epoch, step.batch)),
    )
    assert seen[0] == (1, 2)
    assert resumed["sha256"] == unbroken["sha256"]
    assert resumed["history"][1]["loss"] == pytest.approx(unbroken["history"][1]["loss"], rel=1e-12)
    with pytest.raises(ValueError, match="checkpoint_seconds=-1 is invalid"):
        train(TINY, data_root=world.data_root, weights_dir=tmp_path / "other", progress=False, checkpoint_seconds=-1)


def test_a_checkpoint_of_other_settings_is_not_resumed(world, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(TINY, data_root=world.data_root, weights_dir=tmp_path, progress=False, epochs=2,
              on_step=lambda step: (_ for _ in ()).throw(KeyboardInterrupt) if step.epoch == 1 else None)
    with pytest.raises(ValueError, match="was made by different settings"):
        train(TINY, data_root=world.data_root, weights_dir=tmp_path, progress=False, epochs=3)


def test_a_non_finite_loss_stops_the_run_naming_epoch_and_batch(world, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"at epoch 1 of 3, batch \d+ of 6"):
        train("mnist/tiny_diverging", data_root=world.data_root, weights_dir=tmp_path, progress=False)
    assert not zoo.trained_weights_path("mnist/tiny_diverging", tmp_path).exists()


def test_certified_training_records_a_certificate_no_attack_breaks(world, tmp_path):
    record = train("mnist/tiny_certified", data_root=world.data_root, weights_dir=tmp_path, progress=False)
    assert record["certified_linf_eps"] == 0.05 and 0 <= record["certified_accuracy"] <= record["clean_accuracy"]
    model = zoo.model("mnist/tiny_certified", weights_dir=tmp_path)
    images, labels = zoo_test_set(world)
    assert certified_accuracy(model, images, labels, 0.05) == pytest.approx(record["certified_accuracy"])
    with torch.no_grad():
        certified = worst_case_logits(model, images, labels, 0.05).argmax(1) == labels
    assert bool(certified.any()), "nothing certified: the test would not test anything"
    attack = PGDAttack(model, NormBallIterate(Norm.LINF, 0.01), EpsSchedule.fixed(0.05, 40), restarts=3)
    result = attack.run(images[certified], labels[certified])
    assert not bool(result.success.any()), "an l_inf attack broke a certified example"


def test_wasserstein_adversarial_training_runs_its_inner_attack(world, tmp_path, monkeypatch):
    import harness.train.loop as loop

    attacked = []
    original = loop.PGDAttack.run

    def counting_run(self, x, y, *args, **kwargs):
        result = original(self, x, y, *args, **kwargs)
        attacked.append(int(result.success.sum()))
        return result

    monkeypatch.setattr(loop.PGDAttack, "run", counting_run)
    record = train("mnist/tiny_wasserstein", data_root=world.data_root, weights_dir=tmp_path, progress=False)
    assert len(attacked) == 6 and sum(attacked) > 0  # one attack per batch, and it found adversarial examples
    assert record["recipe"]["adversarial"]["attack"]["solver"] == "plan_pgd_box"


def test_the_fast_plan_pgd_recipe_differs_from_the_paper_one_only_in_its_projection_budget():
    paper, fast = RECIPES["mnist_wasserstein_plan_pgd"], RECIPES["mnist_wasserstein_plan_pgd_fast"]
    assert dict(fast.adversarial.attack.hyperparameters) == {"box_max_iter": 1}
    assert paper.adversarial.attack.hyperparameters == ()  # the solver's exact defaults
    unchanged = dataclasses.replace(fast.adversarial.attack, hyperparameters=())
    assert dataclasses.replace(fast, name=paper.name, description=paper.description,
                               adversarial=dataclasses.replace(fast.adversarial, attack=unchanged)) == paper


def test_recipe_checks():
    with pytest.raises(ValueError, match="adversarial settings are needed"):
        dataclasses.replace(TINY_RECIPE, objective=Objective.WASSERSTEIN_ADVERSARIAL)
    with pytest.raises(ValueError, match="already registered with other settings"):
        register_recipe(dataclasses.replace(TINY_RECIPE, epochs=9))
    with pytest.raises(ValueError, match="recipe 'nope' is unknown"):
        from harness.train import recipe

        recipe("nope")
    for entry in RECIPES.values():
        assert json.loads(json.dumps(entry.to_dict()))["name"] == entry.name
    for spec in zoo.models():
        if spec.recipe in RECIPES and not spec.name.startswith("mnist/tiny"):
            assert RECIPES[spec.recipe].architecture == spec.architecture, spec.name
    with pytest.raises(ValueError, match="has no recipe"):
        train("mnist/standard", data_root="unused", progress=False)
    assert np.isclose(LearningRateSchedule(ScheduleKind.TRIANGLE, start=0.2, peak=0.25, end=0.0).multiplier(0.25, 0), 1.0)


# --------------------------------------------------------------------------
# Grids that train
# --------------------------------------------------------------------------


def _grid_config(world, tmp_path, **changes):
    config = {
        "grid": {"name": "train_then_attack", "blocks": [{
            "dataset": "mnist", "model": TINY, "solver": "plan_pgd_box", "protocol": "paper_mnist", "n_examples": 6,
            "iterations": 4,
        }]},
        "executor": "local", "n_examples": None, "seed": None, "data_root": str(world.data_root),
        "weights_dir": str(tmp_path / "weights"), "download": False, "results_dir": str(tmp_path / "results"),
        "device": "cpu", "batch_size": 3, "gallery_examples": 0, "report": False, "dry_run": False, "plugins": [],
        "ray": {"address": None, "gpus_per_actor": 1.0, "cpus_per_actor": 1, "max_retries": 2, "num_cpus": 2},
    }
    config.update(changes)
    return config


def test_a_grid_trains_its_missing_model_first_then_attacks_it(world, tmp_path, capsys):
    from harness.run.benchmark import run_benchmark
    from harness.run.store import Table, read_table

    refused = _grid_config(world, tmp_path)
    assert run_benchmark(refused) == 2
    message = capsys.readouterr().out
    assert f"model {TINY!r} has no trained weights yet" in message and "pass train_missing=true" in message
    config = _grid_config(world, tmp_path, train_missing=True)
    assert run_benchmark(config) == 0
    out = capsys.readouterr().out
    assert f"to train first: {TINY} (recipe tiny_standard)" in out and f"trained {TINY}:" in out
    record = zoo.training_record(TINY, config["weights_dir"])
    assert record is not None and zoo.trained_weights_path(TINY, config["weights_dir"]).is_file()
    examples = read_table(config["results_dir"], Table.EXAMPLES)
    assert len(examples) == 6
    cells = read_table(config["results_dir"], Table.CELLS)
    assert f"sha256 {record['sha256'][:12]}" in cells["model_training"].iloc[0]
    assert "recipe tiny_standard, 3 epochs on 192 training images" in cells["model_training"].iloc[0]
    # The rerun finds the weights: nothing is trained again.
    assert run_benchmark(config) == 0
    assert "to train first" not in capsys.readouterr().out


def test_a_train_only_grid_and_skipping_models_without_weights(world, tmp_path, capsys):
    from harness.run.benchmark import run_benchmark

    skipping = _grid_config(world, tmp_path)
    skipping["grid"] = {**skipping["grid"], "skip_missing_weights": True}
    assert run_benchmark(skipping) == 0
    assert f"skipped (no weights; the grid has skip_missing_weights): {TINY}" in capsys.readouterr().out
    train_only = _grid_config(world, tmp_path, grid={"name": "train_only", "train": [{"model": TINY, "epochs": 1}]})
    assert run_benchmark(train_only) == 0
    assert zoo.training_record(TINY, train_only["weights_dir"])["epochs"] == 1
    bad = _grid_config(world, tmp_path, grid={"name": "bad", "train": ["mnist/standard", {"model": TINY, "epochs": 0}]})
    assert run_benchmark(bad) == 2
    out = capsys.readouterr().out
    assert "train: model 'mnist/standard' has no recipe" in out and "epochs=0 of 'mnist/tiny_recipe' is invalid" in out


RAY_PLUGIN = '''
import zoo
from harness.train import Recipe, register_recipe
from harness.train.recipes import LearningRateSchedule, Objective, Optimizer

register_recipe(Recipe(
    name="tiny_on_ray", dataset=zoo.Dataset.MNIST, architecture="tiny_net", objective=Objective.STANDARD,
    epochs=2, batch_size=64, optimizer=Optimizer(lr=0.05),
))


@zoo.register_model("mnist/tiny_on_ray", dataset=zoo.Dataset.MNIST, trained_for=zoo.TrainedFor.NONE,
                    architecture="tiny_net", recipe="tiny_on_ray")
def tiny_on_ray():
    return zoo.ClassifierWithPreprocessing(nn.Identity(), tiny_net())
'''


def test_with_ray_a_missing_model_is_trained_in_a_ray_task_then_attacked(world, tmp_path, capsys):
    from harness.run.benchmark import run_benchmark
    from harness.run.store import Table, read_table
    from synthetic import ARCHITECTURE_SOURCE

    plugin = tmp_path / "tiny_on_ray.py"
    plugin.write_text(ARCHITECTURE_SOURCE + RAY_PLUGIN)
    config = _grid_config(world, tmp_path, executor="ray", train_missing=True, plugins=[str(plugin)])
    config["grid"]["blocks"][0]["model"] = "mnist/tiny_on_ray"
    assert run_benchmark(config) == 0
    assert "trained mnist/tiny_on_ray:" in capsys.readouterr().out
    record = zoo.training_record("mnist/tiny_on_ray", config["weights_dir"])
    assert record["epochs"] == 2 and record["device"] == "cpu"
    assert len(read_table(config["results_dir"], Table.EXAMPLES)) == 6

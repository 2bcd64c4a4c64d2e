"""The settings are declared once, as types with ranges, and checked from those declarations; the data-set facts are one table."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

import zoo
from harness.data import DATASET_SHAPES
from harness.run.grid_files import BUILT_IN_CONFIG
from harness.run.scheduler import Executor, RayOptions
from harness.run.settings import RunSettings, check_settings, hydra_defaults
from harness.vocabulary import DATASETS, STANDARD_RADII


def test_the_defaults_pass_their_own_checks_and_live_only_in_the_dataclasses():
    settings, problems = check_settings({})
    assert problems == {} and settings == RunSettings()
    assert settings.executor is Executor.RAY and settings.ray == RayOptions()
    config = OmegaConf.to_container(OmegaConf.create((BUILT_IN_CONFIG / "config.yaml").read_text()))
    assert set(config) == {"defaults", "hydra"}, "a setting's default belongs in RunSettings, not in config.yaml"
    defaults = hydra_defaults()
    assert set(defaults) == {field.name for field in dataclasses.fields(RunSettings)}
    assert defaults["executor"] == "ray" and defaults["ray"] == dataclasses.asdict(RayOptions())


def test_good_values_are_kept_and_an_enum_setting_becomes_its_member():
    settings, problems = check_settings({
        "executor": "local", "n_examples": 3, "models": "mnist/standard", "device": "cuda:1", "batch_size": 7,
        "verify_workers": "auto", "plugins": ["my_models"], "ray": {"gpus_per_actor": 0.5, "num_cpus": 2, "address": "auto"},
    })
    assert problems == {}
    assert settings.executor is Executor.LOCAL and settings.batch_size == 7 and settings.ray.gpus_per_actor == 0.5


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"n_examples": 0}, "n_examples=0 is invalid: it must be null (the grid's) or an integer >= 1"),
        ({"seed": "one"}, "seed='one' is invalid: it must be null (the grid's) or an integer >= 0"),
        ({"download": "yes"}, "download='yes' is invalid: it must be true or false"),
        ({"gallery_examples": True}, "gallery_examples=True is invalid: it must be an integer >= 0"),
        ({"plugins": "my_models"}, "plugins='my_models' is invalid: it must be a list of strings"),
        ({"executor": "slurm"}, "executor='slurm' is invalid: it must be local or ray"),
        ({"results_dir": ""}, "results_dir='' is invalid: it must be a non-empty string (the folder the results go to)"),
        ({"models": []}, "models=[] is invalid: it must be null (the grid's own) or a list of registered model names"),
        ({"ray": 2}, "ray=2 is invalid: it must be a mapping of ray.address, ray.gpus_per_actor"),
        ({"ray": {"gpus_per_actor": float("nan")}}, "ray.gpus_per_actor=nan is invalid: it must be a number > 0"),
        ({"n_exampels": 3}, "unknown setting(s) n_exampels; allowed: executor, n_examples, seed,"),
    ],
)
def test_a_bad_value_is_named_with_what_is_allowed(config, expected):
    settings, problems = check_settings(config)
    assert len(problems) == 1 and expected in next(iter(problems.values()))
    assert settings == RunSettings()


def test_every_bad_setting_is_reported_at_once():
    _, problems = check_settings({"batch_size": 0, "device": "tpu", "ray": {"max_retries": -1, "num_cpus": 0}, "report": 1})
    assert sorted(problems) == ["batch_size", "device", "ray.max_retries", "ray.num_cpus", "report"]


def test_one_table_holds_the_facts_of_each_data_set():
    assert set(DATASETS) == {dataset.value for dataset in zoo.Dataset}
    assert DATASET_SHAPES == {name: facts.shape for name, facts in DATASETS.items()}
    assert STANDARD_RADII == {
        (name, kind): radii for name, facts in DATASETS.items() for kind, radii in facts.standard_radii.items()
    }
    assert all(facts.batch_size("cpu") <= facts.batch_size("cuda") for facts in DATASETS.values())

"""A bad configuration is refused in seconds, before any attack, with every problem named at once.

Each case runs :func:`run_benchmark` (or ``run_benchmark.py`` for the
choices Hydra resolves itself) on the synthetic world of
:mod:`synthetic`, so no real data or published weights are needed; each
asserts exit code 2, a message naming the bad value and what is allowed, a
refusal within :data:`LIMIT_SECONDS` (for the command line: beyond the time
the interpreter takes to import what it needs, measured beside it), and no
``examples/`` folder written.
"""

from __future__ import annotations

import errno
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.run.benchmark import run_benchmark

ROOT = Path(__file__).resolve().parents[1]
LIMIT_SECONDS = 15.0


@pytest.fixture
def config(world, tmp_path):
    """A configuration that passes every check: six examples of the synthetic model."""
    return {
        "grid": {"name": "synthetic", "blocks": [{
            "dataset": "mnist", "model": world.model, "solver": "projected_sinkhorn_box",
            "protocol": "paper_code_mnist", "n_examples": 6,
        }]},
        "executor": "local", "n_examples": None, "seed": None, "data_root": str(world.data_root),
        "weights_dir": str(world.weights_dir), "download": False, "results_dir": str(tmp_path / "results"),
        "device": "cpu", "batch_size": 3, "gallery_examples": 2, "report": False, "dry_run": False,
        "plugins": [str(world.plugin)],
        "ray": {"address": None, "gpus_per_actor": 1.0, "cpus_per_actor": 1, "max_retries": 2, "num_cpus": 1},
    }


@pytest.fixture
def unused_port():
    """A port on 127.0.0.1 where nothing listens: bound by the system, then released."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def refused(config) -> str:
    """Run ``config``; assert it is refused quickly with nothing attacked; return the message."""
    stream = io.StringIO()
    started = time.perf_counter()
    code = run_benchmark(config, stream=stream)
    seconds = time.perf_counter() - started
    message = stream.getvalue()
    assert code == 2, message
    assert message.startswith("The benchmark cannot start:\n"), message
    assert seconds < LIMIT_SECONDS, f"refused after {seconds:.1f} s"
    assert not (Path(config["results_dir"]) / "examples").exists()
    return message


@pytest.fixture(scope="module")
def startup_seconds() -> float:
    """What starting the command line costs before any check: the interpreter importing Hydra and the harness."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import hydra, harness.run.benchmark, harness.report"], cwd=ROOT, check=True)
    return time.perf_counter() - started


def run_script(*arguments: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    finished = subprocess.run(
        [sys.executable, "run_benchmark.py", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    return finished, time.perf_counter() - started


def test_a_good_configuration_passes_and_leaves_no_folder_behind(config):
    stream = io.StringIO()
    assert run_benchmark({**config, "dry_run": True}, stream=stream) == 0, stream.getvalue()
    plan = stream.getvalue()
    assert "grid synthetic: 1 cells, 2 shards, 6 examples (mnist/tiny_synthetic: 1); executor local;" in plan
    assert str(Path(config["plugins"][0]).resolve()) in plan
    assert not Path(config["results_dir"]).exists()


@pytest.mark.parametrize("where", ["under a file", "under /proc"])
def test_a_results_dir_that_cannot_be_written_is_refused(config, tmp_path, where):
    if where == "under a file":
        blocker = tmp_path / "a_file"
        blocker.write_text("")
        results_dir, reason = blocker / "results", os.strerror(errno.ENOTDIR)
    else:
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc file system here")
        results_dir, reason = Path("/proc/forbidden"), os.strerror(errno.ENOENT)
    message = refused({**config, "results_dir": str(results_dir)})
    assert f"results_dir={str(results_dir)!r} cannot be created and written" in message
    assert reason in message and "give a folder you can write to" in message


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("cpus_per_actor", 0, "ray.cpus_per_actor=0 is invalid: it must be an integer >= 1"),
        ("cpus_per_actor", 1.5, "ray.cpus_per_actor=1.5 is invalid: it must be an integer >= 1"),
        ("gpus_per_actor", 0, "ray.gpus_per_actor=0 is invalid: it must be a number > 0 (a fraction up to 1, or a whole number)"),
        ("gpus_per_actor", 1.5, "ray.gpus_per_actor=1.5 is invalid: it must be a number > 0"),
        ("max_retries", -1, "ray.max_retries=-1 is invalid: it must be an integer >= 0"),
        ("num_cpus", 0, "ray.num_cpus=0 is invalid: it must be null (all CPUs) or an integer >= 1"),
        ("address", 6379, "ray.address=6379 is invalid: it must be null (an embedded Ray), auto, host:port or ray://host:port"),
    ],
)
def test_invalid_ray_options_are_refused(config, option, value, expected):
    assert expected in refused({**config, "ray": {**config["ray"], option: value}})


def test_an_unknown_ray_option_is_refused_with_the_allowed_ones(config):
    message = refused({**config, "ray": {**config["ray"], "num_gpus": 2}})
    assert (
        "unknown setting(s) ray.num_gpus; allowed: ray.address, ray.gpus_per_actor, ray.cpus_per_actor, "
        "ray.max_retries, ray.num_cpus"
    ) in message


def test_cuda_is_refused_where_there_is_none(config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = refused({**config, "device": "cuda"})
    assert "device='cuda' is not available: this machine has no CUDA device; allowed here: auto, cpu" in message


def test_a_cuda_device_beyond_the_count_is_refused(config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    message = refused({**config, "device": "cuda:7"})
    assert "device='cuda:7' does not exist: this machine has 2 CUDA device(s); allowed: auto, cpu, cuda, cuda:N for N from 0 to 1" in message


def test_a_malformed_device_is_refused(config):
    assert "device='gpu' is invalid: it must be auto, cpu, cuda or cuda:N" in refused({**config, "device": "gpu"})


def test_more_examples_than_the_test_split_are_refused(config, world):
    message = refused({**config, "n_examples": world.test_examples + 1})
    assert (
        f"data set 'mnist': its test split (in {world.data_root}) has {world.test_examples} images, "
        f"fewer than n_examples={world.test_examples + 1}; allowed: n_examples from 1 to {world.test_examples}"
    ) in message


def test_a_plugin_that_cannot_be_imported_is_one_of_the_problems(config):
    message = refused({**config, "plugins": [*config["plugins"], "no_such_plugin_module"], "batch_size": 0})
    assert "plugin 'no_such_plugin_module' (a module name) could not be imported" in message
    assert "batch_size=0 is invalid" in message


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_a_ray_address_where_nothing_answers_is_refused(config, unused_port, scheme):
    address = f"{scheme}127.0.0.1:{unused_port}"
    message = refused({**config, "executor": "ray", "ray": {**config["ray"], "address": address}})
    assert f"ray.address={address!r}: nothing answers at 127.0.0.1:{unused_port}" in message
    assert "`ray start --head`" in message and "leave ray.address null for an embedded Ray" in message


def test_auto_probes_the_address_ray_would_use(config, unused_port, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{unused_port}")
    message = refused({**config, "executor": "ray", "ray": {**config["ray"], "address": "auto"}})
    assert f"ray.address='auto' (resolved to '127.0.0.1:{unused_port}'): nothing answers at 127.0.0.1:{unused_port}" in message


def test_auto_without_a_cluster_says_none_was_found(config, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "no_ray_here"))
    message = refused({**config, "executor": "ray", "ray": {**config["ray"], "address": "auto"}})
    assert "ray.address='auto' found no running cluster" in message and "`ray start --head`" in message


def test_a_malformed_ray_address_is_refused(config):
    message = refused({**config, "executor": "ray", "ray": {**config["ray"], "address": "localhost"}})
    assert "ray.address='localhost' is invalid: it must be null (an embedded Ray), auto, host:port or ray://host:port" in message


def test_every_problem_is_reported_at_once(config, tmp_path, world, unused_port, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = refused({
        **config, "executor": "ray", "device": "cuda", "batch_size": 0, "n_examples": world.test_examples + 1,
        "results_dir": str(blocker / "results"),
        "ray": {**config["ray"], "cpus_per_actor": 0, "address": None},
    })
    for expected in (
        "ray.cpus_per_actor=0 is invalid",
        "device='cuda' is not available",
        "batch_size=0 is invalid",
        f"fewer than n_examples={world.test_examples + 1}",
        f"results_dir={str(blocker / 'results')!r} cannot be created and written",
    ):
        assert expected in message
    assert len(message.splitlines()) == 1 + 5, message


@pytest.mark.parametrize(
    "argument, expected",
    [
        ("grid=nonexistent", "grid='nonexistent' does not exist; grid choices: certify, certify_check, cifar_wu2020, evaluate, fixed_radius_check, frank_wolfe_oracle, full, kernel_sizes,"),
        ("+grid=nonexistent", "grid='nonexistent' does not exist; grid choices: certify, certify_check, cifar_wu2020, evaluate, fixed_radius_check, frank_wolfe_oracle, full, kernel_sizes,"),
        ("executor=nope", "executor='nope' is invalid: it must be local or ray"),
    ],
)
def test_unknown_grid_or_executor_names_are_refused_with_the_choices(tmp_path, argument, expected, startup_seconds):
    results = tmp_path / "results"
    finished, seconds = run_script(argument, f"results_dir={results}")
    assert finished.returncode == 2, finished.stdout + finished.stderr
    assert finished.stdout.startswith("The benchmark cannot start:\n") and expected in finished.stdout
    assert "Traceback" not in finished.stderr and "HYDRA_FULL_ERROR" not in finished.stdout + finished.stderr
    assert seconds < startup_seconds + LIMIT_SECONDS and not results.exists()


def test_the_command_line_still_reaches_hydra_and_the_checks(tmp_path, world, startup_seconds):
    finished, _ = run_script("--help")
    assert finished.returncode == 0 and "grid: certify, certify_check, cifar_wu2020, evaluate, fixed_radius_check, frank_wolfe_oracle, full, kernel_sizes, lambda_p" in finished.stdout
    results = tmp_path / "results"
    finished, seconds = run_script(
        "grid=smoke", "executor=local", "ray.cpus_per_actor=0", f"results_dir={results}",
        f"data_root={world.data_root}", f"weights_dir={world.weights_dir}",
    )
    assert finished.returncode == 2, finished.stdout + finished.stderr
    assert "ray.cpus_per_actor=0 is invalid: it must be an integer >= 1" in finished.stdout
    assert "model 'mnist/standard': weights file" in finished.stdout
    assert seconds < startup_seconds + LIMIT_SECONDS and not results.exists()
